"""A keep-alive HTTP/1.1 connection to a backend that streams each response to the client."""

import asyncio
from typing import TYPE_CHECKING

import httptools

from osvm.endpoints.backends import BackendState
from osvm.endpoints.tunnel import set_nodelay

if TYPE_CHECKING:
    from osvm.endpoints.http import HttpClientProtocol, HttpRequest

# Results of one exchange, stored in UpstreamConnection.result.
PENDING = 0
# The response was forwarded and the connection may serve another request.
RESPONSE_DONE = 1
# The response was forwarded but the connection must be closed.
RESPONSE_DONE_CLOSE = 2
# The backend responded with 101 to a WebSocket request, so the connection is now a tunnel.
UPGRADED = 3
# The connection failed before the response was complete. `error` describes why.
FAILED = 4

# Body framing toward the client, stored in UpstreamConnection.body_mode.
BODY_NONE = 0
# As received: the response has a Content-Length, or it ends when the connection closes.
BODY_RAW = 1
# Re-encoded with chunked transfer coding, because httptools delivers the body decoded.
# NOTE: trailer fields of a chunked response are dropped.
BODY_CHUNKED = 2

# Response headers that apply to one connection only, so a proxy does not forward them.
RESPONSE_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))
LAST_CHUNK = b"0\r\n\r\n"


class UpstreamConnection(asyncio.Protocol):
    """One connection to a backend, serving one exchange at a time.

    The response head and body are written to the client transport as they arrive, so a large
    response never sits in memory. When `result` leaves PENDING the connection calls the
    client's on_exchange_finished(), after writing the bytes received so far and outside the
    parser callbacks, so the client may send its next request on this connection at once.
    """

    __slots__ = (
        "state", "transport", "parser", "idle_since", "lost", "aborted", "reading_paused",
        "client", "request", "feeding", "notified", "result", "error", "received", "leftover",
        "status", "reason", "headers", "interim", "headers_done", "body_mode", "until_eof",
        "transfer_encoding", "client_keep_alive", "out",
    )

    def __init__(self, state: BackendState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.lost = False
        self.aborted = False
        self.reading_paused = False

        # The exchange in progress.
        self.client: "HttpClientProtocol | None" = None
        self.request: "HttpRequest | None" = None
        # Whether feed_data() is running, which defers the call to on_exchange_finished().
        self.feeding = False
        self.notified = False
        self.result = PENDING
        self.error = ""
        # Whether any byte of the current response arrived. A reused connection that fails
        # before that may have been closed by the backend while idle, so the request is retried.
        self.received = False
        # Bytes after a 101 response head, which belong to the WebSocket stream.
        self.leftover = b""

        # The response in progress.
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.interim = False
        self.headers_done = False
        self.body_mode = BODY_NONE
        # Whether the response has neither Content-Length nor chunked coding, so it ends at EOF.
        self.until_eof = False
        # The response's Transfer-Encoding value, such as b"gzip, chunked", or b"" without one.
        self.transfer_encoding = b""
        self.client_keep_alive = False
        self.out: list[bytes] = []

    # --- used by the client side ------------------------------------------------------------

    def start(self, request: "HttpRequest", client: "HttpClientProtocol", data: bytes) -> None:
        """Send one request. The client's on_exchange_finished() is called once `result` is set."""
        self.client = client
        self.request = request
        self.result = PENDING
        self.notified = False
        self.error = ""
        self.received = False
        self.status = 0
        self.interim = False
        self.headers_done = False
        self.transport.write(data)
        if client.write_paused:
            self.pause_reading()

    def detach(self) -> None:
        """End the exchange, so bytes that arrive later close the connection."""
        self.client = None
        self.request = None
        if self.reading_paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()
            self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def usable(self) -> bool:
        """Whether the connection is open and not closing, so a request can be sent on it."""
        return not self.lost and not self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once and fail the exchange with reason."""
        self.aborted = True
        if not self.result and self.client is not None:
            self._fail(reason)
        self.transport.abort()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or self.result:
            # Bytes outside an exchange break HTTP framing, so the connection cannot be reused.
            self._discard()
            return

        self.received = True
        self.out = out = []
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101 and not self.result:
                self.leftover = data[exc.args[0]:]
                self.result = UPGRADED
        except httptools.HttpParserError as exc:
            if not self.result:
                self.error = f"invalid HTTP response: {exc}"
                self.result = FAILED
            self.transport.abort()
        finally:
            self.feeding = False

        if out and not client.closed:
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self.result:
            self._notify()

    def eof_received(self) -> None:
        # Returning None closes the transport, and connection_lost() settles the exchange.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.client is None:
            self._discard()
            return
        if self.result:
            return
        if self.headers_done and self.until_eof and not self.aborted:
            # A response without Content-Length or chunked coding ends when the backend closes.
            if self.body_mode == BODY_CHUNKED and not self.client.closed:
                self.client.transport.write(LAST_CHUNK)
            self._finish(RESPONSE_DONE_CLOSE)
            return
        if exc is None:
            self._fail("the instance closed the connection before the response was complete")
        else:
            self._fail(f"the connection failed: {exc}")

    # --- httptools.HttpResponseParser callbacks ---------------------------------------------

    def on_message_begin(self) -> None:
        if self.result == RESPONSE_DONE:
            # A second response to one request: the connection is out of step, so do not reuse it.
            self.result = RESPONSE_DONE_CLOSE
        self.reason = b""
        self.headers = []
        self.transfer_encoding = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.result:
            return
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            # 100 Continue and other interim responses are dropped: the proxy sent the whole
            # body already and the client gets the final response.
            self.interim = True
            return

        request = self.request
        self.status = status
        if status == 101 and not request.websocket:
            self._fail("the instance answered 101 Switching Protocols to a request without an upgrade")
            return
        self.headers_done = True
        self.out.append(self._encode_head(status))
        if request.is_head:
            # httptools has no option to mark a response as one to HEAD, so it would wait for
            # Content-Length bytes. The exchange ends here and the connection is not reused.
            self._finish(RESPONSE_DONE_CLOSE)

    def on_body(self, body: bytes) -> None:
        if self.result:
            return
        mode = self.body_mode
        if mode == BODY_RAW:
            self.out.append(body)
        elif mode == BODY_CHUNKED and body:
            self.out.append(b"%x\r\n" % len(body))
            self.out.append(body)
            self.out.append(b"\r\n")

    def on_message_complete(self) -> None:
        if self.result:
            return
        if self.interim:
            self.interim = False
            return
        if self.status == 101:
            # feed_data() raises HttpParserUpgrade next, with the offset of the tunnel bytes.
            return
        if self.body_mode == BODY_CHUNKED:
            self.out.append(LAST_CHUNK)
        self._finish(RESPONSE_DONE if self.parser.should_keep_alive() else RESPONSE_DONE_CLOSE)

    # --- internals --------------------------------------------------------------------------

    def _encode_head(self, status: int) -> bytes:
        """Encode the response head for the client and set body_mode, until_eof and client_keep_alive."""
        request = self.request
        chunked = False
        has_length = False
        options: set[bytes] | None = None
        parts = [b"HTTP/1.1 %d " % status, self.reason, b"\r\n"]
        for name, value in self.headers:
            lowered = name.lower()
            if lowered not in RESPONSE_HOP_BY_HOP:
                if lowered == b"content-length":
                    has_length = True
                parts += (name, b": ", value, b"\r\n")
            elif lowered == b"transfer-encoding":
                self.transfer_encoding = value
                chunked = b"chunked" in value.lower()
            elif lowered == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")} - CONNECTION_OPTIONS
                if tokens:
                    options = tokens if options is None else options | tokens
        if options is not None or (chunked and has_length) or status == 101:
            parts = parts[:3] + self._filter_headers(status, chunked, options)

        http10 = request.http10
        self.until_eof = False
        if request.is_head or status in (101, 204, 304):
            self.body_mode = BODY_NONE
        elif chunked:
            # An HTTP/1.0 client does not know chunked coding, so its body ends at close.
            self.body_mode = BODY_RAW if http10 else BODY_CHUNKED
        elif has_length:
            self.body_mode = BODY_RAW
        else:
            self.until_eof = True
            self.body_mode = BODY_RAW if http10 else BODY_CHUNKED
        # Without a length, the body of an HTTP/1.0 response can only end with the connection.
        ends_at_close = http10 and self.body_mode == BODY_RAW and (chunked or not has_length)
        keep_alive = request.keep_alive and not ends_at_close
        self.client_keep_alive = keep_alive

        if self.body_mode == BODY_CHUNKED:
            # Keep codings such as gzip that are applied before chunked, since the body stays encoded.
            coding = self.transfer_encoding if chunked else b"chunked"
            parts += (b"Transfer-Encoding: ", coding, b"\r\n")
        if status == 101:
            parts.append(b"Connection: Upgrade\r\n")
        elif not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif http10:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _filter_headers(self, status: int, chunked: bool, options: set[bytes] | None) -> list[bytes]:
        """Encode the response headers again for the uncommon cases that the first pass leaves in."""
        parts: list[bytes] = []
        for name, value in self.headers:
            lowered = name.lower()
            if lowered in RESPONSE_HOP_BY_HOP:
                if status == 101 and lowered == b"upgrade":
                    parts += (name, b": ", value, b"\r\n")
                continue
            if options is not None and lowered in options:
                continue
            if chunked and lowered == b"content-length":
                # Transfer-Encoding overrides Content-Length, and a sender must not send both.
                continue
            parts += (name, b": ", value, b"\r\n")
        return parts

    def _finish(self, result: int) -> None:
        self.result = result
        if not self.feeding:
            self._notify()

    def _notify(self) -> None:
        client = self.client
        if client is not None and not self.notified:
            self.notified = True
            client.on_exchange_finished(self)

    def _fail(self, error: str) -> None:
        self.error = error
        self._finish(FAILED)

    def _discard(self) -> None:
        """Remove an idle connection from its backend's pool and close it."""
        try:
            self.state.idle.remove(self)
        except ValueError:
            pass
        if not self.transport.is_closing():
            self.transport.close()
