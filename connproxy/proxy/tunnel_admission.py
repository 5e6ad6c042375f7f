# -*- test-case-name: tests.unit.test_tunnel_admission,tests.integration.test_tunnel_handshakes -*-
"""Admission on the tunnel port: connection limits at accept and a bound on unfinished TLS handshakes.

:class:`TunnelAdmission` wraps the tunnel listener's factory *inside* TLS (port -> TLS -> admission -> tunnel),
so it sees each connection from accept and is told by TLS (``IHandshakeListener``) when the handshake completed:

* ``servers.businessDataTunnel.maxConnections`` / ``maxConnectionsPerClient`` (per source address): a connection
  over either limit is aborted at once, before the tunnel protocol sees it;
* ``maxPendingHandshakes``: connections whose TLS handshake has not completed; at the limit the *oldest* of them
  is aborted to make room (a slow flood cannot lock real connectors out, it only cycles its own connections);
* ``handshakeTimeoutSeconds``: a TLS handshake not completed this long after accept is aborted (the socket is
  closed at once: a peer that never sends a byte holds no file descriptor after that).

After TLS, the tunnel's own handshake timer (``tunnel.openTimeoutSeconds``) bounds the wait for HELLO, and a
health-check request gets 408 when it does not arrive in that time (:mod:`connproxy.proxy.tunnel_listener`).
Refusals and aborts are counted (``connproxy_client_connections_refused_total{front_end="tunnel"}``,
``connproxy_tunnel_handshakes_aborted_total{reason}``) and logged at most once per
:data:`~connproxy.proxy.frontend.REFUSAL_LOG_INTERVAL` seconds per kind, with the count in between.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.proxy.frontend import REFUSAL_LOG_INTERVAL, ConnectionCounts, client_key


class _Refused(Protocol):
    """The protocol of a connection over the limits: aborts its transport as soon as it has one."""

    def makeConnection(self, transport: Any) -> None:
        """Abort at once (TLS then sends nothing and frees the socket)."""
        self.transport = transport
        transport.abortConnection()


@implementer(IHandshakeListener)
class AdmittedConnection(ProtocolWrapper):
    """One admitted connection: counted until it is lost, pending until TLS reports the handshake done."""

    factory: TunnelAdmission

    def __init__(self, factory: TunnelAdmission, wrappedProtocol: Any, key: str) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]
        self.key = key
        self.released = False

    def makeConnection(self, transport: Any) -> None:
        """Start the handshake clock, then connect the wrapped protocol."""
        self.factory.handshake_started(self)
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        """TLS is up: no longer pending; tell the wrapped protocol if it listens too."""
        self.factory.handshake_finished(self)
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Free the connection's places, then pass the loss on (once)."""
        if self.released:
            return
        self.factory.release(self)
        super().connectionLost(reason)


class TunnelAdmission(WrappingFactory, ConnectionCounts):  # type: ignore[type-arg]
    """Wraps the tunnel factory with the limits of the module docstring.

    :param wrapped: the tunnel listener's factory (:class:`~connproxy.proxy.tunnel_listener.ProxyTunnelFactory`).
    :param clock: the injected reactor time for the handshake timers.
    :param metrics: :class:`~connproxy.proxy.metrics.ProxyMetrics` or ``None``.
    """

    protocol = AdmittedConnection  # type: ignore[assignment]
    log = Logger()
    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        *,
        max_connections: int = 10_000,
        max_connections_per_client: int = 1_000,
        max_pending_handshakes: int = 1_000,
        handshake_timeout: float = 10.0,
        metrics: Any = None,
    ) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.init_counts(max_connections, max_connections_per_client)
        self.max_pending_handshakes = max_pending_handshakes
        self.handshake_timeout = handshake_timeout
        self.metrics = metrics
        #: Connections in their TLS handshake, oldest first, with their timers.
        self.pending: OrderedDict[AdmittedConnection, IDelayedCall] = OrderedDict()
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # type: ignore[override]
        """An admitted, counted connection; or one that aborts itself (over ``maxConnections[PerClient]``)."""
        key = client_key(addr)
        limit = self.over_limit(key)
        if limit is not None:
            self._note(limit[0], key, limit[1])
            return _Refused()
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return _Refused()
        self.count_in(key)
        return self.protocol(self, wrapped, key)

    def handshake_started(self, conn: AdmittedConnection) -> None:
        """``conn`` was accepted: time its TLS handshake; at the pending limit, abort the oldest pending one."""
        while len(self.pending) >= self.max_pending_handshakes:
            oldest, timer = self.pending.popitem(last=False)
            timer.cancel()
            self._note("max_pending_handshakes", oldest.key, self.max_pending_handshakes)
            self._abort(oldest)
        self.pending[conn] = self.clock.callLater(self.handshake_timeout, self._timed_out, conn)

    def handshake_finished(self, conn: AdmittedConnection) -> None:
        """TLS completed on ``conn``: it no longer counts as pending."""
        timer = self.pending.pop(conn, None)
        if timer is not None and timer.active():
            timer.cancel()

    def release(self, conn: AdmittedConnection) -> None:
        """``conn`` is gone: free its places (a second call does nothing)."""
        self.handshake_finished(conn)
        if conn.released:
            return
        conn.released = True
        self.count_out(conn.key)

    def _timed_out(self, conn: AdmittedConnection) -> None:
        if self.pending.pop(conn, None) is None:
            return
        self._note("handshake_timeout", conn.key, self.handshake_timeout)
        self._abort(conn)

    @staticmethod
    def _abort(conn: AdmittedConnection) -> None:
        transport: Any = conn.transport
        if transport is not None:
            transport.abortConnection()

    def _note(self, reason: str, client: str, value: float) -> None:
        """Count a refusal or abort and log it, at most once per interval per ``reason``."""
        if self.metrics is not None:
            if reason in ("max_connections", "max_connections_per_client"):
                self.metrics.client_connections_refused.labels(front_end="tunnel", limit=reason).inc()
            else:
                self.metrics.tunnel_handshakes_aborted.labels(reason=reason).inc()
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = self.clock.seconds()
        last = self._logged_at.get(reason)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return
        self.log.warn(
            "tunnel port: {count} connection(s) refused or aborted ({reason}={value:g}) since the last report, the "
            "latest from {client}", count=self._unlogged[reason], reason=reason, value=value,
            client=client or "(unknown)",
        )
        self._unlogged[reason] = 0
        self._logged_at[reason] = now
