"""TCP mode: each client connection is tunnelled to one backend for its whole life."""

import asyncio
from typing import TYPE_CHECKING

from osvm.endpoints.backends import BackendChoice
from osvm.endpoints.tunnel import Tunnel, TunnelEnd

if TYPE_CHECKING:
    from osvm.endpoints.endpoint import Endpoint


class TcpClientProtocol(TunnelEnd):
    """A client connection in TCP mode: it connects to a backend, then forwards bytes both ways.

    Reading is paused until the upstream connection is open. uvloop 0.23 still delivers the
    first read after pause_reading() in connection_made(), so bytes and an EOF that arrive
    before the tunnel exists are kept and forwarded once it does.
    """

    __slots__ = ("endpoint", "connector", "closed", "early_data", "early_eof")

    def __init__(self, endpoint: "Endpoint") -> None:
        super().__init__()
        self.endpoint = endpoint
        self.connector: asyncio.Task[None] | None = None
        self.closed = False
        self.early_data = bytearray()
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()
        self.endpoint.clients.add(self)
        self.connector = self.endpoint.loop.create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early_data += data
            self.transport.pause_reading()
            return
        self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.early_eof = True
            return True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.endpoint.clients.discard(self)
        if self.tunnel is not None:
            self.tunnel.close()
        connector = self.connector
        if connector is not None and not connector.done():
            connector.cancel()

    def close_for_stop(self) -> "asyncio.Task[None] | None":
        """Cancel a connect in progress, close the connection and return the connect task for the caller to await."""
        connector = self.connector
        if connector is not None and not connector.done():
            connector.cancel()
        self.transport.close()
        return connector

    async def _connect(self) -> None:
        """Connect to a backend of the current set, trying others on failure, then start the tunnel."""
        endpoint = self.endpoint
        choice = BackendChoice()
        while not self.closed:
            state = endpoint.pick(choice.excluded)
            if state is None:
                state = await endpoint.wait_for_backend(choice)
                if state is None:
                    self._give_up(choice.failure)
                    return

            # The tunnel registers as long-lived now, so drain() waits for the connect too.
            tunnel = Tunnel(state, self)
            try:
                await endpoint.connect_tunnel(tunnel)
            except (OSError, TimeoutError) as exc:
                tunnel.abandon()
                choice.failure = endpoint.record_connect_failure(state, exc)
                choice.excluded.add(state)
                continue
            except asyncio.CancelledError:
                tunnel.close()
                raise

            state.requests += 1
            if tunnel.closed:
                # drain() closed the tunnel or the upstream connection closed during the connect.
                if tunnel.upstream.transport is not None:
                    tunnel.upstream.transport.close()
                return
            tunnel.link()
            if self.early_data:
                self.peer.write(bytes(self.early_data))
                self.early_data.clear()
            if self.early_eof:
                tunnel.forward_eof(self)
            else:
                self.transport.resume_reading()
            return

    def _give_up(self, connect_failure: str) -> None:
        endpoint = self.endpoint
        if connect_failure:
            endpoint.log_unavailable(
                f"closed a client connection: no instance accepted the connection within "
                f"{endpoint.queue_timeout:g}s: {connect_failure}"
            )
        else:
            endpoint.count_unavailable()
            endpoint.log_unavailable(
                f"closed a client connection: no healthy instance within {endpoint.queue_timeout:g}s"
            )
        self.transport.close()
