"""Test helpers for the sans-IO tunnel core (:mod:`connproxy.wire`): no reactor, bytes in, events out.

Modelled on h11's ``ConnectionPair``: :class:`SessionPair` holds a DIALER and a LISTENER :class:`Session` and
moves :meth:`Session.take_output` bytes between them with :meth:`SessionPair.shuttle`, whole, byte at a time or in
random splits, returning the events each side got.

The frame helpers build raw frames for the cases a well-behaved :class:`Session` never produces (protocol
violations) and decode a session's output back into :class:`RawFrame` objects.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from connproxy.wire import frames as f
from connproxy.wire.events import (
    Event,
    HelloReceived,
    OpenRequest,
    StreamAccepted,
    StreamOpened,
)
from connproxy.wire.session import Role, Session, Settings

#: Small windows so that flow control is reached with a few KiB of data (fast tests).
#: Session credit only on acknowledgement (``buffer_budget=0``), as the focused credit tests expect; the default
#: (eager session credit within a buffer budget) is covered by EAGER and the state machine.
SMALL = Settings(stream_window=32768, connection_window=131072, max_frame=16384, max_streams=64, buffer_budget=0)
EAGER = Settings(stream_window=32768, connection_window=131072, max_frame=16384, max_streams=64)

DIALER_HELLO: dict[str, Any] = {
    "connector_id": "host-a",
    "subaccount": "tenant-a",
    "location": "loc-1",
    "capabilities": ["half-close", "early-data"],
}
LISTENER_HELLO: dict[str, Any] = {
    "replica_id": "proxy-0",
    "tunnel_id": "account:///tenant-a",
    "capabilities": ["half-close", "early-data"],
}
TARGET = OpenRequest(host="erp.internal", port=443, kind="tcp", meta={"tenant": "tenant-a"})

#: How :meth:`SessionPair.shuttle` cuts the bytes it moves: ``None`` one chunk per ``take_output``, ``"bytes"``
#: one byte at a time, an ``int`` fixed-size chunks, a :class:`random.Random` random cut points.
Split = None | Literal["bytes"] | int | random.Random


def chunks(data: bytes, split: Split) -> Iterator[bytes]:
    """Cut ``data`` as ``split`` says (every byte exactly once, in order)."""
    if not data:
        return
    if split is None:
        yield data
    elif split == "bytes":
        for i in range(len(data)):
            yield data[i : i + 1]
    elif isinstance(split, int):
        for i in range(0, len(data), split):
            yield data[i : i + split]
    else:
        assert isinstance(split, random.Random)
        pos = 0
        while pos < len(data):
            # Mostly small pieces (header splits), sometimes large ones.
            step = split.randint(1, 40) if split.random() < 0.7 else split.randint(1, 70000)
            yield data[pos : pos + step]
            pos += step


class SessionPair:
    """A DIALER and a LISTENER session wired back to back."""

    def __init__(
        self,
        dialer_settings: Settings | None = None,
        listener_settings: Settings | None = None,
    ) -> None:
        self.dialer = Session(Role.DIALER, dialer_settings)
        self.listener = Session(Role.LISTENER, listener_settings)
        #: Every byte ever moved, per direction ("d2l", "l2d"): for replaying a conversation.
        self.wire: dict[str, bytearray] = {"d2l": bytearray(), "l2d": bytearray()}

    def peer(self, session: Session) -> Session:
        return self.listener if session is self.dialer else self.dialer

    def _move(self, src: Session, dst: Session, split: Split, include_data: bool) -> tuple[int, list[Event]]:
        data = b"".join(src.take_output(include_data=include_data))
        self.wire["d2l" if src is self.dialer else "l2d"] += data
        events: list[Event] = []
        for piece in chunks(data, split):
            events.extend(dst.receive_data(piece))
        return len(data), events

    def shuttle(
        self, split: Split = None, *, once: bool = False, include_data: bool = True
    ) -> tuple[list[Event], list[Event]]:
        """Move output both ways until neither side has any left; return (dialer events, listener events).

        With ``once`` only one round is made (dialer -> listener, then listener -> dialer), so answers the
        second move causes stay queued.
        """
        dialer_events: list[Event] = []
        listener_events: list[Event] = []
        while True:
            moved_d, ev = self._move(self.dialer, self.listener, split, include_data)
            listener_events.extend(ev)
            moved_l, ev = self._move(self.listener, self.dialer, split, include_data)
            dialer_events.extend(ev)
            if once or not (moved_d or moved_l):
                return dialer_events, listener_events

    def handshake(
        self,
        dialer_fields: Mapping[str, Any] | None = None,
        listener_fields: Mapping[str, Any] | None = None,
        split: Split = None,
    ) -> tuple[HelloReceived, HelloReceived]:
        """Dialer HELLO -> listener HelloReceived -> listener HELLO -> dialer HelloReceived.

        Returns (the event the dialer got, the event the listener got).
        """
        self.dialer.send_hello(DIALER_HELLO if dialer_fields is None else dialer_fields)
        _, listener_events = self.shuttle(split)
        assert len(listener_events) == 1 and isinstance(listener_events[0], HelloReceived), listener_events
        assert not self.dialer.ready and not self.listener.ready
        self.listener.send_hello(LISTENER_HELLO if listener_fields is None else listener_fields)
        dialer_events, _ = self.shuttle(split)
        assert len(dialer_events) == 1 and isinstance(dialer_events[0], HelloReceived), dialer_events
        assert self.dialer.ready and self.listener.ready
        return dialer_events[0], listener_events[0]

    def open(self, opener: Session | None = None, request: OpenRequest = TARGET, accept: bool = True) -> int:
        """Open a stream from ``opener`` (default: the dialer), let the peer see it and (by default) accept it."""
        opener = opener or self.dialer
        acceptor = self.peer(opener)
        stream_id = opener.open_stream(request)
        events = self.shuttle()
        acceptor_events = events[1] if acceptor is self.listener else events[0]
        assert StreamOpened(stream_id, request) in acceptor_events, acceptor_events
        if accept:
            acceptor.accept_stream(stream_id)
            events = self.shuttle()
            opener_events = events[0] if opener is self.dialer else events[1]
            assert StreamAccepted(stream_id) in opener_events, opener_events
        return stream_id


def ready_pair(
    dialer_settings: Settings | None = SMALL, listener_settings: Settings | None = SMALL, split: Split = None
) -> SessionPair:
    pair = SessionPair(dialer_settings, listener_settings)
    pair.handshake(split=split)
    return pair


# ------------------------------------------------------------------------------------------- raw frames


def hello_payload(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


def raw(frame_type: int, stream_id: int = 0, payload: bytes = b"", flags: int = 0, version: int = 1) -> bytes:
    """A frame with any header values, including invalid ones."""
    return f.HEADER.pack(version, frame_type, flags, stream_id, len(payload)) + payload


def data_frame(stream_id: int, payload: bytes = b"", fin: bool = False) -> bytes:
    return f.frame(f.FrameType.DATA, f.FLAG_FIN if fin else 0, stream_id, payload)


def open_frame(stream_id: int, body: Any = None, payload: bytes | None = None) -> bytes:
    if payload is None:
        payload = json.dumps({"host": "erp.internal", "port": 443} if body is None else body).encode()
    return f.frame(f.FrameType.OPEN, 0, stream_id, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    return f.frame(f.FrameType.WINDOW_UPDATE, 0, stream_id, f.U32.pack(increment))


def reset_frame(stream_id: int, code: int, reason: bytes = b"") -> bytes:
    return f.frame(f.FrameType.RESET, 0, stream_id, f.U32.pack(code) + reason)


def goaway_frame(last: int, code: int, reason: bytes = b"") -> bytes:
    return f.frame(f.FrameType.GOAWAY, 0, 0, f.GOAWAY_HEAD.pack(last, code) + reason)


def dialer_opening(settings: Any = None, **fields: Any) -> bytes:
    """What a dialer sends first: the preface and a HELLO (``fields`` replace the defaults; ``settings`` is sent
    as given, so it may be invalid)."""
    body: dict[str, Any] = {"versions": [1], **DIALER_HELLO}
    if settings is not None:
        body["settings"] = settings
    body.update(fields)
    return f.PREFACE + f.frame(f.FrameType.HELLO, 0, 0, hello_payload(body))


def ready_listener(settings: Settings | None = SMALL, peer_settings: Mapping[str, Any] | None = None) -> Session:
    """A listener that got a raw dialer's preface and HELLO and answered with its own HELLO (output taken)."""
    listener = Session(Role.LISTENER, settings)
    events = listener.receive_data(dialer_opening(peer_settings if peer_settings is not None else SMALL.to_json()))
    assert isinstance(events[0], HelloReceived)
    listener.send_hello(LISTENER_HELLO)
    listener.take_output()
    assert listener.ready
    return listener


def decode(chunks_: Iterable[bytes], strip_preface: bool = False) -> list[f.RawFrame]:
    """Decode a session's output into frames (the preface is checked and dropped with ``strip_preface``)."""
    data = b"".join(chunks_)
    if strip_preface:
        assert data.startswith(f.PREFACE)
        data = data[len(f.PREFACE) :]
    decoder = f.FrameDecoder(f.MAX_MAX_FRAME)
    frames = decoder.feed(data)
    assert decoder.buffered == 0, "output ends in a partial frame"
    return frames


def output_frames(session: Session, include_data: bool = True) -> list[f.RawFrame]:
    """Take a session's output and decode it (a dialer's preface is dropped)."""
    data = b"".join(session.take_output(include_data=include_data))
    data = data.removeprefix(f.PREFACE)
    return decode([data])


def summary(frames_: Iterable[f.RawFrame]) -> list[tuple[str, int]]:
    """(type name, stream id) per frame: compact for ordering assertions."""
    out = []
    for fr in frames_:
        try:
            name = f.FrameType(fr.frame_type).name
        except ValueError:
            name = f"0x{fr.frame_type:x}"
        out.append((name, fr.stream_id))
    return out


def of_type(frames_: Iterable[f.RawFrame], frame_type: f.FrameType) -> list[f.RawFrame]:
    return [fr for fr in frames_ if fr.frame_type == frame_type]


def reset_code(fr: f.RawFrame) -> int:
    assert fr.frame_type == f.FrameType.RESET
    (code,) = f.U32.unpack_from(fr.payload)
    return int(code)


def increment(fr: f.RawFrame) -> int:
    assert fr.frame_type == f.FrameType.WINDOW_UPDATE
    (value,) = f.U32.unpack(fr.payload)
    return int(value)


def pattern(stream_id: int, direction: str, offset: int, length: int) -> bytes:
    """Deterministic stream content: byte i of stream ``stream_id`` in ``direction`` (any offset, no state)."""
    start = (stream_id * 7 + (0 if direction == "d2l" else 101) + offset) % 251
    return (_CYCLE * (length // 251 + 2))[start : start + length]


_CYCLE = bytes(range(251))


# ------------------------------------------------------------------------------------------- accounting
# These read private state on purpose: flow control is only testable by its bookkeeping.


def held(session: Session) -> int:
    """Received DATA bytes the application has not acknowledged yet (live streams and gone ones)."""
    return session.unconsumed()


def conn_send_window(session: Session) -> int:
    return session.connection_send.credit


def conn_recv_window(session: Session) -> int:
    return session.connection_receive.available


def conn_pending(session: Session) -> int:
    """Session credit the receiver withholds for batching."""
    return session.connection_receive.pending


def check_windows(session: Session) -> None:
    """No window or counter is ever negative, and received-but-unreturned credit stays within the windows."""
    send, recv = session.connection_send, session.connection_receive
    assert send.credit >= 0
    assert recv.available >= 0
    assert recv.pending >= 0
    assert recv.available + recv.pending <= session.settings.connection_window
    # Credit is batched, but never withheld from a peer that has less left than the batch (no starvation).
    assert recv.pending < session.settings.connection_window >> 2
    assert recv.pending == 0 or recv.pending < recv.available
    for stream_id in session.stream_ids():
        windows = session.stream_windows(stream_id)
        assert windows is not None
        stream_send, stream_recv = windows
        assert stream_send.credit >= 0
        assert stream_recv.available >= 0
        assert stream_recv.pending >= 0
        assert stream_recv.unconsumed >= 0
        assert stream_recv.available + stream_recv.pending + stream_recv.unconsumed <= stream_recv.limit
        assert stream_recv.limit <= max(session.settings.stream_window, stream_recv.max_limit)


def check_conservation(sender: Session, receiver: Session) -> None:
    """With nothing in flight, every byte of the receiver's session window is somewhere: still with the sender
    as send window, withheld for bytes the receiving application holds, or pending in the receiver's next
    WINDOW_UPDATE."""
    assert sender.connection_send.credit == receiver.connection_receive.available
    total = sender.connection_send.credit + receiver.session_credit_held() + receiver.connection_receive.pending
    assert total == receiver.settings.connection_window
