"""Tests of osvm.runtimes.cgroups.

The tests marked root create real cgroups under the host's cgroup root and
check kernel enforcement. They run on whichever layout the host has (v1 or
v2). Tests named test_v2_layout_* check what the v2 code path writes, in a
plain directory tree that imitates the kernel's cgroup v2 files, so they run
on any host and check no enforcement. Tests named test_v2_kernel_* run the v2
code path's joining, membership and cgroup.kill on the kernel's cgroup2 mount,
which a host with v1 controllers may also have, without any controller.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osvm.runtimes import cgroups
from osvm.runtimes.cgroups import Cgroup, CgroupError, CgroupLimits, detect_layout

MIB = 1 << 20


# Real cgroups.


@pytest.fixture
def real_root() -> Path:
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root to create cgroups")
    if detect_layout(cgroups.DEFAULT_ROOT) is None:
        pytest.skip(
            f"no usable cgroup hierarchy at {cgroups.DEFAULT_ROOT} "
            "(need cgroup v2 with memory and pids, or cgroup v1 memory, cpu and pids mounts)"
        )
    return Path(cgroups.DEFAULT_ROOT)


@pytest.fixture
def parent(real_root):
    """A parent directory name unique to this test process. Every instance
    cgroup under it and the parent directories are removed afterwards."""
    name = f"osvm-test-{os.getpid()}"
    try:
        yield name
    finally:
        errors: list[Exception] = []
        for instance in Cgroup.list_names(real_root, name):
            cgroup = Cgroup.open(instance, real_root, name)
            try:
                if cgroup is not None:
                    cgroup.remove()
            except CgroupError as error:
                errors.append(error)
        layout = detect_layout(real_root)
        for directory in cgroups._parent_dirs(layout, real_root, name):
            try:
                if directory.is_dir():
                    directory.rmdir()
            except OSError as error:
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def processes():
    """Popen objects of processes a test starts. Any still running are killed
    by pid afterwards."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def start_in(cgroup: Cgroup, command: str, processes: list) -> subprocess.Popen:
    """Start sh command with the shell joining cgroup before it runs command,
    so every process command starts is in the cgroup too."""
    prelude = "".join(f"echo $$ > {shlex.quote(str(path))}; " for path in cgroup.procs_files())
    process = subprocess.Popen(
        ["sh", "-c", prelude + command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(process)
    return process


def controller_dir(cgroup: Cgroup, controller: str) -> Path:
    if cgroup.layout == "v2":
        return cgroup.paths[0]
    (path,) = [p for p in cgroup.paths if p.parent.parent.name == controller]
    return path


def read_file(cgroup: Cgroup, controller: str, file_name: str) -> str:
    return (controller_dir(cgroup, controller) / file_name).read_text().strip()


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.root
def test_create_sets_limit_files(real_root, parent):
    limits = CgroupLimits(memory=64 * MIB, cpus=1.5, pids=32)

    cgroup = Cgroup.create("limits", limits, real_root, parent)

    assert cgroup.name == "limits"
    assert cgroup.layout == detect_layout(real_root)
    assert all(path.is_dir() for path in cgroup.paths)
    if cgroup.layout == "v1":
        assert len(cgroup.paths) == 3
        assert read_file(cgroup, "memory", "memory.limit_in_bytes") == str(64 * MIB)
        memsw = controller_dir(cgroup, "memory") / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert memsw.read_text().strip() == str(64 * MIB)
        assert read_file(cgroup, "cpu", "cpu.cfs_period_us") == "100000"
        assert read_file(cgroup, "cpu", "cpu.cfs_quota_us") == "150000"
    else:
        assert len(cgroup.paths) == 1
        assert read_file(cgroup, "memory", "memory.max") == str(64 * MIB)
        swap = controller_dir(cgroup, "memory") / "memory.swap.max"
        if swap.exists():
            assert swap.read_text().strip() == "0"
        assert read_file(cgroup, "cpu", "cpu.max") == "150000 100000"
    assert read_file(cgroup, "pids", "pids.max") == "32"


@pytest.mark.root
def test_create_without_limits_leaves_defaults(real_root, parent):
    cgroup = Cgroup.create("unlimited", CgroupLimits(), real_root, parent)

    assert read_file(cgroup, "pids", "pids.max") == "max"
    if cgroup.layout == "v2":
        assert read_file(cgroup, "memory", "memory.max") == "max"
        assert read_file(cgroup, "cpu", "cpu.max") == "max 100000"
    else:
        assert read_file(cgroup, "cpu", "cpu.cfs_quota_us") == "-1"


@pytest.mark.root
def test_process_in_cgroup_is_listed(real_root, parent, processes):
    cgroup = Cgroup.create("members", CgroupLimits(pids=16), real_root, parent)

    process = start_in(cgroup, "exec sleep 100", processes)

    assert wait_until(lambda: process.pid in cgroup.pids())
    assert cgroup.pids() == {process.pid}
    assert cgroup.contains(process.pid)
    assert not cgroup.contains(os.getpid())


@pytest.mark.root
def test_contains_false_for_missing_pid(real_root, parent, processes):
    cgroup = Cgroup.create("missing-pid", CgroupLimits(), real_root, parent)
    process = start_in(cgroup, "exit 0", processes)
    process.wait(timeout=10)

    assert not cgroup.contains(process.pid)


@pytest.mark.root
def test_memory_hog_is_oom_killed(real_root, parent, processes):
    cgroup = Cgroup.create("hog", CgroupLimits(memory=64 * MIB, pids=16), real_root, parent)
    # bytes multiplication writes every page, so all 256 MiB must be resident.
    allocate = "chunks = [b'x' * (1 << 20) for _ in range(256)]"

    process = start_in(cgroup, f"exec {shlex.quote(sys.executable)} -c {shlex.quote(allocate)}", processes)
    returncode = process.wait(timeout=60)

    assert returncode == -signal.SIGKILL
    assert cgroup.oom_kills() >= 1


@pytest.mark.root
def test_memory_current_counts_usage(real_root, parent, processes):
    cgroup = Cgroup.create("usage", CgroupLimits(memory=256 * MIB), real_root, parent)
    allocate = "import time; chunk = b'x' * (32 << 20); print('ready', flush=True); time.sleep(100)"
    prelude = "".join(f"echo $$ > {shlex.quote(str(path))}; " for path in cgroup.procs_files())
    process = subprocess.Popen(
        ["sh", "-c", prelude + f"exec {shlex.quote(sys.executable)} -c {shlex.quote(allocate)}"],
        stdout=subprocess.PIPE,
    )
    processes.append(process)

    assert process.stdout.readline() == b"ready\n"
    usage = cgroup.memory_current()

    assert usage is not None
    assert usage >= 32 * MIB
    assert cgroup.oom_kills() == 0


@pytest.mark.root
def test_fork_loop_capped_at_pids_max(real_root, parent, processes):
    cgroup = Cgroup.create("forks", CgroupLimits(pids=10), real_root, parent)
    # The shell starts 50 background sleeps and stops at the first failed fork.
    fork_loop = "i=0; while [ $i -lt 50 ]; do sleep 100 & i=$((i+1)); done; sleep 100"

    process = start_in(cgroup, fork_loop, processes)
    process.wait(timeout=30)
    pids_dir = controller_dir(cgroup, "pids")
    events = dict(line.split() for line in (pids_dir / "pids.events").read_text().splitlines())

    assert process.returncode != 0
    assert 0 < len(cgroup.pids()) <= 10
    assert int((pids_dir / "pids.current").read_text()) <= 10
    assert int(events["max"]) >= 1


@pytest.mark.root
def test_kill_all_leaves_no_pids(real_root, parent, processes):
    cgroup = Cgroup.create("kill", CgroupLimits(pids=64), real_root, parent)
    process = start_in(cgroup, "for i in 1 2 3 4 5; do sleep 100 & done; wait", processes)
    assert wait_until(lambda: len(cgroup.pids()) == 6)

    killed = cgroup.kill_all()

    assert killed == 6
    assert cgroup.pids() == set()
    assert process.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.root
def test_kill_all_stops_fork_loop(real_root, parent, processes):
    cgroup = Cgroup.create("respawn", CgroupLimits(pids=512), real_root, parent)
    # The shell forks without pause, so kill_all races new processes. The
    # pids limit is high enough that the shell does not stop on a failed fork.
    start_in(cgroup, "while true; do sleep 100 & done", processes)
    assert wait_until(lambda: len(cgroup.pids()) >= 10)

    killed = cgroup.kill_all(timeout=10)

    assert killed >= 10
    assert cgroup.pids() == set()


@pytest.mark.root
def test_kill_all_empty_cgroup_returns_zero(real_root, parent):
    cgroup = Cgroup.create("empty", CgroupLimits(), real_root, parent)

    assert cgroup.kill_all() == 0


@pytest.mark.root
def test_remove_deletes_directories(real_root, parent, processes):
    cgroup = Cgroup.create("removed", CgroupLimits(memory=64 * MIB, pids=16), real_root, parent)
    start_in(cgroup, "exec sleep 100", processes)
    assert wait_until(lambda: len(cgroup.pids()) == 1)

    cgroup.remove()

    assert not any(path.exists() for path in cgroup.paths)
    assert Cgroup.open("removed", real_root, parent) is None
    cgroup.remove()  # idempotent


@pytest.mark.root
def test_remove_handles_child_cgroup(real_root, parent, processes):
    cgroup = Cgroup.create("nested", CgroupLimits(), real_root, parent)
    # A process in a child cgroup keeps the instance directories busy until
    # both the process and the child directory are gone.
    for path in cgroup.paths:
        (path / "child").mkdir()
    prelude = "".join(f"echo $$ > {shlex.quote(str(path / 'child' / 'cgroup.procs'))}; " for path in cgroup.paths)
    process = subprocess.Popen(["sh", "-c", prelude + "exec sleep 100"])
    processes.append(process)
    assert wait_until(lambda: process.pid in cgroup.pids())
    assert cgroup.contains(process.pid)

    cgroup.remove()

    assert not any(path.exists() for path in cgroup.paths)
    assert process.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.root
def test_list_names_and_open(real_root, parent):
    assert Cgroup.list_names(real_root, parent) == []
    assert Cgroup.open("first", real_root, parent) is None
    first = Cgroup.create("first", CgroupLimits(pids=8), real_root, parent)
    Cgroup.create("second", CgroupLimits(), real_root, parent)

    opened = Cgroup.open("first", real_root, parent)

    assert Cgroup.list_names(real_root, parent) == ["first", "second"]
    assert opened is not None
    assert opened.name == "first"
    assert opened.layout == first.layout
    assert opened.paths == first.paths


@pytest.mark.root
def test_open_incomplete_v1_cgroup(real_root, parent):
    if detect_layout(real_root) != "v1":
        pytest.skip("incomplete cgroups exist only on cgroup v1, which has one directory per controller")
    cgroup = Cgroup.create("partial", CgroupLimits(), real_root, parent)
    controller_dir(cgroup, "cpu").rmdir()

    opened = Cgroup.open("partial", real_root, parent)

    assert Cgroup.list_names(real_root, parent) == ["partial"]
    assert opened is not None
    assert len(opened.paths) == 2
    opened.remove()
    assert Cgroup.open("partial", real_root, parent) is None


@pytest.mark.root
def test_create_existing_name_fails(real_root, parent, processes):
    first = Cgroup.create("twice", CgroupLimits(pids=8), real_root, parent)
    process = start_in(first, "exec sleep 100", processes)
    assert wait_until(lambda: len(first.pids()) == 1)

    with pytest.raises(CgroupError, match="already exists") as raised:
        Cgroup.create("twice", CgroupLimits(pids=16), real_root, parent)

    assert raised.value.path is not None
    assert all(path.is_dir() for path in first.paths)
    assert read_file(first, "pids", "pids.max") == "8"
    assert first.pids() == {process.pid}


@pytest.mark.root
def test_failed_limit_removes_directories(real_root, parent, monkeypatch):
    real_write = cgroups._write

    def write_failing_on_pids_max(path, value):
        if path.name == "pids.max":
            raise CgroupError(f"failed to write {value!r} to {path}: injected", path, errno.EINVAL)
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", write_failing_on_pids_max)

    with pytest.raises(CgroupError, match="pids.max"):
        Cgroup.create("broken", CgroupLimits(memory=64 * MIB, pids=8), real_root, parent)

    assert Cgroup.list_names(real_root, parent) == []


def test_invalid_limits_rejected():
    cases = [
        CgroupLimits(memory=0),
        CgroupLimits(memory=-1),
        CgroupLimits(cpus=0),
        CgroupLimits(cpus=0.001),
        CgroupLimits(pids=0),
    ]
    for limits in cases:
        with pytest.raises(ValueError):
            limits.validate()


def test_invalid_names_rejected(tmp_path):
    for name in ["", ".", "..", "a/b", "-leading-dash", "x" * 129]:
        with pytest.raises(ValueError, match="invalid cgroup instance name"):
            Cgroup.create(name, CgroupLimits(), tmp_path)


# cgroup v2 file-writing logic against an imitation tree.

V2_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"


def _enabled_controllers(subtree_control: Path) -> set[str]:
    return {token.lstrip("+") for token in subtree_control.read_text().split()}


def _make_fake_v2_dir(path: Path, with_swap: bool = True) -> None:
    """Create a cgroup v2 directory the way the kernel does: interface files
    for the controllers that the parent enabled in cgroup.subtree_control."""
    path.mkdir()
    enabled = _enabled_controllers(path.parent / "cgroup.subtree_control")
    files = {
        "cgroup.controllers": " ".join(sorted(enabled)),
        "cgroup.subtree_control": "",
        "cgroup.procs": "",
        "cgroup.events": "populated 0\nfrozen 0\n",
    }
    if "memory" in enabled:
        files["memory.max"] = "max"
        files["memory.current"] = "0"
        files["memory.events"] = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
        if with_swap:
            files["memory.swap.max"] = "max"
    if "cpu" in enabled:
        files["cpu.max"] = "max 100000"
    if "pids" in enabled:
        files["pids.max"] = "max"
        files["pids.current"] = "0"
    for file_name, content in files.items():
        (path / file_name).write_text(content)


def _remove_fake_v2_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def fake_v2_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text(V2_CONTROLLERS + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroups, "_make_dir", _make_fake_v2_dir)
    monkeypatch.setattr(cgroups, "_remove_dir", _remove_fake_v2_dir)
    return root


def test_v2_layout_detected(fake_v2_root):
    assert detect_layout(fake_v2_root) == "v2"


def test_v2_layout_without_memory_unusable(fake_v2_root):
    (fake_v2_root / "cgroup.controllers").write_text("cpu io pids\n")

    assert detect_layout(fake_v2_root) is None


def test_v2_layout_empty_controllers_unusable(fake_v2_root):
    # An empty unified tree, like /sys/fs/cgroup/unified on a hybrid v1 host.
    (fake_v2_root / "cgroup.controllers").write_text("")

    assert detect_layout(fake_v2_root) is None


def test_v1_layout_missing_mounts_unusable(tmp_path):
    for controller in cgroups.CONTROLLERS:
        (tmp_path / controller).mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("max")

    assert detect_layout(tmp_path) is None


def test_v2_layout_create_writes_limits(fake_v2_root):
    limits = CgroupLimits(memory=64 * MIB, cpus=1.5, pids=32)

    cgroup = Cgroup.create("node", limits, fake_v2_root, "osvm")

    path = fake_v2_root / "osvm" / "node"
    assert cgroup.layout == "v2"
    assert cgroup.paths == [path]
    assert (fake_v2_root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (fake_v2_root / "osvm" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (path / "memory.max").read_text() == str(64 * MIB)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "cpu.max").read_text() == "150000 100000"
    assert (path / "pids.max").read_text() == "32"
    assert cgroup.procs_files() == [path / "cgroup.procs"]


def test_v2_layout_no_limits_writes_nothing(fake_v2_root):
    cgroup = Cgroup.create("free", CgroupLimits(), fake_v2_root, "osvm")

    path = cgroup.paths[0]
    assert (path / "memory.max").read_text() == "max"
    assert (path / "memory.swap.max").read_text() == "max"
    assert (path / "cpu.max").read_text() == "max 100000"
    assert (path / "pids.max").read_text() == "max"


def test_v2_layout_keeps_enabled_controllers(fake_v2_root):
    # A subtree_control that already lists the controllers is not written,
    # which also works where the root is not writable for that file.
    (fake_v2_root / "cgroup.subtree_control").write_text("cpu memory pids\n")

    Cgroup.create("node", CgroupLimits(pids=4), fake_v2_root, "osvm")
    Cgroup.create("other", CgroupLimits(pids=4), fake_v2_root, "osvm")

    assert (fake_v2_root / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    assert (fake_v2_root / "osvm" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"


def test_v2_layout_enables_only_offered_controllers(fake_v2_root):
    (fake_v2_root / "cgroup.controllers").write_text("io memory pids\n")

    cgroup = Cgroup.create("nocpu", CgroupLimits(memory=64 * MIB, pids=8), fake_v2_root, "osvm")

    assert (fake_v2_root / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (fake_v2_root / "osvm" / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert not (cgroup.paths[0] / "cpu.max").exists()


def test_v2_layout_cpu_limit_without_cpu_controller_fails(fake_v2_root):
    (fake_v2_root / "cgroup.controllers").write_text("memory pids\n")

    with pytest.raises(CgroupError, match="cpu controller is not enabled") as raised:
        Cgroup.create("nocpu", CgroupLimits(cpus=1.0), fake_v2_root, "osvm")

    assert raised.value.path == fake_v2_root / "osvm" / "nocpu" / "cpu.max"
    assert not (fake_v2_root / "osvm" / "nocpu").exists()


def test_v2_layout_without_swap_file(fake_v2_root, monkeypatch):
    monkeypatch.setattr(cgroups, "_make_dir", lambda path: _make_fake_v2_dir(path, with_swap=False))

    cgroup = Cgroup.create("noswap", CgroupLimits(memory=64 * MIB), fake_v2_root, "osvm")

    assert (cgroup.paths[0] / "memory.max").read_text() == str(64 * MIB)
    assert not (cgroup.paths[0] / "memory.swap.max").exists()


def test_v2_layout_write_error_names_file(fake_v2_root, monkeypatch):
    def make_dir_with_broken_pids_max(path):
        # A directory in place of pids.max makes the write fail with EISDIR.
        _make_fake_v2_dir(path)
        if path.name == "broken":
            (path / "pids.max").unlink()
            (path / "pids.max").mkdir()

    monkeypatch.setattr(cgroups, "_make_dir", make_dir_with_broken_pids_max)
    monkeypatch.setattr(cgroups, "_remove_dir", shutil.rmtree)

    with pytest.raises(CgroupError) as raised:
        Cgroup.create("broken", CgroupLimits(pids=8), fake_v2_root, "osvm")

    message = str(raised.value)
    assert "pids.max" in message
    assert "EISDIR" in message
    assert raised.value.errno == errno.EISDIR
    assert not (fake_v2_root / "osvm" / "broken").exists()


def test_v2_layout_existing_name_fails(fake_v2_root):
    first = Cgroup.create("twice", CgroupLimits(pids=8), fake_v2_root, "osvm")

    with pytest.raises(CgroupError, match="already exists"):
        Cgroup.create("twice", CgroupLimits(pids=16), fake_v2_root, "osvm")

    assert (first.paths[0] / "pids.max").read_text() == "8"


def test_v2_layout_open_list_remove(fake_v2_root):
    Cgroup.create("alpha", CgroupLimits(), fake_v2_root, "osvm")
    Cgroup.create("beta", CgroupLimits(), fake_v2_root, "osvm")

    opened = Cgroup.open("alpha", fake_v2_root, "osvm")

    assert Cgroup.list_names(fake_v2_root, "osvm") == ["alpha", "beta"]
    assert opened is not None
    assert opened.paths == [fake_v2_root / "osvm" / "alpha"]
    assert Cgroup.open("gamma", fake_v2_root, "osvm") is None
    opened.remove()
    opened.remove()  # idempotent
    assert Cgroup.list_names(fake_v2_root, "osvm") == ["beta"]


def test_v2_layout_reads_memory_events(fake_v2_root):
    cgroup = Cgroup.create("stats", CgroupLimits(memory=64 * MIB), fake_v2_root, "osvm")
    path = cgroup.paths[0]
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n")
    (path / "memory.current").write_text("1048576\n")

    assert cgroup.oom_kills() == 2
    assert cgroup.memory_current() == 1048576


def test_v2_layout_without_memory_files(fake_v2_root):
    (fake_v2_root / "cgroup.controllers").write_text("memory pids\n")
    (fake_v2_root / "cgroup.subtree_control").write_text("pids")
    (fake_v2_root / "osvm").mkdir()
    (fake_v2_root / "osvm" / "cgroup.controllers").write_text("pids")
    (fake_v2_root / "osvm" / "cgroup.subtree_control").write_text("pids")
    # The root offers memory but the existing parent does not, so the
    # instance gets no memory files.

    cgroup = Cgroup.create("nomem", CgroupLimits(pids=4), fake_v2_root, "osvm")

    assert cgroup.oom_kills() == 0
    assert cgroup.memory_current() is None


def test_v2_layout_busy_root_explains_fix(fake_v2_root, monkeypatch):
    real_write = cgroups._write

    def write_busy_subtree_control(path, value):
        if path == fake_v2_root / "cgroup.subtree_control":
            raise CgroupError(f"failed to write {value!r} to {path}: busy (EBUSY)", path, errno.EBUSY)
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", write_busy_subtree_control)

    with pytest.raises(CgroupError, match="Move them into a child cgroup") as raised:
        Cgroup.create("node", CgroupLimits(), fake_v2_root, "osvm")

    assert raised.value.errno == errno.EBUSY
    assert raised.value.path == fake_v2_root / "cgroup.subtree_control"


# The kernel's cgroup v2 hierarchy, for what needs no controller: joining, membership and
# cgroup.kill. A host with v1 controllers may still mount the unified hierarchy (at
# /sys/fs/cgroup/unified on this project's test machines) without the memory and pids
# controllers, so detect_layout() rejects it and the cgroup is built directly on it.


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(cgroups._unescape_mountinfo(fields[0].split()[4]))
    return None


@pytest.fixture
def real_v2_cgroup() -> Cgroup:
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root to create cgroups")
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("the kernel's cgroup v2 hierarchy (cgroup2) is not mounted")
    parent = mount / f"osvm-test-v2-{os.getpid()}"
    parent.mkdir()
    # The root cgroup never has cgroup.kill, so a new child shows whether the kernel has it.
    if not (parent / "cgroup.kill").exists():
        parent.rmdir()
        pytest.skip("the kernel has no cgroup.kill (Linux 5.14 or newer)")
    (parent / "node").mkdir()
    cgroup = Cgroup("node", "v2", [parent / "node"])
    try:
        yield cgroup
    finally:
        # The processes are the test's own; the processes fixture has killed them by pid already.
        wait_until(lambda: not cgroup.pids())
        for directory in [*cgroup._tree_dirs(), parent]:
            if directory.is_dir():
                directory.rmdir()


@pytest.mark.root
def test_v2_kernel_join_and_kill(real_v2_cgroup, processes):
    from osvm.runtimes.sandbox import cgroup_join_prefix

    cgroup = real_v2_cgroup
    process = subprocess.Popen(
        [*cgroup_join_prefix(cgroup.procs_files()), "sh", "-c", "for i in 1 2 3; do sleep 100 & done; wait"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(process)
    assert wait_until(lambda: len(cgroup.pids()) == 4)
    assert process.pid in cgroup.pids()
    assert cgroup.contains(process.pid)
    assert not cgroup.contains(os.getpid())

    killed = cgroup.kill_all()

    assert killed == 4
    assert cgroup.pids() == set()
    assert process.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.root
def test_v2_kernel_remove_with_child(real_v2_cgroup, processes):
    cgroup = real_v2_cgroup
    child = cgroup.paths[0] / "worker"
    child.mkdir()
    start_in(Cgroup("worker", "v2", [child]), "exec sleep 100", processes)
    assert wait_until(lambda: len(cgroup.pids()) == 1)

    cgroup.remove()

    assert not cgroup.paths[0].exists()
    assert cgroup.pids() == set()
