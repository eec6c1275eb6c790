"""Byte tunnels between a client connection and an upstream connection.

TCP mode tunnels every connection. HTTP mode tunnels a WebSocket connection after the
backend's 101 response. A tunnel counts as a long-lived connection of its backend until
either side closes or drain() closes it.
"""

import asyncio
import socket

from osvm.endpoints.backends import BackendState


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Disable Nagle's algorithm on a TCP transport, so small responses leave without delay."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        # The connection may already be reset. The transport reports that on its own.
        pass


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: bytes received here are written to the peer transport.

    Backpressure follows the data: when this side's write buffer is full, the peer stops reading.
    """

    __slots__ = ("tunnel", "transport", "peer")

    def __init__(self, tunnel: "Tunnel | None" = None) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def eof_received(self) -> bool:
        return self.tunnel.forward_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.close()

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class Tunnel:
    """A client connection joined to an upstream connection, registered as long-lived on its backend.

    The tunnel registers itself on creation, before the upstream connection exists, so drain()
    also waits for a TCP-mode connection that is still connecting.
    """

    __slots__ = ("state", "client", "upstream", "closed", "_eof_count")

    def __init__(self, state: BackendState, client: TunnelEnd) -> None:
        self.state = state
        self.client = client
        self.upstream = TunnelEnd(self)
        # Bytes from the backend may arrive before link(), for example a server greeting.
        self.upstream.peer = client.transport
        self.closed = False
        self._eof_count = 0
        client.tunnel = self
        state.long_lived.add(self)

    def link(self) -> None:
        """Start forwarding in both directions, once both transports exist."""
        self.client.peer = self.upstream.transport
        self.upstream.peer = self.client.transport

    def forward_eof(self, end: TunnelEnd) -> bool:
        """Pass a half-close on to the other side and return whether the receiving transport stays open."""
        peer = end.peer
        if peer is None or peer.is_closing() or not peer.can_write_eof():
            self.close()
            return False
        peer.write_eof()
        self._eof_count += 1
        if self._eof_count == 2:
            self.close()
            return False
        return True

    def abandon(self) -> None:
        """Unregister a tunnel whose upstream connection failed, leaving the client connection open."""
        self.closed = True
        self.state.release_long_lived(self)
        if self.client.tunnel is self:
            self.client.tunnel = None

    def close(self) -> None:
        """Close both connections after their buffered bytes are written."""
        if self.closed:
            return
        self.closed = True
        self.state.release_long_lived(self)
        for end in (self.client, self.upstream):
            if end.transport is not None:
                end.transport.close()

    def close_for_drain(self) -> None:
        self.close()
