# -*- test-case-name: tests.unit.test_registry -*-
"""The registry of live connector tunnels, keyed by (tenant, location ID).

Several connectors may serve one key: new streams go to the least loaded one that is neither draining nor dead.
A connector that reconnects (same connector ID, same key) replaces its stale registration at once, and the old
tunnel is told GOAWAY ``REPLACED``.
"""

from __future__ import annotations

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


class ConnectorRegistry:
    """Live tunnels by (tenant, location). All methods run in the reactor thread."""

    log = Logger()

    def __init__(self) -> None:
        self._by_key: dict[Key, list[Registrable]] = {}

    def register(self, tunnel: Registrable) -> None:
        """Add ``tunnel``; an older tunnel of the same connector under the same key is replaced."""
        key = (tunnel.tenant, tunnel.location)
        entries = self._by_key.setdefault(key, [])
        for old in [t for t in entries if t.connector_id == tunnel.connector_id and t is not tunnel]:
            entries.remove(old)
            self.log.info(
                "connector {connector_id} reconnected for subaccount {tenant} location {location}: "
                "replacing its previous tunnel",
                connector_id=tunnel.connector_id, tenant=tunnel.tenant, location=tunnel.location,
            )
            old.replaced()
        if tunnel not in entries:
            entries.append(tunnel)

    def unregister(self, tunnel: Registrable) -> None:
        """Remove ``tunnel`` if it is registered (it may have been replaced already)."""
        key = (tunnel.tenant, tunnel.location)
        entries = self._by_key.get(key)
        if entries and tunnel in entries:
            entries.remove(tunnel)
            if not entries:
                del self._by_key[key]

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
