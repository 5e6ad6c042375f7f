"""The hex test vectors of ``docs/tunnel-protocol.md`` (section 9) against the reference decoder and encoder.

The vectors are parsed from the document itself, so that the specification and the code cannot drift apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from connproxy.wire import frames as f
from connproxy.wire.errors import ErrorCode, ProtocolError
from connproxy.wire.session import Role, Session

SPEC = Path(__file__).resolve().parents[2] / "docs" / "tunnel-protocol.md"
_BLOCK = re.compile(r"^```hex-vector\n(.*?)^```", re.S | re.M)


def load_vectors() -> list[dict[str, str]]:
    """Every ``hex-vector`` block of the spec as a dict (``hex`` lines concatenated, spaces removed)."""
    vectors: list[dict[str, str]] = []
    for block in _BLOCK.findall(SPEC.read_text(encoding="utf-8")):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line.strip():
                continue
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "hex":
                fields["hex"] = fields.get("hex", "") + value.replace(" ", "")
            else:
                assert key not in fields, f"duplicate key {key} in vector {fields.get('name')}"
                fields[key] = value
        vectors.append(fields)
    return vectors


VECTORS = load_vectors()


def test_the_spec_has_vectors_of_every_frame_type_and_of_errors() -> None:
    types = {v["type"] for v in VECTORS if "type" in v}
    assert {t.name for t in f.FrameType} <= types
    assert any("error" in v for v in VECTORS) and any("listener-error" in v for v in VECTORS)
    assert len({v["name"] for v in VECTORS}) == len(VECTORS)


def _frame_type(name: str) -> int:
    return int(name, 16) if name.startswith("0x") else f.FrameType[name]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, str]) -> None:
    data = bytes.fromhex(vector["hex"])
    decoder = f.FrameDecoder(int(vector.get("max-frame", f.MIN_MAX_FRAME)))
    if "error" in vector:
        with pytest.raises(ProtocolError) as info:
            decoder.feed(data)
        assert info.value.code is ErrorCode[vector["error"]]
        return
    (frame,) = decoder.feed(data)
    assert decoder.buffered == 0
    assert frame.frame_type == _frame_type(vector["type"])
    assert frame.flags == int(vector["flags"], 16)
    assert frame.stream_id == int(vector["stream"])
    assert len(frame.payload) == int(vector["length"])
    payload = frame.payload
    if "payload" in vector:
        assert payload == bytes.fromhex(vector["payload"])
    if "json" in vector:
        assert json.loads(payload) == json.loads(vector["json"])
        assert payload == vector["json"].encode()
    if "increment" in vector:
        assert f.U32.unpack(payload) == (int(vector["increment"]),)
    if frame.frame_type == f.FrameType.RESET:
        (code,) = f.U32.unpack_from(payload)
        assert ErrorCode(code) is ErrorCode[vector["code"]]
        assert f.decode_reason(payload[4:]) == vector["reason"]
    if frame.frame_type == f.FrameType.GOAWAY:
        last, code = f.GOAWAY_HEAD.unpack_from(payload)
        assert (last, ErrorCode(code)) == (int(vector["last-stream"]), ErrorCode[vector["code"]])
        assert f.decode_reason(payload[8:]) == vector["reason"]
    # The encoder produces exactly these bytes.
    assert f.frame(frame.frame_type, frame.flags, frame.stream_id, payload) == data
    if "listener-error" in vector:
        with pytest.raises(ProtocolError) as info:
            Session(Role.LISTENER).receive_data(f.PREFACE + data)
        assert info.value.code is ErrorCode[vector["listener-error"]]


def test_a_changed_vector_would_fail() -> None:
    """The parser really reads the document: corrupting a vector's expected field makes the check fail."""
    vector = dict(next(v for v in VECTORS if v["name"] == "data-fin"))
    vector["payload"] = "6868"
    with pytest.raises(AssertionError):
        test_vector(vector)
