"""Fixtures of the end-to-end tests: a real daemon per test, and a check that it leaves nothing behind.

The `osvm` fixture gives each test its own state directory under /tmp, a work directory under
/var/lib/osvm-tests, and a daemon on the state directory. Its teardown stops everything through
`osvm down --daemon`, kills the daemon if it is still alive, and then fails the test if any process,
cgroup, network namespace or veth interface of that state directory is left. It removes such
leftovers before failing, so one failed test does not break the next. It also fails the test if the
host's own nftables ruleset has the firewall's table inet osvm, which belongs only in instances'
namespaces. That table is left in place for inspection, because any osvm daemon on the host could
have added it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from e2e import (
    CGROUP_CONTROLLERS,
    CGROUP_ROOT,
    COMPONENT_PYTHON,
    EXAMPLE,
    FIREWALL_TABLE,
    WORK_ROOT,
    Osvm,
    free_subnet_pool,
    host_nft_tables,
    wait_for,
)
from osvm.runtimes.cgroups import Cgroup, CgroupError, detect_layout
from osvm.runtimes.netns import HOST_IFNAME_PREFIX, NETNS_PREFIX, InstanceNetwork, NetworkError, short_id
from osvm.runtimes.sandbox import SandboxError, find_user, missing_tools

# How long teardown waits for processes of the state directory to exit after `osvm down`.
LEFTOVER_TIMEOUT = 15.0


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Store each phase's report on the test item, so that fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _skip_unless_host_supports_e2e() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root for namespaces, cgroups and the osvm user")
    missing = missing_tools()
    if missing:
        pytest.skip(f"end-to-end tests need {', '.join(missing)} on PATH (Debian packages bubblewrap, util-linux)")
    if detect_layout() != "v1":
        # The tests read cgroup directories and limit files at their v1 paths.
        pytest.skip("end-to-end tests need cgroup v1 memory, cpu and pids mounts under /sys/fs/cgroup")
    try:
        find_user("osvm")
    except SandboxError as error:
        pytest.skip(f"end-to-end tests need the user osvm: {error}")
    if shutil.which("ip") is None:
        pytest.skip("end-to-end tests need the ip command from iproute2")
    if not Path(COMPONENT_PYTHON).exists():
        pytest.skip(f"end-to-end tests need {COMPONENT_PYTHON}, which runs their components")


@contextmanager
def _fresh_directory(parent: Path) -> Iterator[Path]:
    """Create a directory PARENT/osvm-XXXXXXXX with mode 0755, and remove it with its contents on exit."""
    path = Path(tempfile.mkdtemp(prefix="osvm-", dir=parent))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def e2e_dir() -> Iterator[Path]:
    """A fresh directory /tmp/osvm-XXXXXXXX with mode 0755, removed afterwards.

    The path stays short because the daemon's Unix socket path must fit in 108 bytes.
    """
    with _fresh_directory(Path("/tmp")) as path:
        yield path


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A fresh directory /var/lib/osvm-tests/osvm-XXXXXXXX with mode 0755, removed afterwards.

    Isolated instances run as user osvm with a private /tmp, so the files they run must be here.
    It skips the test first where the end-to-end tests cannot run, such as without root.
    """
    _skip_unless_host_supports_e2e()
    WORK_ROOT.mkdir(mode=0o755, exist_ok=True)
    with _fresh_directory(WORK_ROOT) as path:
        yield path


@pytest.fixture
def osvm_stopped(e2e_dir: Path, work_dir: Path, request: pytest.FixtureRequest) -> Iterator[Osvm]:
    """An Osvm on a fresh state directory with no daemon started, whose teardown checks for leftovers."""
    _skip_unless_host_supports_e2e()
    osvm = Osvm(base=e2e_dir, work_dir=work_dir, subnet_pool=free_subnet_pool())
    try:
        yield osvm
    finally:
        _tear_down(osvm, request)


@pytest.fixture
def osvm(osvm_stopped: Osvm) -> Osvm:
    """An Osvm with its daemon started and responding on its socket."""
    osvm_stopped.start_daemon()
    return osvm_stopped


@pytest.fixture
def example_file() -> Path:
    """The bundled example, which needs ganache under vendor/ (`bash scripts/setup` installs it)."""
    ganache = EXAMPLE.parent.parent / "vendor" / "ganache-7.9.2" / "node_modules" / ".bin" / "ganache"
    if not ganache.exists():
        pytest.skip(f"{ganache} is missing: run `bash scripts/setup` to install ganache")
    # The example's endpoints listen on fixed addresses, which another program may hold.
    for name, component in tomllib.loads(EXAMPLE.read_text())["components"].items():
        listen = component.get("endpoint", {}).get("listen", "")
        host, _, port = listen.rpartition(":")
        if listen.startswith("unix:") or not port:
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host.strip("[]"), int(port)))
            except OSError as error:
                pytest.skip(f"{listen}, where the example's {name} endpoint listens, is in use: {error.strerror}")
    return EXAMPLE


def _tear_down(osvm: Osvm, request: pytest.FixtureRequest) -> None:
    problems: list[str] = []
    _stop_through_cli(osvm, problems)
    _stop_daemon_process(osvm, problems)
    _kill_extra_processes(osvm)

    instance_ids = osvm.stored_instance_ids()
    problems += _find_leftovers(osvm, instance_ids)
    _remove_leftovers(osvm, instance_ids)
    _remove_cgroup_parent(osvm)

    report = getattr(request.node, "report_call", None)
    if problems or (report is not None and report.failed):
        print(f"--- daemon output ({osvm.daemon_log}) ---")
        print(osvm.log_tail())
    if problems:
        pytest.fail("teardown found leftovers of the test's daemon:\n" + "\n".join(problems), pytrace=False)


def _stop_through_cli(osvm: Osvm, problems: list[str]) -> None:
    """Run `osvm down --daemon`, first restarting a daemon that a test killed, so it adopts its instances.

    A daemon that `osvm up` started is stopped the same way. A daemon still running after this is
    one of the leftover processes, because its command line names the state directory.
    """
    if osvm.ping() is None:
        if not osvm.stored_instance_ids(live_only=True):
            return
        try:
            osvm.start_daemon()
        except AssertionError as error:
            problems.append(f"cannot restart the daemon for teardown: {error}")
            return
    result = osvm.cli("down", "--daemon", check=False)
    if result.returncode != 0:
        problems.append(f"`osvm down --daemon` exited with status {result.returncode}: {result.stderr.strip()}")


def _stop_daemon_process(osvm: Osvm, problems: list[str]) -> None:
    daemon = osvm.daemon
    if daemon is None:
        return
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        problems.append(f"the daemon (pid {daemon.pid}) was still running 30 s after `osvm down --daemon`")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)


def _kill_extra_processes(osvm: Osvm) -> None:
    """Kill processes a test started beside the daemon, such as `osvm logs -f`, if still running."""
    for process in osvm.extra_processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _find_leftovers(osvm: Osvm, instance_ids: list[str]) -> list[str]:
    problems = []

    def no_processes() -> bool:
        return not osvm.processes(instance_ids)

    try:
        wait_for(no_processes, "processes of the state directory to exit", LEFTOVER_TIMEOUT)
    except AssertionError:
        problems += [f"process left: {process.describe()}" for process in osvm.processes(instance_ids)]

    for controller, names in osvm.instance_cgroups().items():
        problems.append(f"cgroups left under {CGROUP_ROOT / controller / osvm.cgroup_parent}: {', '.join(names)}")

    namespaces, links = osvm.leftover_networks(instance_ids)
    problems += [f"network namespace left: {name}" for name in namespaces]
    problems += [f"veth interface left: {name}" for name in links]
    problems += [f"host nftables table left: {table}" for table in host_nft_tables() if table == FIREWALL_TABLE]
    return problems


def _remove_leftovers(osvm: Osvm, instance_ids: list[str]) -> None:
    """Kill and remove whatever `osvm down` left, so that the next test starts clean."""
    for names in osvm.instance_cgroups().values():
        for name in names:
            cgroup = Cgroup.open(name, parent=osvm.cgroup_parent)
            if cgroup is None:
                continue
            try:
                cgroup.remove()
            except CgroupError as error:
                print(f"cannot remove leftover cgroup {name}: {error}")
    for process in osvm.processes(instance_ids):
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    namespaces, links = osvm.leftover_networks(instance_ids)
    for instance in instance_ids:
        if NETNS_PREFIX + instance not in namespaces and HOST_IFNAME_PREFIX + short_id(instance) not in links:
            continue
        try:
            InstanceNetwork(instance, None).remove()
        except NetworkError as error:
            print(f"cannot remove leftover network of {instance}: {error}")


def _remove_cgroup_parent(osvm: Osvm) -> None:
    """Remove the daemon's empty cgroup parent directories, which the daemon keeps for its next start."""
    for controller in CGROUP_CONTROLLERS:
        parent = CGROUP_ROOT / controller / osvm.cgroup_parent
        try:
            parent.rmdir()
        except FileNotFoundError:
            pass
        except OSError as error:
            print(f"cannot remove {parent}: {error}")
