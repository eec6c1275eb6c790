"""Tests of the microvm runtime with real QEMU boots (TCG where KVM is not usable).

Each test boots a VM from one shared image of a small static HTTP server. The `vms` fixture
records every handle and plan, and its teardown kills any QEMU still running (by pid), runs
cleanup(), and fails the test if a QEMU process, socket or overlay of the test is left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from osvm.config.load import parse_deployment
from osvm.config.models import ExecProbe, ImageSpec
from osvm.probes.exec import check_exec
from osvm.probes.target import ProbeTarget
from osvm.runtimes import procinfo
from osvm.runtimes.base import DeliveryError, LaunchPlan, ProcessHandle
from osvm.runtimes.microvm import MicroVmRuntime, detect_accelerator
from osvm.runtimes.microvm.agent import AgentSession
from osvm.runtimes.microvm.guest_exec import echo, run_in_guest
from osvm.runtimes.microvm.protocol import (
    GUEST_TLS_DIR,
    PROTOCOL_VERSION,
    AgentState,
    FrameParser,
    GuestFile,
    Hello,
    MessageType,
    decode_hello,
    encode_exec,
    encode_frame,
)
from osvm.runtimes.microvm.qemu import QemuConfig, build_qemu_argv
from osvm.runtimes.cgroups import CONTROLLERS, DEFAULT_ROOT, Cgroup
from osvm.runtimes.microvm.qmp import qmp_execute
from osvm.runtimes.netns import InstanceNetwork, addressing_for
from osvm.runtimes.microvm.runtime import (
    POWEROFF_MARGIN,
    QEMU_MEMORY_OVERHEAD,
    QUIT_TIMEOUT,
    _describe_exit,
    guest_argv,
    guest_env,
    read_tls_files,
)
from osvm.security.ca import CertificateAuthority, IssuedCertificate
from osvm.security.instance_certs import write_instance_files
from e2e import free_subnet_pool, link_names
from test_microvm_support import IMAGE_CACHE, compile_server, make_plan, require_guest_kernel, require_qemu, short_state_dir

# A boot under TCG takes 2 to 10 s on a loaded 2-core host.
READY_TIMEOUT = 60.0
# A component that copies $OSVM_TLS_CERT to /data/reloaded.pem on each SIGHUP, so a test can check
# that the signal reached it after the new files were in place. `wait` returns as soon as a trapped
# signal arrives, so the trap runs at once.
RELOAD_ON_HUP = """trap 'cat "$OSVM_TLS_CERT" > /data/reloaded.pem' HUP; while true; do sleep 1 & wait $!; done"""


@pytest.fixture(scope="module")
def server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_qemu()
    require_guest_kernel()
    return compile_server(tmp_path_factory.mktemp("server"))


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with short_state_dir("osvm-vm-") as path:
        yield path


class VmTracker:
    """The runtime under test plus every VM it started, for teardown."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.runtime = MicroVmRuntime(state_dir, image_cache=IMAGE_CACHE)
        self.started: list[tuple[ProcessHandle, LaunchPlan]] = []

    async def boot(self, plan: LaunchPlan) -> ProcessHandle:
        await self.runtime.prepare(plan)
        handle = await self.runtime.start(plan)
        self.runtime.record_start(handle, plan)
        self.started.append((handle, plan))
        return handle

    async def boot_ready(self, plan: LaunchPlan) -> ProcessHandle:
        handle = await self.boot(plan)
        ready = await self.runtime.wait_ready(handle, READY_TIMEOUT)
        assert ready, f"the agent did not report READY within {READY_TIMEOUT} s:\n{_diagnostics(plan)}"
        return handle


@pytest.fixture
async def vms(state_dir: Path, server_binary: Path) -> AsyncIterator[VmTracker]:
    tracker = VmTracker(state_dir)
    try:
        yield tracker
    finally:
        problems = []
        for handle, plan in tracker.started:
            if procinfo.is_alive(handle.pid, handle.start_time):
                problems.append(f"QEMU pid {handle.pid} of {plan.instance_id} was still running at teardown")
                os.kill(handle.pid, signal.SIGKILL)
                await tracker.runtime.wait(handle, plan)
            await tracker.runtime.cleanup(plan)
            for name in ("root.qcow2", "agent.sock", "exec.sock", "qmp.sock"):
                if (plan.instance_dir / name).exists():
                    problems.append(f"{plan.instance_dir / name} left after cleanup")
            if _qemu_pids(plan.instance_id):
                problems.append(f"QEMU processes of {plan.instance_id} left: {_qemu_pids(plan.instance_id)}")
            if tracker.runtime.cgroup_layout is not None and Cgroup.open(plan.instance_id, parent=tracker.runtime.cgroup_parent):
                problems.append(f"cgroup of {plan.instance_id} left after cleanup")
        _remove_cgroup_parent(tracker.runtime)
        assert not problems, "\n".join(problems)


# --- tests -------------------------------------------------------------------------------------


def test_detect_accelerator_names_reason() -> None:
    accelerator, reason = detect_accelerator("auto")
    assert accelerator in ("kvm", "tcg")
    assert reason
    cpu_flags = Path("/proc/cpuinfo").read_text()
    if " vmx" not in cpu_flags and " svm" not in cpu_flags:
        assert accelerator == "tcg"
        assert "vmx or svm" in reason


def test_detect_accelerator_tcg_requested() -> None:
    assert detect_accelerator("tcg")[0] == "tcg"


def test_kernel_command_line_host_ports(tmp_path: Path) -> None:
    config = QemuConfig(
        name="web-1-hhhhhh",
        accelerator="tcg",
        vcpus=1,
        memory_mib=256,
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        kernel_args=["osvm.host_ports=1", "loglevel=4"],
        instance_dir=tmp_path,
        log_path=tmp_path / "output.log",
        ports=[],
        restrict_network=False,
    )

    def kernel_args(config: QemuConfig) -> list[str]:
        argv = build_qemu_argv(config, "qemu-system-x86_64")
        return argv[argv.index("-append") + 1].split()

    without_ports = kernel_args(config)
    assert without_ports[-2:] == ["osvm.host_ports=1", "loglevel=4"]

    # The agent uses the last osvm.host_ports=, so vm.host_ports must come after vm.kernel_args.
    with_ports = kernel_args(dataclasses.replace(config, host_ports=[5000, 6000]))
    assert with_ports[-3:] == ["osvm.host_ports=1", "loglevel=4", "osvm.host_ports=5000,6000"]


async def test_vm_serves_http_and_exec(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-aaaaaa", server_binary)
    handle = await vms.boot_ready(plan)
    port = int(plan.env["OSVM_PORT_HTTP"])

    response = await asyncio.to_thread(_http_get, port)
    assert response.startswith(b"HTTP/1.1 200 OK"), response
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["result"] == "pong"

    prefix = vms.runtime.exec_prefix(handle, plan)
    success = await asyncio.to_thread(subprocess.run, [*prefix, "sh", "-c", "echo checked; test -x /app/server"], capture_output=True, text=True, timeout=60)
    assert success.returncode == 0, success.stderr
    assert success.stdout.strip() == "checked"
    failure = await asyncio.to_thread(subprocess.run, [*prefix, "sh", "-c", "echo first; echo behind; exit 3"], capture_output=True, text=True, timeout=60)
    assert failure.returncode == 3
    assert failure.stdout.splitlines()[-1] == "behind"
    missing = await asyncio.to_thread(subprocess.run, [*prefix, "no-such-program"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127
    assert "no-such-program" in missing.stdout

    target = ProbeTarget(host="127.0.0.1", ports={"http": port}, exec_prefix=tuple(prefix), env=dict(plan.env))
    healthy, detail = await check_exec(ExecProbe(type="exec", command=["sh", "-c", "test -n \"$OSVM_INSTANCE\""]), target)
    assert healthy, detail
    unhealthy, detail = await check_exec(ExecProbe(type="exec", command=["sh", "-c", "echo not synced; exit 1"]), target)
    assert not unhealthy
    assert "not synced" in detail

    output = plan.log_path.read_text()
    assert f"listening on {port} as web-1-aaaaaa" in output

    if os.geteuid() == 0:
        qemu = int((plan.instance_dir / "qemu.pid").read_text())
        uid_line = next(line for line in Path(f"/proc/{qemu}/status").read_text().splitlines() if line.startswith("Uid:"))
        assert int(uid_line.split()[1]) == pwd.getpwnam("osvm").pw_uid
        assert_jailed(qemu, plan.instance_dir)
    if vms.runtime.cgroup_layout is not None:
        cgroup = Cgroup.open(plan.instance_id, parent=vms.runtime.cgroup_parent)
        assert cgroup is not None
        assert cgroup.contains(handle.pid)
        assert cgroup.contains(int((plan.instance_dir / "qemu.pid").read_text()))
        if cgroup.layout == "v1":
            memory_dir = next(path for path in cgroup.paths if path.parent.parent.name == "memory")
            limit = int((memory_dir / "memory.limit_in_bytes").read_text())
            assert limit == 256 * 1024 * 1024 + QEMU_MEMORY_OVERHEAD

    started = time.monotonic()
    await vms.runtime.stop(handle, plan)
    stop_seconds = time.monotonic() - started
    status = await vms.runtime.wait(handle, plan)
    assert stop_seconds < plan.spec.stop_grace_period + 5.0
    assert status.code == 128 + signal.SIGTERM
    assert "killed by SIGTERM" in status.reason
    assert "powered off" in status.reason
    assert "microVM on" in status.reason
    assert "ACPI power button" in plan.log_path.read_text()


def assert_jailed(qemu: int, instance_dir: Path) -> None:
    """Check that QEMU's mount namespace shows its instance directory and hides the rest of the state."""
    root = Path(f"/proc/{qemu}/root")
    assert os.stat(f"/proc/{qemu}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    assert (root / instance_dir.relative_to("/") / "qmp.sock").exists()
    assert sorted(path.name for path in (root / instance_dir.parent.relative_to("/")).iterdir()) == [instance_dir.name]
    assert not (root / "etc/shadow").exists()
    assert not (root / "root").exists()
    assert (root / "usr/bin").is_dir()


async def test_stop_waits_grace_then_kills(vms: VmTracker, server_binary: Path) -> None:
    # The component ignores SIGTERM, so the agent sends SIGKILL after the grace period.
    plan = make_plan(vms.state_dir, "web-1-bbbbbb", server_binary, command="trap '' TERM; exec /app/server", grace=1.0)
    handle = await vms.boot_ready(plan)
    # READY means the shell started. Once the server responds, the shell has run trap and exec.
    await asyncio.to_thread(_http_get, int(plan.env["OSVM_PORT_HTTP"]))
    started = time.monotonic()
    await vms.runtime.stop(handle, plan)
    elapsed = time.monotonic() - started
    status = await vms.runtime.wait(handle, plan)
    assert elapsed >= 1.0, f"{status}\n{_diagnostics(plan)}"
    assert elapsed < 1.0 + 5.0
    assert status.code == 128 + signal.SIGKILL
    assert "did not exit within 1000 ms" in plan.log_path.read_text()


async def test_stop_quits_paused_vm(vms: VmTracker, server_binary: Path) -> None:
    # With its vCPUs paused the guest cannot handle the power button, so stop() falls back to QMP quit.
    plan = make_plan(vms.state_dir, "web-1-kkkkkk", server_binary, grace=1.0)
    handle = await vms.boot_ready(plan)
    await qmp_execute(plan.instance_dir / "qmp.sock", "stop")
    started = time.monotonic()
    await vms.runtime.stop(handle, plan)
    elapsed = time.monotonic() - started
    status = await vms.runtime.wait(handle, plan)
    assert elapsed >= 1.0 + POWEROFF_MARGIN
    assert elapsed < 1.0 + POWEROFF_MARGIN + QUIT_TIMEOUT
    assert status.code is None
    assert "QEMU quit through QMP" in status.reason


async def test_stop_without_qmp_uses_agent(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-llllll", server_binary)
    handle = await vms.boot_ready(plan)
    (plan.instance_dir / "qmp.sock").unlink()
    await vms.runtime.stop(handle, plan)
    status = await vms.runtime.wait(handle, plan)
    assert status.code == 128 + signal.SIGTERM
    assert "shutdown requested by the host" in plan.log_path.read_text()


async def test_namespace_mode_forwards_on_instance_address(vms: VmTracker, server_binary: Path) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and the ip command (Debian package iproute2)")
    plan = make_plan(vms.state_dir, "web-1-mmmmmm", server_binary)
    addressing = addressing_for(0, free_subnet_pool())
    plan = dataclasses.replace(plan, netns_name=InstanceNetwork(plan.instance_id, None).netns_name, addressing=addressing)
    handle = await vms.boot_ready(plan)
    # QEMU runs in the instance's namespace (both paths name the same namespace inode), attached
    # to the tap device there.
    assert os.stat(f"/proc/{handle.pid}/ns/net").st_ino == os.stat(f"/run/netns/{plan.netns_name}").st_ino
    assert "tap,id=net0,ifname=tap0" in Path(f"/proc/{handle.pid}/cmdline").read_bytes().decode()
    assert "tap0" in link_names(plan.netns_name)
    port = int(plan.env["OSVM_PORT_HTTP"])
    response = await asyncio.to_thread(_http_get, port, addressing.instance_address)
    assert response.startswith(b"HTTP/1.1 200 OK")
    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)
    await vms.runtime.cleanup(plan)
    assert InstanceNetwork.open(plan.instance_id) is None


async def test_killed_qemu_seen_by_wait(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-cccccc", server_binary)
    handle = await vms.boot_ready(plan)
    waiter = asyncio.create_task(vms.runtime.wait(handle, plan))
    await asyncio.sleep(0.5)
    assert not waiter.done()
    os.kill(int((plan.instance_dir / "qemu.pid").read_text()), signal.SIGKILL)
    status = await asyncio.wait_for(waiter, 10)
    assert status.code == 137
    assert "QEMU was killed by SIGKILL" in status.reason


async def test_killed_bwrap_ends_qemu(vms: VmTracker, server_binary: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("QEMU runs under bwrap only when the daemon is root")
    plan = make_plan(vms.state_dir, "web-1-kkkkkk", server_binary)
    handle = await vms.boot_ready(plan)
    qemu = int((plan.instance_dir / "qemu.pid").read_text())
    assert qemu != handle.pid
    os.kill(handle.pid, signal.SIGKILL)
    status = await asyncio.wait_for(vms.runtime.wait(handle, plan), 30)
    assert status.code == 137
    assert "bwrap, the parent of QEMU, was killed by SIGKILL" in status.reason
    assert not procinfo.is_alive(qemu)


async def test_component_exit_powers_off(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-dddddd", server_binary, command="echo goodbye; exit 3")
    handle = await vms.boot(plan)
    status = await asyncio.wait_for(vms.runtime.wait(handle, plan), READY_TIMEOUT)
    assert status.code == 3
    assert "the component exited with status 3" in status.reason
    assert "goodbye" in plan.log_path.read_text()


async def test_missing_program_reports_failure(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-eeeeee", server_binary, command=["/app/not-there"])
    handle = await vms.boot(plan)
    status = await asyncio.wait_for(vms.runtime.wait(handle, plan), READY_TIMEOUT)
    assert status.code == 127
    assert "cannot run /app/not-there" in plan.log_path.read_text()


async def test_adopt_after_daemon_restart(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-ffffff", server_binary)
    handle = await vms.boot_ready(plan)
    # The daemon's connections end with its process: the agent session and the exec multiplexer.
    await handle.extra["agent"].close()
    await handle.extra["exec_mux"].close()

    restarted = MicroVmRuntime(vms.state_dir, image_cache=IMAGE_CACHE)
    adopted = restarted.adopt(plan, handle.pid, handle.start_time)
    assert adopted is not None
    assert adopted.adopted
    assert await restarted.wait_ready(adopted, 10.0)
    code, output = await asyncio.to_thread(run_in_guest, str(plan.instance_dir / "exec.sock"), ["echo", "adopted"], 30.0)
    assert (code, output) == (0, b"adopted\n")

    assert restarted.adopt(plan, handle.pid, handle.start_time + 1) is None

    await restarted.stop(adopted, plan)
    status = await restarted.wait(adopted, plan)
    assert status.code == 128 + signal.SIGTERM
    vms.started.append((adopted, plan))


async def test_ext4_root_with_overlay(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-gggggg", server_binary, image_format="ext4")
    handle = await vms.boot_ready(plan)
    overlay = plan.instance_dir / "root.qcow2"
    assert overlay.exists()
    port = int(plan.env["OSVM_PORT_HTTP"])
    assert (await asyncio.to_thread(_http_get, port)).startswith(b"HTTP/1.1 200 OK")
    code, output = await asyncio.to_thread(
        run_in_guest, str(plan.instance_dir / "exec.sock"), ["sh", "-c", "grep ' / ' /proc/mounts; echo x > /written"], 30.0
    )
    assert code == 0
    assert b"/dev/vda / ext4" in output
    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)
    await vms.runtime.cleanup(plan)
    assert not overlay.exists()


async def test_exec_clients_run_side_by_side(vms: VmTracker, server_binary: Path) -> None:
    # QEMU serves the exec port to one client at a time. The runtime's multiplexer lets a long
    # command and several short ones share it, as an operator's command and probes do.
    plan = make_plan(vms.state_dir, "web-1-xxxxxx", server_binary)
    handle = await vms.boot_ready(plan)
    exec_socket = str(plan.instance_dir / "exec.sock")
    finished: list[str] = []

    async def run(name: str, script: str) -> tuple[int, bytes]:
        result = await asyncio.to_thread(run_in_guest, exec_socket, ["sh", "-c", script], 60.0)
        finished.append(name)
        return result

    long_run = asyncio.create_task(run("long", "sleep 8; echo long"))
    await asyncio.sleep(0.5)
    short = await asyncio.gather(*(run(f"short-{index}", f"echo short {index}") for index in range(4)))

    assert [result for result in short] == [(0, b"short %d\n" % index) for index in range(4)]
    assert "long" not in finished
    assert await long_run == (0, b"long\n")
    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)


async def test_guest_exec_reports_timeout(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-yyyyyy", server_binary)
    handle = await vms.boot_ready(plan)
    command = [
        sys.executable, "-m", "osvm.runtimes.microvm.guest_exec", "--socket", str(plan.instance_dir / "exec.sock"),
        "--timeout", "2", "--", "sh", "-c", "echo before; sleep 30; echo after",
    ]
    result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert result.stdout == "before\n"
    assert "did not finish within 2 s and was killed" in result.stderr
    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)


async def test_echo_and_abandoned_exec(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-hhhhhh", server_binary)
    handle = await vms.boot_ready(plan)
    exec_socket = str(plan.instance_dir / "exec.sock")
    payload = os.urandom(64)
    assert await asyncio.to_thread(echo, exec_socket, payload) == payload
    assert await handle.extra["agent"].echo(payload) == payload

    # A client that goes away without sending keepalives, as a killed probe helper does.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(exec_socket)
        client.sendall(encode_exec(4242, ["sleep", "600"], 0, 1000))
        await asyncio.sleep(0.5)
    code, output = await asyncio.to_thread(run_in_guest, exec_socket, ["sh", "-c", "sleep 3; ps"], 30.0)
    assert code == 0
    assert b"sleep 600" not in output
    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)


async def test_tls_files_in_guest_and_renewal(vms: VmTracker, server_binary: Path) -> None:
    plan, handle, ca, first = await boot_with_certificate(vms, server_binary, "web-1-nnnnnn")
    exec_socket = str(plan.instance_dir / "exec.sock")
    assert handle.extra["agent"].agent_version == PROTOCOL_VERSION

    expected_paths = {
        "OSVM_TLS_CERT": f"{GUEST_TLS_DIR}/cert.pem",
        "OSVM_TLS_KEY": f"{GUEST_TLS_DIR}/key.pem",
        "OSVM_TLS_CA": f"{GUEST_TLS_DIR}/ca.pem",
    }
    for variable, path in expected_paths.items():
        assert await guest_output(exec_socket, f'printf %s "${variable}"') == path.encode()
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_CERT"') == first.chain_pem
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_KEY"') == first.key_pem
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_CA"') == first.ca_pem
    modes = await guest_output(exec_socket, f'stat -c "%n %a" {GUEST_TLS_DIR} "$OSVM_TLS_KEY" "$OSVM_TLS_CERT" "$OSVM_TLS_CA"')
    assert modes.decode().splitlines() == [
        f"{GUEST_TLS_DIR} 700",
        f"{GUEST_TLS_DIR}/key.pem 600",
        f"{GUEST_TLS_DIR}/cert.pem 644",
        f"{GUEST_TLS_DIR}/ca.pem 644",
    ]

    second = renew_on_host(plan, ca)
    assert second.chain_pem != first.chain_pem
    detail = await vms.runtime.update_certificate(handle, plan)
    assert detail == f"copied the files to {GUEST_TLS_DIR} in the VM"
    await vms.runtime.send_signal(handle, plan, "SIGHUP")
    await wait_for_guest_file(exec_socket, "/data/reloaded.pem", second.chain_pem)
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_CERT"') == second.chain_pem
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_KEY"') == second.key_pem
    # No temporary file of the atomic replacement is left.
    assert (await guest_output(exec_socket, f"ls -A {GUEST_TLS_DIR}")).split() == [b"ca.pem", b"cert.pem", b"key.pem"]

    await vms.runtime.stop(handle, plan)
    status = await vms.runtime.wait(handle, plan)
    assert status.code == 128 + signal.SIGTERM


async def test_agent_rejects_paths_outside_tls_dir(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-oooooo", server_binary)
    handle = await vms.boot_ready(plan)
    session = handle.extra["agent"]
    assert isinstance(session, AgentSession)
    exec_socket = str(plan.instance_dir / "exec.sock")

    rejected = [
        "/etc/passwd",
        "/run/osvm/escape.pem",
        f"{GUEST_TLS_DIR}/../escape.pem",
        f"{GUEST_TLS_DIR}/.hidden",
        f"{GUEST_TLS_DIR}/sub/cert.pem",
        f"{GUEST_TLS_DIR}x/cert.pem",
        f"{GUEST_TLS_DIR}/",
        f"{GUEST_TLS_DIR}/nul\0byte",
        "cert.pem",
    ]
    for path in rejected:
        with pytest.raises(DeliveryError, match="is not allowed"):
            await session.write_files([GuestFile(path, 0o644, b"rejected\n")])
    with pytest.raises(DeliveryError, match="mode 04755 of setuid.pem is invalid"):
        await session.write_files([GuestFile(f"{GUEST_TLS_DIR}/setuid.pem", 0o4755, b"rejected\n")])
    # One invalid path rejects the whole message, so the valid file before it is not written either.
    with pytest.raises(DeliveryError, match="is not allowed"):
        await session.write_files([GuestFile(f"{GUEST_TLS_DIR}/valid.pem", 0o644, b"x"), GuestFile("/etc/hosts", 0o644, b"x")])
    listing = await guest_output(exec_socket, "ls -A / /run /run/osvm /run/osvm/tls 2>&1; true")
    assert b"escape" not in listing
    assert b"valid.pem" not in listing
    assert b"hidden" not in listing
    assert b"setuid" not in listing
    assert b"rejected" not in await guest_output(exec_socket, "cat /etc/passwd /etc/hosts 2>&1; true")

    # Without OSVM_TLS_* variables there are no files to copy, and signals still reach the component.
    assert read_tls_files(plan.env) is None
    assert await vms.runtime.update_certificate(handle, plan) == "no certificate files to copy into the VM"
    await vms.runtime.send_signal(handle, plan, "SIGWINCH")
    with pytest.raises(DeliveryError, match="invalid signal number 99"):
        await session.send_signal(99)

    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)
    with pytest.raises(DeliveryError, match="not connected"):
        await vms.runtime.send_signal(handle, plan, "SIGHUP")


async def test_hello_request_restates_state(vms: VmTracker, server_binary: Path) -> None:
    plan = make_plan(vms.state_dir, "web-1-rrrrrr", server_binary)
    handle = await vms.boot_ready(plan)
    component_pid = handle.extra["agent"].component_pid

    # A connection brings at most one HELLO of the agent's own, so two requests bring at least two.
    hellos = await asyncio.to_thread(_request_hellos, plan.instance_dir / "exec.sock", 2)
    assert len(hellos) >= 2
    for hello in hellos:
        assert hello.version == PROTOCOL_VERSION
        assert hello.state == AgentState.RUNNING
        assert hello.component_pid == component_pid

    await vms.runtime.stop(handle, plan)
    await vms.runtime.wait(handle, plan)


async def test_tls_renewal_after_adoption(vms: VmTracker, server_binary: Path) -> None:
    plan, handle, ca, first = await boot_with_certificate(vms, server_binary, "web-1-pppppp")
    exec_socket = str(plan.instance_dir / "exec.sock")
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_CERT"') == first.chain_pem
    await handle.extra["agent"].close()
    await handle.extra["exec_mux"].close()

    # As if a daemon wrote renewed files and stopped before it copied them into the guest: the
    # next daemon copies the host's files when it adopts the VM.
    second = renew_on_host(plan, ca)
    restarted = MicroVmRuntime(vms.state_dir, image_cache=IMAGE_CACHE)
    adopted = restarted.adopt(plan, handle.pid, handle.start_time)
    assert adopted is not None
    vms.started.append((adopted, plan))
    assert await restarted.wait_ready(adopted, 10.0)
    await wait_for_guest_file(exec_socket, f"{GUEST_TLS_DIR}/cert.pem", second.chain_pem)
    assert await guest_output(exec_socket, 'cat "$OSVM_TLS_KEY"') == second.key_pem

    third = renew_on_host(plan, ca)
    assert await restarted.update_certificate(adopted, plan) == f"copied the files to {GUEST_TLS_DIR} in the VM"
    await restarted.send_signal(adopted, plan, "SIGHUP")
    await wait_for_guest_file(exec_socket, "/data/reloaded.pem", third.chain_pem)

    await restarted.stop(adopted, plan)
    status = await restarted.wait(adopted, plan)
    assert status.code == 128 + signal.SIGTERM


@pytest.mark.skipif(os.environ.get("OSVM_SLOW_TESTS") != "1", reason="debootstrap takes minutes: set OSVM_SLOW_TESTS=1")
async def test_debian_ext4_vm_serves_tcp(vms: VmTracker, server_binary: Path) -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("image kind debian needs root and debootstrap (Debian package debootstrap)")
    plan = make_plan(
        vms.state_dir, "deb-1-aaaaaa", server_binary,
        command="while true; do echo served | nc.openbsd -l -N -p $OSVM_PORT_HTTP; done", image_format="ext4",
    )
    spec = plan.spec.model_copy(update={"image": ImageSpec(kind="debian", packages=["netcat-openbsd"], format="ext4")})
    plan = dataclasses.replace(plan, spec=spec)
    handle = await vms.boot_ready(plan)
    code, output = await asyncio.to_thread(
        run_in_guest, str(plan.instance_dir / "exec.sock"), ["sh", "-c", "cat /etc/debian_version; grep ' / ' /proc/mounts"], 30.0
    )
    assert code == 0
    assert b"/dev/vda / ext4" in output
    assert await asyncio.to_thread(_tcp_read, int(plan.env["OSVM_PORT_HTTP"])) == b"served\n"
    await vms.runtime.stop(handle, plan)
    status = await vms.runtime.wait(handle, plan)
    assert status.code == 128 + signal.SIGTERM


def test_documented_deployment_is_valid() -> None:
    document = (Path(__file__).parent.parent / "docs" / "microvm.md").read_text()
    example = document.split("```toml\n", 1)[1].split("```", 1)[0]
    deployment = parse_deployment(example, "docs/microvm.md")
    component = deployment.components["rpc"]
    assert component.runtime == "microvm"
    assert component.vm is not None
    assert component.image is not None
    assert component.image.kind == "binary"


def test_guest_argv_maps_host_binary(server_binary: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "web-1-iiiiii", server_binary)
    assert guest_argv(plan.spec, [str(server_binary), "--flag"]) == ["/app/server", "--flag"]
    assert guest_argv(plan.spec, ["/bin/sh", "-c", "x"]) == ["/bin/sh", "-c", "x"]


def test_guest_env_replaces_host_paths(server_binary: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "web-1-jjjjjj", server_binary)
    env = guest_env(plan.env)
    assert env["OSVM_DATA_DIR"] == "/data"
    assert env["HOME"] == "/data"
    assert env["OSVM_PORT_HTTP"] == plan.env["OSVM_PORT_HTTP"]
    assert "/app" in env["PATH"].split(":")
    assert not any(name.startswith("OSVM_TLS_") for name in env)


def test_guest_env_maps_tls_files(tmp_path: Path) -> None:
    host_dir = tmp_path / "data" / "web-1-qqqqqq" / "tls"
    host_dir.mkdir(parents=True)
    env = {}
    for variable, name, content in (
        ("OSVM_TLS_CERT", "cert.pem", b"certificate"), ("OSVM_TLS_KEY", "key.pem", b"key"), ("OSVM_TLS_CA", "ca.pem", b"root"),
    ):
        (host_dir / name).write_bytes(content)
        env[variable] = str(host_dir / name)

    mapped = guest_env(env)
    assert mapped["OSVM_TLS_CERT"] == f"{GUEST_TLS_DIR}/cert.pem"
    assert mapped["OSVM_TLS_KEY"] == f"{GUEST_TLS_DIR}/key.pem"
    assert mapped["OSVM_TLS_CA"] == f"{GUEST_TLS_DIR}/ca.pem"
    # The key is replaced before the certificate, as on the host, and only its owner may read it.
    assert read_tls_files(env) == [
        GuestFile(f"{GUEST_TLS_DIR}/ca.pem", 0o644, b"root"),
        GuestFile(f"{GUEST_TLS_DIR}/key.pem", 0o600, b"key"),
        GuestFile(f"{GUEST_TLS_DIR}/cert.pem", 0o644, b"certificate"),
    ]

    (host_dir / "key.pem").unlink()
    with pytest.raises(FileNotFoundError):
        read_tls_files(env)


# --- helpers -----------------------------------------------------------------------------------


async def boot_with_certificate(
    vms: VmTracker, server_binary: Path, instance_id: str
) -> tuple[LaunchPlan, ProcessHandle, CertificateAuthority, IssuedCertificate]:
    """Boot the RELOAD_ON_HUP component with a certificate from a new CA in the test's state directory."""
    ca = CertificateAuthority.init(vms.state_dir / "ca")
    plan, issued = with_certificate(make_plan(vms.state_dir, instance_id, server_binary, command=RELOAD_ON_HUP), ca)
    handle = await vms.boot_ready(plan)
    return plan, handle, ca, issued


def with_certificate(plan: LaunchPlan, ca: CertificateAuthority) -> tuple[LaunchPlan, IssuedCertificate]:
    """Issue the instance a certificate, write its files as the daemon does, and add OSVM_TLS_* to the plan."""
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    issued = ca.issue(plan.component, [plan.component], 300.0, plan.instance_id)
    env = write_instance_files(plan.data_dir / "tls", issued, os.getuid(), os.getgid())
    return dataclasses.replace(plan, env={**plan.env, **env}), issued


def renew_on_host(plan: LaunchPlan, ca: CertificateAuthority) -> IssuedCertificate:
    """Issue a new certificate and replace the host files, as a renewal does before it reloads the instance."""
    issued = ca.issue(plan.component, [plan.component], 300.0, plan.instance_id)
    write_instance_files(plan.data_dir / "tls", issued, os.getuid(), os.getgid())
    return issued


def _request_hellos(exec_socket: Path, requests: int) -> list[Hello]:
    """Send HELLO_REQUEST `requests` times on a new connection and return the HELLOs that arrive within 10 s."""
    hellos: list[Hello] = []
    parser = FrameParser()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(exec_socket))
        client.sendall(encode_frame(MessageType.HELLO_REQUEST) * requests)
        deadline = time.monotonic() + 10
        while len(hellos) <= requests and time.monotonic() < deadline:
            client.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = client.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            hellos += [decode_hello(frame.payload) for frame in parser.feed(data) if frame.type == MessageType.HELLO]
    return hellos


async def guest_output(exec_socket: str, script: str) -> bytes:
    """Run a shell script in the guest with the component's environment and return its output."""
    code, output = await asyncio.to_thread(run_in_guest, exec_socket, ["sh", "-c", script], 30.0)
    assert code == 0, f"{script!r} exited with status {code}: {output!r}"
    return output


async def wait_for_guest_file(exec_socket: str, path: str, expected: bytes) -> None:
    """Wait until a guest file has the expected content. The 30 s limit only bounds a hung guest."""
    deadline = time.monotonic() + 30
    while True:
        code, output = await asyncio.to_thread(run_in_guest, exec_socket, ["cat", path], 30.0)
        if code == 0 and output == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} in the guest lacks the expected content after 30 s: status {code}, {output[-300:]!r}")
        await asyncio.sleep(0.2)


def _http_get(port: int, host: str = "127.0.0.1") -> bytes:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as connection:
                connection.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                data = b""
                while chunk := connection.recv(4096):
                    data += chunk
                if data:
                    return data
        except OSError:
            pass
        # hostfwd accepts before the guest listens and then closes, so retry until the server responds.
        if time.monotonic() > deadline:
            raise AssertionError(f"no HTTP response on {host}:{port} within 30 s")
        time.sleep(0.1)


def _tcp_read(port: int) -> bytes:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                data = connection.recv(100)
                if data:
                    return data
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"nothing to read on 127.0.0.1:{port} within 30 s")


def _remove_cgroup_parent(runtime: MicroVmRuntime) -> None:
    """Remove the empty cgroup parent directories of the test's state directory, which runtimes keep."""
    if runtime.cgroup_layout is None:
        return
    roots = [Path(DEFAULT_ROOT) / controller for controller in CONTROLLERS] if runtime.cgroup_layout == "v1" else [Path(DEFAULT_ROOT)]
    for root in roots:
        try:
            (root / runtime.cgroup_parent).rmdir()
        except FileNotFoundError:
            pass


def _qemu_pids(instance_id: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if f"osvm-{instance_id}".encode() in cmdline and b"qemu-system" in cmdline:
            found.append(int(entry))
    return found


def _diagnostics(plan: LaunchPlan) -> str:
    parts = []
    for name in ("serial.log", "qemu.log", "output.log"):
        path = plan.instance_dir / name
        if path.exists():
            parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def test_kvm_abort_reason_names_fix(tmp_path: Path) -> None:
    (tmp_path / "qemu.log").write_text("qemu-system-x86_64: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n")
    status = _describe_exit(-signal.SIGABRT, None, False, "kvm", tmp_path)
    assert status.code == 128 + signal.SIGABRT
    assert "QEMU was killed by SIGABRT: qemu-system-x86_64: kvm_buf_set_msrs: Assertion" in status.reason
    assert "(microVM on KVM)" in status.reason
    assert 'set vm.accel = "auto" or "tcg"' in status.reason

    under_tcg = _describe_exit(-signal.SIGKILL, None, False, "tcg", tmp_path)
    assert under_tcg.reason == "QEMU was killed by SIGKILL (microVM on TCG)"
