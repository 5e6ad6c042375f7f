"""Error codes of the tunnel protocol and the exceptions the sans-IO core raises.

See ``docs/tunnel-protocol.md`` section 4 for the meaning of each code.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """A RESET (stream) or GOAWAY (session) error code."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED_STREAM = 6
    CANCEL = 7
    ACCESS_DENIED = 8
    CONNECT_REFUSED = 9
    CONNECT_TIMEOUT = 10
    HOST_UNREACHABLE = 11
    BACKEND_RESET = 12
    TLS_ERROR = 13
    IDLE_TIMEOUT = 14
    UNSUPPORTED_VERSION = 15
    AUTH_FAILED = 16
    REPLACED = 17
    KEEPALIVE_TIMEOUT = 18
    SHUTTING_DOWN = 19
    CONTROL_BACKLOG = 20
    HANDSHAKE_TIMEOUT = 21
    STREAM_STALLED = 22
    TOO_MANY_TUNNELS = 23

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Map a received code to the enum; unknown codes become ``INTERNAL_ERROR`` (spec section 4)."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class TunnelError(Exception):
    """Base class of the errors the tunnel core raises."""


class ProtocolError(TunnelError):
    """The peer broke the protocol; the session must end with GOAWAY ``code``.

    :ivar code: the :class:`ErrorCode` to send in the GOAWAY.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamStateError(TunnelError):
    """The local application asked for something the stream's state does not allow (a local bug)."""


class OpenTooLargeError(TunnelError):
    """The target and metadata of a stream do not fit in one OPEN frame (a local limit, not the peer's fault)."""
