"""Frames of the vsock multiplexer protocol, which carries many streams over one byte stream.

docs/firecracker.md specifies the protocol for implementers of the guest agent. In short: every
frame is a 9-byte header (type u8, channel u32, payload length u32, all big-endian) followed by
the payload. Each side starts with HELLO on channel 0.
"""

import asyncio
import enum
import struct
from dataclasses import dataclass

from osvm.vsock.errors import ProtocolError

HEADER = struct.Struct(">BII")
U32 = struct.Struct(">I")
PORT_AND_WINDOW = struct.Struct(">II")

PROTOCOL_MAGIC = b"OSVM"
PROTOCOL_VERSION = 1
HELLO_PAYLOAD = struct.Struct(">4sI")

# Largest payload of any frame, in bytes. A larger length means the stream is out of step.
MAX_PAYLOAD = 65536

# The control channel, which carries only HELLO.
CONTROL_CHANNEL = 0
# Channels that the host opens have ids 1 to 0x7FFFFFFF, channels that the guest opens have the
# high bit set, so the two sides never pick the same id.
GUEST_CHANNEL_BIT = 0x8000_0000


class FrameType(enum.IntEnum):
    HELLO = 0
    OPEN = 1
    OPEN_OK = 2
    OPEN_FAIL = 3
    DATA = 4
    CREDIT = 5
    EOF = 6
    CLOSE = 7
    OPEN_TO_HOST = 8


# Payload length that each frame type must have. DATA frames are checked separately.
_FIXED_PAYLOAD_LENGTH = {
    FrameType.HELLO: HELLO_PAYLOAD.size,
    FrameType.OPEN: PORT_AND_WINDOW.size,
    FrameType.OPEN_OK: U32.size,
    FrameType.OPEN_FAIL: U32.size,
    FrameType.CREDIT: U32.size,
    FrameType.EOF: 0,
    FrameType.CLOSE: 0,
    FrameType.OPEN_TO_HOST: PORT_AND_WINDOW.size,
}


@dataclass(frozen=True)
class Frame:
    type: FrameType
    channel: int
    payload: bytes = b""

    def u32(self) -> int:
        """Return the payload of an OPEN_OK, OPEN_FAIL or CREDIT frame as an integer."""
        return U32.unpack(self.payload)[0]

    def port_and_window(self) -> tuple[int, int]:
        """Return the (port, window) payload of an OPEN or OPEN_TO_HOST frame."""
        port, window = PORT_AND_WINDOW.unpack(self.payload)
        return port, window


def encode(frame_type: FrameType, channel: int, payload: bytes = b"") -> bytes:
    """Return the bytes of one frame."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}")
    return HEADER.pack(frame_type, channel, len(payload)) + payload


def hello() -> bytes:
    return encode(FrameType.HELLO, CONTROL_CHANNEL, HELLO_PAYLOAD.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION))


def check_hello(frame: Frame) -> None:
    """Raise ProtocolError unless the HELLO frame has the osvm magic and a supported version."""
    magic, version = HELLO_PAYLOAD.unpack(frame.payload)
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError(f"HELLO has magic {magic!r}, expected {PROTOCOL_MAGIC!r}: the peer does not speak this protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks multiplexer protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
            f"update the guest agent or osvm so that both match"
        )


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame and check its header, or return None when the stream ends between frames.

    Raises ProtocolError for an unknown type, a wrong payload length, a misplaced control frame or
    a stream that ends inside a frame.
    """
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            return None
        raise ProtocolError(f"stream ended inside a frame header after {len(error.partial)} bytes") from None
    raw_type, channel, length = HEADER.unpack(header)
    try:
        frame_type = FrameType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type {raw_type} on channel {channel}") from None
    _check_header(frame_type, channel, length)
    try:
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as error:
        raise ProtocolError(
            f"stream ended inside a {frame_type.name} frame after {len(error.partial)} of {length} payload bytes"
        ) from None
    return Frame(frame_type, channel, payload)


def _check_header(frame_type: FrameType, channel: int, length: int) -> None:
    if frame_type == FrameType.DATA:
        if not 1 <= length <= MAX_PAYLOAD:
            raise ProtocolError(f"DATA frame on channel {channel} has length {length}: use 1 to {MAX_PAYLOAD}")
    elif length != _FIXED_PAYLOAD_LENGTH[frame_type]:
        raise ProtocolError(
            f"{frame_type.name} frame on channel {channel} has payload length {length}, "
            f"expected {_FIXED_PAYLOAD_LENGTH[frame_type]}"
        )
    if (frame_type == FrameType.HELLO) != (channel == CONTROL_CHANNEL):
        raise ProtocolError(f"{frame_type.name} frame on channel {channel}: HELLO and only HELLO uses channel 0")
