"""Unit tests for :mod:`connproxy.connector.dialer`: reconnect backoff, the dial loop and the backend dialer.

No sockets and no real time: the service runs on a ``MemoryReactorClock`` with scripted endpoints; the proxy end of
a tunnel is the sans-IO :class:`connproxy.wire.session.Session` fed by hand from a ``StringTransport``.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from connproxy.config import AccessRule, ConnectorConfig, connector_config_from_mapping
from connproxy.connector.backend import reset_code_for
from connproxy.connector.dialer import TRANSITIONS, ConnectorService, ConnectorTunnel, LinkState, backoff_delay
from connproxy.connector.tcp import BackendDialer
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    OpenRequest,
    StreamAccepted,
    StreamReset,
)
from connproxy.wire.session import Role, Session
from tests.doubles import HalfCloseTransport

PROXY_ADDR = IPv4Address("TCP", "192.0.2.10", 8042)


def make_config(**overrides: Any) -> ConnectorConfig:
    data: dict[str, Any] = {
        "subaccountId": "tenant-a",
        "locationId": "loc-1",
        "connectorId": "c1",
        "proxy": {"host": "proxy.example", "port": 8042},
        "reconnect": {"initialDelaySeconds": 1.0, "maxDelaySeconds": 8.0, "fastRetries": 2},
        "backend": {"connectTimeoutSeconds": 5},
        "accessControl": [
            {"virtualHost": "erp.internal", "virtualPort": 443, "internalHost": "10.1.1.1",
             "internalPort": 8443, "protocol": "TCP"},
            {"virtualHost": "web.internal", "virtualPort": 80, "internalHost": "10.1.1.2",
             "internalPort": 8080, "protocol": "HTTP", "resources": [{"path": "/"}]},
        ],
    }
    data.update(overrides)
    return connector_config_from_mapping(data)


# ------------------------------------------------------------------------------------------------ doubles


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """One connection attempt: ``"fail"`` (refused), ``"ok"`` (connected to a StringTransport) or ``"hang"``."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.protocol: Any = None
        self.transport: StringTransport | None = None
        self.cancelled = False

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.outcome == "fail":
            return fail(ierror.ConnectionRefusedError("proxy.example:8042"))
        if self.outcome == "hang":
            return Deferred(lambda d: setattr(self, "cancelled", True))
        self.protocol = factory.buildProtocol(PROXY_ADDR)
        self.transport = StringTransport(peerAddress=PROXY_ADDR)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class EndpointFactory:
    """Builds a new endpoint per attempt (the host name is resolved again each time); then uses ``default``."""

    def __init__(self, *outcomes: str, default: str = "fail") -> None:
        self.outcomes = list(outcomes)
        self.default = default
        self.built: list[ScriptedEndpoint] = []

    def __call__(self) -> ScriptedEndpoint:
        outcome = self.outcomes.pop(0) if self.outcomes else self.default
        endpoint = ScriptedEndpoint(outcome)
        self.built.append(endpoint)
        return endpoint


class FakeProxy:
    """The proxy end of one tunnel, sans-IO: a LISTENER session fed from the tunnel's StringTransport."""

    def __init__(self, tunnel: ConnectorTunnel) -> None:
        assert isinstance(tunnel.transport, StringTransport)
        self.tunnel = tunnel
        self.transport: StringTransport = tunnel.transport
        self.session = Session(Role.LISTENER)
        self.events: list[Event] = []

    def exchange(self) -> list[Event]:
        """Move bytes both ways until both are quiet; return the proxy's new events."""
        new: list[Event] = []
        while True:
            out = self.transport.value()
            self.transport.clear()
            if out:
                new += self.session.receive_data(out)
            back = b"".join(self.session.take_output())
            if back:
                self.tunnel.dataReceived(back)
            if not out and not back:
                self.events += new
                return new

    def handshake(self) -> None:
        events = self.exchange()
        assert isinstance(events[0], HelloReceived), events
        hello = events[0].hello
        assert (hello["connector_id"], hello["subaccount"], hello["location"]) == ("c1", "tenant-a", "loc-1")
        self.session.send_hello({"replica_id": "proxy-0", "tunnel_id": "account:///tenant-a"})
        self.exchange()
        assert self.tunnel.established_at is not None

    def open(self, host: str = "erp.internal", port: int = 443, kind: str = "tcp") -> int:
        stream_id = self.session.open_stream(OpenRequest(host, port, kind, {"tenant": "tenant-a",
                                                                            "location": "loc-1"}))
        self.exchange()
        return stream_id


def pending_delays(reactor: MemoryReactorClock) -> list[float]:
    return sorted(call.getTime() - reactor.seconds() for call in reactor.getDelayedCalls())


# ------------------------------------------------------------------------------------------------ backoff


class BackoffDelayTests(SynchronousTestCase):
    def test_fast_retries_draw_from_initial(self) -> None:
        for attempt in (1, 2, 3):
            self.assertEqual(backoff_delay(attempt, initial=0.2, maximum=30, fast_retries=3, rng=lambda: 1.0), 0.2)

    def test_exponential_growth_after_the_fast_retries_then_cap(self) -> None:
        ceilings = [backoff_delay(a, initial=1.0, maximum=5.0, fast_retries=2, rng=lambda: 1.0)
                    for a in range(1, 9)]
        self.assertEqual(ceilings, [1.0, 1.0, 1.5, 2.25, 3.375, 5.0, 5.0, 5.0])

    def test_huge_attempt_numbers_stay_at_the_cap(self) -> None:
        self.assertEqual(backoff_delay(10_000, initial=0.5, maximum=30.0, fast_retries=3, rng=lambda: 1.0), 30.0)

    def test_full_jitter_scales_the_whole_interval(self) -> None:
        draws = iter([0.0, 0.25, 0.5, 0.999])
        got = [backoff_delay(3, initial=1.0, maximum=30.0, fast_retries=1, rng=lambda: next(draws))
               for _ in range(4)]
        self.assertEqual(got, [0.0, 0.5625, 1.125, 2.24775])

    def test_no_fast_retries(self) -> None:
        self.assertEqual(backoff_delay(1, initial=1.0, maximum=30.0, fast_retries=0, rng=lambda: 1.0), 1.5)


# ------------------------------------------------------------------------------------------------ dial loop


class DialLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.audit: list[str] = []

    def service(self, endpoints: EndpointFactory, rng: float = 0.5) -> ConnectorService:
        svc = ConnectorService(self.reactor, make_config(), endpoints, rng=lambda: rng,
                               audit_writer=self.audit.append)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc

    def test_first_attempt_is_immediate(self) -> None:
        endpoints = EndpointFactory("hang")
        self.service(endpoints)
        self.assertEqual(self.reactor.seconds(), 0)
        self.assertEqual(len(endpoints.built), 1)

    def test_retries_with_growing_delays_and_a_new_endpoint_each_time(self) -> None:
        endpoints = EndpointFactory()  # every attempt is refused
        svc = self.service(endpoints)
        delays = []
        for _ in range(6):
            (delay,) = pending_delays(self.reactor)
            delays.append(delay)
            self.reactor.advance(delay)
        # initial 1 s, 2 fast retries, factor 1.5, cap 8 s; rng 0.5 halves each ceiling.
        self.assertEqual(delays, [0.5, 0.5, 0.75, 1.125, 1.6875, 2.53125])
        self.assertEqual(len(endpoints.built), 7)
        self.assertEqual(len({id(e) for e in endpoints.built}), 7)
        self.assertEqual(svc.connections, 7)
        self.assertEqual(svc.attempt, 7)

    def test_connect_timeout_counts_as_a_failed_attempt(self) -> None:
        endpoints = EndpointFactory("hang")
        svc = self.service(endpoints)
        timeout = svc.config.tunnel.open_timeout_seconds + 5.0
        self.assertEqual(pending_delays(self.reactor), [timeout])
        self.reactor.advance(timeout)
        self.assertTrue(endpoints.built[0].cancelled)
        self.assertEqual(pending_delays(self.reactor), [0.5])

    def test_stop_service_cancels_the_retry_timer(self) -> None:
        endpoints = EndpointFactory()
        svc = self.service(endpoints)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.successResultOf(svc.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(3600)
        self.assertEqual(len(endpoints.built), 1)

    def test_stop_service_cancels_a_connection_attempt(self) -> None:
        endpoints = EndpointFactory("hang")
        svc = self.service(endpoints)
        self.successResultOf(svc.stopService())
        self.assertTrue(endpoints.built[0].cancelled)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(endpoints.built), 1)

    def test_a_completed_handshake_resets_the_backoff(self) -> None:
        """Failed dials before a tunnel do not slow the redial after it is lost (a restarted proxy)."""
        endpoints = EndpointFactory("fail", "fail", "fail", "fail", "ok", default="hang")
        svc = self.service(endpoints)
        for delay in (0.5, 0.5, 0.75, 1.125):
            self.assertEqual(pending_delays(self.reactor), [delay])
            self.reactor.advance(delay)
        self.assertEqual(svc.attempt, 4)
        tunnel = endpoints.built[4].protocol
        FakeProxy(tunnel).handshake()
        self.assertIs(self.successResultOf(svc.when_up()), tunnel)
        self.assertEqual(svc.attempt, 0)  # reset by the handshake ...
        self.reactor.advance(1)
        tunnel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertIsNone(svc.tunnel)
        self.assertEqual(svc.attempt, 1)  # ... so the redial is a first retry: within initialDelaySeconds
        self.assertEqual(pending_delays(self.reactor), [0.5])

    def test_tunnels_that_keep_dying_young_back_off(self) -> None:
        endpoints = EndpointFactory(default="ok")
        svc = self.service(endpoints)
        delays = []
        for n in range(5):
            tunnel = endpoints.built[n].protocol
            FakeProxy(tunnel).handshake()
            self.reactor.advance(svc.stable_after - 1)
            tunnel.connectionLost(Failure(ierror.ConnectionLost()))
            (delay,) = pending_delays(self.reactor)
            delays.append(delay)
            self.reactor.advance(delay)
        self.assertEqual(delays, [0.5, 0.5, 0.75, 1.125, 1.6875])
        # One tunnel that lives for stable_after starts the count over.
        tunnel = endpoints.built[5].protocol
        FakeProxy(tunnel).handshake()
        self.reactor.advance(svc.stable_after)
        tunnel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertEqual(svc.attempt, 1)
        self.assertEqual(pending_delays(self.reactor), [0.5])

    def test_refused_handshake_is_retried_with_backoff(self) -> None:
        endpoints = EndpointFactory("ok", default="hang")
        svc = self.service(endpoints)
        tunnel = endpoints.built[0].protocol
        proxy = FakeProxy(tunnel)
        proxy.exchange()
        proxy.session.go_away(ErrorCode.AUTH_FAILED, "certificate binds subaccount 'tenant-b'")
        proxy.exchange()
        self.assertIn("tenant-b", tunnel.refusal)
        tunnel.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(svc.attempt, 1)
        self.assertEqual(pending_delays(self.reactor), [0.5])

    def test_goaway_from_the_proxy_dials_a_new_tunnel_at_once(self) -> None:
        endpoints = EndpointFactory("ok", default="hang")
        svc = self.service(endpoints)
        tunnel = endpoints.built[0].protocol
        proxy = FakeProxy(tunnel)
        proxy.handshake()
        proxy.session.go_away(ErrorCode.SHUTTING_DOWN, "rolling restart")
        proxy.exchange()
        self.assertEqual(pending_delays(self.reactor)[0], 0.5)  # at once, spread within initialDelaySeconds
        self.reactor.advance(0.5)
        self.assertEqual(len(endpoints.built), 2)
        self.assertEqual(svc.attempt, 0)
        self.assertFalse(tunnel.lost)  # the old tunnel finishes its streams

    def test_replaced_tunnel_does_not_redial_at_once(self) -> None:
        """Two connectors with one connectorId would replace each other forever if REPLACED redialled at once."""
        endpoints = EndpointFactory("ok", default="hang")
        svc = self.service(endpoints)
        tunnel = endpoints.built[0].protocol
        proxy = FakeProxy(tunnel)
        proxy.handshake()
        proxy.session.go_away(ErrorCode.REPLACED, "replaced by a newer tunnel of the same connector")
        proxy.exchange()
        self.assertEqual(len(endpoints.built), 1)
        self.assertIn("same connectorId", tunnel.refusal)
        tunnel.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(svc.attempt, 1)  # a backed-off retry, not an immediate dial

    def test_the_loop_walks_its_state_machine(self) -> None:
        """IDLE -> CONNECTING (refused) -> BACKOFF -> CONNECTING -> HANDSHAKING -> UP -> BACKOFF (lost) ->
        CONNECTING -> DRAINING -> STOPPED; every step is in TRANSITIONS and nothing unexpected is logged."""
        endpoints = EndpointFactory("fail", "ok", default="hang")
        with capturedLogs() as events:
            svc = self.service(endpoints)
            self.reactor.advance(0.5)
            tunnel = endpoints.built[1].protocol
            self.assertIs(svc.state, LinkState.HANDSHAKING)
            FakeProxy(tunnel).handshake()
            self.assertIs(svc.state, LinkState.UP)
            tunnel.connectionLost(Failure(ierror.ConnectionLost()))
            self.assertIs(svc.state, LinkState.BACKOFF)
            self.reactor.advance(0.5)
            self.assertIs(svc.state, LinkState.CONNECTING)
            self.successResultOf(svc.stopService())
        self.assertEqual(svc.history, [
            LinkState.IDLE, LinkState.CONNECTING, LinkState.BACKOFF, LinkState.CONNECTING, LinkState.HANDSHAKING,
            LinkState.UP, LinkState.BACKOFF, LinkState.CONNECTING, LinkState.DRAINING, LinkState.STOPPED,
        ])
        for old, new in zip(svc.history, svc.history[1:], strict=False):
            self.assertIn(new, TRANSITIONS[old])
        self.assertFalse([e for e in events if "unexpected transition" in e.get("log_format", "")])
        self.assertTrue(svc.draining)

    def test_stop_service_says_goaway_and_closes_the_idle_tunnel(self) -> None:
        endpoints = EndpointFactory("ok")
        svc = self.service(endpoints)
        tunnel = endpoints.built[0].protocol
        proxy = FakeProxy(tunnel)
        proxy.handshake()
        done = svc.stopService()
        self.assertNoResult(done)
        events = proxy.exchange()
        self.assertEqual([(type(e), e.code) for e in events if isinstance(e, GoAwayReceived)],
                         [(GoAwayReceived, ErrorCode.SHUTTING_DOWN)])
        self.assertTrue(proxy.transport.disconnecting)
        tunnel.connectionLost(Failure(ierror.ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(endpoints.built), 1)


# ------------------------------------------------------------------------------------------------ backend dialer


@implementer(IStreamClientEndpoint)
class BackendEndpoint:
    """A backend connection the test completes by hand."""

    def __init__(self, rule: AccessRule, host: str, port: int) -> None:
        self.rule, self.host, self.port = rule, host, port
        self.deferred: Deferred[Any] = Deferred(lambda d: setattr(self, "cancelled", True))
        self.cancelled = False
        self.factory: IProtocolFactory | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.factory = factory
        return self.deferred

    def succeed(self) -> HalfCloseTransport:
        assert self.factory is not None
        protocol = self.factory.buildProtocol(IPv4Address("TCP", self.host, self.port))
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        self.deferred.callback(protocol)
        return transport


class BackendDialerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.audit: list[str] = []
        self.endpoints: list[BackendEndpoint] = []
        self.config = make_config()
        factory = EndpointFactory("ok")
        self.service = ConnectorService(self.reactor, self.config, factory, audit_writer=self.audit.append)
        self.service.startService()
        self.tunnel: ConnectorTunnel = factory.built[0].protocol
        self.proxy = FakeProxy(self.tunnel)
        self.proxy.handshake()

    def use_fake_backends(self) -> None:
        def endpoint_for(rule: AccessRule, host: str, port: int) -> BackendEndpoint:
            endpoint = BackendEndpoint(rule, host, port)
            self.endpoints.append(endpoint)
            return endpoint

        self.service.dialer = BackendDialer(self.reactor, self.config, endpoint_for=endpoint_for,
                                            audit_writer=self.audit.append)

    def resets(self) -> list[tuple[int, ErrorCode]]:
        return [(e.stream_id, e.code) for e in self.proxy.events if isinstance(e, StreamReset)]

    def test_no_rule_is_access_denied_and_audited(self) -> None:
        stream_id = self.proxy.open("secret.internal", 22)
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.ACCESS_DENIED)])
        (reset,) = [e for e in self.proxy.events if isinstance(e, StreamReset)]
        self.assertIn("secret.internal:22", reset.reason)
        self.assertEqual(self.tunnel.streams, {})
        self.assertEqual(len(self.audit), 1)
        self.assertIn("access denied", self.audit[0])
        self.assertIn("secret.internal", self.audit[0])
        self.assertIn("no access control rule", self.audit[0])

    def test_tcp_stream_to_an_http_mapping_is_access_denied(self) -> None:
        stream_id = self.proxy.open("web.internal", 80, kind="tcp")
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.ACCESS_DENIED)])
        self.assertIn("HTTP mapping does not allow tcp streams", self.audit[0])

    def test_allowed_stream_connects_to_the_internal_host_then_accepts(self) -> None:
        self.use_fake_backends()
        stream_id = self.proxy.open("ERP.internal", 443)
        (endpoint,) = self.endpoints
        self.assertEqual((endpoint.host, endpoint.port), ("10.1.1.1", 8443))
        self.assertFalse([e for e in self.proxy.events if isinstance(e, StreamAccepted)])  # not before the backend
        self.assertIn("access allowed", self.audit[0])
        backend = endpoint.succeed()
        events = self.proxy.exchange()
        self.assertIn(StreamAccepted(stream_id), events)
        self.proxy.session.send_data(stream_id, b"GET / HTTP/1.0\r\n\r\n")
        self.proxy.exchange()
        self.assertEqual(backend.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.tunnel.streams[stream_id].protocol.peer.dataReceived(b"HTTP/1.0 200 OK\r\n")
        events = self.proxy.exchange()
        self.assertIn(DataReceived(stream_id, b"HTTP/1.0 200 OK\r\n"), events)
        self.assertEqual(self.tunnel.pending_connects, {})

    def test_backend_refused_resets_with_connect_refused(self) -> None:
        self.use_fake_backends()
        stream_id = self.proxy.open()
        self.endpoints[0].deferred.errback(ierror.ConnectionRefusedError("10.1.1.1:8443"))
        self.proxy.exchange()
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.CONNECT_REFUSED)])
        self.assertEqual(self.tunnel.streams, {})
        self.assertEqual(self.tunnel.pending_connects, {})

    def test_backend_timeout_resets_with_connect_timeout(self) -> None:
        self.use_fake_backends()
        stream_id = self.proxy.open()
        self.reactor.advance(self.config.backend.connect_timeout_seconds + 1.0)
        self.assertTrue(self.endpoints[0].cancelled)
        self.proxy.exchange()
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.CONNECT_TIMEOUT)])

    def test_tunnel_loss_cancels_backend_connects(self) -> None:
        self.use_fake_backends()
        self.proxy.open()
        self.tunnel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertTrue(self.endpoints[0].cancelled)
        self.assertEqual(self.tunnel.pending_connects, {})

    def test_stream_reset_while_connecting_closes_the_late_backend(self) -> None:
        self.use_fake_backends()
        stream_id = self.proxy.open()
        self.proxy.session.reset_stream(stream_id, ErrorCode.CANCEL, "client gone")
        self.proxy.exchange()
        backend = self.endpoints[0].succeed()
        self.assertTrue(backend.disconnecting)
        self.assertEqual([e for e in self.proxy.exchange() if isinstance(e, StreamAccepted)], [])


class ResetCodeTests(SynchronousTestCase):
    def test_mapping(self) -> None:
        cases: list[tuple[BaseException, ErrorCode]] = [
            (ierror.ConnectionRefusedError(), ErrorCode.CONNECT_REFUSED),
            (ierror.TimeoutError(), ErrorCode.CONNECT_TIMEOUT),
            (DeferredTimeoutError(), ErrorCode.CONNECT_TIMEOUT),
            (CancelledError(), ErrorCode.CONNECT_TIMEOUT),
            (ierror.DNSLookupError("no.such.host"), ErrorCode.HOST_UNREACHABLE),
            (ierror.NoRouteError(), ErrorCode.HOST_UNREACHABLE),
            (SSL.Error([("SSL routines", "", "certificate verify failed")]), ErrorCode.TLS_ERROR),
            (ValueError("anything else"), ErrorCode.HOST_UNREACHABLE),
        ]
        for exc, code in cases:
            self.assertEqual(reset_code_for(Failure(exc)), code, exc)


class ServiceWiringTests(SynchronousTestCase):
    def test_service_dialer_audits_through_the_service_writer(self) -> None:
        lines: list[str] = []
        svc = ConnectorService(MemoryReactorClock(), make_config(), EndpointFactory(), audit_writer=lines.append)
        self.assertIsInstance(svc.dialer, BackendDialer)
        svc.dialer.audit_writer("x")  # type: ignore[misc]
        self.assertEqual(lines, ["x"])
