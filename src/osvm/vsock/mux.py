"""One side of the vsock multiplexer: channels, credit-based flow control and close handling.

HybridVsockMux (the host side) and GuestMux (the guest side) share this machinery. Each channel
joins a local stream socket to the peer: a host program's Unix connection on the host side, one
end of a socketpair handed to a guest service on the guest side. The frame format is in frames.py
and docs/firecracker.md.

Flow control: each side sends the peer its receive window (in OPEN, OPEN_TO_HOST and OPEN_OK).
A sender keeps at most that many DATA bytes unacknowledged, and the receiver returns CREDIT as it
writes bytes to its local socket. A slow local reader therefore stalls only its own channel, and
each channel buffers at most one window of received data.
"""

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Coroutine
from typing import Any

from osvm.vsock.errors import ProtocolError, VsockConnectError
from osvm.vsock.frames import (
    GUEST_CHANNEL_BIT,
    MAX_PAYLOAD,
    PORT_AND_WINDOW,
    U32,
    Frame,
    FrameType,
    check_hello,
    encode,
    hello,
    read_frame,
)

logger = logging.getLogger("osvm.vsock")

# Receive window per channel, in bytes.
DEFAULT_WINDOW = 256 * 1024
# Maximum open channels per multiplexer. Firecracker's vsock backend has the same limit (MAX_CONNECTIONS).
MAX_CHANNELS = 1023
# Time that an open waits for the peer's HELLO and then for OPEN_OK or OPEN_FAIL, in seconds.
OPEN_TIMEOUT = 10.0
# After the peer's CLOSE, time allowed to write the data still queued to the local socket.
FLUSH_TIMEOUT = 10.0

# Markers in a channel's incoming queue besides DATA payloads.
_EOF = object()
_CLOSED = object()


class ChannelRefused(VsockConnectError):
    """The peer rejected an open with OPEN_FAIL."""

    def __init__(self, target: str, port: int, code: int):
        self.port = port
        self.errno = code
        super().__init__(f"{target} port {port} rejected the channel: {os.strerror(code)} (errno {code})")


class Channel:
    """One multiplexed stream and its flow control and close state."""

    def __init__(self, channel_id: int, port: int, receive_window: int, state: str):
        self.id = channel_id
        self.port = port
        # opening: OPEN sent, waiting for OPEN_OK or OPEN_FAIL. abandoned: the opener timed out,
        # so a late OPEN_OK gets CLOSE in return. accepting: the peer's open is being connected
        # locally. open: data flows. closing: CLOSE sent, waiting for the peer's CLOSE.
        self.state = state
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened: asyncio.Future[None] | None = None

        self.peer_window = 0
        self.in_flight = 0
        self.credit_changed = asyncio.Event()
        self.receive_window = receive_window
        self.incoming: asyncio.Queue[object] = asyncio.Queue()
        # Bytes received from the peer and not yet credited back.
        self.buffered = 0

        self.received_eof = False
        self.sent_close = False
        self.received_close = False
        self.aborted = False
        # Set when the multiplexer dropped the channel without a close exchange (peer restart, shutdown).
        self.forgotten = False
        self.pumps: tuple[asyncio.Task[None], asyncio.Task[None]] | None = None
        self.flush_deadline: asyncio.TimerHandle | None = None
        self.host_port: int | None = None

    @property
    def send_credit(self) -> int:
        return self.peer_window - self.in_flight


class MuxEndpoint:
    """Run the multiplexer protocol on one side of an agent stream.

    Subclasses implement _connect_local() for opens that the peer starts. Call start() once, and
    close() to end every channel and close the agent stream.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        is_host: bool,
        receive_window: int = DEFAULT_WINDOW,
        max_channels: int = MAX_CHANNELS,
        open_timeout: float = OPEN_TIMEOUT,
    ):
        if not 1 <= receive_window <= 0xFFFF_FFFF:
            raise ValueError(f"invalid receive window {receive_window}: use 1 to 4294967295 bytes")
        self._reader = reader
        self._writer = writer
        self.is_host = is_host
        self.receive_window = receive_window
        self.max_channels = max_channels
        self.open_timeout = open_timeout
        self._channels: dict[int, Channel] = {}
        self._next_id = 0
        self._peer_ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._shutting_down = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader_task: asyncio.Task[None] | None = None
        # The host opens with OPEN and the guest with OPEN_TO_HOST.
        self._open_type = FrameType.OPEN if is_host else FrameType.OPEN_TO_HOST
        self._peer_open_type = FrameType.OPEN_TO_HOST if is_host else FrameType.OPEN
        self._side = "host" if is_host else "guest"
        self._peer_side = "guest" if is_host else "host"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Send HELLO and start reading frames from the agent stream."""
        self._writer.write(hello())
        await self._writer.drain()
        self._reader_task = asyncio.create_task(self._read_frames(), name=f"vsock-mux-{self._side}-reader")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    async def wait_closed(self) -> None:
        """Wait until the multiplexer has shut down, by close() or because the agent stream ended."""
        await self._closed.wait()

    async def close(self) -> None:
        """End every channel without a close exchange, then close the agent stream."""
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._shutdown()

    async def _before_shutdown(self) -> None:
        """Stop taking new local connections. The host side closes its listening socket here."""

    async def _after_shutdown(self) -> None:
        """Release what remains once every channel has ended."""

    async def _connect_local(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect the local end of a channel that the peer opens to `port`.

        Raises OSError, whose errno goes to the peer in OPEN_FAIL.
        """
        raise NotImplementedError

    # --- opening channels --------------------------------------------------------------------

    async def _open_channel(self, port: int) -> Channel:
        """Open a channel to the peer's `port` and return it once the peer sent OPEN_OK.

        Raises ChannelRefused on OPEN_FAIL, and VsockConnectError on a timeout, on too many
        channels or when the multiplexer is closed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_timeout
        if self._shutting_down:
            raise VsockConnectError(f"cannot open a channel to {self._peer_side} port {port}: the multiplexer is closed")
        try:
            await asyncio.wait_for(self._peer_ready.wait(), self.open_timeout)
        except TimeoutError:
            raise VsockConnectError(
                f"cannot open a channel to {self._peer_side} port {port}: no HELLO from the {self._peer_side} "
                f"within {self.open_timeout:g}s, so its agent is not running"
            ) from None
        if self._shutting_down:
            raise VsockConnectError(f"cannot open a channel to {self._peer_side} port {port}: the multiplexer is closed")
        if len(self._channels) >= self.max_channels:
            raise VsockConnectError(
                f"cannot open a channel to {self._peer_side} port {port}: all {self.max_channels} channels are in use"
            )
        channel = Channel(self._allocate_id(), port, self.receive_window, "opening")
        channel.opened = loop.create_future()
        self._channels[channel.id] = channel
        self._send_control(self._open_type, channel.id, PORT_AND_WINDOW.pack(port, self.receive_window))
        try:
            await asyncio.wait_for(asyncio.shield(channel.opened), max(0.0, deadline - loop.time()))
        except (TimeoutError, asyncio.CancelledError) as error:
            if channel.state == "open":
                if isinstance(error, TimeoutError):
                    return channel
                self._discard(channel)
                raise
            # The id stays reserved until the late OPEN_OK or OPEN_FAIL arrives, so it is never reused too early.
            channel.state = "abandoned"
            if isinstance(error, asyncio.CancelledError):
                raise
            raise VsockConnectError(
                f"{self._peer_side} port {port} did not respond to the open within {self.open_timeout:g}s"
            ) from None
        return channel

    def _discard(self, channel: Channel) -> None:
        """Close a channel that opened but will never get a local stream."""
        channel.aborted = True
        self._send_close(channel)

    def _allocate_id(self) -> int:
        """Return the next free channel id of this side, round robin so that ids are not reused at once."""
        base = 0 if self.is_host else GUEST_CHANNEL_BIT
        while True:
            self._next_id = self._next_id % (GUEST_CHANNEL_BIT - 1) + 1
            channel_id = base | self._next_id
            if channel_id not in self._channels:
                return channel_id

    def _owns_id(self, channel_id: int) -> bool:
        return bool(channel_id & GUEST_CHANNEL_BIT) != self.is_host

    async def _accept(self, channel: Channel) -> None:
        """Connect a channel that the peer opened, then send OPEN_OK or OPEN_FAIL."""
        try:
            reader, writer = await self._connect_local(channel.port)
        except OSError as error:
            logger.debug("%s rejected a channel to port %d: %s", self._side, channel.port, error)
            self._reject(channel, error.errno or errno.ECONNREFUSED)
            return
        except Exception:  # noqa: BLE001 - the peer must get an answer, or its open waits until it times out.
            logger.exception("%s failed to connect a channel to port %d", self._side, channel.port)
            self._reject(channel, errno.EIO)
            return
        if channel.forgotten:
            writer.transport.abort()
            return
        self._send_control(FrameType.OPEN_OK, channel.id, U32.pack(self.receive_window))
        self._run_channel(channel, reader, writer)

    def _reject(self, channel: Channel, code: int) -> None:
        if not channel.forgotten:
            self._channels.pop(channel.id, None)
            self._send_control(FrameType.OPEN_FAIL, channel.id, U32.pack(code))

    # --- running channels --------------------------------------------------------------------

    def _run_channel(self, channel: Channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Join an opened channel to its local stream and start moving data both ways."""
        channel.reader = reader
        channel.writer = writer
        channel.state = "open"
        self._spawn(self._run_pumps(channel), f"vsock-channel-{channel.id:#x}")

    async def _run_pumps(self, channel: Channel) -> None:
        if channel.aborted:
            await self._finish_channel(channel, clean=False)
            return
        to_peer = asyncio.create_task(self._pump_to_peer(channel))
        to_local = asyncio.create_task(self._pump_to_local(channel))
        channel.pumps = (to_peer, to_local)
        if channel.received_close:
            self._stop_sending(channel)
        clean = True
        try:
            done, _ = await asyncio.wait({to_peer, to_local}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    clean = False
                    logger.debug("channel %#x to port %d failed: %s", channel.id, channel.port, task.exception())
            if not clean:
                to_peer.cancel()
                to_local.cancel()
            await asyncio.gather(to_peer, to_local, return_exceptions=True)
        finally:
            if channel.flush_deadline is not None:
                channel.flush_deadline.cancel()
            await self._finish_channel(channel, clean=clean and not channel.aborted)

    async def _pump_to_peer(self, channel: Channel) -> None:
        assert channel.reader is not None
        while True:
            while channel.send_credit <= 0:
                channel.credit_changed.clear()
                await channel.credit_changed.wait()
            data = await channel.reader.read(min(channel.send_credit, MAX_PAYLOAD))
            if not data:
                self._send_control(FrameType.EOF, channel.id)
                return
            channel.in_flight += len(data)
            await self._send_data(channel.id, data)

    async def _pump_to_local(self, channel: Channel) -> None:
        assert channel.writer is not None
        uncredited = 0
        while True:
            item = await channel.incoming.get()
            if item is _CLOSED:
                return
            if item is _EOF:
                if channel.writer.can_write_eof():
                    channel.writer.write_eof()
                return
            assert isinstance(item, bytes)
            channel.writer.write(item)
            await channel.writer.drain()
            channel.buffered -= len(item)
            uncredited += len(item)
            # Batch credits, but never hold them back while the queue is empty, or the sender could stall.
            if uncredited >= channel.receive_window // 4 or channel.incoming.empty():
                self._send_control(FrameType.CREDIT, channel.id, U32.pack(uncredited))
                uncredited = 0

    async def _finish_channel(self, channel: Channel, clean: bool) -> None:
        """Close the local stream (with a reset unless clean) and send CLOSE."""
        writer = channel.writer
        if writer is not None:
            if clean:
                writer.close()
            else:
                writer.transport.abort()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        self._release_host_port(channel)
        if channel.forgotten:
            return
        self._send_close(channel)

    def _send_close(self, channel: Channel) -> None:
        if not channel.sent_close:
            channel.sent_close = True
            channel.state = "closing"
            self._send_control(FrameType.CLOSE, channel.id)
        if channel.received_close:
            self._channels.pop(channel.id, None)

    def _abort_channel(self, channel: Channel, reason: str) -> None:
        logger.warning("resetting channel %#x to port %d: %s", channel.id, channel.port, reason)
        channel.aborted = True
        if channel.pumps is not None:
            for task in channel.pumps:
                task.cancel()

    def _forget(self, channel: Channel, reason: str) -> None:
        """Drop a channel at once, without a close exchange, because the peer no longer has it."""
        self._channels.pop(channel.id, None)
        channel.forgotten = True
        if channel.state == "opening" and channel.opened is not None and not channel.opened.done():
            channel.opened.set_exception(VsockConnectError(f"channel to {self._peer_side} port {channel.port} lost: {reason}"))
        channel.aborted = True
        if channel.pumps is not None:
            for task in channel.pumps:
                task.cancel()

    def _release_host_port(self, channel: Channel) -> None:
        """Free the host port shown in the channel's OK line. Only the host side assigns one."""

    # --- frames from the peer ----------------------------------------------------------------

    async def _read_frames(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader)
                if frame is None:
                    logger.info("vsock multiplexer: the %s closed the agent stream", self._peer_side)
                    break
                self._handle_frame(frame)
        except ProtocolError as error:
            logger.error("vsock multiplexer: protocol error from the %s, closing every channel: %s", self._peer_side, error)
        except (ConnectionError, OSError) as error:
            logger.error("vsock multiplexer: reading the agent stream failed, closing every channel: %s", error)
        finally:
            if not self._shutting_down:
                self._spawn(self._shutdown(), "vsock-mux-shutdown")

    def _handle_frame(self, frame: Frame) -> None:
        """Apply one frame from the peer. Raises ProtocolError when the stream can no longer be trusted."""
        if frame.type == FrameType.HELLO:
            self._handle_hello(frame)
            return
        if not self._peer_ready.is_set():
            raise ProtocolError(f"{frame.type.name} frame before HELLO")
        if frame.type == self._peer_open_type:
            self._handle_open(frame)
            return
        if frame.type in (FrameType.OPEN, FrameType.OPEN_TO_HOST):
            raise ProtocolError(f"the {self._peer_side} sent {frame.type.name}, which only the {self._side} sends")
        channel = self._channels.get(frame.channel)
        if channel is None:
            # A frame that crossed our CLOSE, or one for a channel dropped when the peer restarted.
            logger.debug("ignoring %s for unknown channel %#x", frame.type.name, frame.channel)
            return
        handlers = {
            FrameType.OPEN_OK: self._handle_open_ok,
            FrameType.OPEN_FAIL: self._handle_open_fail,
            FrameType.DATA: self._handle_data,
            FrameType.CREDIT: self._handle_credit,
            FrameType.EOF: self._handle_eof,
            FrameType.CLOSE: self._handle_close,
        }
        handlers[frame.type](channel, frame)

    def _handle_hello(self, frame: Frame) -> None:
        check_hello(frame)
        if self._peer_ready.is_set():
            # A second HELLO means the peer's agent restarted and forgot every channel.
            logger.warning(
                "vsock multiplexer: the %s agent restarted, dropping %d channel(s)", self._peer_side, len(self._channels)
            )
            for channel in list(self._channels.values()):
                self._forget(channel, f"the {self._peer_side} agent restarted")
        self._peer_ready.set()

    def _handle_open(self, frame: Frame) -> None:
        port, window = frame.port_and_window()
        if self._owns_id(frame.channel):
            raise ProtocolError(f"{frame.type.name} uses channel id {frame.channel:#x}, which belongs to the {self._side}")
        if frame.channel in self._channels:
            raise ProtocolError(f"{frame.type.name} reuses channel {frame.channel:#x}, which is still open")
        if window == 0:
            raise ProtocolError(f"{frame.type.name} on channel {frame.channel:#x} offers a window of 0 bytes")
        if len(self._channels) >= self.max_channels:
            logger.warning("rejecting a channel to port %d: all %d channels are in use", port, self.max_channels)
            self._send_control(FrameType.OPEN_FAIL, frame.channel, U32.pack(errno.EMFILE))
            return
        channel = Channel(frame.channel, port, self.receive_window, "accepting")
        channel.peer_window = window
        self._channels[channel.id] = channel
        self._spawn(self._accept(channel), f"vsock-accept-{channel.id:#x}")

    def _handle_open_ok(self, channel: Channel, frame: Frame) -> None:
        if channel.state not in ("opening", "abandoned"):
            raise ProtocolError(f"OPEN_OK for channel {channel.id:#x}, which is not opening")
        channel.peer_window = frame.u32()
        if channel.peer_window == 0:
            raise ProtocolError(f"OPEN_OK on channel {channel.id:#x} offers a window of 0 bytes")
        if channel.state == "abandoned":
            self._send_close(channel)
            return
        # DATA, EOF and CLOSE may follow before the opener resumes. The queue keeps them until
        # the pumps start.
        channel.state = "open"
        assert channel.opened is not None
        channel.opened.set_result(None)

    def _handle_open_fail(self, channel: Channel, frame: Frame) -> None:
        if channel.state not in ("opening", "abandoned"):
            raise ProtocolError(f"OPEN_FAIL for channel {channel.id:#x}, which is not opening")
        self._channels.pop(channel.id, None)
        if channel.state == "opening":
            assert channel.opened is not None
            channel.opened.set_exception(ChannelRefused(self._peer_side, channel.port, frame.u32()))

    def _handle_data(self, channel: Channel, frame: Frame) -> None:
        if channel.sent_close or channel.aborted:
            return
        if channel.state != "open":
            raise ProtocolError(f"DATA on channel {channel.id:#x} before it was open")
        if channel.received_eof:
            self._abort_channel(channel, "the peer sent DATA after EOF")
            return
        channel.buffered += len(frame.payload)
        if channel.buffered > channel.receive_window:
            self._abort_channel(
                channel, f"the peer sent {channel.buffered} bytes, beyond the window of {channel.receive_window}"
            )
            return
        channel.incoming.put_nowait(frame.payload)

    def _handle_credit(self, channel: Channel, frame: Frame) -> None:
        channel.in_flight -= frame.u32()
        if channel.in_flight < 0:
            self._abort_channel(channel, "the peer credited more bytes than were sent")
            return
        channel.credit_changed.set()

    def _handle_eof(self, channel: Channel, frame: Frame) -> None:
        if channel.received_eof:
            return
        channel.received_eof = True
        channel.incoming.put_nowait(_EOF)

    def _handle_close(self, channel: Channel, frame: Frame) -> None:
        channel.received_close = True
        if channel.sent_close:
            self._channels.pop(channel.id, None)
            return
        if channel.state != "open":
            raise ProtocolError(f"CLOSE for channel {channel.id:#x} before it was open")
        channel.incoming.put_nowait(_CLOSED)
        if channel.pumps is not None:
            self._stop_sending(channel)

    def _stop_sending(self, channel: Channel) -> None:
        """Stop reading the local socket after the peer's CLOSE, and bound the flush of queued data.

        The peer discards anything further, but the data that already arrived is still written to
        the local socket, for at most FLUSH_TIMEOUT.
        """
        assert channel.pumps is not None
        to_peer, to_local = channel.pumps
        to_peer.cancel()

        def give_up_flushing() -> None:
            channel.aborted = True
            to_local.cancel()

        channel.flush_deadline = asyncio.get_running_loop().call_later(FLUSH_TIMEOUT, give_up_flushing)

    # --- writing frames ----------------------------------------------------------------------

    def _send_control(self, frame_type: FrameType, channel_id: int, payload: bytes = b"") -> None:
        """Queue a frame without waiting for the agent stream to drain.

        This never awaits, because the frame reader calls it. If both sides' readers waited for
        their writes to drain, each could wait for the other forever. Control frames are small and
        CREDIT frames are bounded by the data received, so the write buffer stays bounded.
        """
        if self._writer.is_closing():
            return
        self._writer.write(encode(frame_type, channel_id, payload))

    async def _send_data(self, channel_id: int, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the agent stream is closed")
        self._writer.write(encode(FrameType.DATA, channel_id, data))
        await self._writer.drain()

    # --- shutdown ----------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("vsock multiplexer task %s failed", task.get_name(), exc_info=task.exception())

    async def _shutdown(self) -> None:
        if self._shutting_down:
            await self._closed.wait()
            return
        self._shutting_down = True
        try:
            await self._before_shutdown()
            for channel in list(self._channels.values()):
                self._forget(channel, "the multiplexer closed")
            current = asyncio.current_task()
            pending = [task for task in self._tasks if task is not current]
            # Channel tasks end by themselves once forgotten. Give them a moment to close their
            # local sockets cleanly before cancelling what is left.
            if pending:
                _, still_running = await asyncio.wait(pending, timeout=1.0)
                for task in still_running:
                    task.cancel()
                await asyncio.gather(*still_running, return_exceptions=True)
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            await self._after_shutdown()
        finally:
            self._closed.set()
