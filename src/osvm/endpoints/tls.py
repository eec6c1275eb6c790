"""TLS termination for endpoints: the handshake, the client certificate check, then the usual protocol.

The listener accepts plain TCP and upgrades each connection with loop.start_tls(), so a failed
handshake (no certificate, an expired one, another CA's) is an exception with a reason, which the
endpoint records, instead of a connection that silently never arrives.
"""

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

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


class TlsAcceptor(asyncio.Protocol):
    """Accept one connection: run the TLS handshake, authorize the peer, then hand over to the app protocol."""

    def __init__(self, tls: EndpointTls, make_protocol: Callable[[], asyncio.Protocol]):
        self.tls = tls
        self.make_protocol = make_protocol
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._task = asyncio.get_running_loop().create_task(self._accept(transport))

    def data_received(self, data: bytes) -> None:
        # start_tls takes the transport over before any data, so nothing arrives here.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _accept(self, transport: asyncio.Transport) -> None:
        peer = _format_peer(transport.get_extra_info("peername"))
        holder = _HandshakeBuffer()
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                transport, holder, self.tls.context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except ssl.SSLCertVerificationError as error:
            self._refuse(transport, peer, _verification_reason(error))
            return
        except ssl.SSLError as error:
            self._refuse(transport, peer, _handshake_reason(error))
            return
        except (ConnectionError, TimeoutError, OSError) as error:
            logger.debug("TLS handshake with %s failed: %s", peer, error)
            transport.close()
            return
        if tls_transport is None:
            transport.close()
            return

        if self.tls.authorize is not None:
            ssl_object = tls_transport.get_extra_info("ssl_object")
            certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            reason = self.tls.authorize(certificate, peer)
            if reason is not None:
                self._refuse(tls_transport, peer, reason)
                return

        protocol = self.make_protocol()
        tls_transport.set_protocol(protocol)
        protocol.connection_made(tls_transport)
        holder.hand_over(protocol)

    def _refuse(self, transport: asyncio.BaseTransport, peer: str, reason: str) -> None:
        if self.tls.on_refused is not None:
            self.tls.on_refused(peer, reason)
        transport.close()


class _HandshakeBuffer(asyncio.Protocol):
    """Keep what arrives between the end of the handshake and the hand-over, then pass it on."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._eof = False

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


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername or "unix socket")
