"""The guest side of the vsock multiplexer, in Python.

The guest agent that runs in the VM implements this side in C (src/osvm/guest/agent.c), from the
protocol in docs/firecracker.md. This implementation lets tests run a fake guest over a
socketpair, and documents the guest's duties in code: accept OPEN from the host for ports with a listener (and
reject it for others), and open channels to host ports with OPEN_TO_HOST.
"""

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from osvm.vsock.mux import DEFAULT_WINDOW, MAX_CHANNELS, OPEN_TIMEOUT, MuxEndpoint

logger = logging.getLogger("osvm.vsock")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class GuestMux(MuxEndpoint):
    """Serve guest listeners and open guest-initiated streams over one agent stream to the host.

    Each channel is joined to one end of a Unix socketpair. The other end goes to the guest
    program as an asyncio stream pair, so the program reads and writes an ordinary stream socket.
    """

    def __init__(
        self,
        agent_reader: asyncio.StreamReader,
        agent_writer: asyncio.StreamWriter,
        *,
        receive_window: int = DEFAULT_WINDOW,
        max_channels: int = MAX_CHANNELS,
        open_timeout: float = OPEN_TIMEOUT,
    ):
        super().__init__(
            agent_reader,
            agent_writer,
            is_host=False,
            receive_window=receive_window,
            max_channels=max_channels,
            open_timeout=open_timeout,
        )
        self._listeners: dict[int, StreamHandler] = {}

    def listen(self, port: int, handler: StreamHandler) -> None:
        """Call `handler(reader, writer)` for each host connection to vsock `port`.

        The writer is closed after the handler returns.
        """
        self._listeners[port] = handler

    def unlisten(self, port: int) -> None:
        """Stop accepting connections to `port`. Channels that are already open stay open."""
        self._listeners.pop(port, None)

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to host port `port`, which arrives on the host as `<uds_path>_<port>`.

        Raises ChannelRefused when nothing listens there, and VsockConnectError on a timeout.
        """
        channel = await self._open_channel(port)
        try:
            mux_side, program_side = await _stream_pair()
        except BaseException:
            self._discard(channel)
            raise
        self._run_channel(channel, *mux_side)
        return program_side

    async def _connect_local(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        handler = self._listeners.get(port)
        if handler is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on guest port {port}")
        mux_side, program_side = await _stream_pair()
        self._spawn(_run_handler(handler, port, *program_side), f"vsock-guest-port-{port}")
        return mux_side


async def _stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        first_streams = await asyncio.open_connection(sock=first)
    except BaseException:
        first.close()
        second.close()
        raise
    try:
        second_streams = await asyncio.open_connection(sock=second)
    except BaseException:
        first_streams[1].transport.abort()
        second.close()
        raise
    return first_streams, second_streams


async def _run_handler(
    handler: StreamHandler, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        await handler(reader, writer)
    except (ConnectionError, OSError) as error:
        logger.debug("guest service on port %d: connection failed: %s", port, error)
    finally:
        writer.close()
