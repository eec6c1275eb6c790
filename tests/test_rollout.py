"""Blue-green rollouts end to end: real daemon, real instances, real traffic through the endpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
OSVM = [sys.executable, "-m", "osvm"]
BACKEND = Path(__file__).resolve().parent / "rollout_backend.py"
# Components run as the unprivileged user, which cannot read a Python under /root (pyenv).
GUEST_PYTHON = "/usr/bin/python3"
WORK_ROOT = Path("/var/lib/osvm-tests")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="rollout tests need root for isolated instances"),
    pytest.mark.skipif(not Path(GUEST_PYTHON).exists(), reason=f"{GUEST_PYTHON} is missing"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Daemon:
    state_dir: Path
    work_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def osvm(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*OSVM, "--state-dir", str(self.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"osvm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.osvm("status", "--json").stdout)

    def component(self, name: str) -> dict[str, Any]:
        return next(item for item in self.status()["components"] if item["name"] == name)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*OSVM, "--state-dir", str(self.state_dir), "daemon", "--log-level", "debug"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (self.state_dir / "osvm.sock").exists() and self.osvm("status", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon did not start:\n{self.log_path.read_text()}")


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    state_dir = Path(tempfile.mkdtemp(prefix="osvm-r-", dir="/tmp"))
    # Not under /tmp: instances get a private /tmp and could not see the backend script there.
    WORK_ROOT.mkdir(mode=0o755, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="rollout-", dir=WORK_ROOT))
    os.chmod(work_dir, 0o755)
    shutil.copy(BACKEND, work_dir / "backend.py")
    os.chmod(work_dir / "backend.py", 0o644)
    handle = Daemon(state_dir, work_dir, None, state_dir.parent / f"{state_dir.name}.log")  # type: ignore[arg-type]
    handle.start()
    try:
        yield handle
    finally:
        handle.osvm("down", "--daemon", timeout=180, check=False)
        try:
            handle.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            handle.process.kill()
        print(handle.log_path.read_text()[-6000:])
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        handle.log_path.unlink(missing_ok=True)


HTTP_PROBE = 'type = "http"\nport = "http"\npath = "/health"'
SOLANA_PROBE = 'type = "solana"\nport = "http"\nget_health = false'


def write_deployment(daemon: Daemon, listen_port: int, env: dict[str, str] | None = None, **settings: str) -> Path:
    env_lines = "\n".join(f'{key} = "{value}"' for key, value in (env or {"VERSION": "1"}).items())
    mode = settings.get("mode", "http")
    text = f"""
name = "rollout-test"

[components.app]
command = ["{GUEST_PYTHON}", "{daemon.work_dir}/backend.py"]
ports = {{ http = 0 }}
stop_grace_period = "{settings.get('grace', '5s')}"

[components.app.env]
{env_lines}

[components.app.endpoint]
listen = "127.0.0.1:{listen_port}"
mode = "{mode}"
drain_timeout = "{settings.get('drain', '5s')}"
queue_timeout = "10s"

[components.app.update]
min_healthy_time = "0.5s"
healthy_deadline = "{settings.get('deadline', '30s')}"
post_promotion_window = "{settings.get('window', '2s')}"
{settings.get('update_extra', '')}

[[components.app.probes]]
{settings.get('probe', HTTP_PROBE)}
interval = "0.3s"
startup_interval = "0.1s"
failure_threshold = 2
"""
    path = daemon.work_dir / "deploy.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


@dataclass
class LoadResult:
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)


class LoadLoop:
    """Closed-loop JSON-RPC clients through the endpoint, counting failures."""

    def __init__(self, port: int, clients: int = 4, keep_alive: bool = True):
        self.url = f"http://127.0.0.1:{port}/"
        self.clients = clients
        self.keep_alive = keep_alive
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "LoadLoop":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=1 if self.keep_alive else 0)
        with httpx.Client(timeout=20, limits=limits, trust_env=False) as client:
            while not self._stop.is_set():
                body = {"jsonrpc": "2.0", "id": 1, "method": "version", "params": []}
                headers = {} if self.keep_alive else {"Connection": "close"}
                try:
                    response = client.post(self.url, json=body, headers=headers)
                    ok = response.status_code == 200
                    version = response.json().get("result") if ok else None
                    problem = "" if ok else f"HTTP {response.status_code}: {response.text[:100]}"
                except (httpx.HTTPError, ValueError) as error:
                    ok, version, problem = False, None, f"{type(error).__name__}: {error}"
                with self._lock:
                    self.result.sent += 1
                    if ok:
                        self.result.versions.append(str(version))
                    else:
                        self.result.failed += 1
                        self.result.errors.append(problem)


def wait_for(condition: Any, timeout: float = 60.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


def get_version(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/version", timeout=10, trust_env=False).text


def deploy(daemon: Daemon, *args: str, check: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = daemon.osvm("deploy", "app", *args, "--json", timeout=180, check=check)
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result, payload.get("rollout", {})


# --- tests -----------------------------------------------------------------------------------


def test_deploy_swaps_without_failed_requests(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port)))
    assert get_version(port) == "1"

    with LoadLoop(port, clients=4) as keep_alive, LoadLoop(port, clients=2, keep_alive=False) as fresh:
        time.sleep(0.5)
        result, rollout = deploy(daemon, "--set", "env.VERSION=2")
        time.sleep(0.5)

    assert result.returncode == 0, result.stdout + result.stderr
    assert rollout["state"] == "complete"
    assert [phase["phase"] for phase in rollout["phases"]] == ["starting", "verifying", "promoted", "draining"]
    assert keep_alive.result.failed == 0, keep_alive.result.errors[:5]
    assert fresh.result.failed == 0, fresh.result.errors[:5]
    assert keep_alive.result.sent > 0
    assert keep_alive.result.versions[-1] == "2"
    assert get_version(port) == "2"

    component = daemon.component("app")
    assert component["revision"] == 2
    assert [instance["revision"] for instance in component["instances"]] == [2]


def test_green_never_healthy_leaves_blue(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, deadline="4s")))
    blue = daemon.component("app")["instances"][0]

    with LoadLoop(port, clients=2) as load:
        result, rollout = deploy(daemon, "--set", "env.FAIL_HEALTH=1")

    assert result.returncode != 0
    assert rollout["state"] == "failed"
    assert "healthy_deadline" in rollout["reason"]
    assert load.result.failed == 0, load.result.errors[:5]
    component = daemon.component("app")
    assert component["revision"] == 1
    assert [instance["id"] for instance in component["instances"]] == [blue["id"]]
    assert component["instances"][0]["pid"] == blue["pid"]


def test_green_crash_in_watch_window_rolls_back(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, window="6s")))

    result, rollout = deploy(daemon, "--set", "env.VERSION=2", "--set", "env.CRASH_AFTER=2.5")

    assert result.returncode != 0
    assert rollout["state"] == "rolled_back"
    assert "watch window" in rollout["reason"]
    assert get_version(port) == "1"
    assert daemon.component("app")["revision"] == 1


def test_blue_ignoring_sigterm_is_killed(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, env={"VERSION": "1", "IGNORE_TERM": "1"}, grace="1s")))
    blue_pid = daemon.component("app")["instances"][0]["pid"]

    result, rollout = deploy(daemon, "--set", "env.IGNORE_TERM=0", "--set", "env.VERSION=2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert rollout["state"] == "complete"
    wait_for(lambda: not Path(f"/proc/{blue_pid}").exists(), 30, "blue to be killed")
    log = daemon.log_path.read_text()
    assert "sending SIGKILL" in log


def test_drain_deadline_closes_tcp_connection(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, mode="tcp", drain="2s")))
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"\r\n\r\n1" in _read_response(client)

    result, rollout = deploy(daemon, "--set", "env.VERSION=2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert rollout["closed_connections"] == 1
    client.settimeout(10)
    assert client.recv(1024) == b""
    client.close()
    assert get_version(port) == "2"


def test_second_deploy_is_rejected(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, window="5s")))
    first = daemon.osvm("deploy", "app", "--set", "env.VERSION=2", "--detach")
    assert first.returncode == 0

    second = daemon.osvm("deploy", "app", "--set", "env.VERSION=3", check=False)

    assert second.returncode != 0
    assert "still" in second.stderr
    assert "--abort" in second.stderr
    wait_for(lambda: daemon.component("app")["rollout"]["state"] == "complete", 60, "first rollout")


def test_abort_keeps_blue(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, deadline="60s")))
    daemon.osvm("deploy", "app", "--set", "env.FAIL_HEALTH=1", "--detach")

    daemon.osvm("deploy", "app", "--abort")

    wait_for(lambda: daemon.component("app")["rollout"]["state"] == "failed", 30, "abort")
    assert "aborted by the operator" in daemon.component("app")["rollout"]["reason"]
    assert get_version(port) == "1"


def test_rollback_returns_previous_revision(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port)))
    deploy(daemon, "--set", "env.VERSION=2", check=True)

    result = daemon.osvm("rollback", "app", "--json", timeout=180)

    rollout = json.loads(result.stdout)["rollout"]
    assert rollout["state"] == "complete"
    assert rollout["to_revision"] == 1
    assert get_version(port) == "1"
    history = json.loads(daemon.osvm("deployments", "app", "--json").stdout)["rollouts"]
    assert [item["state"] for item in history] == ["complete", "complete"]
    text = daemon.osvm("deployments", "app").stdout
    assert "2 -> 1" in text


def test_daemon_killed_mid_rollout_reaches_consistent_state(daemon: Daemon) -> None:
    port = free_port()
    daemon.osvm("up", str(write_deployment(daemon, port, deadline="60s")))
    blue = daemon.component("app")["instances"][0]
    daemon.osvm("deploy", "app", "--set", "env.FAIL_HEALTH=1", "--detach")
    wait_for(lambda: daemon.component("app")["rollout"]["state"] == "verifying", 30, "verifying")
    green_ids = daemon.component("app")["rollout"]["green"]

    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()
    daemon.start()

    component = daemon.component("app")
    assert component["rollout"]["state"] == "rolled_back"
    assert "before the switch" in component["rollout"]["reason"]
    assert [instance["id"] for instance in component["instances"]] == [blue["id"]]
    assert get_version(port) == "1"
    for green_id in green_ids:
        leftovers = subprocess.run(["pgrep", "-f", green_id], capture_output=True, text=True).stdout
        assert leftovers == ""


def test_slot_lag_gate_waits_for_catch_up(daemon: Daemon) -> None:
    port = free_port()
    path = write_deployment(
        daemon, port, env={"VERSION": "1", "SLOT": "1000"}, update_extra="max_slot_lag = 10", deadline="4s", probe=SOLANA_PROBE
    )
    daemon.osvm("up", str(path))

    lagging, lagging_rollout = deploy(daemon, "--set", "env.SLOT=900")
    caught_up, caught_up_rollout = deploy(daemon, "--set", "env.SLOT=995")

    assert lagging.returncode != 0
    assert lagging_rollout["state"] == "failed"
    assert "slot lag 100" in lagging_rollout["reason"]
    assert caught_up.returncode == 0, caught_up.stdout + caught_up.stderr
    assert caught_up_rollout["state"] == "complete"


def _read_response(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"1"):
        chunk = client.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
