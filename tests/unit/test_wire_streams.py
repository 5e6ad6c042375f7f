"""The stream lifecycle: the transition table of :mod:`connproxy.wire.streams` against the specification's tables
(``docs/tunnel-protocol.md`` 3.3, parsed from the document), and a real session driven into every state and fed
every frame type and local action, checked against the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connproxy.wire import frames as f
from connproxy.wire.errors import ErrorCode, ProtocolError, StreamStateError
from connproxy.wire.events import StreamReset
from connproxy.wire.session import Session
from connproxy.wire.streams import TRANSITIONS, Outcome, StreamEvent, StreamState, transition

from .wire_helpers import TARGET, SessionPair, data_frame, ready_pair, reset_frame, window_update

SPEC = Path(__file__).resolve().parents[2] / "docs" / "tunnel-protocol.md"
S, E = StreamState, StreamEvent

RECEIVED_COLUMNS = [E.RECV_DATA, E.RECV_DATA_FIN, E.RECV_ACCEPT, E.RECV_RESET, E.RECV_WINDOW_UPDATE]
LOCAL_COLUMNS = [E.SEND_DATA, E.SEND_FIN, E.SEND_ACCEPT, E.SEND_RESET]


def spec_table(header: str) -> dict[str, list[str]]:
    """The rows (state cell -> other cells) of the markdown table whose header row starts with ``header``."""
    text = SPEC.read_text(encoding="utf-8")
    start = text.index(header)
    rows: dict[str, list[str]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def expected_from_cell(state: StreamState, cell: str) -> Outcome:
    """Read one cell of the specification's tables as an :class:`Outcome`."""
    if m := re.fullmatch(r"→ `([a-z-]+)`", cell):
        return Outcome(StreamState(m.group(1)))
    if m := re.fullmatch(r"stream error `([A-Z_]+)`", cell):
        return Outcome(state, stream_error=ErrorCode[m.group(1)])
    if m := re.fullmatch(r"session error `([A-Z_]+)`", cell):
        return Outcome(state, session_error=ErrorCode[m.group(1)])
    if cell.startswith("ignored"):
        return Outcome(state, ignored=True)
    if cell == "not allowed":
        return Outcome(state, not_allowed=True)
    assert cell in ("held", "delivered", "credit", "allowed"), cell
    return Outcome(state)


def test_the_table_is_complete() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in S for e in E}


def test_received_frames_match_the_spec_table() -> None:
    rows = spec_table("| State | DATA | DATA + FIN | ACCEPT | RESET | WINDOW_UPDATE |")
    assert len(rows) == len(S)
    for name, cells in rows.items():
        state = S.IDLE if name == "never used" else S(name)
        for event, cell in zip(RECEIVED_COLUMNS, cells, strict=True):
            assert transition(state, event) == expected_from_cell(state, cell), (state, event, cell)


def test_local_actions_match_the_spec_table() -> None:
    rows = spec_table("| State | send DATA | send FIN | send ACCEPT | send RESET |")
    assert len(rows) == len(S) - 1  # no row for never-used IDs
    for name, cells in rows.items():
        state = S(name)
        for event, cell in zip(LOCAL_COLUMNS, cells, strict=True):
            assert transition(state, event) == expected_from_cell(state, cell), (state, event, cell)


# ------------------------------------------------------------------------------------------- a real session


def drive(state: StreamState) -> tuple[SessionPair, Session, int]:
    """A ready pair and a stream in ``state`` at the dialer (``we``); the peer's output is discarded from there."""
    pair = ready_pair()
    we, peer = pair.dialer, pair.listener
    if state is S.IDLE:
        return pair, we, 1001  # an odd ID the dialer never used
    if state in (S.PENDING, S.PENDING_REMOTE_CLOSED):
        stream_id = peer.open_stream(TARGET)
        if state is S.PENDING_REMOTE_CLOSED:
            peer.send_data(stream_id, b"early", end_stream=True)
        pair.shuttle()
    else:
        stream_id = we.open_stream(TARGET)
        if state is S.OPENING_LOCAL_CLOSED:
            we.end_stream(stream_id)
        if state not in (S.OPENING, S.OPENING_LOCAL_CLOSED):
            pair.shuttle()
            peer.accept_stream(stream_id)
            pair.shuttle()
        if state is S.HALF_CLOSED_LOCAL:
            we.end_stream(stream_id)
        elif state is S.HALF_CLOSED_REMOTE:
            peer.end_stream(stream_id)
        elif state is S.CLOSED:
            we.reset_stream(stream_id, ErrorCode.CANCEL)
        pair.shuttle()
    we.take_output()
    peer.take_output()
    assert we.stream_state(stream_id) is state
    return pair, we, stream_id


def frame_for(event: StreamEvent, stream_id: int) -> bytes:
    return {
        E.RECV_DATA: lambda: data_frame(stream_id, b"xy"),
        E.RECV_DATA_FIN: lambda: data_frame(stream_id, b"xy", fin=True),
        E.RECV_ACCEPT: lambda: f.frame(f.FrameType.ACCEPT, 0, stream_id),
        E.RECV_RESET: lambda: reset_frame(stream_id, ErrorCode.CANCEL),
        E.RECV_WINDOW_UPDATE: lambda: window_update(stream_id, 1),
    }[event]()


def act(we: Session, event: StreamEvent, stream_id: int) -> None:
    if event is E.SEND_DATA:
        we.send_data(stream_id, b"xy")
    elif event is E.SEND_FIN:
        we.end_stream(stream_id)
    elif event is E.SEND_ACCEPT:
        we.accept_stream(stream_id)
    else:
        we.reset_stream(stream_id, ErrorCode.CANCEL)


@settings(max_examples=300, deadline=None)
@given(state=st.sampled_from(list(S)), event=st.sampled_from(list(E)))
def test_a_real_session_follows_the_table(state: StreamState, event: StreamEvent) -> None:
    """Walk states x frame types (and local actions) on a real session; each answer is the table's."""
    _pair, we, stream_id = drive(state)
    expected = transition(state, event)
    if event in LOCAL_COLUMNS:
        if state is S.IDLE and event is not E.SEND_RESET:
            expected = Outcome(state, not_allowed=True)
        if expected.not_allowed:
            with pytest.raises(StreamStateError):
                act(we, event, stream_id)
            assert we.stream_state(stream_id) is state
            return
        act(we, event, stream_id)
        assert we.stream_state(stream_id) is expected.state
        return
    if expected.session_error is not None:
        with pytest.raises(ProtocolError) as info:
            we.receive_data(frame_for(event, stream_id))
        assert info.value.code is expected.session_error
        return
    events = we.receive_data(frame_for(event, stream_id))
    if expected.stream_error is not None:
        assert [e for e in events if isinstance(e, StreamReset)] == [
            StreamReset(stream_id, expected.stream_error, events[-1].reason, remote=False)  # type: ignore[union-attr]
        ]
        sent = f.FrameDecoder(1 << 20).feed(b"".join(we.take_output()))
        assert [(fr.frame_type, f.U32.unpack_from(fr.payload)[0]) for fr in sent if fr.frame_type == f.FrameType.RESET] \
            == [(f.FrameType.RESET, expected.stream_error)]
        assert we.stream_state(stream_id) is S.CLOSED
    elif expected.ignored:
        assert events == []
        assert we.stream_state(stream_id) is state
    else:
        assert we.stream_state(stream_id) is expected.state
