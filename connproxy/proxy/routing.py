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
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.tunnel.errors import NoConnectorError, OpenTimeoutError, StreamRefusedError, TunnelLostError
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import OpenRequest


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects to ``request``'s target through a connector registered for (tenant, location).

    The tunnel is picked when ``connect`` is called, not when the endpoint is made.
    """

    def __init__(
        self,
        registry: ConnectorRegistry,
        tenant: str,
        location: str,
        request: OpenRequest,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.tenant = tenant
        self.location = location
        self.request = request
        self.metrics = metrics

    #: How many other tunnels an open refused with REFUSED_STREAM (not processed) is retried on.
    max_retries = 2

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open a stream; see the module docstring for the failures.

        A stream the connector did not process (RESET ``REFUSED_STREAM``: draining, too many streams, or past a
        GOAWAY's last stream ID) is retried at once on another routable tunnel of the same (tenant, location), at
        most :attr:`max_retries` times; the protocol factory is only used once a stream is accepted.
        """
        return self._attempt(protocolFactory, [])

    def _attempt(self, protocolFactory: IProtocolFactory, tried: list[Any]) -> Deferred[IProtocol]:
        tunnel: Any = self.registry.pick(self.tenant, self.location)
        started: float | None = None
        if tunnel is None:
            d: Deferred[IProtocol] = fail(NoConnectorError(self.tenant, self.location))
        else:
            if self.metrics is not None and not tried:  # a retry is part of the first attempt's open
                started = self.metrics.open_started()
            d = tunnel.open_stream(self.request, protocolFactory)
            if len(tried) < self.max_retries:
                d.addErrback(self._retry, protocolFactory, tried + [tunnel])
        if self.metrics is not None and not tried:
            d.addBoth(self._count, tunnel, started)
        return d

    def _retry(self, failure: Failure, protocolFactory: IProtocolFactory, tried: list[Any]) -> Any:
        if not failure.check(StreamRefusedError) or failure.value.code != ErrorCode.REFUSED_STREAM:  # type: ignore[union-attr]
            return failure
        other = self.registry.pick(self.tenant, self.location)
        if other is None or any(other is t for t in tried):
            return failure  # no other tunnel to retry on (the least loaded one is one that just refused)
        return self._attempt(protocolFactory, tried)

    def _count(self, result: Any, tunnel: Any, started: float | None = None) -> Any:
        assert self.metrics is not None
        front_end = str(self.request.meta.get("via", "unknown"))
        if started is not None:
            self.metrics.open_finished(started, front_end)
        if isinstance(result, Failure):
            if result.check(OpenTimeoutError) and tunnel is not None:
                self.metrics.opening_timeouts.labels(tunnel.tunnel_id).inc()
            outcome = _outcome(result)
        else:
            outcome = "ok"
        self.metrics.stream_opens.labels(front_end, outcome).inc()
        return result


def _outcome(failure: Failure) -> str:
    if failure.check(NoConnectorError):
        return "no_connector"
    if failure.check(StreamRefusedError):
        return str(failure.value.code.name).lower()  # type: ignore[union-attr]
    if failure.check(OpenTimeoutError):
        return "timeout"
    if failure.check(TunnelLostError):
        return "tunnel_lost"
    return "error"


class Router:
    """Hands out tunnel endpoints for the front ends."""

    def __init__(self, registry: ConnectorRegistry, metrics: ProxyMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics

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
        return TunnelEndpoint(self.registry, tenant, location, OpenRequest(host, port, kind, meta), self.metrics)
