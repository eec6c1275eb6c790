"""`osvm daemon-restart` and SIGHUP: the daemon executes itself again while its endpoints keep serving."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import OSVM, Osvm, free_port, wait_for
from osvm.daemon import handover
from test_rollout import BACKEND, LoadLoop, get_version, write_deployment

pytestmark = pytest.mark.root


@pytest.fixture
def osvm(osvm: Osvm) -> Osvm:
    """The `osvm` fixture of conftest.py, with rollout_backend.py in the work directory as backend.py."""
    osvm.copy_to_work_dir(BACKEND, "backend.py")
    return osvm


def event_kinds(osvm: Osvm) -> list[str]:
    return [event["kind"] for event in osvm.cli_events()]


def test_restart_under_load_fails_no_request(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(write_deployment(osvm, port))
    instance = osvm.instance("app")
    before = osvm.ping()

    with LoadLoop(port, clients=2) as keep_alive, LoadLoop(port, clients=1, keep_alive=False) as fresh:
        wait_for(lambda: keep_alive.result.sent > 20 and fresh.result.sent > 20, "the load loops to send requests")
        result = osvm.cli("daemon-restart", "--json")
        sent = keep_alive.result.sent + fresh.result.sent
        wait_for(lambda: keep_alive.result.sent + fresh.result.sent > sent + 50, "requests after the restart")

    restart = json.loads(result.stdout)
    assert restart["before"]["started_at"] == before["started_at"]
    assert restart["after"]["started_at"] > before["started_at"]
    # The daemon executed itself, so systemd and the test see the same pid.
    assert restart["after"]["pid"] == before["pid"]
    assert osvm.daemon.poll() is None
    assert keep_alive.result.failed == 0, keep_alive.result.errors[:5]
    assert fresh.result.failed == 0, fresh.result.errors[:5]

    adopted = osvm.instance("app")
    assert adopted["id"] == instance["id"]
    assert adopted["pid"] == instance["pid"]
    assert get_version(port) == "1"

    kinds = event_kinds(osvm)
    assert "daemon.restarting" in kinds
    started = [event for event in osvm.cli_events() if event["kind"] == "daemon.started"]
    assert "1 endpoint listening socket kept from the previous process" in started[-1]["reason"]


def test_sighup_keeps_unix_socket_endpoint(osvm: Osvm) -> None:
    path = osvm.base / "rpc.sock"
    port = free_port()
    deployment = write_deployment(osvm, port).read_text()
    deployment = deployment.replace(f'listen = "127.0.0.1:{port}"', f'listen = "unix:{path}"')
    osvm.up(osvm.write_deployment_text(deployment))
    before = osvm.ping()
    identity = os.stat(path).st_ino

    os.kill(osvm.daemon.pid, signal.SIGHUP)
    wait_for(lambda: (osvm.ping() or before)["started_at"] != before["started_at"], "the daemon to run again")

    # The same socket file, still served.
    assert os.stat(path).st_ino == identity
    result = osvm.cli("status", "--json")
    assert json.loads(result.stdout)["components"][0]["endpoint"]["listen"] == f"unix:{path}"
    reply = http_over_unix(path, "/version")
    assert reply.endswith(b"\r\n\r\n1"), reply


def http_over_unix(path: Path, target: str) -> bytes:
    """Send one GET with Connection: close to the Unix socket and return the whole response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(f"GET {target} HTTP/1.1\r\nHost: rpc\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def restarted(osvm: Osvm, before: dict) -> bool:
    ping = osvm.ping()
    return ping is not None and ping["started_at"] != before["started_at"]


def test_restart_ends_event_followers(osvm: Osvm) -> None:
    osvm.up(write_deployment(osvm, free_port()))
    follower = subprocess.Popen(
        [str(OSVM), "--state-dir", str(osvm.state_dir), "events", "-f", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: osvm.api().get("/v1/status").json()["components"], "the follower to start")
        # A follower kept the old control API open for two minutes before the fix; 20 s bounds a hang.
        result = osvm.cli("daemon-restart", "--timeout", "20", check=False)
        stdout, stderr = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert result.returncode == 0, result.stderr
    assert follower.returncode == 0, stderr
    assert "daemon.restarting" in stdout


def test_sighup_during_exec_is_ignored(osvm: Osvm) -> None:
    osvm.up(write_deployment(osvm, free_port()))
    before = osvm.ping()
    pid = osvm.daemon.pid

    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: osvm.ping() is None, "the control socket to go away for the restart")
    # Signals sent while the new process starts, before it installs its handler.
    while not restarted(osvm, before):
        os.kill(pid, signal.SIGHUP)
        assert osvm.daemon.poll() is None, f"the daemon died from SIGHUP:\n{osvm.log_tail()}"

    assert osvm.daemon.poll() is None
    assert osvm.ping()["pid"] == pid


def test_up_during_restart_starts_no_daemon(osvm: Osvm) -> None:
    path = write_deployment(osvm, free_port())
    osvm.up(path)
    before = osvm.ping()

    with osvm.api() as client:
        assert client.post("/v1/restart", json={}).status_code == 200
    result = osvm.cli("up", str(path), check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "started the osvm daemon" not in result.stdout
    wait_for(lambda: restarted(osvm, before), "the daemon to run again")
    assert osvm.ping()["pid"] == before["pid"]
    assert (osvm.state_dir / "daemon.pid").read_text().strip() == str(before["pid"])


def test_restart_refused_during_rollout(osvm: Osvm) -> None:
    osvm.up(write_deployment(osvm, free_port(), deadline="60s"))
    deploy = subprocess.Popen(
        [str(OSVM), "--state-dir", str(osvm.state_dir), "deploy", "app", "--set", "env.FAIL_HEALTH=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (osvm.component("app").get("rollout") or {}).get("state") == "verifying", "the rollout to verify")
        result = osvm.cli("daemon-restart", check=False)
    finally:
        deploy.terminate()
        deploy.wait()
    assert result.returncode != 0
    assert "in progress, which a restart rolls back" in result.stderr
    assert "--force" in result.stderr
    assert "daemon.restarting" not in event_kinds(osvm)


def test_installed_code_check_reports_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    assert asyncio.run(handover.check_installed_code()) == ""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    problem = asyncio.run(handover.check_installed_code())
    assert "failed" in problem
    assert "status 1" in problem


def test_restart_timeout_rejects_zero(osvm: Osvm) -> None:
    result = osvm.cli("daemon-restart", "--timeout", "0", check=False)
    assert result.returncode == 2
    assert "invalid number of seconds '0'" in result.stderr
    assert "daemon.restarting" not in event_kinds(osvm)
