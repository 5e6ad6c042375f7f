"""The lifecycle of one stream: states, events and the transition table of ``docs/tunnel-protocol.md`` 3.3.

The table is the single answer to "what does this frame (or this local action) do to a stream in this state":
a new state, a stream error (RESET with a code, the session goes on), a session error (GOAWAY with a code), an
ignored frame (a stream already closed) or a local bug (an action the state does not allow). The session
(:mod:`connproxy.wire.session`) looks every stream frame and every command up here; the tests check the table
against the specification's, cell by cell.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from connproxy.wire.errors import ErrorCode


class StreamState(enum.Enum):
    """The state of one stream at one side (spec 3.3, "Stream states")."""

    IDLE = "idle"  # never used: no stream with this ID existed
    OPENING = "opening"
    OPENING_LOCAL_CLOSED = "opening-local-closed"
    PENDING = "pending"
    PENDING_REMOTE_CLOSED = "pending-remote-closed"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"
    HALF_CLOSED_REMOTE = "half-closed-remote"
    CLOSED = "closed"


class StreamEvent(enum.Enum):
    """A received stream frame or a local action on a stream."""

    RECV_DATA = "DATA"
    RECV_DATA_FIN = "DATA + FIN"
    RECV_ACCEPT = "ACCEPT"
    RECV_RESET = "RESET"
    RECV_WINDOW_UPDATE = "WINDOW_UPDATE"
    SEND_DATA = "send DATA"
    SEND_FIN = "send FIN"
    SEND_ACCEPT = "send ACCEPT"
    SEND_RESET = "send RESET"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an event does in a state. At most one of the error fields is set.

    :ivar state: the new state (unchanged for errors and ignored frames).
    :ivar stream_error: RESET the stream with this code (the session goes on).
    :ivar session_error: end the session with GOAWAY and this code.
    :ivar ignored: the frame is dropped (its DATA still returns connection credit).
    :ivar not_allowed: a local action the state does not allow (a bug of the caller; nothing is sent).
    """

    state: StreamState
    stream_error: ErrorCode | None = None
    session_error: ErrorCode | None = None
    ignored: bool = False
    not_allowed: bool = False

    @property
    def ok(self) -> bool:
        """True if the event is valid and changes (or keeps) the state."""
        return not (self.stream_error or self.session_error or self.ignored or self.not_allowed)


S = StreamState
E = StreamEvent

#: States in which this side has sent FIN (it may send nothing more but RESET).
LOCAL_CLOSED: Final = frozenset({S.OPENING_LOCAL_CLOSED, S.HALF_CLOSED_LOCAL, S.CLOSED})
#: States in which the peer has sent FIN.
REMOTE_CLOSED: Final = frozenset({S.PENDING_REMOTE_CLOSED, S.HALF_CLOSED_REMOTE, S.CLOSED})
#: States before the stream was accepted.
UNANSWERED: Final = frozenset({S.OPENING, S.OPENING_LOCAL_CLOSED, S.PENDING, S.PENDING_REMOTE_CLOSED})
#: States of live streams (kept by the session).
LIVE: Final = frozenset(set(S) - {S.IDLE, S.CLOSED})


def _build() -> dict[tuple[StreamState, StreamEvent], Outcome]:
    t: dict[tuple[StreamState, StreamEvent], Outcome] = {}

    def go(state: StreamState, event: StreamEvent, new: StreamState) -> None:
        t[state, event] = Outcome(new)

    def stream_err(state: StreamState, event: StreamEvent, code: ErrorCode) -> None:
        t[state, event] = Outcome(state, stream_error=code)

    def session_err(state: StreamState, event: StreamEvent) -> None:
        t[state, event] = Outcome(state, session_error=ErrorCode.PROTOCOL_ERROR)

    # Received frames.
    for state in (S.OPENING, S.OPENING_LOCAL_CLOSED):
        stream_err(state, E.RECV_DATA, ErrorCode.PROTOCOL_ERROR)  # DATA before ACCEPT
        stream_err(state, E.RECV_DATA_FIN, ErrorCode.PROTOCOL_ERROR)
    go(S.OPENING, E.RECV_ACCEPT, S.OPEN)
    go(S.OPENING_LOCAL_CLOSED, E.RECV_ACCEPT, S.HALF_CLOSED_LOCAL)
    go(S.PENDING, E.RECV_DATA, S.PENDING)
    go(S.PENDING, E.RECV_DATA_FIN, S.PENDING_REMOTE_CLOSED)
    go(S.OPEN, E.RECV_DATA, S.OPEN)
    go(S.OPEN, E.RECV_DATA_FIN, S.HALF_CLOSED_REMOTE)
    go(S.HALF_CLOSED_LOCAL, E.RECV_DATA, S.HALF_CLOSED_LOCAL)
    go(S.HALF_CLOSED_LOCAL, E.RECV_DATA_FIN, S.CLOSED)
    for state in (S.PENDING_REMOTE_CLOSED, S.HALF_CLOSED_REMOTE):
        stream_err(state, E.RECV_DATA, ErrorCode.STREAM_CLOSED)  # DATA after FIN
        stream_err(state, E.RECV_DATA_FIN, ErrorCode.STREAM_CLOSED)
    for state in LIVE:
        go(state, E.RECV_RESET, S.CLOSED)
        go(state, E.RECV_WINDOW_UPDATE, state)
        if state not in (S.OPENING, S.OPENING_LOCAL_CLOSED):
            session_err(state, E.RECV_ACCEPT)  # a second ACCEPT, or one for a stream the peer opened
    for event in (E.RECV_DATA, E.RECV_DATA_FIN, E.RECV_ACCEPT, E.RECV_RESET, E.RECV_WINDOW_UPDATE):
        t[S.CLOSED, event] = Outcome(S.CLOSED, ignored=True)
        session_err(S.IDLE, event)  # a stream ID that was never opened

    # Local actions.
    for state in (S.OPENING, S.OPEN, S.HALF_CLOSED_REMOTE):
        go(state, E.SEND_DATA, state)
    go(S.OPENING, E.SEND_FIN, S.OPENING_LOCAL_CLOSED)
    go(S.OPEN, E.SEND_FIN, S.HALF_CLOSED_LOCAL)
    go(S.HALF_CLOSED_REMOTE, E.SEND_FIN, S.CLOSED)
    go(S.PENDING, E.SEND_ACCEPT, S.OPEN)
    go(S.PENDING_REMOTE_CLOSED, E.SEND_ACCEPT, S.HALF_CLOSED_REMOTE)
    for state in LIVE:
        go(state, E.SEND_RESET, S.CLOSED)
    t[S.CLOSED, E.SEND_RESET] = Outcome(S.CLOSED, ignored=True)
    t[S.IDLE, E.SEND_RESET] = Outcome(S.IDLE, ignored=True)
    for state in S:
        for event in (E.SEND_DATA, E.SEND_FIN, E.SEND_ACCEPT):
            t.setdefault((state, event), Outcome(state, not_allowed=True))
    return t


#: The transition table: (state, event) -> outcome, complete over both enums.
TRANSITIONS: Final = _build()


def transition(state: StreamState, event: StreamEvent) -> Outcome:
    """The outcome of ``event`` on a stream in ``state`` (every pair has one)."""
    return TRANSITIONS[state, event]
