# -*- test-case-name: tests.unit.test_connector -*-
"""The connector's stream server: every stream the proxy opens gets the one access decision
(:mod:`connproxy.connector.access`), then a TCP relay to its backend (here) or an HTTP exchange
(:mod:`connproxy.connector.http_gateway`).

:class:`BackendDialer` connects to the internal host (``HostnameEndpoint`` with a timeout; TLS for ``TCP_TLS``)
and relays with :class:`connproxy.relay.Relay`; every failure becomes the RESET code the proxy turns into the
right SOCKS reply or HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.config import AccessRule, ConnectorConfig
from connproxy.connector.access import audit_decision, decide, describe_mapping
from connproxy.connector.backend import BackendSetupError, OneShotFactory, backend_failed, track_backend_connect
from connproxy.connector.http_gateway import HttpGateway
from connproxy.nodelay import set_no_delay
from connproxy.obs import audit
from connproxy.relay import Relay, link
from connproxy.tunnel.stream import TunnelStream
from connproxy.wire.errors import ErrorCode


@implementer(IHandshakeListener)
class BackendRelay(Relay):
    """The backend side of a stream's relay; ``ready`` fires once usable (after the TLS handshake for TLS)."""

    def __init__(self, peer: Relay, tls: bool) -> None:
        super().__init__(peer)
        self.tls = tls
        self.ready: Deferred[BackendRelay] = Deferred()
        self._handshaken = False

    def connectionMade(self) -> None:
        """TCP_NODELAY on the backend socket; plain TCP is ready now, TLS waits for the handshake."""
        set_no_delay(self.transport)
        if not self.tls:
            self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        """The TLS handshake with the backend succeeded."""
        self._handshaken = True
        if not self.ready.called:
            self.ready.callback(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Before ready: fail ``ready`` (TLS refused); afterwards: close the stream side, and a backend connection
        that failed (not a clean close) resets the stream ``BACKEND_RESET`` (spec section 4)."""
        if not self.ready.called:
            self.ready.errback(reason)
            return
        peer = self.peer
        if (
            not reason.check(ConnectionDone)
            and peer is not None
            and isinstance(peer.transport, TunnelStream)
            and not peer.transport.closed
        ):
            self._lost = True
            peer.transport.refuse(ErrorCode.BACKEND_RESET, reason.getErrorMessage()[:200], "backend connection failed")
            return
        super().connectionLost(reason)


@implementer(IStreamClientEndpoint)
class _FailedEndpoint:
    """An endpoint whose every connect fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """Fail at once."""
        return fail(self.error)


class BackendDialer:
    """Serves streams the proxy opens: access control, backend connect, relay."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: ConnectorConfig,
        endpoint_for: Callable[[AccessRule, str, int], IStreamClientEndpoint] | None = None,
        audit_writer: audit.AuditWriter | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.audit_writer = audit_writer
        self._endpoint_for = endpoint_for or self._default_endpoint
        self.http = HttpGateway(reactor, config, self.endpoint_for, audit_writer)

    def endpoint_for(self, rule: AccessRule, host: str, port: int) -> IStreamClientEndpoint:
        """The endpoint of a backend connection for ``rule``; never raises.

        Building it can fail (a ``TCP_TLS``/``HTTPS`` mapping whose CA file is missing raises
        ``FileNotFoundError``): that connection then fails with :class:`BackendSetupError` (``TLS_ERROR`` for TLS
        mappings), which the stream's RESET reports, instead of an exception that would reach the tunnel.
        """
        try:
            return self._endpoint_for(rule, host, port)
        except Exception as e:
            tls = rule.protocol in ("TCP_TLS", "HTTPS")
            what = "TLS to the backend cannot be set up" if tls else "the backend connection cannot be set up"
            error = BackendSetupError(
                f"{what} for system {rule.virtual_host} -> {host}:{port}: {type(e).__name__}: {e}",
                ErrorCode.TLS_ERROR if tls else ErrorCode.INTERNAL_ERROR,
            )
            return _FailedEndpoint(error)

    def _default_endpoint(self, rule: AccessRule, host: str, port: int) -> IStreamClientEndpoint:
        timeout = self.config.backend.connect_timeout_seconds
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            # An IPv4 literal resolves to itself: HostnameEndpoint would make exactly this endpoint, but only after
            # a getaddrinfo round trip through the reactor's thread pool (and a new zope class per connect).
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=timeout)
        if rule.protocol in ("TCP_TLS", "HTTPS"):
            from connproxy.pki.tls import backend_options

            endpoint = wrapClientTLS(backend_options(host, rule.ca_file), endpoint)
        return endpoint

    def handle(self, tunnel: Any, stream: TunnelStream) -> None:
        """Decide on one opened stream: RESET ``ACCESS_DENIED``, or connect and accept.

        ``kind == "http"`` streams (one HTTP request each) go to :class:`~connproxy.connector.http_gateway.HttpGateway`.
        """
        request = stream.request
        decision = decide(self.config, request)
        audit_decision(decision, request, connector_id=self.config.connector_id, writer=self.audit_writer)
        if not decision.allowed:
            stream.refuse(decision.code, decision.answer, decision.why)
            return
        if request.kind == "http":
            self.http.serve(tunnel, stream, decision)
            return
        rule = decision.rule
        assert rule is not None
        internal_port = decision.internal_port
        near = Relay()
        far = BackendRelay(near, tls=rule.protocol == "TCP_TLS")
        link(near, far)
        endpoint = self.endpoint_for(rule, rule.internal_host, internal_port)
        connecting = endpoint.connect(OneShotFactory(far))
        timeout = self.config.backend.connect_timeout_seconds
        ready: Deferred[Any] = connecting.addCallback(lambda _p: far.ready)
        ready.addTimeout(timeout + 1.0, self.reactor)

        def on_ready(_: object) -> None:
            if stream.closed:
                far.transport.loseConnection()  # type: ignore[union-attr]
                return
            tunnel.accept(stream, near)

        def abandon(failure: Failure) -> Failure:
            # TCP may be up while TLS never finished (timeout, or the tunnel went away): close that socket too.
            if far.transport is not None and not far._lost:
                far.transport.abortConnection()  # type: ignore[attr-defined]
            return failure

        ready.addErrback(abandon)
        ready.addCallbacks(
            on_ready, backend_failed, errbackArgs=(tunnel, stream, describe_mapping(self.config, decision))
        )
        track_backend_connect(tunnel, stream, ready)
