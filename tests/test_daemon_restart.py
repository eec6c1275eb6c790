"""`osvm daemon-restart` and SIGHUP: the daemon executes itself again while its endpoints keep serving."""

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from e2e import Osvm, free_port, wait_for
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
    assert "1 endpoint listening sockets kept from the previous process" in started[-1]["reason"]


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
