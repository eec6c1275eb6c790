"""The processes of the hot-swap benchmark: the osvm daemon, plain ganache, HAProxy, wrk and the load generator.

Every process here is started by the benchmark and stopped by its pid. Nothing binds or connects
to an address other than 127.0.0.1.
"""

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON = REPO / ".venv" / "bin" / "python"
OSVM = REPO / ".venv" / "bin" / "osvm"
LOADGEN = HERE / "loadgen.py"
WRK_SCRIPT = HERE / "jsonrpc.lua"
HAPROXY = "/usr/sbin/haproxy"
WRK = "/usr/bin/wrk"
# Instances run as the osvm user with a private /tmp, so files they read live here (mode 0755).
WORK_ROOT = Path("/var/lib/osvm-bench")

EXAMPLES = {
    "7.9.2": REPO / "examples" / "local-rpc.toml",
    "7.9.1": REPO / "examples" / "local-rpc-7.9.1.toml",
}

JSONRPC_REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}'


class BenchError(Exception):
    """A step of the benchmark failed; the message names the step and where its log is."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the kernel reports free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen, stop_signal: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Send stop_signal to a child, wait up to grace seconds, then SIGKILL it."""
    if process.poll() is not None:
        return
    process.send_signal(stop_signal)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- deployment files -----------------------------------------------------------------------


def toml_dumps(document: dict[str, Any]) -> str:
    """Serialize a document of tables, arrays of tables and plain values as TOML."""
    lines: list[str] = []
    _emit_table([], document, lines)
    return "\n".join(lines) + "\n"


def _emit_table(path: list[str], table: dict[str, Any], lines: list[str]) -> None:
    plain = {key: value for key, value in table.items() if not _is_table(value) and not _is_table_array(value)}
    if path:
        lines.append("")
        lines.append(f"[{'.'.join(_toml_key(part) for part in path)}]")
    for key, value in plain.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            _emit_table(path + [key], value, lines)
        elif _is_table_array(value):
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join(_toml_key(part) for part in path + [key])}]]")
                for item_key, item_value in item.items():
                    lines.append(f"{_toml_key(item_key)} = {_toml_value(item_value)}")


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # json.dumps escapes quotes, backslashes and control characters as TOML basic strings do.
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(key)} = {_toml_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as TOML")


def load_rpc_example(version: str) -> dict[str, Any]:
    """Load the example deployment of a ganache version, with its program path made absolute."""
    example = EXAMPLES[version]
    document = tomllib.loads(example.read_text())
    command = document["components"]["rpc"]["command"]
    if command[0].startswith(("./", "../")):
        # normpath, as `osvm up` does, keeps the node_modules/.bin symlink in the path.
        command[0] = os.path.normpath(example.parent / command[0])
    return document


def write_rpc_deployment(version: str, directory: Path, listen_port: int) -> Path:
    """Write a copy of the example deployment for a ganache version, for `osvm up` and `osvm deploy`.

    The copy has the rpc component only: the other components, the policy and the rpc component's
    depends_on are removed, the program path is absolute, and the endpoint listens on listen_port
    with plain HTTP.
    Everything else, such as probes, update policy and resources, is as in the example.
    """
    document = load_rpc_example(version)
    rpc = document["components"]["rpc"]
    document["components"] = {"rpc": rpc}
    # The load generator speaks plain HTTP, so the copy drops the example's mTLS and policy.
    document.pop("policy", None)
    rpc.pop("depends_on", None)
    rpc["endpoint"]["listen"] = f"127.0.0.1:{listen_port}"
    rpc["endpoint"]["tls"] = "none"
    path = directory / f"rpc-{version}.toml"
    header = f"# Written by bench/hotswap from {EXAMPLES[version].relative_to(REPO)}: rpc only, absolute program path.\n"
    path.write_text(header + toml_dumps(document))
    path.chmod(0o644)
    return path


def ganache_command(version: str, port: int) -> list[str]:
    """Return the example's ganache command line for a version, listening on port."""
    command = load_rpc_example(version)["components"]["rpc"]["command"]
    return [argument.replace("${OSVM_PORT_RPC}", str(port)) for argument in command]


def write_fixed_backend_deployment(directory: Path, listen_port: int) -> Path:
    """Write a deployment whose component is HAProxy serving one fixed JSON-RPC response, behind an endpoint."""
    config = directory / "fixed-backend.cfg"
    config.write_text((HERE / "fixed_backend.cfg.tmpl").read_text())
    config.chmod(0o644)
    document = {
        "name": "hotswap-proxy",
        "components": {
            "fixed": {
                "command": [HAPROXY, "-f", str(config), "-db"],
                "ports": {"http": 0},
                "stop_grace_period": "5s",
                "endpoint": {"listen": f"127.0.0.1:{listen_port}", "mode": "http"},
                "resources": {"open_files": 16384},
                "probes": [{"type": "http", "port": "http", "path": "/", "startup_interval": "100ms"}],
            }
        },
    }
    path = directory / "fixed-backend.toml"
    path.write_text("# Written by bench/hotswap: HAProxy returning a fixed response, behind an osvm endpoint.\n" + toml_dumps(document))
    path.chmod(0o644)
    return path


# --- the osvm daemon ------------------------------------------------------------------------


class Daemon:
    """An osvm daemon on its own state directory, started as a child of the benchmark."""

    def __init__(self, state_dir: Path, log_path: Path):
        self.state_dir = state_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(OSVM), "--state-dir", str(self.state_dir), "daemon"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        socket_path = self.state_dir / "osvm.sock"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the osvm daemon exited with status {self.process.returncode}: read {self.log_path}")
            if socket_path.exists() and self.osvm("status", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise BenchError(f"the osvm daemon did not accept requests on {socket_path} within {timeout:g} s: read {self.log_path}")

    def osvm(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `osvm --state-dir DIR ARGS...` and return the completed process."""
        argv = [str(OSVM), "--state-dir", str(self.state_dir), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise BenchError(
                f"`osvm {' '.join(args)}` exited with status {result.returncode}: "
                f"{result.stderr.strip()[-2000:]} (daemon log: {self.log_path})"
            )
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.osvm("status", "--json").stdout)

    def component(self, name: str) -> dict[str, Any]:
        for component in self.status()["components"]:
            if component["name"] == name:
                return component
        raise BenchError(f"component {name} not found in `osvm status --json` (daemon log: {self.log_path})")

    def stop(self, timeout: float = 60.0) -> str:
        """Run `osvm down --daemon` and wait for the daemon to exit; return an error message or ""."""
        if self.process is None or self.process.poll() is not None:
            return ""
        error = ""
        try:
            self.osvm("down", "--daemon", timeout=300.0)
        except (BenchError, subprocess.TimeoutExpired) as failure:
            error = str(failure)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            error += f" the daemon (pid {self.process.pid}) did not exit within {timeout:g} s, so it was killed"
            self.process.kill()
            self.process.wait()
        return error.strip()


# --- plain processes ------------------------------------------------------------------------


def jsonrpc_ready(port: int, timeout: float = 1.0) -> bool:
    """Return whether eth_blockNumber on 127.0.0.1:port returns a result."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=JSONRPC_REQUEST, headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status == 200 and "result" in json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


def start_ganache(version: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ganache as a plain child process on 127.0.0.1:port, with its output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ganache_command(version, port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "NODE_OPTIONS": "--max-old-space-size=768"},
        )


def start_haproxy(config_text: str, config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Write the config and start HAProxy in the foreground (-db) as a child process."""
    config_path.write_text(config_text)
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(config_path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"HAProxy rejected {config_path}: {check.stderr.strip() or check.stdout.strip()}")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [HAPROXY, "-f", str(config_path), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def wait_until(condition: Any, timeout: float, description: str, interval: float = 0.05) -> float:
    """Poll condition() until it is true; return the time.monotonic() when it was. Raise BenchError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:g} s waiting for {description}")


class LoadRun:
    """The load generator as a child process that runs until stop()."""

    def __init__(self, port: int, mode: str, connections: int, output: Path, timeout: float, failure_pause: float):
        self.output = output
        self.process = subprocess.Popen(
            [
                str(PYTHON), str(LOADGEN),
                "--target", f"127.0.0.1:{port}",
                "--connections", str(connections),
                "--mode", mode,
                "--timeout", str(timeout),
                "--failure-pause", str(failure_pause),
                "--until-eof",
                "--output", str(output),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.process.stdout.readline()  # type: ignore[union-attr]
        if not ready:
            raise BenchError(f"the load generator exited with status {self.process.wait()} before it started")
        self.started = json.loads(ready)["monotonic"]

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """End the run by closing its standard input; return the generator's JSON summary."""
        try:
            # communicate() closes standard input, which the generator reads as end of file.
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"the load generator did not stop within {timeout:g} s") from None
        if self.process.returncode != 0:
            raise BenchError(f"the load generator exited with status {self.process.returncode}")
        return json.loads(output.strip().splitlines()[-1])


def run_loadgen_for(port: int, mode: str, connections: int, duration: float, timeout: float, failure_pause: float) -> dict[str, Any]:
    """Run the load generator for a fixed duration without per-request output; return its summary."""
    result = subprocess.run(
        [
            str(PYTHON), str(LOADGEN),
            "--target", f"127.0.0.1:{port}",
            "--connections", str(connections),
            "--mode", mode,
            "--timeout", str(timeout),
            "--failure-pause", str(failure_pause),
            "--duration", str(duration),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    if result.returncode != 0:
        raise BenchError(f"the load generator exited with status {result.returncode}: {result.stderr.strip()[-1000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- wrk ------------------------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_wrk(port: int, connections: int, duration: float, threads: int = 1, close: bool = False) -> dict[str, Any]:
    """Run wrk with the JSON-RPC POST script against 127.0.0.1:port; return req/s, latency percentiles and errors."""
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(WRK_SCRIPT)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise BenchError(f"wrk exited with status {result.returncode}: {result.stderr.strip()}")
    return parse_wrk(result.stdout)


def parse_wrk(output: str) -> dict[str, Any]:
    """Parse wrk's --latency output into requests, req/s, latency percentiles in ms and error counts."""
    parsed: dict[str, Any] = {"output": output}
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise BenchError(f"wrk printed no Requests/sec line:\n{output}")
    parsed["requests_per_second"] = float(match.group(1))
    match = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if match is not None:
        parsed["requests"] = int(match.group(1))
    for percent in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        if match is not None:
            parsed[f"p{percent}_ms"] = float(match.group(1)) * _WRK_UNITS[match.group(2)]
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    parsed["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups()))) if match else {}
    )
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    parsed["non_2xx_3xx"] = int(match.group(1)) if match else 0
    return parsed


# --- machine facts --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Return the facts that the figures depend on: CPU, memory, kernel, versions, commit and load."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])

    def version_of(argv: list[str]) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except OSError:
            return "not found"
        return (result.stdout or result.stderr).strip().splitlines()[0]

    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "node": version_of(["node", "--version"]),
        "haproxy": version_of([HAPROXY, "-v"]),
        "wrk": version_of([WRK, "--version"]),
        "osvm_commit": commit.stdout.strip(),
        "load_average_1_5_15_min": [round(load, 2) for load in os.getloadavg()],
        "argv": sys.argv,
    }
