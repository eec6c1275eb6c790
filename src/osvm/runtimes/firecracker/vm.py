"""One Firecracker microVM: its configuration, the boot sequence and a graceful stop."""

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from osvm.runtimes.firecracker.client import FirecrackerClient, FirecrackerError, FirecrackerUnavailable

logger = logging.getLogger("osvm.runtimes.firecracker")

# Firecracker's MAX_SUPPORTED_VCPUS.
MAX_VCPUS = 32
# How long stop() waits for the process to exit after SIGKILL before it gives up.
KILL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Drive:
    """A virtio-block drive backed by a host file."""

    drive_id: str
    path_on_host: Path
    is_root_device: bool = False
    is_read_only: bool = False


@dataclass(frozen=True)
class NetworkInterface:
    """A virtio-net interface backed by a host tap device."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None


@dataclass(frozen=True)
class VsockDevice:
    """The vsock device: the guest's CID and the host Unix socket of the hybrid vsock contract."""

    guest_cid: int
    uds_path: Path


@dataclass(frozen=True)
class VmConfig:
    """Everything that is set through the API before InstanceStart."""

    kernel_image_path: Path
    vcpu_count: int
    mem_size_mib: int
    boot_args: str | None = None
    initrd_path: Path | None = None
    drives: tuple[Drive, ...] = ()
    network_interfaces: tuple[NetworkInterface, ...] = ()
    vsock: VsockDevice | None = None
    smt: bool = False

    def problems(self) -> list[str]:
        """Return what Firecracker would reject in this configuration, checked before any call."""
        problems = []
        if not 1 <= self.vcpu_count <= MAX_VCPUS:
            problems.append(f"vcpu_count {self.vcpu_count} is out of range: Firecracker accepts 1 to {MAX_VCPUS}")
        elif self.smt and self.vcpu_count > 1 and self.vcpu_count % 2:
            problems.append(f"vcpu_count {self.vcpu_count} is odd: with SMT, Firecracker needs 1 or an even count")
        if self.mem_size_mib < 1:
            problems.append(f"mem_size_mib {self.mem_size_mib} is below 1 MiB")
        drive_ids = [drive.drive_id for drive in self.drives]
        duplicates = sorted({drive_id for drive_id in drive_ids if drive_ids.count(drive_id) > 1})
        if duplicates:
            problems.append(f"drive ids are not unique: {', '.join(duplicates)}")
        roots = [drive.drive_id for drive in self.drives if drive.is_root_device]
        if len(roots) > 1:
            problems.append(f"more than one root drive: {', '.join(roots)}; Firecracker accepts one")
        iface_ids = [iface.iface_id for iface in self.network_interfaces]
        if len(set(iface_ids)) != len(iface_ids):
            problems.append(f"network interface ids are not unique: {', '.join(iface_ids)}")
        if self.vsock is not None and self.vsock.guest_cid < 3:
            problems.append(f"guest CID {self.vsock.guest_cid} is reserved: use 3 or above")
        return problems


@dataclass
class FirecrackerVm:
    """Drive one Firecracker process: configure and boot its microVM, and stop it.

    `pid` and `exited` (a future that completes when the process exits) are needed only by
    stop(), which kills the process when the guest does not shut down in time.
    """

    client: FirecrackerClient
    pid: int | None = None
    exited: "asyncio.Future[None] | None" = None

    async def configure(self, config: VmConfig) -> None:
        """Send the pre-boot configuration: boot source, drives, machine config, network, vsock.

        Firecracker accepts the pre-boot calls in any order before InstanceStart. This order keeps
        the one of Firecracker's getting-started guide (boot source, drives, network) and puts the
        machine config after the drives and the vsock last. Raises ValueError, before any call, for
        a configuration that Firecracker would reject, and FirecrackerError naming the call that
        failed.
        """
        problems = config.problems()
        if problems:
            raise ValueError("invalid microVM configuration: " + "; ".join(problems))
        await self.client.put_boot_source(config.kernel_image_path, config.boot_args, config.initrd_path)
        for drive in config.drives:
            await self.client.put_drive(drive.drive_id, drive.path_on_host, drive.is_root_device, drive.is_read_only)
        await self.client.put_machine_config(config.vcpu_count, config.mem_size_mib, smt=config.smt)
        for iface in config.network_interfaces:
            await self.client.put_network_interface(iface.iface_id, iface.host_dev_name, iface.guest_mac)
        if config.vsock is not None:
            await self.client.put_vsock(config.vsock.guest_cid, config.vsock.uds_path)

    async def boot(self, config: VmConfig) -> None:
        """Configure the microVM and start it with InstanceStart."""
        await self.configure(config)
        await self.client.instance_start()

    async def stop(self, grace_period: float) -> bool:
        """Ask the guest to shut down with Ctrl+Alt+Del, then kill the process after `grace_period` seconds.

        A paused VM is resumed first, because a paused guest cannot act on the keystroke. Returns
        True when the process exited within the grace period, False when it had to be killed.
        """
        if self.exited is None or self.pid is None:
            raise RuntimeError("FirecrackerVm.stop needs the pid and exit future of the Firecracker process")
        if self.exited.done():
            return True
        if await self._request_shutdown():
            if await self._wait_exited(grace_period):
                logger.info("Firecracker pid %d exited after Ctrl+Alt+Del", self.pid)
                return True
            logger.warning(
                "Firecracker pid %d did not exit within %.1fs of Ctrl+Alt+Del: sending SIGKILL", self.pid, grace_period
            )
        self.kill()
        if not await self._wait_exited(KILL_TIMEOUT):
            logger.error("Firecracker pid %d is still running %.1fs after SIGKILL", self.pid, KILL_TIMEOUT)
        return False

    def kill(self) -> None:
        """Send SIGKILL to the Firecracker process."""
        assert self.pid is not None
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def _request_shutdown(self) -> bool:
        """Send Ctrl+Alt+Del, resuming a paused VM first. Returns False when an API call failed."""
        try:
            info = await self.client.describe_instance()
            if info.get("state") == "Paused":
                await self.client.resume()
            await self.client.send_ctrl_alt_del()
        except (FirecrackerError, FirecrackerUnavailable) as error:
            logger.warning("cannot ask the guest of Firecracker pid %s to shut down, killing it: %s", self.pid, error)
            return False
        return True

    async def _wait_exited(self, timeout: float) -> bool:
        assert self.exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            return False
        return True
