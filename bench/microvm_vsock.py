"""64-byte round trips to a microVM over the hybrid vsock channel, compared with TCP.

It boots one VM with the static C echo server of microvm_boot.py and times --round-trips
64-byte echoes over one persistent connection on each path:
- vsock_hybrid: <instance_dir>/vsock.sock with `CONNECT <port>`, which HybridVsockMux carries over
  the virtio-serial port "osvm.vsock" to the guest agent, which connects to 127.0.0.1:<port>;
- tcp_hostfwd: TCP through QEMU's user-network port forward to the same server;
- tcp_tap (as root, with --network tap): a second VM on a tap device in a network namespace,
  reached at the instance address through the namespace's address translation, as the daemon
  runs VMs in network mode "namespace";
- agent_control_channel: ECHO messages on the agent's control port, the same virtio-serial path
  without the multiplexer and the guest TCP hop, for comparison.
It also times one 1 MiB echo over each path. The accelerator (KVM or TCG) and the reason for it
are part of the results.

Run:
    .venv/bin/python bench/microvm_vsock.py [--round-trips 500] [--network user,tap] [--subnet-pool CIDR]
"""

import argparse
import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import harness
from microvm_boot import IMAGE_CACHE, PAYLOAD, READY_TIMEOUT, SERVING_TIMEOUT, compile_echo_server, make_plan, wait_serving

from osvm.runtimes.base import LaunchPlan, ProcessHandle
from osvm.runtimes.microvm import MicroVmRuntime, detect_accelerator
from osvm.runtimes.microvm.agent import AgentSession
from osvm.runtimes.netns import InstanceNetwork, addressing_for
from osvm.vsock import connect

BULK_BYTES = 1024 * 1024


async def vsock_round_trips(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(PAYLOAD)
        await reader.readexactly(len(PAYLOAD))
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def control_round_trips(session: AgentSession, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await session.echo(PAYLOAD)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def vsock_bulk_seconds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    started = time.perf_counter()

    async def send() -> None:
        writer.write(data)
        await writer.drain()

    sender = asyncio.create_task(send())
    echoed = await reader.readexactly(len(data))
    await sender
    if echoed != data:
        raise harness.BenchError("the 1 MiB echo over vsock came back changed")
    return time.perf_counter() - started


def tcp_round_trips(connection: socket.socket, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        connection.sendall(PAYLOAD)
        received = b""
        while len(received) < len(PAYLOAD):
            received += connection.recv(4096)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def tcp_bulk_seconds(connection: socket.socket, data: bytes) -> float:
    started = time.perf_counter()
    # Send from another thread while this one reads, so the echo server never blocks on a full socket buffer.
    sender = threading.Thread(target=connection.sendall, args=(data,))
    sender.start()
    received = bytearray()
    while len(received) < len(data):
        chunk = connection.recv(1 << 20)
        if not chunk:
            raise harness.BenchError("the TCP echo connection closed during the 1 MiB echo")
        received += chunk
    sender.join()
    if bytes(received) != data:
        raise harness.BenchError("the 1 MiB echo over TCP came back changed")
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def booted_vm(runtime: MicroVmRuntime, plan: LaunchPlan) -> AsyncIterator[ProcessHandle]:
    """Boot the VM of plan, yield its handle once its agent is ready, then stop and clean it up."""
    await runtime.prepare(plan)
    handle = await runtime.start(plan)
    try:
        if not await runtime.wait_ready(handle, READY_TIMEOUT):
            raise harness.BenchError(f"VM {plan.instance_id} not ready; see {plan.instance_dir}/serial.log")
        yield handle
        await runtime.stop(handle, plan)
        await runtime.wait(handle, plan)
    finally:
        if not handle.extra["exited"].done():
            handle.extra["popen"].kill()
            await runtime.wait(handle, plan)
        await runtime.cleanup(plan)


async def measure_tap(
    runtime: MicroVmRuntime, state_dir: Path, binary: Path, round_trips: int, pool: str
) -> dict[str, Any]:
    """Time TCP round trips and a 1 MiB echo to a VM on a tap device in its own network namespace."""
    plan = make_plan(state_dir, 1, binary, 256)
    addressing = addressing_for(0, pool)
    plan = dataclasses.replace(plan, netns_name=InstanceNetwork(plan.instance_id, None).netns_name, addressing=addressing)
    async with booted_vm(runtime, plan):
        port = int(plan.env["OSVM_PORT_ECHO"])
        address = addressing.instance_address
        connection = await asyncio.to_thread(wait_serving, port, time.monotonic() + SERVING_TIMEOUT, address)
        try:
            tcp = await asyncio.to_thread(tcp_round_trips, connection, round_trips)
            tcp_bulk = await asyncio.to_thread(tcp_bulk_seconds, connection, os.urandom(BULK_BYTES))
        finally:
            connection.close()
    return {"round_trip_64_bytes_us": harness.summarize(tcp), "echo_1_mib_s": round(tcp_bulk, 3)}


async def measure(runtime: MicroVmRuntime, state_dir: Path, binary: Path, round_trips: int) -> dict[str, Any]:
    plan = make_plan(state_dir, 0, binary, 256)
    async with booted_vm(runtime, plan) as handle:
        port = int(plan.env["OSVM_PORT_ECHO"])
        connection = await asyncio.to_thread(wait_serving, port, time.monotonic() + SERVING_TIMEOUT)
        reader, writer = await connect(plan.instance_dir / "vsock.sock", port)
        data = os.urandom(BULK_BYTES)
        try:
            vsock = await vsock_round_trips(reader, writer, round_trips)
            tcp = await asyncio.to_thread(tcp_round_trips, connection, round_trips)
            control = await control_round_trips(handle.extra["agent"], round_trips)
            vsock_bulk = await vsock_bulk_seconds(reader, writer, data)
            tcp_bulk = await asyncio.to_thread(tcp_bulk_seconds, connection, data)
        finally:
            writer.close()
            connection.close()
    return {
        "round_trip_64_bytes_us": {
            "vsock_hybrid": harness.summarize(vsock),
            "tcp_hostfwd": harness.summarize(tcp),
            "agent_control_channel": harness.summarize(control),
        },
        "echo_1_mib_s": {"vsock_hybrid": round(vsock_bulk, 3), "tcp_hostfwd": round(tcp_bulk, 3)},
    }


async def run(round_trips: int, networks: list[str], pool: str) -> dict[str, Any]:
    accelerator, reason = detect_accelerator("auto")
    print(f"accelerator: {accelerator.upper()} ({reason})")
    with tempfile.TemporaryDirectory(prefix="osvm-bench-", dir="/tmp") as scratch:
        state_dir = Path(scratch)
        state_dir.chmod(0o755)
        binary = compile_echo_server(state_dir)
        runtime = MicroVmRuntime(state_dir, image_cache=IMAGE_CACHE)
        results = await measure(runtime, state_dir, binary, round_trips)
        if "tap" in networks:
            tap = await measure_tap(runtime, state_dir, binary, round_trips, pool)
            results["round_trip_64_bytes_us"]["tcp_tap"] = tap["round_trip_64_bytes_us"]
            results["echo_1_mib_s"]["tcp_tap"] = tap["echo_1_mib_s"]
    return {
        "accelerator": accelerator,
        "accelerator_reason": reason,
        "vm": {"vcpus": 1, "memory_mib": 256, "image": "binary, initramfs", "component": "static C echo server"},
        **results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=500, help="64-byte round trips per path (default 500)")
    parser.add_argument(
        "--network", default="user,tap" if os.geteuid() == 0 else "user",
        help="comma-separated: user (always measured) and tap (needs root); default user,tap as root",
    )
    parser.add_argument(
        "--subnet-pool", default="10.213.250.0/24",
        help="IPv4 pool for the tap VM's veth pair; choose one that no host route uses (default 10.213.250.0/24)",
    )
    options = parser.parse_args()
    if options.round_trips < 1:
        sys.exit("--round-trips must be at least 1")
    networks = [name.strip() for name in options.network.split(",") if name.strip()]
    unknown = sorted(set(networks) - {"user", "tap"})
    if unknown:
        sys.exit(f"--network: unknown network {', '.join(unknown)}: use user and tap")
    if "tap" in networks and os.geteuid() != 0:
        sys.exit("--network tap needs root, to create the network namespace and tap device")
    results = asyncio.run(run(options.round_trips, networks, options.subnet_pool))
    path = harness.write_results("microvm_vsock", results)
    print(f"\n{results['accelerator'].upper()}:")
    for channel, stats in results["round_trip_64_bytes_us"].items():
        print(f"64-byte round trip, {channel}: median {stats['median']:.0f} us, p99 {stats.get('p99', 0):.0f} us")
    for channel, seconds in results["echo_1_mib_s"].items():
        print(f"1 MiB echo, {channel}: {seconds:.3f} s")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
