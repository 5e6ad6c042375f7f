"""Routing retries a stream the connector did not process on another tunnel of the same (tenant, location)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol

from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.routing import Router
from connproxy.tunnel.errors import StreamRefusedError, TenantStreamLimitError
from connproxy.wire.errors import ErrorCode


class FakeTunnel:
    """A registrable tunnel whose ``open_stream`` answers with a fixed result."""

    def __init__(self, connector_id: str, answer: Any, load: int = 0) -> None:
        self.tenant = "t"
        self.location = ""
        self.connector_id = connector_id
        self.answer = answer
        self.load = load
        self.routable = True
        self.opens = 0

    def replaced(self) -> None:
        self.routable = False

    def open_stream(self, request: Any, factory: Any, early: bytes = b"", early_fin: bool = False) -> Deferred[Protocol]:
        self.opens += 1
        if isinstance(self.answer, Exception):
            self.routable = False  # a tunnel that refuses (GOAWAY) is no longer routable
            return fail(self.answer)
        return succeed(self.answer)


def _connect(registry: ConnectorRegistry) -> list[Any]:
    results: list[Any] = []
    endpoint = Router(registry).endpoint(tenant="t", location="", host="h", port=1)
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return results


def test_refused_stream_is_retried_on_another_tunnel() -> None:
    registry = ConnectorRegistry()
    draining = FakeTunnel("a", StreamRefusedError(ErrorCode.REFUSED_STREAM, "not processed"), load=0)
    good_protocol = Protocol()
    good = FakeTunnel("b", good_protocol, load=5)
    registry.register(draining)
    registry.register(good)
    assert _connect(registry) == [good_protocol]
    assert (draining.opens, good.opens) == (1, 1)


def test_other_refusals_are_not_retried() -> None:
    registry = ConnectorRegistry()
    denied = FakeTunnel("a", StreamRefusedError(ErrorCode.ACCESS_DENIED, "no"), load=0)
    good = FakeTunnel("b", Protocol(), load=5)
    registry.register(denied)
    registry.register(good)
    (result,) = _connect(registry)
    assert result.value.code is ErrorCode.ACCESS_DENIED
    assert good.opens == 0


def test_refused_stream_without_another_tunnel_fails_with_the_refusal() -> None:
    registry = ConnectorRegistry()
    only = FakeTunnel("a", StreamRefusedError(ErrorCode.REFUSED_STREAM, "too many streams"))
    only.replaced = lambda: None  # type: ignore[method-assign]
    registry.register(only)
    (result,) = _connect(registry)
    assert result.value.code is ErrorCode.REFUSED_STREAM
    assert only.opens == 1


def test_retries_are_bounded() -> None:
    registry = ConnectorRegistry()
    tunnels = [FakeTunnel(str(i), StreamRefusedError(ErrorCode.REFUSED_STREAM, "x"), load=i) for i in range(6)]
    for t in tunnels:
        registry.register(t)
    (result,) = _connect(registry)
    assert result.value.code is ErrorCode.REFUSED_STREAM
    assert sum(t.opens for t in tunnels) == 1 + Router(registry).endpoint(
        tenant="t", location="", host="h", port=1).max_retries


def test_tenant_limit_is_checked_once_before_the_first_attempt() -> None:
    registry = ConnectorRegistry()
    draining = FakeTunnel("a", StreamRefusedError(ErrorCode.REFUSED_STREAM, "not processed"), load=0)
    good_protocol = Protocol()
    good = FakeTunnel("b", good_protocol, load=5)
    registry.register(draining)
    registry.register(good)
    registry.tenant_streams = lambda tenant: 0  # type: ignore[method-assign]
    router = Router(registry, max_streams_per_tenant=1)
    assert router.limits is not None
    checks: list[str] = []
    check = router.limits.check
    router.limits.check = lambda tenant: checks.append(tenant) or check(tenant)  # type: ignore[method-assign]
    results: list[Any] = []
    router.endpoint(tenant="t", location="", host="h", port=1).connect(
        Factory.forProtocol(Protocol)).addBoth(results.append)
    assert results == [good_protocol]
    assert checks == ["t"]  # the retry on the second tunnel did not check again
    assert (draining.opens, good.opens) == (1, 1)


def test_tenant_at_its_limit_asks_no_tunnel() -> None:
    registry = ConnectorRegistry()
    good = FakeTunnel("b", Protocol())
    registry.register(good)
    registry.tenant_streams = lambda tenant: 1  # type: ignore[method-assign]
    results: list[Any] = []
    Router(registry, max_streams_per_tenant=1).endpoint(tenant="t", location="", host="h", port=1).connect(
        Factory.forProtocol(Protocol)).addBoth(results.append)
    (result,) = results
    assert result.check(TenantStreamLimitError)
    assert good.opens == 0
