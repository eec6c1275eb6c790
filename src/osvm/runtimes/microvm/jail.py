"""The mount namespace that QEMU runs in when the daemon is root.

bwrap gives QEMU a root of its own that shows only what it needs:

- /usr read-only, and the merged-/usr links or directories /bin, /sbin, /lib and /lib64;
- from /etc, only the loader cache and the user and group databases that -runas reads;
- the instance directory read-write (sockets, serial log, overlay, output log, pid file);
- the image's kernel, initrd and root filesystem read-only, at their host paths;
- a minimal /dev with /dev/kvm for KVM and /dev/net/tun for a tap device, a private /proc
  and an empty /tmp.

Other instances' directories, the daemon's state and the rest of the host are not in it. QEMU
still starts as root in the namespace, to open the tap device, and drops to the user osvm
(-runas) before the guest runs; -sandbox then filters its system calls. The pid namespace is the
host's, so QEMU's -pidfile and the pids the daemon records stay valid. bwrap stays as QEMU's
parent, and exits with QEMU's status, or 128 + the signal that killed QEMU.
"""

import shutil
from pathlib import Path

BWRAP = "bwrap"
# Files of /etc that QEMU reads: the dynamic loader's cache, and the user database for -runas.
ETC_FILES = ("/etc/ld.so.cache", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class JailError(Exception):
    """The jail cannot be built on this host; the message names the package to install."""


def jail_argv(
    instance_dir: Path, read_only_files: list[Path], *, kvm: bool, tap: bool, hostname: str
) -> list[str]:
    """Return the bwrap command prefix that runs QEMU in its own mount, IPC and UTS namespaces.

    Raises JailError when bwrap is not installed.
    """
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        raise JailError("bwrap is not on PATH: install the Debian package bubblewrap")
    argv = [bwrap, "--ro-bind", "/usr", "/usr"]
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            argv += ["--symlink", str(path.readlink()), name]
        elif path.is_dir():
            argv += ["--ro-bind", name, name]
    for name in ETC_FILES:
        argv += ["--ro-bind-try", name, name]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if kvm:
        argv += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
    if tap:
        argv += ["--dev-bind", "/dev/net/tun", "/dev/net/tun"]
    for path in dict.fromkeys(read_only_files):
        argv += ["--ro-bind", str(path), str(path)]
    argv += [
        "--bind", str(instance_dir), str(instance_dir),
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname", hostname,
        "--chdir", str(instance_dir),
        "--",
    ]
    return argv
