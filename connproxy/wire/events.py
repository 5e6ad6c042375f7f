"""Events that :meth:`connproxy.wire.session.Session.receive_data` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from connproxy.wire.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """The target and metadata of an OPEN frame (spec section 3.2)."""

    host: str
    port: int
    kind: str = "tcp"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer's HELLO arrived; ``hello`` is the decoded JSON object and ``version`` the agreed version."""

    hello: dict[str, Any]
    version: int


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened stream ``stream_id``; answer with ``accept_stream`` or ``reset_stream``."""

    stream_id: int
    request: OpenRequest


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer accepted a stream we opened."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream bytes arrived. Call ``acknowledge(stream_id, len(data))`` once they have been passed on."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): it will send nothing more on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was aborted, by the peer (``remote``) or by this session (a stream-level protocol error)."""

    stream_id: int
    code: ErrorCode
    reason: str
    remote: bool = True


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """Send credit grew for ``stream_id`` (0: the session window, so possibly every stream)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """The peer echoed one of our PINGs."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; streams up to ``last_stream_id`` continue."""

    last_stream_id: int
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class ReplicasReceived:
    """The proxy announced its (changed) replica set: the ``replicas`` list of a REPLICAS frame."""

    replicas: list[Any]


Event = (
    HelloReceived
    | StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingAcknowledged
    | GoAwayReceived
    | ReplicasReceived
)
