"""Failures a tunnel stream open can end in, and how each front end answers them.

The mapping tables are the single place where tunnel error codes become SOCKS5 reply codes and HTTP statuses
(``docs/tunnel-protocol.md`` section 4).
"""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from connproxy.wire.errors import ErrorCode
from connproxy.wire.socks5 import Reply


class TunnelOpenError(Exception):
    """Base class: a stream through a tunnel could not be opened."""


class NoConnectorError(TunnelOpenError):
    """No connector serves the (tenant, location) pair."""

    def __init__(self, tenant: str, location: str) -> None:
        super().__init__(f"no connector for subaccount {tenant}, location {location or '(default)'}")
        self.tenant = tenant
        self.location = location


class StreamRefusedError(TunnelOpenError):
    """The connector refused the stream with a RESET ``code`` (access denied, backend unreachable ...)."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


class OpenTimeoutError(TunnelOpenError):
    """The connector answered neither ACCEPT nor RESET in time."""


class TunnelLostError(TunnelOpenError):
    """The tunnel went away while the stream was being opened."""


class StreamResetError(ConnectionLost):
    """An established stream was reset by the peer (a connection-lost reason for the relay)."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"stream reset: {code.name} {reason}".strip())
        self.code = code
        self.reason = reason


_SOCKS_BY_CODE = {
    ErrorCode.REFUSED_STREAM: Reply.NETWORK_UNREACHABLE,
    ErrorCode.ACCESS_DENIED: Reply.NOT_ALLOWED,
    ErrorCode.CONNECT_REFUSED: Reply.HOST_UNREACHABLE,
    ErrorCode.CONNECT_TIMEOUT: Reply.HOST_UNREACHABLE,
    ErrorCode.HOST_UNREACHABLE: Reply.HOST_UNREACHABLE,
    ErrorCode.TLS_ERROR: Reply.HOST_UNREACHABLE,
}

_HTTP_BY_CODE = {
    ErrorCode.REFUSED_STREAM: 503,
    ErrorCode.CANCEL: 504,
    ErrorCode.ACCESS_DENIED: 403,
    ErrorCode.CONNECT_TIMEOUT: 504,
    ErrorCode.IDLE_TIMEOUT: 504,
}


def socks_reply_for(failure: Failure) -> Reply:
    """The SOCKS5 reply code for a failed open (SAP's meanings, ``sap-connectivity-proxy.md`` 2.3)."""
    if failure.check(NoConnectorError, TunnelLostError):
        return Reply.NETWORK_UNREACHABLE
    if failure.check(OpenTimeoutError):
        return Reply.HOST_UNREACHABLE
    if failure.check(StreamRefusedError):
        return _SOCKS_BY_CODE.get(failure.value.code, Reply.GENERAL_FAILURE)  # type: ignore[union-attr]
    return Reply.GENERAL_FAILURE


def http_status_for(failure: Failure) -> int:
    """The HTTP status for a failed open: 503 no connector, 403 denied, 504 timeouts, else 502."""
    if failure.check(NoConnectorError, TunnelLostError):
        return 503
    if failure.check(OpenTimeoutError):
        return 504
    if failure.check(StreamRefusedError):
        return _HTTP_BY_CODE.get(failure.value.code, 502)  # type: ignore[union-attr]
    return 502
