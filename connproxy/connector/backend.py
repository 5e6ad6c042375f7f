"""Connector side: what happens when a backend connection fails, shared by the TCP and HTTP paths."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from connproxy.tunnel.stream import TunnelStream
from connproxy.wire.errors import ErrorCode

_log = Logger(namespace="connproxy.connector.backend")


class BackendSetupError(Exception):
    """The connection to a backend could not even be set up (its endpoint failed to build: a TLS mapping's CA
    file missing or unreadable, bad TLS material ...).

    :ivar code: the RESET code: ``TLS_ERROR`` for TLS mappings, else ``INTERNAL_ERROR``.
    """

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


def reset_code_for(failure: Failure) -> ErrorCode:
    """The RESET code for a failed backend connection."""
    if failure.check(BackendSetupError):
        return failure.value.code  # type: ignore[union-attr,no-any-return]
    if failure.check(ierror.ConnectionRefusedError):
        return ErrorCode.CONNECT_REFUSED
    if failure.check(ierror.TimeoutError, DeferredTimeoutError, CancelledError):
        return ErrorCode.CONNECT_TIMEOUT
    if failure.check(SSL.Error):
        return ErrorCode.TLS_ERROR
    if failure.check(ierror.DNSLookupError, ierror.NoRouteError, ierror.ConnectError):
        return ErrorCode.HOST_UNREACHABLE
    return ErrorCode.HOST_UNREACHABLE


def backend_failed(failure: Failure, tunnel: Any, stream: TunnelStream, mapping: str) -> None:
    """A backend connection for ``stream`` failed: log it, naming the mapping (``mapping``, from
    :func:`connproxy.connector.access.describe_mapping`), and RESET the stream with the matching code.

    Shared by the TCP path (:class:`BackendDialer`) and the HTTP gateway.
    """
    if stream.closed:
        return
    code = reset_code_for(failure)
    request = stream.request
    # A connection that could not even be set up is this connector's configuration problem: an error, once.
    emit = _log.error if failure.check(BackendSetupError) else _log.info
    emit(
        "backend of {mapping} unreachable for subaccount {tenant}: {code} {error}",
        mapping=mapping, target=f"{request.host}:{request.port}", tenant=request.meta.get("tenant"),
        code=code.name, error=failure.getErrorMessage(),
    )
    stream.refuse(code, failure.getErrorMessage()[:200], "backend connect failed")


def track_backend_connect(tunnel: Any, stream: TunnelStream, connecting: Deferred[Any]) -> None:
    """Remember a backend connect in flight, so that losing the tunnel cancels it."""
    pending: dict[int, Deferred[Any]] | None = getattr(tunnel, "pending_connects", None)
    if pending is None:
        return
    pending[stream.stream_id] = connecting

    def done(result: object) -> object:
        pending.pop(stream.stream_id, None)
        return result

    connecting.addBoth(done)


class OneShotFactory(Factory):
    """The factory of one backend connection: hands out the protocol it was made with.

    Quiet (``noisy`` false): Twisted's "Starting/Stopping factory" lines would cost two log events per backend
    connection, as much as the request's own audit line.
    """

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> IProtocol:  # type: ignore[override]
        """The one protocol."""
        return self.protocol_instance
