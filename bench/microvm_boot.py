"""Boot time, memory and channel latency of microVMs run by the microvm runtime.

For each of --boots VMs (10 by default) this measures, from the runtime's start() call:
- ready: until the guest agent reports READY (the component was exec'd in the guest);
- serving: until a 64-byte echo through the forwarded TCP port comes back.
It reads QEMU's VmRSS once the VM serves, then stops the VM through the ACPI power button and
times stop(). On the first VM it also times 64-byte round trips over three paths:
- the agent's control channel (virtio-serial), over one persistent connection;
- the exec socket, with a new connection per message as each exec probe makes;
- one TCP connection through QEMU's user-network port forward. The accelerator (KVM or TCG) and the reason for it are part of the results.

The guest component is a static C TCP echo server compiled here with gcc -static.

Run as root (QEMU then runs as the user osvm in a cgroup):
    .venv/bin/python bench/microvm_boot.py [--boots 10] [--round-trips 200]
"""

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

from osvm.config.models import Component, ImageSpec, VmSettings
from osvm.images import build_image
from osvm.runtimes.base import LaunchPlan
from osvm.runtimes.microvm import MicroVmRuntime, detect_accelerator
from osvm.runtimes.microvm.guest_exec import echo as exec_socket_echo

ECHO_SERVER = r"""
#include <stdlib.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
int main(void) {
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons(atoi(getenv("OSVM_PORT_ECHO")));
    if (bind(listener, (struct sockaddr *)&address, sizeof address) || listen(listener, 16))
        return 1;
    for (;;) {
        int client = accept(listener, 0, 0);
        if (client < 0)
            continue;
        setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fork() == 0) {
            char buffer[4096];
            ssize_t n;
            while ((n = read(client, buffer, sizeof buffer)) > 0)
                if (write(client, buffer, n) != n)
                    break;
            _exit(0);
        }
        close(client);
    }
}
"""

PAYLOAD = b"x" * 64
# Kept between runs, so only the first run downloads and unpacks the kernel package.
IMAGE_CACHE = Path("/var/tmp/osvm-bench-images")
READY_TIMEOUT = 120.0
SERVING_TIMEOUT = 60.0


def compile_echo_server(directory: Path) -> Path:
    source = directory / "echo.c"
    source.write_text(ECHO_SERVER)
    binary = directory / "echo-server"
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(source)], check=True)
    return binary


def make_plan(state_dir: Path, index: int, binary: Path, memory_mib: int) -> LaunchPlan:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = Component(
        command=[str(binary)],
        runtime="microvm",
        ports={"echo": port},
        stop_grace_period=5.0,
        vm=VmSettings(vcpus=1, memory=memory_mib * 1024 * 1024),
        image=ImageSpec(kind="binary", path=str(binary)),
    )
    instance_id = f"bench-1-{index:06x}"
    instance_dir = state_dir / "instances" / instance_id
    env = {"OSVM_INSTANCE": instance_id, "OSVM_COMPONENT": "bench", "OSVM_PORT_ECHO": str(port)}
    return LaunchPlan(
        instance_id=instance_id, component="bench", spec=spec, argv=spec.argv(), env=env,
        instance_dir=instance_dir, data_dir=state_dir / "data" / instance_id, log_path=instance_dir / "output.log",
    )


def tcp_echo_once(port: int, timeout: float, host: str = "127.0.0.1") -> socket.socket | None:
    """Connect, send PAYLOAD and return the connection if it comes back, else None."""
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        connection.sendall(PAYLOAD)
        received = b""
        while len(received) < len(PAYLOAD):
            chunk = connection.recv(4096)
            if not chunk:
                raise OSError("closed")
            received += chunk
        return connection
    except OSError:
        connection.close()
        return None


def wait_serving(port: int, deadline: float, host: str = "127.0.0.1") -> socket.socket:
    # QEMU's port forward accepts before the guest listens and then closes, so retry until an echo returns.
    while time.monotonic() < deadline:
        connection = tcp_echo_once(port, 5.0, host)
        if connection is not None:
            return connection
        time.sleep(0.02)
    raise harness.BenchError(f"no echo through {host}:{port} within {SERVING_TIMEOUT} s")


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


async def one_boot(runtime: MicroVmRuntime, plan: LaunchPlan, round_trips: int) -> dict[str, Any]:
    await runtime.prepare(plan)
    started = time.monotonic()
    handle = await runtime.start(plan)
    try:
        runtime.record_start(handle, plan)
        if not await runtime.wait_ready(handle, READY_TIMEOUT):
            raise harness.BenchError(f"VM {plan.instance_id} not ready; see {plan.instance_dir}/serial.log")
        ready = time.monotonic() - started
        port = int(plan.env["OSVM_PORT_ECHO"])
        connection = await asyncio.to_thread(wait_serving, port, time.monotonic() + SERVING_TIMEOUT)
        serving = time.monotonic() - started
        # As root, handle.pid is bwrap's; QEMU's own pid is in its -pidfile.
        qemu = int((plan.instance_dir / "qemu.pid").read_text())
        result: dict[str, Any] = {
            "ready_s": round(ready, 3),
            "serving_s": round(serving, 3),
            "qemu_rss_kib": harness.read_status_number(qemu, "VmRSS"),
            "qemu_pss_kib": harness.read_pss_kib(qemu),
        }
        if round_trips:
            session = handle.extra["agent"]
            control = []
            for _ in range(round_trips):
                began = time.perf_counter()
                await session.echo(PAYLOAD)
                control.append((time.perf_counter() - began) * 1e6)
            exec_socket = []
            for _ in range(round_trips):
                began = time.perf_counter()
                await asyncio.to_thread(exec_socket_echo, str(plan.instance_dir / "exec.sock"), PAYLOAD)
                exec_socket.append((time.perf_counter() - began) * 1e6)
            tcp = await asyncio.to_thread(tcp_round_trips, connection, round_trips)
            result["round_trip_us"] = {
                "agent_control_channel": harness.summarize(control),
                "agent_exec_socket_new_connection": harness.summarize(exec_socket),
                "tcp_hostfwd": harness.summarize(tcp),
            }
        connection.close()
        stop_started = time.monotonic()
        await runtime.stop(handle, plan)
        result["stop_s"] = round(time.monotonic() - stop_started, 3)
        status = await runtime.wait(handle, plan)
        result["exit"] = status.reason
        return result
    finally:
        if not handle.extra["exited"].done():
            handle.extra["popen"].kill()
            await runtime.wait(handle, plan)
        await runtime.cleanup(plan)


async def run(boots: int, round_trips: int, memory_mib: int) -> dict[str, Any]:
    accelerator, reason = detect_accelerator("auto")
    print(f"accelerator: {accelerator.upper()} ({reason})")
    with tempfile.TemporaryDirectory(prefix="osvm-bench-", dir="/tmp") as scratch:
        state_dir = Path(scratch)
        state_dir.chmod(0o755)
        binary = compile_echo_server(state_dir)
        runtime = MicroVmRuntime(state_dir, image_cache=IMAGE_CACHE)
        build_started = time.monotonic()
        await asyncio.to_thread(build_image, ImageSpec(kind="binary", path=str(binary)), state_dir, IMAGE_CACHE)
        image_seconds = time.monotonic() - build_started
        samples = []
        for index in range(boots):
            sample = await one_boot(runtime, make_plan(state_dir, index, binary, memory_mib), round_trips if index == 0 else 0)
            samples.append(sample)
            print(
                f"boot {index + 1}/{boots}: ready {sample['ready_s']:.2f} s, serving {sample['serving_s']:.2f} s, "
                f"QEMU RSS {sample['qemu_rss_kib'] / 1024:.0f} MiB, stop {sample['stop_s']:.2f} s"
            )
        _remove_cgroup_parent(runtime)
    round_trip = samples[0].get("round_trip_us", {})
    return {
        "accelerator": accelerator,
        "accelerator_reason": reason,
        "vm": {"vcpus": 1, "memory_mib": memory_mib, "image": "binary, initramfs", "component": "static C echo server"},
        "image_build_s": round(image_seconds, 2),
        "boot_to_ready_s": harness.summarize([sample["ready_s"] for sample in samples]),
        "boot_to_serving_s": harness.summarize([sample["serving_s"] for sample in samples]),
        "stop_s": harness.summarize([sample["stop_s"] for sample in samples]),
        "qemu_rss_mib": harness.summarize([sample["qemu_rss_kib"] / 1024 for sample in samples]),
        "qemu_pss_mib": harness.summarize([(sample["qemu_pss_kib"] or 0) / 1024 for sample in samples]),
        "round_trip_64_bytes_us": round_trip,
        "samples": samples,
    }


def _remove_cgroup_parent(runtime: MicroVmRuntime) -> None:
    if runtime.cgroup_layout != "v1":
        return
    for controller in ("memory", "cpu", "pids"):
        try:
            (harness.CGROUP_ROOT / controller / runtime.cgroup_parent).rmdir()
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=10, help="number of VMs booted one after another (default 10)")
    parser.add_argument("--round-trips", type=int, default=200, help="64-byte round trips per channel on the first VM")
    parser.add_argument("--memory", type=int, default=256, help="guest memory in MiB (default 256)")
    options = parser.parse_args()
    if options.boots < 1:
        sys.exit("--boots must be at least 1")
    results = asyncio.run(run(options.boots, options.round_trips, options.memory))
    path = harness.write_results("microvm_boot", results)
    ready = results["boot_to_ready_s"]
    print(
        f"\n{results['accelerator'].upper()}: boot to ready median {ready['median']:.2f} s "
        f"(min {ready['min']:.2f}, max {ready['max']:.2f}, n={ready['n']}), "
        f"QEMU RSS median {results['qemu_rss_mib']['median']:.0f} MiB"
    )
    for channel, stats in results["round_trip_64_bytes_us"].items():
        print(f"64-byte round trip, {channel}: median {stats['median']:.0f} us, p99 {stats.get('p99', 0):.0f} us")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
