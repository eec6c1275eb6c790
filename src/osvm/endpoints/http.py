"""HTTP mode: parse client requests with httptools and forward each one to a backend.

A client connection forwards one request at a time and queues the rest, so pipelined requests
get their responses in order. Every request picks a backend from the current set, which moves
keep-alive clients to new backends at request boundaries.

A request that finds a backend and an idle pooled connection is sent from the parser callback
and finished from the upstream connection's callbacks, without a task. Waiting for a backend,
connecting and retrying run in a task per request.
"""

import asyncio
import json
from collections import deque
from typing import TYPE_CHECKING

import httptools

from osvm.endpoints.backends import Backend, BackendChoice, BackendState
from osvm.endpoints.tunnel import Tunnel, TunnelEnd, set_nodelay
from osvm.endpoints.upstream import FAILED, RESPONSE_DONE, UPGRADED, UpstreamConnection

if TYPE_CHECKING:
    from osvm.endpoints.endpoint import Endpoint

# Request bodies are buffered so a request can be retried on another connection. Larger bodies
# get 413. Tests lower this limit through the module attribute.
MAX_REQUEST_BODY = 64 * 1024 * 1024
# Pipelined requests parsed ahead of the one being forwarded. Reading pauses at this count.
MAX_QUEUED_REQUESTS = 16
# Bytes a client may send after a WebSocket upgrade request before the backend's response.
MAX_HELD_BYTES = 1024 * 1024
# After rejecting a request whose body may still be arriving, the proxy half-closes, discards
# what arrives for up to this many seconds and then closes. Closing a socket that still
# receives data makes the kernel send a reset, which destroys the response at the client.
LINGER_TIME = 2.0

# Request headers that the proxy drops or rewrites: hop-by-hop headers, which apply to one
# connection only, and the framing and forwarding headers that the proxy sets itself.
REQUEST_HEADERS_REWRITTEN = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"content-length", b"expect", b"x-forwarded-for",
))
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_EXCLUSIONS: frozenset[BackendState] = frozenset()
REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}


class _StopParsing(Exception):
    """Raised in a parser callback to stop parsing after the request was rejected."""


class HttpRequest:
    """A parsed client request, with its head already encoded for the backend."""

    __slots__ = (
        "method", "url", "headers", "head", "has_host", "body", "body_size", "has_body", "chunked",
        "content_length", "unsupported_coding", "http10", "keep_alive", "is_head", "websocket",
        "expect_continue", "rejection",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # Request line and headers for the backend, without Content-Length and the final CRLF.
        self.head = b""
        self.has_host = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.has_body = False
        self.chunked = False
        self.content_length = 0
        # A Transfer-Encoding with codings other than chunked, such as b"gzip, chunked".
        self.unsupported_coding = b""
        self.http10 = False
        self.keep_alive = False
        self.is_head = False
        self.websocket = False
        self.expect_continue = False
        # (status, message) for a request that the proxy responds to itself instead of forwarding.
        self.rejection: tuple[int, str] | None = None

    def encode(self, backend: Backend) -> bytes:
        """Encode the request for the backend, with Content-Length for the buffered body."""
        parts = [self.head]
        if not self.has_host:
            # HTTP/1.1 requires Host, and an HTTP/1.0 client may omit it.
            parts.append(b"Host: %s\r\n" % backend.address.encode())
        if self.has_body:
            parts.append(b"Content-Length: %d\r\n" % self.body_size)
        parts.append(b"\r\n")
        parts += self.body
        return b"".join(parts)


def encode_error(request: HttpRequest, status: int, message: str, keep_alive: bool) -> bytes:
    """Encode a response with a JSON body {"error": message}."""
    body = json.dumps({"error": message}).encode()
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
    ]
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif request.http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not request.is_head:
        parts.append(body)
    return b"".join(parts)


class HttpClientProtocol(asyncio.Protocol):
    """A client connection in HTTP mode.

    NOTE: there is no idle timeout for client connections and no timeout for a response,
    because JSON-RPC calls may run long. Only the client, drain() or stop() ends them.
    """

    __slots__ = (
        "endpoint", "transport", "parser", "client_ip", "queue", "request", "last_request", "continuation",
        "skip_head", "stopped_parsing", "hold", "reading_paused", "task", "busy", "current", "state",
        "reused", "retried", "pending_continue", "closed", "closing", "client_eof", "upgraded",
        "write_paused", "upstream", "drained", "linger_timer", "idle_since",
    )

    def __init__(self, endpoint: "Endpoint") -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""

        self.queue: deque[HttpRequest] = deque()
        # The request being parsed, and the one parsed last.
        self.request: HttpRequest | None = None
        self.last_request: HttpRequest | None = None
        # An upgrade request whose body follows; see _on_upgrade_request().
        self.continuation: HttpRequest | None = None
        self.skip_head = False
        self.stopped_parsing = False
        # Bytes received after a WebSocket upgrade request, kept until the backend responds.
        self.hold: bytearray | None = None
        self.reading_paused = False

        # The task that waits for a backend or connects for the current request, if any.
        self.task: asyncio.Task[None] | None = None
        # Whether a request is in progress: `current`, on backend `state` once one is chosen.
        self.busy = False
        self.current: HttpRequest | None = None
        self.state: BackendState | None = None
        # Whether the current request went out on a pooled connection, and whether it is the
        # one retry on a new connection after a pooled connection failed.
        self.reused = False
        self.retried = False
        # A request with "Expect: 100-continue" that waits for earlier responses before the 100.
        self.pending_continue: HttpRequest | None = None

        self.closed = False
        # Whether the proxy closed the connection, which may still be flushing its last response.
        self.closing = False
        # Whether the client half-closed its side. It still gets the responses to its requests.
        self.client_eof = False
        self.upgraded = False
        self.write_paused = False
        # The upstream connection of the exchange in progress.
        self.upstream: UpstreamConnection | None = None
        self.drained = False
        self.linger_timer: asyncio.TimerHandle | None = None
        # Loop time when the connection was opened or, during a daemon restart, last finished a response.
        self.idle_since = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.idle_since = self.endpoint.loop.time()
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = peer[0].encode()
        self.endpoint.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.linger_timer is not None:
            return
        if self.hold is not None:
            self.hold += data
            if len(self.hold) >= MAX_HELD_BYTES:
                self._update_reading()
            return
        if not self.stopped_parsing:
            self._feed(data)

    def eof_received(self) -> bool:
        if self.linger_timer is not None:
            return False
        self.client_eof = True
        # Keep the transport open for writing while requests wait for their responses.
        return self.busy or bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.endpoint.clients.discard(self)
        upstream = self.upstream
        if upstream is not None and not upstream.result:
            upstream.abort("the client closed the connection")
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        if self.linger_timer is not None:
            self.linger_timer.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- used by the endpoint ---------------------------------------------------------------

    def close_for_drain(self) -> None:
        """Fail the exchange in progress, whose backend is being drained."""
        self.drained = True
        upstream = self.upstream
        if upstream is not None and not upstream.result:
            upstream.abort("the instance was drained before the response was complete")

    def close_after_response(self) -> None:
        """Make the next response that starts on this connection carry "Connection: close" and end it.

        A response whose head already went out with keep-alive completes as announced, and the
        connection then waits for the client's next request, which gets the closing response.
        """
        if self.current is not None:
            self.current.keep_alive = False
        for request in self.queue:
            request.keep_alive = False
        self.idle_since = self.endpoint.loop.time()

    def close_for_stop(self) -> "asyncio.Task[None] | None":
        """Cancel the request's task, close the connection and return the task for the caller to await."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        if self.busy:
            # A response in progress cannot be completed, so its buffered bytes are discarded.
            self.transport.abort()
        else:
            self.transport.close()
        return task

    # --- parsing ----------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade_request(data[exc.args[0]:])
        except httptools.HttpParserCallbackError:
            if not self.stopped_parsing:
                # A callback failed for a reason other than _StopParsing: a bug in this module.
                self.endpoint.logger.exception("endpoint %s: failed to parse a request", self.endpoint.component)
                self.transport.abort()
        except httptools.HttpParserError as exc:
            request = HttpRequest()
            self._reject(request, 400, f"invalid HTTP request: {exc}")

    def on_message_begin(self) -> None:
        if self.continuation is not None:
            self.request = self.continuation
            return
        self.request = HttpRequest()

    def on_url(self, url: bytes) -> None:
        if not self.skip_head:
            self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.skip_head:
            self.request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.skip_head:
            self.skip_head = False
            return
        request = self.request
        parser = self.parser
        method = parser.get_method()
        request.method = method
        request.http10 = parser.get_http_version() == "1.0"
        request.keep_alive = parser.should_keep_alive() and not self.endpoint.handing_over
        request.is_head = method == b"HEAD"
        self._encode_head(request)

        if method == b"CONNECT":
            request.rejection = (405, "CONNECT is not supported: this endpoint forwards HTTP requests")
            request.keep_alive = False
        elif request.unsupported_coding:
            # The proxy forwards the decoded body with Content-Length, which would drop the coding.
            coding = request.unsupported_coding.decode("latin-1")
            self._reject(request, 501, f"Transfer-Encoding {coding!r} is not supported: send the body chunked or with Content-Length")
            raise _StopParsing
        elif request.content_length > MAX_REQUEST_BODY:
            self._reject(request, 413, f"the request body is larger than {MAX_REQUEST_BODY} bytes")
            raise _StopParsing
        elif request.expect_continue and not request.http10:
            if self.busy or self.queue:
                self.pending_continue = request
            else:
                self.transport.write(CONTINUE_RESPONSE)

    def on_body(self, body: bytes) -> None:
        request = self.request
        request.body_size += len(body)
        if request.body_size > MAX_REQUEST_BODY:
            self._reject(request, 413, f"the request body is larger than {MAX_REQUEST_BODY} bytes")
            raise _StopParsing
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.request
        self.request = None
        self.last_request = request
        if self.continuation is request:
            self.continuation = None
        elif request.has_body and self.parser.should_upgrade() and not request.websocket and request.rejection is None:
            # llhttp stops before the body of an upgrade request. _on_upgrade_request() parses it.
            self.continuation = request
            return
        if self.pending_continue is request:
            self.pending_continue = None
        self._enqueue(request)

    def _encode_head(self, request: HttpRequest) -> None:
        """Encode the request line and headers for the backend, and read the framing headers."""
        forwarded_for = None
        upgrade = None
        options: set[bytes] | None = None
        parts = [request.method, b" ", request.url, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            lowered = name.lower()
            if lowered not in REQUEST_HEADERS_REWRITTEN:
                if lowered == b"host":
                    request.has_host = True
                parts += (name, b": ", value, b"\r\n")
            elif lowered == b"content-length":
                # llhttp has validated the value.
                request.has_body = True
                request.content_length = int(value)
            elif lowered == b"transfer-encoding":
                request.has_body = True
                request.chunked = True
                if value.strip().lower() != b"chunked":
                    request.unsupported_coding = value
            elif lowered == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")} - CONNECTION_OPTIONS
                if tokens:
                    options = tokens if options is None else options | tokens
            elif lowered == b"expect":
                request.expect_continue = value.strip().lower() == b"100-continue"
            elif lowered == b"upgrade":
                upgrade = value
            elif lowered == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value

        if options:
            # Headers named in Connection apply to this connection only.
            parts = parts[:4]
            for name, value in request.headers:
                lowered = name.lower()
                if lowered not in REQUEST_HEADERS_REWRITTEN and lowered not in options:
                    parts += (name, b": ", value, b"\r\n")

        request.websocket = (
            upgrade is not None
            and request.method == b"GET"
            and self.parser.should_upgrade()
            and b"websocket" in upgrade.lower()
        )
        if request.websocket:
            parts += (b"Upgrade: ", upgrade, b"\r\nConnection: Upgrade\r\n")
        if self.client_ip:
            forwarded_for = self.client_ip if forwarded_for is None else forwarded_for + b", " + self.client_ip
        if forwarded_for is not None:
            parts += (b"X-Forwarded-For: ", forwarded_for, b"\r\n")
        request.head = b"".join(parts)

    def _on_upgrade_request(self, leftover: bytes) -> None:
        """Continue after an upgrade request, at which llhttp stops parsing.

        A WebSocket request is forwarded and the bytes after it wait for the backend's response.
        Other upgrades, such as h2c, are not supported: the request is served as plain HTTP/1.1
        without its Upgrade header, and parsing continues with a new parser.
        """
        request = self.continuation or self.last_request
        self.parser = httptools.HttpRequestParser(self)
        if request is None or request.rejection is not None:
            self._stop_parsing()
            return
        if request.websocket:
            self.hold = bytearray(leftover)
            self._update_reading()
            return

        if self.continuation is not None:
            # Feed a request head with the same framing, so httptools parses the body that
            # follows. The callbacks skip this head and add the body to the pending request.
            if request.chunked:
                framing = b"Transfer-Encoding: chunked"
            else:
                framing = b"Content-Length: %d" % request.content_length
            self.skip_head = True
            self._feed(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        if leftover:
            self._feed(leftover)

    def _release_hold(self) -> None:
        """Parse the bytes held after a WebSocket request whose upgrade did not happen."""
        held_bytes = self.hold
        self.hold = None
        self._update_reading()
        if held_bytes and not self.stopped_parsing:
            self._feed(bytes(held_bytes))

    def _reject(self, request: HttpRequest, status: int, message: str) -> None:
        """Queue a response by the proxy itself, then close the connection after it."""
        request.rejection = (status, message)
        request.keep_alive = False
        self._stop_parsing()
        self._enqueue(request)

    def _stop_parsing(self) -> None:
        self.stopped_parsing = True
        self._update_reading()

    def _enqueue(self, request: HttpRequest) -> None:
        self.queue.append(request)
        if len(self.queue) >= MAX_QUEUED_REQUESTS:
            self._update_reading()
        if not self.busy:
            self._dispatch()

    def _update_reading(self) -> None:
        pause = (
            self.stopped_parsing
            or len(self.queue) >= MAX_QUEUED_REQUESTS
            or (self.hold is not None and len(self.hold) >= MAX_HELD_BYTES)
        )
        if pause == self.reading_paused or self.closed or self.linger_timer is not None:
            return
        self.reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # --- forwarding -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start the next queued request unless one is in progress."""
        if self.busy or self.closed or self.closing or self.upgraded or not self.queue or self.endpoint.stopping:
            return
        request = self.queue.popleft()
        if self.reading_paused:
            self._update_reading()
        self.busy = True
        self.current = request

        if request.rejection is not None:
            status, message = request.rejection
            self._respond_error(request, status, message, keep_alive=False)
            self._close_lingering()
            return

        endpoint = self.endpoint
        state = endpoint.pick(NO_EXCLUSIONS)
        if state is not None:
            upstream = endpoint.take_idle(state)
            if upstream is not None:
                state.exchanges.add(self)
                self._send(request, state, upstream, reused=True, retried=False)
                return
        self._start_task(request, state, fresh_only=False)

    def _start_task(self, request: HttpRequest, state: BackendState | None, fresh_only: bool) -> None:
        self.task = self.endpoint.loop.create_task(self._connect_and_send(request, state, fresh_only))

    async def _connect_and_send(self, request: HttpRequest, state: BackendState | None, fresh_only: bool) -> None:
        """Find a backend and a connection for the request, then send it.

        Waits up to queue_timeout for a backend. When a connect fails it tries the other backends
        of the current set, and all of them again after a pause (Endpoint.wait_for_backend).
        `state` is a backend already picked, and fresh_only skips the pool.
        """
        endpoint = self.endpoint
        choice = BackendChoice()
        excluded = choice.excluded
        while True:
            if state is None:
                state = endpoint.pick(excluded)
            if state is None:
                state = await endpoint.wait_for_backend(choice)
                if state is None:
                    self._finish_request(self._respond_unavailable(request, choice.failure))
                    return

            # Registered before the connect, so drain() waits for this request too.
            state.exchanges.add(self)
            self.drained = False
            upstream = None if fresh_only else endpoint.take_idle(state)
            reused = upstream is not None
            if upstream is None:
                try:
                    upstream = await endpoint.connect_http(state)
                except (OSError, TimeoutError) as exc:
                    state.release_exchange(self)
                    choice.failure = endpoint.record_connect_failure(state, exc)
                    excluded.add(state)
                    state = None
                    continue
                except asyncio.CancelledError:
                    state.release_exchange(self)
                    raise
                if self.drained:
                    # drain() closed this request while it was connecting. No byte of it was
                    # sent, so another backend can take it.
                    upstream.close()
                    state.release_exchange(self)
                    excluded.add(state)
                    state = None
                    continue

            self._send(request, state, upstream, reused, retried=fresh_only)
            return

    def _send(
        self, request: HttpRequest, state: BackendState, upstream: UpstreamConnection, reused: bool, retried: bool
    ) -> None:
        self.state = state
        self.upstream = upstream
        self.reused = reused
        self.retried = retried
        upstream.start(request, self, request.encode(state.backend))

    def on_exchange_finished(self, upstream: UpstreamConnection) -> None:
        """Count and settle the exchange once the upstream connection has set its result."""
        request = self.current
        state = self.state
        self.upstream = None
        self.state = None
        result = upstream.result

        if result == FAILED:
            stale = self.reused and not self.retried and not upstream.received
            if stale and not self.drained and not self.closed:
                # The backend probably closed the pooled connection while it was idle, so the
                # request is sent once more on a new connection.
                upstream.close()
                state.release_exchange(self)
                self._start_task(request, None, fresh_only=True)
                return
            keep_open = self._after_failure(request, state, upstream)
            upstream.close()
        elif result == UPGRADED:
            state.requests += 1
            # The tunnel registers as long-lived before the exchange is released below, so
            # drain() never finds the backend idle in between.
            self._open_tunnel(state, upstream)
            keep_open = False
        else:
            state.requests += 1
            if upstream.status >= 500:
                state.errors += 1
            keep_open = upstream.client_keep_alive
            self.endpoint.release_upstream(upstream, result == RESPONSE_DONE and not request.websocket)

        state.release_exchange(self)
        self._finish_request(keep_open)

    def _close_lingering(self) -> None:
        """Half-close after a rejection, discard what the client still sends, and close after LINGER_TIME."""
        self.closing = True
        self.busy = False
        self.current = None
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.linger_timer = self.endpoint.loop.call_later(LINGER_TIME, transport.close)
        self.reading_paused = False
        transport.resume_reading()

    def _finish_request(self, keep_open: bool) -> None:
        """End the current request, then close the connection or start the next request."""
        request = self.current
        self.current = None
        self.busy = False
        if self.closed or self.upgraded:
            return
        if not keep_open or (self.client_eof and not self.queue):
            self.closing = True
            self.transport.close()
            return
        if self.endpoint.handing_over:
            self.idle_since = self.endpoint.loop.time()
        if request is not None and request.websocket and self.hold is not None:
            self._release_hold()
        if self.pending_continue is not None and not self.queue:
            self.pending_continue = None
            self.transport.write(CONTINUE_RESPONSE)
        self._dispatch()

    def _after_failure(self, request: HttpRequest, state: BackendState, upstream: UpstreamConnection) -> bool:
        """Count a failed exchange and respond with 502 if no response byte was sent.

        Returns whether the client connection stays open.
        """
        if self.closed:
            return False
        state.requests += 1
        instance_id = state.backend.instance_id
        if self.drained and self.endpoint.stopping:
            message = f"the endpoint of {self.endpoint.component} is stopping"
        elif self.drained:
            message = f"instance {instance_id} was drained before the response was complete"
        else:
            state.errors += 1
            self.endpoint.log_upstream_error(state, upstream.error)
            message = f"instance {instance_id} failed: {upstream.error}"
        if upstream.headers_done:
            # Part of the response reached the client, so only closing the connection signals the failure.
            return False
        keep_alive = request.keep_alive and not self.endpoint.stopping
        return self._respond_error(request, 502, message, keep_alive)

    def _respond_unavailable(self, request: HttpRequest, connect_failure: str) -> bool:
        endpoint = self.endpoint
        if connect_failure:
            message = (
                f"no instance of {endpoint.component} accepted the connection within "
                f"{endpoint.queue_timeout:g}s: {connect_failure}"
            )
            return self._respond_error(request, 502, message, request.keep_alive)
        endpoint.count_unavailable()
        if endpoint.handing_over:
            message = f"no healthy instance of {endpoint.component} was in rotation when the daemon restarted: retry"
        else:
            message = f"no healthy instance of {endpoint.component} within {endpoint.queue_timeout:g}s"
        return self._respond_error(request, 503, message, request.keep_alive)

    def _respond_error(self, request: HttpRequest, status: int, message: str, keep_alive: bool) -> bool:
        if self.closed:
            return False
        self.transport.write(encode_error(request, status, message, keep_alive))
        return keep_alive

    def _open_tunnel(self, state: BackendState, upstream: UpstreamConnection) -> None:
        """Turn the client connection and the upstream connection into a WebSocket tunnel."""
        client_end = TunnelEnd()
        client_end.transport = self.transport
        tunnel = Tunnel(state, client_end)
        tunnel.upstream.transport = upstream.transport
        upstream.transport.set_protocol(tunnel.upstream)
        self.transport.set_protocol(client_end)
        tunnel.link()
        self.upgraded = True
        self.endpoint.clients.discard(self)

        if upstream.leftover:
            self.transport.write(upstream.leftover)
        held_bytes = self.hold
        self.hold = None
        if held_bytes:
            upstream.transport.write(bytes(held_bytes))
        self.reading_paused = False
        self.transport.resume_reading()
        if upstream.reading_paused and not self.write_paused:
            upstream.transport.resume_reading()
        if upstream.lost:
            tunnel.close()
