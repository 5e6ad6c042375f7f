"""Tests for :mod:`connproxy.wire.frames`: layout, round trips, split independence and framing errors.

Spec: ``docs/tunnel-protocol.md`` section 2.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connproxy.wire import frames as f
from connproxy.wire.errors import ErrorCode, ProtocolError

from .wire_helpers import raw

FAST = settings(max_examples=200, deadline=None)

frame_types = st.one_of(st.sampled_from(list(f.FrameType)), st.integers(0, 255))
flags = st.integers(0, 0xFFFF)
stream_ids = st.integers(0, 2**32 - 1)
payloads = st.binary(max_size=300)


@st.composite
def raw_frames(draw: st.DrawFn) -> tuple[int, int, int, bytes]:
    return (draw(frame_types), draw(flags), draw(stream_ids), draw(payloads))


# ------------------------------------------------------------------------------------------- layout


def test_constants_match_the_spec() -> None:
    assert f.PREFACE == bytes.fromhex("43 50 58 54 55 4e 0d 0a") == b"CPXTUN\r\n"
    assert f.HEADER_SIZE == 12
    assert {t.name: t.value for t in f.FrameType} == {
        "DATA": 0,
        "OPEN": 1,
        "ACCEPT": 2,
        "RESET": 3,
        "WINDOW_UPDATE": 4,
        "PING": 5,
        "GOAWAY": 6,
        "HELLO": 7,
        "REPLICAS": 0x10,  # extension, docs/high-availability.md
    }
    assert (f.FLAG_FIN, f.FLAG_ACK) == (0x1, 0x2)
    assert f.MAX_WINDOW == 2**31 - 1
    assert (f.MIN_MAX_FRAME, f.MAX_MAX_FRAME) == (16384, 16777215)
    assert f.MAX_REASON_BYTES == 1024


def test_header_is_big_endian_version_type_flags_stream_length() -> None:
    assert f.header(f.FrameType.PING, f.FLAG_ACK, 0, 8) == bytes.fromhex("01 05 0002 00000000 00000008")
    assert f.frame(f.FrameType.WINDOW_UPDATE, 0, 5, f.U32.pack(1000)) == bytes.fromhex(
        "01 04 0000 00000005 00000004 000003e8"
    )
    assert f.frame(f.FrameType.DATA, f.FLAG_FIN, 0x01020304, b"") == bytes.fromhex("01 00 0001 01020304 00000000")
    goaway = f.frame(f.FrameType.GOAWAY, 0, 0, f.GOAWAY_HEAD.pack(7, ErrorCode.SHUTTING_DOWN) + b"bye")
    assert goaway == bytes.fromhex("01 06 0000 00000000 0000000b 00000007 00000013") + b"bye"


@FAST
@given(raw_frames())
def test_frame_equals_header_plus_payload(fields: tuple[int, int, int, bytes]) -> None:
    frame_type, fl, stream_id, payload = fields
    assert f.frame(frame_type, fl, stream_id, payload) == f.header(frame_type, fl, stream_id, len(payload)) + payload


# ------------------------------------------------------------------------------------------- round trips


@FAST
@given(raw_frames())
def test_round_trip_every_type(fields: tuple[int, int, int, bytes]) -> None:
    frame_type, fl, stream_id, payload = fields
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    (decoded,) = decoder.feed(f.frame(frame_type, fl, stream_id, payload))
    assert (decoded.frame_type, decoded.flags, decoded.stream_id, decoded.payload) == fields
    assert type(decoded.payload) is bytes
    assert decoder.buffered == 0
    assert str(stream_id) in repr(decoded)


@FAST
@given(st.lists(raw_frames(), max_size=12), st.data())
def test_any_split_gives_the_same_frames(frames_: list[tuple[int, int, int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(f.frame(*fields) for fields in frames_)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))

    def run(pieces: list[bytes]) -> list[tuple[int, int, int, bytes]]:
        decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
        out: list[tuple[int, int, int, bytes]] = []
        for piece in pieces:
            out.extend((r.frame_type, r.flags, r.stream_id, r.payload) for r in decoder.feed(piece))
            # Never more than one incomplete frame is buffered.
            assert decoder.buffered < f.HEADER_SIZE + f.MIN_MAX_FRAME
        assert decoder.buffered == 0
        return out

    bounds = [0, *cuts, len(stream)]
    random_split = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    byte_at_a_time = [stream[i : i + 1] for i in range(len(stream))]
    assert run([stream]) == run(random_split) == run(byte_at_a_time) == frames_


def test_partial_frames_stay_buffered() -> None:
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    whole = f.frame(f.FrameType.DATA, 0, 1, b"hello") + f.frame(f.FrameType.PING, 0, 0, b"12345678")
    assert decoder.feed(whole[:11]) == []
    assert decoder.buffered == 11
    assert decoder.feed(whole[11:16]) == []
    (first,) = decoder.feed(whole[16:17])
    assert first.payload == b"hello"
    assert decoder.buffered == 0
    (second,) = decoder.feed(whole[17:])
    assert second.payload == b"12345678" and second.frame_type == f.FrameType.PING


def test_empty_and_max_size_payloads() -> None:
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    big = bytes(range(256)) * (f.MIN_MAX_FRAME // 256)
    out = decoder.feed(f.frame(f.FrameType.DATA, f.FLAG_FIN, 3, b"") + f.frame(f.FrameType.DATA, 0, 3, big))
    assert [(r.flags, r.payload) for r in out] == [(f.FLAG_FIN, b""), (0, big)]


# ------------------------------------------------------------------------------------------- framing errors


@pytest.mark.parametrize("max_frame", [f.MIN_MAX_FRAME, 65536, 100000])
def test_oversized_data_frame_is_detected_from_the_header_alone(max_frame: int) -> None:
    decoder = f.FrameDecoder(max_frame)
    assert decoder.feed(f.header(f.FrameType.DATA, 0, 1, max_frame)[:11]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(f.header(f.FrameType.DATA, 0, 1, max_frame + 1)[11:])
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_oversized_data_frame_detected_before_its_payload_and_after_good_frames() -> None:
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    good = f.frame(f.FrameType.DATA, 0, 1, b"x" * f.MIN_MAX_FRAME)
    assert len(decoder.feed(good)) == 1
    with pytest.raises(ProtocolError) as info:
        decoder.feed(f.header(f.FrameType.DATA, 0, 1, 2**32 - 1))
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("frame_type", [t for t in f.FrameType if t != f.FrameType.DATA] + [0x42])
def test_control_frames_larger_than_max_frame_are_refused(frame_type: int) -> None:
    """Spec section 2: every frame, not only DATA, obeys the receiver's ``max_frame`` (a 30 KB HELLO against
    max_frame 16384 used to be accepted)."""
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    (fr,) = decoder.feed(f.frame(frame_type, 0, 0, bytes(f.MIN_MAX_FRAME)))
    assert len(fr.payload) == f.MIN_MAX_FRAME
    with pytest.raises(ProtocolError) as info:
        decoder.feed(f.header(frame_type, 0, 0, 30_000))
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("frame_type", [f.FrameType.HELLO, f.FrameType.OPEN])
def test_hello_and_open_are_capped_at_64k_even_with_a_larger_max_frame(frame_type: int) -> None:
    """Spec section 6: HELLO and OPEN payloads are at most 64 KiB, whatever ``max_frame`` is."""
    decoder = f.FrameDecoder(1 << 20)
    (fr,) = decoder.feed(f.frame(frame_type, 0, 0, bytes(f.MAX_CONTROL_PAYLOAD)))
    assert len(fr.payload) == f.MAX_CONTROL_PAYLOAD
    with pytest.raises(ProtocolError) as info:
        decoder.feed(f.header(frame_type, 0, 0, f.MAX_CONTROL_PAYLOAD + 1))
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("frame_type", [f.FrameType.DATA, f.FrameType.PING, 0x42])
def test_other_frames_may_use_all_of_a_large_max_frame(frame_type: int) -> None:
    decoder = f.FrameDecoder(1 << 20)
    (fr,) = decoder.feed(f.frame(frame_type, 0, 0, bytes(f.MAX_CONTROL_PAYLOAD + 1)))
    assert len(fr.payload) == f.MAX_CONTROL_PAYLOAD + 1


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_framing_version_is_a_protocol_error(version: int) -> None:
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    # Detected from the 12-byte header, before (and regardless of) the length check.
    with pytest.raises(ProtocolError) as info:
        decoder.feed(raw(f.FrameType.DATA, 1, b"", version=version)[:12] + b"\xff" * 3)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">BBHII", version, 0, 0, 1, 2**32 - 1))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_wrong_version_in_a_later_frame() -> None:
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    stream = f.frame(f.FrameType.PING, 0, 0, b"12345678") + raw(f.FrameType.PING, 0, b"12345678", version=2)
    with pytest.raises(ProtocolError) as info:
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@FAST
@given(st.binary(min_size=0, max_size=200))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes) -> None:
    decoder = f.FrameDecoder(f.MIN_MAX_FRAME)
    try:
        decoder.feed(data)
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode)
        assert e.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_SIZE_ERROR)


# ------------------------------------------------------------------------------------------- reasons


def test_reason_short_is_unchanged() -> None:
    assert f.encode_reason("") == b""
    assert f.encode_reason("backend refused") == b"backend refused"
    assert f.encode_reason("x" * 1024) == b"x" * 1024


@pytest.mark.parametrize(
    ("char", "expected_chars"),
    [("x", 1024), ("\u00e9", 512), ("\u20ac", 341), ("\U0001f600", 256)],
)
def test_reason_cut_at_1024_bytes_on_a_character_boundary(char: str, expected_chars: int) -> None:
    encoded = f.encode_reason(char * 2000)
    assert len(encoded) <= f.MAX_REASON_BYTES
    assert encoded.decode("utf-8") == char * expected_chars


def test_reason_cut_inside_a_multibyte_character() -> None:
    # 1023 ASCII bytes then a 4-byte character: the character is dropped whole.
    encoded = f.encode_reason("a" * 1023 + "\U0001f600" + "tail")
    assert encoded == b"a" * 1023


@FAST
@given(st.text(max_size=1500))
def test_reason_encoding_property(reason: str) -> None:
    full = reason.encode("utf-8")
    encoded = f.encode_reason(reason)
    assert len(encoded) <= f.MAX_REASON_BYTES
    assert full.startswith(encoded)
    text = encoded.decode("utf-8")  # valid UTF-8: never cut inside a character
    assert reason.startswith(text)
    if len(full) > f.MAX_REASON_BYTES:
        assert len(encoded) > f.MAX_REASON_BYTES - 4
    else:
        assert encoded == full
    assert f.decode_reason(encoded) == text


def test_reason_with_lone_surrogates_does_not_raise() -> None:
    """Reasons often quote peer-supplied text (an OPEN host is JSON and may hold "\\ud800")."""
    encoded = f.encode_reason("cannot resolve \ud800.example")
    assert encoded.decode("utf-8").startswith("cannot resolve ")


def test_decode_reason_is_lenient_and_bounded() -> None:
    assert f.decode_reason(b"bad \xff byte") == "bad \ufffd byte"
    assert f.decode_reason(b"y" * 5000) == "y" * 1024
