"""Blue-green rollouts end to end: real daemon, real instances, real traffic through the endpoint."""

import json
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e import COMPONENT_PYTHON, Osvm, free_port, wait_for

BACKEND = Path(__file__).resolve().parent / "rollout_backend.py"

pytestmark = pytest.mark.root


@pytest.fixture
def osvm(osvm: Osvm) -> Osvm:
    """The `osvm` fixture of conftest.py, with rollout_backend.py in the work directory as backend.py."""
    osvm.copy_to_work_dir(BACKEND, "backend.py")
    return osvm


HTTP_PROBE = 'type = "http"\nport = "http"\npath = "/health"'
SOLANA_PROBE = 'type = "solana"\nport = "http"\nget_health = false'


def write_deployment(osvm: Osvm, listen_port: int, env: dict[str, str] | None = None, **settings: str) -> Path:
    env_lines = "\n".join(f'{key} = "{value}"' for key, value in (env or {"VERSION": "1"}).items())
    mode = settings.get("mode", "http")
    text = f"""
name = "rollout-test"

[components.app]
command = ["{COMPONENT_PYTHON}", "{osvm.work_dir}/backend.py"]
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
    return osvm.write_deployment_text(text)


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


def get_version(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/version", timeout=10, trust_env=False).text


def deploy(osvm: Osvm, *args: str, check: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = osvm.cli("deploy", "app", *args, "--json", check=check)
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result, payload.get("rollout", {})


# --- tests -----------------------------------------------------------------------------------


def test_deploy_swaps_without_failed_requests(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port))
    assert get_version(port) == "1"

    with LoadLoop(port, clients=4) as keep_alive, LoadLoop(port, clients=2, keep_alive=False) as fresh:
        time.sleep(0.5)
        result, rollout = deploy(osvm, "--set", "env.VERSION=2")
        time.sleep(0.5)

    assert result.returncode == 0, result.stdout + result.stderr
    assert rollout["state"] == "complete"
    assert [phase["phase"] for phase in rollout["phases"]] == ["starting", "verifying", "promoted", "draining"]
    assert keep_alive.result.failed == 0, keep_alive.result.errors[:5]
    assert fresh.result.failed == 0, fresh.result.errors[:5]
    assert keep_alive.result.sent > 0
    assert keep_alive.result.versions[-1] == "2"
    assert get_version(port) == "2"

    component = osvm.component("app")
    assert component["revision"] == 2
    assert [instance["revision"] for instance in component["instances"]] == [2]


def test_green_never_healthy_leaves_blue(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, deadline="4s"))
    blue = osvm.component("app")["instances"][0]

    with LoadLoop(port, clients=2) as load:
        result, rollout = deploy(osvm, "--set", "env.FAIL_HEALTH=1")

    assert result.returncode != 0
    assert rollout["state"] == "failed"
    assert "healthy_deadline" in rollout["reason"]
    assert load.result.failed == 0, load.result.errors[:5]
    component = osvm.component("app")
    assert component["revision"] == 1
    assert [instance["id"] for instance in component["instances"]] == [blue["id"]]
    assert component["instances"][0]["pid"] == blue["pid"]


def test_green_crash_in_watch_window_rolls_back(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, window="6s"))

    result, rollout = deploy(osvm, "--set", "env.VERSION=2", "--set", "env.CRASH_AFTER=2.5")

    assert result.returncode != 0
    assert rollout["state"] == "rolled_back"
    assert "watch window" in rollout["reason"]
    assert get_version(port) == "1"
    assert osvm.component("app")["revision"] == 1


def test_blue_ignoring_sigterm_is_killed(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, env={"VERSION": "1", "IGNORE_TERM": "1"}, grace="1s"))
    blue_pid = osvm.component("app")["instances"][0]["pid"]

    result, rollout = deploy(osvm, "--set", "env.IGNORE_TERM=0", "--set", "env.VERSION=2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert rollout["state"] == "complete"
    wait_for(lambda: not Path(f"/proc/{blue_pid}").exists(), "blue to be killed", 30)
    log = osvm.daemon_log.read_text()
    assert "sending SIGKILL" in log


def test_drain_deadline_closes_tcp_connection(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, mode="tcp", drain="2s"))
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"\r\n\r\n1" in _read_response(client)

    result, rollout = deploy(osvm, "--set", "env.VERSION=2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert rollout["closed_connections"] == 1
    client.settimeout(10)
    assert client.recv(1024) == b""
    client.close()
    assert get_version(port) == "2"


def test_second_deploy_is_rejected(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, window="5s"))
    first = osvm.cli("deploy", "app", "--set", "env.VERSION=2", "--detach")
    assert first.returncode == 0

    second = osvm.cli("deploy", "app", "--set", "env.VERSION=3", check=False)

    assert second.returncode != 0
    assert "still" in second.stderr
    assert "--abort" in second.stderr
    wait_for(lambda: osvm.component("app")["rollout"]["state"] == "complete", "first rollout", 60)


def test_abort_keeps_blue(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, deadline="60s"))
    osvm.cli("deploy", "app", "--set", "env.FAIL_HEALTH=1", "--detach")

    osvm.cli("deploy", "app", "--abort")

    wait_for(lambda: osvm.component("app")["rollout"]["state"] == "failed", "abort", 30)
    assert "aborted by the operator" in osvm.component("app")["rollout"]["reason"]
    assert get_version(port) == "1"


def test_rollback_returns_previous_revision(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port))
    deploy(osvm, "--set", "env.VERSION=2", check=True)

    result = osvm.cli("rollback", "app", "--json")

    rollout = json.loads(result.stdout)["rollout"]
    assert rollout["state"] == "complete"
    assert rollout["to_revision"] == 1
    assert get_version(port) == "1"
    history = json.loads(osvm.cli("deployments", "app", "--json").stdout)["rollouts"]
    assert [item["state"] for item in history] == ["complete", "complete"]
    text = osvm.cli("deployments", "app").stdout
    assert "2 -> 1" in text


def test_daemon_killed_mid_rollout_reaches_consistent_state(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port, deadline="60s"))
    blue = osvm.component("app")["instances"][0]
    osvm.cli("deploy", "app", "--set", "env.FAIL_HEALTH=1", "--detach")
    wait_for(lambda: osvm.component("app")["rollout"]["state"] == "verifying", "verifying", 30)
    green_ids = osvm.component("app")["rollout"]["green"]

    osvm.kill_daemon()
    osvm.start_daemon()

    component = osvm.component("app")
    assert component["rollout"]["state"] == "rolled_back"
    assert "before the switch" in component["rollout"]["reason"]
    assert [instance["id"] for instance in component["instances"]] == [blue["id"]]
    assert get_version(port) == "1"
    for green_id in green_ids:
        leftovers = subprocess.run(["pgrep", "-f", green_id], capture_output=True, text=True).stdout
        assert leftovers == ""


def test_slot_lag_gate_waits_for_catch_up(osvm: Osvm) -> None:
    port = free_port()
    path = write_deployment(
        osvm, port, env={"VERSION": "1", "SLOT": "1000"}, update_extra="max_slot_lag = 10", deadline="4s", probe=SOLANA_PROBE
    )
    osvm.up(path)

    lagging, lagging_rollout = deploy(osvm, "--set", "env.SLOT=900")
    caught_up, caught_up_rollout = deploy(osvm, "--set", "env.SLOT=995")

    assert lagging.returncode != 0
    assert lagging_rollout["state"] == "failed"
    assert "slot lag 100" in lagging_rollout["reason"]
    assert caught_up.returncode == 0, caught_up.stdout + caught_up.stderr
    assert caught_up_rollout["state"] == "complete"


def _read_response(client: socket.socket) -> bytes:
    """Read one HTTP response up to the end of its Content-Length body, or until the server closes.

    The headers and the body can arrive in separate segments, so the end of the headers alone does
    not end the response.
    """
    data = b""
    while True:
        head, separator, body = data.partition(b"\r\n\r\n")
        if separator:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length is None or len(body) >= int(length.group(1)):
                return data
        chunk = client.recv(4096)
        if not chunk:
            return data
        data += chunk
