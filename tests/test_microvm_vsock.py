"""Tests of the hybrid vsock channel of microVMs, with real QEMU boots (TCG where KVM is not usable).

The guest runs a static TCP echo server on $OSVM_PORT_HTTP. Host clients reach it through
<instance_dir>/vsock.sock with osvm.vsock.connect(), which the runtime's HybridVsockMux carries
over the virtio-serial port "osvm.vsock" to the guest agent. In the other direction, the VM has
vm.host_ports = [HOST_PORT]: busybox nc in the guest connects to 127.0.0.1:HOST_PORT, and the
test serves <instance_dir>/vsock.sock_<HOST_PORT> on the host. No test opens an AF_VSOCK socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from osvm.runtimes import procinfo
from osvm.runtimes.base import LaunchPlan, ProcessHandle
from osvm.runtimes.cgroups import remove_parent
from osvm.runtimes.microvm import MicroVmRuntime
from osvm.vsock import GuestPortRefused, VsockConnectError, connect, serve_guest_port
from osvm.vsock.hybrid import StreamHandler
from test_microvm_support import IMAGE_CACHE, make_plan, require_guest_kernel, require_qemu, short_state_dir

# A boot under TCG takes 2 to 10 s on a loaded 2-core host.
READY_TIMEOUT = 60.0
# How long a test retries CONNECT while the echo server in the guest starts listening.
LISTEN_TIMEOUT = 30.0
# The VM's vm.host_ports entry. It is below the kernel's ephemeral range, so the echo server's
# allocated port never equals it.
HOST_PORT = 5000
# Time allowed for a command run in the guest through the exec channel, in seconds.
GUEST_COMMAND_TIMEOUT = 120.0

# A static TCP echo server on $OSVM_PORT_HTTP: one child per client, which echoes until EOF.
ECHO_SERVER_SOURCE = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>

static void echo(int client) {
    char buffer[65536];
    for (;;) {
        ssize_t n = read(client, buffer, sizeof buffer);
        if (n <= 0)
            break;
        for (ssize_t sent = 0; sent < n;) {
            ssize_t written = write(client, buffer + sent, n - sent);
            if (written <= 0)
                _exit(1);
            sent += written;
        }
    }
    shutdown(client, SHUT_WR);
    _exit(0);
}

int main(void) {
    const char *port_text = getenv("OSVM_PORT_HTTP");
    int port = port_text ? atoi(port_text) : 8080;
    signal(SIGCHLD, SIG_IGN);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = INADDR_ANY;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 64) != 0) {
        perror("bind");
        return 1;
    }
    printf("echo server listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client < 0)
            continue;
        if (fork() == 0) {
            close(listener);
            echo(client);
        }
        close(client);
    }
}
"""


def compile_echo_server(directory: Path) -> Path:
    """Compile the echo server statically into directory/echo-server."""
    source = directory / "echo-server.c"
    source.write_text(ECHO_SERVER_SOURCE)
    binary = directory / "echo-server"
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(source)], check=True)
    return binary


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_qemu()
    require_guest_kernel()
    return compile_echo_server(tmp_path_factory.mktemp("echo"))


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with short_state_dir("osvm-vs-") as path:
        yield path


class EchoVm:
    """One booted VM running the echo server, and the runtime that started it."""

    def __init__(self, runtime: MicroVmRuntime, plan: LaunchPlan, handle: ProcessHandle):
        self.runtime = runtime
        self.plan = plan
        self.handle = handle

    @property
    def vsock_path(self) -> Path:
        return self.plan.instance_dir / "vsock.sock"

    @property
    def port(self) -> int:
        return int(self.plan.env["OSVM_PORT_HTTP"])

    @property
    def exec_socket(self) -> Path:
        return self.plan.instance_dir / "exec.sock"


@pytest.fixture
async def echo_vm(state_dir: Path, echo_server: Path) -> AsyncIterator[EchoVm]:
    """Boot one VM. Teardown kills QEMU by pid if it still runs, runs cleanup() and checks what is left."""
    runtime = MicroVmRuntime(state_dir, image_cache=IMAGE_CACHE)
    plan = make_plan(state_dir, "echo-1-vsock0", echo_server, host_ports=[HOST_PORT])
    await runtime.prepare(plan)
    handle = await runtime.start(plan)
    try:
        ready = await runtime.wait_ready(handle, READY_TIMEOUT)
        assert ready, f"the agent did not report READY within {READY_TIMEOUT} s:\n{_diagnostics(plan)}"
        yield EchoVm(runtime, plan, handle)
    finally:
        if procinfo.is_alive(handle.pid, handle.start_time):
            os.kill(handle.pid, signal.SIGKILL)
            await runtime.wait(handle, plan)
        await runtime.cleanup(plan)
        if runtime.cgroup_layout is not None:
            # The runtime keeps the cgroup parent of the state directory; nothing is left in it now.
            remove_parent(runtime.cgroup_parent)
        left = sorted(path.name for path in plan.instance_dir.glob("*.sock*"))
        assert not left, f"socket files left in {plan.instance_dir} after cleanup: {left}"


async def connect_when_listening(vm: EchoVm) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the echo server through vsock.sock, retrying while vsock.sock and the guest server start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LISTEN_TIMEOUT
    while True:
        try:
            return await connect(vm.vsock_path, vm.port)
        except (VsockConnectError, OSError):
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.2)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    """Send data, then EOF, and return everything the echo server sent back before its EOF."""

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.read()
    await sender
    return received


async def round_trip_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    """Send data and return as many bytes echoed back, leaving the connection open."""
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


@dataclass
class GuestResult:
    returncode: int
    # stdout and stderr of the command in the guest (their last 4 KiB), or guest_exec's own error.
    output: str


async def run_in_guest_shell(vm: EchoVm, script: str) -> GuestResult:
    """Run `sh -c script` in the guest through guest_exec, without blocking the event loop that serves the host side."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "osvm.runtimes.microvm.guest_exec",
        "--socket", str(vm.exec_socket), "--timeout", f"{GUEST_COMMAND_TIMEOUT:g}", "--", "sh", "-c", script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), GUEST_COMMAND_TIMEOUT + 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return GuestResult(process.returncode, output.decode(errors="replace"))


async def run_with_host_listener(vm: EchoVm, handler: StreamHandler, script: str) -> GuestResult:
    """Serve vsock.sock_<HOST_PORT> with handler while `sh -c script` runs in the guest."""
    server = await serve_guest_port(vm.vsock_path, HOST_PORT, handler)
    try:
        return await run_in_guest_shell(vm, script)
    finally:
        await server.close()


def reply_handler(received: list[bytes]) -> StreamHandler:
    """Return a handler that reads a guest connection to its EOF, stores the data and replies "reply to <data>"."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # nc shuts down its sending side at the end of its input, so read() ends at the guest's EOF.
        data = await reader.read()
        received.append(data)
        writer.write(b"reply to " + data)
        await writer.drain()
        writer.close()

    return reply


# --- tests -------------------------------------------------------------------------------------


async def test_vsock_small_round_trip(echo_vm: EchoVm) -> None:
    reader, writer = await connect_when_listening(echo_vm)
    try:
        writer.write(b"ping over vsock\n")
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(16), 30)
        assert echoed == b"ping over vsock\n"

        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 30)
        assert rest == b""
    finally:
        writer.close()


async def test_vsock_one_mib_round_trip(echo_vm: EchoVm) -> None:
    data = os.urandom(1024 * 1024)
    reader, writer = await connect_when_listening(echo_vm)
    try:
        echoed = await asyncio.wait_for(round_trip(reader, writer, data), 120)
    finally:
        writer.close()
    assert len(echoed) == len(data)
    assert echoed == data


async def test_vsock_concurrent_channels(echo_vm: EchoVm) -> None:
    # The first connection waits until the server listens, then eight run at once.
    reader, writer = await connect_when_listening(echo_vm)
    writer.close()
    streams = await asyncio.gather(*(connect(echo_vm.vsock_path, echo_vm.port) for _ in range(8)))
    payloads = [os.urandom(64 * 1024) + bytes([index]) for index in range(len(streams))]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(round_trip(reader, writer, payload) for (reader, writer), payload in zip(streams, payloads))),
            120,
        )
    finally:
        for _, writer in streams:
            writer.close()
    for result, payload in zip(results, payloads):
        assert result == payload


async def test_vsock_channels_released(echo_vm: EchoVm) -> None:
    # More connections, one after another, than the agent has channel slots (128), so a slot that
    # is not freed after the close exchange makes a later CONNECT fail.
    reader, writer = await connect_when_listening(echo_vm)
    writer.close()
    for index in range(160):
        reader, writer = await connect(echo_vm.vsock_path, echo_vm.port)
        try:
            echoed = await asyncio.wait_for(round_trip(reader, writer, b"connection %d" % index), 30)
        finally:
            writer.close()
        assert echoed == b"connection %d" % index


async def test_vsock_refused_port(echo_vm: EchoVm) -> None:
    # Wait for the server, so the guest agent is known to serve the port.
    reader, writer = await connect_when_listening(echo_vm)
    writer.close()
    unused_port = echo_vm.port + 1 if echo_vm.port < 65535 else echo_vm.port - 1
    with pytest.raises(GuestPortRefused) as refused:
        await connect(echo_vm.vsock_path, unused_port)
    assert refused.value.port == unused_port
    assert str(echo_vm.vsock_path) in str(refused.value)


async def test_vsock_after_adoption(echo_vm: EchoVm) -> None:
    reader, writer = await connect_when_listening(echo_vm)
    assert await asyncio.wait_for(round_trip_open(reader, writer, b"before"), 30) == b"before"

    # When a daemon dies, its agent connection and its multiplexer close, and so does every vsock
    # client. The test closes both, as the kernel would.
    await echo_vm.handle.extra["agent"].close()
    await echo_vm.handle.extra["vsock"].close()
    await echo_vm.handle.extra["exec_mux"].close()
    assert await asyncio.wait_for(reader.read(), 30) == b""
    writer.close()

    restarted = MicroVmRuntime(echo_vm.plan.instance_dir.parent.parent, image_cache=IMAGE_CACHE)
    adopted = restarted.adopt(echo_vm.plan, echo_vm.handle.pid, echo_vm.handle.start_time)
    assert adopted is not None
    try:
        reader, writer = await connect_when_listening(echo_vm)
        try:
            echoed = await asyncio.wait_for(round_trip(reader, writer, b"after adoption"), 30)
        finally:
            writer.close()
        assert echoed == b"after adoption"
    finally:
        await restarted.stop(adopted, echo_vm.plan)
        await restarted.wait(adopted, echo_vm.plan)
        await restarted.cleanup(echo_vm.plan)


async def test_vsock_sockets_removed_after_stop(echo_vm: EchoVm) -> None:
    reader, writer = await connect_when_listening(echo_vm)
    writer.close()
    # A leftover guest-initiated port socket, as serve_guest_port() would leave it, goes at cleanup.
    stray = echo_vm.plan.instance_dir / "vsock.sock_1024"
    stray_server = await asyncio.start_unix_server(lambda r, w: None, path=str(stray))
    stray_server.close()
    await stray_server.wait_closed()
    assert echo_vm.vsock_path.exists()

    await echo_vm.runtime.stop(echo_vm.handle, echo_vm.plan)
    await echo_vm.runtime.wait(echo_vm.handle, echo_vm.plan)
    assert not echo_vm.vsock_path.exists()

    # A restart keeps the host programs' listening sockets.
    restarted = await echo_vm.runtime.start(echo_vm.plan)
    assert stray.exists()
    await echo_vm.runtime.stop(restarted, echo_vm.plan)
    await echo_vm.runtime.wait(restarted, echo_vm.plan)

    await echo_vm.runtime.cleanup(echo_vm.plan)
    left = sorted(path.name for path in echo_vm.plan.instance_dir.glob("*.sock*"))
    assert left == []


async def test_guest_connects_to_host_port(echo_vm: EchoVm) -> None:
    # More connections, one after another, than the agent has channel slots (128), so a slot that
    # is not freed after a guest-opened channel closes makes a later connection fail.
    received: list[bytes] = []
    script = f"for i in $(seq 1 140); do echo hello $i | nc 127.0.0.1 {HOST_PORT}; done"
    result = await run_with_host_listener(echo_vm, reply_handler(received), script)

    assert result.returncode == 0, result.output
    assert received == [b"hello %d\n" % index for index in range(1, 141)]
    assert result.output == "".join(f"reply to hello {index}\n" for index in range(1, 141))


async def test_guest_to_host_bulk_both_ways(echo_vm: EchoVm) -> None:
    # Each direction carries more than the peer's 256 KiB window, so each side must wait for CREDIT.
    to_guest = os.urandom(1024 * 1024)
    received: list[bytes] = []

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            writer.write(to_guest)
            await writer.drain()

        sender = asyncio.create_task(send())
        received.append(await reader.read())
        await sender
        writer.close()

    script = f"seq 1 200000 | nc 127.0.0.1 {HOST_PORT} | sha256sum"
    result = await run_with_host_listener(echo_vm, exchange, script)

    assert result.returncode == 0, result.output
    assert len(received) == 1
    expected = "".join(f"{number}\n" for number in range(1, 200001)).encode()
    assert len(received[0]) == len(expected)
    assert received[0] == expected
    assert result.output.split() == [hashlib.sha256(to_guest).hexdigest(), "-"]


async def test_guest_connection_without_host_listener(echo_vm: EchoVm) -> None:
    # Nothing listens on vsock.sock_<HOST_PORT>, so the host sends OPEN_FAIL and the agent resets
    # the guest connection. nc receives no data and exits.
    script = (
        f"echo hello | nc 127.0.0.1 {HOST_PORT} > /tmp/received 2>/dev/null; "
        f"echo received $(wc -c < /tmp/received) bytes"
    )
    result = await run_in_guest_shell(echo_vm, script)

    assert result.returncode == 0, result.output
    assert result.output == "received 0 bytes\n"
    serial_log = (echo_vm.plan.instance_dir / "serial.log").read_text(errors="replace")
    assert f"closing a guest connection to host port {HOST_PORT}: the host sent OPEN_FAIL with errno 111" in serial_log

    # The refused channel left no state behind: a listener that starts now gets the next connection.
    received: list[bytes] = []
    result = await run_with_host_listener(echo_vm, reply_handler(received), f"echo hello | nc 127.0.0.1 {HOST_PORT}")
    assert result.returncode == 0, result.output
    assert received == [b"hello\n"]
    assert result.output == "reply to hello\n"


async def test_mux_close_resets_guest_connection(echo_vm: EchoVm) -> None:
    connected = asyncio.Event()
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A line from the guest proves that the channel is open. The handler then keeps it open.
        await reader.readline()
        connected.set()
        await release.wait()
        writer.close()

    server = await serve_guest_port(echo_vm.vsock_path, HOST_PORT, hold)
    # A FIFO keeps nc's input open without a pipeline, which would wait for its writer to end too.
    script = (
        "mkfifo /tmp/nc-input; "
        "(echo ready; exec sleep 600) > /tmp/nc-input & "
        f"nc 127.0.0.1 {HOST_PORT} < /tmp/nc-input > /tmp/received 2>/dev/null; "
        "kill $!; echo received $(wc -c < /tmp/received) bytes"
    )
    guest = asyncio.create_task(run_in_guest_shell(echo_vm, script))
    try:
        await asyncio.wait_for(connected.wait(), 60)
        # The multiplexer ends as it does when the daemon dies: every channel ends without a close exchange.
        await echo_vm.handle.extra["vsock"].close()
        result = await asyncio.wait_for(guest, 60)
    finally:
        release.set()
        if not guest.done():
            guest.cancel()
        await asyncio.gather(guest, return_exceptions=True)
        await server.close()

    assert result.returncode == 0, result.output
    assert result.output == "received 0 bytes\n"


# --- helpers -----------------------------------------------------------------------------------


def _diagnostics(plan: LaunchPlan) -> str:
    parts = []
    for name in ("serial.log", "qemu.log", "output.log"):
        path = plan.instance_dir / name
        if path.exists():
            parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)
