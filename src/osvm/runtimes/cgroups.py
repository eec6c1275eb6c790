"""A cgroup per instance, with memory, CPU and process-count limits.

Two layouts are supported. On a cgroup v1 host the memory, cpu and pids
controllers are separate mounts under the root (``{root}/memory`` and so
on), and an instance has one directory in each. On a cgroup v2 host there
is one unified hierarchy at the root, and an instance has one directory in
it. In both, instance directories live under a shared parent directory
(``osvm`` by default), which is created on demand and never removed here.

NOTE: the v2 code has run only against an imitation file tree (the
test_v2_layout_* tests), not yet on a kernel with cgroup v2 controllers.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "osvm"

# The controllers an instance cgroup uses. In v1 each has its own mount.
CONTROLLERS = ("memory", "cpu", "pids")

# CFS period for the CPU limit, in microseconds (the kernel default).
CPU_PERIOD_US = 100_000
# The kernel rejects a CFS quota below 1 ms.
MIN_CPU_QUOTA_US = 1_000

# Instance and parent names become directory names, so they must not contain
# a slash or be "." or "..".
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# How long remove() retries rmdir while the kernel still reports EBUSY after
# the last process exited, in seconds.
RMDIR_RETRY_SECONDS = 2.0

Layout = Literal["v1", "v2"]


class CgroupError(Exception):
    """A cgroup operation failed. ``path`` and ``errno`` are set when a file
    operation caused it."""

    def __init__(self, message: str, path: Path | None = None, error_number: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = error_number


@dataclass
class CgroupLimits:
    """Resource limits of one instance. None means no limit."""

    memory: int | None = None  # bytes, swap excluded (swap is limited to 0)
    cpus: float | None = None  # CPU time as a number of CPUs, e.g. 1.5
    pids: int | None = None  # maximum number of processes and threads

    def validate(self) -> None:
        """Raise ValueError when a limit is out of the range the kernel accepts."""
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"invalid memory limit {self.memory}: must be a positive number of bytes")
        if self.cpus is not None and self.cpus * CPU_PERIOD_US < MIN_CPU_QUOTA_US:
            raise ValueError(
                f"invalid cpus limit {self.cpus}: must be at least {MIN_CPU_QUOTA_US / CPU_PERIOD_US}"
            )
        if self.pids is not None and self.pids <= 0:
            raise ValueError(f"invalid pids limit {self.pids}: must be a positive number")


def _file_error(action: str, path: Path, error: OSError) -> CgroupError:
    code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else "unknown"
    reason = os.strerror(error.errno) if error.errno else str(error)
    return CgroupError(f"failed to {action} {path}: {reason} ({code})", path, error.errno)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        raise _file_error(f"write {value!r} to", path, error) from error


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise _file_error("read", path, error) from error


def _check_name(kind: str, name: str) -> None:
    if not _NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid cgroup {kind} name {name!r}: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """Parse /proc/self/mountinfo into (mount point, root, fs type, super
    options) for every cgroup and cgroup2 mount."""
    mounts = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as error:
        logger.warning("failed to read /proc/self/mountinfo: %s", error)
        return mounts
    for line in lines:
        # Format (proc(5)): id parent major:minor root mount-point options
        # [optional fields...] - fstype source super-options
        before, separator, after = line.partition(" - ")
        if not separator:
            continue
        fields = before.split()
        fs_type, _source, super_options = (after.split() + ["", ""])[:3]
        if fs_type not in ("cgroup", "cgroup2") or len(fields) < 5:
            continue
        mount_root = _unescape_mountinfo(fields[3])
        mount_point = _unescape_mountinfo(fields[4])
        mounts.append((mount_point, mount_root, fs_type, set(super_options.split(","))))
    return mounts


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 etc.).
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _is_v1_mount(directory: Path, controller: str, mounts: list[tuple[str, str, str, set[str]]]) -> bool:
    real = os.path.realpath(directory)
    return any(
        fs_type == "cgroup" and controller in options and os.path.realpath(mount_point) == real
        for mount_point, _root, fs_type, options in mounts
    )


def detect_layout(root: str | os.PathLike = DEFAULT_ROOT) -> Layout | None:
    """Detect whether root contains a usable cgroup v2 or v1 hierarchy.

    Returns "v2" when root/cgroup.controllers lists memory and pids, "v1"
    when root/memory, root/cpu and root/pids are v1 mounts of those
    controllers, and None when neither layout is present or the current user
    cannot write to the hierarchy (cgroups need root here).
    """
    root = Path(root)
    controllers_file = root / "cgroup.controllers"
    if controllers_file.is_file():
        try:
            available = set(controllers_file.read_text().split())
        except OSError as error:
            logger.warning("failed to read %s: %s", controllers_file, error)
            return None
        if {"memory", "pids"} <= available and os.access(root, os.W_OK):
            return "v2"
        return None

    mounts = _cgroup_mounts()
    for controller in CONTROLLERS:
        directory = root / controller
        if not _is_v1_mount(directory, controller, mounts):
            return None
        if not os.access(directory, os.W_OK):
            return None
    return "v1"


def _require_layout(root: Path) -> Layout:
    layout = detect_layout(root)
    if layout is None:
        raise CgroupError(
            f"no usable cgroup hierarchy at {root}: expected cgroup v2 with the memory and pids "
            "controllers, or cgroup v1 mounts of memory, cpu and pids, writable by the current user"
        )
    return layout


def _parent_dirs(layout: Layout, root: Path, parent: str) -> list[Path]:
    if layout == "v1":
        return [root / controller / parent for controller in CONTROLLERS]
    return [root / parent]


def remove_parent(parent: str = DEFAULT_PARENT, root: str | os.PathLike = DEFAULT_ROOT) -> bool:
    """Remove the parent directories of instance cgroups when no instance cgroup is left in them.

    Returns True when they are gone. A parent that still contains instance cgroups is kept.
    """
    _check_name("parent", parent)
    root_path = Path(root)
    layout = detect_layout(root_path)
    if layout is None:
        return False
    removed = True
    for parent_dir in _parent_dirs(layout, root_path, parent):
        try:
            parent_dir.rmdir()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.debug("kept cgroup parent %s: %s", parent_dir, error)
            removed = False
    return removed


class Cgroup:
    """The cgroup of one instance: one directory per controller on v1, one
    directory on v2."""

    def __init__(self, name: str, layout: Layout, paths: list[Path]):
        self.name = name
        self.layout = layout
        self.paths = paths

    def __repr__(self) -> str:
        return f"Cgroup(name={self.name!r}, layout={self.layout!r}, paths={[str(p) for p in self.paths]})"

    # Creation and lookup.

    @classmethod
    def create(
        cls,
        name: str,
        limits: CgroupLimits,
        root: str | os.PathLike = DEFAULT_ROOT,
        parent: str = DEFAULT_PARENT,
    ) -> Cgroup:
        """Create the cgroup of instance name and set its limits.

        Raises CgroupError when it already exists or a directory or limit file
        cannot be written, after removing the directories this call made.
        """
        _check_name("instance", name)
        _check_name("parent", parent)
        limits.validate()
        root = Path(root)
        layout = _require_layout(root)

        if layout == "v2":
            _enable_v2_controllers(root, parent)
        created: list[Path] = []
        try:
            for parent_dir in _parent_dirs(layout, root, parent):
                _make_parent_dir(parent_dir)
            for parent_dir in _parent_dirs(layout, root, parent):
                path = parent_dir / name
                try:
                    _make_dir(path)
                except FileExistsError as error:
                    raise CgroupError(
                        f"cgroup {name!r} already exists at {path}: remove it with Cgroup.open(...).remove() "
                        "or choose another name",
                        path,
                        error.errno,
                    ) from error
                created.append(path)
        except OSError as error:
            _remove_dirs(created)
            raise _file_error("create directory", Path(error.filename or root), error) from error
        except CgroupError:
            _remove_dirs(created)
            raise

        cgroup = cls(name, layout, created)
        try:
            if layout == "v1":
                cgroup._set_v1_limits(limits)
            else:
                cgroup._set_v2_limits(limits)
        except CgroupError:
            _remove_dirs(created)
            raise
        logger.info("created cgroup %s (%s) with %s at %s", name, layout, limits, ", ".join(map(str, created)))
        return cgroup

    @classmethod
    def open(
        cls,
        name: str,
        root: str | os.PathLike = DEFAULT_ROOT,
        parent: str = DEFAULT_PARENT,
    ) -> Cgroup | None:
        """Open the existing cgroup of instance name, or return None if it does
        not exist.

        On v1 a cgroup missing from some controllers (a leftover of a failed
        removal) is opened with the directories that exist, so that remove()
        can finish the job.
        """
        _check_name("instance", name)
        _check_name("parent", parent)
        root = Path(root)
        layout = _require_layout(root)
        paths = [parent_dir / name for parent_dir in _parent_dirs(layout, root, parent)]
        existing = [path for path in paths if path.is_dir()]
        if not existing:
            return None
        if len(existing) < len(paths):
            logger.warning(
                "cgroup %s is incomplete: missing %s",
                name,
                ", ".join(str(path) for path in paths if path not in existing),
            )
        return cls(name, layout, existing)

    @classmethod
    def list_names(
        cls,
        root: str | os.PathLike = DEFAULT_ROOT,
        parent: str = DEFAULT_PARENT,
    ) -> list[str]:
        """Return the sorted names of the instance cgroups under parent, on v1
        including those that exist for only some controllers."""
        _check_name("parent", parent)
        root = Path(root)
        layout = _require_layout(root)
        names: set[str] = set()
        for parent_dir in _parent_dirs(layout, root, parent):
            try:
                entries = list(parent_dir.iterdir())
            except FileNotFoundError:
                continue
            except OSError as error:
                raise _file_error("list", parent_dir, error) from error
            names.update(entry.name for entry in entries if entry.is_dir())
        return sorted(names)

    # Limits.

    def _path_for(self, controller: str) -> Path | None:
        """Return the v1 directory of controller, or None if that directory is
        missing (see open())."""
        for path in self.paths:
            if path.parent.parent.name == controller:
                return path
        return None

    def _set_v1_limits(self, limits: CgroupLimits) -> None:
        memory_dir = self._path_for("memory")
        cpu_dir = self._path_for("cpu")
        pids_dir = self._path_for("pids")
        # create() makes all three directories.
        assert memory_dir is not None
        assert cpu_dir is not None
        assert pids_dir is not None

        if limits.memory is not None:
            _write(memory_dir / "memory.limit_in_bytes", str(limits.memory))
            # memory.memsw.* (memory plus swap) exists only with swap accounting.
            # Setting it equal to the memory limit leaves no room for swap.
            memsw = memory_dir / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, str(limits.memory))
        if limits.cpus is not None:
            _write(cpu_dir / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu_dir / "cpu.cfs_quota_us", str(round(limits.cpus * CPU_PERIOD_US)))
        if limits.pids is not None:
            _write(pids_dir / "pids.max", str(limits.pids))

    def _set_v2_limits(self, limits: CgroupLimits) -> None:
        (path,) = self.paths
        if limits.memory is not None:
            _write_v2_limit(path, "memory.max", str(limits.memory), "memory")
            # memory.swap.max is absent without swap accounting.
            swap = path / "memory.swap.max"
            if swap.exists():
                _write(swap, "0")
        if limits.cpus is not None:
            quota = round(limits.cpus * CPU_PERIOD_US)
            _write_v2_limit(path, "cpu.max", f"{quota} {CPU_PERIOD_US}", "cpu")
        if limits.pids is not None:
            _write_v2_limit(path, "pids.max", str(limits.pids), "pids")

    # Processes.

    def procs_files(self) -> list[Path]:
        """Return the cgroup.procs files a new process must write its pid to
        before exec, one per controller on v1 and one on v2."""
        return [path / "cgroup.procs" for path in self.paths]

    def _tree_dirs(self) -> list[Path]:
        """Return every directory of this cgroup with its descendants, deepest
        first, skipping directories that no longer exist."""
        dirs: list[Path] = []
        for path in self.paths:
            if not path.is_dir():
                continue
            for current, subdirs, _files in os.walk(path, topdown=False):
                del subdirs  # walked already because topdown is False
                dirs.append(Path(current))
        return dirs

    def pids(self) -> set[int]:
        """Return the pids of every process in this cgroup or its descendant
        cgroups, over all controllers."""
        result: set[int] = set()
        for directory in self._tree_dirs():
            try:
                text = (directory / "cgroup.procs").read_text()
            except FileNotFoundError:
                continue  # removed while reading
            except OSError as error:
                raise _file_error("read", directory / "cgroup.procs", error) from error
            result.update(int(line) for line in text.split())
        return result

    def contains(self, pid: int) -> bool:
        """Return whether process pid is in this cgroup (or a descendant) for
        every controller, according to /proc/<pid>/cgroup. Returns False when
        the process does not exist."""
        return self._is_member(pid, self._hierarchy_paths(), require_all=True)

    def _hierarchy_paths(self) -> list[tuple[str, str]]:
        """Return (controller, path) for each directory of this cgroup, with
        the path as /proc/<pid>/cgroup shows it. The controller is "" on v2,
        as in that file."""
        mounts = _cgroup_mounts()
        return [
            (path.parent.parent.name if self.layout == "v1" else "", _cgroup_path_in_hierarchy(path, mounts))
            for path in self.paths
        ]

    def _is_member(self, pid: int, expected: list[tuple[str, str]], require_all: bool) -> bool:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            return False
        memberships: dict[str, str] = {}
        for line in lines:
            # Format: hierarchy-id:controller-list:path, with an empty
            # controller list for the v2 hierarchy.
            _hierarchy, controllers, cgroup_path = line.split(":", 2)
            for controller in controllers.split(","):
                memberships[controller] = cgroup_path
        matches = []
        for controller, path in expected:
            actual = memberships.get(controller)
            in_subtree = actual is not None and (actual == path or actual.startswith(path.rstrip("/") + "/"))
            matches.append(in_subtree)
        if not matches:
            return False
        return all(matches) if require_all else any(matches)

    def kill_all(self, timeout: float = 5.0) -> int:
        """Send SIGKILL to every process in this cgroup until none is left.

        Returns the number of processes killed. Raises CgroupError when
        processes remain after timeout seconds.
        """
        deadline = time.monotonic() + timeout
        killed: set[int] = set()
        kill_file = self.paths[0] / "cgroup.kill" if self.layout == "v2" and self.paths else None

        if kill_file is not None and kill_file.exists():
            # cgroup.kill (Linux 5.14, commit 661ee6280931) kills the cgroup and
            # its descendants, and a child forked during the kill gets SIGKILL
            # too, so forks cannot escape it.
            killed = self.pids()
            if killed:
                _write(kill_file, "1")

        expected = self._hierarchy_paths()
        while True:
            remaining = self.pids()
            if not remaining:
                break
            if time.monotonic() >= deadline:
                raise CgroupError(
                    f"timed out after {timeout} s killing the processes of cgroup {self.name}: "
                    f"{len(remaining)} left, pids {sorted(remaining)[:20]}"
                )
            # Without cgroup.kill, processes can fork between reading
            # cgroup.procs and the kill, so the loop repeats until a read finds
            # none. pids.max bounds how many a fork loop can make.
            for pid in remaining:
                if self._kill_member(pid, expected):
                    killed.add(pid)
            time.sleep(0.01)

        if killed:
            logger.info("killed %d processes in cgroup %s", len(killed), self.name)
        return len(killed)

    def _kill_member(self, pid: int, expected: list[tuple[str, str]]) -> bool:
        """Send SIGKILL to pid if it is still in this cgroup. Returns False when
        it exited or is no longer a member.

        The pid was read from cgroup.procs, and the process may have exited and
        its pid been reused since. A pidfd pins the process, so checking
        membership after opening it and signalling through it cannot hit
        another process.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as error:
            if error.errno != errno.ENOSYS:
                raise
            # NOTE: before Linux 5.3 there is no pidfd, so a pid reused between
            # the cgroup.procs read and this kill would be signalled.
            if not self._is_member(pid, expected, require_all=False):
                return False
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            return True
        try:
            if not self._is_member(pid, expected, require_all=False):
                return False
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)
        return True

    # Statistics.

    def oom_kills(self) -> int:
        """Return how many processes the OOM killer killed in this cgroup, or 0
        when the kernel does not report it."""
        if self.layout == "v1":
            memory_dir = self._path_for("memory")
            stats_file = memory_dir / "memory.oom_control" if memory_dir else None
        else:
            stats_file = self.paths[0] / "memory.events" if self.paths else None
        if stats_file is None or not stats_file.exists():
            return 0
        for line in _read(stats_file).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def memory_current(self) -> int | None:
        """Return the memory usage of this cgroup in bytes, or None when the
        memory controller files are missing."""
        if self.layout == "v1":
            memory_dir = self._path_for("memory")
            usage_file = memory_dir / "memory.usage_in_bytes" if memory_dir else None
        else:
            usage_file = self.paths[0] / "memory.current" if self.paths else None
        if usage_file is None or not usage_file.exists():
            return None
        return int(_read(usage_file).strip())

    # Removal.

    def remove(self) -> None:
        """Kill every process in this cgroup, then remove its directories.

        Removing a cgroup that no longer exists does nothing. Raises
        CgroupError when processes survive kill_all() or a directory cannot be
        removed.
        """
        if not any(path.is_dir() for path in self.paths):
            return
        self.kill_all()
        _remove_dirs(self._tree_dirs(), raise_errors=True)
        logger.info("removed cgroup %s", self.name)


def _write_v2_limit(path: Path, file_name: str, value: str, controller: str) -> None:
    limit_file = path / file_name
    if not limit_file.exists():
        raise CgroupError(
            f"cannot set {file_name} in {path}: the {controller} controller is not enabled there. "
            f"Check that {controller} is listed in cgroup.controllers of the cgroup root",
            limit_file,
            errno.ENOENT,
        )
    _write(limit_file, value)


def _enable_v2_controllers(root: Path, parent: str) -> None:
    """Enable the instance controllers for the children of root and of
    root/parent, limited to those each level offers in cgroup.controllers.
    Creates root/parent in between, so that it is made with the controllers
    root enables."""
    _enable_v2_subtree_controllers(root)
    parent_dir = root / parent
    try:
        _make_parent_dir(parent_dir)
    except OSError as error:
        raise _file_error("create directory", parent_dir, error) from error
    _enable_v2_subtree_controllers(parent_dir)


def _enable_v2_subtree_controllers(directory: Path) -> None:
    available = set(_read(directory / "cgroup.controllers").split())
    enabled = set(_read(directory / "cgroup.subtree_control").split())
    missing = [c for c in CONTROLLERS if c in available and c not in enabled]
    if not missing:
        return
    subtree_control = directory / "cgroup.subtree_control"
    try:
        # A single write enables all of them, or none if one fails.
        _write(subtree_control, " ".join(f"+{c}" for c in missing))
    except CgroupError as error:
        if error.errno != errno.EBUSY:
            raise
        # cgroup v2 enables controllers for the children of a non-root cgroup
        # only while the cgroup itself has no processes.
        raise CgroupError(
            f"{error}: {directory} contains processes, so controllers cannot be enabled for its children. "
            "Move them into a child cgroup first",
            subtree_control,
            error.errno,
        ) from error


def _make_dir(path: Path) -> None:
    """Create one cgroup directory. The kernel fills it with the control
    files. Layout tests replace this function and _remove_dir() to do the same
    in a plain directory tree."""
    path.mkdir()


def _remove_dir(path: Path) -> None:
    path.rmdir()


def _make_parent_dir(path: Path) -> None:
    try:
        _make_dir(path)
    except FileExistsError:
        pass


def _cgroup_path_in_hierarchy(path: Path, mounts: list[tuple[str, str, str, set[str]]]) -> str:
    """Return the path of cgroup directory path as /proc/<pid>/cgroup shows
    it: relative to the hierarchy root, which is the mount's root field plus
    the directory's place under the mount point."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for mount_point, mount_root, fs_type, _options in mounts:
        mount_real = os.path.realpath(mount_point)
        if real == mount_real or real.startswith(mount_real.rstrip("/") + "/"):
            if best is None or len(mount_real) > len(best[0]):
                best = (mount_real, mount_root)
    if best is None:
        # Not under a cgroup mount (a test tree): treat the parent of the
        # parent directory as the hierarchy root.
        return "/" + "/".join(path.parts[-2:])
    mount_real, mount_root = best
    relative = os.path.relpath(real, mount_real)
    if relative == ".":
        return mount_root
    return os.path.join(mount_root, relative)


def _remove_dirs(paths: list[Path], raise_errors: bool = False) -> None:
    """Remove the directories in paths in order, retrying EBUSY for
    RMDIR_RETRY_SECONDS. Errors are logged, and raised as CgroupError after
    trying the rest when raise_errors is set."""
    first_error: CgroupError | None = None
    for path in paths:
        deadline = time.monotonic() + RMDIR_RETRY_SECONDS
        while True:
            try:
                _remove_dir(path)
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if error.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                failure = _file_error("remove directory", path, error)
                logger.error("%s", failure)
                first_error = first_error or failure
                break
    if raise_errors and first_error is not None:
        raise first_error
