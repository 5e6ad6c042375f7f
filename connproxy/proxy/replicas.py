# -*- test-case-name: tests.unit.test_replicas -*-
"""Replica identity and the replica set of a proxy run as several replicas (``highAvailabilityMode``).

* A replica's name is ``highAvailability.replicaName``, else ``$POD_NAME``, else the host name; its ordinal is
  the trailing number (``connectivity-proxy-2`` is 2).
* The set is a static list (``highAvailability.replicas``), or the StatefulSet pods that resolve in the headless
  Service's DNS (``highAvailability.headlessService``): ``<statefulset>-<n>.<headless service>`` for the
  ordinals around the number of addresses the service name resolves to, looked up again every
  ``discoveryIntervalSeconds``. This replica is always a member.
* Each member is announced to connectors with how to reach it: the path ``/connectivity-proxy-<n>`` (``path``
  mode) or the SNI host ``connectivity-proxy-<n>.<externalHost>`` (``subdomain`` mode); see
  ``docs/high-availability.md``. Listeners of :class:`ReplicaSet` are told when the set changes (the tunnel
  listener then sends a REPLICAS frame on every tunnel).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from connproxy.config import HighAvailabilityConfig, ProxyConfig

log = Logger(namespace="connproxy.proxy.replicas")

#: The path that reaches any replica in ``path`` mode.
ANY_REPLICA_PATH = "/connectivity"
#: Names of the StatefulSet's pods (and of the per-replica paths and hosts).
REPLICA_PREFIX = "connectivity-proxy"
#: Most ordinals probed per discovery round.
MAX_PROBED_ORDINALS = 64

_ORDINAL = re.compile(r"-(\d{1,6})\Z")


def ordinal_of(name: str) -> int | None:
    """The trailing number of a replica name (``connectivity-proxy-3`` -> 3), or ``None``."""
    m = _ORDINAL.search(name)
    return int(m.group(1)) if m else None


def own_replica_name(config: HighAvailabilityConfig, environ: Mapping[str, str] | None = None,
                     hostname: Callable[[], str] = socket.gethostname) -> str:
    """This replica's name: configured, else ``$POD_NAME``, else the host name (first label)."""
    if config.replica_name:
        return config.replica_name
    env = os.environ if environ is None else environ
    pod = env.get("POD_NAME", "").strip()
    if pod:
        return pod
    return hostname().split(".", 1)[0] or "connectivity-proxy-0"


@dataclass(frozen=True, order=True)
class Replica:
    """One member of the set; sorts by ordinal, then name."""

    sort_key: tuple[int, str]
    name: str
    ordinal: int | None

    @classmethod
    def named(cls, name: str) -> Replica:
        """The replica called ``name``."""
        ordinal = ordinal_of(name)
        return cls((ordinal if ordinal is not None else 1 << 30, name), name, ordinal)

    @property
    def label(self) -> str:
        """The per-replica path segment and host label: ``connectivity-proxy-<n>`` (the name without an ordinal)."""
        return f"{REPLICA_PREFIX}-{self.ordinal}" if self.ordinal is not None else self.name

    def path(self) -> str:
        """The ``path``-mode route: ``/connectivity-proxy-<n>``."""
        return "/" + self.label

    def host(self, external_host: str) -> str:
        """The ``subdomain``-mode route: ``connectivity-proxy-<n>.<externalHost>``."""
        return f"{self.label}.{external_host}"

    def announcement(self, mode: str, external_host: str) -> dict[str, Any]:
        """The entry for connectors: name, ordinal and the route of ``mode``."""
        entry: dict[str, Any] = {"name": self.name, "ordinal": self.ordinal}
        if mode == "path":
            entry["path"] = self.path()
        elif mode == "subdomain":
            entry["host"] = self.host(external_host)
        return entry


class ReplicaSet:
    """The replicas this one knows of (always including itself); listeners hear about every change."""

    def __init__(self, own_name: str, mode: str, external_host: str, names: Iterable[str] = ()) -> None:
        self.me = Replica.named(own_name)
        self.mode = mode
        self.external_host = external_host
        self._members: tuple[Replica, ...] = ()
        self._listeners: list[Callable[[ReplicaSet], None]] = []
        self.update(names)

    @property
    def members(self) -> tuple[Replica, ...]:
        """The members, sorted by ordinal."""
        return self._members

    def names(self) -> list[str]:
        """The members' names, sorted by ordinal."""
        return [r.name for r in self._members]

    def add_listener(self, listener: Callable[[ReplicaSet], None]) -> None:
        """Call ``listener(self)`` after every change."""
        self._listeners.append(listener)

    def update(self, names: Iterable[str]) -> bool:
        """Make the set ``names`` plus this replica; tell the listeners if it changed; return whether it did."""
        members = tuple(sorted({Replica.named(n) for n in names} | {self.me}))
        if members == self._members:
            return False
        before = self.names()
        self._members = members
        if before:
            log.info("replica set changed from {before} to {after}", before=before, after=self.names())
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:
                log.failure("replica set listener failed")
        return True

    def announcement(self) -> list[dict[str, Any]]:
        """What connectors are told (HELLO reply ``replicas``, REPLICAS frames)."""
        return [r.announcement(self.mode, self.external_host) for r in self._members]

    def route_owner(self, path: str) -> Replica | None:
        """The member whose ``path``-mode route is ``path`` (``None`` for no member)."""
        for r in self._members:
            if r.path() == path:
                return r
        return None


Resolve = Callable[[str], Deferred[list[str]]]


def resolver_for(reactor: Any) -> Resolve:
    """Resolve a name to all its addresses with the reactor's name resolver (fails with ``LookupError``)."""
    from twisted.internet.interfaces import IResolutionReceiver
    from zope.interface import implementer

    def resolve(name: str) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        found: list[str] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                found.append(address.host)

            def resolutionComplete(self) -> None:
                if found:
                    d.callback(sorted(set(found)))
                else:
                    d.errback(LookupError(f"{name} does not resolve"))

        reactor.nameResolver.resolveHostName(Receiver(), name)
        return d

    return resolve


class ReplicaDiscovery(Service):
    """Keeps a :class:`ReplicaSet` equal to the StatefulSet pods that resolve under the headless Service.

    Each round resolves the headless service name (its address count ``n`` bounds the probe), then the names
    ``<prefix>-<k>.<headless>`` for ``k`` in ``0 .. n + 2`` (at most :data:`MAX_PROBED_ORDINALS`); those that
    resolve (and this replica) are the set. A round that cannot resolve the service name keeps the set.
    """

    def __init__(self, replica_set: ReplicaSet, headless_service: str, resolve: Resolve, clock: IReactorTime,
                 interval: float) -> None:
        self.replica_set = replica_set
        self.headless_service = headless_service.rstrip(".")
        self.resolve = resolve
        self.clock = clock
        self.interval = interval
        prefix = replica_set.me.name
        m = _ORDINAL.search(prefix)
        self.prefix = prefix[: m.start()] if m else REPLICA_PREFIX
        self._timer: IDelayedCall | None = None
        self._round: Deferred[Any] | None = None
        self.rounds = 0

    def startService(self) -> None:
        """Look up now, then every ``interval`` seconds."""
        super().startService()
        self._tick()

    def stopService(self) -> None:
        """Stop looking up."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._round is not None:
            self._round.cancel()

    def _tick(self) -> None:
        self._timer = None
        if not self.running:
            return
        self._round = self.discover()
        self._round.addBoth(self._again)

    def _again(self, result: object) -> None:
        self._round = None
        if self.running:
            self._timer = self.clock.callLater(self.interval, self._tick)

    def discover(self) -> Deferred[Any]:
        """One round; fires when the set is updated (never fails)."""
        self.rounds += 1
        d = self.resolve(self.headless_service)

        def probe(addresses: list[str]) -> Deferred[Any]:
            count = min(len(addresses) + 3, MAX_PROBED_ORDINALS)
            names = [f"{self.prefix}-{k}" for k in range(count)]
            lookups = [self.resolve(f"{n}.{self.headless_service}") for n in names]
            done: Deferred[Any] = DeferredList(lookups, consumeErrors=True)

            def collect(results: list[tuple[bool, Any]]) -> None:
                self.replica_set.update(n for n, (ok, _v) in zip(names, results, strict=True) if ok)

            return done.addCallback(collect)

        def failed(failure: Failure) -> None:
            log.warn("replica discovery: {service} did not resolve ({error}); keeping {names}",
                     service=self.headless_service, error=failure.getErrorMessage(),
                     names=self.replica_set.names())

        d.addCallbacks(probe, failed)
        return d


def replica_set_for(config: ProxyConfig, reactor: Any) -> tuple[ReplicaSet | None, ReplicaDiscovery | None]:
    """The replica set of ``config`` (``None`` with ``highAvailabilityMode: off``) and, with a headless Service,
    the discovery service that keeps it current (to be started with the proxy)."""
    if config.high_availability_mode == "off":
        return None, None
    ha = config.high_availability
    replica_set = ReplicaSet(own_replica_name(ha), config.high_availability_mode,
                             config.tunnel_listener.external_host, ha.replicas)
    log.info("replica {name} of {names} ({mode} mode)", name=replica_set.me.name, names=replica_set.names(),
             mode=config.high_availability_mode)
    if ha.headless_service is None:
        return replica_set, None
    return replica_set, ReplicaDiscovery(replica_set, ha.headless_service, resolver_for(reactor), reactor,
                                         ha.discovery_interval_seconds)


def read_client_cas(ca_file: str | os.PathLike[str]) -> list[x509.Certificate]:
    """The connector CA certificates (to check certificates an ingress forwards).

    :raises ValueError: the file holds no PEM certificate. :raises OSError: it cannot be read.
    """
    with open(ca_file, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())
