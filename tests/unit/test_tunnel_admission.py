"""Unit tests of :class:`connproxy.proxy.tunnel_admission.TunnelAdmission` on a Clock with fake transports."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.tunnel_admission import AdmittedConnection, TunnelAdmission


class AbortableTransport(StringTransport):
    def __init__(self, host: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


def addr(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = ProxyMetrics(ConnectorRegistry())
        self.admission = TunnelAdmission(
            Factory.forProtocol(Protocol), self.clock, max_connections=4, max_connections_per_client=2,
            max_pending_handshakes=3, handshake_timeout=10.0, metrics=self.metrics,
        )

    def connect(self, host: str) -> tuple[Any, AbortableTransport]:
        protocol = self.admission.buildProtocol(addr(host))
        transport = AbortableTransport(host)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_per_source_and_total_limits_abort_at_accept(self) -> None:
        self.connect("10.0.0.1")
        self.connect("10.0.0.1")
        refused, t = self.connect("10.0.0.1")
        self.assertNotIsInstance(refused, AdmittedConnection)
        self.assertTrue(t.aborted)
        self.connect("10.0.0.2")
        self.connect("10.0.0.3")
        _p, t = self.connect("10.0.0.4")  # a fifth in total
        self.assertTrue(t.aborted)
        self.assertEqual(self.admission.connections, 4)
        text = self.metrics.render().decode()
        self.assertIn('limit="max_connections_per_client"} 1.0', text)
        self.assertIn('limit="max_connections"} 1.0', text)

    def test_lost_connection_frees_its_place_once(self) -> None:
        a, _ = self.connect("10.0.0.1")
        self.connect("10.0.0.1")
        a.connectionLost(None)
        a.connectionLost(None)
        self.assertEqual(self.admission.by_client, {"10.0.0.1": 1})
        _p, t = self.connect("10.0.0.1")
        self.assertFalse(t.aborted)

    def test_handshake_timeout_aborts_unless_tls_completed(self) -> None:
        slow, slow_t = self.connect("10.0.0.1")
        fast, fast_t = self.connect("10.0.0.2")
        fast.handshakeCompleted()
        self.clock.advance(9.9)
        self.assertFalse(slow_t.aborted)
        self.clock.advance(0.1)
        self.assertTrue(slow_t.aborted)
        self.assertFalse(fast_t.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn('reason="handshake_timeout"} 1.0', self.metrics.render().decode())

    def test_pending_limit_aborts_the_oldest(self) -> None:
        transports = [self.connect(f"10.0.0.{n}")[1] for n in range(1, 5)]
        self.assertEqual([t.aborted for t in transports], [True, False, False, False])
        self.assertEqual(len(self.admission.pending), 3)
        self.assertIn('reason="max_pending_handshakes"} 1.0', self.metrics.render().decode())


class ConfigTests(SynchronousTestCase):
    def test_keys_and_defaults(self) -> None:
        from connproxy.config import ConfigError, proxy_config_from_mapping

        trusted = {"enableProxyAuthorization": False}
        base: dict[str, Any] = {"subaccountId": "tenant-a", "servers": {"proxy": {"http": trusted, "socks5": trusted}}}
        default = proxy_config_from_mapping(base).tunnel_listener
        self.assertEqual((default.max_connections, default.max_connections_per_client, default.max_pending_handshakes,
                          default.handshake_timeout_seconds), (10_000, 1_000, 1_000, 10.0))
        bdt = {"maxConnections": 50, "maxConnectionsPerClient": 5, "maxPendingHandshakes": 7,
               "handshakeTimeoutSeconds": 2.5}
        got = proxy_config_from_mapping({**base, "servers": {**base["servers"], "businessDataTunnel": bdt}}).tunnel_listener
        self.assertEqual((got.max_connections, got.max_connections_per_client, got.max_pending_handshakes,
                          got.handshake_timeout_seconds), (50, 5, 7, 2.5))
        for key, bad in (("maxPendingHandshakes", 0), ("handshakeTimeoutSeconds", 0), ("maxConnections", "x")):
            with self.assertRaises(ConfigError):
                proxy_config_from_mapping({**base, "servers": {**base["servers"], "businessDataTunnel": {key: bad}}})
