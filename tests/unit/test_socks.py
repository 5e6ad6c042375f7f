"""Unit tests for the SOCKS5 front end's Twisted glue, :class:`connproxy.proxy.socks.Socks5Protocol`.

The client socket is a ``StringTransport``; the router hands out a fake ``IStreamClientEndpoint`` whose
``connect()`` returns a Deferred the test fires by hand; the authorizer is a fake too. Time is a ``task.Clock``.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from connproxy.proxy.auth import AuthError
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.routing import Router
from connproxy.proxy.socks import Socks5Factory, Socks5Protocol
from connproxy.tunnel.errors import NoConnectorError, OpenTimeoutError, StreamRefusedError, TunnelLostError
from connproxy.wire.errors import ErrorCode
from tests.doubles import FakeAuthorizer, FakeRouter

CLIENT_ADDR = IPv4Address("TCP", "10.9.9.9", 5000)
SUCCESS = bytes.fromhex("05 00 00 01 00 00 00 00 00 00")


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def sap_auth(token: bytes, location: str) -> bytes:
    loc = base64.b64encode(location.encode()) if location else b""
    return b"\x01" + struct.pack(">I", len(token)) + token + bytes([len(loc)]) + loc


def connect_request(host: str, port: int) -> bytes:
    name = host.encode()
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


# ------------------------------------------------------------------------------------------------ doubles


class SocksTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.router = FakeRouter()
        self.authorizer = FakeAuthorizer()
        self.audit: list[str] = []
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def client(self, authorization_enabled: bool = True, router: Any = None) -> tuple[Socks5Protocol, StringTransport]:
        factory = Socks5Factory(
            router or self.router, self.authorizer, self.clock, authorization_enabled=authorization_enabled,
            handshake_timeout=30.0, audit_writer=self.audit.append,
        )
        protocol = factory.buildProtocol(CLIENT_ADDR)
        transport = StringTransport(peerAddress=CLIENT_ADDR)
        protocol.makeConnection(transport)
        return protocol, transport

    def negotiated(self, **kwargs: Any) -> tuple[Socks5Protocol, StringTransport]:
        """A client that sent greeting, SAP auth and CONNECT erp.internal:443; replies cleared."""
        protocol, transport = self.client(**kwargs)
        protocol.dataReceived(greeting(0x80) + sap_auth(b"tok", "loc-1") + connect_request("erp.internal", 443))
        self.assertEqual(transport.value(), b"\x05\x80\x01\x00")
        transport.clear()
        return protocol, transport

    def events_with(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.logged if text in e.get("log_format", "")]


# ------------------------------------------------------------------------------------------------ tests


class SapFlowTests(SocksTestCase):
    def test_exact_bytes_of_the_sap_flow(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(b"\x05\x01\x80")
        self.assertEqual(transport.value(), b"\x05\x80")
        transport.clear()
        protocol.dataReceived(sap_auth(b"eyJ.token.sig", "loc-1"))
        self.assertEqual(transport.value(), b"\x01\x00")
        transport.clear()
        protocol.dataReceived(connect_request("erp.internal", 443))
        self.assertEqual(transport.value(), b"")  # nothing until the stream is open
        self.assertEqual(self.authorizer.calls, [("eyJ.token.sig", "eyJ.token.sig")])
        (endpoint,) = self.router.endpoints
        self.assertEqual(endpoint.kwargs["tenant"], "tenant-a")
        self.assertEqual(endpoint.kwargs["location"], "loc-1")
        self.assertEqual((endpoint.kwargs["host"], endpoint.kwargs["port"]), ("erp.internal", 443))
        self.assertEqual(endpoint.kwargs["kind"], "tcp")
        self.assertEqual(endpoint.kwargs["meta"],
                         {"client": "10.9.9.9:5000", "client_id": "sb-app", "via": "socks5"})
        far, far_t = endpoint.accept()
        self.assertEqual(transport.value(), SUCCESS)
        self.assertFalse(transport.disconnecting)
        # The negotiation timeout is cancelled; only the relay's idle check is left.
        self.assertEqual([c.func.__name__ for c in self.clock.getDelayedCalls()], ["_idle_check"])
        # Relaying, with the transports as each other's producers.
        self.assertIs(transport.producer, far_t)
        self.assertIs(far_t.producer, transport)
        protocol.dataReceived(b"client bytes")
        far.dataReceived(b"server bytes")
        self.assertEqual(far_t.value(), b"client bytes")
        self.assertEqual(transport.value(), SUCCESS + b"server bytes")

    def test_default_location_is_empty(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(greeting(0x80) + sap_auth(b"tok", "") + connect_request("10.0.0.1", 22))
        self.assertEqual(self.router.endpoints[0].kwargs["location"], "")
        self.assertEqual(self.router.endpoints[0].kwargs["host"], "10.0.0.1")

    def test_sap_client_offering_00_and_80_gets_80_also_in_trusted_mode(self) -> None:
        for enabled in (True, False):
            protocol, transport = self.client(authorization_enabled=enabled)
            protocol.dataReceived(b"\x05\x02\x00\x80")
            self.assertEqual(transport.value(), b"\x05\x80", f"authorization_enabled={enabled}")

    def test_no_auth_in_trusted_mode(self) -> None:
        protocol, transport = self.client(authorization_enabled=False)
        protocol.dataReceived(b"\x05\x01\x00" + connect_request("erp.internal", 443))
        self.assertEqual(transport.value(), b"\x05\x00")
        self.assertEqual(self.authorizer.calls, [(None, None)])
        self.assertEqual(self.router.endpoints[0].kwargs["location"], "")

    def test_no_auth_refused_when_authorization_is_enabled(self) -> None:
        protocol, transport = self.client(authorization_enabled=True)
        protocol.dataReceived(b"\x05\x01\x00")
        self.assertEqual(transport.value(), b"\x05\xff")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.router.endpoints, [])

    def test_malformed_greeting_is_closed_without_reply(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.events_with("refused")), 1)


class ConnectingTests(SocksTestCase):
    def test_client_is_paused_while_connecting_and_early_data_follows_the_wiring(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(greeting(0x80) + sap_auth(b"tok", "loc-1") + connect_request("erp.internal", 443)
                              + b"early,")
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"in flight")  # a read already under way when we paused
        far, far_t = self.router.endpoints[0].accept()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(far_t.value(), b"early,in flight")
        self.assertTrue(transport.value().endswith(SUCCESS))

    def test_client_disconnect_while_connecting_cancels_the_open(self) -> None:
        protocol, transport = self.negotiated()
        endpoint = self.router.endpoints[0]
        self.assertFalse(endpoint.cancelled)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(endpoint.cancelled)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.events_with("failed"), [])

    def test_client_disconnect_while_authorizing_is_not_a_refusal(self) -> None:
        self.authorizer.manual = True
        protocol, transport = self.negotiated()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.authorizer.pending[0].called)  # cancelled
        self.assertEqual(self.router.endpoints, [])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.audit, [])  # the client left; nobody refused it
        self.assertEqual(self.events_with("not authorized"), [])

    def test_late_authorization_after_disconnect_opens_nothing(self) -> None:
        self.authorizer.manual = True
        protocol, transport = self.negotiated()
        d = self.authorizer.pending[0]
        protocol.transport = None  # what the front end checks after its connection is gone
        d.callback(self.authorizer.caller())
        self.assertEqual(self.router.endpoints, [])


class FailureTests(SocksTestCase):
    def assertFailedWith(self, error: Exception, code: int) -> None:
        protocol, transport = self.negotiated()
        self.router.endpoints[0].d.errback(error)
        self.assertEqual(transport.value(), reply(code))
        self.assertTrue(transport.disconnecting)
        (event,) = self.events_with("failed")
        self.assertEqual(event["reply"], f"{code:#04x}")
        self.assertEqual(event["target"], "erp.internal:443")
        protocol.connectionLost(Failure(ConnectionDone()))  # what follows loseConnection on a real socket
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_connector_is_network_unreachable(self) -> None:
        self.assertFailedWith(NoConnectorError("tenant-a", "loc-1"), 0x03)

    def test_access_denied_is_not_allowed(self) -> None:
        self.assertFailedWith(StreamRefusedError(ErrorCode.ACCESS_DENIED, "no rule"), 0x02)

    def test_connect_refused_is_host_unreachable(self) -> None:
        self.assertFailedWith(StreamRefusedError(ErrorCode.CONNECT_REFUSED, "refused"), 0x04)

    def test_open_timeout_is_host_unreachable(self) -> None:
        self.assertFailedWith(OpenTimeoutError("no answer"), 0x04)

    def test_tunnel_lost_is_network_unreachable(self) -> None:
        self.assertFailedWith(TunnelLostError("gone"), 0x03)

    def test_unexpected_error_is_general_failure(self) -> None:
        self.assertFailedWith(RuntimeError("bug"), 0x01)

    def test_real_router_without_connector(self) -> None:
        protocol, transport = self.client(router=Router(ConnectorRegistry()))
        protocol.dataReceived(greeting(0x80) + sap_auth(b"tok", "loc-1") + connect_request("erp.internal", 443))
        self.assertEqual(transport.value(), b"\x05\x80\x01\x00" + reply(0x03))
        self.assertTrue(transport.disconnecting)
        (event,) = self.events_with("failed")
        self.assertIn("loc-1", event["error"])

    def test_refused_token_is_connection_refused_and_audited(self) -> None:
        self.authorizer.error = AuthError("expired")
        protocol, transport = self.client()
        protocol.dataReceived(greeting(0x80) + sap_auth(b"tok", "loc-1") + connect_request("erp.internal", 443))
        self.assertEqual(transport.value(), b"\x05\x80\x01\x00" + reply(0x05))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.router.endpoints, [])
        self.assertEqual(len(self.audit), 1)
        self.assertIn("proxy call refused", self.audit[0])
        self.assertIn("expired", self.audit[0])
        self.assertNotIn("tok", self.audit[0].replace("token", ""))
        self.assertEqual(len(self.events_with("not authorized")), 1)


class TimeoutTests(SocksTestCase):
    def test_negotiation_timeout_closes(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(b"\x05\x01")  # half a greeting
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.events_with("did not finish negotiating")), 1)

    def test_timeout_while_connecting_cancels_the_open(self) -> None:
        protocol, transport = self.negotiated()
        self.clock.advance(30.0)
        self.assertTrue(self.router.endpoints[0].cancelled)
        self.assertTrue(transport.disconnecting)

    def test_timeout_while_authorizing_closes_without_an_audited_refusal(self) -> None:
        self.authorizer.manual = True
        protocol, transport = self.negotiated()
        self.clock.advance(30.0)
        self.assertTrue(self.authorizer.pending[0].called)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.audit, [])
        self.assertEqual(self.router.endpoints, [])

    def test_no_timeout_once_relaying(self) -> None:
        protocol, transport = self.negotiated()
        self.router.endpoints[0].accept()
        self.clock.advance(3600)
        self.assertFalse(transport.disconnecting)


class IdleTests(SocksTestCase):
    def test_relay_without_traffic_for_an_idle_period_is_closed(self) -> None:
        protocol, transport = self.negotiated()
        protocol.factory.idle_timeout = 100.0
        far, far_transport = self.router.endpoints[0].accept()
        self.clock.advance(99)
        protocol.dataReceived(b"ping")  # client -> backend traffic
        self.clock.advance(100)
        far.dataReceived(b"pong")  # backend -> client traffic keeps it alive as well
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(100)  # a whole period without a byte either way
        self.assertTrue(transport.disconnecting)
        self.assertTrue(self.events_with("idle for"))


class FrontEndLimitTests(SocksTestCase):
    def factory(self, **kwargs: Any) -> Socks5Factory:
        return Socks5Factory(self.router, self.authorizer, self.clock, authorization_enabled=True,
                             audit_writer=self.audit.append, **kwargs)

    def test_over_the_per_client_limit_the_socket_is_closed_at_accept_and_logged_once_per_burst(self) -> None:
        from connproxy.proxy.metrics import ProxyMetrics

        metrics = ProxyMetrics(ConnectorRegistry())
        factory = self.factory(max_connections_per_client=2, metrics=metrics)
        kept = [factory.buildProtocol(CLIENT_ADDR) for _ in range(2)]
        self.assertTrue(all(isinstance(p, Socks5Protocol) for p in kept))
        for _ in range(5):
            self.assertIsNone(factory.buildProtocol(CLIENT_ADDR))  # Twisted closes the socket: not a byte
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "10.9.9.10", 1)), Socks5Protocol)
        self.assertEqual(len(self.events_with("at its connection limit")), 1)
        self.clock.advance(11)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDR))
        (first, second) = self.events_with("at its connection limit")
        self.assertEqual((first["count"], second["count"]), (1, 5))  # the burst's count in the next line
        self.assertEqual(second["limit"], "max_connections_per_client")
        self.assertIn(b'connproxy_client_connections_refused_total{front_end="socks5",limit='
                      b'"max_connections_per_client"} 6.0', metrics.render())
        # a connection that ends frees its place
        protocol = kept[0]
        assert protocol is not None
        protocol.makeConnection(StringTransport(peerAddress=CLIENT_ADDR))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(factory.buildProtocol(CLIENT_ADDR), Socks5Protocol)

    def test_over_the_total_limit_every_client_is_refused(self) -> None:
        factory = self.factory(max_connections=1)
        self.assertIsInstance(factory.buildProtocol(CLIENT_ADDR), Socks5Protocol)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.9.9.10", 1)))
        self.assertEqual(self.events_with("at its connection limit")[0]["limit"], "max_connections")

    def test_tcp_nodelay_is_set_on_the_accepted_socket(self) -> None:
        class NoDelay(StringTransport):
            no_delay = False

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.no_delay = enabled

        protocol = self.factory().buildProtocol(CLIENT_ADDR)
        assert protocol is not None
        transport = NoDelay(peerAddress=CLIENT_ADDR)
        protocol.makeConnection(transport)
        self.assertTrue(transport.no_delay)

    def test_client_text_in_logs_has_its_control_characters_escaped(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(greeting(0x80) + sap_auth(b"tok", "loc\r\nFAKE LINE") + connect_request("erp.internal", 1))
        self.router.endpoints[0].d.errback(NoConnectorError("tenant-a", "loc\r\nFAKE LINE"))
        (event,) = self.events_with("failed: {error}")
        self.assertEqual(event["location"], "loc\\x0d\\x0aFAKE LINE")
        self.assertNotIn("\n", event["error"])
        self.assertEqual(self.router.endpoints[0].kwargs["location"], "loc\r\nFAKE LINE")  # routed as sent

    def test_a_fin_during_the_negotiation_closes_at_once(self) -> None:
        protocol, transport = self.client()
        protocol.dataReceived(greeting(0x80))
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the handshake timer is gone too

    def test_a_fin_after_the_connect_request_is_relayed_once_open(self) -> None:
        protocol, transport = self.negotiated()
        protocol.dataReceived(b"last words")
        protocol.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        far, far_t = self.router.endpoints[0].accept()
        self.assertEqual((far_t.value(), far_t.write_closed), (b"last words", 1))
