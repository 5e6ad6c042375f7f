# -*- test-case-name: tests.unit.test_connector -*-
"""The on-premise connector: dials the proxy, keeps the tunnel up, and serves the streams the proxy opens.

* :class:`ConnectorService` dials out over TLS (client certificate; the proxy's certificate and host name are
  verified), forever, with capped exponential backoff and full jitter. The first retries are fast; the host name
  is resolved again on every try (``HostnameEndpoint``), the very first connection included.
* :class:`ConnectorTunnel` sends HELLO, pings (the shared :class:`TunnelConnection` keepalive notices a dead
  tunnel within ``deadAfterSeconds``) and hands each opened stream to :class:`BackendDialer`.
* :class:`BackendDialer` checks the ``accessControl`` list (deny by default), connects to the internal host
  (``HostnameEndpoint`` with a timeout; TLS for ``TCP_TLS``) and relays with :class:`connproxy.relay.Relay`;
  every failure becomes the RESET code the proxy turns into the right SOCKS reply or HTTP status.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy import audit
from connproxy.backend import backend_failed, track_backend_connect
from connproxy.config import AccessRule, ConnectorConfig
from connproxy.connector_http import HttpGateway
from connproxy.relay import Relay, link
from connproxy.tunnel.connection import TunnelConnection, TunnelTimers
from connproxy.tunnel.stream import TunnelStream
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import GoAwayReceived, HelloReceived
from connproxy.wire.session import Role, Settings

CAPABILITIES = ["half-close", "early-data"]


def settings_from(config: ConnectorConfig | Any) -> tuple[Settings, TunnelTimers]:
    """Session settings and timers from a ``tunnel`` tuning block."""
    t = config.tunnel
    settings = Settings(
        stream_window=t.stream_window_bytes,
        connection_window=t.connection_window_bytes,
        max_frame=t.max_frame_bytes,
        max_streams=t.max_streams,
    )
    timers = TunnelTimers(
        ping_interval=t.ping_interval_seconds,
        dead_after=t.dead_after_seconds,
        open_timeout=t.open_timeout_seconds,
        handshake_timeout=t.open_timeout_seconds,
    )
    return settings, timers


def backoff_delay(attempt: int, *, initial: float, maximum: float, fast_retries: int,
                  rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before connection attempt number ``attempt`` (1 = the first retry).

    Full jitter: the first ``fast_retries`` retries draw uniformly from ``[0, initial]``; after them, retry
    ``attempt`` draws from ``[0, min(maximum, initial * 2**(attempt - fast_retries))]``.
    """
    if attempt <= fast_retries:
        ceiling = initial
    else:
        ceiling = min(maximum, initial * (2 ** min(attempt - fast_retries, 30)))
    return rng() * ceiling


# ---------------------------------------------------------------------------------------------------- backend


@implementer(IHandshakeListener)
class BackendRelay(Relay):
    """The backend side of a stream's relay; ``ready`` fires once usable (after the TLS handshake for TLS)."""

    def __init__(self, peer: Relay, tls: bool) -> None:
        super().__init__(peer)
        self.tls = tls
        self.ready: Deferred[BackendRelay] = Deferred()
        self._handshaken = False

    def connectionMade(self) -> None:
        """Plain TCP is ready now; TLS waits for the handshake."""
        if not self.tls:
            self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        """The TLS handshake with the backend succeeded."""
        self._handshaken = True
        if not self.ready.called:
            self.ready.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Before ready: fail ``ready`` (TLS refused); afterwards: close the stream side."""
        if not self.ready.called:
            self.ready.errback(reason)
            return
        super().connectionLost(reason)


class _BackendFactory(Factory):
    noisy = False  # one factory per backend connection: no "Starting/Stopping factory" log lines

    def __init__(self, relay: BackendRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> BackendRelay:
        return self.relay


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
        self.http = HttpGateway(reactor, config, self._endpoint_for, audit_writer)

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
            from connproxy.tls import backend_options

            endpoint = wrapClientTLS(backend_options(host, rule.ca_file), endpoint)
        return endpoint

    def handle(self, tunnel: ConnectorTunnel, stream: TunnelStream) -> None:
        """Decide on one opened stream: RESET ``ACCESS_DENIED``, or connect and accept.

        ``kind == "http"`` streams (one HTTP request each) go to :class:`~connproxy.connector_http.HttpGateway`.
        """
        request = stream.request
        if request.kind == "http":
            self.http.handle(tunnel, stream)
            return
        rule = self.config.find_rule(request.host, request.port)
        target = f"{request.host}:{request.port}"
        if rule is None or rule.protocol not in ("TCP", "TCP_TLS") or request.kind != "tcp":
            why = "no access control rule for this host and port" if rule is None else (
                f"{rule.protocol} mapping does not allow {request.kind} streams"
            )
            self._decide(False, stream, why)
            tunnel.reset_stream(stream.stream_id, ErrorCode.ACCESS_DENIED, f"access denied to system {target}")
            stream.reset(ErrorCode.ACCESS_DENIED, why)
            return
        internal_port = rule.internal_port_for(request.port)
        self._decide(True, stream, f"{rule.protocol} mapping to {rule.internal_host}:{internal_port}")
        near = Relay()
        far = BackendRelay(near, tls=rule.protocol == "TCP_TLS")
        link(near, far)
        endpoint = self._endpoint_for(rule, rule.internal_host, internal_port)
        connecting = endpoint.connect(_BackendFactory(far))
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
            on_ready, backend_failed, errbackArgs=(tunnel, stream, f"{rule.internal_host}:{internal_port}")
        )
        track_backend_connect(tunnel, stream, ready)

    def _decide(self, allowed: bool, stream: TunnelStream, why: str) -> None:
        request = stream.request
        meta = request.meta
        audit.access_decision(
            allowed=allowed,
            tenant=str(meta.get("tenant")) if meta.get("tenant") is not None else None,
            location=str(meta.get("location")) if meta.get("location") is not None else None,
            client_id=str(meta.get("client_id")) if meta.get("client_id") is not None else None,
            method=None,
            virtual_host=request.host,
            virtual_port=request.port,
            path=None,
            why=why,
            connector_id=self.config.connector_id,
            writer=self.audit_writer,
        )


# ---------------------------------------------------------------------------------------------------- tunnel


class ConnectorTunnel(TunnelConnection):
    """The connector's end of one tunnel."""

    log = Logger()

    def __init__(self, service: ConnectorService) -> None:
        settings, timers = settings_from(service.config)
        super().__init__(Role.DIALER, settings, service.clock, timers)
        self.service = service
        self.pending_connects: dict[int, Deferred[Any]] = {}
        self.established_at: float | None = None
        self.refusal: str | None = None

    def connectionMade(self) -> None:
        """Send the preface and HELLO at once (TLS carries them after its handshake)."""
        super().connectionMade()
        config = self.service.config
        self.session.send_hello(
            {
                "connector_id": config.connector_id,
                "subaccount": config.subaccount_id,
                "location": config.location_id,
                "capabilities": CAPABILITIES,
            }
        )
        self._flush()

    def hello_received(self, event: HelloReceived) -> None:
        """The proxy accepted us: the tunnel is up."""
        self.handshake_done()
        self.established_at = self.clock.seconds()
        self.service.tunnel_up(self, event.hello)

    def goaway_received(self, event: GoAwayReceived) -> None:
        """Remember why the proxy refused or drains us (logged on loss)."""
        if event.code == ErrorCode.AUTH_FAILED:
            self.refusal = event.reason
            self.log.error(
                "the proxy refused this connector's identity: {reason}", reason=event.reason
            )
        elif not self.session.ready:
            self.refusal = f"{event.code.name}: {event.reason}"
        elif event.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.NORMAL):
            self.service.tunnel_draining(self, event)
        elif event.code == ErrorCode.REPLACED:
            # Another connector with our connector_id and location took over: dialing again at once would make
            # the two replace each other forever. Reconnect with backoff when this tunnel closes.
            self.refusal = "replaced by another connector with the same connectorId and location"
            self.log.error(
                "the proxy replaced this tunnel with another connector's of the same connectorId {connector_id}: "
                "give every connector its own connectorId",
                connector_id=self.service.config.connector_id,
            )
        else:
            self.refusal = f"{event.code.name}: {event.reason}"

    def stream_opened(self, stream: TunnelStream) -> None:
        """Serve the stream (access control, backend)."""
        self.service.dialer.handle(self, stream)

    def tunnel_lost(self, reason: Failure | None) -> None:
        """Cancel backend connects in flight and let the service reconnect."""
        pending, self.pending_connects = self.pending_connects, {}
        for d in list(pending.values()):
            d.cancel()
        self.service.tunnel_down(self, reason)


class _TunnelFactory(Factory):
    def __init__(self, service: ConnectorService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> ConnectorTunnel:
        return ConnectorTunnel(self.service)


class ConnectorService(Service):
    """Keeps one tunnel to the proxy up, forever.

    :param endpoint_factory: builds a fresh client endpoint per attempt (so the host name is resolved again);
        by default TLS over ``HostnameEndpoint`` to ``config.proxy``.
    """

    log = Logger()
    stable_after = 10.0

    def __init__(
        self,
        reactor: Any,
        config: ConnectorConfig,
        endpoint_factory: Callable[[], IStreamClientEndpoint],
        *,
        rng: Callable[[], float] = random.random,
        audit_writer: audit.AuditWriter | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.config = config
        self.endpoint_factory = endpoint_factory
        self.dialer = BackendDialer(reactor, config, audit_writer=audit_writer)
        self.rng = rng
        self.attempt = 0
        self.tunnel: ConnectorTunnel | None = None
        self._retry: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        self._stopping = False
        self._up_waiters: list[Deferred[ConnectorTunnel]] = []
        self.connections = 0

    # ------------------------------------------------------------------ service

    def setServiceParent(self, parent: Any) -> None:
        """Join ``parent``; under twistd also hand it the configured log observer (``logging``)."""
        from connproxy.logs import install

        install(parent, self.config.logging)
        super().setServiceParent(parent)

    def startService(self) -> None:
        """Dial now."""
        super().startService()
        self._stopping = False
        self._dial()

    def stopService(self) -> Deferred[None]:
        """Stop dialing; GOAWAY the tunnel, let its streams finish (up to 30 s), then close it."""
        super().stopService()
        self._stopping = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        tunnel = self.tunnel
        if tunnel is None or tunnel.lost:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def closed(result: object) -> object:
            if not done.called:
                done.callback(None)
            return result

        tunnel.closed.addBoth(closed)
        tunnel.drain(ErrorCode.SHUTTING_DOWN, "connector shutting down", grace=30.0)
        return done

    def when_up(self) -> Deferred[ConnectorTunnel]:
        """Fire with the tunnel once it is (or if it already is) established (for tests and the demo)."""
        if self.tunnel is not None and self.tunnel.established_at is not None and not self.tunnel.lost:
            return succeed(self.tunnel)
        d: Deferred[ConnectorTunnel] = Deferred()
        self._up_waiters.append(d)
        return d

    # ------------------------------------------------------------------ dialing

    def _dial(self) -> None:
        self._retry = None
        if self._stopping:
            return
        self.connections += 1
        config = self.config
        self.log.info(
            "connecting to proxy {host}:{port} (attempt {attempt})", host=config.proxy.host, port=config.proxy.port,
            attempt=self.attempt + 1,
        )
        try:
            endpoint = self.endpoint_factory()
            d = endpoint.connect(_TunnelFactory(self))
        except Exception:
            self.log.failure("could not start a connection to the proxy")
            self._schedule_retry("endpoint error")
            return
        d.addTimeout(config.tunnel.open_timeout_seconds + 5.0, self.reactor)
        self._connecting = d

        def connected(tunnel: ConnectorTunnel) -> None:
            self._connecting = None
            self.tunnel = tunnel

        def failed(failure: Failure) -> None:
            self._connecting = None
            if failure.check(CancelledError) and self._stopping:
                return
            self.log.warn(
                "could not connect to proxy {host}:{port}: {error}", host=config.proxy.host,
                port=config.proxy.port, error=failure.getErrorMessage(),
            )
            self._schedule_retry(failure.getErrorMessage())

        d.addCallbacks(connected, failed)

    def _schedule_retry(self, why: str) -> None:
        if self._stopping:
            return
        self.attempt += 1
        r = self.config.reconnect
        delay = backoff_delay(
            self.attempt, initial=r.initial_delay_seconds, maximum=r.max_delay_seconds,
            fast_retries=r.fast_retries, rng=self.rng,
        )
        self.log.info("retrying in {delay:.2f}s ({why})", delay=delay, why=why)
        self._retry = self.clock.callLater(delay, self._dial)

    # ------------------------------------------------------------------ tunnel callbacks

    def tunnel_up(self, tunnel: ConnectorTunnel, hello: dict[str, Any]) -> None:
        """The handshake completed."""
        self.tunnel = tunnel
        self.log.info(
            "tunnel established to proxy replica {replica} as {tunnel_id} location {location}",
            replica=hello.get("replica_id"), tunnel_id=hello.get("tunnel_id"),
            location=self.config.location_id or "(default)",
        )
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            d.callback(tunnel)

    def tunnel_draining(self, tunnel: ConnectorTunnel, event: GoAwayReceived) -> None:
        """The proxy drains this tunnel: dial a new one now (the old one finishes its streams)."""
        if tunnel is self.tunnel and not self._stopping:
            self.tunnel = None
            self.attempt = 0
            if self._retry is None and self._connecting is None:
                self._dial()

    def tunnel_down(self, tunnel: ConnectorTunnel, reason: Failure | None) -> None:
        """The tunnel closed: reconnect with backoff (reset only after a stable period)."""
        if tunnel.established_at is not None and self.clock.seconds() - tunnel.established_at >= self.stable_after:
            self.attempt = 0
        why = tunnel.refusal or (reason.getErrorMessage() if reason is not None else "closed")
        if tunnel is self.tunnel:
            self.tunnel = None
            self.log.warn("tunnel to the proxy lost: {why}", why=why)
            self._schedule_retry(why)
        elif tunnel.established_at is None and self._retry is None and self._connecting is None:
            self.log.warn("tunnel handshake failed: {why}", why=why)
            self._schedule_retry(why)
