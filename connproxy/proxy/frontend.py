# -*- test-case-name: tests.unit.test_frontend -*-
"""What every application-facing front end (SOCKS5, HTTP) shares: its factory's collaborators and settings, and
the connection limits checked at accept (``servers.proxy.clientConnection.maxConnections`` and
``maxConnectionsPerClient``)."""

from __future__ import annotations

from typing import Any, Required, TypedDict
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from connproxy.obs import audit
from connproxy.proxy.routing import Router

#: Refused connections are logged at most once per this many seconds (the count in between is in the line).
REFUSAL_LOG_INTERVAL = 10.0


class Authorizing(TypingProtocol):
    """What the front ends need of :class:`connproxy.proxy.auth.Authorizer`."""

    def authorize(self, *, proxy_token: str | None, service_token: str | None = None) -> Deferred[Any]:
        """Fire with a caller (``.tenant``, ``.client_id``) or fail with an ``AuthError``."""


def client_key(addr: IAddress | None) -> str:
    """The client a connection counts for in ``maxConnectionsPerClient``: its IP address (``""`` unknown)."""
    return str(getattr(addr, "host", "") or "")


class ConnectionCounts:
    """Connections open at once, in total and by client address, against two limits: the bookkeeping that the
    front ends (:class:`FrontEndFactory`) and the tunnel port (``TunnelAdmission``) share. Mixed into their
    factories, which call :meth:`init_counts` from ``__init__``."""

    max_connections: int
    max_connections_per_client: int
    #: Connections open now, in total and by client address.
    connections: int
    by_client: dict[str, int]

    def init_counts(self, max_connections: int, max_connections_per_client: int) -> None:
        """Set the limits; nothing is open yet."""
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.connections = 0
        self.by_client = {}

    def over_limit(self, key: str) -> tuple[str, int] | None:
        """The limit (key name, value) one more connection from ``key`` would exceed, or ``None``."""
        if self.connections >= self.max_connections:
            return "max_connections", self.max_connections
        if self.by_client.get(key, 0) >= self.max_connections_per_client:
            return "max_connections_per_client", self.max_connections_per_client
        return None

    def count_in(self, key: str) -> None:
        """A connection from ``key`` was admitted."""
        self.connections += 1
        self.by_client[key] = self.by_client.get(key, 0) + 1

    def count_out(self, key: str) -> None:
        """A connection from ``key`` ended (call once per :meth:`count_in`)."""
        self.connections -= 1
        left = self.by_client.get(key, 0) - 1
        if left > 0:
            self.by_client[key] = left
        else:
            self.by_client.pop(key, None)


class FrontEndOptions(TypedDict, total=False):
    """The keyword arguments every front end's factory takes, passed through by the subclasses
    (``**common: Unpack[FrontEndOptions]``); :class:`FrontEndFactory` describes each."""

    authorization_enabled: Required[bool]
    idle_timeout: float
    max_connections: int
    max_connections_per_client: int
    metrics: Any
    audit_writer: audit.AuditWriter | None


class FrontEndFactory(Factory, ConnectionCounts):
    """Base of the front ends' factories: counts their connections and refuses those over the limits at accept,
    before any work is done for them.

    Subclasses implement :meth:`build` (a connection within the limits) and may override :meth:`refusal` (what
    a connection over them gets: by default nothing, the socket is closed at once). The protocols built call
    :meth:`release` from ``connectionLost``.

    :param router: hands out tunnel endpoints for (tenant, location, target).
    :param authorizer: decides who calls, for which tenant.
    :param clock: the injected reactor time for every timer of the front end's connections.
    :param authorization_enabled: whether this front end requires a token (``enableProxyAuthorization``).
    :param idle_timeout: seconds a connection may stay without traffic either way before it is closed.
    :param max_connections: connections to this front end at once; further ones are refused.
    :param max_connections_per_client: connections from one client IP address to this front end at once.
    :param metrics: :class:`~connproxy.proxy.metrics.ProxyMetrics` (refusals are counted there), or None.
    :param audit_writer: where refused calls are audited (``None``: stdout).
    """

    log = Logger()
    #: The front end's name in logs and metrics.
    front_end = "front end"

    def __init__(
        self,
        router: Router,
        authorizer: Authorizing,
        clock: IReactorTime,
        *,
        authorization_enabled: bool,
        idle_timeout: float = 3600.0,
        max_connections: int = 10_000,
        max_connections_per_client: int = 1_000,
        metrics: Any = None,
        audit_writer: audit.AuditWriter | None = None,
    ) -> None:
        self.router = router
        self.authorizer = authorizer
        self.clock = clock
        self.authorization_enabled = authorization_enabled
        self.idle_timeout = idle_timeout
        self.init_counts(max_connections, max_connections_per_client)
        self.metrics = metrics
        self.audit_writer = audit_writer
        self._unlogged_refusals = 0
        self._refusal_logged_at: float | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:  # type: ignore[override]
        """A new connection: :meth:`build` within the limits, else :meth:`refusal` (logged, counted)."""
        key = client_key(addr)
        limit = self.over_limit(key)
        if limit is not None:
            self._refused(key, *limit)
            return self.refusal(addr)
        protocol = self.build(addr)
        self.count_in(key)
        protocol._front_end_slot = key  # type: ignore[attr-defined]
        return protocol

    def build(self, addr: IAddress | None) -> Protocol:
        """Hook: the protocol of a connection within the limits."""
        raise NotImplementedError

    def refusal(self, addr: IAddress | None) -> Protocol | None:
        """Hook: the protocol of a connection over the limits (``None``: the socket is closed at once)."""
        return None

    def release(self, protocol: Protocol) -> None:
        """``protocol``'s connection ended: free its place in the limits (a second call does nothing)."""
        key = getattr(protocol, "_front_end_slot", None)
        if key is None:
            return
        protocol._front_end_slot = None  # type: ignore[attr-defined]
        self.count_out(key)

    def _refused(self, client: str, limit: str, value: int) -> None:
        counter = getattr(self.metrics, "client_connections_refused", None)
        if counter is not None:
            counter.labels(front_end=self.front_end, limit=limit).inc()
        self._unlogged_refusals += 1
        now = self.clock.seconds()
        if self._refusal_logged_at is not None and now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return
        self.log.warn(
            "{front_end} front end at its connection limit ({limit}={value}): refused {count} connection(s) "
            "since the last report, the latest from {client}", front_end=self.front_end, limit=limit, value=value,
            count=self._unlogged_refusals, client=client or "(unknown)",
        )
        self._unlogged_refusals = 0
        self._refusal_logged_at = now
