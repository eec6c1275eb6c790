"""The host end of a microVM's "osvm.exec" port, shared by any number of exec clients.

QEMU serves a virtio-serial port's Unix socket to one client at a time and queues at most one more,
so two exec probes and an operator's command would fail with EAGAIN or wait for each other. The
agent, however, runs up to 16 commands at once on one connection, identified by request id.
ExecMux keeps the one connection to QEMU's <instance_dir>/exec-port.sock and listens on
<instance_dir>/exec.sock, where each client (osvm.runtimes.microvm.guest_exec) speaks the same
frames as to the agent. It gives every EXEC a request id of its own, rewrites the ids of EXEC,
KEEPALIVE and EXEC_RESULT in both directions, and passes ECHO and HELLO_REQUEST on, returning
their replies in order. When the agent connection ends, every client connection is closed.
"""

import asyncio
import contextlib
import logging
import secrets
import struct
from collections import deque
from pathlib import Path

from osvm.runtimes.microvm.port_socket import connect_port_socket
from osvm.runtimes.microvm.protocol import Frame, FrameParser, MessageType, encode_frame, pack_string

logger = logging.getLogger("osvm.runtimes.microvm")

# The agent rejects larger ECHO payloads.
MAX_ECHO_BYTES = 16 * 1024
_ID = struct.Struct(">I")


class _Client:
    """One connection to exec.sock and the request ids it owns: mux id by its own id."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.ids: dict[int, int] = {}

    def send(self, message_type: MessageType, payload: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(message_type, payload))


class ExecMux:
    """Serve exec.sock for many clients over the single agent connection on QEMU's exec port socket."""

    def __init__(self, port_socket: Path, listen_path: Path, instance_id: str):
        self.port_socket = port_socket
        self.listen_path = listen_path
        self.instance_id = instance_id
        self._agent: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        # Request ids sent to the agent: (client, the client's own id), by mux id.
        self._requests: dict[int, tuple[_Client, int]] = {}
        # Ids start at a random point, so a result for a command of an earlier daemon's
        # multiplexer does not meet an id in use here.
        self._next_id = secrets.randbits(31)
        # Clients waiting for an ECHO_REPLY and for a HELLO, in the order they asked.
        self._echoes: deque[_Client] = deque()
        self._hellos: deque[_Client] = deque()
        self._last_sender: _Client | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, qemu_exited: "asyncio.Future[None]") -> None:
        """Start the background task that connects to QEMU's port socket and serves exec.sock."""
        self._task = asyncio.get_running_loop().create_task(self._run(qemu_exited), name=f"exec-{self.instance_id}")

    async def close(self) -> None:
        """Stop serving: close every client, the agent connection and the listening socket."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._shutdown()

    async def _run(self, qemu_exited: "asyncio.Future[None]") -> None:
        streams = await connect_port_socket(self.port_socket, qemu_exited, self.instance_id, "exec")
        if streams is None:
            return
        reader, self._agent = streams
        self.listen_path.unlink(missing_ok=True)
        try:
            self._server = await asyncio.start_unix_server(self._serve_client, path=str(self.listen_path))
            self.listen_path.chmod(0o600)
        except OSError as error:
            logger.error("instance %s: cannot listen on %s: %s", self.instance_id, self.listen_path, error)
            self._agent.close()
            return
        try:
            await self._read_agent(reader)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.listen_path.unlink(missing_ok=True)
        for client in list(self._clients):
            client.writer.close()
        self._clients.clear()
        self._requests.clear()
        self._echoes.clear()
        self._hellos.clear()
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    # --- agent to clients ------------------------------------------------------------------------

    async def _read_agent(self, reader: asyncio.StreamReader) -> None:
        parser = FrameParser()
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError as error:
                logger.info("instance %s: exec port connection failed: %s", self.instance_id, error)
                return
            if not data:
                return
            for frame in parser.feed(data):
                self._from_agent(frame)

    def _from_agent(self, frame: Frame) -> None:
        if frame.type == MessageType.EXEC_RESULT and len(frame.payload) >= _ID.size:
            (mux_id,) = _ID.unpack_from(frame.payload)
            owner = self._requests.pop(mux_id, None)
            if owner is None:
                return  # The client left, or the command belongs to an earlier multiplexer.
            client, client_id = owner
            client.ids.pop(client_id, None)
            client.send(MessageType.EXEC_RESULT, _ID.pack(client_id) + frame.payload[_ID.size:])
        elif frame.type == MessageType.ECHO_REPLY:
            if self._echoes:
                self._echoes.popleft().send(MessageType.ECHO_REPLY, frame.payload)
        elif frame.type == MessageType.HELLO:
            # The agent also sends an unrequested HELLO when the connection opens, which has no waiter.
            if self._hellos:
                self._hellos.popleft().send(MessageType.HELLO, frame.payload)
        elif frame.type == MessageType.ERROR:
            # Frames are checked here before they are forwarded, so an ERROR from the agent is not
            # expected. It most likely responds to the last frame forwarded.
            logger.warning("instance %s: the guest agent sent an error on the exec port: %r", self.instance_id, frame.payload[4:])
            if self._last_sender is not None:
                self._last_sender.send(MessageType.ERROR, frame.payload)

    # --- clients to agent ------------------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        parser = FrameParser()
        try:
            while self._agent is not None:
                data = await reader.read(65536)
                if not data:
                    break
                for frame in parser.feed(data):
                    self._from_client(client, frame)
        except ConnectionError:
            pass
        finally:
            # The agent kills a command whose client stops sending KEEPALIVE, and a late result
            # for a forgotten id is dropped.
            for mux_id in client.ids.values():
                self._requests.pop(mux_id, None)
            self._clients.discard(client)
            for waiters in (self._echoes, self._hellos):
                with contextlib.suppress(ValueError):
                    while True:
                        waiters.remove(client)
            writer.close()

    def _from_client(self, client: _Client, frame: Frame) -> None:
        agent = self._agent
        if agent is None:
            return
        if frame.type in (MessageType.EXEC, MessageType.KEEPALIVE):
            if len(frame.payload) < _ID.size:
                client.send(MessageType.ERROR, pack_string("invalid message: no request id"))
                return
            (client_id,) = _ID.unpack_from(frame.payload)
            if frame.type == MessageType.EXEC:
                mux_id = self._allocate_id()
                client.ids[client_id] = mux_id
                self._requests[mux_id] = (client, client_id)
            else:
                found = client.ids.get(client_id)
                if found is None:
                    return  # A keepalive for a command that has finished.
                mux_id = found
            payload = _ID.pack(mux_id) + frame.payload[_ID.size:]
        elif frame.type == MessageType.ECHO:
            if len(frame.payload) > MAX_ECHO_BYTES:
                client.send(MessageType.ERROR, pack_string("ECHO payload larger than 16 KiB"))
                return
            self._echoes.append(client)
            payload = frame.payload
        elif frame.type == MessageType.HELLO_REQUEST:
            self._hellos.append(client)
            payload = b""
        else:
            client.send(MessageType.ERROR, pack_string(f"message type {frame.type} is not served on the exec socket"))
            return
        self._last_sender = client
        agent.write(encode_frame(MessageType(frame.type), payload))

    def _allocate_id(self) -> int:
        while True:
            self._next_id = (self._next_id + 1) & 0x7FFFFFFF
            if self._next_id not in self._requests:
                return self._next_id
