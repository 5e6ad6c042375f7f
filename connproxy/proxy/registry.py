# -*- test-case-name: tests.unit.test_registry -*-
"""The registry of live connector tunnels, keyed by (tenant, location ID).

Several connectors may serve one key: new streams go to the least loaded one that is neither draining nor dead.
A connector that reconnects (same connector ID, same key) replaces its stale registration at once, and the old
tunnel is told GOAWAY ``REPLACED``.

Two bounds (``servers.businessDataTunnel``, ``docs/reliability.md``):

* ``maxTunnelsPerIdentity``: tunnels registered at once under one *certificate identity*, i.e. (subaccount,
  the location the certificate binds, or "any location" for a certificate that binds none). The connector id is
  not part of it: it comes from the HELLO, so a certificate holder could pick a new one per tunnel. A reconnect
  that replaces the registration of the same connector id under the same key is not counted twice.
* ``maxStreamsPerTenant``: :meth:`ConnectorRegistry.tenant_streams` counts the streams of every live tunnel of a
  tenant, including replaced ones still draining; the router refuses opens beyond the limit.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol as TypingProtocol

from twisted.logger import Logger


class Registrable(TypingProtocol):
    """What the registry needs of a tunnel."""

    tenant: str
    location: str
    connector_id: str

    @property
    def load(self) -> int:
        """Open streams (the routing weight)."""

    @property
    def routable(self) -> bool:
        """False while draining, dead or not yet ready."""

    def replaced(self) -> None:
        """A newer tunnel of the same connector took over: drain and close."""


Key = tuple[str, str]


class TunnelLimitError(Exception):
    """A certificate identity already holds ``limit`` tunnels (``maxTunnelsPerIdentity``)."""

    def __init__(self, identity: Hashable, held: int, limit: int) -> None:
        super().__init__(
            f"too many tunnels for this certificate identity: {held} registered, "
            f"servers.businessDataTunnel.maxTunnelsPerIdentity={limit}"
        )
        self.identity = identity
        self.held = held
        self.limit = limit


class ConnectorRegistry:
    """Live tunnels by (tenant, location). All methods run in the reactor thread.

    :param max_tunnels_per_identity: tunnels one certificate identity may hold registered at once (``None``: no
        limit); see the module docstring.
    """

    log = Logger()

    def __init__(self, max_tunnels_per_identity: int | None = None) -> None:
        self.max_tunnels_per_identity = max_tunnels_per_identity
        self._by_key: dict[Key, list[Registrable]] = {}
        #: Registered tunnels by certificate identity (only those registered with one).
        self._by_identity: dict[Hashable, list[Registrable]] = {}
        self._identity_of: dict[int, Hashable] = {}
        #: Every tunnel registered and not yet unregistered, by tenant (replaced ones too, until they close).
        self._live_by_tenant: dict[str, list[Registrable]] = {}

    def register(self, tunnel: Registrable, identity: Hashable | None = None) -> None:
        """Add ``tunnel``; an older tunnel of the same connector under the same key is replaced.

        :param identity: the certificate identity ``tunnel`` counts against (``None``: not counted).
        :raises TunnelLimitError: ``identity`` already holds ``max_tunnels_per_identity`` other tunnels (not
            counting one this tunnel replaces); nothing is changed then.
        """
        key = (tunnel.tenant, tunnel.location)
        stale = [t for t in self._by_key.get(key, ()) if t.connector_id == tunnel.connector_id and t is not tunnel]
        limit = self.max_tunnels_per_identity
        if identity is not None and limit is not None:
            held = [t for t in self._by_identity.get(identity, ()) if t is not tunnel and t not in stale]
            if len(held) >= limit:
                raise TunnelLimitError(identity, len(held), limit)
        entries = self._by_key.setdefault(key, [])
        for old in stale:
            entries.remove(old)
            self._forget_identity(old)
            self.log.info(
                "connector {connector_id} reconnected for subaccount {tenant} location {location}: "
                "replacing its previous tunnel",
                connector_id=tunnel.connector_id, tenant=tunnel.tenant, location=tunnel.location,
            )
            old.replaced()
        if tunnel not in entries:
            entries.append(tunnel)
        if identity is not None and id(tunnel) not in self._identity_of:
            self._identity_of[id(tunnel)] = identity
            self._by_identity.setdefault(identity, []).append(tunnel)
        live = self._live_by_tenant.setdefault(tunnel.tenant, [])
        if tunnel not in live:
            live.append(tunnel)

    def unregister(self, tunnel: Registrable) -> None:
        """Remove ``tunnel`` if it is registered (it may have been replaced already): call when it closed."""
        key = (tunnel.tenant, tunnel.location)
        entries = self._by_key.get(key)
        if entries and tunnel in entries:
            entries.remove(tunnel)
            if not entries:
                del self._by_key[key]
        self._forget_identity(tunnel)
        live = self._live_by_tenant.get(tunnel.tenant)
        if live and tunnel in live:
            live.remove(tunnel)
            if not live:
                del self._live_by_tenant[tunnel.tenant]

    def _forget_identity(self, tunnel: Registrable) -> None:
        identity = self._identity_of.pop(id(tunnel), None)
        if identity is None:
            return
        holders = self._by_identity.get(identity)
        if holders and tunnel in holders:
            holders.remove(tunnel)
            if not holders:
                del self._by_identity[identity]

    def identity_count(self, identity: Hashable) -> int:
        """How many registered tunnels count against ``identity``."""
        return len(self._by_identity.get(identity, ()))

    def tenant_streams(self, tenant: str) -> int:
        """Open streams over every live tunnel of ``tenant`` (replaced tunnels still draining included)."""
        return sum(t.load for t in self._live_by_tenant.get(tenant, ()))

    def pick(self, tenant: str, location: str) -> Registrable | None:
        """The least loaded routable tunnel for the key, or ``None``."""
        best: Registrable | None = None
        for tunnel in self._by_key.get((tenant, location), ()):
            if tunnel.routable and (best is None or tunnel.load < best.load):
                best = tunnel
        return best

    def tunnels(self) -> list[Registrable]:
        """Every registered tunnel."""
        return [t for entries in self._by_key.values() for t in entries]

    def count(self) -> int:
        """How many tunnels are registered."""
        return sum(len(v) for v in self._by_key.values())
