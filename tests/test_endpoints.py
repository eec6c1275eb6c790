"""Tests of osvm.endpoints against real servers on 127.0.0.1.

Backends are aiohttp web servers, a raw asyncio TCP echo server and small hand-written HTTP
servers for failure cases. The checks wait for outcomes and counts with generous deadlines
and never compare measured times with thresholds.
"""

import asyncio
import contextlib
import inspect
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
import pytest
import uvloop
from aiohttp import web

from osvm.config.models import Endpoint as EndpointSpec
from osvm.endpoints import Backend, Endpoint, EndpointError
from osvm.endpoints import http as http_module
from osvm.endpoints import upstream as upstream_module

LOOPBACK = "127.0.0.1"
DEADLINE = 15.0


def make_spec(listen: str = f"{LOOPBACK}:0", **fields) -> EndpointSpec:
    """Build an endpoint spec. The model rejects port 0, so the listen address is set after validation."""
    return EndpointSpec(listen=f"{LOOPBACK}:1", **fields).model_copy(update={"listen": listen})


@contextlib.asynccontextmanager
async def running_endpoint(backends: list[Backend] = (), **fields) -> AsyncIterator[Endpoint]:
    endpoint = Endpoint("rpc", make_spec(**fields))
    await endpoint.start()
    endpoint.set_backends(list(backends))
    try:
        yield endpoint
    finally:
        await endpoint.stop()


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


async def wait_until(condition, message: str) -> None:
    """Poll condition() until it is true, failing after DEADLINE seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {message}")
        await asyncio.sleep(0.01)


def patterned_bytes(size: int) -> bytes:
    """Return size bytes of a repeating pattern whose period (251) is not a power of two."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def backend_entry(endpoint: Endpoint, instance_id: str) -> dict:
    """Return the describe() entry of an instance, from the current backends or the draining ones."""
    status = endpoint.describe()
    for entry in status["backends"] + status["draining"]:
        if entry["instance_id"] == instance_id:
            return entry
    raise AssertionError(f"instance {instance_id} is not in describe(): {endpoint.describe()}")


# --- backends ---------------------------------------------------------------------------------


class NamedBackend:
    """aiohttp server on 127.0.0.1 whose responses carry its name.

    Routes: /name, /echo (JSON of method, body and headers), /slow (waits for `release`),
    /status/{code}, /big/{size}, /stream (chunked), /empty (204) and /ws (WebSocket echo).
    """

    def __init__(self, name: str, sock: socket.socket | None = None) -> None:
        self.name = name
        self.release = asyncio.Event()
        self.slow_entered = 0
        self.port = 0
        # A listening socket to serve on instead of a new one on a free port.
        self.sock = sock
        self._runner: web.AppRunner | None = None

    @property
    def backend(self) -> Backend:
        return Backend(self.name, LOOPBACK, self.port)

    async def start(self) -> "NamedBackend":
        app = web.Application()
        app.router.add_route("*", "/name", self._name)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/big/{size}", self._big)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/empty", self._empty)
        app.router.add_get("/ws", self._websocket)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        if self.sock is not None:
            site: web.BaseSite = web.SockSite(self._runner, self.sock)
        else:
            site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _name(self, request: web.Request) -> web.Response:
        return web.Response(text=self.name)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "name": self.name,
            "method": request.method,
            "body": body.decode(),
            "headers": {name.lower(): value for name, value in request.headers.items()},
        })

    async def _slow(self, request: web.Request) -> web.Response:
        self.slow_entered += 1
        await self.release.wait()
        return web.Response(text=self.name)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text=self.name)

    async def _big(self, request: web.Request) -> web.Response:
        size = int(request.match_info["size"])
        return web.Response(body=patterned_bytes(size))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for index in range(5):
            await response.write(f"part{index};".encode())
        await response.write_eof()
        return response

    async def _empty(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        websocket = web.WebSocketResponse()
        await websocket.prepare(request)
        async for message in websocket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await websocket.send_str(f"{self.name}:{message.data}")
        return websocket


@contextlib.asynccontextmanager
async def named_backends(*names: str) -> AsyncIterator[list[NamedBackend]]:
    servers = [await NamedBackend(name).start() for name in names]
    try:
        yield servers
    finally:
        for server in servers:
            server.release.set()
            await server.stop()


class EchoServer:
    """TCP server that echoes bytes and, after the client's EOF, sends b"bye <name>" and closes."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    @property
    def backend(self) -> Backend:
        return Backend(self.name, LOOPBACK, self.port)

    async def start(self) -> "EchoServer":
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._handlers.add(asyncio.current_task())
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"bye " + self.name.encode())
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(asyncio.current_task())


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawHttpServer:
    """HTTP server that sends `response` to the first `answered` requests of each connection, then closes.

    It closes right after the last response when then_close is true. Otherwise it reads one more
    request and closes without responding. With answered=1 a pooled connection then fails on
    its first reuse before any response byte, as when a server closes an idle keep-alive
    connection just as the proxy reuses it. With answered=0 every request fails.
    """

    def __init__(self, answered: int, response: bytes = OK_RESPONSE, then_close: bool = False) -> None:
        self.answered = answered
        self.response = response
        self.then_close = then_close
        self.port = 0
        self.connections = 0
        # Requests read and then dropped by closing the connection.
        self.dropped = 0
        # Connections that the client closed while the server waited for a request.
        self.closed_by_client = 0
        self._server: asyncio.Server | None = None

    @property
    def backend(self) -> Backend:
        return Backend("raw", LOOPBACK, self.port)

    async def start(self) -> "RawHttpServer":
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(self.answered):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(self.response)
                await writer.drain()
            if not self.then_close:
                await reader.readuntil(b"\r\n\r\n")
                self.dropped += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()


async def raw_exchange(address: str, data: bytes) -> bytes:
    """Send bytes to address, then read until the other side closes."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


def http_client(endpoint: Endpoint, **options) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{endpoint.listen_address}", timeout=DEADLINE, **options)


# --- HTTP forwarding --------------------------------------------------------------------------


async def test_get_and_post_forwarded():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.get("/name")
            assert response.status_code == 200
            assert response.text == "a"

            response = await client.post("/echo", content=b"hello with length")
            assert response.status_code == 200
            assert response.json()["body"] == "hello with length"
            assert response.json()["method"] == "POST"

            async def chunks():
                yield b"hello "
                yield b"in chunks"

            response = await client.post("/echo", content=chunks())
            assert response.status_code == 200
            assert response.json()["body"] == "hello in chunks"


async def test_large_and_chunked_responses_streamed():
    size = 8 * 1024 * 1024
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.get(f"/big/{size}")
            assert response.status_code == 200
            assert len(response.content) == size
            assert response.content == patterned_bytes(size)

            response = await client.get("/stream")
            assert response.status_code == 200
            assert response.headers["transfer-encoding"] == "chunked"
            assert response.text == "part0;part1;part2;part3;part4;"


async def test_slow_reader_pauses_backend(monkeypatch):
    pauses = []
    pause_reading = upstream_module.UpstreamConnection.pause_reading

    def counting_pause_reading(self) -> None:
        pauses.append(self)
        pause_reading(self)

    monkeypatch.setattr(upstream_module.UpstreamConnection, "pause_reading", counting_pause_reading)
    size = 16 * 1024 * 1024
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        host, port = endpoint.listen_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=65536)
        try:
            writer.write(b"GET /big/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
            received = bytearray()
            while chunk := await asyncio.wait_for(reader.read(65536), DEADLINE):
                received += chunk
                await asyncio.sleep(0.001)
        finally:
            writer.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert len(body) == size
    assert body == patterned_bytes(size)
    assert pauses


async def test_head_and_204_have_no_body():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.head("/name")
            assert response.status_code == 200
            assert response.content == b""

            response = await client.get("/empty")
            assert response.status_code == 204
            assert response.content == b""

            # The connection still works after both.
            response = await client.get("/name")
            assert response.text == "a"


async def test_hop_by_hop_headers_removed():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.get(
                "/echo",
                headers={
                    "Connection": "keep-alive, X-Private",
                    "X-Private": "secret",
                    "Keep-Alive": "timeout=5",
                    "Proxy-Connection": "keep-alive",
                    "X-Forwarded-For": "10.0.0.1",
                    "X-Kept": "yes",
                },
            )
    headers = response.json()["headers"]
    assert "x-private" not in headers
    assert "keep-alive" not in headers
    assert "proxy-connection" not in headers
    assert headers["x-kept"] == "yes"
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


async def test_keep_alive_client_follows_switch():
    async with named_backends("a", "b") as (server_a, server_b), running_endpoint([server_a.backend]) as endpoint:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with http_client(endpoint, limits=limits) as client:
            for _ in range(3):
                response = await client.get("/name")
                assert response.text == "a"

            endpoint.set_backends([server_b.backend])
            for _ in range(3):
                response = await client.get("/name")
                assert response.text == "b"

            assert endpoint.describe()["client_connections"] == 1


async def test_switch_under_load_loses_no_request():
    # aiohttp's client, because httpx is much slower with many concurrent requests on one pool.
    total = 1000
    async with named_backends("a", "b") as (server_a, server_b), running_endpoint([server_a.backend]) as endpoint:
        outcomes: list[tuple[int, str, bool]] = []
        drained = asyncio.Event()
        drain_results: list[int] = []

        async def switch_and_retire_a() -> None:
            endpoint.set_backends([server_b.backend])
            drain_results.append(await endpoint.drain("a", DEADLINE))
            await server_a.stop()
            drained.set()

        connector = aiohttp.TCPConnector(limit=20)
        async with aiohttp.ClientSession(f"http://{endpoint.listen_address}", connector=connector) as session:
            switcher: list[asyncio.Task] = []
            indexes = iter(range(total))

            async def send_requests() -> None:
                for index in indexes:
                    started_after_drain = drained.is_set()
                    async with session.post("/echo", json={"index": index}) as response:
                        name = (await response.json())["name"] if response.status == 200 else ""
                        outcomes.append((response.status, name, started_after_drain))
                    if len(outcomes) == total // 4:
                        switcher.append(asyncio.create_task(switch_and_retire_a()))

            await asyncio.gather(*(send_requests() for _ in range(20)))
            await switcher[0]

    assert [status for status, _, _ in outcomes] == [200] * total
    assert drain_results == [0]
    names = {name for _, name, _ in outcomes}
    assert names == {"a", "b"}
    after_drain = [name for _, name, after in outcomes if after]
    assert after_drain
    assert set(after_drain) == {"b"}


async def test_request_waits_for_backend():
    async with named_backends("a") as (server,), running_endpoint([], queue_timeout=DEADLINE) as endpoint:
        async with http_client(endpoint) as client:
            pending = asyncio.create_task(client.get("/name"))
            await wait_until(lambda: endpoint.describe()["queued"] == 1, "the request waits for a backend")
            assert not pending.done()

            endpoint.set_backends([server.backend])
            response = await pending
            assert response.status_code == 200
            assert response.text == "a"
            assert endpoint.describe()["queued"] == 0


async def test_empty_set_gets_503_after_timeout():
    async with running_endpoint([], queue_timeout=0.2) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.get("/name")
            assert response.status_code == 503
            assert "no healthy instance of rpc" in response.json()["error"]

            # The connection stays usable once a backend exists.
            async with named_backends("a") as (server,):
                endpoint.set_backends([server.backend])
                response = await client.get("/name")
                assert response.status_code == 200
    assert endpoint.describe()["unavailable"] == 1


async def test_refused_backend_falls_through():
    dead = Backend("dead", LOOPBACK, free_port())
    async with named_backends("a") as (server,), running_endpoint([dead, server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            for _ in range(10):
                response = await client.get("/name")
                assert response.status_code == 200
                assert response.text == "a"

        dead_requests, dead_errors = endpoint.counts("dead")
        assert dead_errors >= 1
        assert dead_requests == dead_errors
        assert endpoint.counts("a") == (10, 0)


async def test_all_backends_refusing_gets_502():
    dead = Backend("dead", LOOPBACK, free_port())
    async with running_endpoint([dead], queue_timeout=0.3) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.get("/name")
    assert response.status_code == 502
    assert "refused" in response.json()["error"]
    requests, errors = endpoint.counts("dead")
    # The request tried the backend again after pauses until queue_timeout.
    assert requests == errors >= 2, (requests, errors)


@contextlib.contextmanager
def full_accept_queue() -> Iterator[socket.socket]:
    """Yield a listening socket on 127.0.0.1 whose accept queue is full, so the kernel drops new SYNs.

    QEMU's user network behaves so while a busy VM has not accepted, because it listens with a
    backlog of 1. Once something serves the socket, it accepts the queued connection first.
    """
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind((LOOPBACK, 0))
        # With backlog 0 the queue has room for one connection, and the filler takes it.
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener
    finally:
        filler.close()
        listener.close()


async def get_after_connect_failures(endpoint: Endpoint, failures: int, listen) -> httpx.Response:
    """Send GET /name, wait for `failures` failed connects to backend "a", then serve "a" on listen()'s socket."""
    async with http_client(endpoint) as client:
        request = asyncio.create_task(client.get("/name"))
        await wait_until(lambda: endpoint.counts("a")[1] >= failures, f"{failures} connects to backend a fail")
        assert not request.done()
        server = await NamedBackend("a", sock=listen()).start()
        try:
            return await request
        finally:
            await server.stop()


async def test_dropped_connect_retried_same_backend():
    with full_accept_queue() as listener:
        backend = Backend("a", LOOPBACK, listener.getsockname()[1])
        async with running_endpoint([backend], connect_timeout=0.2, queue_timeout=DEADLINE) as endpoint:
            response = await get_after_connect_failures(endpoint, 1, lambda: listener)
    assert response.status_code == 200, response.text
    assert response.text == "a"
    requests, errors = endpoint.counts("a")
    assert errors >= 1
    assert requests == errors + 1


async def test_request_waits_for_refused_backend():
    port = free_port()
    async with running_endpoint([Backend("a", LOOPBACK, port)], queue_timeout=DEADLINE) as endpoint:
        response = await get_after_connect_failures(endpoint, 2, lambda: socket.create_server((LOOPBACK, port)))
    assert response.status_code == 200, response.text
    assert response.text == "a"


async def test_stale_pooled_connection_retried():
    server = await RawHttpServer(answered=1).start()
    try:
        async with running_endpoint([server.backend]) as endpoint:
            async with http_client(endpoint) as client:
                for _ in range(5):
                    response = await client.get("/")
                    assert response.status_code == 200
                    assert response.text == "ok"
            # Each request after the first was dropped on its pooled connection, then retried once
            # on a new connection, which the next request reuses.
            assert server.dropped == 4
            assert server.connections == 5
            assert endpoint.counts("raw") == (5, 0)
    finally:
        await server.stop()


async def test_backend_dropping_request_gives_502():
    server = await RawHttpServer(answered=0).start()
    try:
        async with running_endpoint([server.backend]) as endpoint:
            async with http_client(endpoint) as client:
                response = await client.get("/")
            assert response.status_code == 502
            assert "instance raw failed" in response.json()["error"]
            # A request that fails on a new connection is not retried.
            assert server.dropped == 1
            assert server.connections == 1
            assert endpoint.counts("raw") == (1, 1)
    finally:
        await server.stop()


async def test_switch_closes_idle_pooled_connections():
    server = await RawHttpServer(answered=100).start()
    try:
        async with named_backends("b") as (server_b,), running_endpoint([server.backend]) as endpoint:
            async with http_client(endpoint) as client:
                assert (await client.get("/")).text == "ok"
                assert backend_entry(endpoint, "raw")["idle_connections"] == 1

                endpoint.set_backends([server_b.backend])
                await wait_until(lambda: server.closed_by_client == 1, "the pooled connection to raw is closed")
                assert (await client.get("/name")).text == "b"
    finally:
        await server.stop()


async def test_ipv6_listen_address():
    async with named_backends("a") as (server,), running_endpoint([server.backend], listen="[::1]:0") as endpoint:
        assert endpoint.listen_address.startswith("[::1]:")
        async with http_client(endpoint) as client:
            response = await client.get("/echo")
    assert response.status_code == 200
    assert response.json()["headers"]["x-forwarded-for"] == "::1"


async def test_5xx_counted_as_errors():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            for path in ("/status/500", "/status/503", "/status/404", "/name", "/status/502"):
                await client.get(path)
        assert endpoint.counts("a") == (5, 3)
        assert endpoint.counts("unknown") == (0, 0)


async def test_round_robin_distribution():
    async with named_backends("a", "b", "c") as servers:
        async with running_endpoint([server.backend for server in servers]) as endpoint:
            async with http_client(endpoint) as client:
                names = [(await client.get("/name")).text for _ in range(30)]
    assert names.count("a") == 10
    assert names.count("b") == 10
    assert names.count("c") == 10


async def test_least_connections_avoids_busy_backend():
    async with named_backends("a", "b") as (server_a, server_b):
        async with running_endpoint([server_a.backend], balance="least_connections") as endpoint:
            async with http_client(endpoint) as client:
                slow = asyncio.create_task(client.get("/slow"))
                await wait_until(lambda: server_a.slow_entered == 1, "the slow request reaches a")

                endpoint.set_backends([server_a.backend, server_b.backend])
                names = [(await client.get("/name")).text for _ in range(6)]
                assert names == ["b"] * 6

                server_a.release.set()
                assert (await slow).text == "a"
                names = [(await client.get("/name")).text for _ in range(6)]
                assert sorted(set(names)) == ["a", "b"]


async def test_pipelined_responses_in_order():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        data = request % (5, b"first") + request % (6, b"second")
        data += b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        output = await raw_exchange(endpoint.listen_address, data)
    assert output.count(b"HTTP/1.1 200 OK") == 3
    assert output.index(b'"body": "first"') < output.index(b'"body": "second"')
    assert output.endswith(b"\r\n\r\na")


async def test_expect_continue_sent_by_proxy():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        host, port = endpoint.listen_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n"
                b"Connection: close\r\n\r\n"
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"data")
            output = await asyncio.wait_for(reader.read(), DEADLINE)
        finally:
            writer.close()
    assert output.startswith(b"HTTP/1.1 200 OK")
    assert b'"body": "data"' in output


async def test_body_over_limit_gets_413(monkeypatch):
    monkeypatch.setattr(http_module, "MAX_REQUEST_BODY", 1024)
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            response = await client.post("/echo", content=b"x" * 2048)
            assert response.status_code == 413
            assert "larger than 1024 bytes" in response.json()["error"]

            async def chunks():
                for _ in range(4):
                    yield b"y" * 512

            response = await client.post("/echo", content=chunks())
            assert response.status_code == 413

            response = await client.post("/echo", content=b"z" * 1024)
            assert response.status_code == 200
    assert endpoint.counts("a") == (1, 0)


async def test_invalid_request_gets_400():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        output = await raw_exchange(endpoint.listen_address, b"NOT HTTP AT ALL\r\n\r\n")
    assert output.startswith(b"HTTP/1.1 400 Bad Request")
    assert b"Connection: close" in output
    assert b"invalid HTTP request" in output


async def test_client_half_close_gets_response():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        host, port = endpoint.listen_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /name HTTP/1.1\r\nHost: x\r\n\r\n")
            writer.write_eof()
            output = await asyncio.wait_for(reader.read(), DEADLINE)
        finally:
            writer.close()
    assert output.startswith(b"HTTP/1.1 200 OK")
    assert output.endswith(b"\r\n\r\na")


async def test_gzip_request_coding_gets_501():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        output = await raw_exchange(endpoint.listen_address, data)
    assert output.startswith(b"HTTP/1.1 501 Not Implemented")
    assert b"gzip, chunked" in output
    assert endpoint.counts("a") == (0, 0)


async def test_response_codings_kept_when_rechunked():
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    server = await RawHttpServer(answered=1, response=response).start()
    try:
        async with running_endpoint([server.backend]) as endpoint:
            output = await raw_exchange(endpoint.listen_address, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await server.stop()
    head, _, body = output.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: gzip, chunked" in head
    assert body == b"3\r\nabc\r\n0\r\n\r\n"


async def test_close_delimited_response_rechunked():
    server = await RawHttpServer(answered=1, response=b"HTTP/1.0 200 OK\r\n\r\nuntil close", then_close=True).start()
    try:
        async with running_endpoint([server.backend]) as endpoint:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with http_client(endpoint, limits=limits) as client:
                for _ in range(2):
                    response = await client.get("/")
                    assert response.status_code == 200
                    assert response.headers["transfer-encoding"] == "chunked"
                    assert response.text == "until close"
                # The client connection stays open although each upstream connection closed.
                assert endpoint.describe()["client_connections"] == 1
            assert server.connections == 2
    finally:
        await server.stop()


async def test_http10_client_gets_close():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        output = await raw_exchange(endpoint.listen_address, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = output.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in head
    assert b"Transfer-Encoding" not in head
    assert body == b"part0;part1;part2;part3;part4;"


async def test_h2c_upgrade_served_as_http11():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        data = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        output = await raw_exchange(endpoint.listen_address, data)
    assert output.count(b"HTTP/1.1 200 OK") == 2
    assert b'"body": "abc"' in output
    assert b"upgrade" not in output.split(b"\r\n\r\n")[1].lower()
    assert output.endswith(b"\r\n\r\na")


# --- drain ------------------------------------------------------------------------------------


async def test_drain_idle_returns_zero():
    async with named_backends("a", "b") as (server_a, server_b), running_endpoint([server_a.backend]) as endpoint:
        async with http_client(endpoint) as client:
            assert (await client.get("/name")).text == "a"
            endpoint.set_backends([server_b.backend])
            assert await endpoint.drain("a", 1.0) == 0
            assert await endpoint.drain("never-seen", 1.0) == 0
            assert (await client.get("/name")).text == "b"


async def test_drain_waits_for_in_flight_request():
    async with named_backends("a", "b") as (server_a, server_b), running_endpoint([server_a.backend]) as endpoint:
        async with http_client(endpoint) as client:
            slow = asyncio.create_task(client.get("/slow"))
            await wait_until(lambda: server_a.slow_entered == 1, "the slow request reaches a")
            endpoint.set_backends([server_b.backend])
            status = endpoint.describe()
            assert [entry["instance_id"] for entry in status["backends"]] == ["b"]
            assert [entry["instance_id"] for entry in status["draining"]] == ["a"]
            assert backend_entry(endpoint, "a")["in_flight"] == 1
            assert backend_entry(endpoint, "a")["current"] is False

            drain = asyncio.create_task(endpoint.drain("a", DEADLINE))
            await asyncio.sleep(0.05)
            assert not drain.done()

            server_a.release.set()
            response = await slow
            assert response.status_code == 200
            assert response.text == "a"
            assert await drain == 0
            assert endpoint.describe()["draining"] == []


async def test_drain_closes_request_past_timeout():
    async with named_backends("a", "b") as (server_a, server_b), running_endpoint([server_a.backend]) as endpoint:
        async with http_client(endpoint) as client:
            slow = asyncio.create_task(client.get("/slow"))
            await wait_until(lambda: server_a.slow_entered == 1, "the slow request reaches a")
            endpoint.set_backends([server_b.backend])

            assert await endpoint.drain("a", 0.2) == 1
            response = await slow
            assert response.status_code == 502
            assert "drained" in response.json()["error"]
            assert (await client.get("/name")).text == "b"
        # A drained request is counted but is not an error of the instance.
        assert endpoint.counts("a") == (1, 0)


# --- WebSocket --------------------------------------------------------------------------------


async def test_websocket_pinned_until_drain():
    async with named_backends("a", "b") as (server_a, server_b), running_endpoint([server_a.backend]) as endpoint:
        async with aiohttp.ClientSession() as session:
            websocket = await session.ws_connect(f"http://{endpoint.listen_address}/ws")
            await websocket.send_str("one")
            assert await asyncio.wait_for(websocket.receive_str(), DEADLINE) == "a:one"
            assert backend_entry(endpoint, "a")["long_lived"] == 1

            endpoint.set_backends([server_b.backend])
            await websocket.send_str("two")
            assert await asyncio.wait_for(websocket.receive_str(), DEADLINE) == "a:two"
            async with session.get(f"http://{endpoint.listen_address}/name") as response:
                assert await response.text() == "b"

            assert await endpoint.drain("a", 0.2) == 1
            message = await asyncio.wait_for(websocket.receive(), DEADLINE)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            assert backend_entry(endpoint, "b")["long_lived"] == 0
            await websocket.close()


async def test_rejected_websocket_keeps_connection():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        data = (
            b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        output = await raw_exchange(endpoint.listen_address, data)
    assert output.count(b"HTTP/1.1 200 OK") == 2
    assert output.endswith(b"\r\n\r\na")


# --- TCP mode ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_servers(*names: str) -> AsyncIterator[list[EchoServer]]:
    async with echo_servers_on(*((name, 0) for name in names)) as servers:
        yield servers


@contextlib.asynccontextmanager
async def echo_servers_on(*names_and_ports: tuple[str, int]) -> AsyncIterator[list[EchoServer]]:
    """Echo servers with the given names on the given ports of 127.0.0.1, 0 for a free one."""
    servers = [await EchoServer(name, port).start() for name, port in names_and_ports]
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def open_client(endpoint: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = endpoint.listen_address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_tcp_forwards_bytes_and_eof():
    async with echo_servers("a") as (server,), running_endpoint([server.backend], mode="tcp") as endpoint:
        reader, writer = await open_client(endpoint)
        try:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), DEADLINE) == b"ping"
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b"bye a"
        finally:
            writer.close()
        assert endpoint.counts("a") == (1, 0)


async def test_tcp_drain_closes_after_timeout():
    async with echo_servers("a", "b") as (server_a, server_b):
        async with running_endpoint([server_a.backend], mode="tcp") as endpoint:
            reader, writer = await open_client(endpoint)
            try:
                writer.write(b"x")
                assert await asyncio.wait_for(reader.readexactly(1), DEADLINE) == b"x"
                endpoint.set_backends([server_b.backend])
                assert backend_entry(endpoint, "a")["long_lived"] == 1

                assert await endpoint.drain("a", 0.2) == 1
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            finally:
                writer.close()

            reader, writer = await open_client(endpoint)
            try:
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b"bye b"
            finally:
                writer.close()
            assert await endpoint.drain("b", 1.0) == 0


async def test_tcp_refused_backend_falls_through():
    dead = Backend("dead", LOOPBACK, free_port())
    async with echo_servers("a") as (server,), running_endpoint([dead, server.backend], mode="tcp") as endpoint:
        for _ in range(4):
            reader, writer = await open_client(endpoint)
            try:
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b"bye a"
            finally:
                writer.close()
        assert endpoint.counts("a") == (4, 0)
        dead_requests, dead_errors = endpoint.counts("dead")
        assert dead_errors >= 1
        assert dead_requests == dead_errors


async def test_tcp_waits_for_refused_backend():
    port = free_port()
    async with running_endpoint([Backend("a", LOOPBACK, port)], mode="tcp", queue_timeout=DEADLINE) as endpoint:
        reader, writer = await open_client(endpoint)
        try:
            writer.write(b"early")
            await wait_until(lambda: endpoint.counts("a")[1] >= 2, "the connection retries the refusing backend")
            async with echo_servers_on(("a", port)):
                assert await asyncio.wait_for(reader.readexactly(5), DEADLINE) == b"early"
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b"bye a"
        finally:
            writer.close()


async def test_tcp_no_backend_closes_connection():
    async with running_endpoint([], mode="tcp", queue_timeout=0.2) as endpoint:
        reader, writer = await open_client(endpoint)
        try:
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        finally:
            writer.close()
        assert endpoint.describe()["unavailable"] == 1


async def test_tcp_connection_waits_for_backend():
    async with echo_servers("a") as (server,), running_endpoint([], mode="tcp", queue_timeout=DEADLINE) as endpoint:
        reader, writer = await open_client(endpoint)
        try:
            writer.write(b"early")
            await wait_until(lambda: endpoint.describe()["queued"] == 1, "the connection waits for a backend")
            endpoint.set_backends([server.backend])
            assert await asyncio.wait_for(reader.readexactly(5), DEADLINE) == b"early"
        finally:
            writer.close()


# --- listener ---------------------------------------------------------------------------------


async def test_unix_socket_listener(tmp_path):
    path = str(tmp_path / "rpc.sock")
    # A socket file left behind by a process that exited.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()

    async with named_backends("a") as (server,):
        async with running_endpoint([server.backend], listen=f"unix:{path}") as endpoint:
            assert endpoint.listen_address == f"unix:{path}"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            transport = httpx.AsyncHTTPTransport(uds=path)
            async with httpx.AsyncClient(transport=transport, base_url="http://endpoint", timeout=DEADLINE) as client:
                response = await client.get("/echo")
            assert response.status_code == 200
            assert "x-forwarded-for" not in response.json()["headers"]

            second = Endpoint("other", make_spec(listen=f"unix:{path}"))
            with pytest.raises(EndpointError, match="is in use: stop what listens there"):
                await second.start()
            assert os.path.exists(path)
        assert not os.path.exists(path)


async def test_address_in_use_raises():
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        port = sock.getsockname()[1]
        endpoint = Endpoint("rpc", make_spec(listen=f"{LOOPBACK}:{port}"))
        with pytest.raises(EndpointError) as raised:
            await endpoint.start()
    assert str(raised.value) == (
        f"address {LOOPBACK}:{port} is in use: stop what listens there or choose another endpoint.listen"
    )


@pytest.mark.parametrize("listen", ["nonsense", "unix:relative.sock", f"{LOOPBACK}:99999"])
async def test_invalid_listen_address_raises(listen):
    endpoint = Endpoint("rpc", make_spec(listen=listen))
    with pytest.raises(EndpointError, match="invalid listen"):
        await endpoint.start()


async def test_released_listener_serves_next_endpoint():
    async with named_backends("a") as (server,):
        old = Endpoint("rpc", make_spec())
        await old.start()
        old.set_backends([server.backend])
        async with http_client(old) as client:
            first = await client.get("/name")
            assert first.headers.get("connection") != "close"

            descriptor = old.release_listener()
            # The pooled connection's next request still gets a response, with "Connection: close".
            second = await client.get("/name")
            assert second.status_code == 200
            assert second.headers["connection"] == "close"
            finishing = asyncio.create_task(old.finish_clients(DEADLINE))

            # A new connection waits in the accept queue until the next endpoint accepts it.
            third = asyncio.create_task(client.get("/name"))
            await asyncio.sleep(0.2)
            assert not third.done()
            following = Endpoint("rpc", make_spec(listen=old.listen_address))
            await following.start(socket.socket(fileno=descriptor))
            try:
                following.set_backends([server.backend])
                response = await third
                await finishing
            finally:
                await following.stop()
    assert response.status_code == 200
    assert response.text == "a"
    assert following.listen_address == old.listen_address
    assert old.clients == set()


async def test_release_answers_queued_request_at_once():
    async with running_endpoint([], queue_timeout=DEADLINE) as endpoint:
        async with http_client(endpoint) as client:
            request = asyncio.create_task(client.get("/name"))
            await wait_until(lambda: endpoint.describe()["queued"] == 1, "the request waits for a backend")
            descriptor = endpoint.release_listener()
            try:
                response = await request
            finally:
                os.close(descriptor)
    assert response.status_code == 503
    assert "when the daemon restarted" in response.json()["error"]
    assert response.headers["connection"] == "close"


async def test_released_listener_completes_started_response():
    head_sent = asyncio.Event()
    finish = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send /held's head and half its body, and the rest once `finish` is set. Respond "ok" to other requests."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /held "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nhe")
                    await writer.drain()
                    head_sent.set()
                    await finish.wait()
                    writer.write(b"ld")
                else:
                    writer.write(OK_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    backend = Backend("a", LOOPBACK, server.sockets[0].getsockname()[1])
    try:
        async with running_endpoint([backend]) as endpoint:
            async with http_client(endpoint) as client:
                held_request = asyncio.create_task(client.get("/held"))
                await asyncio.wait_for(head_sent.wait(), DEADLINE)
                await wait_until(
                    lambda: any(connection.upstream is not None and connection.upstream.headers_done for connection in endpoint.clients),
                    "the head reaches the client",
                )
                descriptor = endpoint.release_listener()
                finishing = asyncio.create_task(endpoint.finish_clients(DEADLINE))
                finish.set()
                first = await held_request
                # The head announced keep-alive, so the connection stays for one more request.
                second = await client.get("/other")
                await finishing
            os.close(descriptor)
    finally:
        server.close()
        await server.wait_closed()
    assert first.status_code == 200
    assert first.text == "held"
    assert first.headers.get("connection") != "close"
    assert second.status_code == 200
    assert second.headers["connection"] == "close"


async def test_stop_closes_client_connections():
    async with echo_servers("a") as (server,):
        endpoint = Endpoint("rpc", make_spec(mode="tcp"))
        await endpoint.start()
        endpoint.set_backends([server.backend])
        reader, writer = await open_client(endpoint)
        try:
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), DEADLINE) == b"x"
            await endpoint.stop()
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        finally:
            writer.close()
        with pytest.raises(OSError):
            await open_client(endpoint)


async def test_stop_ends_in_flight_request():
    async with named_backends("a") as (server,):
        endpoint = Endpoint("rpc", make_spec())
        await endpoint.start()
        endpoint.set_backends([server.backend])
        async with http_client(endpoint) as client:
            slow = asyncio.create_task(client.get("/slow"))
            await wait_until(lambda: server.slow_entered == 1, "the slow request reaches a")
            await endpoint.stop()
            response = await slow
    assert response.status_code == 502
    assert response.json()["error"] == "the endpoint of rpc is stopping"
    assert response.headers["connection"] == "close"


async def test_describe_reports_state():
    async with named_backends("a") as (server,), running_endpoint([server.backend]) as endpoint:
        async with http_client(endpoint) as client:
            await client.get("/name")
            await client.get("/status/500")
        await wait_until(lambda: endpoint.describe()["client_connections"] == 0, "the proxy sees the client close")
        status = endpoint.describe()
    assert status["component"] == "rpc"
    assert status["listen"] == endpoint.listen_address
    assert status["mode"] == "http"
    assert status["balance"] == "round_robin"
    assert status["queued"] == 0
    assert status["draining"] == []
    assert status["unavailable"] == 0
    assert status["backends"] == [{
        "instance_id": "a",
        "address": f"{LOOPBACK}:{server.port}",
        "current": True,
        "in_flight": 0,
        "long_lived": 0,
        "idle_connections": 1,
        "requests": 2,
        "errors": 1,
    }]


# --- uvloop ---------------------------------------------------------------------------------

# Fixtures that test_under_uvloop passes on. Tests with other parameters run on asyncio only.
UVLOOP_FIXTURES = {"tmp_path", "monkeypatch"}
ASYNC_TESTS = [
    function for name, function in sorted(globals().items())
    if name.startswith("test_")
    and inspect.iscoroutinefunction(function)
    and set(inspect.signature(function).parameters) <= UVLOOP_FIXTURES
]


@pytest.mark.parametrize("scenario", ASYNC_TESTS, ids=lambda function: function.__name__)
def test_under_uvloop(scenario, tmp_path, monkeypatch):
    """Run each async test above again on a uvloop event loop, which the daemon uses where available."""
    fixtures = {"tmp_path": tmp_path, "monkeypatch": monkeypatch}
    arguments = {name: fixtures[name] for name in inspect.signature(scenario).parameters}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        runner.run(scenario(**arguments))
