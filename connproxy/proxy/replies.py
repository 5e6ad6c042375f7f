# -*- test-case-name: tests.unit.test_http_proxy,tests.unit.test_socks -*-
"""How the front ends answer: the single place where tunnel error codes become SOCKS5 reply codes, HTTP statuses
and the plain-text bodies of those statuses (``docs/tunnel-protocol.md`` section 4), and the table of the HTTP
statuses the proxy answers itself (:data:`REASONS`). Client-controlled text (a location id, a tenant taken from
a token, a host name) reaches a body only through :func:`connproxy.http.headers.escape_controls`.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from connproxy.http.headers import escape_controls
from connproxy.tunnel.errors import (
    NoConnectorError,
    OpenTimeoutError,
    StreamRefusedError,
    TenantStreamLimitError,
    TunnelLostError,
)
from connproxy.wire.errors import ErrorCode
from connproxy.wire.socks5 import Reply

#: Every status the HTTP front end answers itself, with its reason phrase.
REASONS: dict[int, bytes] = {
    200: b"Connection established",
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reason_for(status: int) -> bytes:
    """The reason phrase of an answer of the proxy itself (empty for a status not in :data:`REASONS`)."""
    return REASONS.get(status, b"")


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
    ErrorCode.STREAM_STALLED: 504,
}


def socks_reply_for(failure: Failure) -> Reply:
    """The SOCKS5 reply code for a failed open (SAP's meanings, ``sap-connectivity-proxy.md`` 2.3).

    The tenant's stream limit is 0x01 "general failure": SAP's 0x03 means "connector not connected / location not
    found", which would send an operator looking at the wrong thing (``docs/reliability.md``).
    """
    if failure.check(TenantStreamLimitError):
        return Reply.GENERAL_FAILURE
    if failure.check(NoConnectorError, TunnelLostError):
        return Reply.NETWORK_UNREACHABLE
    if failure.check(OpenTimeoutError):
        return Reply.HOST_UNREACHABLE
    if failure.check(StreamRefusedError):
        return _SOCKS_BY_CODE.get(failure.value.code, Reply.GENERAL_FAILURE)  # type: ignore[union-attr]
    return Reply.GENERAL_FAILURE


def http_status_for(failure: Failure) -> int:
    """The HTTP status for a failed open: 503 no connector or the tenant's stream limit, 403 denied, 504
    timeouts, else 502."""
    if failure.check(NoConnectorError, TunnelLostError, TenantStreamLimitError):
        return 503
    if failure.check(OpenTimeoutError):
        return 504
    if failure.check(StreamRefusedError):
        return _HTTP_BY_CODE.get(failure.value.code, 502)  # type: ignore[union-attr]
    return 502


_CODE_TEXT = {
    ErrorCode.CONNECT_REFUSED: "bad gateway: the backend of system {target} refused the connection",
    ErrorCode.HOST_UNREACHABLE: "bad gateway: the backend of system {target} is unreachable",
    ErrorCode.TLS_ERROR: "bad gateway: TLS to the backend of system {target} failed",
    ErrorCode.BACKEND_RESET: "bad gateway: the backend of system {target} closed the connection",
    ErrorCode.CONNECT_TIMEOUT: "gateway timeout: the backend of system {target} did not accept the connection "
                               "in time",
    ErrorCode.IDLE_TIMEOUT: "gateway timeout: system {target} was idle for too long",
    ErrorCode.STREAM_STALLED: "gateway timeout: the exchange with system {target} made no progress",
    ErrorCode.REFUSED_STREAM: "service unavailable: the connector refused the request (busy or draining)",
    ErrorCode.CANCEL: "gateway timeout: the request to system {target} was cancelled",
}


def open_failure_text(failure: Failure, target: str) -> str:
    """The plain-text body for a failed tunnel stream (no internal host names, no tokens; control characters
    of client-controlled parts escaped)."""
    return escape_controls(_open_failure_text(failure, target))


def _open_failure_text(failure: Failure, target: str) -> str:
    error = failure.value
    if isinstance(error, StreamRefusedError):
        if error.code == ErrorCode.ACCESS_DENIED:
            return error.reason or f"access denied to system {target}"
        text = _CODE_TEXT.get(error.code)
        if text is not None:
            return text.format(target=target)
        return f"bad gateway: the connector could not serve system {target} ({error.code.name})"
    if isinstance(error, TenantStreamLimitError):
        return f"service unavailable: {error}"
    status = http_status_for(failure)
    if status == 503:
        return str(error)
    if status == 504:
        return f"gateway timeout: the connector did not open system {target} in time"
    return f"bad gateway: system {target} could not be reached ({type(error).__name__})"
