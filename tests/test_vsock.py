"""Tests of the vsock package: CID and port allocation, the hybrid vsock contract and the multiplexer.

Every stream here is a Unix socket. The multiplexer tests join HybridVsockMux (the host side) and
GuestMux (a fake guest) with a socketpair, and an autouse fixture fails any test that creates an
AF_VSOCK socket.
"""

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from osvm.store import Store
from osvm.vsock import (
    AllocationError,
    ChannelRefused,
    CidAllocator,
    GuestMux,
    GuestPortRefused,
    HybridVsockMux,
    PortAllocator,
    ProtocolError,
    VsockConnectError,
    connect,
    select_transport,
    serve_guest_port,
)
from osvm.vsock.frames import (
    HELLO_PAYLOAD,
    PORT_AND_WINDOW,
    U32,
    Frame,
    FrameType,
    encode,
    hello,
    read_frame,
)
from osvm.vsock.hybrid import parse_connect_line

ECHO_PORT = 5000
HOST_PORT = 6000


# --- fixtures ---------------------------------------------------------------------------------


class _NoVsockSocket(socket.socket):
    def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None):
        if family == socket.AF_VSOCK:
            raise AssertionError("a test created an AF_VSOCK socket; vsock logic must be tested over Unix sockets")
        super().__init__(family, type, proto, fileno)


@pytest.fixture(autouse=True)
def no_vsock_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that creates an AF_VSOCK socket, because this host has no vsock loopback."""
    monkeypatch.setattr(socket, "socket", _NoVsockSocket)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    database = Store(tmp_path / "state.db")
    yield database
    database.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp with a short path, because a Unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="osvm-vsock-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte back until EOF, then close."""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()


async def _agent_stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    host_end, guest_end = socket.socketpair()
    return await asyncio.open_connection(sock=host_end), await asyncio.open_connection(sock=guest_end)


class VsockPair:
    """A host multiplexer on `uds_path` joined to a fake guest with an echo service on ECHO_PORT."""

    def __init__(self, uds_path: str, host: HybridVsockMux, guest: GuestMux):
        self.uds_path = uds_path
        self.host = host
        self.guest = guest


@pytest.fixture
async def pair(short_dir: Path) -> AsyncIterator[VsockPair]:
    uds_path = str(short_dir / "v.sock")
    (host_reader, host_writer), (guest_reader, guest_writer) = await _agent_stream_pair()
    host = HybridVsockMux(uds_path, host_reader, host_writer)
    guest = GuestMux(guest_reader, guest_writer)
    guest.listen(ECHO_PORT, echo)
    await host.start()
    await guest.start()
    yield VsockPair(uds_path, host, guest)
    await guest.close()
    await host.close()
    assert not os.path.exists(uds_path), "the multiplexer left its socket file behind"


class RawGuest:
    """The guest end of an agent stream, driven frame by frame to test the host's reactions."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def send(self, frame_type: FrameType, channel: int, payload: bytes = b"") -> None:
        self.writer.write(encode(frame_type, channel, payload))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def expect(self, frame_type: FrameType) -> Frame:
        """Return the next frame, which must have `frame_type`. CREDIT frames are skipped unless expected."""
        while True:
            frame = await asyncio.wait_for(read_frame(self.reader), 5)
            assert frame is not None, f"agent stream ended while waiting for {frame_type.name}"
            if frame.type == FrameType.CREDIT and frame_type != FrameType.CREDIT:
                continue
            assert frame.type == frame_type, f"expected {frame_type.name}, got {frame.type.name}"
            return frame


@pytest.fixture
async def raw_pair(short_dir: Path) -> AsyncIterator[tuple[str, HybridVsockMux, RawGuest]]:
    uds_path = str(short_dir / "v.sock")
    (host_reader, host_writer), (guest_reader, guest_writer) = await _agent_stream_pair()
    host = HybridVsockMux(uds_path, host_reader, host_writer, open_timeout=2.0)
    await host.start()
    guest = RawGuest(guest_reader, guest_writer)
    await guest.expect(FrameType.HELLO)
    yield uds_path, host, guest
    await host.close()
    guest.writer.close()


async def _wait_until(condition, description: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {description}")
        await asyncio.sleep(0.01)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def _round_trip(uds_path: str, data: bytes) -> bytes:
    """Send `data` to the echo service, half-close, and return everything echoed back."""
    reader, writer = await connect(uds_path, ECHO_PORT)

    async def send() -> None:
        for offset in range(0, len(data), 1 << 20):
            writer.write(data[offset:offset + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await _read_all(reader)
    await sender
    writer.close()
    return received


# --- CID and port allocation ------------------------------------------------------------------


def test_cids_unique_from_three(store: Store) -> None:
    allocator = CidAllocator(store)
    cids = [allocator.allocate(f"vm-{index}") for index in range(5)]
    assert cids == [3, 4, 5, 6, 7]


def test_cid_same_owner_same_cid(store: Store) -> None:
    allocator = CidAllocator(store)
    first = allocator.allocate("vm-a")
    assert allocator.allocate("vm-a") == first
    assert allocator.cid_of("vm-a") == first
    assert allocator.allocated() == {first: "vm-a"}


def test_cid_lowest_released_reused(store: Store) -> None:
    allocator = CidAllocator(store)
    for name in ("a", "b", "c", "d"):
        allocator.allocate(name)
    allocator.release("b")
    allocator.release("c")
    assert allocator.allocate("e") == 4
    assert allocator.allocate("f") == 5
    assert allocator.allocate("g") == 7


def test_cid_persists_across_store_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first_store = Store(path)
    CidAllocator(first_store).allocate("vm-a")
    CidAllocator(first_store).allocate("vm-b")
    first_store.close()

    second_store = Store(path)
    try:
        allocator = CidAllocator(second_store)
        assert allocator.allocated() == {3: "vm-a", 4: "vm-b"}
        assert allocator.allocate("vm-c") == 5
        assert ("cid", "3", "vm-a") in second_store.allocations(kind="cid")
    finally:
        second_store.close()


def test_cid_avoid_skips_cids(store: Store) -> None:
    allocator = CidAllocator(store)
    assert allocator.allocate("vm-a", avoid=[3, 4]) == 5
    # Avoiding the held CID moves the owner to another one and frees the old.
    assert allocator.allocate("vm-a", avoid=[5]) == 3
    assert allocator.allocated() == {3: "vm-a"}


def test_cid_rows_of_other_kinds_ignored(store: Store) -> None:
    store.allocate("port", "3", "someone")
    assert CidAllocator(store).allocate("vm-a") == 3


def test_ports_allocated_per_cid(store: Store) -> None:
    ports = PortAllocator(store)
    assert ports.allocate("svc-a", cid=3) == 1024
    assert ports.allocate("svc-b", cid=3) == 1025
    assert ports.allocate("svc-c", cid=4) == 1024
    assert ports.allocate("svc-a", cid=3, port=5000) == 5000
    assert ports.ports_of("svc-a") == [(3, 1024), (3, 5000)]
    assert ("vsock-port", "3:5000", "svc-a") in store.allocations(kind="vsock-port")


def test_port_taken_by_other_owner(store: Store) -> None:
    ports = PortAllocator(store)
    ports.allocate("svc-a", cid=3, port=5000)
    with pytest.raises(AllocationError, match="vsock port 5000 on CID 3 is already allocated to svc-a"):
        ports.allocate("svc-b", cid=3, port=5000)
    assert ports.allocate("svc-a", cid=3, port=5000) == 5000


def test_port_release_frees_ports(store: Store) -> None:
    ports = PortAllocator(store)
    ports.allocate("svc-a", cid=3)
    ports.allocate("svc-a", cid=3)
    ports.release("svc-a")
    assert ports.ports_of("svc-a") == []
    assert ports.allocate("svc-b", cid=3) == 1024


def test_port_invalid_cid_rejected(store: Store) -> None:
    with pytest.raises(AllocationError, match="invalid CID 2"):
        PortAllocator(store).allocate("svc", cid=2)


# --- transport selection ----------------------------------------------------------------------


def test_transport_vhost_when_device_exists(tmp_path: Path) -> None:
    device = tmp_path / "vhost-vsock"
    device.touch()
    assert select_transport(str(device)) == "vhost-vsock"


def test_transport_serial_without_device(tmp_path: Path) -> None:
    assert select_transport(str(tmp_path / "missing")) == "virtio-serial"


# --- CONNECT line parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "port"),
    [
        (b"CONNECT 5000\n", 5000),
        (b"connect 0\n", 0),
        (b"Connect 4294967295\n", 4294967295),
        (b"CONNECT  52 extra\n", 52),
    ],
)
def test_connect_line_valid(line: bytes, port: int) -> None:
    assert parse_connect_line(line) == port


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT 5000",
        b"CONNECT\n",
        b"OPEN 5000\n",
        b"CONNECT -1\n",
        b"CONNECT 4294967296\n",
        b"CONNECT 0x10\n",
        b"CONNECT \xff\n",
        b"\n",
    ],
)
def test_connect_line_invalid(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_connect_line(line)


# --- host-initiated connections through the multiplexer ---------------------------------------


async def test_mux_round_trip(pair: VsockPair) -> None:
    reader, writer = await connect(pair.uds_path, ECHO_PORT)
    writer.write(b"hello guest\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(12), 5) == b"hello guest\n"
    writer.close()


async def test_mux_ok_line_format(pair: VsockPair) -> None:
    reader, writer = await asyncio.open_unix_connection(pair.uds_path)
    writer.write(b"CONNECT 5000\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    words = line.split()
    assert words[0] == b"OK"
    assert int(words[1]) >= 1 << 30
    assert line.endswith(b"\n")
    writer.close()


async def test_mux_data_after_connect_line(pair: VsockPair) -> None:
    # Bytes sent right behind the CONNECT line belong to the stream and must not be lost.
    reader, writer = await asyncio.open_unix_connection(pair.uds_path)
    writer.write(b"CONNECT 5000\nearly bytes")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"OK ")
    assert await asyncio.wait_for(reader.readexactly(11), 5) == b"early bytes"
    writer.close()


async def test_mux_large_transfer_intact(pair: VsockPair) -> None:
    data = os.urandom(8 * 1024 * 1024 + 12345)
    received = await asyncio.wait_for(_round_trip(pair.uds_path, data), 60)
    assert len(received) == len(data)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_mux_many_concurrent_channels(pair: VsockPair) -> None:
    payloads = [os.urandom(64 * 1024 + index) for index in range(64)]
    results = await asyncio.wait_for(asyncio.gather(*(_round_trip(pair.uds_path, data) for data in payloads)), 60)
    for index, (sent, received) in enumerate(zip(payloads, results)):
        assert received == sent, f"channel {index} returned different bytes"
    await _wait_until(lambda: pair.host.channel_count == 0, "the host to release every channel")
    await _wait_until(lambda: pair.guest.channel_count == 0, "the guest to release every channel")


async def test_mux_refused_port_reported(pair: VsockPair) -> None:
    with pytest.raises(GuestPortRefused, match="guest port 5001 refused"):
        await connect(pair.uds_path, 5001)
    # The refusal leaves the multiplexer usable.
    reader, writer = await connect(pair.uds_path, ECHO_PORT)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    writer.close()


async def test_mux_refused_closes_without_ok(pair: VsockPair) -> None:
    reader, writer = await asyncio.open_unix_connection(pair.uds_path)
    writer.write(b"CONNECT 5001\n")
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()


@pytest.mark.parametrize(
    "line",
    [b"HELLO 5000\n", b"CONNECT\n", b"CONNECT abc\n", b"CONNECT 99999999999\n", b"CONNECT " + b"1" * 40 + b"\n"],
)
async def test_mux_malformed_connect_closed(pair: VsockPair, line: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(pair.uds_path)
    writer.write(line)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
    assert pair.host.channel_count == 0


async def test_mux_connect_line_timeout(short_dir: Path) -> None:
    uds_path = str(short_dir / "v.sock")
    (host_reader, host_writer), (guest_reader, guest_writer) = await _agent_stream_pair()
    host = HybridVsockMux(uds_path, host_reader, host_writer, connect_line_timeout=0.2)
    guest = GuestMux(guest_reader, guest_writer)
    await host.start()
    await guest.start()
    try:
        reader, writer = await asyncio.open_unix_connection(uds_path)
        writer.write(b"CONN")
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
    finally:
        await guest.close()
        await host.close()


async def test_connect_missing_socket(short_dir: Path) -> None:
    with pytest.raises(VsockConnectError, match="not found: check that the VM is running"):
        await connect(str(short_dir / "missing.sock"), ECHO_PORT)


async def test_connect_port_out_of_range(short_dir: Path) -> None:
    with pytest.raises(ValueError, match="invalid vsock port"):
        await connect(str(short_dir / "v.sock"), 1 << 32)


async def test_mux_half_close_keeps_reply(pair: VsockPair) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_all(reader)
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    pair.guest.listen(5002, reply_after_eof)
    reader, writer = await connect(pair.uds_path, 5002)
    writer.write(b"request")
    writer.write_eof()
    assert await asyncio.wait_for(_read_all(reader), 5) == b"got request"
    writer.close()


async def test_mux_slow_reader_bounded(pair: VsockPair) -> None:
    total = 4 * 1024 * 1024

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"z" * 65536
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    pair.guest.listen(5003, flood)
    reader, writer = await connect(pair.uds_path, 5003)
    # The client reads nothing for a while, so the guest can send only one window ahead.
    await asyncio.sleep(0.5)
    for channel in pair.host._channels.values():
        assert channel.buffered <= channel.receive_window
    for channel in pair.guest._channels.values():
        assert channel.in_flight <= channel.peer_window
    received = await asyncio.wait_for(_read_all(reader), 30)
    assert len(received) == total
    writer.close()


async def test_mux_client_close_releases_channel(pair: VsockPair) -> None:
    reader, writer = await connect(pair.uds_path, ECHO_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    writer.close()
    await _wait_until(lambda: pair.host.channel_count == 0, "the host to release the channel")
    await _wait_until(lambda: pair.guest.channel_count == 0, "the guest to release the channel")


async def test_mux_client_reset_releases_channel(pair: VsockPair) -> None:
    reader, writer = await connect(pair.uds_path, ECHO_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    writer.transport.abort()
    await _wait_until(lambda: pair.host.channel_count == 0, "the host to release the channel")
    await _wait_until(lambda: pair.guest.channel_count == 0, "the guest to release the channel")


# --- guest-initiated connections --------------------------------------------------------------


async def test_guest_connection_reaches_host_port(pair: VsockPair) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def host_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_all(reader)
        writer.write(b"host saw " + request)
        await writer.drain()
        writer.close()
        received.set_result(request)

    server = await serve_guest_port(pair.uds_path, HOST_PORT, host_service)
    assert server.path == f"{pair.uds_path}_{HOST_PORT}"
    try:
        reader, writer = await pair.guest.connect(HOST_PORT)
        writer.write(b"from guest")
        writer.write_eof()
        assert await asyncio.wait_for(_read_all(reader), 5) == b"host saw from guest"
        assert await asyncio.wait_for(received, 5) == b"from guest"
        writer.close()
    finally:
        await server.close()
    assert not os.path.exists(server.path)


async def test_guest_connection_large_transfer(pair: VsockPair) -> None:
    server = await serve_guest_port(pair.uds_path, HOST_PORT, echo)
    data = os.urandom(3 * 1024 * 1024)
    try:
        reader, writer = await pair.guest.connect(HOST_PORT)

        async def send() -> None:
            writer.write(data)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await asyncio.wait_for(_read_all(reader), 30)
        await sender
        writer.close()
    finally:
        await server.close()
    assert received == data


async def test_guest_connection_refused_without_listener(pair: VsockPair) -> None:
    with pytest.raises(ChannelRefused, match="host port 6001 rejected the channel") as raised:
        await pair.guest.connect(6001)
    assert raised.value.errno == errno.ECONNREFUSED


async def test_guest_connection_to_unlisted_port_rejected(pair: VsockPair) -> None:
    pair.host.guest_ports = {HOST_PORT}
    listed = await serve_guest_port(pair.uds_path, HOST_PORT, echo)
    unlisted = await serve_guest_port(pair.uds_path, HOST_PORT + 1, echo)
    try:
        with pytest.raises(ChannelRefused) as raised:
            await pair.guest.connect(HOST_PORT + 1)
        assert raised.value.errno == errno.EACCES

        reader, writer = await pair.guest.connect(HOST_PORT)
        writer.write(b"listed")
        writer.write_eof()
        assert await asyncio.wait_for(_read_all(reader), 5) == b"listed"
        writer.close()
    finally:
        await listed.close()
        await unlisted.close()


async def test_serve_guest_port_replaces_stale_socket(short_dir: Path) -> None:
    uds_path = str(short_dir / "v.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(f"{uds_path}_{HOST_PORT}")
    stale.close()
    server = await serve_guest_port(uds_path, HOST_PORT, echo)
    await server.close()


async def test_serve_guest_port_keeps_regular_file(short_dir: Path) -> None:
    uds_path = str(short_dir / "v.sock")
    Path(f"{uds_path}_{HOST_PORT}").write_text("not a socket")
    with pytest.raises(FileExistsError, match="is not a Unix socket"):
        await serve_guest_port(uds_path, HOST_PORT, echo)


# --- agent stream failures and protocol errors ------------------------------------------------


async def test_agent_stream_end_closes_mux(pair: VsockPair) -> None:
    reader, writer = await connect(pair.uds_path, ECHO_PORT)
    await pair.guest.close()
    await asyncio.wait_for(pair.host.wait_closed(), 5)
    assert not os.path.exists(pair.uds_path)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()


async def test_raw_guest_open_ok_and_data(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello())
    reader, writer = await asyncio.open_unix_connection(uds_path)
    writer.write(b"CONNECT 7000\n")
    opened = await guest.expect(FrameType.OPEN)
    port, window = PORT_AND_WINDOW.unpack(opened.payload)
    assert port == 7000
    assert window == host.receive_window
    assert opened.channel & 0x8000_0000 == 0
    await guest.send(FrameType.OPEN_OK, opened.channel, U32.pack(1024))
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"OK ")

    await guest.send(FrameType.DATA, opened.channel, b"from raw guest")
    assert await asyncio.wait_for(reader.readexactly(14), 5) == b"from raw guest"
    credit = await guest.expect(FrameType.CREDIT)
    assert credit.payload == U32.pack(14)

    # The host may send at most the 1024-byte window that the guest offered.
    writer.write(b"y" * 4096)
    await writer.drain()
    data = await guest.expect(FrameType.DATA)
    assert len(data.payload) == 1024
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read_frame(guest.reader), 0.3)
    await guest.send(FrameType.CREDIT, opened.channel, U32.pack(1024))
    data = await guest.expect(FrameType.DATA)
    assert len(data.payload) == 1024
    writer.close()


async def test_raw_guest_open_fail_closes_client(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello())
    connecting = asyncio.create_task(connect(uds_path, 7001))
    opened = await guest.expect(FrameType.OPEN)
    await guest.send(FrameType.OPEN_FAIL, opened.channel, U32.pack(errno.ECONNREFUSED))
    with pytest.raises(GuestPortRefused, match="guest port 7001 refused"):
        await connecting
    assert host.channel_count == 0


async def test_raw_guest_open_before_hello_waits(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    with pytest.raises(GuestPortRefused):
        # No HELLO from the guest within the 2 s open timeout, so the client is closed without OK.
        await connect(uds_path, 7000)


async def test_raw_guest_restart_drops_channels(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello())
    reader, writer = await asyncio.open_unix_connection(uds_path)
    writer.write(b"CONNECT 7000\n")
    opened = await guest.expect(FrameType.OPEN)
    await guest.send(FrameType.OPEN_OK, opened.channel, U32.pack(65536))
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"OK ")

    await guest.send_raw(hello())
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(100), 5) == b""
    assert host.channel_count == 0
    assert not host.closed
    writer.close()


async def test_raw_guest_window_overrun_resets_channel(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello())
    reader, writer = await asyncio.open_unix_connection(uds_path)
    writer.write(b"CONNECT 7000\n")
    opened = await guest.expect(FrameType.OPEN)
    await guest.send(FrameType.OPEN_OK, opened.channel, U32.pack(65536))
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"OK ")

    # The client reads nothing, so once its socket buffer is full the host keeps the data queued
    # and stops returning credit. A guest that keeps sending then overruns the window.
    chunk = b"w" * 65536
    for _ in range(64):
        await guest.send(FrameType.DATA, opened.channel, chunk)
    frame_types = []
    while FrameType.CLOSE not in frame_types:
        frame = await asyncio.wait_for(read_frame(guest.reader), 5)
        assert frame is not None
        frame_types.append(frame.type)
    assert set(frame_types) <= {FrameType.CREDIT, FrameType.CLOSE}
    assert not host.closed
    writer.close()


@pytest.mark.parametrize(
    ("data", "case"),
    [
        (struct.pack(">BII", 99, 1, 0), "unknown frame type"),
        (struct.pack(">BII", FrameType.DATA, 1, 70000), "oversized DATA"),
        (struct.pack(">BII", FrameType.CLOSE, 0, 0), "CLOSE on channel 0"),
        (encode(FrameType.HELLO, 0, HELLO_PAYLOAD.pack(b"NOPE", 1)), "wrong magic"),
        (encode(FrameType.HELLO, 0, HELLO_PAYLOAD.pack(b"OSVM", 2)), "wrong version"),
        (encode(FrameType.OPEN, 0x8000_0001, PORT_AND_WINDOW.pack(1, 1024)), "OPEN from the guest"),
        (encode(FrameType.OPEN_TO_HOST, 5, PORT_AND_WINDOW.pack(1, 1024)), "host channel id from the guest"),
    ],
)
async def test_raw_guest_protocol_error_closes_mux(
    raw_pair: tuple[str, HybridVsockMux, RawGuest], data: bytes, case: str
) -> None:
    uds_path, host, guest = raw_pair
    if not data.startswith(bytes([FrameType.HELLO])):
        await guest.send_raw(hello())
    await guest.send_raw(data)
    await asyncio.wait_for(host.wait_closed(), 5)
    assert not os.path.exists(uds_path), f"{case}: socket file left after the protocol error"


async def test_raw_guest_frame_before_hello(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send(FrameType.CREDIT, 1, U32.pack(1))
    await asyncio.wait_for(host.wait_closed(), 5)


async def test_raw_guest_truncated_frame(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello() + b"\x04\x00\x00")
    guest.writer.close()
    await asyncio.wait_for(host.wait_closed(), 5)


async def test_raw_guest_open_to_host_connects(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello())
    server = await serve_guest_port(uds_path, HOST_PORT, echo)
    try:
        await guest.send(FrameType.OPEN_TO_HOST, 0x8000_0001, PORT_AND_WINDOW.pack(HOST_PORT, 65536))
        answer = await guest.expect(FrameType.OPEN_OK)
        assert answer.channel == 0x8000_0001
        assert answer.payload == U32.pack(host.receive_window)
        await guest.send(FrameType.DATA, 0x8000_0001, b"echo me")
        echoed = await guest.expect(FrameType.DATA)
        assert echoed.payload == b"echo me"
    finally:
        await server.close()


async def test_raw_guest_open_to_missing_host_port(raw_pair: tuple[str, HybridVsockMux, RawGuest]) -> None:
    uds_path, host, guest = raw_pair
    await guest.send_raw(hello())
    await guest.send(FrameType.OPEN_TO_HOST, 0x8000_0002, PORT_AND_WINDOW.pack(6009, 65536))
    answer = await guest.expect(FrameType.OPEN_FAIL)
    assert answer.payload == U32.pack(errno.ECONNREFUSED)
    assert host.channel_count == 0


async def test_mux_replaces_stale_socket(short_dir: Path) -> None:
    uds_path = str(short_dir / "v.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds_path)
    stale.close()
    (host_reader, host_writer), (guest_reader, guest_writer) = await _agent_stream_pair()
    host = HybridVsockMux(uds_path, host_reader, host_writer)
    await host.start()
    await host.close()
    guest_writer.close()
    assert not os.path.exists(uds_path)
