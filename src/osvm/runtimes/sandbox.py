"""The command line that starts an instance inside its sandbox.

The chain, each step exec-ing the next so the spawned pid stays the same process:

    sh (joins the cgroups) -> nsenter (network namespace) -> prlimit (rlimits)
       -> bwrap (PID, mount, UTS, IPC namespaces; read-only system; private /tmp)
       -> setpriv (unprivileged user, no new privileges, empty capability sets) -> the command
"""

import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

# Joins every cgroup named before "--", then execs the rest. The pid written is this shell's, and
# exec keeps it, so the whole sandbox starts inside the cgroups and no fork escapes the limits.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'

# Directories that the sandbox replaces with empty ones of its own.
PRIVATE_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))

# Default descriptor for bwrap's JSON status: the child pid first, the exit code last.
STATUS_FD = 3

REQUIRED_TOOLS = ("bwrap", "setpriv", "prlimit", "nsenter")


class SandboxError(Exception):
    """The sandbox cannot be built on this host or for this spec."""


@dataclass(frozen=True)
class SandboxUser:
    name: str
    uid: int
    gid: int


def find_user(name: str) -> SandboxUser:
    """Look up the user an instance runs as.

    Raises SandboxError naming the user and how to create it.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(
            f"user {name!r} does not exist on this host: create it with `useradd --system --no-create-home "
            f"--shell /usr/sbin/nologin {name}` or set `user` in the component"
        ) from None
    if entry.pw_uid == 0:
        raise SandboxError(f"user {name!r} is root: components run as an unprivileged user, so choose another user")
    return SandboxUser(name, entry.pw_uid, entry.pw_gid)


def missing_tools() -> list[str]:
    """Return the sandbox tools that are not on PATH."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def cgroup_join_prefix(procs_files: list[Path]) -> list[str]:
    """Return the command prefix that joins the given cgroup.procs files, then execs the rest."""
    return ["/bin/sh", "-c", _JOIN_CGROUPS, "osvm-join-cgroups", *(str(path) for path in procs_files), "--"]


def build_sandbox_argv(
    argv: list[str],
    *,
    hostname: str,
    user: SandboxUser,
    data_dir: Path,
    workdir: str | None,
    hidden_dirs: list[Path],
    procs_files: list[Path],
    netns_path: str | None,
    open_files: int | None,
    status_fd: int = STATUS_FD,
) -> list[str]:
    """Return the full command line that runs `argv` isolated.

    `hidden_dirs` are covered with an empty tmpfs, so the instance cannot see the daemon's state,
    and `data_dir` is then bound read-write at its own path as the only writable directory besides /tmp.
    """
    chain = cgroup_join_prefix(procs_files)

    if netns_path is not None:
        chain += ["nsenter", f"--net={netns_path}", "--"]

    limits = ["--core=0"]
    if open_files is not None:
        limits.append(f"--nofile={open_files}:{open_files}")
    chain += ["prlimit", *limits, "--"]

    chain += [
        "bwrap",
        "--ro-bind", "/", "/",
        "--proc", "/proc",
        "--dev", "/dev",
        # Sticky and world-writable, as on a normal host, so the unprivileged user can use them.
        "--perms", "1777", "--tmpfs", "/dev/shm",
        "--perms", "1777", "--tmpfs", "/tmp",
        "--perms", "1777", "--tmpfs", "/var/tmp",
    ]
    # Bound before the hidden directories are covered, so a state directory inside a bound tree
    # stays hidden.
    for shown in _paths_under_private_dirs(argv, workdir):
        chain += ["--ro-bind", str(shown), str(shown)]
    for hidden in hidden_dirs:
        chain += ["--tmpfs", str(hidden)]
        # bwrap 0.8 creates missing parents of a bind destination with mode 0700, which the
        # instance's user cannot pass through, so the directories between a hidden directory and
        # the data directory are made here with mode 0755.
        for parent in reversed(data_dir.parents):
            if parent != hidden and parent.is_relative_to(hidden):
                chain += ["--perms", "0755", "--dir", str(parent)]
    chain += ["--bind", str(data_dir), str(data_dir)]
    chain += [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname", hostname,
        "--new-session",
        "--chdir", workdir or str(data_dir),
        "--json-status-fd", str(status_fd),
        "--",
    ]

    chain += [
        "setpriv",
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--clear-groups",
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--",
    ]
    return chain + argv


def _paths_under_private_dirs(argv: list[str], workdir: str | None) -> list[Path]:
    """Return the host directories the command needs that the private /tmp would hide.

    A program, a script given as its first argument, or the working directory under /tmp (a
    checkout there, say) stays visible, read only: the top directory below /tmp that contains it
    is bound into the sandbox.
    """
    shown: list[Path] = []
    # The program, and a script given as the first argument (python3 /tmp/x/server.py). Other
    # arguments are data, and a path there is no reason to show a directory.
    candidates = [argv[0]] if argv and argv[0].startswith("/") else []
    if len(argv) > 1 and argv[1].startswith("/") and Path(argv[1]).is_file():
        candidates.append(argv[1])
    if workdir:
        candidates.append(workdir)
    for candidate in candidates:
        path = Path(candidate)
        if not path.exists():
            continue
        for resolved in (path.absolute(), path.resolve()):
            for private in PRIVATE_DIRS:
                if resolved != private and resolved.is_relative_to(private):
                    top = private / resolved.relative_to(private).parts[0]
                    if top not in shown:
                        shown.append(top)
    return shown
