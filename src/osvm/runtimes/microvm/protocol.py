"""The wire format between the host and the guest agent (src/osvm/guest/agent.c).

Every frame is an 8-byte header, then the payload:

    magic  u16  0x4F56 ("OV"), so a reader can find the next frame after a reconnection
    type   u8   one of MessageType
    flags  u8   0
    length u32  payload length in bytes, at most MAX_PAYLOAD

Integers are big-endian. A string or byte string is a u32 length and the bytes; a list is a u32
count and that many strings. Payloads by type:

    HELLO        guest -> host  u32 version, u32 state (AgentState), u32 component pid, i32 exit code or -1
    START        host -> guest  str hostname, list argv, list env ("NAME=value"), str workdir,
                                u32 stop signal, u32 grace period in ms
    READY        guest -> host  u32 component pid, sent after execve of the component succeeded
    START_FAILED guest -> host  str reason
    EXEC         host -> guest  u32 request id, u32 timeout in ms (0: none), u32 keepalive in ms
                                (0: none), list argv
    KEEPALIVE    host -> guest  u32 request id: the client still waits for that EXEC. With a
                                nonzero keepalive, the agent kills the command when no
                                KEEPALIVE arrives for that long, because its client went away
    EXEC_RESULT  guest -> host  u32 request id, i32 exit code (128 + N for signal N), bytes output tail
    SHUTDOWN     host -> guest  empty: stop the component and power off
    EXITED       guest -> host  i32 exit code of the component; the VM powers off next
    ECHO         host -> guest  up to 16 KiB of any bytes, returned unchanged in ECHO_REPLY
    ERROR        guest -> host  str reason for rejecting a frame
    WRITE_FILES  host -> guest  u32 request id, u32 count (1 to 8), then per file: str path, u32 mode
                                (permission bits only), bytes content. The agent accepts only paths
                                GUEST_TLS_DIR/<name>, where name is made of letters, digits, '.', '_'
                                and '-' and does not start with '.'. It creates the directory
                                with mode 0700 when missing, writes every file to a temporary
                                file, then renames them in the order given, so a reader sees each
                                file whole. The agent replies with RESULT
    SIGNAL       host -> guest  u32 request id, u32 signal number: send it to the component.
                                The agent replies with RESULT
    RESULT       guest -> host  u32 request id, str error: empty when the request succeeded
    HELLO_REQUEST host -> guest empty: the agent replies with HELLO. The daemon sends it after it
                                connects, because the agent can miss a disconnection that a new
                                connection follows at once, and then sends no HELLO of its own

HELLO carries PROTOCOL_VERSION. Version 2 added WRITE_FILES, SIGNAL, RESULT and HELLO_REQUEST,
which an agent of version 1 rejects with ERROR. The agent sends HELLO each time it detects a host
connection to a port. Frames that it queued while no host was connected are sent first, so a client
skips frames it does not expect (an EXEC_RESULT or RESULT with another request id, for one). Every frame that the agent
sends is smaller than 32 KiB, so a client never receives part of a frame: one write() on a
virtio-serial port sends up to 32 KiB as one buffer.
"""

import asyncio
import enum
import struct
from dataclasses import dataclass

MAGIC = 0x4F56
HEADER = struct.Struct(">HBBI")
MAX_PAYLOAD = 1 << 20
PROTOCOL_VERSION = 2
# The directory that WRITE_FILES writes to, on the guest's /run tmpfs. The agent rejects other paths.
GUEST_TLS_DIR = "/run/osvm/tls"
# The maximum number of files in one WRITE_FILES message.
MAX_FILES = 8


class MessageType(enum.IntEnum):
    HELLO = 1
    START = 2
    READY = 3
    START_FAILED = 4
    EXEC = 5
    EXEC_RESULT = 6
    SHUTDOWN = 8
    EXITED = 9
    ECHO = 10
    ECHO_REPLY = 11
    ERROR = 12
    KEEPALIVE = 13
    WRITE_FILES = 14
    SIGNAL = 15
    RESULT = 16
    HELLO_REQUEST = 17


class AgentState(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    EXITED = 2
    STOPPING = 3


class ProtocolError(Exception):
    """A frame from the agent could not be decoded."""


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes


@dataclass(frozen=True)
class Hello:
    version: int
    state: AgentState
    component_pid: int
    exit_code: int | None


@dataclass(frozen=True)
class ExecResult:
    request_id: int
    code: int
    output: bytes


@dataclass(frozen=True)
class GuestFile:
    """A file for WRITE_FILES: its absolute guest path, permission bits and content."""

    path: str
    mode: int
    content: bytes


@dataclass(frozen=True)
class RequestResult:
    """The agent's RESULT: the request id and an error message, empty on success."""

    request_id: int
    error: str


def encode_frame(message_type: MessageType, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")
    return HEADER.pack(MAGIC, message_type, 0, len(payload)) + payload


def pack_u32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def pack_bytes(data: bytes) -> bytes:
    return pack_u32(len(data)) + data


def pack_string(text: str) -> bytes:
    return pack_bytes(text.encode())


def pack_list(items: list[str]) -> bytes:
    return pack_u32(len(items)) + b"".join(pack_string(item) for item in items)


def encode_start(
    hostname: str, argv: list[str], env: dict[str, str], workdir: str, stop_signal: int, grace_ms: int
) -> bytes:
    payload = (
        pack_string(hostname)
        + pack_list(argv)
        + pack_list([f"{name}={value}" for name, value in env.items()])
        + pack_string(workdir)
        + pack_u32(stop_signal)
        + pack_u32(grace_ms)
    )
    return encode_frame(MessageType.START, payload)


def encode_exec(request_id: int, argv: list[str], timeout_ms: int = 0, keepalive_ms: int = 0) -> bytes:
    payload = pack_u32(request_id) + pack_u32(timeout_ms) + pack_u32(keepalive_ms) + pack_list(argv)
    return encode_frame(MessageType.EXEC, payload)


def encode_keepalive(request_id: int) -> bytes:
    return encode_frame(MessageType.KEEPALIVE, pack_u32(request_id))


def encode_write_files(request_id: int, files: list[GuestFile]) -> bytes:
    payload = pack_u32(request_id) + pack_u32(len(files))
    for file in files:
        payload += pack_string(file.path) + pack_u32(file.mode) + pack_bytes(file.content)
    return encode_frame(MessageType.WRITE_FILES, payload)


def encode_signal(request_id: int, number: int) -> bytes:
    return encode_frame(MessageType.SIGNAL, pack_u32(request_id) + pack_u32(number))


class PayloadReader:
    """Reads the fields of one payload in order; raises ProtocolError when it is too short."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.offset = 0

    def u32(self) -> int:
        if self.offset + 4 > len(self.payload):
            raise ProtocolError("payload too short for a u32")
        (value,) = struct.unpack_from(">I", self.payload, self.offset)
        self.offset += 4
        return value

    def i32(self) -> int:
        value = self.u32()
        return value - (1 << 32) if value >= 1 << 31 else value

    def bytes(self) -> bytes:
        length = self.u32()
        if self.offset + length > len(self.payload):
            raise ProtocolError("payload too short for its byte string")
        data = self.payload[self.offset:self.offset + length]
        self.offset += length
        return data

    def string(self) -> str:
        return self.bytes().decode(errors="replace")


def decode_hello(payload: bytes) -> Hello:
    reader = PayloadReader(payload)
    version = reader.u32()
    state = AgentState(reader.u32())
    pid = reader.u32()
    code = reader.i32()
    return Hello(version, state, pid, None if code < 0 else code)


def decode_exec_result(payload: bytes) -> ExecResult:
    reader = PayloadReader(payload)
    return ExecResult(reader.u32(), reader.i32(), reader.bytes())


def decode_result(payload: bytes) -> RequestResult:
    reader = PayloadReader(payload)
    return RequestResult(reader.u32(), reader.string())


class FrameParser:
    """Splits a byte stream into frames, skipping bytes up to the next magic when it finds garbage."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= HEADER.size:
            magic, message_type, _flags, length = HEADER.unpack_from(self.buffer)
            if magic != MAGIC or length > MAX_PAYLOAD:
                next_start = self.buffer.find(MAGIC.to_bytes(2, "big"), 1)
                del self.buffer[:next_start if next_start > 0 else len(self.buffer) - 1]
                continue
            if len(self.buffer) < HEADER.size + length:
                break
            payload = bytes(self.buffer[HEADER.size:HEADER.size + length])
            del self.buffer[:HEADER.size + length]
            frames.append(Frame(message_type, payload))
        return frames


async def read_frame(reader: asyncio.StreamReader, parser: FrameParser, pending: list[Frame]) -> Frame:
    """Return the next frame from reader. Raises EOFError when the connection closes first."""
    while not pending:
        data = await reader.read(65536)
        if not data:
            raise EOFError("the agent connection closed")
        pending.extend(parser.feed(data))
    return pending.pop(0)
