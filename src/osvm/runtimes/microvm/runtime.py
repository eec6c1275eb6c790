"""The `microvm` runtime: each instance is a QEMU microvm guest whose PID 1 is the osvm agent.

prepare() builds or reuses the image, creates the instance directory, a qcow2 overlay for an
ext4 root and the cgroup. start() spawns QEMU and returns; a background session sends the agent
the component's argv and environment, and the agent reports READY once the component runs.
Exit is seen through a pidfd on QEMU. stop() presses the ACPI power button over QMP, then quits
QEMU over QMP, then sends SIGKILL. As root, QEMU runs as the unprivileged user osvm (-runas) in a
cgroup whose memory limit is the VM's memory plus QEMU's overhead. From start (or adoption) until
wait or cleanup, a VsockBridge serves Firecracker's hybrid vsock contract on
<instance_dir>/vsock.sock over the agent's "osvm.vsock" port. The instance's certificate files
(OSVM_TLS_*) are copied into the guest's GUEST_TLS_DIR before the component starts, and again by
update_certificate() after each renewal.
"""

import asyncio
import json
import logging
import os
import pwd
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from osvm.config.models import Component, VmSettings
from osvm.images import BuiltImage, build_image
from osvm.runtimes import procinfo
from osvm.runtimes.base import DeliveryError, ExitStatus, LaunchPlan, ProcessHandle
from osvm.runtimes.cgroups import Cgroup, CgroupError, CgroupLimits, detect_layout
from osvm.runtimes.microvm.agent import AgentSession
from osvm.runtimes.microvm.protocol import GUEST_TLS_DIR, GuestFile, encode_start
from osvm.runtimes.microvm.qemu import (
    GUEST_ADDRESS,
    QEMU_BINARY,
    QemuConfig,
    AcceleratorError,
    build_qemu_argv,
    detect_accelerator,
)
from osvm.runtimes.microvm.exec_mux import ExecMux
from osvm.runtimes.microvm.jail import JailError, jail_argv
from osvm.runtimes.microvm.tap import TapError, create_guest_tap
from osvm.runtimes.microvm.qmp import QmpFailure, qmp_execute, qmp_execute_blocking
from osvm.runtimes.microvm.vsock_bridge import VsockBridge, remove_vsock_sockets
from osvm.runtimes.network import NetworkSetupError, create_instance_network, remove_instance_network
from osvm.runtimes.exitwatch import watch_exit
from osvm.runtimes.process import cgroup_parent_for
from osvm.runtimes.sandbox import SandboxError, cgroup_join_prefix, find_user
from osvm.security.firewall import GUEST_INTERFACE

logger = logging.getLogger("osvm.runtimes.microvm")

DEFAULT_USER = "osvm"
STATE_FILE = "microvm.json"
OVERLAY = "root.qcow2"
QEMU_LOG = "qemu.log"
# Host memory that QEMU needs beyond the guest's RAM: its own code and heap, device buffers, the
# mapped vmlinux (about 57 MiB for Debian's 6.1 kernel) and, under TCG, the translation cache
# (capped at 64 MiB). bench/microvm_boot.py measured 261 MiB RSS under TCG for a 256 MiB guest, of
# which about 112 MiB was guest RAM. NOTE: an estimate from that one measurement, not a bound.
QEMU_MEMORY_OVERHEAD = 256 * 1024 * 1024
# QEMU's threads: vCPUs, the I/O thread, RCU and a pool of worker threads.
QEMU_PIDS_LIMIT = 256
# After the grace period the agent sends SIGKILL and powers off; this is how long that may take.
POWEROFF_MARGIN = 5.0
QUIT_TIMEOUT = 5.0
# How long wait() lets the agent session read the frames left in the socket after QEMU exited.
AGENT_DRAIN_TIMEOUT = 1.0
KILL_TIMEOUT = 10.0
# The guest's PATH, home and data directory; host values of these would mean nothing in the guest.
GUEST_PATH = "/app:/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_DATA_DIR = "/data"
# The certificate variables, each file's name in GUEST_TLS_DIR and its mode there. The agent
# replaces the files in this order, which is the order write_instance_files uses on the host.
TLS_FILES = (("OSVM_TLS_CA", "ca.pem", 0o644), ("OSVM_TLS_KEY", "key.pem", 0o600), ("OSVM_TLS_CERT", "cert.pem", 0o644))

_EXIT_LINE = re.compile(rb"osvm-agent: component exited with status (\d+)")
_PANIC_LINE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")


class MicroVmError(Exception):
    """A VM could not be prepared, started or stopped; the message gives the reason and the fix."""


@dataclass
class VmInstance:
    """The accelerator, image and size that prepare() chose for one instance, saved in microvm.json for adoption."""

    accelerator: str
    accelerator_reason: str
    image: str
    kernel: str
    initrd: str
    overlay: str | None
    vcpus: int
    memory: int
    # "tap": a tap device in the instance's network namespace; "user": QEMU's user network.
    network: str = "user"
    # The overlay's backing file, which QEMU opens read-only.
    rootfs: str | None = None

    def save(self, instance_dir: Path) -> None:
        (instance_dir / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, instance_dir: Path) -> "VmInstance | None":
        try:
            return cls(**json.loads((instance_dir / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


class MicroVmRuntime:
    """Start, watch, stop and adopt QEMU microVMs, one per instance."""

    name = "microvm"
    isolated = True
    # tls.reload_command runs in the guest through exec_prefix, with the component's guest
    # environment, because the component's programs are in the image and not on the host.
    commands_run_in_instance = True

    def __init__(self, state_dir: Path, image_cache: Path | None = None, qemu_binary: str | None = None):
        self.state_dir = Path(state_dir)
        self.image_cache = Path(image_cache) if image_cache else self.state_dir / "images"
        self.qemu_binary = qemu_binary or _which(QEMU_BINARY)
        self.privileged = os.geteuid() == 0
        self.cgroup_parent = cgroup_parent_for(self.state_dir)
        self.cgroup_layout = detect_layout() if self.privileged else None
        self._instances: dict[str, VmInstance] = {}
        # The vsock bridge of each instance started or adopted, by instance id, so cleanup() can close it.
        self._vsock_bridges: dict[str, VsockBridge] = {}
        # The exec multiplexer of each instance started or adopted, by instance id.
        self._exec_muxes: dict[str, ExecMux] = {}

    # --- public interface --------------------------------------------------------------------

    async def prepare(self, plan: LaunchPlan) -> None:
        """Build or reuse the image, and create the instance directory, overlay, cgroup and network.

        Raises MicroVmError when QEMU, the image, the user osvm or the cgroup is missing or fails.
        """
        if self.qemu_binary is None:
            raise MicroVmError(f"{QEMU_BINARY} is not on PATH: install the Debian packages qemu-system-x86 and qemu-utils")
        vm = _vm_settings(plan.spec)
        if vm.vmm != "qemu":
            raise MicroVmError(f"vm.vmm {vm.vmm!r} is not run by the microvm runtime, which runs QEMU: set vm.vmm = \"qemu\"")
        if plan.spec.image is None:
            raise MicroVmError("runtime \"microvm\" needs an [image] table")
        if plan.spec.image.path is not None and not Path(plan.spec.image.path).is_absolute():
            raise MicroVmError(
                f"image.path {plan.spec.image.path!r} is relative: the daemon needs it absolute, "
                f"resolved against the deployment file's directory"
            )
        if self.privileged:
            self._check_user()
        try:
            accelerator, reason = detect_accelerator(vm.accel)
        except AcceleratorError as error:
            raise MicroVmError(str(error)) from None
        plan.instance_dir.mkdir(parents=True, exist_ok=True)
        plan.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            image = await asyncio.to_thread(build_image, plan.spec.image, Path("/"), self.image_cache)
        except Exception as error:  # noqa: BLE001 - every build failure becomes this instance's reason.
            raise MicroVmError(f"cannot build the image: {error}") from None
        overlay = await asyncio.to_thread(self._create_overlay, plan, image)
        use_tap = self.privileged and plan.netns_name is not None and plan.addressing is not None
        instance = VmInstance(
            accelerator=accelerator,
            accelerator_reason=reason,
            image=image.digest,
            kernel=str(image.kernel),
            initrd=str(image.initrd),
            overlay=str(overlay) if overlay else None,
            vcpus=vm.vcpus,
            memory=vm.memory,
            network="tap" if use_tap else "user",
            rootfs=str(image.rootfs) if image.rootfs else None,
        )
        instance.save(plan.instance_dir)
        self._instances[plan.instance_id] = instance
        logger.info(
            "prepared instance %s of %s: image %s, %d vCPU, %d MiB, %s network, accelerator %s (%s)",
            plan.instance_id, plan.component, image.short_digest, vm.vcpus, vm.memory >> 20, instance.network,
            accelerator, reason,
        )
        if self.privileged:
            if use_tap:
                await asyncio.to_thread(self._create_network, plan)
            if self.cgroup_layout is not None:
                await asyncio.to_thread(self._create_cgroup, plan, vm)

    async def start(self, plan: LaunchPlan) -> ProcessHandle:
        """Spawn QEMU and return its handle; the component starts when the guest agent is up.

        Raises MicroVmError when the instance was not prepared or QEMU cannot be executed.
        """
        instance = self._instance(plan)
        config = self._qemu_config(plan, instance)
        try:
            tls_files = await asyncio.to_thread(read_tls_files, plan.env)
        except OSError as error:
            raise MicroVmError(_certificate_read_error(plan, error)) from None
        await self._close_exec_mux(plan.instance_id)
        for path in (config.agent_socket, config.exec_socket, config.exec_port_socket, config.qmp_socket, config.pid_file):
            path.unlink(missing_ok=True)
        await self._close_vsock_bridge(plan.instance_id)
        remove_vsock_sockets(plan.instance_dir, listeners=False)
        try:
            argv = self._full_argv(plan, instance, build_qemu_argv(config, self.qemu_binary))
        except JailError as error:
            raise MicroVmError(str(error)) from None
        qemu_log = open(plan.instance_dir / QEMU_LOG, "wb", buffering=0)
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=qemu_log,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as error:
            raise MicroVmError(f"cannot start {argv[0]}: {error.strerror or error}") from None
        finally:
            qemu_log.close()
        handle = ProcessHandle(pid=process.pid, start_time=procinfo.start_time(process.pid) or 0)
        handle.extra["popen"] = process
        handle.extra["accelerator"] = instance.accelerator
        handle.extra["jailed"] = self.privileged
        self._attach(handle, plan, config, tls_files)
        logger.info(
            "started instance %s of %s: %s pid %d, accelerator %s (%s)",
            plan.instance_id, plan.component, "bwrap for QEMU" if self.privileged else "QEMU", process.pid,
            instance.accelerator, instance.accelerator_reason,
        )
        return handle

    async def wait(self, handle: ProcessHandle, plan: LaunchPlan) -> ExitStatus:
        """Wait until QEMU exits, without polling, and return how the VM and its component ended."""
        exited = handle.extra["exited"]
        assert isinstance(exited, asyncio.Future)
        await asyncio.shield(exited)

        raw: int | None = None
        popen = handle.extra.get("popen")
        if isinstance(popen, subprocess.Popen):
            raw = popen.wait()
        wrapper_killed = None
        if handle.extra.get("jailed"):
            # bwrap exits when QEMU does, unless bwrap itself was killed: then QEMU goes too, so a
            # restart never meets a VM still running.
            await self._end_orphaned_qemu(plan)
            if raw is not None and raw < 0:
                wrapper_killed = _signal_name(-raw)
        session = handle.extra.get("agent")
        reported = None
        if isinstance(session, AgentSession):
            # The agent's last frames may still be in the socket buffer after QEMU exited.
            await session.wait_closed(AGENT_DRAIN_TIMEOUT)
            reported = session.exit_code
        if reported is None:
            reported = _exit_code_from_serial(plan.instance_dir / "serial.log")
        oom_killed = self._oom_kills(plan.instance_id) > int(handle.extra.get("oom_kills_at_start", 0))
        if raw is not None and raw > 128 and handle.extra.get("jailed"):
            # bwrap exits with 128 + the signal that killed QEMU; as a wait status that is -signal.
            raw = 128 - raw
        status = _describe_exit(
            raw, reported, oom_killed, str(handle.extra.get("accelerator", "unknown")), plan.instance_dir,
            quit_sent=bool(handle.extra.get("quit_sent")),
        )
        if wrapper_killed is not None and not oom_killed:
            accelerator = str(handle.extra.get("accelerator", "unknown")).upper()
            status = ExitStatus(
                status.code, f"bwrap, the parent of QEMU, was killed by {wrapper_killed}, and QEMU with it (microVM on {accelerator})"
            )
        if isinstance(session, AgentSession):
            await session.close()
        await self._close_exec_mux(plan.instance_id)
        await self._close_vsock_bridge(plan.instance_id)
        return status

    async def stop(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        """Press the ACPI power button, wait the grace period, quit QEMU, then SIGKILL it.

        The agent itself sends the stop signal, waits stop_grace_period and sends SIGKILL in the
        guest, so this waits that period plus POWEROFF_MARGIN before it quits QEMU.
        Returns once QEMU has exited.
        """
        qmp_socket = plan.instance_dir / "qmp.sock"
        grace = plan.spec.stop_grace_period
        if await self._wait_gone(handle, 0):
            return
        logger.info(
            "stopping instance %s of %s: ACPI power button through QMP, grace %.1fs",
            plan.instance_id, plan.component, grace,
        )
        try:
            await qmp_execute(qmp_socket, "system_powerdown")
        except QmpFailure as error:
            logger.warning("instance %s: %s; asking the guest agent to shut down instead", plan.instance_id, error)
            session = handle.extra.get("agent")
            if not (isinstance(session, AgentSession) and await session.send_shutdown()):
                logger.warning("instance %s: the guest agent is not connected either", plan.instance_id)
        if await self._wait_gone(handle, grace + POWEROFF_MARGIN):
            return

        logger.warning(
            "instance %s of %s did not power off within %.1fs: sending QMP quit",
            plan.instance_id, plan.component, grace + POWEROFF_MARGIN,
        )
        handle.extra["quit_sent"] = True
        try:
            await qmp_execute(qmp_socket, "quit")
        except QmpFailure as error:
            logger.warning("instance %s: %s", plan.instance_id, error)
        if await self._wait_gone(handle, QUIT_TIMEOUT):
            return

        logger.warning("instance %s: QEMU pid %d did not quit: sending SIGKILL", plan.instance_id, handle.pid)
        self._kill(handle, plan)
        await self._wait_gone(handle, KILL_TIMEOUT)

    def adopt(self, plan: LaunchPlan, pid: int, start_time: int) -> ProcessHandle | None:
        """Take over a VM that a previous daemon started.

        Returns None unless the pid is alive with the recorded start time, is QEMU for this
        instance, is in the instance's cgroup (when cgroups are used), and its QMP socket returns
        a result for query-status.
        """
        if not procinfo.is_alive(pid, start_time):
            return None
        if f"osvm-{plan.instance_id}" not in _cmdline(pid):
            logger.warning("pid %d is not the QEMU of instance %s: not adopting it", pid, plan.instance_id)
            return None
        if self.cgroup_layout is not None:
            cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent)
            if cgroup is None or not cgroup.contains(pid):
                logger.warning("pid %d is not in the cgroup of instance %s: not adopting it", pid, plan.instance_id)
                return None
        instance = VmInstance.load(plan.instance_dir)
        if instance is None:
            logger.warning("instance %s has no readable %s: not adopting pid %d", plan.instance_id, STATE_FILE, pid)
            return None
        try:
            status = qmp_execute_blocking(plan.instance_dir / "qmp.sock", "query-status")
        except QmpFailure as error:
            logger.warning("not adopting pid %d of instance %s: %s", pid, plan.instance_id, error)
            return None
        try:
            tls_files = read_tls_files(plan.env)
        except OSError as error:
            logger.warning("%s, so the guest keeps the files it has", _certificate_read_error(plan, error))
            tls_files = None
        self._instances[plan.instance_id] = instance
        handle = ProcessHandle(pid=pid, start_time=start_time, adopted=True)
        handle.extra["accelerator"] = instance.accelerator
        handle.extra["jailed"] = os.path.basename(_cmdline(pid).split(" ", 1)[0]) == "bwrap"
        handle.extra["oom_kills_at_start"] = self._oom_kills(plan.instance_id)
        self._attach(handle, plan, self._qemu_config(plan, instance), tls_files)
        if handle.extra["exited"].done():
            return None
        logger.info(
            "adopted instance %s of %s: QEMU pid %d, VM %s, accelerator %s",
            plan.instance_id, plan.component, pid, status.get("status", "unknown"), instance.accelerator,
        )
        return handle

    def exec_prefix(self, handle: ProcessHandle, plan: LaunchPlan) -> tuple[str, ...]:
        """Return the command prefix that runs a program inside the VM through the agent's exec port."""
        return (
            sys.executable, "-m", "osvm.runtimes.microvm.guest_exec",
            "--socket", str(plan.instance_dir / "exec.sock"), "--",
        )

    async def update_certificate(self, handle: ProcessHandle, plan: LaunchPlan) -> str:
        """Copy the instance's renewed certificate files into the guest and return what was done.

        The agent replaces the files in GUEST_TLS_DIR. When it has not connected yet, the session
        sends the new files before START instead. Raises DeliveryError when a host file cannot be
        read or the agent does not write the files.
        """
        session = self._session(handle, plan)
        try:
            files = await asyncio.to_thread(read_tls_files, plan.env)
        except OSError as error:
            raise DeliveryError(_certificate_read_error(plan, error)) from None
        if files is None:
            return "no certificate files to copy into the VM"
        session.tls_files = files
        if session.agent_version is None:
            return f"the VM gets the files in {GUEST_TLS_DIR} when its agent connects"
        await session.write_files(files)
        return f"copied the files to {GUEST_TLS_DIR} in the VM"

    async def send_signal(self, handle: ProcessHandle, plan: LaunchPlan, name: str) -> None:
        """Send a signal by name to the component in the guest, such as SIGHUP after a certificate renewal.

        The agent sends it to the component's process, not to its process group. Raises
        DeliveryError when the agent is not connected or no component runs.
        """
        await self._session(handle, plan).send_signal(int(signal.Signals[name]))

    async def cleanup(self, plan: LaunchPlan) -> None:
        """Kill a QEMU left running, close the vsock bridge, then remove the overlay, sockets, cgroup and network namespace."""
        await asyncio.to_thread(self._kill_leftover_qemu, plan)
        if self.cgroup_layout is not None:
            cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent)
            if cgroup is not None:
                try:
                    await asyncio.to_thread(cgroup.remove)
                except CgroupError as error:
                    logger.error("cannot remove the cgroup of instance %s: %s", plan.instance_id, error)
        if self.privileged and plan.netns_name is not None:
            await asyncio.to_thread(remove_instance_network, plan.instance_id)
        await self._close_vsock_bridge(plan.instance_id)
        await self._close_exec_mux(plan.instance_id)
        for name in (OVERLAY, "agent.sock", "exec.sock", "exec-port.sock", "qmp.sock", "qemu.pid", STATE_FILE):
            (plan.instance_dir / name).unlink(missing_ok=True)
        remove_vsock_sockets(plan.instance_dir)
        self._instances.pop(plan.instance_id, None)

    # --- readiness and description -----------------------------------------------------------

    def is_ready(self, handle: ProcessHandle) -> bool:
        """Return whether the guest agent has reported that the component is running."""
        session = handle.extra.get("agent")
        return isinstance(session, AgentSession) and session.ready.is_set()

    async def wait_ready(self, handle: ProcessHandle, timeout: float) -> bool:
        """Wait until the component runs in the guest, QEMU exits, or timeout seconds pass."""
        session = handle.extra.get("agent")
        exited = handle.extra.get("exited")
        if not isinstance(session, AgentSession) or not isinstance(exited, asyncio.Future):
            return False
        ready = asyncio.ensure_future(session.ready.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        return session.ready.is_set()

    def describe_isolation(self, plan: LaunchPlan) -> str:
        """Return a one-line summary such as "microVM, 1 vCPU, 256 MiB, TCG (reason)" for events."""
        instance = self._instances.get(plan.instance_id) or VmInstance.load(plan.instance_dir)
        if instance is None:
            return "microVM (not prepared)"
        return (
            f"microVM, {instance.vcpus} vCPU, {instance.memory >> 20} MiB, {instance.network} network, "
            f"{instance.accelerator.upper()} ({instance.accelerator_reason})"
        )

    def vm_status(self, plan: LaunchPlan) -> dict[str, object] | None:
        """Return the accelerator, network mode, vCPUs and memory of a prepared instance, for `osvm status`."""
        instance = self._instances.get(plan.instance_id) or VmInstance.load(plan.instance_dir)
        if instance is None:
            return None
        return {
            "accelerator": instance.accelerator,
            "accelerator_reason": instance.accelerator_reason,
            "network": instance.network,
            "vcpus": instance.vcpus,
            "memory_mib": instance.memory >> 20,
        }

    def record_start(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        handle.extra["oom_kills_at_start"] = self._oom_kills(plan.instance_id)

    # --- private helpers ---------------------------------------------------------------------

    def _instance(self, plan: LaunchPlan) -> VmInstance:
        instance = self._instances.get(plan.instance_id) or VmInstance.load(plan.instance_dir)
        if instance is None:
            raise MicroVmError(f"instance {plan.instance_id} was not prepared: call prepare() before start()")
        self._instances[plan.instance_id] = instance
        return instance

    def _qemu_config(self, plan: LaunchPlan, instance: VmInstance) -> QemuConfig:
        vm = _vm_settings(plan.spec)
        return QemuConfig(
            name=plan.instance_id,
            accelerator=instance.accelerator,
            vcpus=instance.vcpus,
            memory_mib=instance.memory >> 20,
            kernel=Path(instance.kernel),
            initrd=Path(instance.initrd),
            kernel_args=list(vm.kernel_args),
            instance_dir=plan.instance_dir,
            log_path=plan.log_path,
            ports=_forwarded_ports(plan.env),
            # The guest gets QEMU's NAT like a host process gets the host's network. In a network
            # namespace, the namespace's firewall limits what that NAT can reach.
            restrict_network=False,
            listen_address=plan.addressing.instance_address if plan.addressing and plan.netns_name else "127.0.0.1",
            overlay=Path(instance.overlay) if instance.overlay else None,
            run_as=DEFAULT_USER if self.privileged else None,
            tap=GUEST_INTERFACE if instance.network == "tap" else None,
            host_ports=list(vm.host_ports),
        )

    def _attach(self, handle: ProcessHandle, plan: LaunchPlan, config: QemuConfig, tls_files: list[GuestFile] | None) -> None:
        exited = watch_exit(handle.pid)
        handle.extra["exited"] = exited
        session = AgentSession(config.agent_socket, _start_frame(plan), plan.instance_id, tls_files)
        session.start(exited)
        handle.extra["agent"] = session
        exec_mux = ExecMux(config.exec_port_socket, config.exec_socket, plan.instance_id)
        exec_mux.start(exited)
        handle.extra["exec_mux"] = exec_mux
        self._exec_muxes[plan.instance_id] = exec_mux
        bridge = VsockBridge(config.vsock_port_socket, config.vsock_socket, plan.instance_id, config.host_ports)
        bridge.start(exited)
        handle.extra["vsock"] = bridge
        self._vsock_bridges[plan.instance_id] = bridge

    @staticmethod
    def _session(handle: ProcessHandle, plan: LaunchPlan) -> AgentSession:
        session = handle.extra.get("agent")
        if not isinstance(session, AgentSession):
            raise DeliveryError(f"instance {plan.instance_id} has no agent session: it was not started or adopted")
        return session

    async def _close_exec_mux(self, instance_id: str) -> None:
        exec_mux = self._exec_muxes.pop(instance_id, None)
        if exec_mux is not None:
            await exec_mux.close()

    async def _close_vsock_bridge(self, instance_id: str) -> None:
        bridge = self._vsock_bridges.pop(instance_id, None)
        if bridge is not None:
            await bridge.close()

    def _full_argv(self, plan: LaunchPlan, instance: VmInstance, qemu_argv: list[str]) -> list[str]:
        """Return QEMU's argv inside its jail (as root), its network namespace and its cgroup.

        Raises JailError when bwrap is missing.
        """
        argv = list(qemu_argv)
        if self.privileged:
            read_only = [Path(instance.kernel), Path(instance.initrd)]
            if instance.rootfs is not None:
                read_only.append(Path(instance.rootfs))
            jail = jail_argv(
                plan.instance_dir, read_only, kvm=instance.accelerator == "kvm", tap=instance.network == "tap",
                hostname=plan.component,
            )
            argv = [*jail, *argv]
        if self.privileged and plan.netns_name is not None:
            argv = ["nsenter", f"--net=/run/netns/{plan.netns_name}", "--", *argv]
        cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent) if self.cgroup_layout is not None else None
        if cgroup is not None:
            argv = [*cgroup_join_prefix(cgroup.procs_files()), *argv]
        return argv

    def _create_overlay(self, plan: LaunchPlan, image: BuiltImage) -> Path | None:
        if image.rootfs is None:
            return None
        overlay = plan.instance_dir / OVERLAY
        # The overlay keeps the guest's writes across restarts of the instance; cleanup() removes it.
        if overlay.exists():
            return overlay
        result = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs), str(overlay)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise MicroVmError(
                f"qemu-img create failed for the overlay of instance {plan.instance_id}: {result.stderr.strip()}. "
                f"Install the Debian package qemu-utils if qemu-img is missing"
            )
        return overlay

    def _check_user(self) -> None:
        try:
            find_user(DEFAULT_USER)
        except SandboxError as error:
            raise MicroVmError(f"QEMU runs as the user {DEFAULT_USER} when the daemon is root: {error}") from None

    def _create_network(self, plan: LaunchPlan) -> None:
        # The guest's tap device is in the instance's namespace, so its connections and the ports
        # forwarded to it pass the namespace's firewall, as a process instance's connections do.
        assert plan.addressing is not None and plan.netns_name is not None
        try:
            create_instance_network(plan)
        except NetworkSetupError as error:
            raise MicroVmError(str(error)) from None
        user = pwd.getpwnam(DEFAULT_USER)
        try:
            create_guest_tap(
                plan.netns_name, plan.addressing.instance_address, GUEST_ADDRESS, _forwarded_ports(plan.env),
                user.pw_uid, user.pw_gid,
            )
        except TapError as error:
            remove_instance_network(plan.instance_id)
            raise MicroVmError(f"failed to set up the guest network of instance {plan.instance_id}: {error}") from None

    def _create_cgroup(self, plan: LaunchPlan, vm: VmSettings) -> None:
        memory = vm.memory + QEMU_MEMORY_OVERHEAD
        requested = plan.spec.resources.memory
        if requested is not None and requested < memory:
            logger.warning(
                "instance %s: resources.memory %d MiB is below the VM's %d MiB plus QEMU's overhead: using %d MiB",
                plan.instance_id, requested >> 20, vm.memory >> 20, memory >> 20,
            )
        limits = CgroupLimits(memory=max(memory, requested or 0), cpus=plan.spec.resources.cpus, pids=QEMU_PIDS_LIMIT)
        existing = Cgroup.open(plan.instance_id, parent=self.cgroup_parent)
        if existing is not None:
            existing.remove()
        try:
            Cgroup.create(plan.instance_id, limits, parent=self.cgroup_parent)
        except CgroupError as error:
            raise MicroVmError(f"cannot create the cgroup of instance {plan.instance_id}: {error}") from None

    def _kill(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent) if self.cgroup_layout is not None else None
        if cgroup is not None:
            try:
                cgroup.kill_all(KILL_TIMEOUT)
                return
            except CgroupError as error:
                logger.error("cannot empty the cgroup of instance %s: %s", plan.instance_id, error)
        # QEMU first: when bwrap wraps it, killing bwrap alone would leave QEMU running.
        self._kill_leftover_qemu(plan)
        if procinfo.is_alive(handle.pid, handle.start_time):
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftover_qemu(self, plan: LaunchPlan) -> int | None:
        """Return the pid in qemu.pid if that process still runs and is this instance's QEMU."""
        try:
            pid = int((plan.instance_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        if not procinfo.is_alive(pid) or f"osvm-{plan.instance_id}" not in _cmdline(pid):
            return None
        return pid

    async def _end_orphaned_qemu(self, plan: LaunchPlan) -> None:
        """SIGKILL a QEMU that outlived its bwrap parent, and wait until it has exited."""
        pid = self._leftover_qemu(plan)
        if pid is None:
            return
        logger.error("instance %s: bwrap exited but its QEMU pid %d still runs: sending SIGKILL", plan.instance_id, pid)
        exited = watch_exit(pid)
        self._kill_leftover_qemu(plan)
        try:
            await asyncio.wait_for(exited, KILL_TIMEOUT)
        except TimeoutError:
            logger.error("instance %s: QEMU pid %d did not exit within %.0fs of SIGKILL", plan.instance_id, pid, KILL_TIMEOUT)

    def _kill_leftover_qemu(self, plan: LaunchPlan) -> None:
        """SIGKILL the QEMU named in qemu.pid if it still runs and is this instance's."""
        pid = self._leftover_qemu(plan)
        if pid is None:
            return
        logger.warning("instance %s: QEMU pid %d is still running: sending SIGKILL", plan.instance_id, pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    async def _wait_gone(self, handle: ProcessHandle, timeout: float) -> bool:
        exited = handle.extra.get("exited")
        if not isinstance(exited, asyncio.Future):
            return not procinfo.is_alive(handle.pid, handle.start_time)
        if exited.done():
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout)
        except TimeoutError:
            return False
        return True

    def _oom_kills(self, instance_id: str) -> int:
        if self.cgroup_layout is None:
            return 0
        cgroup = Cgroup.open(instance_id, parent=self.cgroup_parent)
        return cgroup.oom_kills() if cgroup else 0


def guest_argv(spec: Component, argv: list[str]) -> list[str]:
    """Return argv with a host path of the image's binary or directory replaced by its path under /app.

    A deployment file may name the program by its host path, which the CLI makes absolute; in the
    guest the binary is /app/<name> and a directory is /app.
    """
    if not argv or spec.image is None or spec.image.path is None:
        return list(argv)
    source = os.path.realpath(spec.image.path)
    program = os.path.realpath(argv[0]) if argv[0].startswith("/") else argv[0]
    if spec.image.kind == "binary" and program == source:
        return ["/app/" + os.path.basename(source), *argv[1:]]
    if spec.image.kind == "directory" and program.startswith(source.rstrip("/") + "/"):
        return ["/app/" + os.path.relpath(program, source), *argv[1:]]
    return list(argv)


def guest_env(env: dict[str, str]) -> dict[str, str]:
    """Return the component's environment for the guest: host paths and the host address replaced."""
    result = dict(env)
    result["PATH"] = GUEST_PATH
    result["HOME"] = GUEST_DATA_DIR
    result["OSVM_DATA_DIR"] = GUEST_DATA_DIR
    result["OSVM_ADDRESS"] = GUEST_ADDRESS
    for variable, name, _mode in TLS_FILES:
        if variable in result:
            result[variable] = f"{GUEST_TLS_DIR}/{name}"
    return result


def read_tls_files(env: dict[str, str]) -> list[GuestFile] | None:
    """Read the host files that the OSVM_TLS_* variables of env name, as files for GUEST_TLS_DIR.

    Returns None when env has none of the variables, as when the daemon has no certificate manager.
    Raises OSError when a file cannot be read.
    """
    if not any(variable in env for variable, _name, _mode in TLS_FILES):
        return None
    return [
        GuestFile(f"{GUEST_TLS_DIR}/{name}", mode, Path(env[variable]).read_bytes())
        for variable, name, mode in TLS_FILES
        if variable in env
    ]


def _certificate_read_error(plan: LaunchPlan, error: OSError) -> str:
    return f"cannot read the certificate file {error.filename} of instance {plan.instance_id}: {error.strerror or error}"


def _start_frame(plan: LaunchPlan) -> bytes:
    stop_signal = signal.Signals[plan.spec.stop_signal]
    return encode_start(
        hostname=plan.component,
        argv=guest_argv(plan.spec, plan.argv),
        env=guest_env(plan.env),
        workdir=plan.spec.workdir or "",
        stop_signal=int(stop_signal),
        grace_ms=int(plan.spec.stop_grace_period * 1000),
    )


def _vm_settings(spec: Component) -> VmSettings:
    return spec.vm if spec.vm is not None else VmSettings()


def _forwarded_ports(env: dict[str, str]) -> list[int]:
    ports = []
    for name, value in env.items():
        if name.startswith("OSVM_PORT_") and value.isdigit():
            ports.append(int(value))
    return sorted(set(ports))


def _which(program: str) -> str | None:
    from shutil import which

    return which(program)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _exit_code_from_serial(serial_log: Path) -> int | None:
    """Return the component's exit status from the agent's last line on the serial console, if any."""
    tail = _read_tail(serial_log, 16384)
    matches = _EXIT_LINE.findall(tail)
    return int(matches[-1]) if matches else None


def _read_tail(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read()
    except OSError:
        return b""


def _describe_exit(
    raw: int | None, reported: int | None, oom_killed: bool, accelerator: str, instance_dir: Path, quit_sent: bool = False
) -> ExitStatus:
    """Turn QEMU's wait status and the agent's report into an ExitStatus whose reason names the accelerator."""
    where = f"microVM on {accelerator.upper()}"
    if oom_killed:
        return ExitStatus(137, f"QEMU was killed by the kernel OOM killer at the cgroup memory limit ({where})", True)
    if raw is not None and raw < 0:
        name = _signal_name(-raw)
        detail = _last_line(_read_tail(instance_dir / QEMU_LOG, 4096)) if raw == -signal.SIGABRT else ""
        hint = ""
        if accelerator == "kvm" and raw == -signal.SIGABRT:
            # A KVM that cannot run the guest, such as a paravirtual one, makes QEMU abort on a failed assertion.
            hint = "; this host's KVM may not run a stock guest: set vm.accel = \"auto\" or \"tcg\""
        return ExitStatus(128 - raw, f"QEMU was killed by {name}{': ' + detail if detail else ''} ({where}){hint}")
    if raw is not None and raw > 0:
        detail = _last_line(_read_tail(instance_dir / QEMU_LOG, 4096))
        return ExitStatus(raw, f"QEMU exited with status {raw}{': ' + detail if detail else ''} ({where})")
    if reported is not None:
        if reported > 128 and reported - 128 < signal.NSIG:
            what = f"the component was killed by {_signal_name(reported - 128)}"
        else:
            what = f"the component exited with status {reported}"
        return ExitStatus(reported, f"{what}, and the VM powered off ({where})")
    panic = _PANIC_LINE.findall(_read_tail(instance_dir / "serial.log", 16384))
    if panic:
        return ExitStatus(None, f"the guest kernel panicked: {panic[-1].decode(errors='replace')} ({where})")
    if quit_sent:
        return ExitStatus(None, f"QEMU quit through QMP because the VM did not power off after the grace period ({where})")
    if raw is None:
        return ExitStatus(None, f"QEMU exited (status unknown: the VM was adopted after a daemon restart) ({where})")
    return ExitStatus(0, f"VM powered off ({where})")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
