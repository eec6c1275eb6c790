"""QEMU's command line for one microVM, and the choice between KVM and TCG.

The machine is QEMU's `microvm`: no PCI and no firmware tables beyond ACPI, virtio devices on
virtio-mmio, and a direct PVH boot of the ELF vmlinux. The devices are:

- virtio-net, the guest at 10.0.2.15 in both modes: on a tap device in the instance's network
  namespace (see tap.py) when the daemon is root and isolates instances, else on QEMU's user
  network, where each allocated port P is forwarded from 127.0.0.1:P on the host to port P in the
  guest;
- virtio-serial with four ports: "osvm.agent" and "osvm.exec" on host Unix sockets for the
  agent's control and exec channels, "osvm.log" appended to the instance's output.log, and
  "osvm.vsock" on a host Unix socket for the vsock multiplexer that serves vsock.sock;
- virtio-blk for an ext4 root filesystem, through a per-instance qcow2 overlay;
- virtio-rng fed from the host's /dev/urandom.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
# Bounds TCG's translated-code cache, which otherwise may grow to 1 GiB of host memory per VM.
TCG_CACHE_MIB = 64
# The guest's address and gateway on QEMU's user network (QEMU's defaults).
GUEST_ADDRESS = "10.0.2.15"
# Used when the host's TSC frequency cannot be read; only the boot-time calibration depends on it.
FALLBACK_TSC_KHZ = 2_000_000


class AcceleratorError(Exception):
    """The requested accelerator is not usable on this host."""


@dataclass(frozen=True)
class QemuConfig:
    """Everything build_qemu_argv needs for one VM."""

    name: str
    accelerator: str
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    kernel_args: list[str]
    instance_dir: Path
    log_path: Path
    ports: list[int]
    restrict_network: bool
    # The host address that forwarded ports listen on: loopback, or the instance's address in its network namespace.
    listen_address: str = "127.0.0.1"
    overlay: Path | None = None
    run_as: str | None = None
    # The tap device to attach to, in the network namespace QEMU runs in; None for the user network.
    tap: str | None = None
    sandbox: bool = True
    extra_args: list[str] = field(default_factory=list)
    # vsock ports on the host that the guest agent offers to guest programs on 127.0.0.1:P (vm.host_ports).
    host_ports: list[int] = field(default_factory=list)

    @property
    def serial_log(self) -> Path:
        return self.instance_dir / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        return self.instance_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.instance_dir / "agent.sock"

    @property
    def exec_socket(self) -> Path:
        """The socket exec clients use, served by ExecMux in the daemon."""
        return self.instance_dir / "exec.sock"

    @property
    def exec_port_socket(self) -> Path:
        """QEMU's socket for the "osvm.exec" port, read only by ExecMux."""
        return self.instance_dir / "exec-port.sock"

    @property
    def vsock_port_socket(self) -> Path:
        """QEMU's socket for the "osvm.vsock" port, read only by HybridVsockMux. Host clients use vsock_socket."""
        return self.instance_dir / "vsock-port.sock"

    @property
    def vsock_socket(self) -> Path:
        return self.instance_dir / "vsock.sock"

    @property
    def pid_file(self) -> Path:
        return self.instance_dir / "qemu.pid"


def detect_accelerator(requested: str = "auto") -> tuple[str, str]:
    """Return (accelerator, reason): "kvm" or "tcg", and why it was chosen.

    "auto" picks KVM only when /proc/cpuinfo shows vmx or svm, kvm_intel or kvm_amd is loaded and
    /dev/kvm can be opened for reading and writing. Other KVM modules, such as the paravirtual
    kvm_pvm, do not run a stock guest kernel, so they give TCG. "kvm" raises AcceleratorError when
    /dev/kvm cannot be opened; "tcg" is always available.
    """
    if requested == "tcg":
        return "tcg", "vm.accel is \"tcg\""
    dev_kvm_problem = _dev_kvm_problem()
    if requested == "kvm":
        if dev_kvm_problem:
            raise AcceleratorError(f"vm.accel is \"kvm\" but {dev_kvm_problem}: set vm.accel to \"auto\" or \"tcg\"")
        return "kvm", "vm.accel is \"kvm\""
    if requested != "auto":
        raise AcceleratorError(f"unknown accelerator {requested!r}: use \"auto\", \"kvm\" or \"tcg\"")

    flags = _cpu_flags()
    loaded = sorted(module for module in _loaded_modules() if module.startswith("kvm"))
    has_vendor_module = any(module in loaded for module in ("kvm_intel", "kvm_amd"))
    if not flags & {"vmx", "svm"}:
        modules_note = f" (loaded KVM modules: {', '.join(loaded)})" if loaded else ""
        return "tcg", f"the CPU does not expose vmx or svm in /proc/cpuinfo{modules_note}, so KVM cannot run a stock guest"
    if not has_vendor_module:
        return "tcg", f"neither kvm_intel nor kvm_amd is loaded (loaded KVM modules: {', '.join(loaded) or 'none'})"
    if dev_kvm_problem:
        return "tcg", dev_kvm_problem
    vendor = "kvm_intel" if "kvm_intel" in loaded else "kvm_amd"
    return "kvm", f"the CPU has {'vmx' if 'vmx' in flags else 'svm'} and {vendor} is loaded"


def host_tsc_khz() -> int:
    """Return the host's TSC frequency in kHz for the guest's tsc_early_khz.

    Under TCG the guest reads the host's TSC, and without a known frequency the guest kernel
    calibrates against the emulated PIT, which hangs about one boot in seven. The value comes from
    /sys/devices/system/cpu/cpu0/tsc_freq_khz where the kernel provides it, else from "cpu MHz" in
    /proc/cpuinfo.
    """
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                # NOTE: on hosts with frequency scaling and no constant_tsc this is the current clock, not the TSC's.
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return FALLBACK_TSC_KHZ


def kernel_command_line(extra: list[str], tsc_khz: int, host_ports: list[int] | None = None) -> str:
    """Return the guest kernel's command line: serial console, no reboot on panic, extra, then host_ports.

    The agent reads `osvm.host_ports=P1,P2` from /proc/cmdline and uses the last occurrence, so
    vm.host_ports wins over the same parameter in vm.kernel_args.
    """
    agent_args = [f"osvm.host_ports={','.join(str(port) for port in host_ports)}"] if host_ports else []
    base = [
        "console=ttyS0",
        "quiet",
        # panic=-1 reboots at once on a panic, and -no-reboot turns that reboot into QEMU's exit.
        "panic=-1",
        f"tsc_early_khz={tsc_khz}",
        "rdinit=/init",
    ]
    return " ".join(base + list(extra) + agent_args)


def build_qemu_argv(config: QemuConfig, qemu: str | None = None) -> list[str]:
    """Return the QEMU argument vector for config."""
    qemu = qemu or shutil.which(QEMU_BINARY) or QEMU_BINARY
    argv = [
        qemu,
        "-name", f"osvm-{config.name},debug-threads=on",
        "-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on",
    ]
    if config.accelerator == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={TCG_CACHE_MIB}"]
    argv += [
        "-m", f"{config.memory_mib}M",
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot",
        "-serial", f"file:{config.serial_log}",
        "-qmp", f"unix:{config.qmp_socket},server=on,wait=off",
        "-pidfile", str(config.pid_file),
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", kernel_command_line(config.kernel_args, host_tsc_khz(), config.host_ports),
    ]
    argv += _network_args(config)
    argv += [
        # QEMU reserves port number 0 for a console, so four named ports need max_ports above 4.
        "-device", "virtio-serial-device,max_ports=8",
        "-chardev", f"socket,id=agent,path={config.agent_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=osvm.agent",
        "-chardev", f"socket,id=exec,path={config.exec_port_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=exec,name=osvm.exec",
        "-chardev", f"file,id=log,path={config.log_path},append=on",
        "-device", "virtserialport,chardev=log,name=osvm.log",
        "-chardev", f"socket,id=vsock,path={config.vsock_port_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=vsock,name=osvm.vsock",
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng",
    ]
    if config.overlay is not None:
        argv += [
            "-drive", f"id=root,file={config.overlay},format=qcow2,if=none,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
        ]
    if config.sandbox:
        argv += ["-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
    if config.run_as:
        argv += ["-runas", config.run_as]
    return argv + list(config.extra_args)


def _network_args(config: QemuConfig) -> list[str]:
    if config.tap is not None:
        # The tap device exists already, owned by the user QEMU runs as; QEMU runs no scripts.
        netdev = f"tap,id=net0,ifname={config.tap},script=no,downscript=no"
        return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]
    netdev = "user,id=net0"
    if config.restrict_network:
        # restrict=on cuts the guest off from the host and the outside; hostfwd rules still work.
        netdev += ",restrict=on"
    for port in config.ports:
        netdev += f",hostfwd=tcp:{config.listen_address}:{port}-:{port}"
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]


def _dev_kvm_problem() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "/dev/kvm does not exist"
    except OSError as error:
        return f"/dev/kvm cannot be opened: {error.strerror}"
    os.close(fd)
    return None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _loaded_modules() -> set[str]:
    try:
        return set(os.listdir("/sys/module"))
    except OSError:
        return set()
