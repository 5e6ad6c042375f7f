"""Frame layout of the tunnel protocol: constants, encoders and an incremental decoder.

Every frame is a 12-byte header followed by ``length`` payload bytes (spec section 2)::

    Version (8) | Type (8) | Flags (16) | StreamID (32) | Length (32)     all big-endian

Payloads::

    DATA           stream bytes; flag FIN (0x1) half-closes the sender's direction
    OPEN           UTF-8 JSON {"host": str, "port": int, "kind": str, "meta": {...}}
    ACCEPT         empty or UTF-8 JSON
    RESET          u32 code | UTF-8 reason (<= 1024 bytes)
    WINDOW_UPDATE  u32 increment (1 .. 2**31-1)
    PING           8 opaque bytes; flag ACK (0x2) on the echo
    GOAWAY         u32 last stream id | u32 code | UTF-8 reason
    HELLO          UTF-8 JSON (handshake, spec section 3.1)
    REPLICAS       UTF-8 JSON {"replicas": [...]} (proxy -> connector, docs/high-availability.md)
"""

from __future__ import annotations

import enum
import struct

from connproxy.wire.errors import ErrorCode, ProtocolError

PREFACE = b"CPXTUN\r\n"
FRAMING_VERSION = 1
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size
U32 = struct.Struct(">I")
GOAWAY_HEAD = struct.Struct(">II")
MAX_WINDOW = 2**31 - 1
MAX_REASON_BYTES = 1024
MAX_CONTROL_PAYLOAD = 65536
MIN_MAX_FRAME = 16384
MAX_MAX_FRAME = 16777215


class FrameType(enum.IntEnum):
    """The frame types of version 1."""

    DATA = 0x0
    OPEN = 0x1
    ACCEPT = 0x2
    RESET = 0x3
    WINDOW_UPDATE = 0x4
    PING = 0x5
    GOAWAY = 0x6
    HELLO = 0x7
    #: Extension (docs/high-availability.md; 0x10 and up are extensions, 0x8-0xf stay for the core protocol):
    #: the proxy's replica set changed. Stream 0, JSON, after HELLO;
    #: a receiver that does not know it ignores it (spec section 2).
    REPLICAS = 0x10


#: Frame types whose payload is capped at :data:`MAX_CONTROL_PAYLOAD` whatever ``max_frame`` says.
_CAPPED_TYPES = frozenset({FrameType.OPEN, FrameType.HELLO})

FLAG_FIN = 0x1
FLAG_ACK = 0x2

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


def header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode a frame header."""
    return _pack_header(FRAMING_VERSION, frame_type, flags, stream_id, length)


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode a whole frame (header and payload) as one bytes object."""
    return _pack_header(FRAMING_VERSION, frame_type, flags, stream_id, len(payload)) + payload


def encode_reason(reason: str) -> bytes:
    """UTF-8 encode a RESET/GOAWAY reason, cut to :data:`MAX_REASON_BYTES` on a character boundary."""
    # "replace": a reason often quotes peer-supplied text (an OPEN host is JSON and may hold a lone surrogate
    # such as "\ud800"); a strict encode would raise UnicodeEncodeError in reset_stream()/go_away().
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_REASON_BYTES:
        raw = raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return raw


def decode_reason(raw: bytes) -> str:
    """Decode a reason leniently (it is only ever logged)."""
    return raw[:MAX_REASON_BYTES].decode("utf-8", "replace")


class RawFrame:
    """One decoded frame: header fields and the payload bytes."""

    __slots__ = ("frame_type", "flags", "stream_id", "payload")

    def __init__(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        self.frame_type = frame_type
        self.flags = flags
        self.stream_id = stream_id
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"RawFrame(type={self.frame_type}, flags={self.flags:#x}, "
            f"stream={self.stream_id}, length={len(self.payload)})"
        )


class FrameDecoder:
    """Cut a byte stream into :class:`RawFrame` objects.

    Bytes may arrive in any split. Only complete frames are returned; the rest stays buffered, and the buffer
    never holds more than one frame (header plus at most ``max_frame`` payload bytes) beyond what was returned.

    :raises ProtocolError: ``FRAME_SIZE_ERROR`` for a frame longer than ``max_frame`` (any type) or a HELLO/OPEN
        longer than :data:`MAX_CONTROL_PAYLOAD`, ``PROTOCOL_ERROR`` for a wrong framing
        version. After an error the decoder must not be used again.
    """

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """How many bytes wait for the rest of their frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[RawFrame]:
        """Add ``data`` and return every frame that is now complete, in order."""
        buf = self._buffer
        buf += data
        pos = 0
        end = len(buf)
        max_frame = self.max_frame
        frames: list[RawFrame] = []
        try:
            while end - pos >= HEADER_SIZE:
                version, frame_type, flags, stream_id, length = _unpack_header(buf, pos)
                if version != FRAMING_VERSION:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"unsupported framing version {version}")
                # Every frame obeys the receiver's max_frame (spec section 2); HELLO and OPEN are further capped
                # at 64 KiB even when max_frame is larger (spec section 6).
                limit = min(max_frame, MAX_CONTROL_PAYLOAD) if frame_type in _CAPPED_TYPES else max_frame
                if length > limit:
                    raise ProtocolError(
                        ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds the limit of {limit}"
                    )
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                payload = bytes(buf[pos + HEADER_SIZE : stop])
                pos = stop
                frames.append(RawFrame(frame_type, flags, stream_id, payload))
        finally:
            if pos:
                del buf[:pos]
        return frames
