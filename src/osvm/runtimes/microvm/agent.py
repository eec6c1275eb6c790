"""The daemon's side of a guest agent's control port ("osvm.agent", QEMU's agent.sock).

The session connects once QEMU has created the socket, sends START when the agent's HELLO reports
the state "waiting", and records READY, START_FAILED and EXITED. QEMU serves the socket to one
client at a time, so only the daemon uses this port, and exec probes use the separate exec port.
"""

import asyncio
import logging
from pathlib import Path

from osvm.runtimes.microvm.protocol import (
    AgentState,
    Frame,
    FrameParser,
    MessageType,
    PayloadReader,
    ProtocolError,
    decode_hello,
    encode_frame,
    read_frame,
)

logger = logging.getLogger("osvm.runtimes.microvm")

# QEMU creates its sockets within a few milliseconds of starting; this bounds a QEMU stuck before that.
CONNECT_TIMEOUT = 30.0
CONNECT_RETRY_INTERVAL = 0.01


class AgentSession:
    """One connection to an agent's control port, kept until QEMU exits or close() is called."""

    def __init__(self, socket_path: Path, start_frame: bytes, instance_id: str):
        self.socket_path = socket_path
        self.start_frame = start_frame
        self.instance_id = instance_id
        # Set when the component has been started, whether by this session or before an adoption.
        self.ready = asyncio.Event()
        self.component_pid: int | None = None
        self.exit_code: int | None = None
        self.start_failure: str | None = None
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._echo_waiters: list[asyncio.Future[bytes]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, qemu_exited: "asyncio.Future[None]") -> None:
        """Start the background task that connects and reads the agent's messages."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(qemu_exited), name=f"agent-{self.instance_id}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._close_writer()

    async def wait_closed(self, timeout: float) -> None:
        """Wait up to timeout seconds for the connection to end, as it does when QEMU exits."""
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout)

    async def send_shutdown(self) -> bool:
        """Ask the agent to stop the component and power off. Returns False when not connected."""
        return await self._send(encode_frame(MessageType.SHUTDOWN))

    async def echo(self, data: bytes) -> bytes:
        """Send an ECHO and return the reply; measures the control channel's round trip."""
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._echo_waiters.append(waiter)
        if not await self._send(encode_frame(MessageType.ECHO, data)):
            self._echo_waiters.remove(waiter)
            raise ConnectionError(f"the agent of instance {self.instance_id} is not connected")
        return await waiter

    async def _send(self, frame: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(frame)
        try:
            await writer.drain()
        except OSError:
            return False
        return True

    async def _run(self, qemu_exited: "asyncio.Future[None]") -> None:
        try:
            reader = await self._connect(qemu_exited)
            if reader is None:
                return
            parser = FrameParser()
            pending: list[Frame] = []
            while True:
                frame = await read_frame(reader, parser, pending)
                await self._handle(frame)
        except EOFError:
            logger.debug("the agent connection of instance %s closed", self.instance_id)
        except (OSError, ProtocolError) as error:
            logger.warning("the agent connection of instance %s failed: %s", self.instance_id, error)
        finally:
            self._close_writer()
            for waiter in self._echo_waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the agent connection closed"))
            self._echo_waiters.clear()

    async def _connect(self, qemu_exited: "asyncio.Future[None]") -> asyncio.StreamReader | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        last_error: OSError | None = None
        while not qemu_exited.done():
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError) as error:
                last_error = error
                if loop.time() >= deadline:
                    logger.error(
                        "cannot connect to the agent socket %s of instance %s within %.0f s: %s",
                        self.socket_path, self.instance_id, CONNECT_TIMEOUT, last_error,
                    )
                    return None
                await asyncio.sleep(CONNECT_RETRY_INTERVAL)
                continue
            self._writer = writer
            self.connected.set()
            return reader
        return None

    async def _handle(self, frame: Frame) -> None:
        if frame.type == MessageType.HELLO:
            hello = decode_hello(frame.payload)
            logger.debug("agent of instance %s: %s", self.instance_id, hello)
            if hello.state == AgentState.WAITING:
                await self._send(self.start_frame)
            elif hello.state in (AgentState.RUNNING, AgentState.STOPPING):
                self.component_pid = hello.component_pid
                self.ready.set()
            elif hello.state == AgentState.EXITED:
                self.exit_code = hello.exit_code
        elif frame.type == MessageType.READY:
            self.component_pid = PayloadReader(frame.payload).u32()
            logger.info("instance %s: the guest agent started the component as guest pid %d", self.instance_id, self.component_pid)
            self.ready.set()
        elif frame.type == MessageType.START_FAILED:
            self.start_failure = PayloadReader(frame.payload).string()
            logger.error("instance %s: the guest agent could not start the component: %s", self.instance_id, self.start_failure)
        elif frame.type == MessageType.EXITED:
            self.exit_code = PayloadReader(frame.payload).i32()
            logger.info("instance %s: the component exited in the guest with status %d", self.instance_id, self.exit_code)
        elif frame.type == MessageType.ECHO_REPLY:
            if self._echo_waiters:
                waiter = self._echo_waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(frame.payload)
        elif frame.type == MessageType.ERROR:
            logger.warning("instance %s: the guest agent rejected a message: %s", self.instance_id, PayloadReader(frame.payload).string())

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
