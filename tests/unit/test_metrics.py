"""Prometheus metrics: gauges read from the registry, stream-open counters from the router."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol

from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.routing import Router
from connproxy.tunnel.errors import OpenTimeoutError, StreamRefusedError
from connproxy.wire.errors import ErrorCode


class FakeTunnel:
    def __init__(self, tenant: str, location: str, connector_id: str, load: int, result: Any = None) -> None:
        self.tenant = tenant
        self.location = location
        self.connector_id = connector_id
        self.load = load
        self.routable = True
        self.rtt = 0.002
        self.tunnel_id = f"account:///{tenant}"
        self.result = result

    def replaced(self) -> None:
        pass

    def open_stream(self, request: Any, factory: Any, early: bytes = b"", early_fin: bool = False) -> Deferred[Any]:
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(Protocol())


def sample(metrics: ProxyMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    value = metrics.prometheus.get_sample_value(name, labels or {})
    return value


def test_gauges_follow_the_registry() -> None:
    registry = ConnectorRegistry()
    metrics = ProxyMetrics(registry)
    assert sample(metrics, "connectivity_business_data_tunnels_count") == 0
    registry.register(FakeTunnel("t-a", "", "c1", 3))  # type: ignore[arg-type]
    registry.register(FakeTunnel("t-a", "", "c2", 2))  # type: ignore[arg-type]
    registry.register(FakeTunnel("t-b", "loc", "c3", 0))  # type: ignore[arg-type]
    assert sample(metrics, "connectivity_business_data_tunnels_count") == 3
    assert sample(metrics, "connproxy_tunnels", {"tenant": "t-a", "location": ""}) == 2
    assert sample(metrics, "connproxy_streams_open", {"tenant": "t-a", "location": ""}) == 5
    assert sample(metrics, "connproxy_tunnel_rtt_seconds", {"tenant": "t-b", "location": "loc", "connector_id": "c3"})
    text = metrics.render().decode()
    assert "connectivity_business_data_tunnels_count 3.0" in text


def test_router_counts_opens_by_outcome() -> None:
    registry = ConnectorRegistry()
    metrics = ProxyMetrics(registry)
    router = Router(registry, metrics)
    factory = Factory.forProtocol(Protocol)

    def open_via(tenant: str) -> Deferred[Any]:
        d = router.endpoint(tenant=tenant, location="", host="h", port=1, meta={"via": "socks5"}).connect(factory)
        d.addErrback(lambda f: None)
        return d

    open_via("nobody")
    registry.register(FakeTunnel("ok", "", "c", 0))  # type: ignore[arg-type]
    open_via("ok")
    registry.register(FakeTunnel("denied", "", "c", 0, StreamRefusedError(ErrorCode.ACCESS_DENIED, "no")))  # type: ignore[arg-type]
    open_via("denied")
    registry.register(FakeTunnel("slow", "", "c", 0, OpenTimeoutError("slow")))  # type: ignore[arg-type]
    open_via("slow")
    for outcome in ("no_connector", "ok", "access_denied", "timeout"):
        assert sample(metrics, "connproxy_stream_opens_total", {"front_end": "socks5", "result": outcome}) == 1
    assert sample(metrics, "connectivity_tunnel_opening_timeout_count_total", {"tunnel_id": "account:///slow"}) == 1
