# -*- test-case-name: tests.unit.test_routing -*-
"""Routing: from (tenant, location, target) to an ``IStreamClientEndpoint`` that opens a tunnel stream.

The front ends (SOCKS5, HTTP) only ever see an endpoint: ``router.endpoint(...).connect(factory)`` fires with
the protocol connected to a stream through the least loaded connector for the key, or fails with
:class:`~connproxy.tunnel.errors.NoConnectorError` (no connector), ``StreamRefusedError`` (the connector said
no), ``OpenTimeoutError`` or ``TunnelLostError``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

from connproxy.tunnel.errors import NoConnectorError
from connproxy.tunnel.registry import ConnectorRegistry
from connproxy.wire.events import OpenRequest


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects to ``request``'s target through a connector registered for (tenant, location).

    The tunnel is picked when ``connect`` is called, not when the endpoint is made.
    """

    def __init__(self, registry: ConnectorRegistry, tenant: str, location: str, request: OpenRequest) -> None:
        self.registry = registry
        self.tenant = tenant
        self.location = location
        self.request = request

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open a stream; see the module docstring for the failures."""
        tunnel: Any = self.registry.pick(self.tenant, self.location)
        if tunnel is None:
            return fail(NoConnectorError(self.tenant, self.location))
        d: Deferred[IProtocol] = tunnel.open_stream(self.request, protocolFactory)
        return d


class Router:
    """Hands out tunnel endpoints for the front ends."""

    def __init__(self, registry: ConnectorRegistry) -> None:
        self.registry = registry

    def endpoint(
        self,
        *,
        tenant: str,
        location: str,
        host: str,
        port: int,
        kind: str = "tcp",
        meta: dict[str, Any] | None = None,
    ) -> TunnelEndpoint:
        """An endpoint for ``host:port`` (the virtual target) through the connector of (tenant, location)."""
        meta = dict(meta or {})
        meta.setdefault("tenant", tenant)
        meta.setdefault("location", location)
        return TunnelEndpoint(self.registry, tenant, location, OpenRequest(host, port, kind, meta))
