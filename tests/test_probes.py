"""Tests of osvm.probes against real servers and processes on 127.0.0.1.

The servers are hand-written HTTP/1.1 and TCP listeners started by each test. Intervals
are short so the tests run fast, but the checks wait for states and counts with generous
deadlines and never compare measured times with thresholds.
"""

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import sys
import types
from typing import Any, Callable

import httpx
import pytest

from osvm.config.models import ExecProbe, HttpProbe, JsonRpcProbe, SolanaProbe, TcpProbe
from osvm.probes import (
    HEALTHY,
    STARTING,
    UNHEALTHY,
    HealthMonitor,
    InvalidJsonRpcResponse,
    JsonRpcCallError,
    JsonRpcError,
    ProbeResult,
    ProbeTarget,
    get_slot,
    run_probe,
)
from osvm.probes import monitor as monitor_module

LOOPBACK = "127.0.0.1"
FAST = {"interval": 0.05, "startup_interval": 0.05}
DEADLINE = 15.0

Handler = Callable[[str, str, dict[str, str], bytes], Any]


# --- servers ----------------------------------------------------------------------------------


class StubHttpServer:
    """HTTP/1.1 server on 127.0.0.1 that responds to every request with `handler`, then closes the connection.

    `handler(method, path, headers, body)` returns (status, body text) or (status, body text,
    content type), or an awaitable of one. Tests replace `handler` while the server runs.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> "StubHttpServer":
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def count(self, method: str, path: str) -> int:
        return sum(1 for request in self.requests if request[0] == method and request[1] == path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            self.requests.append((method, path, headers, body))

            response = self.handler(method, path, headers, body)
            if inspect.isawaitable(response):
                response = await response
            status, text, *rest = response
            content_type = rest[0] if rest else "text/plain"

            payload = text.encode()
            head_lines = [
                f"HTTP/1.1 {status} Stub",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(payload)}",
                "Connection: close",
            ]
            writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode())
            if method != "HEAD":
                writer.write(payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._connections.discard(task)


class SolanaStandIn:
    """Stand-in for a Solana RPC node: GET /health, and the getHealth and getSlot methods on POST /."""

    def __init__(self) -> None:
        self.health_status = 200
        self.health_body = "ok"
        # ("result", value) or ("error", error object) for getHealth.
        self.get_health: tuple[str, Any] = ("result", "ok")
        self.slot: Any = 1234
        # Error object that getSlot returns instead of the slot, when set.
        self.slot_error: dict[str, Any] | None = None

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, str]:
        if method == "GET" and path == "/health":
            return self.health_status, self.health_body, "text/plain"
        if method != "POST" or path != "/":
            return 404, "not found", "text/plain"

        request = json.loads(body)
        if request["method"] == "getHealth":
            kind, value = self.get_health
        elif request["method"] == "getSlot" and self.slot_error is not None:
            kind, value = "error", self.slot_error
        elif request["method"] == "getSlot":
            kind, value = "result", self.slot
        else:
            kind, value = "error", {"code": -32601, "message": "Method not found"}
        response = {"jsonrpc": "2.0", "id": request["id"], kind: value}
        return 200, json.dumps(response), "application/json"


def jsonrpc_handler(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, str]:
    """JSON-RPC server: eth_blockNumber returns "0x10", broken_json returns non-JSON, anything else an error."""
    request = json.loads(body)
    if request["method"] == "eth_blockNumber":
        return 200, json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": "0x10"}), "application/json"
    if request["method"] == "broken_json":
        return 200, "<html>gateway</html>", "text/html"
    if request["method"] == "server_error":
        error = {"code": -32000, "message": "header not found", "data": {"block": "latest"}}
        return 500, json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}), "application/json"
    if request["method"] == "no_result":
        return 200, json.dumps({"jsonrpc": "2.0", "id": request["id"]}), "application/json"
    error = {"code": -32601, "message": "Method not found"}
    return 200, json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}), "application/json"


@pytest.fixture
async def http_server():
    """Start a StubHttpServer whose /health returns 200 "ok" until the test replaces the handler."""
    server = await StubHttpServer(lambda method, path, headers, body: (200, "ok")).start()
    yield server
    await server.stop()


@pytest.fixture
async def solana():
    stand_in = SolanaStandIn()
    server = await StubHttpServer(stand_in.handle).start()
    yield stand_in, server
    await server.stop()


@pytest.fixture
async def jsonrpc_server():
    server = await StubHttpServer(jsonrpc_handler).start()
    yield server
    await server.stop()


@pytest.fixture
async def tcp_listener():
    """Start a TCP listener that accepts and closes connections, and return its port."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, LOOPBACK, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
def closed_port() -> int:
    """Return a loopback port that was just free and that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# --- helpers ----------------------------------------------------------------------------------


def target_for(**ports: int) -> ProbeTarget:
    return ProbeTarget(host=LOOPBACK, ports=dict(ports))


async def wait_until(condition: Callable[[], bool], description: str, timeout: float = DEADLINE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {description}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(monitor: HealthMonitor):
    task = asyncio.create_task(monitor.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ChangeRecorder:
    """on_change callback that records every call, optionally with a value sampled at that moment."""

    def __init__(self, sample: Callable[[], Any] | None = None) -> None:
        self.changes: list[tuple[str, str, str, bool]] = []
        self.samples: list[Any] = []
        self._sample = sample

    def __call__(self, old_state: str, new_state: str, reason: str, liveness_failed: bool) -> None:
        self.changes.append((old_state, new_state, reason, liveness_failed))
        if self._sample is not None:
            self.samples.append(self._sample())


def process_is_running(pid: int) -> bool:
    """Return whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat = stat_file.read()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


async def run_probe_within(probe: Any, target: ProbeTarget, deadline: float = 30.0) -> ProbeResult:
    """Run the probe, and fail the test when it has not returned within `deadline` seconds.

    Exec tests start a background `sleep 600`, so a probe that waits for it instead of killing
    it fails here.
    """
    try:
        return await asyncio.wait_for(run_probe(probe, target), deadline)
    except TimeoutError:
        raise AssertionError(f"run_probe did not return within {deadline}s") from None


def read_pids(path: str) -> list[int]:
    with open(path) as pid_file:
        return [int(line) for line in pid_file.read().split()]


# --- http -------------------------------------------------------------------------------------


async def test_http_status_200_passes(http_server):
    probe = HttpProbe(type="http", port="web", path="/health")

    result = await run_probe(probe, target_for(web=http_server.port))

    assert result.ok, result.detail
    assert result.detail == f"HTTP 200 from GET http://127.0.0.1:{http_server.port}/health"
    assert result.duration >= 0
    assert http_server.count("GET", "/health") == 1


async def test_http_status_503_fails(http_server):
    http_server.handler = lambda method, path, headers, body: (503, "overloaded")
    probe = HttpProbe(type="http", port=http_server.port, path="/health")

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert f"HTTP 503 from GET http://127.0.0.1:{http_server.port}/health" in result.detail
    assert "200 to 399" in result.detail
    assert "'overloaded'" in result.detail


async def test_http_redirect_passes_without_following(http_server):
    http_server.handler = lambda method, path, headers, body: (301, "")
    probe = HttpProbe(type="http", port=http_server.port, path="/old")

    result = await run_probe(probe, target_for())

    assert result.ok, result.detail
    assert http_server.count("GET", "/old") == 1
    assert len(http_server.requests) == 1


async def test_http_expect_status_list(http_server):
    probe = HttpProbe(type="http", port=http_server.port, expect_status=[204, 202])

    result = await run_probe(probe, target_for())
    assert not result.ok
    assert "HTTP 200" in result.detail
    assert "expected 204 or 202" in result.detail

    http_server.handler = lambda method, path, headers, body: (202, "")
    result = await run_probe(probe, target_for())
    assert result.ok, result.detail


async def test_http_body_contains(http_server):
    http_server.handler = lambda method, path, headers, body: (200, '{"status": "degraded"}')
    passing = HttpProbe(type="http", port=http_server.port, body_contains="degraded")
    failing = HttpProbe(type="http", port=http_server.port, body_contains='"status": "up"')

    passed = await run_probe(passing, target_for())
    failed = await run_probe(failing, target_for())

    assert passed.ok, passed.detail
    assert not failed.ok
    assert "does not contain" in failed.detail
    assert "degraded" in failed.detail


async def test_http_method_headers_and_path(http_server):
    probe = HttpProbe(type="http", port=http_server.port, method="POST", path="/check", headers={"X-Token": "abc"})

    result = await run_probe(probe, target_for())

    assert result.ok, result.detail
    method, path, headers, _body = http_server.requests[0]
    assert method == "POST"
    assert path == "/check"
    assert headers["x-token"] == "abc"


async def test_http_head_request(http_server):
    probe = HttpProbe(type="http", port=http_server.port, method="HEAD")

    result = await run_probe(probe, target_for())

    assert result.ok, result.detail
    assert http_server.count("HEAD", "/") == 1


async def test_http_connection_refused(closed_port):
    probe = HttpProbe(type="http", port=closed_port, path="/health")

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert result.detail == f"connection refused on 127.0.0.1:{closed_port}"


async def test_http_timeout(http_server):
    release = asyncio.Event()

    async def hang(method, path, headers, body):
        await release.wait()
        return 200, "late"

    http_server.handler = hang
    probe = HttpProbe(type="http", port=http_server.port, path="/slow", timeout=0.2)

    result = await run_probe(probe, target_for())
    release.set()

    assert not result.ok
    assert "timed out after 200ms" in result.detail
    assert f"GET http://127.0.0.1:{http_server.port}/slow" in result.detail


async def test_http_ignores_proxy_environment(http_server, closed_port, monkeypatch):
    proxy = f"http://127.0.0.1:{closed_port}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    probe = HttpProbe(type="http", port=http_server.port, path="/health")

    result = await run_probe(probe, target_for())

    assert result.ok, result.detail
    assert http_server.count("GET", "/health") == 1


async def test_unknown_port_name_fails():
    probe = HttpProbe(type="http", port="rpc")

    result = await run_probe(probe, target_for(metrics=9100))

    assert not result.ok
    assert "'rpc'" in result.detail
    assert "metrics" in result.detail


async def test_unallocated_port_fails():
    probe = TcpProbe(type="tcp", port="rpc")

    result = await run_probe(probe, target_for(rpc=0))

    assert not result.ok
    assert "no number allocated" in result.detail


async def test_run_probe_turns_errors_into_results():
    unknown_type = types.SimpleNamespace(type="carrier-pigeon", timeout=1.0)
    missing_fields = types.SimpleNamespace(type="http", timeout=1.0, port=1)

    unknown_result = await run_probe(unknown_type, target_for())
    internal_result = await run_probe(missing_fields, target_for())

    assert not unknown_result.ok
    assert "unknown probe type 'carrier-pigeon'" in unknown_result.detail
    assert not internal_result.ok
    assert "internal error" in internal_result.detail
    assert "AttributeError" in internal_result.detail


# --- jsonrpc ----------------------------------------------------------------------------------


async def test_jsonrpc_result_passes(jsonrpc_server):
    probe = JsonRpcProbe(type="jsonrpc", port="rpc", method="eth_blockNumber", params=["latest"])

    result = await run_probe(probe, target_for(rpc=jsonrpc_server.port))

    assert result.ok, result.detail
    assert result.detail == 'eth_blockNumber returned "0x10"'
    request = json.loads(jsonrpc_server.requests[0][3])
    assert request["jsonrpc"] == "2.0"
    assert request["method"] == "eth_blockNumber"
    assert request["params"] == ["latest"]
    assert isinstance(request["id"], int)
    assert jsonrpc_server.requests[0][2]["content-type"] == "application/json"


async def test_jsonrpc_expect_result(jsonrpc_server):
    matching = JsonRpcProbe(type="jsonrpc", port=jsonrpc_server.port, method="eth_blockNumber", expect_result="0x10")
    other = JsonRpcProbe(type="jsonrpc", port=jsonrpc_server.port, method="eth_blockNumber", expect_result="0x11")

    passed = await run_probe(matching, target_for())
    failed = await run_probe(other, target_for())

    assert passed.ok, passed.detail
    assert not failed.ok
    assert failed.detail == 'eth_blockNumber returned "0x10", expected "0x11"'


async def test_jsonrpc_error_fails_with_code(jsonrpc_server):
    probe = JsonRpcProbe(type="jsonrpc", port=jsonrpc_server.port, method="eth_nothing")

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert result.detail == "eth_nothing returned JSON-RPC error -32601: Method not found"


async def test_jsonrpc_error_with_http_500(jsonrpc_server):
    probe = JsonRpcProbe(type="jsonrpc", port=jsonrpc_server.port, method="server_error")

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert "-32000: header not found" in result.detail
    assert '{"block":"latest"}' in result.detail


async def test_jsonrpc_invalid_responses(jsonrpc_server):
    not_json = JsonRpcProbe(type="jsonrpc", port=jsonrpc_server.port, method="broken_json")
    no_result = JsonRpcProbe(type="jsonrpc", port=jsonrpc_server.port, method="no_result")

    not_json_result = await run_probe(not_json, target_for())
    no_result_result = await run_probe(no_result, target_for())

    assert not not_json_result.ok
    assert "not JSON" in not_json_result.detail
    assert "gateway" in not_json_result.detail
    assert not no_result_result.ok
    assert "neither result nor error" in no_result_result.detail


async def test_jsonrpc_connection_refused(closed_port):
    probe = JsonRpcProbe(type="jsonrpc", port=closed_port, method="eth_blockNumber")

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert result.detail == f"connection refused on 127.0.0.1:{closed_port}"


# --- solana -----------------------------------------------------------------------------------


async def test_solana_ok_passes(solana):
    stand_in, server = solana
    probe = SolanaProbe(type="solana", port="rpc")

    result = await run_probe(probe, target_for(rpc=server.port))

    assert result.ok, result.detail
    assert server.count("GET", "/health") == 1
    assert server.count("POST", "/") == 1
    assert json.loads(server.requests[1][3])["method"] == "getHealth"


@pytest.mark.parametrize("body", ["behind", "unknown", "behind { distance: 150 }", ""])
async def test_solana_health_body_not_ok_fails(solana, body):
    stand_in, server = solana
    stand_in.health_body = body
    probe = SolanaProbe(type="solana", port=server.port)

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert f"body {body!r}" in result.detail
    assert "is not 'ok'" in result.detail
    assert server.count("POST", "/") == 0


async def test_solana_health_ok_with_whitespace_passes(solana):
    stand_in, server = solana
    stand_in.health_body = "ok\n"
    probe = SolanaProbe(type="solana", port=server.port, get_health=False)

    result = await run_probe(probe, target_for())

    assert result.ok, result.detail


async def test_solana_health_status_503_fails(solana):
    stand_in, server = solana
    stand_in.health_status = 503
    probe = SolanaProbe(type="solana", port=server.port)

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert "HTTP 503" in result.detail


async def test_solana_get_health_behind_fails(solana):
    stand_in, server = solana
    stand_in.get_health = (
        "error",
        {"code": -32005, "message": "Node is behind by 42 slots", "data": {"numSlotsBehind": 42}},
    )
    probe = SolanaProbe(type="solana", port=server.port)

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert result.detail.startswith("node is behind by 42 slots: ")
    assert "-32005: Node is behind by 42 slots" in result.detail


async def test_solana_get_health_unknown_fails(solana):
    stand_in, server = solana
    stand_in.get_health = ("error", {"code": -32005, "message": "Node is unhealthy", "data": {}})
    probe = SolanaProbe(type="solana", port=server.port)

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert result.detail.startswith("node is unhealthy: ")


async def test_solana_get_health_other_error_fails(solana):
    stand_in, server = solana
    stand_in.get_health = ("error", {"code": -32601, "message": "Method not found"})
    probe = SolanaProbe(type="solana", port=server.port)

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert result.detail == "getHealth returned JSON-RPC error -32601: Method not found"


async def test_solana_get_health_other_result(solana):
    stand_in, server = solana
    stand_in.get_health = ("result", "degraded")
    probe = SolanaProbe(type="solana", port=server.port)

    result = await run_probe(probe, target_for())

    assert not result.ok
    assert '"degraded"' in result.detail


async def test_solana_get_health_disabled(solana):
    stand_in, server = solana
    stand_in.get_health = ("error", {"code": -32005, "message": "Node is unhealthy"})
    probe = SolanaProbe(type="solana", port=server.port, get_health=False)

    result = await run_probe(probe, target_for())

    assert result.ok, result.detail
    assert server.count("POST", "/") == 0


async def test_get_slot_returns_slot(solana):
    stand_in, server = solana
    stand_in.slot = 987654

    slot = await get_slot(LOOPBACK, server.port)
    confirmed = await get_slot(LOOPBACK, server.port, commitment="confirmed")

    assert slot == 987654
    assert confirmed == 987654
    last_request = json.loads(server.requests[-1][3])
    assert last_request["method"] == "getSlot"
    assert last_request["params"] == [{"commitment": "confirmed"}]


async def test_get_slot_errors(solana, closed_port):
    stand_in, server = solana

    stand_in.slot = "soon"
    with pytest.raises(InvalidJsonRpcResponse, match="expected a slot number"):
        await get_slot(LOOPBACK, server.port)

    with pytest.raises(InvalidJsonRpcResponse, match="HTTP 404"):
        await get_slot(LOOPBACK, server.port, path="/missing")

    stand_in.slot_error = {"code": -32004, "message": "Block not available"}
    with pytest.raises(JsonRpcError) as error_info:
        await get_slot(LOOPBACK, server.port)
    assert error_info.value.code == -32004
    assert error_info.value.message == "Block not available"

    with pytest.raises(JsonRpcCallError, match=f"connection refused on 127.0.0.1:{closed_port}"):
        await get_slot(LOOPBACK, closed_port)


async def test_get_slot_timeout(http_server):
    release = asyncio.Event()

    async def hang(method, path, headers, body):
        await release.wait()
        return 200, "{}"

    http_server.handler = hang
    with pytest.raises(JsonRpcCallError, match="timed out after 200ms"):
        await get_slot(LOOPBACK, http_server.port, timeout=0.2)
    release.set()


# --- tcp --------------------------------------------------------------------------------------


async def test_tcp_listener_passes(tcp_listener):
    probe = TcpProbe(type="tcp", port="redis")

    result = await run_probe(probe, target_for(redis=tcp_listener))

    assert result.ok, result.detail
    assert result.detail == f"connected to 127.0.0.1:{tcp_listener}"


async def test_tcp_closed_port_fails(closed_port):
    probe = TcpProbe(type="tcp", port="redis")

    result = await run_probe(probe, target_for(redis=closed_port))

    assert not result.ok
    assert result.detail == f"connection refused on 127.0.0.1:{closed_port}"


# --- exec -------------------------------------------------------------------------------------


async def test_exec_true_passes():
    result = await run_probe(ExecProbe(type="exec", command=["true"]), target_for())

    assert result.ok, result.detail
    assert result.detail == "exit status 0 from true"


async def test_exec_false_fails():
    result = await run_probe(ExecProbe(type="exec", command=["false"]), target_for())

    assert not result.ok
    assert result.detail == "exit status 1 from false"


async def test_exec_detail_has_last_output_line():
    # tr makes the output differ from the command text, which the detail also contains.
    command = ["sh", "-c", "echo first | tr a-z A-Z; echo last | tr a-z A-Z >&2; exit 3"]

    result = await run_probe(ExecProbe(type="exec", command=command), target_for())

    assert not result.ok
    assert result.detail.startswith("exit status 3 from sh -c")
    assert result.detail.endswith(": LAST")
    assert "FIRST" not in result.detail


async def test_exec_long_output_line_is_cut():
    command = [sys.executable, "-c", "print('x' * 5000)"]

    result = await run_probe(ExecProbe(type="exec", command=command), target_for())

    assert result.ok, result.detail
    assert ": " + "x" * 200 + "..." in result.detail
    assert "x" * 201 not in result.detail


async def test_exec_killed_by_signal():
    command = ["sh", "-c", "kill -TERM $$"]

    result = await run_probe(ExecProbe(type="exec", command=command), target_for())

    assert not result.ok
    assert "killed by signal SIGTERM" in result.detail


async def test_exec_missing_command_fails():
    command = ["/nonexistent/osvm-probe-command"]

    result = await run_probe(ExecProbe(type="exec", command=command), target_for())

    assert not result.ok
    assert "cannot run /nonexistent/osvm-probe-command" in result.detail


async def test_exec_prefix_and_env():
    target = ProbeTarget(host=LOOPBACK, ports={}, exec_prefix=("env", "FROM_PREFIX=1"), env={"EXTRA": "yes"})
    command = ["sh", "-c", 'test "$FROM_PREFIX" = 1 && test "$EXTRA" = yes']

    with_target = await run_probe(ExecProbe(type="exec", command=command), target)
    without_target = await run_probe(ExecProbe(type="exec", command=command), target_for())

    assert with_target.ok, with_target.detail
    assert not without_target.ok


async def test_exec_timeout_kills_process_group(tmp_path):
    pid_file = tmp_path / "pids"
    # The shell records its own pid and that of a background sleep, then waits for it.
    script = 'sleep 600 & echo $! > "$1"; echo $$ >> "$1"; wait'
    probe = ExecProbe(type="exec", command=["sh", "-c", script, "sh", str(pid_file)], timeout=0.5)

    result = await run_probe_within(probe, target_for())

    assert not result.ok
    assert "timed out after 500ms" in result.detail
    assert "process group was killed" in result.detail
    pids = read_pids(str(pid_file))
    assert len(pids) == 2
    for pid in pids:
        await wait_until(lambda: not process_is_running(pid), f"process {pid} stopped")


async def test_exec_kills_background_children_after_exit(tmp_path):
    pid_file = tmp_path / "pids"
    script = 'sleep 600 & echo $! > "$1"'
    probe = ExecProbe(type="exec", command=["sh", "-c", script, "sh", str(pid_file)], timeout=20)

    result = await run_probe_within(probe, target_for())

    assert result.ok, result.detail
    [background_pid] = read_pids(str(pid_file))
    await wait_until(lambda: not process_is_running(background_pid), f"background process {background_pid} stopped")


async def test_exec_cancel_kills_process(tmp_path):
    pid_file = tmp_path / "pids"
    script = 'echo $$ > "$1"; exec sleep 600'
    probe = ExecProbe(type="exec", command=["sh", "-c", script, "sh", str(pid_file)], timeout=600)

    task = asyncio.create_task(run_probe(probe, target_for()))
    await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "pid file written")
    task.cancel()
    done, _pending = await asyncio.wait([task], timeout=30)
    assert task in done, "run_probe did not return within 30s of cancellation"
    assert task.cancelled()

    [pid] = read_pids(str(pid_file))
    await wait_until(lambda: not process_is_running(pid), f"process {pid} stopped")


# --- HealthMonitor ----------------------------------------------------------------------------


async def test_monitor_healthy_after_success_threshold(http_server):
    probe = HttpProbe(type="http", port="web", path="/health", success_threshold=3, **FAST)
    recorder = ChangeRecorder(sample=lambda: http_server.count("GET", "/health"))
    monitor = HealthMonitor([probe], target_for(web=http_server.port), recorder)

    assert monitor.state == STARTING
    async with running(monitor):
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy")

    assert len(recorder.changes) == 1
    old_state, new_state, reason, liveness_failed = recorder.changes[0]
    assert (old_state, new_state) == (STARTING, HEALTHY)
    assert reason == "probe http GET /health on port web passed 3 times in a row"
    assert liveness_failed is False
    assert recorder.samples[0] >= 3


async def test_monitor_reason_for_single_pass(jsonrpc_server):
    probe = JsonRpcProbe(type="jsonrpc", port="rpc", method="eth_blockNumber", **FAST)
    recorder = ChangeRecorder()
    monitor = HealthMonitor([probe], target_for(rpc=jsonrpc_server.port), recorder)

    async with running(monitor):
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy")

    assert recorder.changes == [
        (STARTING, HEALTHY, "probe jsonrpc eth_blockNumber on port rpc passed 1 time", False)
    ]


async def test_monitor_unhealthy_then_recovers(http_server):
    failing = {"value": False}
    failed_requests = {"count": 0}

    def handler(method, path, headers, body):
        if failing["value"]:
            failed_requests["count"] += 1
            return 503, "overloaded"
        return 200, "ok"

    http_server.handler = handler
    probe = HttpProbe(type="http", port="web", path="/health", failure_threshold=3, **FAST)
    recorder = ChangeRecorder(sample=lambda: failed_requests["count"])
    monitor = HealthMonitor([probe], target_for(web=http_server.port), recorder)

    async with running(monitor):
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy")
        failing["value"] = True
        await wait_until(lambda: monitor.state == UNHEALTHY, "state unhealthy")
        failing["value"] = False
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy again")

    assert [change[:2] for change in recorder.changes] == [
        (STARTING, HEALTHY),
        (HEALTHY, UNHEALTHY),
        (UNHEALTHY, HEALTHY),
    ]
    unhealthy_reason = recorder.changes[1][2]
    assert unhealthy_reason.startswith("probe http GET /health on port web failed 3 times in a row: HTTP 503")
    assert recorder.samples[1] >= 3
    assert recorder.changes[1][3] is False
    assert recorder.changes[2][2] == "probe http GET /health on port web passed 1 time"


async def test_monitor_tcp_failure_reason(closed_port):
    probe = TcpProbe(type="tcp", port="redis", failure_threshold=3, **FAST)
    recorder = ChangeRecorder()
    monitor = HealthMonitor([probe], target_for(redis=closed_port), recorder)

    async with running(monitor):
        await wait_until(lambda: monitor.state == UNHEALTHY, "state unhealthy")

    assert recorder.changes == [
        (
            STARTING,
            UNHEALTHY,
            f"probe tcp on port redis failed 3 times in a row: connection refused on 127.0.0.1:{closed_port}",
            False,
        )
    ]
    assert monitor.last_results[0].ok is False
    assert monitor.describe()[0]["consecutive_failures"] >= 3


async def test_monitor_startup_grace(closed_port):
    now = {"value": 0.0}
    probe = TcpProbe(type="tcp", port="redis", failure_threshold=2, startup_grace=100.0, **FAST)
    recorder = ChangeRecorder()
    monitor = HealthMonitor(
        [probe], target_for(redis=closed_port), recorder, started_at=0.0, clock=lambda: now["value"]
    )

    async with running(monitor):
        await wait_until(lambda: monitor.describe()[0]["runs"] >= 6, "six probe runs")
        assert monitor.state == STARTING
        assert recorder.changes == []
        assert monitor.describe()[0]["consecutive_failures"] == 0

        now["value"] = 100.5
        await wait_until(lambda: monitor.state == UNHEALTHY, "state unhealthy after grace")

    assert len(recorder.changes) == 1
    assert recorder.changes[0][:2] == (STARTING, UNHEALTHY)
    assert "failed 2 times in a row" in recorder.changes[0][2]


async def test_monitor_liveness_flag(closed_port):
    probe = TcpProbe(type="tcp", port="redis", failure_threshold=2, liveness=True, **FAST)
    recorder = ChangeRecorder()
    monitor = HealthMonitor([probe], target_for(redis=closed_port), recorder)

    async with running(monitor):
        await wait_until(lambda: monitor.state == UNHEALTHY, "state unhealthy")

    assert len(recorder.changes) == 1
    assert recorder.changes[0][:2] == (STARTING, UNHEALTHY)
    assert recorder.changes[0][3] is True


async def test_monitor_liveness_failure_while_unhealthy(http_server, closed_port):
    failing = {"value": False}
    http_server.handler = lambda method, path, headers, body: (503, "down") if failing["value"] else (200, "ok")
    readiness = TcpProbe(type="tcp", port="redis", failure_threshold=1, **FAST)
    liveness = HttpProbe(type="http", port="web", path="/live", failure_threshold=2, liveness=True, **FAST)
    recorder = ChangeRecorder()
    target = target_for(redis=closed_port, web=http_server.port)
    monitor = HealthMonitor([readiness, liveness], target, recorder)

    async with running(monitor):
        await wait_until(lambda: monitor.state == UNHEALTHY, "state unhealthy from the tcp probe")
        await wait_until(lambda: monitor.describe()[1]["state"] == HEALTHY, "liveness probe passed")
        failing["value"] = True
        await wait_until(lambda: len(recorder.changes) == 2, "second on_change call")

    assert recorder.changes[0][:2] == (STARTING, UNHEALTHY)
    assert recorder.changes[0][3] is False
    assert recorder.changes[1][:2] == (UNHEALTHY, UNHEALTHY)
    assert recorder.changes[1][2].startswith("probe http GET /live on port web failed 2 times in a row")
    assert recorder.changes[1][3] is True


async def test_monitor_waits_for_all_probes(http_server, tcp_listener):
    ready = {"value": False}
    http_server.handler = lambda method, path, headers, body: (200, "ok") if ready["value"] else (503, "loading")
    fast = TcpProbe(type="tcp", port="redis", **FAST)
    slow = HttpProbe(type="http", port="web", path="/ready", failure_threshold=100, **FAST)
    recorder = ChangeRecorder()
    monitor = HealthMonitor([fast, slow], target_for(redis=tcp_listener, web=http_server.port), recorder)

    async with running(monitor):
        await wait_until(lambda: monitor.describe()[0]["state"] == HEALTHY, "tcp probe passed")
        await wait_until(lambda: monitor.describe()[1]["runs"] >= 3, "three runs of the http probe")
        assert monitor.state == STARTING
        ready["value"] = True
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy")

    assert recorder.changes == [(STARTING, HEALTHY, "probe http GET /ready on port web passed 1 time", False)]


async def test_monitor_back_to_starting():
    # The tcp probe fails past its threshold while the http probe has not passed yet. When the
    # tcp probe recovers, the state is "starting" again because the http probe is still waiting.
    # The results are recorded directly, so the monitor does not run.
    tcp = TcpProbe(type="tcp", port="redis", failure_threshold=1)
    http = HttpProbe(type="http", port="web", path="/ready")
    recorder = ChangeRecorder()
    monitor = HealthMonitor([tcp, http], target_for(redis=6379, web=8080), recorder)

    monitor.record_result(0, ProbeResult(ok=False, detail="connection refused", duration=0.0))
    monitor.record_result(0, ProbeResult(ok=True, detail="connected", duration=0.0))

    assert monitor.state == STARTING
    assert [change[:2] for change in recorder.changes] == [(STARTING, UNHEALTHY), (UNHEALTHY, STARTING)]
    assert recorder.changes[1][2] == (
        "probe tcp on port redis passed 1 time, but probe http GET /ready on port web has not passed yet"
    )


async def test_monitor_startup_interval_then_interval(http_server):
    passing = {"value": False}
    http_server.handler = lambda method, path, headers, body: (200, "ok") if passing["value"] else (503, "loading")
    probe = HttpProbe(
        type="http", port="web", path="/health", startup_interval=0.05, interval=1000, failure_threshold=100
    )
    monitor = HealthMonitor([probe], target_for(web=http_server.port), ChangeRecorder())

    async with running(monitor):
        await wait_until(lambda: http_server.count("GET", "/health") >= 5, "five runs at startup_interval")
        passing["value"] = True
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy")
        runs_when_healthy = monitor.describe()[0]["runs"]
        await asyncio.sleep(0.5)
        runs_later = monitor.describe()[0]["runs"]

    assert runs_later == runs_when_healthy


async def test_monitor_without_probes_is_healthy():
    recorder = ChangeRecorder()
    monitor = HealthMonitor([], target_for(), recorder)

    assert monitor.state == HEALTHY
    async with running(monitor) as task:
        await asyncio.sleep(0.1)
        assert not task.done()

    assert monitor.describe() == []
    assert recorder.changes == [(STARTING, HEALTHY, "no probes are configured", False)]


async def test_monitor_describe(closed_port):
    probe = TcpProbe(type="tcp", port="redis", failure_threshold=2, liveness=True, **FAST)
    monitor = HealthMonitor([probe], target_for(redis=closed_port), ChangeRecorder())

    [before] = monitor.describe()
    assert before["state"] == STARTING
    assert before["detail"] is None
    assert before["runs"] == 0

    async with running(monitor):
        await wait_until(lambda: monitor.state == UNHEALTHY, "state unhealthy")

    [entry] = monitor.describe()
    assert entry["index"] == 0
    assert entry["type"] == "tcp"
    assert entry["probe"] == "tcp on port redis"
    assert entry["liveness"] is True
    assert entry["state"] == UNHEALTHY
    assert entry["ok"] is False
    assert entry["detail"] == f"connection refused on 127.0.0.1:{closed_port}"
    assert entry["consecutive_successes"] == 0
    assert entry["consecutive_failures"] >= 2
    assert entry["runs"] >= 2
    json.dumps(monitor.describe())


async def test_monitor_survives_failing_callback(http_server, caplog):
    def failing_callback(old_state, new_state, reason, liveness_failed):
        raise RuntimeError("callback bug")

    probe = HttpProbe(type="http", port="web", path="/health", **FAST)
    monitor = HealthMonitor([probe], target_for(web=http_server.port), failing_callback)

    with caplog.at_level(logging.ERROR, logger="osvm.probes"):
        async with running(monitor) as task:
            await wait_until(lambda: monitor.state == HEALTHY, "state healthy")
            runs = monitor.describe()[0]["runs"]
            await wait_until(lambda: monitor.describe()[0]["runs"] > runs + 2, "probe keeps running")
            assert not task.done()

    assert any("on_change callback failed" in record.getMessage() for record in caplog.records)


async def test_monitor_logs_state_changes_only(http_server, caplog):
    probe = HttpProbe(type="http", port="web", path="/health", **FAST)
    instance_logger = logging.getLogger("osvm.probes.test-instance")
    monitor = HealthMonitor([probe], target_for(web=http_server.port), ChangeRecorder(), logger=instance_logger)

    with caplog.at_level(logging.INFO, logger="osvm.probes"):
        async with running(monitor):
            await wait_until(lambda: monitor.state == HEALTHY, "state healthy")
            runs = monitor.describe()[0]["runs"]
            await wait_until(lambda: monitor.describe()[0]["runs"] > runs + 3, "more probe runs")

    records = [record for record in caplog.records if record.name.startswith("osvm.probes")]
    messages = [record.getMessage() for record in records if record.levelno >= logging.INFO]
    assert messages == ["health changed from starting to healthy: probe http GET /health on port web passed 1 time"]
    assert records[-1].name == "osvm.probes.test-instance"


async def test_monitor_closes_http_client(http_server, monkeypatch):
    clients: list[httpx.AsyncClient] = []
    original = monitor_module.new_http_client

    def tracking_client() -> httpx.AsyncClient:
        client = original()
        clients.append(client)
        return client

    monkeypatch.setattr(monitor_module, "new_http_client", tracking_client)
    probe = HttpProbe(type="http", port="web", path="/health", **FAST)
    monitor = HealthMonitor([probe], target_for(web=http_server.port), ChangeRecorder())

    async with running(monitor):
        await wait_until(lambda: monitor.state == HEALTHY, "state healthy")
        assert len(clients) == 1
        assert not clients[0].is_closed

    assert clients[0].is_closed
