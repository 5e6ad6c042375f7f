"""``maxStreamsPerTenant`` in the router (fake tunnels) and the answers the front ends give for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.replies import http_status_for, open_failure_text, socks_reply_for
from connproxy.proxy.routing import Router
from connproxy.tunnel.errors import TenantStreamLimitError
from connproxy.wire.events import OpenRequest
from connproxy.wire.socks5 import Reply


@dataclass(eq=False)
class FakeTunnel:
    connector_id: str
    tenant: str = "tenant-a"
    location: str = ""
    routable: bool = True
    opened: list[OpenRequest] = field(default_factory=list)

    @property
    def load(self) -> int:
        return len(self.opened)

    def replaced(self) -> None:
        self.routable = False

    def open_stream(self, request: OpenRequest, factory: Any, early: bytes = b"",
                    early_fin: bool = False) -> Deferred[Protocol]:
        self.opened.append(request)
        return Deferred()


class TenantLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = ConnectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self.router = Router(self.registry, self.metrics, max_streams_per_tenant=3)
        self.a1, self.a2 = FakeTunnel("c1"), FakeTunnel("c2", location="loc-1")
        self.b = FakeTunnel("c1", tenant="tenant-b")
        for t in (self.a1, self.a2, self.b):
            self.registry.register(t)

    def open(self, tenant: str = "tenant-a", location: str = "") -> Deferred[Any]:
        endpoint = self.router.endpoint(tenant=tenant, location=location, host="erp", port=1, meta={"via": "socks5"})
        return endpoint.connect(Factory.forProtocol(Protocol))

    def test_limit_counts_every_tunnel_of_the_tenant(self) -> None:
        self.open()
        self.open()
        self.open(location="loc-1")
        failure = self.failureResultOf(self.open(location="loc-1"), TenantStreamLimitError)
        self.assertEqual((failure.value.open_streams, failure.value.limit), (3, 3))
        self.assertEqual(self.a2.load, 1)  # the refused open never reached a tunnel
        # Another tenant is not affected.
        self.assertNoResult(self.open(tenant="tenant-b"))
        text = self.metrics.render().decode()
        self.assertIn('connproxy_stream_refusals_total{reason="max_streams_per_tenant"} 1.0', text)
        self.assertIn('connproxy_stream_opens_total{front_end="socks5",result="max_streams_per_tenant"} 1.0', text)

    def test_refusals_are_logged_once_per_episode(self) -> None:
        limits = self.router.limits
        assert limits is not None
        for _ in range(3):
            self.open()
        for _ in range(5):
            self.failureResultOf(self.open(), TenantStreamLimitError)
        self.assertEqual(limits.refusing, {"tenant-a": 5})
        self.a1.opened.pop()
        self.assertNoResult(self.open())
        self.assertEqual(limits.refusing, {})

    def test_without_limit_nothing_is_refused(self) -> None:
        router = Router(self.registry)
        for _ in range(20):
            self.assertNoResult(router.endpoint(tenant="tenant-a", location="", host="h", port=1).connect(
                Factory.forProtocol(Protocol)))


class AnswerTests(SynchronousTestCase):
    def test_socks_http_and_body(self) -> None:
        failure = Failure(TenantStreamLimitError("tenant-\r\nx", 10000, 10000))
        self.assertEqual(socks_reply_for(failure), Reply.GENERAL_FAILURE)
        self.assertEqual(http_status_for(failure), 503)
        text = open_failure_text(failure, "erp:443")
        self.assertTrue(text.startswith("service unavailable: subaccount tenant-"))
        self.assertIn("servers.businessDataTunnel.maxStreamsPerTenant=10000", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\n", text)
