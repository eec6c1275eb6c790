"""Firecracker's hybrid vsock contract over Unix sockets, for host programs.

The contract, from Firecracker's docs/vsock.md:

- Host-initiated: connect to the VM's Unix socket (`uds_path`), send `CONNECT <port>\\n`, and read
  `OK <assigned_host_port>\\n`. The stream then reaches the guest program listening on vsock port
  <port>. When nothing listens there, the VMM closes the connection without OK.
- Guest-initiated: a guest connection to host CID 2, port P, arrives as a connection on the Unix
  socket `<uds_path>_<P>`, where a host program must be listening.

connect() and serve_guest_port() are the host program's side. HybridVsockMux provides the VMM's
side of the same contract on top of one byte stream to a guest agent, for hosts without
vhost-vsock, where the QEMU runtime carries that stream over virtio-serial.
"""

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from osvm.vsock.errors import GuestPortRefused, ProtocolError, VsockConnectError
from osvm.vsock.mux import DEFAULT_WINDOW, MAX_CHANNELS, OPEN_TIMEOUT, Channel, ChannelRefused, MuxEndpoint

logger = logging.getLogger("osvm.vsock")

# Longest CONNECT line accepted, newline included. Firecracker reads at most 32 bytes.
MAX_CONNECT_LINE = 32
# Time a host client has to send its CONNECT line, in seconds.
CONNECT_LINE_TIMEOUT = 10.0
# Longest OK line expected: "OK 4294967295\n" is 14 bytes.
MAX_OK_LINE = 32
MAX_PORT = 0xFFFF_FFFF
# Firecracker assigns host-side ports round robin in [1 << 30, 1 << 31).
FIRST_HOST_PORT = 1 << 30
HOST_PORT_COUNT = 1 << 30

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- host program side ------------------------------------------------------------------------


async def connect(
    uds_path: str | os.PathLike[str], port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to the guest program listening on vsock `port`, through the VM's Unix socket.

    `timeout` bounds the Unix connect and the wait for the OK line, in seconds. Raises
    GuestPortRefused when the connection closes without OK, VsockConnectError when the socket
    cannot be reached or the handshake times out, and ProtocolError for a malformed response.
    """
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"invalid vsock port {port}: use 0 to {MAX_PORT}")
    path = os.fspath(uds_path)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    except TimeoutError:
        raise VsockConnectError(f"connecting to the vsock socket {path} timed out after {timeout:g}s") from None
    except FileNotFoundError:
        raise VsockConnectError(f"vsock socket {path} not found: check that the VM is running") from None
    except ConnectionRefusedError:
        raise VsockConnectError(f"nothing listens on the vsock socket {path}: check that the VM is running") from None
    except OSError as error:
        raise VsockConnectError(f"cannot connect to the vsock socket {path}: {error.strerror or error}") from None
    try:
        writer.write(f"CONNECT {port}\n".encode())
        line = await asyncio.wait_for(_read_line(reader, MAX_OK_LINE), timeout)
    except TimeoutError:
        writer.transport.abort()
        raise VsockConnectError(f"CONNECT {port} on {path} timed out after {timeout:g}s without a response") from None
    except (ConnectionError, OSError):
        writer.transport.abort()
        raise GuestPortRefused(port, path) from None
    except ProtocolError as error:
        writer.transport.abort()
        raise ProtocolError(f"invalid response to CONNECT {port} on {path}: {error}") from None
    if not line:
        writer.close()
        raise GuestPortRefused(port, path)
    words = line.split()
    if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit() or not line.endswith(b"\n"):
        writer.transport.abort()
        raise ProtocolError(f"invalid response to CONNECT {port} on {path}: expected \"OK <port>\", got {line!r}")
    logger.debug("connected to guest port %d through %s, host port %s", port, path, words[1].decode())
    return reader, writer


class GuestPortServer:
    """A host listener for guest-initiated connections to one port, on `<uds_path>_<port>`.

    close() stops listening and removes the socket file.
    """

    def __init__(self, path: str, server: asyncio.Server):
        self.path = path
        self.server = server

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> "GuestPortServer":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve_guest_port(uds_path: str | os.PathLike[str], port: int, handler: StreamHandler) -> GuestPortServer:
    """Listen on `<uds_path>_<port>` and call `handler(reader, writer)` for each guest connection.

    A stale socket file at that path is replaced. The handler owns the writer and closes it.
    """
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"invalid vsock port {port}: use 0 to {MAX_PORT}")
    path = guest_port_path(uds_path, port)
    remove_stale_socket(path)
    server = await asyncio.start_unix_server(handler, path=path)
    return GuestPortServer(path, server)


def guest_port_path(uds_path: str | os.PathLike[str], port: int) -> str:
    """Return the Unix socket path on which guest connections to host port `port` arrive."""
    return f"{os.fspath(uds_path)}_{port}"


def parse_connect_line(line: bytes) -> int:
    """Return the port of a `CONNECT <port>\\n` line, parsed as Firecracker does.

    Like Firecracker, the command word is case-insensitive and words after the port are ignored.
    Raises ProtocolError for anything else.
    """
    if not line.endswith(b"\n"):
        raise ProtocolError(f"CONNECT line {line!r} does not end with a newline within {MAX_CONNECT_LINE} bytes")
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        raise ProtocolError(f"CONNECT line {line!r} is not ASCII") from None
    if len(words) < 2 or words[0].lower() != "connect":
        raise ProtocolError(f"invalid CONNECT line {line!r}: expected \"CONNECT <port>\"")
    if not words[1].isdigit() or int(words[1]) > MAX_PORT:
        raise ProtocolError(f"invalid port {words[1]!r} in CONNECT line: use 0 to {MAX_PORT}")
    return int(words[1])


def remove_stale_socket(path: str) -> None:
    """Remove a leftover Unix socket file at `path`. Raises FileExistsError when a file of another type is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a Unix socket: remove it or choose another path")
    os.unlink(path)


async def _read_line(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Read a line of at most `limit` bytes, newline included, or what came before EOF.

    Reading byte by byte leaves everything after the newline in the reader for the stream's user.
    """
    line = bytearray()
    while len(line) < limit:
        byte = await reader.read(1)
        if not byte:
            return bytes(line)
        line += byte
        if byte == b"\n":
            return bytes(line)
    raise ProtocolError(f"line longer than {limit} bytes: {bytes(line)!r}")


# --- the VMM side, over a guest agent stream --------------------------------------------------


class HybridVsockMux(MuxEndpoint):
    """Serve Firecracker's hybrid vsock contract on `uds_path`, carried over one agent stream.

    Host clients connect to `uds_path` and send `CONNECT <port>\\n`. Each client becomes a channel
    to the guest agent, which connects it to the guest listener on that port. Channels that the
    guest opens to host port P are connected to `<uds_path>_<P>`. When the agent stream ends or
    breaks, every channel closes, the listening socket is removed and wait_closed() returns.
    """

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        agent_reader: asyncio.StreamReader,
        agent_writer: asyncio.StreamWriter,
        *,
        receive_window: int = DEFAULT_WINDOW,
        max_channels: int = MAX_CHANNELS,
        open_timeout: float = OPEN_TIMEOUT,
        connect_line_timeout: float = CONNECT_LINE_TIMEOUT,
        guest_ports: "set[int] | None" = None,
    ):
        super().__init__(
            agent_reader,
            agent_writer,
            is_host=True,
            receive_window=receive_window,
            max_channels=max_channels,
            open_timeout=open_timeout,
        )
        self.uds_path = os.fspath(uds_path)
        self.connect_line_timeout = connect_line_timeout
        # The host ports that the guest may open channels to, or None for any port.
        self.guest_ports = guest_ports
        self._server: asyncio.Server | None = None
        self._handshakes: set[asyncio.StreamWriter] = set()
        self._host_ports: set[int] = set()
        self._next_host_port = 0

    async def start(self) -> None:
        """Listen on uds_path (replacing a stale socket file) and start the multiplexer."""
        Path(self.uds_path).parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(self.uds_path)
        self._server = await asyncio.start_unix_server(self._serve_client, path=self.uds_path)
        await super().start()
        logger.info("hybrid vsock multiplexer listening on %s", self.uds_path)

    async def _before_shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._handshakes):
                writer.transport.abort()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)

    async def _after_shutdown(self) -> None:
        # Since Python 3.12, wait_closed() also waits for accepted connections, which the channel
        # shutdown has closed by now.
        if self._server is not None:
            await self._server.wait_closed()
        logger.info("hybrid vsock multiplexer on %s closed", self.uds_path)

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run the CONNECT handshake of one host client and join it to a channel."""
        self._handshakes.add(writer)
        try:
            channel = await self._open_for_client(reader, writer)
            if channel is None:
                return
            channel.host_port = self._allocate_host_port()
            writer.write(f"OK {channel.host_port}\n".encode())
            self._run_channel(channel, reader, writer)
        finally:
            self._handshakes.discard(writer)

    async def _open_for_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Channel | None:
        """Read the client's CONNECT line and open the channel, or close the client and return None."""
        try:
            line = await asyncio.wait_for(_read_line(reader, MAX_CONNECT_LINE), self.connect_line_timeout)
            port = parse_connect_line(line)
        except TimeoutError:
            logger.warning("closing a client of %s: no CONNECT line within %gs", self.uds_path, self.connect_line_timeout)
            writer.transport.abort()
            return None
        except ProtocolError as error:
            logger.warning("closing a client of %s: %s", self.uds_path, error)
            writer.transport.abort()
            return None
        except (ConnectionError, OSError):
            writer.transport.abort()
            return None
        try:
            return await self._open_channel(port)
        except ChannelRefused as error:
            # Firecracker closes the connection without OK when nothing listens on the guest port.
            logger.debug("guest port %d rejected a client of %s: %s", port, self.uds_path, error)
        except VsockConnectError as error:
            logger.warning("closing a client of %s: %s", self.uds_path, error)
        writer.close()
        return None

    def _allocate_host_port(self) -> int:
        while True:
            port = FIRST_HOST_PORT + self._next_host_port
            self._next_host_port = (self._next_host_port + 1) % HOST_PORT_COUNT
            if port not in self._host_ports:
                self._host_ports.add(port)
                return port

    def _release_host_port(self, channel: Channel) -> None:
        if channel.host_port is not None:
            self._host_ports.discard(channel.host_port)

    async def _connect_local(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = guest_port_path(self.uds_path, port)
        if self.guest_ports is not None and port not in self.guest_ports:
            logger.warning("vsock multiplexer on %s: rejected a guest channel to host port %d, which is not allowed", self.uds_path, port)
            raise PermissionError(errno.EACCES, f"host port {port} is not open to the guest")
        try:
            return await asyncio.wait_for(asyncio.open_unix_connection(path), self.open_timeout)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"connecting to {path} timed out") from None
        except FileNotFoundError:
            # Nothing listens for this port, so the guest's connect fails with ECONNREFUSED.
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{path} does not exist") from None
