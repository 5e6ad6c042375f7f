# -*- test-case-name: tests.unit.test_connector_replicas -*-
"""One tunnel per proxy replica (``proxy.highAvailabilityMode: path | subdomain``).

The proxy announces its replicas in the HELLO reply (``replicas``: name, ordinal and the route: ``path`` or
``host``) and again in REPLICAS frames when the set changes (``docs/high-availability.md``).
:class:`ReplicaConnector` keeps one :class:`~connproxy.connector.dialer.ConnectorService` loop per announced
replica, each with its own reconnect loop, all reached through ``proxy.host:proxy.port`` (the ingress):

* ``path``: TLS to the ingress, then ``GET /connectivity-proxy-<n>`` with ``Upgrade: connproxy-tunnel/1``
  (``/connectivity`` while no replica is known);
* ``subdomain``: TLS with SNI (and certificate name) ``connectivity-proxy-<n>.<externalHost>``
  (``proxy.host`` while no replica is known).

It starts with one loop to any replica. Its first tunnel reveals the set: that loop becomes the loop of the
replica it landed on, and a loop starts for every other replica. While no replica has a tunnel, a loop to any
replica runs again, so that a set that changed entirely while the connector was cut off is learnt anew. Replicas that join get a loop, replicas that
leave lose theirs (its tunnel drains). A tunnel that lands on another replica than its loop's (HELLO reply
``replica_id``) is closed and dialled again with backoff; a tunnel to a replica that already has one is closed.
Loops are keyed by replica name, so there is never more than one per replica.

All loops share one backend dialer (one access decision, one pool of idle HTTP backend connections) and one
:class:`~connproxy.connector.metrics.ConnectorMetrics`. ``stopService`` (SIGTERM) drains every replica tunnel at
once, including those of replicas that left the set and are still draining, then closes the idle backend
connections. ``/ready`` is true while at least one replica tunnel is established.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.logger import Logger

from connproxy.config import ConnectorConfig
from connproxy.connector.dialer import ConnectorService, ConnectorTunnel
from connproxy.connector.egress import CorporateProxy, PreambleEndpoint, upgrade_request
from connproxy.connector.metrics import ConnectorMetrics
from connproxy.connector.tcp import BackendDialer
from connproxy.obs import audit
from connproxy.pki import tls
from connproxy.pki.state import resolve_tls_files

#: The path of any replica (``path`` mode) before the set is known.
ANY_REPLICA_PATH = "/connectivity"
#: The ``Upgrade`` token of the tunnel protocol.
UPGRADE_TOKEN = b"connproxy-tunnel/1"
#: Most replicas followed (a bound on what one announcement can make us dial).
MAX_REPLICAS = 64

_PATH = re.compile(r"/[A-Za-z0-9._~-]{1,200}\Z")
_HOST = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                   r"[A-Za-z0-9])?)*\Z")

log = Logger(namespace="connproxy.connector.replicas")


@dataclass(frozen=True)
class ReplicaRoute:
    """How to reach one replica: ``path`` (``path`` mode) or ``host`` (``subdomain`` mode)."""

    name: str
    ordinal: int | None = None
    path: str | None = None
    host: str | None = None


def parse_routes(raw: object) -> dict[str, ReplicaRoute]:
    """The valid entries of an announced ``replicas`` list, by name (invalid entries are logged and skipped)."""
    routes: dict[str, ReplicaRoute] = {}
    if not isinstance(raw, list):
        return routes
    for entry in raw[:MAX_REPLICAS]:
        if not isinstance(entry, dict):
            continue
        name, ordinal, path, host = entry.get("name"), entry.get("ordinal"), entry.get("path"), entry.get("host")
        if (
            not isinstance(name, str) or not _HOST.match(name)
            or (path is not None and (not isinstance(path, str) or not _PATH.match(path)))
            or (host is not None and (not isinstance(host, str) or not _HOST.match(host)))
        ):
            log.warn("ignoring a malformed replica announcement {entry!r:.200}", entry=entry)
            continue
        routes[name] = ReplicaRoute(name, ordinal if type(ordinal) is int else None, path, host)
    return routes


def endpoint_builder(reactor: Any, config: ConnectorConfig,
                     environ: dict[str, str] | None = None) -> Callable[[ReplicaRoute | None], IStreamClientEndpoint]:
    """Build fresh endpoints to one replica (``None``: any) as ``proxy.highAvailabilityMode`` says, through the
    corporate proxy where one is configured. Files are read once; the host name is resolved on every connect.

    :raises ValueError: ``HTTPS_PROXY`` is not an ``http://`` URL.
    """
    cert, key, ca = resolve_tls_files(config.tls, proxy=False, subaccount=config.subaccount_id)
    with open(cert, "rb") as f:
        cert_pem = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()
    with open(ca, "rb") as f:
        ca_pem = f.read()
    proxy = config.proxy
    mode = proxy.high_availability_mode
    corporate = CorporateProxy.from_config(config.corporate_proxy, os.environ if environ is None else environ)
    if corporate is not None and corporate.bypass(proxy.host):
        corporate = None
    if corporate is not None:
        log.info("dialling the proxy through the corporate proxy {host}:{port}", host=corporate.host,
                 port=corporate.port)
    timeout = config.tunnel.open_timeout_seconds
    options: dict[str, IOpenSSLClientConnectionCreator] = {}

    def tls_options(name: str) -> IOpenSSLClientConnectionCreator:
        if name not in options:
            alpn = [b"http/1.1"] if mode == "path" else None
            options[name] = tls.client_options(name, ca_pem, cert_pem, key_pem, alpn=alpn)
        return options[name]

    def build(route: ReplicaRoute | None) -> IStreamClientEndpoint:
        if corporate is not None:
            tcp = corporate.endpoint(reactor, proxy.host, proxy.port, timeout)
        else:
            tcp = HostnameEndpoint(reactor, proxy.host, proxy.port, timeout=timeout)
        name = proxy.verify_name
        if mode == "subdomain" and route is not None and route.host:
            name = route.host
        endpoint: IStreamClientEndpoint = wrapClientTLS(tls_options(name), tcp)
        if mode == "path":
            path = route.path if route is not None and route.path else ANY_REPLICA_PATH
            endpoint = PreambleEndpoint(
                endpoint, upgrade_request(proxy.verify_name, proxy.port, path, UPGRADE_TOKEN), 101,
                f"tunnel upgrade at {path}",
            )
        return endpoint

    return build


class ReplicaConnector(MultiService):
    """The connector with one tunnel per proxy replica (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        config: ConnectorConfig,
        endpoint_for: Callable[[ReplicaRoute | None], IStreamClientEndpoint],
        *,
        rng: Callable[[], float] = random.random,
        audit_writer: audit.AuditWriter | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.endpoint_for = endpoint_for
        self.rng = rng
        self.dialer = BackendDialer(reactor, config, audit_writer=audit_writer)
        self.loops: dict[str, ConnectorService] = {}
        self.bootstrap: ConnectorService | None = None
        self._up_waiters: list[Deferred[ConnectorTunnel]] = []
        #: Loops of replicas that left the set, still draining their tunnel: fires when drained.
        self._leaving: dict[ConnectorService, Deferred[None]] = {}
        self.draining = False
        #: One set of metrics over every replica tunnel (the loops count in it).
        self.metrics = ConnectorMetrics(self.all_tunnels)

    # ------------------------------------------------------------------ service

    def startService(self) -> None:
        """Start the loops (at first one loop to any replica)."""
        self.draining = False
        super().startService()
        if not self.loops and self.bootstrap is None:
            self._new_loop(None)

    def stopService(self) -> Deferred[Any]:
        """Drain every replica tunnel (each loop's :meth:`ConnectorService.stopService`: GOAWAY, streams may
        finish for ``shutdown.drainTimeoutSeconds``, the rest are RESET), wait for the loops of replicas that left
        the set to finish draining too, then close the idle backend connections. Fires once all of that is done
        (at most a few seconds past the deadline)."""
        self.draining = True
        log.info("draining the tunnels to {count} replicas", count=len(self.loops) + len(self._leaving))
        stopped = maybeDeferred(super().stopService)
        done: Deferred[Any] = DeferredList([stopped, *self._leaving.values()], consumeErrors=True)

        def close_backends(result: object) -> object:
            self.dialer.http.pool.close()
            return result

        return done.addBoth(close_backends)

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)`` for ``/ready``: ready while a tunnel to at least one replica is established."""
        if self.draining:
            return False, "draining"
        tunnel = self.tunnel
        if tunnel is None or tunnel.lost or tunnel.established_at is None:
            return False, "no tunnel to any proxy replica"
        return True, ""

    def all_tunnels(self) -> list[ConnectorTunnel]:
        """Every tunnel not lost yet, of every loop (also those draining after their replica left)."""
        loops = [*self.loops.values(), *self._leaving]
        if self.bootstrap is not None:
            loops.append(self.bootstrap)
        return [tunnel for loop in loops for tunnel in list(loop.tunnels)]

    def _new_loop(self, route: ReplicaRoute | None) -> ConnectorService:
        """A new loop, started if we run; with ``route`` ``None`` it is the loop to any replica (:attr:`bootstrap`,
        set before it starts, as its first dial may fail at once)."""
        holder: list[ConnectorService] = []
        loop = ConnectorService(
            self.reactor, self.config, lambda: self.endpoint_for(holder[0].route), rng=self.rng,
            dialer=self.dialer, manager=self, route=route, metrics=self.metrics,
        )
        holder.append(loop)
        if route is None:
            self.bootstrap = loop
        else:
            self.loops[route.name] = loop
        loop.setServiceParent(self)  # started now if we are running
        return loop

    def _drop_loop(self, loop: ConnectorService) -> None:
        """Stop ``loop`` (its tunnel drains); until it has drained, :meth:`stopService` waits for it too."""
        if loop.parent is not self:
            return
        drained: Deferred[None] = Deferred()
        self._leaving[loop] = drained

        def finished(result: object) -> None:
            self._leaving.pop(loop, None)
            if not drained.called:
                drained.callback(None)

        d = maybeDeferred(loop.disownServiceParent)
        d.addErrback(lambda f: log.failure("stopping a replica loop failed", f))
        d.addBoth(finished)

    # ------------------------------------------------------------------ views

    def established(self) -> dict[str, ConnectorTunnel]:
        """The live, established tunnels by replica name."""
        return {
            name: loop.tunnel for name, loop in self.loops.items()
            if loop.tunnel is not None and loop.tunnel.established_at is not None and not loop.tunnel.lost
        }

    @property
    def tunnel(self) -> ConnectorTunnel | None:
        """One established tunnel, if any (the single-tunnel view of tests and the demo)."""
        for tunnel in self.established().values():
            return tunnel
        boot = self.bootstrap
        return boot.tunnel if boot is not None else None

    def when_up(self) -> Deferred[ConnectorTunnel]:
        """Fire with a tunnel once one is established (at once if one is)."""
        tunnel = self.tunnel
        if tunnel is not None and tunnel.established_at is not None and not tunnel.lost:
            return succeed(tunnel)
        d: Deferred[ConnectorTunnel] = Deferred()
        self._up_waiters.append(d)
        return d

    # ------------------------------------------------------------------ called by the loops

    def tunnel_established(self, loop: ConnectorService, tunnel: ConnectorTunnel, hello: dict[str, Any]) -> str | None:
        """A loop's tunnel completed its handshake: keep it (``None``) or say why it must close."""
        landed = hello.get("replica_id")
        routes = parse_routes(hello.get("replicas"))
        refusal: str | None = None
        if loop is self.bootstrap:
            if not routes or not isinstance(landed, str):
                log.warn("the proxy announces no replica set (is its highAvailabilityMode off?): one tunnel only")
                self._fire_up(tunnel)
                return None
            self.bootstrap = None
            holder = self.loops.get(landed)
            if holder is not None and holder.tunnel is not None and not holder.tunnel.lost:
                refusal = f"replica {landed} already has a tunnel"
                self.reactor.callLater(0, self._drop_loop, loop)
            else:
                if holder is not None:
                    self._drop_loop(holder)
                loop.route = routes.get(landed, ReplicaRoute(landed))
                self.loops[landed] = loop
        elif loop.route is not None and landed != loop.route.name:
            refusal = f"landed on replica {landed!r:.80} instead of {loop.route.name}"
        self._follow(routes)
        if refusal is None:
            log.info("tunnel to replica {name} up ({count} of {total} replicas)", name=landed,
                     count=len(self.established()), total=len(self.loops))
            self._fire_up(tunnel)
        return refusal

    def dial_failed(self, loop: ConnectorService) -> None:
        """A loop will retry. When no replica has a tunnel, also dial *any* replica again: the set may have changed
        entirely while we were cut off (renamed, scaled), and any replica's HELLO reply brings it up to date."""
        if self.running and self.bootstrap is None and self.loops and not self.established():
            log.info("no tunnel to any known replica: also dialling any replica to learn the current set")
            self._new_loop(None)

    def replicas_announced(self, loop: ConnectorService, raw: list[Any]) -> None:
        """A REPLICAS frame arrived on ``loop``'s tunnel."""
        routes = parse_routes(raw)
        if routes:
            self._follow(routes)

    def _follow(self, routes: dict[str, ReplicaRoute]) -> None:
        """Keep one loop per announced replica: start the new, drain the gone, update routes."""
        if not routes:
            return
        for name, route in routes.items():
            loop = self.loops.get(name)
            if loop is None:
                log.info("replica {name} announced: dialling it", name=name)
                self._new_loop(route)
            else:
                loop.route = route
        for name in [n for n in self.loops if n not in routes]:
            log.info("replica {name} left the set: closing its tunnel", name=name)
            self._drop_loop(self.loops.pop(name))

    def _fire_up(self, tunnel: ConnectorTunnel) -> None:
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            d.callback(tunnel)
