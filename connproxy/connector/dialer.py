# -*- test-case-name: tests.unit.test_connector -*-
"""The on-premise connector's tunnel to the proxy: dial, HELLO, reconnect forever.

* :class:`ConnectorService` dials out over TLS (client certificate; the proxy's certificate and host name are
  verified), forever, with capped exponential backoff and full jitter. The host name is resolved again on every
  try (``HostnameEndpoint``), the very first connection included.
* No dead time after a proxy restart: a lost tunnel (or a GOAWAY ``SHUTTING_DOWN``/``NORMAL``) is redialled at
  once (jitter within ``reconnect.initialDelaySeconds``); the backoff grows only while dials keep failing and
  starts over with every completed handshake. Only a tunnel that keeps dying young (shorter than
  :attr:`ConnectorService.stable_after`, e.g. a proxy that accepts and then drops us) keeps its backoff, so
  that such a loop cannot turn into a tight one.
* :class:`ConnectorTunnel` sends HELLO, pings (the shared :class:`TunnelConnection` keepalive notices a dead
  tunnel within ``deadAfterSeconds``) and hands each opened stream to
  :class:`connproxy.connector.tcp.BackendDialer`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from connproxy.config import ConnectorConfig
from connproxy.connector.metrics import ConnectorMetrics
from connproxy.connector.tcp import BackendDialer
from connproxy.obs import audit
from connproxy.pki import tls
from connproxy.pki.state import resolve_tls_files
from connproxy.tunnel.connection import TunnelConnection
from connproxy.tunnel.settings import CAPABILITIES, settings_from
from connproxy.tunnel.stream import TunnelStream
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import GoAwayReceived, HelloReceived, ReplicasReceived
from connproxy.wire.session import Role

#: Growth of the backoff ceiling per failed attempt after the fast retries.
BACKOFF_FACTOR = 1.5


def backoff_delay(attempt: int, *, initial: float, maximum: float, fast_retries: int,
                  rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before connection attempt number ``attempt`` (1 = the first retry).

    Full jitter: the first ``fast_retries`` retries draw uniformly from ``[0, initial]``; after them, retry
    ``attempt`` draws from ``[0, min(maximum, initial * 1.5**(attempt - fast_retries))]``. The gentle factor
    (Konnectivity's) keeps the ceiling low for the first seconds of an outage, so that a proxy that restarts in a
    few seconds is found again within about a second of listening.
    """
    if attempt <= fast_retries:
        ceiling = initial
    else:
        ceiling = min(maximum, initial * (BACKOFF_FACTOR ** min(attempt - fast_retries, 60)))
    return rng() * ceiling


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
        self.replica_id = ""

    def connectionMade(self) -> None:
        """Send the preface and HELLO at once (TLS carries them after its handshake)."""
        super().connectionMade()
        config = self.service.config
        self.session.send_hello(
            {
                "connector_id": config.connector_id,
                "subaccount": config.subaccount_id,
                "location": config.location_id,
                "capabilities": list(CAPABILITIES),
            }
        )
        self._flush()

    def hello_received(self, event: HelloReceived) -> None:
        """The proxy accepted us: the tunnel is up."""
        self.handshake_done()
        self.established_at = self.clock.seconds()
        self.replica_id = str(event.hello.get("replica_id") or "")[:128]
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

    def replicas_received(self, event: ReplicasReceived) -> None:
        """The proxy's replica set changed: tell the replica manager (several replicas only)."""
        if self.service.manager is not None:
            self.service.manager.replicas_announced(self.service, event.replicas)

    def stream_opened(self, stream: TunnelStream) -> None:
        """Serve the stream (access control, backend)."""
        self.service.dialer.handle(self, stream)

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "", after_data: bool = False) -> None:
        """Send RESET, counting access denials and backend failures (:class:`ConnectorMetrics`)."""
        self.service.metrics.reset_sent(code)
        super().reset_stream(stream_id, code, reason, after_data)

    def tunnel_lost(self, reason: Failure | None) -> None:
        """Cancel backend connects in flight and let the service reconnect."""
        self.service.tunnels.discard(self)
        pending, self.pending_connects = self.pending_connects, {}
        for d in list(pending.values()):
            d.cancel()
        self.service.tunnel_down(self, reason)


class _TunnelFactory(Factory):
    """Builds the tunnel protocol for one dial. Quiet: Twisted's "Starting/Stopping factory" pair would be two
    info lines per dial attempt (the connection loop logs its own, with the reason)."""

    noisy = False

    def __init__(self, service: ConnectorService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> ConnectorTunnel:
        tunnel = ConnectorTunnel(self.service)
        self.service.tunnels.add(tunnel)
        return tunnel


class LinkState(enum.Enum):
    """Where one connection loop to the proxy stands (:class:`ConnectorService`)."""

    IDLE = "idle"  #: made, not started
    CONNECTING = "connecting"  #: a TCP/TLS connection to the proxy is being made
    HANDSHAKING = "handshaking"  #: connected; waiting for the proxy's HELLO
    UP = "up"  #: the tunnel is established
    BACKOFF = "backoff"  #: waiting to dial again
    DRAINING = "draining"  #: stopping: tunnels finish their streams (``shutdown.drainTimeoutSeconds``)
    STOPPED = "stopped"  #: stopped; :meth:`ConnectorService.startService` starts again


#: The transitions a connection loop may make; anything else is a bug (logged, see ``ConnectorService._enter``).
TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    LinkState.IDLE: frozenset({LinkState.CONNECTING, LinkState.STOPPED}),
    LinkState.CONNECTING: frozenset({LinkState.HANDSHAKING, LinkState.BACKOFF, LinkState.DRAINING,
                                     LinkState.STOPPED}),
    LinkState.HANDSHAKING: frozenset({LinkState.UP, LinkState.BACKOFF, LinkState.DRAINING, LinkState.STOPPED}),
    LinkState.UP: frozenset({LinkState.BACKOFF, LinkState.DRAINING, LinkState.STOPPED}),
    LinkState.BACKOFF: frozenset({LinkState.CONNECTING, LinkState.DRAINING, LinkState.STOPPED}),
    LinkState.DRAINING: frozenset({LinkState.STOPPED}),
    LinkState.STOPPED: frozenset({LinkState.CONNECTING}),
}


class ConnectorService(Service):
    """Keeps one tunnel to the proxy up, forever.

    :param endpoint_factory: builds a fresh client endpoint per attempt (so the host name is resolved again);
        by default TLS over ``HostnameEndpoint`` to ``config.proxy``.
    :param route: with several replicas, the replica this loop keeps a tunnel to (``None``: any replica);
        a tunnel that lands on another replica is closed and dialled again.
    :param dialer: the backend dialer (shared by the loops of several replicas; its owner closes its idle
        backend connections after the drain, so a loop given one leaves them alone).
    :param manager: the :class:`connproxy.connector.replicas.ReplicaConnector` owning this loop, if any.
    :param metrics: the metrics to count in (shared by the loops of several replicas); by default this loop's own,
        reading its tunnels.
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
        route: Any = None,
        dialer: BackendDialer | None = None,
        manager: Any = None,
        metrics: ConnectorMetrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.config = config
        self.endpoint_factory = endpoint_factory
        self.dialer = dialer or BackendDialer(reactor, config, audit_writer=audit_writer)
        self._owns_dialer = dialer is None
        self.route = route
        self.manager = manager
        self.rng = rng
        self.attempt = 0
        #: Tunnels in a row that died within :attr:`stable_after` of their handshake.
        self.short_lived = 0
        self.tunnel: ConnectorTunnel | None = None
        self._retry: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        #: The loop's state (:class:`LinkState`); :attr:`history` keeps the last transitions (for tests and logs).
        self.state = LinkState.IDLE
        self.history: list[LinkState] = [LinkState.IDLE]
        self._up_waiters: list[Deferred[ConnectorTunnel]] = []
        self.connections = 0
        #: Every tunnel connection not lost yet: the current one and those the proxy drains.
        self.tunnels: set[ConnectorTunnel] = set()
        self.metrics = metrics if metrics is not None else ConnectorMetrics(lambda: list(self.tunnels))

    # ------------------------------------------------------------------ service

    @property
    def _stopping(self) -> bool:
        return self.state in (LinkState.DRAINING, LinkState.STOPPED)

    @property
    def draining(self) -> bool:
        """Whether the loop is stopping (or stopped): no new tunnels, readiness false."""
        return self._stopping

    def _enter(self, state: LinkState) -> None:
        """Move to ``state``; a transition outside :data:`TRANSITIONS` is a bug, logged (the move still happens,
        so that the connector keeps working)."""
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            self.log.error("connector loop: unexpected transition {old} -> {new}", old=self.state.value,
                           new=state.value)
        self.state = state
        self.history.append(state)
        del self.history[:-32]

    def startService(self) -> None:
        """Dial now."""
        super().startService()
        self._dial()

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)`` for ``/ready``: ready while a tunnel to the proxy is established."""
        if self.draining:
            return False, "draining"
        tunnel = self.tunnel
        if tunnel is None or tunnel.lost or tunnel.established_at is None:
            return False, "no tunnel to the proxy"
        return True, ""

    def stopService(self) -> Deferred[Any]:
        """Drain: stop dialing, GOAWAY ``SHUTTING_DOWN`` on every tunnel (the proxy opens no new streams on it),
        let streams finish for ``shutdown.drainTimeoutSeconds``, RESET the rest (their backend sockets are
        aborted), close. Fires once every tunnel closed (at most a few seconds past the deadline)."""
        super().stopService()
        self._enter(LinkState.DRAINING)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        tunnels = [t for t in self.tunnels if not t.lost]
        if not tunnels:
            self._close_idle_backends()
            self._enter(LinkState.STOPPED)
            return succeed(None)
        grace = float(self.config.shutdown.drain_timeout_seconds)
        self.log.info(
            "draining: {streams} streams may finish within {grace}s",
            streams=sum(len(t.streams) for t in tunnels), grace=grace,
        )
        for tunnel in tunnels:
            if tunnel.session.ready:
                tunnel.drain(ErrorCode.SHUTTING_DOWN, "connector shutting down", grace=grace)
            else:
                tunnel.close_transport()
        done: Deferred[Any] = DeferredList([t.closed for t in tunnels], consumeErrors=True)
        done.addTimeout(grace + 5.0, self.clock)
        done.addErrback(lambda _f: self.log.warn("drain: a tunnel still open after the deadline; stopping anyway"))

        def close_backends(result: object) -> object:
            self._close_idle_backends()
            self._enter(LinkState.STOPPED)
            return result

        done.addBoth(close_backends)
        return done

    def _close_idle_backends(self) -> None:
        """Close the idle keep-alive backend connections of the HTTP gateway (they serve no stream), if the
        dialer is this loop's own (a shared one is closed by its owner once every loop drained)."""
        if self._owns_dialer:
            self.dialer.http.pool.close()

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
        if not self.running:  # stopped (or draining: stopService cleared running)
            return
        self._enter(LinkState.CONNECTING)
        if self.connections:
            self.metrics.reconnects.inc()
        self.connections += 1
        config = self.config
        self.log.info(
            "connecting to proxy {host}:{port}{replica} (attempt {attempt})", host=config.proxy.host,
            port=config.proxy.port, attempt=self.attempt + 1,
            replica=f" replica {self.route.name}" if self.route is not None else "",
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
            if not self._stopping:
                self._enter(LinkState.HANDSHAKING)

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
        self._enter(LinkState.BACKOFF)
        self._retry = self.clock.callLater(delay, self._dial)
        if self.manager is not None:
            self.manager.dial_failed(self)

    # ------------------------------------------------------------------ tunnel callbacks

    def tunnel_up(self, tunnel: ConnectorTunnel, hello: dict[str, Any]) -> None:
        """The handshake completed: the dial succeeded, so the failed-dial count starts over.

        With several replicas the manager may refuse the tunnel (it landed on another replica than this loop's, or
        on one that already has a tunnel): it is closed and counts as a failed dial.
        """
        if self.manager is not None:
            refusal = self.manager.tunnel_established(self, tunnel, hello)
            if refusal is not None:
                tunnel.refusal = refusal
                tunnel.established_at = None
                self.log.warn("closing the tunnel: {why}", why=refusal)
                tunnel.fail(ErrorCode.NORMAL, refusal)
                return
        self.tunnel = tunnel
        self.attempt = 0
        if not self._stopping:
            self._enter(LinkState.UP)
        self.metrics.tunnel_up(tunnel.replica_id)
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
                # At once, but spread: every connector of a draining replica hears this GOAWAY at the same time.
                self._enter(LinkState.BACKOFF)
                self._retry = self.clock.callLater(
                    self.rng() * self.config.reconnect.initial_delay_seconds, self._dial
                )

    def tunnel_down(self, tunnel: ConnectorTunnel, reason: Failure | None) -> None:
        """The tunnel closed: redial at once (small jitter); keep backing off only for tunnels that die young.

        A tunnel that was established counts as a successful dial: the next attempt is the first retry again,
        unless tunnels keep dying within :attr:`stable_after` (then each one counts as a failed attempt).
        """
        if tunnel.established_at is not None:
            if self.clock.seconds() - tunnel.established_at >= self.stable_after:
                self.short_lived = 0
            else:
                self.short_lived += 1
            self.attempt = max(0, self.short_lived - 1)  # the first young death is still a first retry
        why = tunnel.refusal or (reason.getErrorMessage() if reason is not None else "closed")
        if tunnel is self.tunnel:
            self.tunnel = None
            self.log.warn("tunnel to the proxy lost: {why}", why=why)
            self._schedule_retry(why)
        elif tunnel.established_at is None and self._retry is None and self._connecting is None:
            self.log.warn("tunnel handshake failed: {why}", why=why)
            self._schedule_retry(why)


def connector_endpoint_factory(reactor: Any, config: ConnectorConfig) -> Callable[[], IStreamClientEndpoint]:
    """A factory of fresh TLS endpoints to the proxy (files read once; the name resolved on every connect)."""
    cert, key, ca = resolve_tls_files(config.tls, proxy=False, subaccount=config.subaccount_id)
    options = tls.client_options_from_files(config.proxy.verify_name, ca, cert, key)

    def make() -> IStreamClientEndpoint:
        return wrapClientTLS(
            options,
            HostnameEndpoint(reactor, config.proxy.host, config.proxy.port,
                             timeout=config.tunnel.open_timeout_seconds),
        )

    return make


def make_connector_service(config: ConnectorConfig, reactor: Any,
                           audit_writer: audit.AuditWriter | None = None) -> Any:
    """The connector service for ``config``: one tunnel (:class:`ConnectorService`), or with
    ``proxy.highAvailabilityMode`` ``path``/``subdomain`` one per replica
    (:class:`connproxy.connector.replicas.ReplicaConnector`)."""
    from connproxy.connector.replicas import ReplicaConnector, endpoint_builder

    build = endpoint_builder(reactor, config)
    if config.proxy.high_availability_mode == "off":
        return ConnectorService(reactor, config, lambda: build(None), audit_writer=audit_writer)
    return ReplicaConnector(reactor, config, build, audit_writer=audit_writer)
