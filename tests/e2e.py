"""Helpers for the end-to-end tests: a daemon on a private state directory, the CLI, and components.

The end-to-end tests run the real daemon as root, with isolation, cgroups and network namespaces,
and drive it only through the `osvm` command line and the control API socket. Their fixtures are in
conftest.py.

Components are small Python programs passed to /usr/bin/python3 with -c, or scripts that a test
copies into the daemon's work directory under /var/lib/osvm-tests. They cannot be files under /tmp,
because an isolated instance has a private, empty /tmp.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx

from osvm.runtimes.netns import HOST_IFNAME_PREFIX, NETNS_PREFIX, short_id
from osvm.runtimes.process import cgroup_parent_for
from osvm.security.firewall import TABLE_FAMILY, TABLE_NAME
from osvm.store.db import LIVE_STATES

ROOT = Path(__file__).resolve().parent.parent
OSVM = ROOT / ".venv" / "bin" / "osvm"
PYTHON = ROOT / ".venv" / "bin" / "python"
EXAMPLE = ROOT / "examples" / "local-rpc.toml"

# The interpreter that components run, outside the virtualenv so that user osvm can read it.
COMPONENT_PYTHON = "/usr/bin/python3"
# The parent of the daemons' work directories. An isolated instance has a private, empty /tmp, and
# user osvm cannot read /root, so the directories are under neither.
WORK_ROOT = Path("/var/lib/osvm-tests")
# The firewall's table, which belongs in instances' network namespaces, never in the host's ruleset.
FIREWALL_TABLE = f"table {TABLE_FAMILY} {TABLE_NAME}"

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "cpu", "pids")

# Generous deadlines: they bound a hung test and are never asserted as performance limits.
DAEMON_START_TIMEOUT = 30.0
WAIT_TIMEOUT = 90.0
CLI_TIMEOUT = 180.0

T = TypeVar("T")


# --- components ------------------------------------------------------------------------------

# An HTTP server on OSVM_ADDRESS and OSVM_PORT_HTTP. GET returns the component and instance names
# and the variable GREETING, and POST replies to any JSON-RPC call with the result "0x1". It uses
# TCPServer, because HTTPServer.server_bind() looks up the host name with DNS, which a network
# namespace cannot reach.
HTTP_SERVER = """
import http.server, json, os, socketserver

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.reply({
            "component": os.environ["OSVM_COMPONENT"],
            "instance": os.environ["OSVM_INSTANCE"],
            "greeting": os.environ.get("GREETING"),
        })

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        self.reply({"jsonrpc": "2.0", "id": request.get("id"), "result": "0x1"})

    def reply(self, value):
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print("request:", format % args, flush=True)

socketserver.TCPServer.allow_reuse_address = True
server = socketserver.TCPServer((os.environ["OSVM_ADDRESS"], int(os.environ["OSVM_PORT_HTTP"])), Handler)
print("listening on", server.server_address, flush=True)
server.serve_forever()
"""

# Print, then sleep until stopped.
SLEEPER = """
import time
print("sleeping", flush=True)
while True:
    time.sleep(3600)
"""


def exit_after(seconds: float, code: int) -> str:
    """Return a program that exits with `code` after `seconds`."""
    return f"""
import sys, time
print("running, exiting with status {code} in {seconds} s", flush=True)
time.sleep({seconds})
sys.exit({code})
"""


def python_command(source: str) -> list[str]:
    """Return the command that runs a component program given as Python source."""
    return [COMPONENT_PYTHON, "-u", "-c", textwrap.dedent(source).strip() + "\n"]


# --- deployment files ------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: Any) -> str:
    """Render a value as TOML, with tables as inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is also a valid TOML basic string.
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(element) for element in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{toml_key(key)} = {toml_value(element)}" for key, element in value.items())
        return "{" + pairs + "}"
    raise TypeError(f"cannot write {value!r} of type {type(value).__name__} as TOML")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def deployment_toml(name: str, components: dict[str, dict[str, Any]]) -> str:
    """Render a deployment file with one [components.NAME] table per component."""
    lines = [f"name = {toml_value(name)}", ""]
    for component, spec in components.items():
        lines.append(f"[components.{component}]")
        lines.extend(f"{toml_key(key)} = {toml_value(value)}" for key, value in spec.items())
        lines.append("")
    return "\n".join(lines)


# --- requests to components ------------------------------------------------------------------

# Requests go straight to the component, never through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function checked it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_request(url: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send GET, or POST with `payload` as JSON, and return the status and body."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=timeout) as response:
        return response.status, response.read()


# --- waiting ---------------------------------------------------------------------------------


def wait_for(check: Callable[[], T | None], what: str, timeout: float = WAIT_TIMEOUT, interval: float = 0.2) -> T:
    """Call `check` until it returns a true value, and return that value.

    Raises AssertionError naming `what` and the last value when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


# --- host facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostProcess:
    pid: int
    state: str
    cmdline: list[str]
    cgroup: str

    def describe(self) -> str:
        command = " ".join(self.cmdline)
        return f"pid {self.pid} ({self.state}): {command[:200]}"


def read_process(pid: int) -> HostProcess | None:
    """Return a process's state, command line and cgroup membership, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state = stat[stat.rindex(")") + 2:].split()[0]
    return HostProcess(pid, state, [part.decode(errors="replace") for part in cmdline.split(b"\0") if part], cgroup)


def host_processes() -> list[HostProcess]:
    """Return every live (not zombie) process on the host except this one."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        process = read_process(int(entry))
        if process is not None and process.state not in ("Z", "X"):
            found.append(process)
    return found


def is_alive(pid: int) -> bool:
    process = read_process(pid)
    return process is not None and process.state not in ("Z", "X")


def netns_names() -> list[str]:
    output = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    # Lines look like "osvm-x" or "osvm-x (id: 0)".
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def link_names(netns: str | None = None) -> list[str]:
    """Return the interface names on the host, or in the named network namespace."""
    where = ["-n", netns] if netns else []
    output = subprocess.run(["ip", *where, "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    # Lines look like "7: ov-0123456789@if6: <BROADCAST,...> ...".
    return [line.split(":")[1].strip().split("@")[0] for line in output.splitlines() if line.strip()]


def host_nft_tables() -> list[str]:
    """Return the tables of the host's nftables ruleset as lines like "table inet osvm".

    Without nft on PATH the list is empty, because then osvm cannot have created a table either.
    """
    if shutil.which("nft") is None:
        return []
    output = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in output.splitlines() if line.strip()]


def free_subnet_pool() -> str:
    """Return a /24 of 10.213.0.0/16 that no host address or route overlaps.

    Each daemon allocates namespace subnets from its own store, so a test daemon gets a pool of its
    own to keep clear of any other osvm daemon on the host, which uses 10.213.0.0/16 by default.
    """
    used: list[ipaddress.IPv4Network] = []
    for command in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        for match in re.finditer(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", output):
            try:
                used.append(ipaddress.IPv4Network(match.group(1), strict=False))
            except ValueError:
                continue
    first = os.getpid() % 128
    for offset in range(128):
        candidate = ipaddress.IPv4Network(f"10.213.{128 + (first + offset) % 128}.0/24")
        if not any(candidate.overlaps(network) for network in used if network.prefixlen > 0):
            return str(candidate)
    raise RuntimeError("no free /24 left in 10.213.128.0/17 for a test daemon's subnet pool")


# --- the daemon and its command line ---------------------------------------------------------


@dataclass
class Osvm:
    """One daemon on a private state directory, driven through the `osvm` command line.

    Files that isolated instances run or read go in `work_dir`, a directory under WORK_ROOT.
    """

    base: Path
    work_dir: Path
    subnet_pool: str
    daemon: subprocess.Popen[bytes] | None = None
    daemon_starts: int = 0
    # Processes a test starts beside the daemon, killed in teardown if still running.
    extra_processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def daemon_log(self) -> Path:
        return self.base / "daemon-output.log"

    @property
    def socket(self) -> Path:
        return self.state_dir / "osvm.sock"

    @property
    def cgroup_parent(self) -> str:
        return cgroup_parent_for(self.state_dir)

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    # --- daemon ------------------------------------------------------------------------------

    def start_daemon(self) -> None:
        """Start the daemon as a child process and wait until it responds on its socket."""
        assert self.daemon is None or self.daemon.poll() is not None, "the daemon is already running"
        self.daemon_starts += 1
        with open(self.daemon_log, "ab") as log:
            log.write(f"\n===== daemon start {self.daemon_starts} =====\n".encode())
            log.flush()
            self.daemon = subprocess.Popen(
                [
                    str(PYTHON), "-m", "osvm", "--state-dir", str(self.state_dir),
                    "daemon", "--log-level", "debug", "--subnet-pool", self.subnet_pool,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
                start_new_session=True,
            )  # fmt: skip
        daemon = self.daemon

        def responds() -> bool:
            assert daemon.poll() is None, f"the daemon exited with status {daemon.returncode}:\n{self.log_tail()}"
            return self.ping() is not None

        wait_for(responds, f"the daemon to respond on {self.socket}", DAEMON_START_TIMEOUT, 0.1)

    def ping(self) -> dict[str, Any] | None:
        try:
            with self.api(timeout=2.0) as client:
                response = client.get("/v1/ping")
        except (httpx.TransportError, OSError):
            return None
        return response.json() if response.status_code == 200 else None

    def daemon_running(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def kill_daemon(self) -> int:
        """Kill the daemon with SIGKILL, as a crash would, and return its pid."""
        assert self.daemon is not None and self.daemon.poll() is None, "the daemon is not running"
        os.kill(self.daemon.pid, signal.SIGKILL)
        self.daemon.wait(timeout=30)
        return self.daemon.pid

    def api(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://osvm", timeout=timeout
        )

    def metrics(self) -> str:
        """Return the Prometheus metrics that the daemon serves at /metrics on its socket."""
        return self.get("/metrics").text

    def log_tail(self, lines: int = 300) -> str:
        try:
            text = self.daemon_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon output)"
        return "\n".join(text.splitlines()[-lines:])

    # --- command line ------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run `osvm --state-dir DIR ARGS...` and return the finished process.

        With `check`, a non-zero exit status fails the test with the command's output.
        """
        command = [str(OSVM), "--state-dir", str(self.state_dir), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=str(self.base))
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command[1:])} exited with status {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def get(self, path: str, **params: Any) -> httpx.Response:
        """Send GET to the control API, failing the test on an error status."""
        with self.api() as client:
            response = client.get(path, params=params)
        assert response.status_code == 200, f"GET {path} returned {response.status_code}: {response.text}"
        return response

    def status(self) -> dict[str, Any]:
        """Return the status from the control API, which wait loops poll at less CPU cost than the CLI."""
        return self.get("/v1/status").json()

    def component(self, name: str) -> dict[str, Any]:
        for component in self.status()["components"]:
            if component["name"] == name:
                return component
        raise AssertionError(f"component {name!r} not in `osvm status`")

    def instance(self, name: str) -> dict[str, Any]:
        """Return the one instance of a component, failing when there is not exactly one."""
        instances = self.component(name)["instances"]
        assert len(instances) == 1, f"expected one instance of {name}, found {len(instances)}: {instances}"
        return instances[0]

    def events(self, component: str | None = None) -> list[dict[str, Any]]:
        """Return past events, oldest first, from the control API."""
        params: dict[str, Any] = {"limit": 10000}
        if component is not None:
            params["component"] = component
        lines = self.get("/v1/events", **params).text.splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def cli_events(self) -> list[dict[str, Any]]:
        """Return past events, oldest first, from `osvm events --json`."""
        output = self.cli("events", "--json", "--limit", "10000").stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def write_deployment(self, components: dict[str, dict[str, Any]], name: str = "e2e", file: str = "deploy.toml") -> Path:
        return self.write_deployment_text(deployment_toml(name, components), file)

    def write_deployment_text(self, text: str, file: str = "deploy.toml") -> Path:
        """Write a deployment file given as TOML text, and return its path."""
        path = self.base / file
        path.write_text(text)
        path.chmod(0o644)
        return path

    def copy_to_work_dir(self, source: Path, name: str) -> Path:
        """Copy a file into the work directory as `name`, readable by user osvm, and return the copy's path."""
        path = self.work_dir / name
        shutil.copyfile(source, path)
        path.chmod(0o644)
        return path

    def up(self, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("up", str(path), "--timeout", str(int(WAIT_TIMEOUT)), *args)

    # --- waiting on status -------------------------------------------------------------------

    def wait_status(self, name: str, status: str, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
        """Wait until a component has `status`, and return the component."""

        def reached() -> dict[str, Any] | None:
            component = self.component(name)
            return component if component["status"] == status else None

        return wait_for(reached, f"component {name} to be {status}", timeout)

    def wait_healthy(self, name: str, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
        """Wait until a component runs one healthy instance, and return that instance."""

        def healthy() -> dict[str, Any] | None:
            component = self.component(name)
            instances = component["instances"]
            if component["status"] == "running" and len(instances) == 1 and instances[0]["health"] == "healthy":
                return instances[0]
            return None

        return wait_for(healthy, f"component {name} to run healthy", timeout)

    # --- resources on the host ---------------------------------------------------------------

    def cgroup_dir(self, controller: str, instance_id: str) -> Path:
        return CGROUP_ROOT / controller / self.cgroup_parent / instance_id

    def instance_cgroups(self) -> dict[str, list[str]]:
        """Return the instance cgroup directories under this daemon's parent, by controller."""
        found: dict[str, list[str]] = {}
        for controller in CGROUP_CONTROLLERS:
            parent = CGROUP_ROOT / controller / self.cgroup_parent
            if parent.is_dir():
                names = sorted(entry.name for entry in parent.iterdir() if entry.is_dir())
                if names:
                    found[controller] = names
        return found

    def data_dir(self, instance_id: str) -> Path:
        return self.state_dir / "data" / instance_id

    def tls_dir(self, instance_id: str) -> Path:
        """Return the directory of an instance's cert.pem, key.pem and ca.pem, which root can read."""
        return self.data_dir(instance_id) / "tls"

    def stored_instance_ids(self, live_only: bool = False) -> list[str]:
        """Return the ids of the instances in state.db, read from the file directly.

        With `live_only`, return only those in a state that owns a process, cgroup or network namespace.
        """
        database = self.state_dir / "state.db"
        if not database.exists():
            return []
        query = "SELECT id FROM instances"
        if live_only:
            query += f" WHERE state IN ({', '.join('?' for _ in LIVE_STATES)})"
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return [row[0] for row in connection.execute(query, LIVE_STATES if live_only else ())]
        finally:
            connection.close()

    def processes(self, instance_ids: list[str] | None = None) -> list[HostProcess]:
        """Return live host processes that belong to this daemon's state directory.

        A process belongs when its command line names the state directory, the work directory or
        an instance id, or when it is in a cgroup under this daemon's cgroup parent. The daemon
        itself is left out.
        """
        ids = instance_ids if instance_ids is not None else self.stored_instance_ids()
        daemon_pid = self.daemon.pid if self.daemon_running() and self.daemon is not None else None
        marks = [str(self.state_dir), str(self.work_dir), *ids]
        found = []
        for process in host_processes():
            if process.pid == daemon_pid:
                continue
            command = " ".join(process.cmdline)
            if f"/{self.cgroup_parent}/" in process.cgroup or any(mark in command for mark in marks):
                found.append(process)
        return found

    def component_processes(self) -> list[HostProcess]:
        """Return the component programs (the python3 processes) in this daemon's cgroups."""
        return [
            process
            for process in self.processes()
            if process.cmdline[:1] == [COMPONENT_PYTHON] and f"/{self.cgroup_parent}/" in process.cgroup
        ]

    def leftover_networks(self, instance_ids: list[str]) -> tuple[list[str], list[str]]:
        """Return the network namespaces and host veth interfaces of these instances that still exist."""
        namespaces = set(netns_names())
        links = set(link_names())
        left_namespaces = [NETNS_PREFIX + instance for instance in instance_ids if NETNS_PREFIX + instance in namespaces]
        left_links = [
            HOST_IFNAME_PREFIX + short_id(instance)
            for instance in instance_ids
            if HOST_IFNAME_PREFIX + short_id(instance) in links
        ]
        return left_namespaces, left_links
