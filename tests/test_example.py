"""End-to-end: the bundled example examples/local-rpc.toml, with a real ganache and a real Redis."""

import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from e2e import Osvm, http_request

pytestmark = pytest.mark.root


def eth_block_number(port: int) -> dict:
    call = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}
    status, body = http_request(f"http://127.0.0.1:{port}/", call)
    assert status == 200
    return json.loads(body)


def redis_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(64)


def test_example_comes_up(example_file: Path, osvm: Osvm):
    result = osvm.up(example_file)

    assert "cache: revision 1 created" in result.stdout
    assert "rpc: revision 1 created" in result.stdout

    status = osvm.cli_json("status")
    assert status["daemon"]["isolated"] is True
    assert status["daemon"]["state_dir"] == str(osvm.state_dir)
    components = {component["name"]: component for component in status["components"]}
    assert sorted(components) == ["cache", "indexer", "rpc"]
    for name, component in components.items():
        assert component["status"] == "running", name
        assert len(component["instances"]) == 1, name
        instance = component["instances"][0]
        assert instance["state"] == "running", name
        assert instance["health"] == "healthy", name
        assert instance["isolated"] is True, name
        assert instance["pid"], name

    rpc_port = components["rpc"]["instances"][0]["ports"]["rpc"]
    reply = eth_block_number(rpc_port)
    assert reply["id"] == 1
    assert "error" not in reply
    assert reply["result"].startswith("0x")

    redis_port = components["cache"]["instances"][0]["ports"]["redis"]
    assert redis_ping(redis_port).startswith(b"+PONG")

    # depends_on: rpc started only after cache became healthy.
    events = osvm.cli_events()
    cache_healthy = [event for event in events if event["component"] == "cache" and event["kind"] == "instance.healthy"]
    rpc_started = [event for event in events if event["component"] == "rpc" and event["kind"] == "instance.started"]
    rpc_waiting = [event for event in events if event["component"] == "rpc" and event["kind"] == "component.waiting"]
    assert len(cache_healthy) == 1
    assert len(rpc_started) == 1
    assert cache_healthy[0]["id"] < rpc_started[0]["id"]
    assert [event["reason"] for event in rpc_waiting] == ["waiting for cache to become healthy"]
    assert "probe tcp on port redis passed" in cache_healthy[0]["reason"]

    # The indexer reaches the node through the mTLS endpoint with its own certificate.
    deadline = time.monotonic() + 60
    output = ""
    while time.monotonic() < deadline and '"result":"0x' not in output:
        output = osvm.cli("logs", "indexer").stdout
        time.sleep(1)
    assert '"result":"0x' in output

    # Without a client certificate the endpoint closes the connection and records the reason.
    context = ssl.create_default_context(cafile=str(tls_dir(osvm, components["indexer"]) / "ca.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", 8545), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="rpc") as connection:
                connection.sendall(b"GET / HTTP/1.1\r\nHost: rpc\r\n\r\n")
                if not connection.recv(1024):
                    raise ConnectionResetError("closed by the endpoint")
    deadline = time.monotonic() + 30
    refused = []
    while time.monotonic() < deadline and not refused:
        refused = [event for event in osvm.cli_events() if event["kind"] == "endpoint.refused"]
        time.sleep(0.5)
    assert "no client certificate" in refused[0]["reason"]

    # The policy explains itself: only the indexer may reach the node.
    allowed = osvm.cli("policy", "check", "indexer", "rpc", "rpc", check=False)
    denied = osvm.cli("policy", "check", "cache", "rpc", "rpc", check=False)
    assert allowed.returncode == 0
    assert 'allow[0] from "indexer" to "rpc"' in allowed.stdout
    assert denied.returncode == 1
    assert "default deny" in denied.stdout


def tls_dir(osvm: Osvm, component: dict) -> Path:
    return osvm.state_dir / "data" / component["instances"][0]["id"] / "tls"
