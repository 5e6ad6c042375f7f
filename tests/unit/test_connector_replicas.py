"""Unit tests for :mod:`connproxy.connector.replicas` (one tunnel per replica) and
:mod:`connproxy.connector.egress` (corporate proxy, HTTP preambles); no sockets, a ``MemoryReactorClock``."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from connproxy.config import CorporateProxyConfig
from connproxy.connector.egress import CorporateProxy, PreambleEndpoint, PreambleError, connect_request
from connproxy.connector.replicas import ReplicaConnector, ReplicaRoute, parse_routes
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import GoAwayReceived
from tests.unit.test_connector import PROXY_ADDR, EndpointFactory, FakeProxy, make_config


def announce(*ordinals: int) -> list[dict[str, Any]]:
    return [{"name": f"connectivity-proxy-{n}", "ordinal": n, "path": f"/connectivity-proxy-{n}"} for n in ordinals]


class Routed(EndpointFactory):
    """Scripted endpoints that remember which replica each attempt was for."""

    def __init__(self) -> None:
        super().__init__(default="ok")
        self.routes: list[ReplicaRoute | None] = []

    def for_route(self, route: ReplicaRoute | None) -> Any:
        self.routes.append(route)
        return self()


def land(tunnel: Any, replica: int, replicas: list[dict[str, Any]]) -> FakeProxy:
    """Complete ``tunnel``'s handshake as replica ``replica`` announcing ``replicas``."""
    proxy = FakeProxy(tunnel)
    proxy.exchange()
    proxy.session.send_hello({"replica_id": f"connectivity-proxy-{replica}", "tunnel_id": "account:///tenant-a",
                              "high_availability_mode": "path", "replicas": replicas})
    proxy.exchange()
    return proxy


class ReplicaConnectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints = Routed()
        self.connector = ReplicaConnector(self.reactor, make_config(), self.endpoints.for_route, rng=lambda: 0.5)
        self.connector.startService()
        self.addCleanup(lambda: self.connector.running and self.connector.stopService())

    def test_first_tunnel_reveals_the_set_and_every_replica_gets_a_loop(self) -> None:
        self.assertEqual(self.endpoints.routes, [None])  # any replica first
        up = self.connector.when_up()
        first = self.endpoints.built[0].protocol
        land(first, 1, announce(0, 1, 2))
        self.assertIs(self.successResultOf(up), first)
        self.assertEqual(sorted(self.connector.loops), [f"connectivity-proxy-{n}" for n in (0, 1, 2)])
        # The first loop became replica 1's (no second tunnel to it); 0 and 2 are dialled by their paths.
        self.assertIs(self.connector.loops["connectivity-proxy-1"].tunnel, first)
        self.assertIsNone(self.connector.bootstrap)
        self.assertEqual(sorted(r.path for r in self.endpoints.routes[1:] if r is not None),
                         ["/connectivity-proxy-0", "/connectivity-proxy-2"])
        for n in (1, 2):
            route = self.endpoints.routes[n]
            assert route is not None and route.ordinal is not None
            land(self.endpoints.built[n].protocol, route.ordinal, announce(0, 1, 2))
        self.assertEqual(sorted(self.connector.established()), sorted(self.connector.loops))

    def test_a_tunnel_on_the_wrong_replica_is_closed_and_redialled(self) -> None:
        land(self.endpoints.built[0].protocol, 0, announce(0, 1))
        loop1 = self.connector.loops["connectivity-proxy-1"]
        wrong = self.endpoints.built[1].protocol
        land(wrong, 0, announce(0, 1))  # the ingress sent replica 1's tunnel to replica 0
        self.assertIn("instead of connectivity-proxy-1", wrong.refusal)
        self.assertTrue(wrong.transport.disconnecting)
        self.assertNotIn("connectivity-proxy-1", self.connector.established())
        wrong.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual(loop1.attempt, 1)  # a failed dial: backoff, not an immediate loop
        self.reactor.advance(1.0)
        self.assertEqual(self.endpoints.routes[-1], loop1.route)

    def test_bootstrap_landing_on_a_replica_that_has_a_tunnel_is_closed(self) -> None:
        land(self.endpoints.built[0].protocol, 0, announce(0, 1))
        land(self.endpoints.built[1].protocol, 1, announce(0, 1))
        self.assertEqual(len(self.connector.established()), 2)
        self.assertIsNone(self.connector.bootstrap)  # the set is known: no "any replica" loop any more
        # Were one still dialling (a race), its tunnel to a replica that has one is closed and the loop ends.
        late = self.connector._new_loop(None)
        duplicate = self.endpoints.built[2].protocol
        land(duplicate, 0, announce(0, 1))
        self.assertIn("already has a tunnel", duplicate.refusal)
        self.assertTrue(duplicate.transport.disconnecting)
        self.reactor.advance(0)
        self.assertFalse(late.running)
        self.assertIs(self.connector.established()["connectivity-proxy-0"], self.endpoints.built[0].protocol)

    def test_replicas_frame_follows_scale_up_and_down(self) -> None:
        proxy = land(self.endpoints.built[0].protocol, 0, announce(0, 1))
        loop1 = self.connector.loops["connectivity-proxy-1"]
        proxy.session.send_replicas(announce(0, 2))
        proxy.exchange()
        self.assertEqual(sorted(self.connector.loops), ["connectivity-proxy-0", "connectivity-proxy-2"])
        self.assertFalse(loop1.running)
        self.assertEqual(self.endpoints.routes[-1], ReplicaRoute("connectivity-proxy-2", 2, "/connectivity-proxy-2"))

    def test_with_no_tunnel_left_any_replica_is_dialled_again_to_learn_the_set(self) -> None:
        first = self.endpoints.built[0].protocol
        land(first, 0, announce(0, 1))
        second = self.endpoints.built[1].protocol
        self.endpoints.default = "fail"
        second.connectionLost(Failure(ConnectionError("gone")))  # replica 1's tunnel: replica 0 still has one
        self.assertIsNone(self.connector.bootstrap)
        first.connectionLost(Failure(ConnectionError("gone")))  # now none is left
        boot = self.connector.bootstrap
        self.assertIsNotNone(boot)
        self.endpoints.default = "ok"
        self.reactor.advance(1.0)
        # The set was renamed meanwhile: the new one replaces the old loops.
        fresh = [e.protocol for e, r in zip(self.endpoints.built, self.endpoints.routes, strict=True)
                 if r is None and e.protocol is not None and e.protocol is not first][-1]
        land(fresh, 7, announce(7, 8))
        self.assertEqual(sorted(self.connector.loops), ["connectivity-proxy-7", "connectivity-proxy-8"])
        self.assertIs(self.connector.loops["connectivity-proxy-7"], boot)
        self.assertIsNone(self.connector.bootstrap)

    def test_stop_drains_every_replica_tunnel_also_of_replicas_that_left(self) -> None:
        proxies = {0: land(self.endpoints.built[0].protocol, 0, announce(0, 1, 2))}
        for n in (1, 2):
            route = self.endpoints.routes[n]
            assert route is not None and route.ordinal is not None
            proxies[route.ordinal] = land(self.endpoints.built[n].protocol, route.ordinal, announce(0, 1, 2))
        self.assertEqual(self.connector.readiness(), (True, ""))
        scrape = self.connector.metrics.render().decode()
        for n in (0, 1, 2):  # one set of metrics over every loop
            self.assertIn(f'connproxy_connector_tunnel_up{{replica="connectivity-proxy-{n}"}} 1.0', scrape)
        # Replica 2 leaves the set: its loop stops and its tunnel drains in the background.
        proxies[0].session.send_replicas(announce(0, 1))
        proxies[0].exchange()
        self.assertNotIn("connectivity-proxy-2", self.connector.loops)
        self.assertTrue(any(isinstance(e, GoAwayReceived) for e in proxies[2].exchange()))
        pool_closed: list[bool] = []
        self.connector.dialer.http.pool.close = lambda: pool_closed.append(True)  # type: ignore[method-assign]

        stopped = self.connector.stopService()
        self.assertEqual(self.connector.readiness(), (False, "draining"))
        for n in (0, 1):
            goaways = [e for e in proxies[n].exchange() if isinstance(e, GoAwayReceived)]
            self.assertEqual([e.code for e in goaways], [ErrorCode.SHUTTING_DOWN])
        for n in (0, 1):
            proxies[n].tunnel.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(stopped)  # replica 2's tunnel has not finished draining yet
        self.assertEqual(pool_closed, [])  # the shared backend pool outlives every loop's drain
        proxies[2].tunnel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertEqual(pool_closed, [True])
        self.assertEqual(self.connector.all_tunnels(), [])

    def test_a_proxy_without_replicas_keeps_one_tunnel(self) -> None:
        proxy = FakeProxy(self.endpoints.built[0].protocol)
        proxy.handshake()
        self.assertEqual(self.connector.loops, {})
        self.assertIsNotNone(self.connector.tunnel)
        self.assertEqual(len(self.endpoints.built), 1)


class ParseRoutesTests(SynchronousTestCase):
    def test_malformed_entries_are_skipped(self) -> None:
        routes = parse_routes([
            {"name": "connectivity-proxy-0", "ordinal": 0, "path": "/connectivity-proxy-0"},
            {"name": "bad name", "path": "/x"},
            {"name": "connectivity-proxy-1", "path": "/../etc\r\nX: y"},
            {"name": "connectivity-proxy-2", "host": "connectivity-proxy-2.example.com", "ordinal": True},
            "junk",
        ])
        self.assertEqual(routes, {
            "connectivity-proxy-0": ReplicaRoute("connectivity-proxy-0", 0, "/connectivity-proxy-0"),
            "connectivity-proxy-2": ReplicaRoute("connectivity-proxy-2", None, None, "connectivity-proxy-2.example.com"),
        })
        self.assertEqual(parse_routes("nope"), {})


# ------------------------------------------------------------------------------------------------ egress


class CorporateProxyTests(SynchronousTestCase):
    def test_url_with_credentials(self) -> None:
        corp = CorporateProxy.from_config(CorporateProxyConfig(url="http://us%40er:p%3Ass@proxy.corp:8080"), {})
        assert corp is not None
        self.assertEqual((corp.host, corp.port), ("proxy.corp", 8080))
        self.assertEqual(corp.authorization, "Basic dXNAZXI6cDpzcw==")  # us@er:p:ss

    def test_environment(self) -> None:
        env = {"HTTPS_PROXY": "proxy.corp:3128", "NO_PROXY": "localhost,.internal,10.0.0.0/8"}
        corp = CorporateProxy.from_config(CorporateProxyConfig(), env)
        assert corp is not None
        self.assertEqual((corp.host, corp.port, corp.authorization), ("proxy.corp", 3128, None))
        for host in ("localhost", "a.internal", "internal", "10.1.2.3"):
            self.assertTrue(corp.bypass(host), host)
        for host in ("proxy.example.com", "11.0.0.1", "xinternal"):
            self.assertFalse(corp.bypass(host), host)
        self.assertIsNone(CorporateProxy.from_config(CorporateProxyConfig(use_environment=False), env))
        self.assertIsNone(CorporateProxy.from_config(CorporateProxyConfig(), {}))

    def test_connect_request(self) -> None:
        self.assertEqual(connect_request("::1", 443, "Basic eA=="),
                         b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic eA==\r\n\r\n")


@implementer(IStreamClientEndpoint)
class OneTransport:
    """Connects the factory's protocol to a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport(peerAddress=PROXY_ADDR)
        self.protocol: Any = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.protocol = factory.buildProtocol(PROXY_ADDR)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class Inner(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class PreambleTests(SynchronousTestCase):
    def connect(self) -> tuple[OneTransport, Deferred[Any], Inner]:
        inner = Inner()
        base = OneTransport()
        d = PreambleEndpoint(base, b"CONNECT x:1 HTTP/1.1\r\n\r\n", 200, "corporate proxy").connect(
            _factory(inner))
        self.assertEqual(base.transport.value(), b"CONNECT x:1 HTTP/1.1\r\n\r\n")
        return base, d, inner

    def test_expected_status_hands_over_with_the_bytes_that_followed(self) -> None:
        base, d, inner = self.connect()
        base.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n")
        self.assertNoResult(d)
        base.protocol.dataReceived(b"\r\nearly")
        self.assertIs(self.successResultOf(d), inner)
        self.assertEqual(inner.data, b"early")
        base.protocol.dataReceived(b" more")
        self.assertEqual(inner.data, b"early more")

    def test_other_status_fails_and_closes(self) -> None:
        base, d, _inner = self.connect()
        base.protocol.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        error = self.failureResultOf(d, PreambleError).value
        self.assertEqual(error.status, 407)
        self.assertIn("407 Proxy Authentication Required", str(error))
        self.assertTrue(base.transport.disconnecting)

    def test_endless_head_and_early_close_fail(self) -> None:
        base, d, _inner = self.connect()
        base.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)
        self.failureResultOf(d, PreambleError)
        base, d, _inner = self.connect()
        base.protocol.connectionLost(Failure(ConnectionError("gone")))
        self.failureResultOf(d, PreambleError)


def _factory(protocol: Protocol) -> IProtocolFactory:
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(lambda: protocol)
