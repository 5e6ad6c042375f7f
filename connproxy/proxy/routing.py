# -*- test-case-name: tests.unit.test_routing -*-
"""Routing: from (tenant, location, target) to an ``IStreamClientEndpoint`` that opens a tunnel stream.

The front ends (SOCKS5, HTTP) only ever see an endpoint: ``router.endpoint(...).connect(factory)`` fires with
the protocol connected to a stream through the least loaded connector for the key, or fails with
:class:`~connproxy.tunnel.errors.NoConnectorError` (no connector), ``TenantStreamLimitError`` (the tenant has
``servers.businessDataTunnel.maxStreamsPerTenant`` streams open over all its tunnels already; counted in
``connproxy_stream_refusals_total{reason="max_streams_per_tenant"}``), ``StreamRefusedError`` (the connector said
no), ``OpenTimeoutError`` or ``TunnelLostError``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.tunnel.errors import (
    NoConnectorError,
    OpenTimeoutError,
    StreamRefusedError,
    TenantStreamLimitError,
    TunnelLostError,
)
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
        limits: StreamLimits | None = None,
    ) -> None:
        self.registry = registry
        self.tenant = tenant
        self.location = location
        self.request = request
        self.metrics = metrics
        self.limits = limits

    #: How many other tunnels an open refused with REFUSED_STREAM (not processed) is retried on.
    max_retries = 2

    def connect(self, protocolFactory: IProtocolFactory, early: bytes = b"",
                early_fin: bool = False) -> Deferred[IProtocol]:
        """Open a stream; see the module docstring for the failures.

        ``early`` (and ``early_fin``): the stream's first bytes, sent right behind the OPEN instead of after the
        ACCEPT (one tunnel round trip less; see ``TunnelConnection.open_stream``); the protocol the factory builds
        must not write them again. A retried open sends them again on the other tunnel.

        The tenant's stream limit is checked once, before the first attempt (a refused open fails with
        :class:`TenantStreamLimitError` and no tunnel is asked). A stream the connector did not process (RESET
        ``REFUSED_STREAM``: draining, too many streams, or past a GOAWAY's last stream ID) is retried at once on
        another routable tunnel of the same (tenant, location), at most :attr:`max_retries` times; the protocol
        factory is only used once a stream is accepted.
        """
        refused = self.limits.check(self.tenant) if self.limits is not None else None
        if refused is not None:
            d: Deferred[IProtocol] = fail(refused)
            if self.metrics is not None:
                d.addBoth(self._count, None)
            return d
        return self._attempt(protocolFactory, [], (early, early_fin))

    def _attempt(self, protocolFactory: IProtocolFactory, tried: list[Any],
                 early: tuple[bytes, bool]) -> Deferred[IProtocol]:
        tunnel: Any = self.registry.pick(self.tenant, self.location)
        started: float | None = None
        if tunnel is None:
            d: Deferred[IProtocol] = fail(NoConnectorError(self.tenant, self.location))
        else:
            if self.metrics is not None and not tried:  # a retry is part of the first attempt's open
                started = self.metrics.open_started()
            d = tunnel.open_stream(self.request, protocolFactory, *early)
            if len(tried) < self.max_retries:
                d.addErrback(self._retry, protocolFactory, tried + [tunnel], early)
        if self.metrics is not None and not tried:
            d.addBoth(self._count, tunnel, started)
        return d

    def _retry(self, failure: Failure, protocolFactory: IProtocolFactory, tried: list[Any],
               early: tuple[bytes, bool]) -> Any:
        if not failure.check(StreamRefusedError) or failure.value.code != ErrorCode.REFUSED_STREAM:  # type: ignore[union-attr]
            return failure
        other = self.registry.pick(self.tenant, self.location)
        if other is None or any(other is t for t in tried):
            return failure  # no other tunnel to retry on (the least loaded one is one that just refused)
        return self._attempt(protocolFactory, tried, early)

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
    if failure.check(TenantStreamLimitError):
        return "max_streams_per_tenant"
    if failure.check(StreamRefusedError):
        return str(failure.value.code.name).lower()  # type: ignore[union-attr]
    if failure.check(OpenTimeoutError):
        return "timeout"
    if failure.check(TunnelLostError):
        return "tunnel_lost"
    return "error"


class StreamLimits:
    """``maxStreamsPerTenant``: refuses an open when the tenant's live tunnels carry that many streams already.

    A refusal is counted in ``connproxy_stream_refusals_total{reason="max_streams_per_tenant"}``; a warning is
    logged when a tenant reaches the limit and an info line when it opens streams again (with the count refused
    in between), so a flood of refusals writes two lines, not one per refusal.
    """

    log = Logger()

    def __init__(self, registry: ConnectorRegistry, max_streams_per_tenant: int,
                 metrics: ProxyMetrics | None = None) -> None:
        self.registry = registry
        self.max_streams_per_tenant = max_streams_per_tenant
        self.metrics = metrics
        #: Tenants at their limit now, with the number of opens refused since they reached it.
        self.refusing: dict[str, int] = {}

    def check(self, tenant: str) -> TenantStreamLimitError | None:
        """The refusal for a new stream of ``tenant``, or ``None`` when it is within the limit."""
        open_streams = self.registry.tenant_streams(tenant)
        limit = self.max_streams_per_tenant
        if open_streams < limit:
            refused = self.refusing.pop(tenant, None)
            if refused is not None:
                self.log.info(
                    "subaccount {tenant} is below maxStreamsPerTenant={limit} again after {refused} refused "
                    "stream(s)", tenant=tenant, limit=limit, refused=refused,
                )
            return None
        if self.metrics is not None:
            self.metrics.stream_refusals.labels("max_streams_per_tenant").inc()
        if tenant not in self.refusing:
            self.refusing[tenant] = 0
            self.log.warn(
                "subaccount {tenant} reached maxStreamsPerTenant={limit} ({open} streams open): refusing new "
                "streams", tenant=tenant, limit=limit, open=open_streams,
            )
        self.refusing[tenant] += 1
        return TenantStreamLimitError(tenant, open_streams, limit)


class Router:
    """Hands out tunnel endpoints for the front ends.

    :param max_streams_per_tenant: streams one tenant may have open over all its tunnels (``None``: no limit).
    """

    def __init__(self, registry: ConnectorRegistry, metrics: ProxyMetrics | None = None,
                 max_streams_per_tenant: int | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.limits = (
            StreamLimits(registry, max_streams_per_tenant, metrics) if max_streams_per_tenant is not None else None
        )

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
        return TunnelEndpoint(self.registry, tenant, location, OpenRequest(host, port, kind, meta), self.metrics,
                              self.limits)
