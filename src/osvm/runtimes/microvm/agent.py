"""The daemon's side of a guest agent's control port ("osvm.agent", QEMU's agent.sock).

The session connects once QEMU has created the socket and sends HELLO_REQUEST, because the agent
can miss a quick reconnection, as after an adoption, and then sends no HELLO of its own. So the
session can get two HELLOs, and it acts on the state they report once. When HELLO reports the
state "waiting", it sends the instance's certificate files (WRITE_FILES) and then START, which the
agent handles in that order. When HELLO reports a running component, as after an adoption, it sends the
files again, so the guest has the host's current files. It records READY, START_FAILED and EXITED,
and sends WRITE_FILES and SIGNAL requests for the runtime. QEMU serves the socket to one client at
a time, so only the daemon uses this port, and exec probes use the separate exec port.
"""

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Callable

from osvm.runtimes.base import DeliveryError
from osvm.runtimes.microvm.port_socket import connect_port_socket
from osvm.runtimes.microvm.protocol import (
    AgentState,
    Frame,
    FrameParser,
    GuestFile,
    MessageType,
    PayloadReader,
    ProtocolError,
    decode_hello,
    decode_result,
    encode_frame,
    encode_signal,
    encode_write_files,
    read_frame,
)

logger = logging.getLogger("osvm.runtimes.microvm")

# How long a WRITE_FILES or SIGNAL request waits for the agent's RESULT. The agent replies at once,
# so this bounds only a guest that stopped running, such as a paused VM.
REQUEST_TIMEOUT = 30.0
# The first agent protocol version with WRITE_FILES, SIGNAL and RESULT.
FILES_AND_SIGNALS_VERSION = 2


class AgentSession:
    """One connection to an agent's control port, kept until QEMU exits or close() is called."""

    def __init__(self, socket_path: Path, start_frame: bytes, instance_id: str, tls_files: list[GuestFile] | None = None):
        self.socket_path = socket_path
        self.start_frame = start_frame
        self.instance_id = instance_id
        # The certificate files sent before START and after each HELLO of a running agent. The
        # runtime replaces them after a renewal, so a later boot or reconnection sends the new ones.
        self.tls_files = tls_files
        # The protocol version from the agent's last HELLO, or None before the first HELLO.
        self.agent_version: int | None = None
        # Set when the component has been started, whether by this session or before an adoption.
        self.ready = asyncio.Event()
        self.component_pid: int | None = None
        self.exit_code: int | None = None
        self.start_failure: str | None = None
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._echo_waiters: list[asyncio.Future[bytes]] = []
        # RESULT waiters by request id. Requests sent without a waiter have their errors logged.
        self._result_waiters: dict[int, asyncio.Future[str]] = {}
        # Random, so that a RESULT queued for a previous daemon's request is unlikely to match one of ours.
        self._next_request_id = secrets.randbits(31) + 1
        # Whether this connection sent START, and whether it sent the files again to a running agent.
        self._start_sent = False
        self._files_restated = False
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

    async def write_files(self, files: list[GuestFile]) -> None:
        """Write files into the guest through the agent, each replaced atomically.

        Raises DeliveryError when the agent is not connected, is too old, rejects a path or cannot
        write a file, or gives no result within REQUEST_TIMEOUT.
        """
        await self._request("write files", lambda request_id: encode_write_files(request_id, files))

    async def send_signal(self, number: int) -> None:
        """Have the agent send a signal to the component in the guest.

        Raises DeliveryError when the agent is not connected or too old, no component runs, or no
        result arrives within REQUEST_TIMEOUT.
        """
        await self._request(f"send signal {number}", lambda request_id: encode_signal(request_id, number))

    async def _request(self, action: str, encode: Callable[[int], bytes]) -> None:
        if self.agent_version is None or self._writer is None:
            raise DeliveryError(f"cannot {action} in instance {self.instance_id}: its guest agent is not connected")
        if self.agent_version < FILES_AND_SIGNALS_VERSION:
            raise DeliveryError(
                f"cannot {action} in instance {self.instance_id}: its guest agent speaks protocol version "
                f"{self.agent_version}, and version {FILES_AND_SIGNALS_VERSION} is needed; restart the instance "
                f"to boot the current agent"
            )
        request_id = self._new_request_id()
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._result_waiters[request_id] = waiter
        try:
            if not await self._send(encode(request_id)):
                raise DeliveryError(f"cannot {action} in instance {self.instance_id}: its guest agent is not connected")
            try:
                error = await asyncio.wait_for(asyncio.shield(waiter), REQUEST_TIMEOUT)
            except TimeoutError:
                raise DeliveryError(
                    f"cannot {action} in instance {self.instance_id}: the guest agent sent no result within "
                    f"{REQUEST_TIMEOUT:.0f} s"
                ) from None
            except ConnectionError as closed:
                raise DeliveryError(f"cannot {action} in instance {self.instance_id}: {closed}") from None
        finally:
            self._result_waiters.pop(request_id, None)
        if error:
            raise DeliveryError(f"cannot {action} in instance {self.instance_id}: the guest agent reported: {error}")

    def _new_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id = request_id % 0xFFFFFFFF + 1
        return request_id

    async def _send_tls_files(self) -> None:
        """Send the certificate files without waiting. An error in the agent's RESULT is logged when it arrives."""
        if not self.tls_files:
            return
        if self.agent_version is not None and self.agent_version < FILES_AND_SIGNALS_VERSION:
            logger.error(
                "instance %s: the guest agent speaks protocol version %d, which cannot receive the certificate "
                "files: restart the instance to boot the current agent",
                self.instance_id, self.agent_version,
            )
            return
        await self._send(encode_write_files(self._new_request_id(), self.tls_files))

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
            await self._send(encode_frame(MessageType.HELLO_REQUEST))
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
            for waiter in [*self._echo_waiters, *self._result_waiters.values()]:
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the agent connection closed"))
            self._echo_waiters.clear()
            self._result_waiters.clear()

    async def _connect(self, qemu_exited: "asyncio.Future[None]") -> asyncio.StreamReader | None:
        streams = await connect_port_socket(self.socket_path, qemu_exited, self.instance_id, "agent")
        if streams is None:
            return None
        reader, self._writer = streams
        self.connected.set()
        return reader

    async def _handle(self, frame: Frame) -> None:
        if frame.type == MessageType.HELLO:
            hello = decode_hello(frame.payload)
            logger.debug("agent of instance %s: %s", self.instance_id, hello)
            self.agent_version = hello.version
            if hello.state == AgentState.WAITING and not self._start_sent:
                self._start_sent = True
                # The agent handles frames in order, so the files are in place before the component starts.
                await self._send_tls_files()
                await self._send(self.start_frame)
            elif hello.state in (AgentState.RUNNING, AgentState.STOPPING):
                self.component_pid = hello.component_pid
                self.ready.set()
                if hello.state == AgentState.RUNNING and not self._start_sent and not self._files_restated:
                    self._files_restated = True
                    await self._send_tls_files()
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
        elif frame.type == MessageType.RESULT:
            result = decode_result(frame.payload)
            waiter = self._result_waiters.get(result.request_id)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(result.error)
            elif result.error:
                logger.error("instance %s: the guest agent failed request %d: %s", self.instance_id, result.request_id, result.error)
        elif frame.type == MessageType.ERROR:
            logger.warning("instance %s: the guest agent rejected a message: %s", self.instance_id, PayloadReader(frame.payload).string())

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
