"""Tests for :mod:`connproxy.wire.session`: handshake, streams, flow control, priority, ping and properties.

Spec: ``docs/tunnel-protocol.md``. No reactor: two sessions are wired back to back (``wire_helpers.SessionPair``)
or fed hand-made frames. Flow-control tests read the session's private counters on purpose.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from connproxy.wire import frames as f
from connproxy.wire import session as session_module
from connproxy.wire.errors import ErrorCode, OpenTooLargeError, ProtocolError, StreamStateError
from connproxy.wire.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    OpenRequest,
    PingAcknowledged,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from connproxy.wire.session import UNPROCESSED_REASON, Role, Session, Settings

from .wire_helpers import (
    DIALER_HELLO,
    LISTENER_HELLO,
    SMALL,
    TARGET,
    SessionPair,
    Split,
    check_conservation,
    check_windows,
    chunks,
    conn_pending,
    conn_recv_window,
    conn_send_window,
    data_frame,
    decode,
    dialer_opening,
    goaway_frame,
    held,
    hello_payload,
    increment,
    of_type,
    open_frame,
    output_frames,
    pattern,
    raw,
    ready_listener,
    ready_pair,
    reset_code,
    reset_frame,
    summary,
    window_update,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

T = f.FrameType


def protocol_error(session: Session, data: bytes) -> ErrorCode:
    """Feed ``data`` and return the code of the ProtocolError it must raise."""
    with pytest.raises(ProtocolError) as info:
        session.receive_data(data)
    assert isinstance(info.value.code, ErrorCode)
    return info.value.code


def listener_after_preface(settings_: Settings | None = SMALL) -> Session:
    listener = Session(Role.LISTENER, settings_)
    assert listener.receive_data(f.PREFACE) == []
    return listener


def dialer_waiting_for_hello(settings_: Settings | None = SMALL) -> Session:
    dialer = Session(Role.DIALER, settings_)
    dialer.send_hello(DIALER_HELLO)
    dialer.take_output()
    return dialer


def listener_hello(**fields: Any) -> bytes:
    body: dict[str, Any] = {"version": 1, **LISTENER_HELLO, "settings": SMALL.to_json()}
    body.update(fields)
    return f.frame(T.HELLO, 0, 0, hello_payload(body))


# =========================================================================================== handshake


def test_handshake_exchanges_hellos_and_settings() -> None:
    dialer_settings = Settings(stream_window=1 << 20, connection_window=1 << 24, max_frame=32768, max_streams=7)
    pair = SessionPair(dialer_settings, SMALL)
    assert not pair.dialer.ready and not pair.dialer.can_open()
    at_dialer, at_listener = pair.handshake()

    assert at_listener.version == 1
    assert at_listener.hello["versions"] == [1]
    assert at_listener.hello["connector_id"] == "host-a"
    assert at_listener.hello["capabilities"] == ["half-close", "early-data"]
    assert at_listener.hello["settings"] == dialer_settings.to_json()
    assert at_dialer.version == 1
    assert at_dialer.hello["version"] == 1
    assert at_dialer.hello["tunnel_id"] == "account:///tenant-a"
    assert at_dialer.hello["settings"] == SMALL.to_json()

    assert pair.dialer.version == pair.listener.version == 1
    assert pair.dialer.peer_settings.to_json() == SMALL.to_json()
    assert pair.listener.peer_settings.to_json() == dialer_settings.to_json()
    assert pair.dialer.peer_hello == at_dialer.hello and pair.listener.peer_hello == at_listener.hello
    # The send windows start at what the peer announced.
    assert conn_send_window(pair.dialer) == SMALL.connection_window
    assert conn_send_window(pair.listener) == dialer_settings.connection_window
    assert pair.dialer.can_open() and pair.listener.can_open()


@pytest.mark.parametrize("split", [None, "bytes", 5, random.Random(7)], ids=["whole", "bytes", "5", "random"])
def test_handshake_in_any_split(split: Split) -> None:
    pair = ready_pair(split=split)
    assert pair.dialer.ready and pair.listener.ready


def test_dialer_sends_preface_then_hello_listener_no_preface() -> None:
    dialer = Session(Role.DIALER)
    dialer.send_hello({"connector_id": "c1"})
    out = b"".join(dialer.take_output())
    assert out.startswith(f.PREFACE)
    (hello,) = decode([out], strip_preface=True)
    assert (hello.frame_type, hello.stream_id, hello.flags) == (T.HELLO, 0, 0)
    body = json.loads(hello.payload)
    assert body == {"connector_id": "c1", "versions": [1], "settings": Settings().to_json()}

    listener = Session(Role.LISTENER)
    listener.receive_data(out)
    listener.send_hello({"replica_id": "r"})
    (answer,) = output_frames(listener)
    assert json.loads(answer.payload) == {"replica_id": "r", "version": 1, "settings": Settings().to_json()}


def test_send_hello_twice_is_a_local_error() -> None:
    dialer = Session(Role.DIALER)
    dialer.send_hello()
    with pytest.raises(StreamStateError):
        dialer.send_hello()


def test_open_before_the_handshake_is_a_local_error() -> None:
    pair = SessionPair()
    pair.dialer.send_hello()
    pair.shuttle()
    for session in (pair.dialer, pair.listener):
        assert not session.can_open()
        with pytest.raises(StreamStateError):
            session.open_stream(TARGET)


@pytest.mark.parametrize(
    "preface", [b"GET / HTTP/1.1\r\n", b"CPXTUN\n\n", b"\x16\x03\x01\x02\x00", b"cpxtun\r\n", b"CPXTUN\r\r"]
)
def test_bad_preface_is_detected_at_the_first_wrong_byte(preface: bytes) -> None:
    first_bad = next(i for i, (a, b) in enumerate(zip(preface, f.PREFACE, strict=False)) if a != b)
    listener = Session(Role.LISTENER)
    for i in range(first_bad):
        assert listener.receive_data(preface[i : i + 1]) == []
    assert protocol_error(listener, preface[first_bad:]) is ErrorCode.PROTOCOL_ERROR


def test_bad_preface_in_one_chunk() -> None:
    assert protocol_error(Session(Role.LISTENER), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") is ErrorCode.PROTOCOL_ERROR


def test_dialer_does_not_accept_a_preface() -> None:
    dialer = dialer_waiting_for_hello()
    assert protocol_error(dialer, f.PREFACE + listener_hello()) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("versions", [[2, 3], []])
def test_no_common_version(versions: list[Any]) -> None:
    listener = Session(Role.LISTENER)
    assert protocol_error(listener, dialer_opening(versions=versions)) is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("versions", [["1"], [1.5], [None], [True], [1, True], "1", 1, {"1": 1}])
def test_malformed_versions_are_a_protocol_error(versions: Any) -> None:
    """``[true]`` is no version 1 (bool is an int in Python): every entry must be a JSON integer."""
    listener = Session(Role.LISTENER)
    assert protocol_error(listener, dialer_opening(versions=versions)) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "extra",
    [
        {"connector_id": 1},
        {"subaccount": True},
        {"location": None},
        {"capabilities": "half-close"},
        {"capabilities": [True]},
        {"settings": []},
        {"settings": {"stream_window": True}},
        {"settings": {"max_frame": 65536.0}},
    ],
)
def test_hello_fields_have_exact_types(extra: dict[str, Any]) -> None:
    listener = Session(Role.LISTENER)
    assert protocol_error(listener, dialer_opening(**extra)) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("versions", ["1", 1, None, {"1": 1}])
def test_versions_not_a_list(versions: Any) -> None:
    listener = Session(Role.LISTENER)
    assert protocol_error(listener, dialer_opening(versions=versions)) is ErrorCode.PROTOCOL_ERROR


def test_unsupported_version_ends_with_goaway_the_dialer_sees() -> None:
    """The listener answers GOAWAY UNSUPPORTED_VERSION; GOAWAY is allowed before HELLO (spec 3.1)."""
    pair = SessionPair()
    pair.dialer.send_hello()
    out = b"".join(pair.dialer.take_output())
    body = json.loads(decode([out], strip_preface=True)[0].payload)
    body["versions"] = [9]
    with pytest.raises(ProtocolError) as info:
        pair.listener.receive_data(f.PREFACE + f.frame(T.HELLO, 0, 0, hello_payload(body)))
    pair.listener.go_away(info.value.code, str(info.value))
    assert pair.listener.terminated
    dialer_events, _ = pair.shuttle()
    assert len(dialer_events) == 1
    event = dialer_events[0]
    assert isinstance(event, GoAwayReceived)
    assert (event.last_stream_id, event.code) == (0, ErrorCode.UNSUPPORTED_VERSION)
    assert not pair.dialer.can_open()


def test_highest_common_version_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "SUPPORTED_VERSIONS", (1, 2, 3))
    listener = Session(Role.LISTENER)
    (event,) = listener.receive_data(dialer_opening(versions=[7, 2, 1, 3]))
    assert isinstance(event, HelloReceived) and event.version == 3 == listener.version
    listener.send_hello()
    (answer,) = output_frames(listener)
    assert json.loads(answer.payload)["version"] == 3


def test_a_supported_version_among_unknown_ones() -> None:
    listener = Session(Role.LISTENER)
    (event,) = listener.receive_data(dialer_opening(versions=[5, 1, 4]))
    assert isinstance(event, HelloReceived) and event.version == 1


@pytest.mark.parametrize("version", [2, 0, None, "1", [1], True, 1.0], ids=repr)
def test_dialer_refuses_a_version_it_does_not_support(version: Any) -> None:
    dialer = dialer_waiting_for_hello()
    assert protocol_error(dialer, listener_hello(version=version)) is ErrorCode.UNSUPPORTED_VERSION
    assert dialer.version is None


def test_dialer_refuses_a_hello_without_version() -> None:
    dialer = dialer_waiting_for_hello()
    body = {**LISTENER_HELLO, "settings": SMALL.to_json()}
    assert protocol_error(dialer, f.frame(T.HELLO, 0, 0, hello_payload(body))) is ErrorCode.UNSUPPORTED_VERSION


def test_dialer_refuses_a_hello_before_its_own() -> None:
    dialer = Session(Role.DIALER)
    assert protocol_error(dialer, listener_hello()) is ErrorCode.PROTOCOL_ERROR


PRE_HELLO_FRAMES = {
    "DATA": data_frame(1, b"x"),
    "DATA-empty-FIN": data_frame(1, b"", fin=True),
    "OPEN": open_frame(1),
    "ACCEPT": f.frame(T.ACCEPT, 0, 2),
    "RESET": reset_frame(1, ErrorCode.CANCEL),
    "WINDOW_UPDATE-session": window_update(0, 100),
    "WINDOW_UPDATE-stream": window_update(1, 100),
    "unknown-type": raw(0x42, 0, b"future"),
}


@pytest.mark.parametrize("frame", PRE_HELLO_FRAMES.values(), ids=PRE_HELLO_FRAMES.keys())
def test_frames_before_hello_are_protocol_errors_at_the_listener(frame: bytes) -> None:
    assert protocol_error(listener_after_preface(), frame) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("frame", PRE_HELLO_FRAMES.values(), ids=PRE_HELLO_FRAMES.keys())
def test_frames_before_hello_are_protocol_errors_at_the_dialer(frame: bytes) -> None:
    assert protocol_error(dialer_waiting_for_hello(), frame) is ErrorCode.PROTOCOL_ERROR


def test_ping_and_goaway_are_allowed_before_hello() -> None:
    listener = listener_after_preface()
    assert listener.receive_data(f.frame(T.PING, 0, 0, b"early!!!")) == []
    (pong,) = output_frames(listener)
    assert (pong.frame_type, pong.flags, pong.payload) == (T.PING, f.FLAG_ACK, b"early!!!")
    events = listener.receive_data(goaway_frame(0, ErrorCode.SHUTTING_DOWN, b"bye"))
    assert events == [GoAwayReceived(0, ErrorCode.SHUTTING_DOWN, "bye")]

    dialer = dialer_waiting_for_hello()
    assert dialer.receive_data(f.frame(T.PING, f.FLAG_ACK, 0, b"12345678")) == [PingAcknowledged(b"12345678")]
    assert dialer.receive_data(goaway_frame(0, ErrorCode.AUTH_FAILED, b"no")) == [
        GoAwayReceived(0, ErrorCode.AUTH_FAILED, "no")
    ]


def test_second_hello_is_a_protocol_error() -> None:
    pair = ready_pair()
    assert protocol_error(pair.listener, f.frame(T.HELLO, 0, 0, hello_payload({"versions": [1]}))) is (
        ErrorCode.PROTOCOL_ERROR
    )
    assert protocol_error(pair.dialer, listener_hello()) is ErrorCode.PROTOCOL_ERROR


def test_hello_on_a_stream_is_a_protocol_error() -> None:
    listener = listener_after_preface()
    body = hello_payload({"versions": [1]})
    assert protocol_error(listener, f.frame(T.HELLO, 0, 1, body)) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"[1]", b'"hello"', b"null", b"\xff\xfe{}", b'{"versions": [1]' + b"\xc3"],
    ids=["empty", "truncated", "array", "string", "null", "not-utf8", "bad-utf8-tail"],
)
def test_bad_hello_payloads(payload: bytes) -> None:
    listener = listener_after_preface()
    assert protocol_error(listener, f.frame(T.HELLO, 0, 0, payload)) is ErrorCode.PROTOCOL_ERROR


def test_deeply_nested_hello_is_a_protocol_error_not_a_crash() -> None:
    """json.loads raises RecursionError on deep nesting; a peer must not be able to raise anything else."""
    listener = listener_after_preface()
    payload = b'{"versions": [1], "x": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    payload = payload[: f.MIN_MAX_FRAME]  # truncated to what any listener accepts: still deep before it is invalid
    assert protocol_error(listener, f.frame(T.HELLO, 0, 0, payload)) is ErrorCode.PROTOCOL_ERROR
    dialer = dialer_waiting_for_hello()
    deep = b'{"version": 1, "x": ' + b"[" * 8000 + b"]" * 8000 + b"}"
    assert protocol_error(dialer, f.frame(T.HELLO, 0, 0, deep)) is ErrorCode.PROTOCOL_ERROR


def test_hello_larger_than_64k_is_a_frame_size_error() -> None:
    listener = listener_after_preface()
    assert protocol_error(listener, f.header(T.HELLO, 0, 0, 65537)) is ErrorCode.FRAME_SIZE_ERROR


def test_unknown_hello_keys_and_capabilities_are_ignored() -> None:
    listener = Session(Role.LISTENER)
    (event,) = listener.receive_data(
        dialer_opening(capabilities=["teleport"], future={"a": [1, 2]}, settings={"stream_window": 65536, "x": 1})
    )
    assert isinstance(event, HelloReceived)
    assert listener.peer_settings == Settings(stream_window=65536)


# ------------------------------------------------------------------------------------------- settings


def test_settings_defaults_match_spec_section_6() -> None:
    s = Settings()
    assert (s.stream_window, s.connection_window, s.max_frame, s.max_streams) == (4 << 20, 64 << 20, 65536, 10000)
    assert s.connection_window > s.stream_window  # spec 3.4: no head-of-line blocking


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Settings()),
        ({}, Settings()),
        ({"max_frame": 16384}, Settings(max_frame=16384)),
        ({"max_frame": 16777215, "max_streams": 1}, Settings(max_frame=16777215, max_streams=1)),
        ({"stream_window": 1, "connection_window": 2}, Settings(stream_window=1, connection_window=2)),
        ({"connection_window": 2**31 - 1}, Settings(connection_window=2**31 - 1)),
        ({"max_streams": 10**9, "unknown": "x"}, Settings(max_streams=10**9)),
    ],
)
def test_settings_from_json(value: Any, expected: Settings) -> None:
    """What a peer announced (its streams' initial window as ``stream_window``) survives the round trip."""
    parsed = Settings.from_json(value)
    assert parsed.to_json() == expected.to_json()
    assert parsed.initial_stream_window == expected.initial_stream_window
    assert Settings.from_json(expected.to_json()).to_json() == expected.to_json()


def test_hello_announces_the_initial_stream_window() -> None:
    """Spec 3.4: streams start at 256 KiB (or the stream window, if smaller) and grow towards the stream window."""
    assert Settings().to_json()["stream_window"] == 256 * 1024
    assert Settings(stream_window=65536).to_json()["stream_window"] == 65536
    peer = Settings.from_json({"stream_window": 1 << 20})
    assert peer.initial_stream_window == 1 << 20


BAD_SETTINGS = [
    [],
    "fast",
    7,
    {"stream_window": "65536"},
    {"stream_window": 65536.0},
    {"stream_window": True},
    {"stream_window": None},
    {"stream_window": 0},
    {"stream_window": -1},
    {"stream_window": 2**31},
    {"connection_window": 1024},  # below the default stream window
    {"stream_window": 2**20, "connection_window": 2**19},
    {"connection_window": 2**31},
    {"max_frame": 16383},
    {"max_frame": 16777216},
    {"max_frame": [65536]},
    {"max_streams": 0},
    {"max_streams": -5},
    {"max_streams": False},
]


@pytest.mark.parametrize("value", BAD_SETTINGS, ids=repr)
def test_bad_settings_are_protocol_errors(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        Settings.from_json(value)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    # ... and end the session when they arrive in a HELLO.
    listener = Session(Role.LISTENER)
    assert protocol_error(listener, dialer_opening(settings=value)) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stream_window": 0},
        {"stream_window": 2**31},
        {"stream_window": 2**20, "connection_window": 2**19},
        {"max_frame": 1000},
        {"max_streams": 0},
    ],
)
def test_settings_constructor_validates(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Settings(**kwargs)


# =========================================================================================== opening streams


def test_stream_id_parity_and_order() -> None:
    pair = ready_pair()
    assert [pair.open() for _ in range(3)] == [1, 3, 5]
    assert [pair.open(pair.listener) for _ in range(2)] == [2, 4]
    assert sorted(pair.dialer.stream_ids()) == sorted(pair.listener.stream_ids()) == [1, 2, 3, 4, 5]
    assert pair.dialer.open_streams == pair.listener.open_streams == 5


def test_open_carries_target_and_metadata() -> None:
    pair = ready_pair()
    request = OpenRequest(host="10.1.2.3", port=8443, kind="http", meta={"tenant": "t", "client": "10.0.0.7:5"})
    stream_id = pair.dialer.open_stream(request)
    (frame,) = output_frames(pair.dialer)
    assert (frame.frame_type, frame.stream_id) == (T.OPEN, stream_id)
    assert json.loads(frame.payload) == {"host": "10.1.2.3", "port": 8443, "kind": "http", "meta": request.meta}
    assert pair.listener.receive_data(frame_bytes(frame)) == [StreamOpened(stream_id, request)]


def frame_bytes(frame: f.RawFrame) -> bytes:
    return f.frame(frame.frame_type, frame.flags, frame.stream_id, frame.payload)


def test_open_defaults_and_unknown_keys() -> None:
    listener = ready_listener()
    events = listener.receive_data(open_frame(1, {"host": "h", "port": 1, "future": True}))
    assert events == [StreamOpened(1, OpenRequest("h", 1, "tcp", {}))]
    events = listener.receive_data(open_frame(3, {"host": "::1", "port": 65535, "kind": "x", "meta": {"k": [1]}}))
    assert events == [StreamOpened(3, OpenRequest("::1", 65535, "x", {"k": [1]}))]


def test_accept() -> None:
    pair = ready_pair()
    stream_id = pair.dialer.open_stream(TARGET)
    _, listener_events = pair.shuttle()
    assert listener_events == [StreamOpened(stream_id, TARGET)]
    pair.listener.accept_stream(stream_id)
    frames = output_frames(pair.listener)
    assert summary(frames) == [("ACCEPT", stream_id)] and frames[0].payload == b""
    assert pair.dialer.receive_data(frame_bytes(frames[0])) == [StreamAccepted(stream_id)]


def test_accept_with_a_json_payload_is_fine() -> None:
    """ACCEPT may carry a (reserved) JSON object."""
    pair = ready_pair()
    stream_id = pair.dialer.open_stream(TARGET)
    pair.shuttle()
    assert pair.dialer.receive_data(f.frame(T.ACCEPT, 0, stream_id, b'{"later": 1}')) == [StreamAccepted(stream_id)]


def test_accept_twice_is_a_protocol_error() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    assert protocol_error(pair.dialer, f.frame(T.ACCEPT, 0, stream_id)) is ErrorCode.PROTOCOL_ERROR


def test_accept_of_a_stream_the_peer_opened_is_a_protocol_error() -> None:
    listener = ready_listener()
    listener.receive_data(open_frame(1))
    assert protocol_error(listener, f.frame(T.ACCEPT, 0, 1)) is ErrorCode.PROTOCOL_ERROR


def test_accept_stream_local_misuse() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    with pytest.raises(StreamStateError):
        pair.listener.accept_stream(stream_id)  # already accepted
    own = pair.dialer.open_stream(TARGET)
    with pytest.raises(StreamStateError):
        pair.dialer.accept_stream(own)  # we opened it: only the peer accepts it
    with pytest.raises(StreamStateError):
        pair.listener.accept_stream(99)


@pytest.mark.parametrize("stream_id", [2, 4, 0])
def test_open_with_our_parity_or_zero_is_a_protocol_error(stream_id: int) -> None:
    assert protocol_error(ready_listener(), open_frame(stream_id)) is ErrorCode.PROTOCOL_ERROR


def test_open_ids_must_increase() -> None:
    listener = ready_listener()
    listener.receive_data(open_frame(5))
    assert protocol_error(listener, open_frame(5)) is ErrorCode.PROTOCOL_ERROR
    listener = ready_listener()
    listener.receive_data(open_frame(5))
    assert protocol_error(listener, open_frame(3)) is ErrorCode.PROTOCOL_ERROR


def test_open_may_skip_ids() -> None:
    listener = ready_listener()
    assert len(listener.receive_data(open_frame(1) + open_frame(7))) == 2
    # A skipped ID counts as used: a late frame for it is stale, not a protocol error.
    assert listener.receive_data(f.frame(T.RESET, 0, 3, f.U32.pack(0))) == []


BAD_OPENS: dict[str, bytes] = {
    "not-json": b"not json",
    "not-utf8": b"\xff\xfe",
    "array": b"[1]",
    "empty": b"",
    "no-host": json.dumps({"port": 443}).encode(),
    "no-port": json.dumps({"host": "h"}).encode(),
    "empty-host": json.dumps({"host": "", "port": 1}).encode(),
    "host-not-str": json.dumps({"host": 7, "port": 1}).encode(),
    "long-host": json.dumps({"host": "x" * 256, "port": 1}).encode(),
    "port-0": json.dumps({"host": "h", "port": 0}).encode(),
    "port-65536": json.dumps({"host": "h", "port": 65536}).encode(),
    "port-str": json.dumps({"host": "h", "port": "443"}).encode(),
    "port-bool": json.dumps({"host": "h", "port": True}).encode(),
    "port-float": json.dumps({"host": "h", "port": 443.0}).encode(),
    "kind-not-str": json.dumps({"host": "h", "port": 1, "kind": 5}).encode(),
    "meta-not-object": json.dumps({"host": "h", "port": 1, "meta": []}).encode(),
    "deep-nesting": b'{"host": "h", "port": 1, "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("payload", BAD_OPENS.values(), ids=BAD_OPENS.keys())
def test_bad_open_resets_that_stream_and_the_session_survives(payload: bytes) -> None:
    listener = ready_listener()
    early = b"early data" * 100
    events = listener.receive_data(open_frame(1, payload=payload) + data_frame(1, early, fin=True))
    assert events == []
    (reset,) = output_frames(listener)
    assert (reset.frame_type, reset.stream_id, reset_code(reset)) == (T.RESET, 1, ErrorCode.PROTOCOL_ERROR)
    assert not listener.has_stream(1)
    # The early data of the refused stream was discarded and its session credit returned at once.
    assert held(listener) == 0
    assert conn_recv_window(listener) + conn_pending(listener) == SMALL.connection_window
    # The ID is used up; the session goes on.
    assert protocol_error(ready_listener(), open_frame(1, payload=payload) + open_frame(1)) is (
        ErrorCode.PROTOCOL_ERROR
    )
    assert listener.receive_data(open_frame(3)) == [StreamOpened(3, OpenRequest("erp.internal", 443))]


def test_max_streams_exceeded_is_refused_stream_not_a_session_error() -> None:
    listener = ready_listener(Settings(stream_window=32768, connection_window=131072, max_streams=2))
    assert len(listener.receive_data(open_frame(1) + open_frame(3))) == 2
    assert listener.receive_data(open_frame(5) + data_frame(5, b"x" * 1000)) == []
    (reset,) = output_frames(listener)
    assert (reset.stream_id, reset_code(reset)) == (5, ErrorCode.REFUSED_STREAM)
    assert held(listener) == 0
    # A stream that ends makes room again.
    assert listener.receive_data(reset_frame(1, ErrorCode.CANCEL)) == [StreamReset(1, ErrorCode.CANCEL, "")]
    assert listener.receive_data(open_frame(7)) == [StreamOpened(7, OpenRequest("erp.internal", 443))]
    assert listener.receive_data(open_frame(9)) == []
    assert reset_code(output_frames(listener)[0]) == ErrorCode.REFUSED_STREAM
    # A stream the listener resets makes room too.
    listener.reset_stream(3, ErrorCode.CANCEL)
    assert listener.receive_data(open_frame(11)) == [StreamOpened(11, OpenRequest("erp.internal", 443))]


def test_opener_respects_the_peers_max_streams() -> None:
    pair = ready_pair(listener_settings=Settings(stream_window=32768, connection_window=131072, max_streams=2))
    first, second = pair.open(), pair.open()
    assert not pair.dialer.can_open()
    with pytest.raises(StreamStateError):
        pair.dialer.open_stream(TARGET)
    # Streams the peer opens do not count.
    pair.open(pair.listener)
    assert not pair.dialer.can_open()
    pair.dialer.send_data(first, b"bye", end_stream=True)
    pair.listener.end_stream(first)
    pair.shuttle()
    assert not pair.dialer.has_stream(first)
    assert pair.dialer.can_open()
    assert pair.open() == 5 and second == 3


def test_after_local_goaway_opens_are_refused_and_streams_go_on() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.listener.go_away(ErrorCode.NORMAL, "rolling restart")
    pair.listener.go_away(ErrorCode.SHUTTING_DOWN, "twice")  # only the first call sends
    frames = output_frames(pair.listener)
    assert summary(frames) == [("GOAWAY", 0)]
    last, code = f.GOAWAY_HEAD.unpack_from(frames[0].payload)
    assert (last, code, frames[0].payload[8:]) == (stream_id, ErrorCode.NORMAL, b"rolling restart")
    assert not pair.listener.terminated and not pair.listener.can_open()

    dialer_events = pair.dialer.receive_data(frame_bytes(frames[0]))
    assert dialer_events == [GoAwayReceived(stream_id, ErrorCode.NORMAL, "rolling restart")]
    # An OPEN already in flight is refused with REFUSED_STREAM ...
    assert pair.listener.receive_data(open_frame(7) + data_frame(7, b"early")) == []
    (reset,) = output_frames(pair.listener)
    assert (reset.stream_id, reset_code(reset)) == (7, ErrorCode.REFUSED_STREAM)
    assert held(pair.listener) == 0
    # ... while the existing stream still works both ways.
    pair.dialer.send_data(stream_id, b"ping", end_stream=True)
    pair.listener.send_data(stream_id, b"pong", end_stream=True)
    dialer_events, listener_events = pair.shuttle()
    assert listener_events == [DataReceived(stream_id, b"ping"), StreamEnded(stream_id)]
    assert dialer_events == [DataReceived(stream_id, b"pong"), StreamEnded(stream_id)]


def test_goaway_with_an_error_terminates() -> None:
    pair = ready_pair()
    pair.listener.go_away(ErrorCode.PROTOCOL_ERROR, "bad")
    assert pair.listener.terminated
    assert pair.listener.receive_data(open_frame(1)) == []
    assert not pair.listener.can_open()


def test_after_remote_goaway_no_new_streams() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    events = pair.dialer.receive_data(goaway_frame(stream_id, ErrorCode.SHUTTING_DOWN, "restart \u2603".encode()))
    assert events == [GoAwayReceived(stream_id, ErrorCode.SHUTTING_DOWN, "restart \u2603")]
    assert pair.dialer.remote_goaway and not pair.dialer.can_open()
    with pytest.raises(StreamStateError):
        pair.dialer.open_stream(TARGET)
    # Existing streams continue.
    assert pair.dialer.send_data(stream_id, b"still here") == 10
    _, listener_events = pair.shuttle()
    assert listener_events == [DataReceived(stream_id, b"still here")]


def test_goaway_fails_streams_past_its_last_stream_id_at_once() -> None:
    """Spec 3.6: streams we opened past the GOAWAY's last stream ID were not processed; they fail at once with
    REFUSED_STREAM (so the opener may retry elsewhere), the ones up to it go on."""
    pair = ready_pair()
    seen = pair.open()
    unseen = [pair.dialer.open_stream(TARGET), pair.dialer.open_stream(TARGET)]
    pair.dialer.take_output()  # their OPENs never reach the listener
    events = pair.dialer.receive_data(goaway_frame(seen, ErrorCode.SHUTTING_DOWN, b"restart"))
    assert events == [GoAwayReceived(seen, ErrorCode.SHUTTING_DOWN, "restart")] + [
        StreamReset(i, ErrorCode.REFUSED_STREAM, UNPROCESSED_REASON, remote=False) for i in unseen
    ]
    assert pair.dialer.has_stream(seen) and not any(pair.dialer.has_stream(i) for i in unseen)
    assert pair.dialer.open_streams == 1


def test_open_larger_than_the_peers_max_frame_is_refused_locally() -> None:
    pair = ready_pair()  # the listener's max_frame is 16384
    big = OpenRequest("h", 1, "tcp", {"x": "y" * 20000})
    with pytest.raises(OpenTooLargeError):
        pair.dialer.open_stream(big)
    assert pair.dialer.take_output() == [] and pair.dialer.open_streams == 0


def test_a_hello_larger_than_the_listeners_max_frame_is_refused() -> None:
    """A 30 KB HELLO against max_frame 16384 is a FRAME_SIZE_ERROR (it used to pass up to 64 KiB)."""
    listener = Session(Role.LISTENER, Settings(max_frame=16384))
    opening = dialer_opening(padding="x" * 30000)
    assert protocol_error(listener, opening) is ErrorCode.FRAME_SIZE_ERROR
    with pytest.raises(ValueError):
        Session(Role.DIALER).send_hello({"padding": "x" * 30000})


def test_goaway_details() -> None:
    listener = ready_listener()
    assert listener.receive_data(goaway_frame(0, 999, b"\xffx")) == [
        GoAwayReceived(0, ErrorCode.INTERNAL_ERROR, "\ufffdx")
    ]
    assert protocol_error(ready_listener(), f.frame(T.GOAWAY, 0, 0, b"\0" * 7)) is ErrorCode.PROTOCOL_ERROR
    assert protocol_error(ready_listener(), f.frame(T.GOAWAY, 0, 1, b"\0" * 8)) is ErrorCode.PROTOCOL_ERROR


# =========================================================================================== data and closing


def test_early_data_before_accept_is_delivered_and_counted() -> None:
    pair = ready_pair()
    stream_id = pair.dialer.open_stream(TARGET)
    assert pair.dialer.send_data(stream_id, b"GET / HTTP/1.1\r\n\r\n", end_stream=True) == 18
    dialer_events, listener_events = pair.shuttle()
    assert dialer_events == []
    assert listener_events == [
        StreamOpened(stream_id, TARGET),
        DataReceived(stream_id, b"GET / HTTP/1.1\r\n\r\n"),
        StreamEnded(stream_id),
    ]
    # Held, unacknowledged: no credit went back.
    assert held(pair.listener) == 18
    assert conn_send_window(pair.dialer) == SMALL.connection_window - 18
    pair.listener.accept_stream(stream_id)
    pair.listener.send_data(stream_id, b"HTTP/1.1 200 OK\r\n\r\n", end_stream=True)
    dialer_events, _ = pair.shuttle()
    assert dialer_events == [
        StreamAccepted(stream_id),
        DataReceived(stream_id, b"HTTP/1.1 200 OK\r\n\r\n"),
        StreamEnded(stream_id),
    ]
    assert not pair.dialer.has_stream(stream_id) and not pair.listener.has_stream(stream_id)


def test_early_data_is_bounded_by_the_initial_stream_window() -> None:
    pair = ready_pair()
    stream_id = pair.dialer.open_stream(TARGET)
    assert pair.dialer.send_data(stream_id, b"x" * (SMALL.stream_window + 100), end_stream=True) == SMALL.stream_window
    assert pair.dialer.send_window(stream_id) == 0
    _, listener_events = pair.shuttle()
    assert sum(len(e.data) for e in listener_events if isinstance(e, DataReceived)) == SMALL.stream_window
    assert not any(isinstance(e, StreamEnded) for e in listener_events)  # FIN only with the last byte


def test_early_data_of_a_refused_stream_returns_session_credit_once_acknowledged() -> None:
    pair = ready_pair()
    stream_id = pair.dialer.open_stream(TARGET)
    pair.dialer.send_data(stream_id, b"e" * SMALL.stream_window)
    pair.shuttle()
    pair.listener.reset_stream(stream_id, ErrorCode.ACCESS_DENIED, "no rule")
    frames = output_frames(pair.listener)
    # The refused stream's held data is dropped: its session credit goes back with the RESET, exactly once.
    assert summary(frames) == [("RESET", stream_id), ("WINDOW_UPDATE", 0)]
    assert increment(frames[1]) == SMALL.stream_window
    assert held(pair.listener) == 0
    dialer_events = pair.dialer.receive_data(b"".join(frame_bytes(fr) for fr in frames))
    assert dialer_events == [StreamReset(stream_id, ErrorCode.ACCESS_DENIED, "no rule"), WindowUpdated(0)]
    assert conn_send_window(pair.dialer) == SMALL.connection_window
    pair.listener.acknowledge(stream_id, SMALL.stream_window)  # the glue's late acknowledgement: nothing more
    assert pair.listener.take_output() == []


@pytest.mark.parametrize("first", ["dialer", "listener"])
def test_round_trip_with_half_close_each_way(first: str) -> None:
    pair = ready_pair()
    stream_id = pair.open()
    a, b = (pair.dialer, pair.listener) if first == "dialer" else (pair.listener, pair.dialer)

    def events_of(session: Session, events: tuple[list[Event], list[Event]]) -> list[Event]:
        return events[0] if session is pair.dialer else events[1]

    assert a.send_data(stream_id, b"request", end_stream=True) == 7
    assert a.send_window(stream_id) == 0
    with pytest.raises(StreamStateError):
        a.send_data(stream_id, b"more")
    with pytest.raises(StreamStateError):
        a.end_stream(stream_id)
    assert events_of(b, pair.shuttle()) == [DataReceived(stream_id, b"request"), StreamEnded(stream_id)]
    # Half-closed: both still have the stream, b can still send.
    assert a.has_stream(stream_id) and b.has_stream(stream_id)
    assert b.send_data(stream_id, b"response 1") == 10
    assert b.send_data(stream_id, b"") == 0
    assert b.send_data(stream_id, b"response 2") == 10
    assert events_of(a, pair.shuttle()) == [DataReceived(stream_id, b"response 1"), DataReceived(stream_id, b"response 2")]
    assert a.has_stream(stream_id) and b.has_stream(stream_id)
    b.send_data(stream_id, b"", end_stream=True)  # an empty DATA with FIN
    frames = output_frames(b)
    assert [(fr.frame_type, fr.flags, fr.payload) for fr in frames] == [(T.DATA, f.FLAG_FIN, b"")]
    assert not b.has_stream(stream_id)  # b sent and received FIN
    assert a.has_stream(stream_id)
    assert a.receive_data(frame_bytes(frames[0])) == [StreamEnded(stream_id)]
    assert not a.has_stream(stream_id)
    assert a.open_streams == b.open_streams == 0
    # Acknowledging after the close still returns the session credit.
    a.acknowledge(stream_id, 20)
    b.acknowledge(stream_id, 7)
    assert held(a) == held(b) == 0


def test_data_after_fin_resets_the_stream_with_stream_closed() -> None:
    listener = ready_listener()
    listener.receive_data(open_frame(1))
    assert listener.receive_data(data_frame(1, b"last", fin=True)) == [DataReceived(1, b"last"), StreamEnded(1)]
    events = listener.receive_data(data_frame(1, b"more"))
    assert events == [StreamReset(1, ErrorCode.STREAM_CLOSED, "DATA after FIN", remote=False)]
    (reset,) = output_frames(listener)
    assert (reset.frame_type, reset.stream_id, reset_code(reset)) == (T.RESET, 1, ErrorCode.STREAM_CLOSED)
    assert not listener.has_stream(1)
    # The offending bytes were never delivered, and the stream's delivered bytes are the application's to drop:
    # all their session credit comes back with the reset, without an acknowledgement.
    assert held(listener) == 0
    listener.acknowledge(1, 4)
    assert conn_recv_window(listener) + conn_pending(listener) == SMALL.connection_window
    # The session survives.
    assert listener.receive_data(open_frame(3)) == [StreamOpened(3, OpenRequest("erp.internal", 443))]


def test_reset_received() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.listener.send_data(stream_id, b"x" * 1000)
    pair.shuttle()
    events = pair.dialer.receive_data(reset_frame(stream_id, ErrorCode.BACKEND_RESET, b"peer reset"))
    assert events == [StreamReset(stream_id, ErrorCode.BACKEND_RESET, "peer reset", remote=True)]
    assert not pair.dialer.has_stream(stream_id)
    with pytest.raises(StreamStateError):
        pair.dialer.send_data(stream_id, b"x")
    # Frames that were in flight for the stream are ignored, but DATA still returns session credit.
    late = (
        data_frame(stream_id, b"y" * 5000)
        + window_update(stream_id, 10)
        + f.frame(T.ACCEPT, 0, stream_id)
        + reset_frame(stream_id, ErrorCode.CANCEL)
        + data_frame(stream_id, b"", fin=True)
    )
    assert pair.dialer.receive_data(late) == []
    # The reset stream's 1000 undelivered bytes and the late 5000 all returned their session credit.
    assert held(pair.dialer) == 0
    assert conn_recv_window(pair.dialer) + conn_pending(pair.dialer) == SMALL.connection_window


def test_reset_details() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    long_reason = b"r" * 3000
    assert pair.dialer.receive_data(reset_frame(stream_id, 4242, long_reason)) == [
        StreamReset(stream_id, ErrorCode.INTERNAL_ERROR, "r" * 1024)
    ]
    pair = ready_pair()
    stream_id = pair.open()
    assert protocol_error(pair.dialer, f.frame(T.RESET, 0, stream_id, b"\0\0\0")) is ErrorCode.FRAME_SIZE_ERROR


def test_local_reset() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.reset_stream(stream_id, ErrorCode.CANCEL, "client went away \u2603")
    (frame,) = output_frames(pair.dialer)
    assert (frame.stream_id, reset_code(frame), frame.payload[4:].decode()) == (
        stream_id,
        ErrorCode.CANCEL,
        "client went away \u2603",
    )
    assert not pair.dialer.has_stream(stream_id)
    pair.dialer.reset_stream(stream_id, ErrorCode.CANCEL)  # gone: ignored
    pair.dialer.reset_stream(77, ErrorCode.CANCEL)  # unknown: ignored
    assert pair.dialer.take_output() == []
    with pytest.raises(StreamStateError):
        pair.dialer.end_stream(stream_id)
    assert pair.listener.receive_data(frame_bytes(frame)) == [
        StreamReset(stream_id, ErrorCode.CANCEL, "client went away \u2603")
    ]


def test_reset_reason_is_cut_to_1024_bytes() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.reset_stream(stream_id, ErrorCode.CANCEL, "\u20ac" * 1000)
    (frame,) = output_frames(pair.dialer)
    assert frame.payload[4:].decode() == "\u20ac" * 341


NEVER_OPENED = {
    "WINDOW_UPDATE": lambda sid: window_update(sid, 100),
    "ACCEPT": lambda sid: f.frame(T.ACCEPT, 0, sid),
    "RESET": lambda sid: reset_frame(sid, ErrorCode.CANCEL),
    # Spec 3.3 says "DATA ... on a stream never opened, is a STREAM_CLOSED reset of that stream (not a session
    # error)"; the code treats it as a PROTOCOL_ERROR like HTTP/2 does (DATA on an idle stream). The brief asks
    # for PROTOCOL_ERROR; see the report: the lead decides, then this case follows.
    "DATA": lambda sid: data_frame(sid, b"x"),
}


@pytest.mark.parametrize("make", NEVER_OPENED.values(), ids=NEVER_OPENED.keys())
@pytest.mark.parametrize("stream_id", [1, 9, 2, 6], ids=["peer-parity", "peer-parity-high", "our-parity", "ours-high"])
def test_frames_for_ids_never_opened_are_protocol_errors(make: Any, stream_id: int) -> None:
    assert protocol_error(ready_listener(), make(stream_id)) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "frame",
    [data_frame(0, b"x"), open_frame(0), f.frame(T.ACCEPT, 0, 0), reset_frame(0, 0)],
    ids=["DATA", "OPEN", "ACCEPT", "RESET"],
)
def test_stream_frames_on_stream_zero_are_protocol_errors(frame: bytes) -> None:
    assert protocol_error(ready_listener(), frame) is ErrorCode.PROTOCOL_ERROR


def test_unknown_frame_types_and_flags_are_ignored() -> None:
    listener = ready_listener()
    assert listener.receive_data(raw(0x08, 0, b"x" * 100) + raw(0xFF, 5, b"", flags=0xFFFF)) == []
    listener.receive_data(open_frame(1))
    # Unknown DATA flags: no FIN.
    assert listener.receive_data(raw(T.DATA, 1, b"abc", flags=0xFFF0)) == [DataReceived(1, b"abc")]
    # Unknown PING flags: still a PING to echo.
    assert listener.receive_data(raw(T.PING, 0, b"12345678", flags=0x4)) == []
    (pong,) = output_frames(listener)
    assert pong.flags == f.FLAG_ACK


# =========================================================================================== flow control

TIGHT = Settings(stream_window=32768, connection_window=49152, max_frame=16384, buffer_budget=0)


def data_frames(frames: list[f.RawFrame]) -> list[f.RawFrame]:
    return of_type(frames, T.DATA)


def test_send_data_never_exceeds_the_smaller_window() -> None:
    pair = ready_pair(listener_settings=TIGHT)
    s1, s2 = pair.open(), pair.open()
    assert pair.dialer.send_window(s1) == 32768
    assert pair.dialer.send_data(s1, b"a" * 100000) == 32768  # stream window
    assert pair.dialer.send_window(s1) == 0
    assert pair.dialer.send_window(s2) == 16384  # what is left of the session window
    assert pair.dialer.send_data(s2, b"b" * 100000, end_stream=True) == 16384
    assert pair.dialer.send_data(s2, b"b") == 0
    assert pair.dialer.send_data(s2, b"b", end_stream=True) == 0  # nothing taken: no FIN either
    assert pair.dialer.send_window(s2) == 0 and pair.dialer.has_stream(s2)
    frames = data_frames(output_frames(pair.dialer))
    assert sum(len(fr.payload) for fr in frames) == 32768 + 16384
    assert not any(fr.flags & f.FLAG_FIN for fr in frames)
    assert pair.dialer.send_window(99) == 0


def test_data_is_cut_at_the_peers_max_frame() -> None:
    big = Settings(stream_window=1 << 20, connection_window=1 << 22, max_frame=65536)
    small = Settings(stream_window=1 << 20, connection_window=1 << 22, max_frame=16384)
    pair = ready_pair(dialer_settings=big, listener_settings=small)
    stream_id = pair.open()
    data = bytes(random.Random(1).getrandbits(8) for _ in range(50000))
    assert pair.dialer.send_data(stream_id, data, end_stream=True) == 50000
    frames = data_frames(output_frames(pair.dialer))
    assert [len(fr.payload) for fr in frames] == [16384, 16384, 16384, 848]
    assert [fr.flags for fr in frames] == [0, 0, 0, f.FLAG_FIN]
    assert b"".join(fr.payload for fr in frames) == data
    # The other direction uses the dialer's (larger) max_frame.
    assert pair.listener.send_data(stream_id, data + data) == 100000
    assert [len(fr.payload) for fr in data_frames(output_frames(pair.listener))] == [65536, 100000 - 65536]
    # Exactly max_frame is one frame.
    assert pair.listener.send_data(stream_id, data[:16384] * 4, end_stream=True) == 65536
    assert [(len(fr.payload), fr.flags) for fr in data_frames(output_frames(pair.listener))] == [(65536, f.FLAG_FIN)]


def test_fin_waits_for_the_last_byte() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    data = b"z" * (SMALL.stream_window + 5000)
    taken = pair.dialer.send_data(stream_id, data, end_stream=True)
    assert taken == SMALL.stream_window
    _, listener_events = pair.shuttle()
    assert not any(isinstance(e, StreamEnded) for e in listener_events)
    pair.listener.acknowledge(stream_id, taken)
    dialer_events, _ = pair.shuttle()
    assert WindowUpdated(stream_id) in dialer_events
    assert pair.dialer.send_data(stream_id, data[taken:], end_stream=True) == 5000
    _, listener_events = pair.shuttle()
    assert listener_events == [DataReceived(stream_id, data[taken:]), StreamEnded(stream_id)]


def test_credit_returns_only_through_acknowledge_and_is_batched() -> None:
    pair = ready_pair()
    s1, s2 = pair.open(), pair.open()
    half_stream = SMALL.stream_window // 2  # 16384
    quarter_session = SMALL.connection_window // 4  # 32768
    pair.dialer.send_data(s1, b"1" * 30000)
    pair.dialer.send_data(s2, b"2" * 30000)
    _, events = pair.shuttle()
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 60000
    assert pair.listener.take_output() == []  # mere receipt returns nothing
    assert held(pair.listener) == 60000

    pair.listener.acknowledge(s1, half_stream - 1)
    assert pair.listener.take_output() == []  # below half a stream window: batched
    pair.listener.acknowledge(s1, 1)
    first = output_frames(pair.listener)
    assert summary(first) == [("WINDOW_UPDATE", s1)] and increment(first[0]) == half_stream
    pair.listener.acknowledge(s2, half_stream)
    frames = output_frames(pair.listener)
    # The session credit reached a quarter of the session window with this acknowledgement.
    assert summary(frames) == [("WINDOW_UPDATE", s2), ("WINDOW_UPDATE", 0)]
    assert [increment(fr) for fr in frames] == [half_stream, quarter_session]

    events = pair.dialer.receive_data(b"".join(frame_bytes(fr) for fr in first + frames))
    assert events == [WindowUpdated(s1), WindowUpdated(s2), WindowUpdated(0)]
    assert pair.dialer.send_window(s1) == SMALL.stream_window - 30000 + half_stream
    assert conn_send_window(pair.dialer) == SMALL.connection_window - 60000 + quarter_session
    check_conservation(pair.dialer, pair.listener)


def test_no_stream_credit_after_fin_but_session_credit_still() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.send_data(stream_id, b"q" * 32768, end_stream=True)
    pair.shuttle()
    pair.listener.acknowledge(stream_id, 32768)
    frames = output_frames(pair.listener)
    assert summary(frames) == [("WINDOW_UPDATE", 0)]  # the stream will send nothing more
    assert increment(frames[0]) == 32768


def test_exceeding_the_stream_window_is_a_flow_control_error() -> None:
    listener = ready_listener()
    listener.receive_data(open_frame(1) + data_frame(1, b"a" * 16384) + data_frame(1, b"b" * 16384))
    assert protocol_error(listener, data_frame(1, b"c")) is ErrorCode.FLOW_CONTROL_ERROR


def test_exceeding_the_session_window_is_a_flow_control_error() -> None:
    listener = ready_listener(TIGHT)
    listener.receive_data(open_frame(1) + open_frame(3))
    listener.receive_data(data_frame(1, b"a" * 16384) * 2 + data_frame(3, b"b" * 16384))
    assert protocol_error(listener, data_frame(3, b"c")) is ErrorCode.FLOW_CONTROL_ERROR


def test_stale_data_counts_against_the_session_window() -> None:
    listener = ready_listener(TIGHT)
    listener.receive_data(open_frame(1) + open_frame(3) + open_frame(5))
    listener.reset_stream(5, ErrorCode.CANCEL)
    listener.receive_data(data_frame(1, b"a" * 16384) * 2 + data_frame(3, b"b" * 16384))
    assert conn_recv_window(listener) == 0
    # Stale DATA for the reset stream 5 still counts against the (used up) session window.
    assert protocol_error(listener, data_frame(5, b"stale")) is ErrorCode.FLOW_CONTROL_ERROR


def test_stale_empty_data_with_the_session_window_used_up_sends_no_zero_update() -> None:
    listener = ready_listener(TIGHT)
    listener.receive_data(open_frame(1) + open_frame(3) + open_frame(5))
    listener.reset_stream(5, ErrorCode.CANCEL)
    listener.receive_data(data_frame(1, b"a" * 16384) * 2 + data_frame(3, b"b" * 16384))
    assert conn_recv_window(listener) == 0
    listener.take_output()
    assert listener.receive_data(data_frame(5, b"", fin=True)) == []
    assert listener.take_output() == []  # an increment of 0 would be a FLOW_CONTROL_ERROR at the peer
    # Acknowledging now returns credit at once: the peer has none left.
    listener.acknowledge(3, 1000)
    updates = [fr for fr in output_frames(listener) if fr.stream_id == 0]
    assert [increment(u) for u in updates] == [1000]


@pytest.mark.parametrize("stream_id", [0, 1], ids=["session", "stream"])
@pytest.mark.parametrize("value", [0, 2**31, 2**32 - 1])
def test_window_update_increment_out_of_range(stream_id: int, value: int) -> None:
    pair = ready_pair()
    pair.open()
    assert protocol_error(pair.dialer, window_update(stream_id, value)) is ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflow() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    room = f.MAX_WINDOW - SMALL.connection_window
    assert pair.dialer.receive_data(window_update(0, room)) == [WindowUpdated(0)]
    assert conn_send_window(pair.dialer) == f.MAX_WINDOW
    assert protocol_error(pair.dialer, window_update(0, 1)) is ErrorCode.FLOW_CONTROL_ERROR

    pair = ready_pair()
    stream_id = pair.open()
    room = f.MAX_WINDOW - SMALL.stream_window
    assert pair.dialer.receive_data(window_update(stream_id, room)) == [WindowUpdated(stream_id)]
    assert protocol_error(pair.dialer, window_update(stream_id, 1)) is ErrorCode.FLOW_CONTROL_ERROR


@pytest.mark.parametrize("payload", [b"", b"\0\0\1", b"\0\0\0\1\0"])
def test_window_update_payload_must_be_4_bytes(payload: bytes) -> None:
    assert protocol_error(ready_listener(), f.frame(T.WINDOW_UPDATE, 0, 0, payload)) is ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize(
    "extra", [SMALL.stream_window, 16384, 4096, 1000], ids=["2x", "W+16K", "W+4K", "W+1000"]
)
def test_stalled_stream_does_not_block_the_others(extra: int) -> None:
    """Spec 3.4: a stalled stream holds at most its own window of session credit; the others keep flowing."""
    receiver = Settings(stream_window=32768, connection_window=32768 + extra, max_frame=16384, buffer_budget=0)
    pair = ready_pair(listener_settings=receiver)
    stalled, busy = pair.open(), pair.open()
    assert pair.dialer.send_data(stalled, b"s" * 100000) == 32768  # its reader never acknowledges
    pair.shuttle()
    target = 10 * receiver.stream_window
    moved = 0
    rounds = 0
    while moved < target:
        rounds += 1
        assert rounds < 2000, "no progress: head-of-line blocking"
        taken = pair.dialer.send_data(busy, b"b" * 8192)
        _, events = pair.shuttle()
        got = sum(len(e.data) for e in events if isinstance(e, DataReceived))
        assert got == taken
        if taken == 0:
            pytest.fail(f"busy stream starved after {moved} bytes with {extra} bytes of spare session window")
        pair.listener.acknowledge(busy, got)
        pair.shuttle()
        moved += taken
    assert held(pair.listener) == 32768
    check_conservation(pair.dialer, pair.listener)


def test_batched_credit_is_released_when_a_stalled_stream_takes_the_rest() -> None:
    """The busy stream's credit sits in the batch; then a stalled stream uses up the session window. The batch must
    go out then, or the busy stream (and every other) waits forever."""
    receiver = Settings(stream_window=32768, connection_window=32768 + 4096, max_frame=16384, buffer_budget=0)
    pair = ready_pair(listener_settings=receiver)
    stalled, busy = pair.open(), pair.open()
    assert pair.dialer.send_data(busy, b"b" * 4096) == 4096
    pair.shuttle()
    pair.listener.acknowledge(busy, 4096)  # batched: below a quarter of the session window
    assert pair.dialer.send_data(stalled, b"s" * 100000) == 32768
    pair.shuttle()
    assert pair.dialer.send_window(busy) > 0
    assert pair.dialer.send_data(busy, b"b" * 100000) == 4096
    pair.shuttle()
    check_conservation(pair.dialer, pair.listener)


def test_session_window_returns_exactly_once_for_reset_and_closed_streams() -> None:
    pair = ready_pair()
    live, reset_by_peer, reset_locally, closed = (pair.open() for _ in range(4))
    for stream_id in (live, reset_by_peer, reset_locally, closed):
        pair.dialer.send_data(stream_id, b"d" * 10000, end_stream=stream_id == closed)
    pair.listener.end_stream(closed)
    pair.shuttle()
    # The closed stream (both FINs) is gone: its session credit went back when it ended.
    assert held(pair.listener) == 30000
    pair.dialer.reset_stream(reset_by_peer, ErrorCode.CANCEL)
    pair.shuttle()
    pair.listener.reset_stream(reset_locally, ErrorCode.BACKEND_RESET)
    pair.shuttle()
    assert not pair.listener.has_stream(closed) and not pair.listener.has_stream(reset_by_peer)
    # Reset streams returned their session credit when they ended; only the live one still holds its bytes.
    assert held(pair.listener) == 10000
    for stream_id in (live, reset_by_peer, reset_locally, closed):
        # In pieces, and then more than was received: the surplus is ignored.
        pair.listener.acknowledge(stream_id, 3000)
        pair.listener.acknowledge(stream_id, 7000)
        pair.listener.acknowledge(stream_id, 5000)
        pair.listener.acknowledge(stream_id, 1)
    pair.listener.acknowledge(12345, 1000)
    pair.listener.acknowledge(live, 0)
    pair.listener.acknowledge(live, -5)
    assert held(pair.listener) == 0
    pair.shuttle()
    check_conservation(pair.dialer, pair.listener)
    # All credit is back with the sender, except what the receiver still batches.
    assert conn_send_window(pair.dialer) + conn_pending(pair.listener) == SMALL.connection_window
    assert conn_pending(pair.listener) < SMALL.connection_window // 4


def test_over_acknowledging_a_live_stream_gives_no_extra_credit() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.send_data(stream_id, b"o" * 20000)
    pair.shuttle()
    pair.listener.acknowledge(stream_id, 50000)
    pair.shuttle()
    assert pair.dialer.send_window(stream_id) <= SMALL.stream_window
    assert conn_send_window(pair.dialer) <= SMALL.connection_window
    check_conservation(pair.dialer, pair.listener)


# =========================================================================================== priority


def test_control_frames_go_ahead_of_queued_data() -> None:
    pair = ready_pair()
    s1, s2 = pair.open(), pair.open()
    pair.listener.send_data(s1, b"L" * 20000)
    pair.shuttle()
    pair.dialer.send_data(s1, b"a" * 40000)
    pair.dialer.ping(b"PINGPING")
    pair.dialer.acknowledge(s1, 20000)
    pair.dialer.reset_stream(s2, ErrorCode.CANCEL)
    s3 = pair.dialer.open_stream(TARGET)
    pair.dialer.send_data(s3, b"early")
    frames = output_frames(pair.dialer)
    assert summary(frames) == [
        ("PING", 0),
        ("WINDOW_UPDATE", s1),
        ("RESET", s2),
        ("OPEN", s3),
        ("DATA", s1),  # 32768 bytes (the stream window) in frames of the peer's max_frame (16384)
        ("DATA", s1),
        ("DATA", s3),
    ]


def test_ping_answer_goes_ahead_of_queued_data() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.listener.send_data(stream_id, b"x" * 30000)
    pair.listener.receive_data(f.frame(T.PING, 0, 0, b"abcdefgh"))
    frames = output_frames(pair.listener)
    assert summary(frames)[0] == ("PING", 0) and frames[0].flags == f.FLAG_ACK
    assert {name for name, _ in summary(frames)[1:]} == {"DATA"}


def test_take_output_without_data_keeps_data_queued() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.send_data(stream_id, b"d" * 20000)
    queued = pair.dialer.buffered_output
    pair.dialer.ping(b"\0" * 8)
    control = output_frames(pair.dialer, include_data=False)
    assert summary(control) == [("PING", 0)]
    assert pair.dialer.buffered_output == queued
    assert pair.dialer.take_output(include_data=False) == []
    data = output_frames(pair.dialer)
    assert summary(data) == [("DATA", stream_id), ("DATA", stream_id)]
    assert pair.dialer.buffered_output == 0


def test_buffered_output_counts_every_byte_take_output_returns() -> None:
    pair = ready_pair()
    s1, s2 = pair.open(), pair.open()
    pair.dialer.send_data(s1, b"d" * 40000)
    pair.dialer.send_data(s2, b"e" * 10, end_stream=True)
    pair.dialer.end_stream(s1)
    pair.dialer.ping(b"12345678")
    s3 = pair.dialer.open_stream(TARGET)
    pair.dialer.send_data(s3, b"f")
    pair.dialer.reset_stream(s3, ErrorCode.CANCEL, after_data=True)
    expected = pair.dialer.buffered_output
    assert sum(len(chunk) for chunk in pair.dialer.take_output()) == expected
    assert pair.dialer.buffered_output == 0


def test_reset_after_data_stays_behind_the_streams_data() -> None:
    pair = ready_pair()
    s1, s2 = pair.open(), pair.open()
    pair.dialer.send_data(s1, b"1" * 20000)
    pair.dialer.send_data(s2, b"2" * 100)
    pair.dialer.reset_stream(s1, ErrorCode.NORMAL, "done", after_data=True)
    assert output_frames(pair.dialer, include_data=False) == []  # the RESET is queued with the DATA
    pair.dialer.send_data(s2, b"3" * 100)
    frames = output_frames(pair.dialer)
    assert summary(frames) == [("DATA", s1), ("DATA", s1), ("DATA", s2), ("RESET", s1), ("DATA", s2)]
    # The peer gets everything, then the reset.
    listener_events = pair.listener.receive_data(b"".join(frame_bytes(fr) for fr in frames))
    s1_events = [e for e in listener_events if getattr(e, "stream_id", None) == s1]
    assert sum(len(e.data) for e in s1_events if isinstance(e, DataReceived)) == 20000
    assert s1_events[-1] == StreamReset(s1, ErrorCode.NORMAL, "done")


def test_reset_without_after_data_jumps_ahead() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.send_data(stream_id, b"1" * 20000)
    pair.dialer.reset_stream(stream_id, ErrorCode.CANCEL)
    frames = output_frames(pair.dialer)
    assert summary(frames) == [("RESET", stream_id), ("DATA", stream_id), ("DATA", stream_id)]
    # The DATA behind the RESET is stale at the peer: dropped, session credit returned.
    events = pair.listener.receive_data(b"".join(frame_bytes(fr) for fr in frames))
    assert events == [StreamReset(stream_id, ErrorCode.CANCEL, "")]
    assert held(pair.listener) == 0


def test_reset_after_data_with_nothing_queued_is_a_control_frame() -> None:
    pair = ready_pair()
    stream_id = pair.open()
    pair.dialer.reset_stream(stream_id, ErrorCode.NORMAL, after_data=True)
    assert summary(output_frames(pair.dialer, include_data=False)) == [("RESET", stream_id)]


def test_data_of_different_streams_keeps_production_order() -> None:
    pair = ready_pair()
    s1, s2 = pair.open(), pair.open()
    pair.dialer.send_data(s1, b"a")
    pair.dialer.send_data(s2, b"b")
    pair.dialer.send_data(s1, b"c", end_stream=True)
    assert summary(output_frames(pair.dialer)) == [("DATA", s1), ("DATA", s2), ("DATA", s1)]


# =========================================================================================== ping


def test_ping_is_echoed_with_ack() -> None:
    pair = ready_pair()
    payload = bytes(range(8))
    pair.dialer.ping(payload)
    (ping,) = output_frames(pair.dialer)
    assert (ping.frame_type, ping.flags, ping.stream_id, ping.payload) == (T.PING, 0, 0, payload)
    assert pair.listener.receive_data(frame_bytes(ping)) == []
    (pong,) = output_frames(pair.listener)
    assert (pong.frame_type, pong.flags, pong.payload) == (T.PING, f.FLAG_ACK, payload)
    assert pair.dialer.receive_data(frame_bytes(pong)) == [PingAcknowledged(payload)]
    assert pair.dialer.take_output() == []  # an ACK is not echoed


def test_ping_both_ways_through_the_pair() -> None:
    pair = ready_pair()
    pair.dialer.ping(b"dialer!!")
    pair.listener.ping(b"listener")
    dialer_events, listener_events = pair.shuttle()
    assert dialer_events == [PingAcknowledged(b"dialer!!")]
    assert listener_events == [PingAcknowledged(b"listener")]


@pytest.mark.parametrize("payload", [b"", b"1234567", b"123456789"])
def test_ping_payload_must_be_8_bytes(payload: bytes) -> None:
    pair = ready_pair()
    with pytest.raises(ValueError):
        pair.dialer.ping(payload)
    assert protocol_error(pair.listener, f.frame(T.PING, 0, 0, payload)) is ErrorCode.PROTOCOL_ERROR


def test_ping_on_a_stream_is_a_protocol_error() -> None:
    assert protocol_error(ready_listener(), f.frame(T.PING, 0, 1, b"12345678")) is ErrorCode.PROTOCOL_ERROR


def test_ping_flood_while_not_reading_is_a_session_error() -> None:
    """Spec 6: queued control frames are capped (1 MiB); a peer flooding PINGs is a session error."""
    listener = ready_listener()
    one = f.frame(T.PING, 0, 0, b"flooding")
    count = session_module.MAX_CONTROL_BACKLOG // len(one) + 1
    code = protocol_error(listener, one * count)
    assert isinstance(code, ErrorCode)
    # Reading the output in time keeps the session alive.
    listener = ready_listener()
    for _ in range(4):
        listener.receive_data(one * (count // 2))
        listener.take_output()


# =========================================================================================== split independence


def scripted_conversation(split: Split) -> list[list[Event]]:
    pair = ready_pair(split=split)
    s1 = pair.dialer.open_stream(TARGET)
    pair.dialer.send_data(s1, pattern(s1, "d2l", 0, 40000), end_stream=True)
    pair.dialer.ping(b"pingpong")
    rounds = [list(pair.shuttle(split)[1])]
    pair.listener.accept_stream(s1)
    s2 = pair.listener.open_stream(OpenRequest("backend", 22, meta={"x": 1}))
    pair.listener.acknowledge(s1, 32768)
    pair.listener.send_data(s1, pattern(s1, "l2d", 0, 70000))
    pair.listener.send_data(s2, b"early", end_stream=True)
    rounds.append(list(pair.shuttle(split)[0]))
    pair.dialer.reset_stream(s2, ErrorCode.CONNECT_REFUSED, "refused")
    pair.dialer.acknowledge(s1, 32768)
    pair.listener.go_away(ErrorCode.NORMAL, "drain")
    d, lst = pair.shuttle(split)
    rounds += [list(d), list(lst)]
    return rounds


def test_events_do_not_depend_on_how_bytes_are_split() -> None:
    reference = scripted_conversation(None)
    assert any(isinstance(e, DataReceived) for r in reference for e in r)
    for split in ("bytes", 1000, random.Random(3), random.Random(4)):
        assert scripted_conversation(split) == reference


# =========================================================================================== fuzzing

ANY_BYTES = st.binary(max_size=3000)


def ready_listener_for_fuzz() -> Session:
    return ready_listener(SMALL)


def feed_expecting_only_protocol_errors(session: Session, pieces: list[bytes]) -> None:
    for piece in pieces:
        try:
            session.receive_data(piece)
        except ProtocolError as e:
            assert isinstance(e.code, ErrorCode)
            return
        check_windows(session)


@FAST
@given(ANY_BYTES, st.randoms(use_true_random=False))
def test_fuzz_after_handshake_only_protocol_errors(data: bytes, rnd: random.Random) -> None:
    session = ready_listener_for_fuzz()
    feed_expecting_only_protocol_errors(session, list(chunks(data, rnd)))


@FAST
@given(ANY_BYTES)
def test_fuzz_from_the_start_only_protocol_errors(data: bytes) -> None:
    feed_expecting_only_protocol_errors(Session(Role.LISTENER), [data])
    feed_expecting_only_protocol_errors(Session(Role.LISTENER), [f.PREFACE + data])
    feed_expecting_only_protocol_errors(dialer_waiting_for_hello(), [data])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
open_bodies = st.fixed_dictionaries(
    {},
    optional={
        "host": st.one_of(st.text(max_size=30), json_values),
        "port": st.one_of(st.integers(-5, 70000), json_values),
        "kind": st.one_of(st.sampled_from(["tcp", "http"]), json_values),
        "meta": st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=3), json_values),
    },
)
payload_strategy = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 2**32 - 1).map(f.U32.pack),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 30), st.binary(max_size=20)).map(
        lambda t: f.GOAWAY_HEAD.pack(t[0], t[1]) + t[2]
    ),
    open_bodies.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
)
fuzz_frames = st.tuples(
    st.one_of(st.integers(0, 8), st.just(0)),  # DATA twice as likely
    st.sampled_from([0, f.FLAG_FIN, f.FLAG_ACK, 0xFFFF]),
    st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    payload_strategy,
).map(lambda t: f.frame(t[0], t[1], t[2], t[3]))


@FAST
@given(st.lists(fuzz_frames, max_size=25))
def test_fuzz_well_framed_garbage_only_protocol_errors(frames_: list[bytes]) -> None:
    feed_expecting_only_protocol_errors(ready_listener_for_fuzz(), frames_)
    pair = ready_pair()
    pair.open()
    pair.open(pair.listener)
    feed_expecting_only_protocol_errors(pair.dialer, frames_)


# =========================================================================================== state machine


@dataclass
class Direction:
    """One direction of one stream, as the test sees it."""

    sent: int = 0
    fin_sent: bool = False
    received: int = 0
    fin_received: bool = False
    acked: int = 0


@dataclass
class StreamModel:
    opener: str
    request: OpenRequest
    # Keyed by the sending side: "d" is dialer -> listener.
    dirs: dict[str, Direction] = field(default_factory=lambda: {"d": Direction(), "l": Direction()})
    known: dict[str, bool] = field(default_factory=dict)  # does the side's session have it (per the events)?
    reset_by: set[str] = field(default_factory=set)
    reset_code: dict[str, ErrorCode] = field(default_factory=dict)
    reset_after_data: dict[str, bool] = field(default_factory=dict)
    refused: bool = False
    accepted: bool = False  # the acceptor called accept_stream
    accept_seen: bool = False  # the opener got StreamAccepted


OTHER = {"d": "l", "l": "d"}
RESET_CODES = st.sampled_from([ErrorCode.NORMAL, ErrorCode.CANCEL, ErrorCode.BACKEND_RESET, ErrorCode.ACCESS_DENIED])
SIZES = st.one_of(st.integers(0, 64), st.integers(0, 50000))


class TunnelMachine(RuleBasedStateMachine):
    """Random opens, sends, FINs, acks, resets, pings and partial shuttles between a real dialer and listener."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = SessionPair()
        self.streams: dict[int, StreamModel] = {}
        self.pings: dict[str, list[bytes]] = {"d": [], "l": []}
        self.counter = 0

    def s(self, side: str) -> Session:
        return self.pair.dialer if side == "d" else self.pair.listener

    @initialize(
        stream_window=st.sampled_from([3000, 20000, 65536]),
        extra=st.sampled_from([1, 5000, 100000]),
        max_streams=st.sampled_from([2, 100]),
        split=st.sampled_from([None, "bytes"]),
        opened=st.tuples(st.integers(0, 3), st.integers(0, 2)),
        initial_bytes=st.integers(0, 150000),
        initial_divisor=st.sampled_from([1, 4]),
        budget=st.sampled_from([-1, 0]),
    )
    def handshake(
        self,
        stream_window: int,
        extra: int,
        max_streams: int,
        split: Split,
        opened: tuple[int, int],
        initial_bytes: int,
        initial_divisor: int,
        budget: int,
    ) -> None:
        # initial_divisor 4: streams start at a quarter of the stream window and auto-tune; budget 0: session
        # credit only on acknowledgement, -1: eagerly within half the session window (the default).
        d = Settings(stream_window=stream_window, connection_window=stream_window + extra, max_streams=max_streams,
                     initial_stream_window=stream_window // initial_divisor, buffer_budget=budget)
        lst = Settings(stream_window=stream_window + 7, connection_window=2 * stream_window + extra, max_frame=16384,
                       initial_stream_window=(stream_window + 7) // initial_divisor, buffer_budget=budget)
        self.pair = SessionPair(d, lst)
        self.pair.handshake(split=split)
        # Start with a few accepted streams each way, so that most runs move data from the first step.
        for side, count in zip("dl", opened, strict=True):
            for _ in range(count):
                self.open(side, "tcp")
        self.shuttle("whole", 0, False, True)
        for side, stream_id in self.acceptable():
            self.s(side).accept_stream(stream_id)
            self.streams[stream_id].accepted = True
        self.shuttle("whole", 0, False, True)
        # ... and with data queued both ways (as much as the windows take).
        for side, stream_id in self.sendable():
            out = self.streams[stream_id].dirs[side]
            payload = pattern(stream_id, "d2l" if side == "d" else "l2d", 0, initial_bytes)
            out.sent += self.s(side).send_data(stream_id, payload)

    # ---------------------------------------------------------------- helpers

    def alive(self, side: str, stream_id: int) -> bool:
        return self.streams[stream_id].known.get(side, False)

    def candidates(self, side: str, sending: bool = False) -> list[int]:
        out = []
        for stream_id, model in self.streams.items():
            if self.alive(side, stream_id) and not (sending and model.dirs[side].fin_sent):
                if sending and model.opener != side and not model.accepted:
                    continue  # the acceptor sends only after its ACCEPT (spec 3.2)
                out.append(stream_id)
        return sorted(out)

    def update_liveness(self, side: str, stream_id: int) -> None:
        model = self.streams[stream_id]
        mine, theirs = model.dirs[side], model.dirs[OTHER[side]]
        if mine.fin_sent and theirs.fin_received:
            model.known[side] = False

    def process(self, side: str, events: list[Event]) -> None:
        peer = OTHER[side]
        for ev in events:
            if isinstance(ev, StreamOpened):
                model = self.streams[ev.stream_id]
                assert model.opener == peer and side not in model.known
                assert ev.request == model.request
                model.known[side] = True
            elif isinstance(ev, StreamAccepted):
                model = self.streams[ev.stream_id]
                assert model.opener == side and not model.accept_seen
                model.accept_seen = True
            elif isinstance(ev, DataReceived):
                model = self.streams[ev.stream_id]
                assert self.alive(side, ev.stream_id)
                incoming = model.dirs[peer]
                assert ev.data, "empty DataReceived"
                assert not incoming.fin_received
                expected = pattern(ev.stream_id, "d2l" if peer == "d" else "l2d", incoming.received, len(ev.data))
                assert ev.data == expected, "bytes out of order, duplicated or corrupted"
                incoming.received += len(ev.data)
                assert incoming.received <= incoming.sent
            elif isinstance(ev, StreamEnded):
                model = self.streams[ev.stream_id]
                assert self.alive(side, ev.stream_id)
                incoming = model.dirs[peer]
                assert incoming.fin_sent and not incoming.fin_received
                assert incoming.received == incoming.sent, "FIN before all data"
                incoming.fin_received = True
                if model.dirs[side].fin_sent:
                    model.known[side] = False
            elif isinstance(ev, StreamReset):
                model = self.streams[ev.stream_id]
                assert self.alive(side, ev.stream_id)
                if not ev.remote:
                    # Only one local reset happens in valid use: our streams past a GOAWAY's last stream ID.
                    assert (ev.code, ev.reason) == (ErrorCode.REFUSED_STREAM, UNPROCESSED_REASON), ev
                    assert model.opener == side and peer not in model.known
                    model.refused = True
                elif peer in model.reset_by:
                    assert ev.code == model.reset_code[peer]
                else:
                    # Refused by the peer's session: draining or too many streams.
                    assert ev.code == ErrorCode.REFUSED_STREAM and model.opener == side
                    model.refused = True
                model.known[side] = False
            elif isinstance(ev, PingAcknowledged):
                assert self.pings[side] and ev.payload == self.pings[side].pop(0)
            elif isinstance(ev, WindowUpdated):
                pass
            elif isinstance(ev, GoAwayReceived):
                assert ev.code == ErrorCode.NORMAL
            else:
                pytest.fail(f"unexpected event {ev}")

    # ---------------------------------------------------------------- rules

    @rule(side=st.sampled_from("dl"), kind=st.sampled_from(["tcp", "http"]))
    def open(self, side: str, kind: str) -> None:
        session = self.s(side)
        self.counter += 1
        request = OpenRequest(host=f"h{self.counter}.internal", port=1 + self.counter, kind=kind, meta={"n": self.counter})
        if not session.can_open():
            with pytest.raises(StreamStateError):
                session.open_stream(request)
            return
        stream_id = session.open_stream(request)
        assert stream_id not in self.streams and stream_id % 2 == (1 if side == "d" else 0)
        self.streams[stream_id] = StreamModel(opener=side, request=request, known={side: True})

    # Each rule draws a (side, stream) pair it may act on; its precondition makes sure there is one, so that
    # no example is thrown away (an assume() in a stateful rule discards the whole run).

    def acceptable(self) -> list[tuple[str, int]]:
        return [
            (side, sid)
            for side in "dl"
            for sid in self.candidates(side)
            if self.streams[sid].opener != side and not self.streams[sid].accepted
        ]

    def sendable(self) -> list[tuple[str, int]]:
        return [(side, sid) for side in "dl" for sid in self.candidates(side, sending=True)]

    def resettable(self) -> list[tuple[str, int]]:
        return [(side, sid) for side in "dl" for sid in self.candidates(side)]

    def ackable(self) -> list[tuple[str, int]]:
        return [
            (side, sid)
            for side in "dl"
            for sid, m in sorted(self.streams.items())
            if m.dirs[OTHER[side]].received > m.dirs[OTHER[side]].acked
        ]

    @precondition(lambda self: self.acceptable())
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        side, stream_id = data.draw(st.sampled_from(self.acceptable()))
        self.s(side).accept_stream(stream_id)
        self.streams[stream_id].accepted = True

    @precondition(lambda self: self.sendable())
    @rule(data=st.data(), size=SIZES, fin=st.booleans())
    def send(self, data: st.DataObject, size: int, fin: bool) -> None:
        side, stream_id = data.draw(st.sampled_from(self.sendable()))
        session = self.s(side)
        out = self.streams[stream_id].dirs[side]
        window = session.send_window(stream_id)
        payload = pattern(stream_id, "d2l" if side == "d" else "l2d", out.sent, size)
        taken = session.send_data(stream_id, payload, end_stream=fin)
        assert taken == min(size, window)
        out.sent += taken
        if fin and taken == size:
            out.fin_sent = True
            self.update_liveness(side, stream_id)
        assert session.has_stream(stream_id) == self.alive(side, stream_id)

    send_more = send  # (twice as likely as the other rules)

    @precondition(lambda self: self.sendable())
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        side, stream_id = data.draw(st.sampled_from(self.sendable()))
        self.s(side).end_stream(stream_id)
        self.streams[stream_id].dirs[side].fin_sent = True
        self.update_liveness(side, stream_id)

    @precondition(lambda self: self.ackable())
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        side, stream_id = data.draw(st.sampled_from(self.ackable()))
        incoming = self.streams[stream_id].dirs[OTHER[side]]
        count = data.draw(st.one_of(st.just(incoming.received - incoming.acked), st.integers(1, incoming.received - incoming.acked)))
        self.s(side).acknowledge(stream_id, count)
        incoming.acked += count

    @precondition(lambda self: self.resettable())
    @rule(data=st.data(), code=RESET_CODES, after_data=st.booleans())
    def reset(self, data: st.DataObject, code: ErrorCode, after_data: bool) -> None:
        side, stream_id = data.draw(st.sampled_from(self.resettable()))
        self.s(side).reset_stream(stream_id, code, "test reset", after_data=after_data)
        model = self.streams[stream_id]
        model.reset_by.add(side)
        model.reset_code[side] = code
        model.reset_after_data[side] = after_data
        model.known[side] = False

    @rule(side=st.sampled_from("dl"), payload=st.binary(min_size=8, max_size=8))
    def ping(self, side: str, payload: bytes) -> None:
        self.s(side).ping(payload)
        self.pings[side].append(payload)

    @precondition(lambda self: not (self.pair.dialer.local_goaway or self.pair.listener.local_goaway))
    @rule(side=st.sampled_from("dl"), dice=st.integers(0, 4))
    def go_away(self, side: str, dice: int) -> None:
        if dice:  # rarely: it ends all opening
            return
        self.s(side).go_away(ErrorCode.NORMAL, "drain")
        assert not self.s(side).can_open()

    @rule(
        mode=st.sampled_from(["whole", "bytes", "random"]),
        seed=st.integers(0, 2**16),
        once=st.booleans(),
        include_data=st.booleans(),
    )
    def shuttle(self, mode: str, seed: int, once: bool, include_data: bool) -> None:
        split: Split
        if mode == "bytes" and self.pair.dialer.buffered_output + self.pair.listener.buffered_output < 3000:
            split = "bytes"
        elif mode == "whole":
            split = None
        else:
            split = random.Random(seed)
        dialer_events, listener_events = self.pair.shuttle(split, once=once, include_data=include_data)
        self.process("l", listener_events)
        self.process("d", dialer_events)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def windows_never_negative(self) -> None:
        check_windows(self.pair.dialer)
        check_windows(self.pair.listener)

    @invariant()
    def sessions_agree_with_the_model(self) -> None:
        for side in "dl":
            session = self.s(side)
            peer = OTHER[side]
            for stream_id, model in self.streams.items():
                assert session.has_stream(stream_id) == self.alive(side, stream_id), (side, stream_id, model)
                incoming = model.dirs[peer]
                outstanding = incoming.received - incoming.acked
                if session.has_stream(stream_id):
                    assert session.unconsumed(stream_id) == outstanding
                else:
                    assert session.unconsumed(stream_id) == 0  # its session credit went back when it ended

    @invariant()
    def credit_is_conserved_when_quiet(self) -> None:
        if self.pair.dialer.buffered_output or self.pair.listener.buffered_output:
            return
        check_conservation(self.pair.dialer, self.pair.listener)
        check_conservation(self.pair.listener, self.pair.dialer)
        for stream_id, model in self.streams.items():
            if not (self.alive("d", stream_id) and self.alive("l", stream_id)):
                continue
            for sender, receiver in (("d", "l"), ("l", "d")):
                direction = model.dirs[sender]
                if direction.fin_sent:
                    continue
                out = self.s(sender).stream_windows(stream_id)
                into = self.s(receiver).stream_windows(stream_id)
                assert out is not None and into is not None
                send, recv = out[0], into[1]
                assert send.credit == recv.available
                assert send.credit + recv.unconsumed + recv.pending == recv.limit

    def teardown(self) -> None:
        # Drain: acknowledge everything, move everything, until nothing changes.
        for _ in range(50):
            for side in "dl":
                peer = OTHER[side]
                for stream_id, model in self.streams.items():
                    incoming = model.dirs[peer]
                    if incoming.received > incoming.acked:
                        self.s(side).acknowledge(stream_id, incoming.received - incoming.acked)
                        incoming.acked = incoming.received
            dialer_events, listener_events = self.pair.shuttle()
            self.process("l", listener_events)
            self.process("d", dialer_events)
            if not dialer_events and not listener_events:
                break
        for side in "dl":
            session = self.s(side)
            assert held(session) == 0
        check_conservation(self.pair.dialer, self.pair.listener)
        check_conservation(self.pair.listener, self.pair.dialer)
        moved = sum(d.received for m in self.streams.values() for d in m.dirs.values())
        event(f"streams: {min(len(self.streams), 10)}{'+' if len(self.streams) >= 10 else ''}")
        event(f"bytes delivered: {'0' if not moved else '<10k' if moved < 10000 else '>=10k'}")
        event(f"streams reset: {min(sum(1 for m in self.streams.values() if m.reset_by), 3)}+")
        event(f"streams refused: {sum(1 for m in self.streams.values() if m.refused) > 0}")
        for stream_id, model in self.streams.items():
            for sender in "dl":
                direction = model.dirs[sender]
                receiver = OTHER[sender]
                dropped = (
                    model.refused
                    or receiver not in model.known  # never opened there (refused, perhaps after a local reset)
                    or receiver in model.reset_by
                    or (sender in model.reset_by and not model.reset_after_data[sender])
                )
                if not dropped:
                    # Every byte exactly once, in order (checked per event), and all of them.
                    assert direction.received == direction.sent, (stream_id, sender, model)
                    assert direction.fin_received == direction.fin_sent
                else:
                    assert direction.received <= direction.sent
            # Liveness: with everything acknowledged, every stream that may still send has credit to do so.
            for side in "dl":
                if (
                    self.alive(side, stream_id)
                    and not model.dirs[side].fin_sent
                    and self.alive(OTHER[side], stream_id)
                    and (model.opener == side or model.accepted)
                ):
                    assert self.s(side).send_window(stream_id) > 0


TunnelMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_tunnel_state_machine = TunnelMachine.TestCase


def test_oversized_open_is_refused_locally_and_the_session_survives() -> None:
    from connproxy.wire.errors import OpenTooLargeError
    from connproxy.wire.events import OpenRequest

    pair = SessionPair()
    pair.handshake()
    with pytest.raises(OpenTooLargeError):
        pair.listener.open_stream(OpenRequest("h", 1, "tcp", {"blob": "\u00ff" * 20000}))
    assert pair.listener.take_output() == []
    stream_id = pair.listener.open_stream(OpenRequest("h", 1))
    pair.shuttle()
    assert pair.dialer.has_stream(stream_id)
