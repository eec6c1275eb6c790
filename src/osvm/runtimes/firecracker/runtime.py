"""The `microvm` runtime with vmm = "firecracker": each instance is a Firecracker microVM.

start() spawns `firecracker --api-sock <instance_dir>/firecracker.sock`, waits for the API socket,
configures the VM through the API and boots it. The firecracker process is the instance's main
process: its exit, seen through a pidfd, is the instance's exit. stop() sends Ctrl+Alt+Del and
kills the process after the stop grace period.

NOTE: this runtime has been tested only with a fake `firecracker` program that serves
tests/firecracker_simulator.py, never with a real Firecracker. Also missing so far: the guest
agent that runs the component's command in the VM (plan.argv and plan.env are not passed to the
guest yet), exec probes, network interfaces unless a network resolver supplies tap devices, and
Firecracker's jailer.
"""

import asyncio
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from osvm.config.models import Component, VmSettings
from osvm.runtimes import procinfo
from osvm.runtimes.base import ExitStatus, LaunchPlan, ProcessHandle
from osvm.runtimes.exitwatch import watch_exit
from osvm.runtimes.firecracker.client import FirecrackerClient, FirecrackerError, FirecrackerUnavailable
from osvm.runtimes.firecracker.vm import MAX_VCPUS, Drive, FirecrackerVm, NetworkInterface, VmConfig, VsockDevice
from osvm.store import Store
from osvm.vsock import FIRST_GUEST_CID, CidAllocator
from osvm.vsock.hybrid import remove_stale_socket

logger = logging.getLogger("osvm.runtimes.firecracker")

FIRECRACKER_BINARY = "firecracker"
API_SOCKET_NAME = "firecracker.sock"
VSOCK_SOCKET_NAME = "vsock.sock"
# sun_path has room for 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# Maximum length of the suffix that Firecracker appends to the vsock path for guest-initiated
# connections: "_4294967295".
MAX_VSOCK_PORT_SUFFIX = 11
# Maximum time in seconds for a new firecracker process to create its API socket and respond to GET /.
API_READY_TIMEOUT = 10.0
API_POLL_INTERVAL = 0.02
# Guest kernel arguments that every VM gets. Firecracker exits when the guest resets the CPU, and
# reboot=k makes a reboot (after Ctrl+Alt+Del, or after a panic with panic=1) reset through the
# keyboard controller. The i8042 options skip slow probing but keep the keyboard that receives
# Ctrl+Alt+Del. Firecracker's docs/api_requests/actions.md lists them for that purpose.
DEFAULT_BOOT_ARGS = ("console=ttyS0", "reboot=k", "panic=1", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd")
# Firecracker's --id accepts 1 to 64 alphanumeric characters and hyphens.
_INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9-]{1,64}$")
MIB = 1024 * 1024

# Exit statuses that Firecracker documents in FcExitCode, besides 0 and the signals.
_FIRECRACKER_EXIT_REASONS = {
    1: "Firecracker failed (generic error)",
    2: "Firecracker failed (unexpected error)",
    148: "Firecracker was shut down after a restricted system call (seccomp)",
    149: "Firecracker was shut down after SIGBUS",
    150: "Firecracker was shut down after SIGSEGV",
    151: "Firecracker was shut down after SIGXFSZ",
    152: "Firecracker rejected its configuration",
    153: "Firecracker rejected its command line arguments",
    154: "Firecracker was shut down after SIGXCPU",
    155: "Firecracker was shut down after SIGPIPE",
    156: "Firecracker was shut down after SIGHUP",
    157: "Firecracker was shut down after SIGILL",
}


class FirecrackerRuntimeError(Exception):
    """An instance could not be prepared or started; the message names the problem and the fix."""


@dataclass(frozen=True)
class GuestImages:
    """The files that boot an instance's VM, built by the image builder."""

    kernel_image_path: Path
    # An ext4 root filesystem, attached as the root drive.
    rootfs_path: Path | None = None
    # An initramfs. Without rootfs_path, the guest runs from it.
    initrd_path: Path | None = None
    rootfs_read_only: bool = False
    # Kernel arguments that the image needs, such as init=.
    boot_args: tuple[str, ...] = ()


ImageResolver = Callable[[LaunchPlan], Awaitable[GuestImages]]
NetworkResolver = Callable[[LaunchPlan], Awaitable[list[NetworkInterface]]]


def uses_firecracker(spec: Component) -> bool:
    """Return True when a component runs as a Firecracker microVM (runtime "microvm", vmm "firecracker")."""
    return spec.runtime == "microvm" and spec.vm is not None and spec.vm.vmm == "firecracker"


def find_firecracker(binary: str = FIRECRACKER_BINARY) -> str:
    """Return the path of the firecracker binary on PATH, or raise FirecrackerRuntimeError when it is missing."""
    path = shutil.which(binary)
    if path is None:
        raise FirecrackerRuntimeError(
            f"{binary} binary not found on PATH: install Firecracker or use vmm = \"qemu\""
        )
    return path


class FirecrackerRuntime:
    """Start, watch, stop and adopt Firecracker microVMs.

    `images` returns the kernel and root filesystem of an instance. With a `store`, each instance
    gets its own guest CID from the store. Without one, every VM gets CID 3, which is safe because
    Firecracker's hybrid vsock never registers the CID with the host kernel. `network` returns the
    tap devices of an instance; without it, VMs have no network interface.
    """

    name = "microvm"
    # The component runs in a guest kernel behind KVM.
    isolated = True

    def __init__(
        self,
        state_dir: Path,
        images: ImageResolver,
        store: Store | None = None,
        network: NetworkResolver | None = None,
        binary: str = FIRECRACKER_BINARY,
        api_ready_timeout: float = API_READY_TIMEOUT,
    ):
        self.state_dir = state_dir
        self.images = images
        self.network = network
        self.binary = binary
        self.api_ready_timeout = api_ready_timeout
        self.cids = CidAllocator(store) if store is not None else None
        self._vms: dict[str, FirecrackerVm] = {}

    # --- public interface --------------------------------------------------------------------

    async def prepare(self, plan: LaunchPlan) -> None:
        """Check the binary, the VM settings and the socket paths, create the directories and allocate a CID.

        Raises FirecrackerRuntimeError with the fix for each problem.
        """
        find_firecracker(self.binary)
        settings = plan.spec.vm or VmSettings()
        if settings.vcpus > MAX_VCPUS:
            raise FirecrackerRuntimeError(
                f"vm.vcpus = {settings.vcpus} is more than Firecracker supports: use at most {MAX_VCPUS}, "
                f"or vmm = \"qemu\""
            )
        vsock_path = str(self.vsock_path(plan))
        if len(vsock_path) + MAX_VSOCK_PORT_SUFFIX > MAX_UNIX_PATH:
            raise FirecrackerRuntimeError(
                f"the vsock socket path {vsock_path} is too long for a Unix socket with a port suffix "
                f"(at most {MAX_UNIX_PATH - MAX_VSOCK_PORT_SUFFIX} bytes): use a shorter --state-dir"
            )
        plan.instance_dir.mkdir(parents=True, exist_ok=True)
        plan.data_dir.mkdir(parents=True, exist_ok=True)
        if self.cids is not None:
            self.cids.allocate(plan.instance_id)

    async def start(self, plan: LaunchPlan) -> ProcessHandle:
        """Spawn firecracker, configure the VM through its API and boot it.

        Raises FirecrackerRuntimeError when the binary is missing, the process exits or does not
        open its API socket in time, or Firecracker rejects the configuration. The process is
        killed before the error is raised.
        """
        binary = find_firecracker(self.binary)
        config = await self._vm_config(plan)
        api_socket = plan.instance_dir / API_SOCKET_NAME
        # Firecracker fails when its API socket or vsock socket already exists, which they do
        # after a crash or SIGKILL.
        remove_stale_socket(str(api_socket))
        if config.vsock is not None:
            remove_stale_socket(str(config.vsock.uds_path))
        await self._close_vm(plan.instance_id)

        argv = [binary, "--api-sock", str(api_socket)]
        if _INSTANCE_ID_PATTERN.match(plan.instance_id):
            argv += ["--id", plan.instance_id]
        process = self._spawn(argv, plan)
        exited = watch_exit(process.pid)
        vm = FirecrackerVm(FirecrackerClient(api_socket), process.pid, exited)
        try:
            await self._wait_for_api(vm, process, plan)
            await vm.boot(config)
        except BaseException as error:
            vm.kill()
            await asyncio.shield(exited)
            process.wait()
            await vm.client.aclose()
            if isinstance(error, (FirecrackerError, FirecrackerUnavailable, ValueError)):
                raise FirecrackerRuntimeError(f"cannot boot the microVM of instance {plan.instance_id}: {error}") from None
            raise
        self._vms[plan.instance_id] = vm
        handle = ProcessHandle(pid=process.pid, start_time=procinfo.start_time(process.pid) or 0)
        handle.extra["popen"] = process
        handle.extra["exited"] = exited
        handle.extra["vm"] = vm
        logger.info(
            "started instance %s of %s: Firecracker pid %d, %d vCPU(s), %d MiB, API %s",
            plan.instance_id, plan.component, process.pid, config.vcpu_count, config.mem_size_mib, api_socket,
        )
        return handle

    async def wait(self, handle: ProcessHandle, plan: LaunchPlan) -> ExitStatus:
        """Wait until the Firecracker process exits, without polling, and return how it ended."""
        exited = handle.extra["exited"]
        assert isinstance(exited, asyncio.Future)
        await asyncio.shield(exited)
        popen = handle.extra.get("popen")
        code: int | None = None
        if isinstance(popen, subprocess.Popen):
            raw = popen.wait()
            code = raw if raw >= 0 else 128 - raw
        return ExitStatus(code=code, reason=_describe_exit(code))

    async def stop(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        """Send Ctrl+Alt+Del, wait the stop grace period, then SIGKILL the Firecracker process.

        Returns once the process has exited, or KILL_TIMEOUT after SIGKILL.
        """
        vm = handle.extra.get("vm")
        assert isinstance(vm, FirecrackerVm)
        logger.info(
            "stopping instance %s of %s: Ctrl+Alt+Del to Firecracker pid %d, grace %.1fs",
            plan.instance_id, plan.component, handle.pid, plan.spec.stop_grace_period,
        )
        await vm.stop(plan.spec.stop_grace_period)

    def adopt(self, plan: LaunchPlan, pid: int, start_time: int) -> ProcessHandle | None:
        """Take over a Firecracker process that a previous daemon started.

        Returns None when the pid is gone, was reused, or is not a firecracker process serving
        this instance's API socket.
        """
        if not procinfo.is_alive(pid, start_time):
            return None
        api_socket = str(plan.instance_dir / API_SOCKET_NAME)
        if api_socket not in _command_line(pid):
            logger.warning("pid %d does not serve %s: not adopting it as instance %s", pid, api_socket, plan.instance_id)
            return None
        exited = watch_exit(pid)
        if exited.done():
            return None
        vm = FirecrackerVm(FirecrackerClient(api_socket), pid, exited)
        self._vms[plan.instance_id] = vm
        handle = ProcessHandle(pid=pid, start_time=start_time, adopted=True)
        handle.extra["exited"] = exited
        handle.extra["vm"] = vm
        logger.info("adopted instance %s of %s: Firecracker pid %d", plan.instance_id, plan.component, pid)
        return handle

    def exec_prefix(self, handle: ProcessHandle, plan: LaunchPlan) -> tuple[str, ...]:
        """Return a prefix that makes exec probes fail with an explanation.

        An exec probe would have to run in the guest, through the guest agent, which does not
        exist yet. Running it on the host could report a healthy instance that is not.
        """
        message = (
            "exec probes cannot run in a Firecracker microVM yet: use an http, tcp or jsonrpc probe"
        )
        return (sys.executable, "-c", f"import sys; sys.exit({message!r})")

    async def cleanup(self, plan: LaunchPlan) -> None:
        """Close the API client, remove the instance's sockets and release its CID."""
        await self._close_vm(plan.instance_id)
        for name in (API_SOCKET_NAME, VSOCK_SOCKET_NAME):
            path = plan.instance_dir / name
            try:
                remove_stale_socket(str(path))
            except FileExistsError as error:
                logger.error("cannot remove %s of instance %s: %s", path, plan.instance_id, error)
        if self.cids is not None:
            self.cids.release(plan.instance_id)

    def vsock_path(self, plan: LaunchPlan) -> Path:
        """Return the host Unix socket of the instance's vsock device, for osvm.vsock.connect()."""
        return plan.instance_dir / VSOCK_SOCKET_NAME

    # --- private helpers ---------------------------------------------------------------------

    async def _vm_config(self, plan: LaunchPlan) -> VmConfig:
        settings = plan.spec.vm or VmSettings()
        images = await self.images(plan)
        drives: tuple[Drive, ...] = ()
        if images.rootfs_path is not None:
            drives = (Drive("rootfs", images.rootfs_path, is_root_device=True, is_read_only=images.rootfs_read_only),)
        networks = await self.network(plan) if self.network is not None else []
        cid = self.cids.allocate(plan.instance_id) if self.cids is not None else FIRST_GUEST_CID
        boot_args = " ".join((*DEFAULT_BOOT_ARGS, *images.boot_args, *settings.kernel_args))
        return VmConfig(
            kernel_image_path=images.kernel_image_path,
            initrd_path=images.initrd_path,
            boot_args=boot_args,
            drives=drives,
            vcpu_count=settings.vcpus,
            # Firecracker sizes memory in whole MiB, so a size that is not a multiple is rounded up.
            mem_size_mib=math.ceil(settings.memory / MIB),
            network_interfaces=tuple(networks),
            vsock=VsockDevice(cid, self.vsock_path(plan)),
        )

    def _spawn(self, argv: list[str], plan: LaunchPlan) -> "subprocess.Popen[bytes]":
        with open(plan.log_path, "ab", buffering=0) as log:
            try:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=str(plan.instance_dir),
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as error:
                raise FirecrackerRuntimeError(f"cannot start {argv[0]}: {error.strerror}: check its permissions") from None

    async def _wait_for_api(self, vm: FirecrackerVm, process: "subprocess.Popen[bytes]", plan: LaunchPlan) -> None:
        """Wait until the new process responds to GET / on its API socket.

        Raises FirecrackerRuntimeError when the process exits first or the timeout passes.
        """
        assert vm.exited is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.api_ready_timeout
        while True:
            if vm.exited.done():
                code = process.wait()
                raise FirecrackerRuntimeError(
                    f"firecracker exited with status {code} before its API socket was ready: "
                    f"{_last_log_line(plan.log_path) or 'no output'} (log: {plan.log_path})"
                )
            try:
                await vm.client.describe_instance()
                return
            except FirecrackerUnavailable:
                pass
            if loop.time() > deadline:
                raise FirecrackerRuntimeError(
                    f"firecracker did not respond on {vm.client.api_socket_path} within {self.api_ready_timeout:g}s "
                    f"(log: {plan.log_path})"
                )
            await asyncio.sleep(API_POLL_INTERVAL)

    async def _close_vm(self, instance_id: str) -> None:
        vm = self._vms.pop(instance_id, None)
        if vm is not None:
            await vm.client.aclose()


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _last_log_line(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(log_path) - 4096))
            lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: the process was adopted after a daemon restart)"
    if code == 0:
        return "exited with status 0 (the guest shut down)"
    if code in _FIRECRACKER_EXIT_REASONS:
        return f"exited with status {code}: {_FIRECRACKER_EXIT_REASONS[code]}"
    if code > 128 and code - 128 < signal.NSIG:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"killed by {name}"
    return f"exited with status {code}"
