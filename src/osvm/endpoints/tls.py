"""TLS termination for endpoints: the handshake, the client certificate check, then the usual protocol.

The listener accepts each connection itself and runs the handshake with
loop.connect_accepted_socket(). A failed handshake (no certificate, an expired one, another CA's)
then raises an exception with a reason, which the endpoint records. With a plain TLS server, the
error would only reach the event loop's exception handler.
"""

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from osvm.endpoints.listener import BACKLOG, EndpointError, describe_bind_error

logger = logging.getLogger("osvm.endpoints.tls")

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class EndpointTls:
    """How an endpoint terminates TLS and decides who may connect.

    `authorize(peer_certificate_der, peer_address)` returns None to accept, or the reason to refuse.
    `on_refused(peer_address, reason)` records a refusal. Both run on the event loop.
    """

    context: ssl.SSLContext
    authorize: Callable[[bytes | None, str], str | None] | None = None
    on_refused: Callable[[str, str], None] | None = None


class TlsListener:
    """Accept TCP connections, run each TLS handshake, authorize the peer, then start the app protocol.

    It has the close() and wait_closed() of an asyncio server, so the endpoint stops it the same way.
    """

    def __init__(self, sock: socket.socket, tls: EndpointTls, make_protocol: Callable[[], asyncio.Protocol]):
        self.sock = sock
        self.sockets = [sock]
        self.tls = tls
        self.make_protocol = make_protocol
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(), name="tls-accept")

    def stop_accepting(self) -> None:
        """Stop accepting and close the listening socket, and let the handshakes in progress finish."""
        if self._accepting is not None:
            self._accepting.cancel()
        self.sock.close()

    def close(self) -> None:
        self.stop_accepting()
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = [task for task in (self._accepting, *self._handshakes) if task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(self.sock)
            except OSError as error:
                logger.warning("accepting a connection failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._accept(connection))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _accept(self, connection: socket.socket) -> None:
        peer = _format_peer(_peer_name(connection))
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gate = _HandshakeBuffer()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: gate, connection, ssl=self.tls.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except ssl.SSLCertVerificationError as error:
            self._refuse(connection, peer, _verification_reason(error))
            return
        except ssl.SSLError as error:
            self._refuse(connection, peer, _handshake_reason(error))
            return
        except (ConnectionError, TimeoutError, OSError) as error:
            logger.debug("TLS handshake with %s failed: %s", peer, error)
            connection.close()
            return

        if self.tls.authorize is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            reason = self.tls.authorize(certificate, peer)
            if reason is not None:
                if self.tls.on_refused is not None:
                    self.tls.on_refused(peer, reason)
                transport.close()
                return

        protocol = self.make_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        gate.hand_over(protocol)

    def _refuse(self, connection: socket.socket, peer: str, reason: str) -> None:
        if self.tls.on_refused is not None:
            self.tls.on_refused(peer, reason)
        connection.close()


def bind_tls_listener(host: str, port: int, listen: str) -> socket.socket:
    """Bind and listen on a TCP address for a TLS endpoint; raise EndpointError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise EndpointError(describe_bind_error(error, listen)) from None
    return sock


class _HandshakeBuffer(asyncio.Protocol):
    """Keep what arrives between the end of the handshake and the hand-over, then pass it on."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return True

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        for chunk in self._chunks:
            protocol.data_received(chunk)
        self._chunks.clear()
        if self._eof:
            protocol.eof_received()


def _verification_reason(error: ssl.SSLCertVerificationError) -> str:
    message = (error.verify_message or str(error)).strip()
    if "unable to get local issuer" in message or "self-signed" in message or "self signed" in message:
        return f"client certificate not issued by this CA ({message})"
    if "expired" in message:
        return f"client certificate expired ({message})"
    return f"client certificate rejected: {message}"


def _handshake_reason(error: ssl.SSLError) -> str:
    text = f"{error.reason or ''} {error}".lower()
    if "peer did not return a certificate" in text or "certificate required" in text:
        return "no client certificate"
    return f"TLS handshake failed: {error.reason or error}"


def _peer_name(connection: socket.socket) -> object:
    try:
        return connection.getpeername()
    except OSError:
        return None


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername or "unix socket")
