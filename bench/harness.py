"""Shared parts of the core benchmarks: deployment files, one daemon per run, statistics, results.

Every run gets a fresh state directory and its own daemon, started with `osvm daemon` as a child of
the benchmark. Stopping a run calls `osvm down --daemon` and then checks that no process and no
instance cgroup of that state directory is left.
"""

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from osvm.runtimes.process import cgroup_parent_for

REPO = Path(__file__).resolve().parent.parent
OSVM = REPO / ".venv" / "bin" / "osvm"
RESULTS_DIR = REPO / "bench" / "results"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# The trivial component listens on OSVM_PORT_MAIN and closes every connection it accepts. It runs
# the system Python, because the osvm user cannot read a pyenv or virtualenv under /root.
PROGRAM = "/usr/bin/python3"
SERVER_CODE = (
    "import os, socket\n"
    "server = socket.create_server((os.environ['OSVM_ADDRESS'], int(os.environ['OSVM_PORT_MAIN'])))\n"
    "while True:\n"
    "    server.accept()[0].close()\n"
)

DAEMON_READY_TIMEOUT = 30.0
DAEMON_EXIT_TIMEOUT = 30.0


class BenchError(Exception):
    """A benchmark run failed. The message names the step and the log to read."""


# --- deployment files -----------------------------------------------------------------------


def component_names(count: int) -> list[str]:
    return [f"t{index:03d}" for index in range(count)]


def write_deployment(
    directory: Path,
    count: int,
    marker: str,
    startup_interval: str = "50ms",
    restart: dict[str, Any] | None = None,
) -> Path:
    """Write a deployment file of `count` trivial components, each with one tcp probe, and return its path.

    The probe runs every `startup_interval` until it first passes, and failures in the first 60 s
    do not count. `marker` becomes the last argument of every component's command line, so the
    benchmark can find its processes in /proc. `restart` contains the keys of each component's
    [restart] table.
    """
    lines = ['name = "bench"', ""]
    for name in component_names(count):
        command = [PROGRAM, "-c", SERVER_CODE, marker]
        lines.append(f"[components.{name}]")
        lines.append(f"command = {_toml_array(command)}")
        lines.append("ports = { main = 0 }")
        lines.append('stop_grace_period = "2s"')
        if restart:
            lines.append(f"[components.{name}.restart]")
            for key, value in restart.items():
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append(f"[[components.{name}.probes]]")
        lines.append('type = "tcp"')
        lines.append('port = "main"')
        lines.append(f'startup_interval = "{startup_interval}"')
        # Without a grace period, a command that needs more than failure_threshold (3) startup
        # intervals to listen turns unhealthy before it turns healthy, as most did on a loaded host.
        lines.append('startup_grace = "60s"')
        lines.append("")
    path = directory / "deployment.toml"
    path.write_text("\n".join(lines))
    path.chmod(0o644)
    return path


def _toml_array(values: list[str]) -> str:
    # A JSON string is a valid TOML basic string here, because json.dumps escapes the quotes and
    # newlines and the text has no other control characters.
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


# --- one daemon per run ---------------------------------------------------------------------


class BenchDaemon:
    """An osvm daemon on a fresh state directory under /tmp, with a work directory for its files.

    Use it as a context manager: leaving the block stops the daemon with `osvm down --daemon`,
    checks that nothing is left, and removes both directories unless `keep` is set.
    """

    def __init__(self, keep: bool = False):
        self.keep = keep
        # A short path, because the control socket path must fit in sun_path (108 bytes).
        self.state_dir = Path(tempfile.mkdtemp(prefix="ob-", dir="/tmp"))
        self.work_dir = Path(tempfile.mkdtemp(prefix="osvm-bench-"))
        # The deployment file must be readable by the osvm user, like any file an operator writes.
        self.work_dir.chmod(0o755)
        self.cgroup_parent = cgroup_parent_for(self.state_dir)
        self.log_path = self.work_dir / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.clean_check: dict[str, Any] | None = None

    def __enter__(self) -> "BenchDaemon":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if self.clean_check is None:
            self.stop()
        if exc_type is None and not self.clean_check["clean"]:
            raise BenchError(f"the run left processes or cgroups behind: {self.clean_check}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start `osvm daemon` and wait until its control socket accepts connections."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(OSVM), "--state-dir", str(self.state_dir), "daemon"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        socket_path = self.state_dir / "osvm.sock"
        deadline = time.monotonic() + DAEMON_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the daemon exited with status {self.process.returncode}: read {self.log_path}")
            if _accepts_connections(socket_path):
                return
            time.sleep(0.05)
        raise BenchError(f"the daemon did not listen on {socket_path} within {DAEMON_READY_TIMEOUT:g} s: read {self.log_path}")

    def osvm(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one `osvm` command on this state directory and return its completed process."""
        argv = [str(OSVM), "--state-dir", str(self.state_dir), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise BenchError(
                f"`{' '.join(argv[1:])}` exited with status {result.returncode}: {result.stderr.strip()} "
                f"(daemon log: {self.log_path})"
            )
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.osvm("status", "--json").stdout)

    def events(self, limit: int = 10_000) -> list[dict[str, Any]]:
        output = self.osvm("events", "--json", "--limit", str(limit)).stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def follow_events(self) -> subprocess.Popen[str]:
        """Start `osvm events -f --json` for new events. The caller reads its stdout and ends it."""
        return subprocess.Popen(
            [str(OSVM), "--state-dir", str(self.state_dir), "events", "-f", "--json", "--limit", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def instance_pids(self, instance_id: str) -> list[int]:
        """Return the pids in the instance's cgroup: the sandbox processes and the command."""
        return sorted(_cgroup_pids(self._instance_cgroup_dirs(instance_id)))

    def command_pid(self, instance_id: str) -> int | None:
        """Return the pid of the component's command in the instance's cgroup, if it runs."""
        for pid in self.instance_pids(instance_id):
            argv = read_cmdline(pid)
            if argv and argv[0] == PROGRAM:
                return pid
        return None

    def stop(self) -> dict[str, Any]:
        """Stop every component and the daemon, check that nothing is left, and clean up.

        Processes and cgroups left behind are listed in the returned report, then killed by pid
        and removed, because this run started them.
        """
        down_error = ""
        started = time.perf_counter()
        if self.process is not None and self.process.poll() is None:
            try:
                self.osvm("down", "--daemon", timeout=300.0)
            except (BenchError, subprocess.TimeoutExpired) as error:
                down_error = str(error)
            try:
                self.process.wait(DAEMON_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                down_error += f" the daemon (pid {self.process.pid}) did not exit within {DAEMON_EXIT_TIMEOUT:g} s"
        down_seconds = time.perf_counter() - started

        daemon_exited = self.process is None or self.process.poll() is not None
        leftover_cgroups = [str(path) for path in self._instance_cgroup_dirs()]
        leftover_processes = self._leftover_processes()
        check = {
            "clean": daemon_exited and not leftover_cgroups and not leftover_processes and not down_error,
            "daemon_exited": daemon_exited,
            "leftover_cgroups": leftover_cgroups,
            "leftover_processes": leftover_processes,
            "down_error": down_error.strip(),
            # `osvm down --daemon` until the daemon process exited.
            "down_seconds": down_seconds,
        }
        self._kill_leftovers(leftover_processes)
        # The daemon leaves its parent cgroup directories (osvm-<hash>) behind, empty. They belong
        # to this run's state directory only, so the benchmark removes them.
        check["removed_parent_cgroups"] = self._remove_parent_cgroups()
        self.clean_check = check
        if not self.keep and check["clean"]:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif not check["clean"]:
            print(f"kept {self.state_dir} and {self.work_dir} for inspection", file=sys.stderr)
        return check

    # --- private helpers ---------------------------------------------------------------------

    def _parent_dirs(self) -> list[Path]:
        """Return the daemon's parent cgroup directories: one per v1 controller, or one on v2."""
        candidates = [CGROUP_ROOT / self.cgroup_parent]
        candidates += [hierarchy / self.cgroup_parent for hierarchy in CGROUP_ROOT.iterdir() if hierarchy.is_dir()]
        return [path for path in candidates if path.is_dir()]

    def _instance_cgroup_dirs(self, instance_id: str | None = None) -> list[Path]:
        found = []
        for parent in self._parent_dirs():
            for child in parent.iterdir():
                if child.is_dir() and (instance_id is None or child.name == instance_id):
                    found.append(child)
        return found

    def _leftover_processes(self) -> list[dict[str, Any]]:
        """Return live processes of this run: those in its cgroups and those whose command line contains its state directory."""
        pids = set(_cgroup_pids(self._instance_cgroup_dirs()))
        needle = str(self.state_dir)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and any(needle in argument for argument in read_cmdline(int(entry.name))):
                pids.add(int(entry.name))
        pids.discard(os.getpid())
        return [{"pid": pid, "cmdline": " ".join(read_cmdline(pid))[:200]} for pid in sorted(pids)]

    def _kill_leftovers(self, processes: list[dict[str, Any]]) -> None:
        for process in processes:
            try:
                os.kill(process["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in sorted(self._instance_cgroup_dirs(), key=lambda item: len(item.parts), reverse=True):
            _remove_cgroup_dir(path)

    def _remove_parent_cgroups(self) -> list[str]:
        removed = []
        for path in self._parent_dirs():
            if _remove_cgroup_dir(path):
                removed.append(str(path))
        return removed


def _accepts_connections(path: Path) -> bool:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except OSError:
        return False
    finally:
        client.close()
    return True


def _cgroup_pids(directories: list[Path]) -> set[int]:
    pids: set[int] = set()
    for directory in directories:
        try:
            text = (directory / "cgroup.procs").read_text()
        except OSError:
            continue
        pids.update(int(line) for line in text.split())
    return pids


def _remove_cgroup_dir(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError as error:
        print(f"cannot remove cgroup directory {path}: {error.strerror}", file=sys.stderr)
        return False
    return True


# --- /proc ----------------------------------------------------------------------------------


def read_cmdline(pid: int) -> list[str]:
    """Return the process's argument vector, or [] when it has exited or is a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def read_status_number(pid: int, field: str) -> int | None:
    """Return a numeric field of /proc/PID/status: VmRSS and VmHWM are in KiB, Threads is a count."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def read_pss_kib(pid: int) -> int | None:
    """Return the proportional set size from /proc/PID/smaps_rollup, in KiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU time the process has used, in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in brackets and may contain spaces, so split after it. Index 0 is then the
    # state (field 3 in proc(5)), and utime and stime (fields 14 and 15) are at 11 and 12.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- machine, statistics and results --------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Return the facts that a result depends on: CPU, memory, kernel, Python versions, osvm commit."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    component_python = subprocess.run([PROGRAM, "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "osvm_python": platform.python_version(),
        "component_python": component_python,
        "osvm_commit": commit,
    }


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages, which show other work on the machine."""
    return [round(load, 2) for load in os.getloadavg()]


def summarize(values: list[float]) -> dict[str, float]:
    """Return the count, median, minimum, maximum and 99th percentile of the values.

    The percentile interpolates between the two nearest samples (statistics.quantiles, method
    "inclusive"), so with 100 samples p99 lies between the 99th and the 100th smallest.
    """
    result = {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}
    if len(values) >= 2:
        result["p99"] = statistics.quantiles(values, n=100, method="inclusive")[98]
    return result


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write the results with the machine facts to bench/results/NAME.json and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {"benchmark": name, "machine": machine_info(), "load_average_at_end": load_average(), **results}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the core benchmarks measure isolated instances: run them as root")
    if not OSVM.exists():
        sys.exit(f"{OSVM} not found: run scripts/setup first")
