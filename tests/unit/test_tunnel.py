"""Protocol tests of the tunnel glue: a :class:`ProxyTunnel` and a dialer :class:`TunnelConnection`, back to back.

The two ends talk through :mod:`twisted.test.iosim` (``FakeTransport`` + ``IOPump``) on a shared
:class:`twisted.internet.task.Clock`: no sockets, no real time, no reactor. The proxy end reads the connector's
identity from a real connector certificate (minted by :func:`connproxy.testing.mint_test_pki`) that the fake TLS
transport returns from ``getPeerCertificate``. Streams are glued to :class:`connproxy.relay.Relay` pairs on
``StringTransport`` "sockets", as the SOCKS front end and the connector's backend side do.
"""

from __future__ import annotations

import functools
from typing import Any

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from connproxy.pki.certs import ConnectorIdentity
from connproxy.proxy import tunnel_listener as server_module
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.tunnel_listener import ProxyTunnel, ProxyTunnelFactory
from connproxy.relay import Relay, RelayFactory, link
from connproxy.testing import TestPKI, mint_test_pki
from connproxy.tunnel.connection import TunnelConnection, TunnelTimers
from connproxy.tunnel.errors import OpenTimeoutError, StreamRefusedError, StreamResetError, TunnelLostError
from connproxy.tunnel.stream import TunnelStream
from connproxy.wire import frames as f
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import GoAwayReceived, HelloReceived, OpenRequest, StreamReset
from connproxy.wire.session import Role, Session, Settings
from tests.doubles import HalfCloseTransport

#: Small windows so flow control is reached with a few KiB.
SMALL = Settings(stream_window=32768, connection_window=131072, max_frame=16384, max_streams=64)
TIMERS = TunnelTimers(ping_interval=10.0, dead_after=30.0, open_timeout=15.0, handshake_timeout=15.0)
CONNECTOR_ADDR = IPv4Address("TCP", "10.0.0.7", 51514)
HELLO: dict[str, Any] = {"connector_id": "host-a", "subaccount": "tenant-a", "location": "loc-1"}
TARGET = OpenRequest("erp.internal", 443, "tcp", {"tenant": "tenant-a", "client": "10.9.9.9:5000"})


@functools.cache
def pki() -> TestPKI:
    return mint_test_pki()


@functools.cache
def connector_cert(subaccount: str, location: str | None = None) -> crypto.X509:
    pem, _key = pki().connector(subaccount, location)
    return crypto.X509.from_cryptography(x509.load_pem_x509_certificate(pem))


# ------------------------------------------------------------------------------------------------ doubles


class TLSFakeTransport(iosim.FakeTransport):
    """A ``FakeTransport`` with the TLS transport's ``getPeerCertificate`` (pyOpenSSL ``X509`` or ``None``)."""

    def __init__(self, protocol: Any, isServer: bool, peer_cert: crypto.X509 | None, **kwargs: Any) -> None:
        super().__init__(protocol, isServer, **kwargs)
        self.peer_cert = peer_cert

    def getPeerCertificate(self) -> crypto.X509 | None:
        return self.peer_cert


class Dialer(TunnelConnection):
    """A minimal connector end: sends HELLO on connect and records what the proxy does."""

    def __init__(self, clock: Clock, hello: dict[str, Any] | None = None, send_hello: bool = True) -> None:
        super().__init__(Role.DIALER, SMALL, clock, TIMERS)
        self.hello_fields = dict(HELLO if hello is None else hello)
        self.send_hello_on_connect = send_hello
        self.hellos: list[HelloReceived] = []
        self.opened: list[TunnelStream] = []
        self.goaways: list[GoAwayReceived] = []
        self.resets: list[StreamReset] = []
        self.lost_reasons: list[Failure | None] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.send_hello_on_connect:
            self.session.send_hello(self.hello_fields)
            self._flush()

    def hello_received(self, event: HelloReceived) -> None:
        self.handshake_done()
        self.hellos.append(event)

    def stream_opened(self, stream: TunnelStream) -> None:
        self.opened.append(stream)  # the test accepts or refuses it

    def goaway_received(self, event: GoAwayReceived) -> None:
        self.goaways.append(event)

    def _on_reset(self, event: StreamReset) -> None:
        self.resets.append(event)
        super()._on_reset(event)

    def tunnel_lost(self, reason: Failure | None) -> None:
        self.lost_reasons.append(reason)


class Recorder(Protocol):
    """Records what a stream delivers."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


def decode(chunks: list[bytes]) -> list[f.RawFrame]:
    """Frames in bytes a tunnel end wrote (after the handshake: no preface)."""
    return f.FrameDecoder(1 << 20).feed(b"".join(chunks))


def types_of(frames: list[f.RawFrame]) -> list[int]:
    return [fr.frame_type for fr in frames]


class TunnelPair:
    """A proxy end and a dialer end connected with iosim on a shared clock."""

    def __init__(
        self,
        clock: Clock | None = None,
        factory: ProxyTunnelFactory | None = None,
        cert: crypto.X509 | None | str = "default",
        hello: dict[str, Any] | None = None,
        greet: bool = True,
    ) -> None:
        self.clock = clock or Clock()
        self.audit: list[str] = []
        self.factory = factory or ProxyTunnelFactory(
            ConnectorRegistry(), self.clock, settings=SMALL, timers=TIMERS, replica_id="proxy-0",
            audit_writer=self.audit.append,
        )
        self.registry = self.factory.registry
        self.proxy: ProxyTunnel = self.factory.buildProtocol(CONNECTOR_ADDR)
        self.dialer = Dialer(self.clock, hello)
        peer_cert = connector_cert("tenant-a") if cert == "default" else cert
        self.proxy_io = TLSFakeTransport(self.proxy, True, peer_cert, peerAddress=CONNECTOR_ADDR)
        self.dialer_io = iosim.FakeTransport(self.dialer, False)
        self.pump = iosim.connect(self.proxy, self.proxy_io, self.dialer, self.dialer_io, clock=self.clock,
                                  greet=greet)

    def flush(self) -> None:
        self.pump.flush()

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let time pass, moving bytes both ways after every step."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def relayed_stream(self) -> RelayedStream:
        """Open a stream from the proxy, accept it on the dialer, glue both ends to relays on fake sockets."""
        return RelayedStream(self)


class RelayedStream:
    """client socket <-> Relay <-> proxy TunnelStream ==tunnel== dialer TunnelStream <-> Relay <-> backend socket"""

    def __init__(self, pair: TunnelPair) -> None:
        self.client = Relay()
        self.client_t = HalfCloseTransport()
        self.client.makeConnection(self.client_t)
        d = pair.proxy.open_stream(TARGET, RelayFactory(self.client))
        pair.flush()
        self.dialer_stream = pair.dialer.opened[-1]
        self.near, self.far = Relay(), Relay()
        link(self.near, self.far)
        self.backend_t = HalfCloseTransport()
        self.far.makeConnection(self.backend_t)
        pair.dialer.accept(self.dialer_stream, self.near)
        pair.flush()
        self.proxy_relay: Relay = d.result  # fired synchronously by the ACCEPT
        assert isinstance(self.proxy_relay, Relay)
        self.proxy_stream = self.proxy_relay.transport
        assert isinstance(self.proxy_stream, TunnelStream)
        self.stream_id = self.proxy_stream.stream_id


# ------------------------------------------------------------------------------------------------ tests


class HandshakeTests(SynchronousTestCase):
    def test_handshake_registers_the_connector(self) -> None:
        pair = TunnelPair()
        self.assertTrue(pair.proxy.session.ready)
        self.assertTrue(pair.dialer.session.ready)
        self.assertEqual(len(pair.dialer.hellos), 1)
        hello = pair.dialer.hellos[0].hello
        self.assertEqual(hello["tunnel_id"], "account:///tenant-a")
        self.assertEqual(hello["replica_id"], "proxy-0")
        self.assertEqual(hello["version"], 1)
        self.assertEqual((pair.proxy.tenant, pair.proxy.location, pair.proxy.connector_id),
                         ("tenant-a", "loc-1", "host-a"))
        self.assertIs(pair.registry.pick("tenant-a", "loc-1"), pair.proxy)
        self.assertTrue(pair.proxy.routable)
        self.assertEqual(len(pair.audit), 1)
        self.assertIn("tunnel handshake success", pair.audit[0])
        self.assertIn("host-a", pair.audit[0])
        # The handshake timer is gone: nothing closes the tunnel when it would have fired.
        pair.advance(TIMERS.handshake_timeout + 1)
        self.assertFalse(pair.proxy.lost or pair.dialer.lost)

    def test_location_bound_by_the_certificate_is_used(self) -> None:
        pair = TunnelPair(cert=connector_cert("tenant-a", "loc-9"), hello={"connector_id": "c", "subaccount": "tenant-a"})
        self.assertEqual(pair.proxy.location, "loc-9")
        self.assertIs(pair.registry.pick("tenant-a", "loc-9"), pair.proxy)

    def assertRefused(self, pair: TunnelPair, reason_part: str) -> None:
        self.assertEqual([g.code for g in pair.dialer.goaways], [ErrorCode.AUTH_FAILED])
        self.assertIn(reason_part, pair.dialer.goaways[0].reason)
        self.assertEqual(pair.registry.count(), 0)
        self.assertEqual(len(pair.audit), 1)
        self.assertIn("tunnel handshake failure", pair.audit[0])
        self.assertIn(reason_part, pair.audit[0])
        self.assertTrue(pair.proxy.lost)
        self.assertTrue(pair.dialer.lost)
        self.assertFalse(pair.dialer.session.ready)
        self.assertEqual(pair.clock.getDelayedCalls(), [])  # no timer leaks on either end

    def test_subaccount_mismatch_is_refused_and_audited(self) -> None:
        pair = TunnelPair(cert=connector_cert("tenant-b"))
        self.assertRefused(pair, "certificate binds subaccount 'tenant-b'")

    def test_location_mismatch_is_refused(self) -> None:
        pair = TunnelPair(cert=connector_cert("tenant-a", "loc-2"))
        self.assertRefused(pair, "certificate binds location 'loc-2'")

    def test_missing_certificate_is_refused(self) -> None:
        pair = TunnelPair(cert=None)
        self.assertRefused(pair, "client certificate required")

    def test_missing_connector_id_is_refused(self) -> None:
        pair = TunnelPair(hello={"subaccount": "tenant-a"})
        self.assertRefused(pair, "connector_id")

    def test_dialer_handshake_timeout_closes(self) -> None:
        clock = Clock()
        dialer = Dialer(clock)
        silent = Protocol()
        dialer_io, silent_io = iosim.FakeTransport(dialer, False), iosim.FakeTransport(silent, True)
        pump = iosim.connect(silent, silent_io, dialer, dialer_io, clock=clock)
        clock.advance(TIMERS.handshake_timeout - 0.1)
        pump.flush()
        self.assertFalse(dialer_io.disconnecting)
        clock.advance(0.1)
        self.assertTrue(dialer_io.disconnecting)
        goaways = [fr for fr in decode(dialer_io.stream) if fr.frame_type == f.FrameType.GOAWAY]
        self.assertEqual(len(goaways), 1)
        self.assertEqual(f.GOAWAY_HEAD.unpack_from(goaways[0].payload)[1], ErrorCode.HANDSHAKE_TIMEOUT)
        pump.flush()
        self.assertTrue(dialer.lost)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_proxy_handshake_timeout_closes(self) -> None:
        clock = Clock()
        factory = ProxyTunnelFactory(ConnectorRegistry(), clock, settings=SMALL, timers=TIMERS)
        proxy = factory.buildProtocol(CONNECTOR_ADDR)
        mute = Protocol()  # connects and never sends a byte
        proxy_io = TLSFakeTransport(proxy, True, connector_cert("tenant-a"), peerAddress=CONNECTOR_ADDR)
        pump = iosim.connect(proxy, proxy_io, mute, iosim.FakeTransport(mute, False), clock=clock)
        clock.advance(TIMERS.handshake_timeout - 0.1)
        self.assertFalse(proxy_io.disconnecting)
        clock.advance(0.1)
        self.assertTrue(proxy_io.disconnecting)
        pump.flush()
        self.assertTrue(proxy.lost)
        self.assertEqual(factory.registry.count(), 0)
        self.assertNotIn(proxy, factory.tunnels)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_preface_split_and_identity_from_peer_identity(self) -> None:
        """The listener sniffs the preface even when it arrives byte by byte; identity via ``peer_identity``."""
        calls: list[object] = []

        def fake_identity(transport: object) -> ConnectorIdentity:
            calls.append(transport)
            return ConnectorIdentity("tenant-a", None)

        self.patch(server_module, "peer_identity", fake_identity)
        clock = Clock()
        factory = ProxyTunnelFactory(ConnectorRegistry(), clock, settings=SMALL, timers=TIMERS)
        proxy = factory.buildProtocol(CONNECTOR_ADDR)
        transport = StringTransport()
        proxy.makeConnection(transport)
        dialer = Session(Role.DIALER, SMALL)
        dialer.send_hello(HELLO)
        for i, byte in enumerate(b"".join(dialer.take_output())):
            proxy.dataReceived(bytes([byte]))
            if i < len(f.PREFACE) - 1:
                self.assertIsNone(proxy._mode)
        self.assertEqual(calls, [transport])
        self.assertIs(factory.registry.pick("tenant-a", "loc-1"), proxy)
        events = dialer.receive_data(transport.value())
        self.assertIsInstance(events[0], HelloReceived)

    def test_http_health_check_on_the_tunnel_port(self) -> None:
        factory = ProxyTunnelFactory(ConnectorRegistry(), Clock(), settings=SMALL, timers=TIMERS)
        proxy = factory.buildProtocol(CONNECTOR_ADDR)
        transport = StringTransport()
        proxy.makeConnection(transport)
        proxy.dataReceived(b"GET /healthcheck HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertTrue(transport.value().endswith(b"OK\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.registry.count(), 0)


    def test_incomplete_http_request_on_the_tunnel_port_gets_408_and_no_tunnel_frames(self) -> None:
        clock = Clock()
        factory = ProxyTunnelFactory(ConnectorRegistry(), clock, settings=SMALL, timers=TIMERS)
        proxy = factory.buildProtocol(CONNECTOR_ADDR)
        transport = StringTransport()
        proxy.makeConnection(transport)
        proxy.dataReceived(b"GET /healthcheck HTTP/1.1\r\nHost: pro")
        clock.advance(TIMERS.handshake_timeout - 0.1)
        self.assertEqual(transport.value(), b"")  # no PING frames on an HTTP connection
        clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])


class ControlBacklogTests(SynchronousTestCase):
    def test_peer_that_does_not_read_but_floods_pings_is_aborted(self) -> None:
        pair = TunnelPair()
        pair.flush()
        self.assertTrue(pair.proxy.session.ready)
        pair.proxy.pauseProducing()  # the connector stopped reading: our transport is full
        ping = f.frame(f.FrameType.PING, 0, 0, b"12345678")
        aborted = False
        for _ in range(200):
            pair.proxy.dataReceived(ping * 1000)  # each provokes a 17-byte PING ACK
            if pair.proxy_io.disconnecting or getattr(pair.proxy_io, "aborted", False):
                aborted = True
                break
        self.assertTrue(aborted, "a peer flooding control frames while not reading must be cut off")


class KeepaliveTests(SynchronousTestCase):
    def test_pings_every_interval_and_measures_rtt(self) -> None:
        pair = TunnelPair()
        self.assertIsNone(pair.proxy.rtt)
        pair.clock.advance(TIMERS.ping_interval - 0.1)
        self.assertNotIn(f.FrameType.PING, types_of(decode(pair.proxy_io.stream)))
        pair.clock.advance(0.1)
        for io in (pair.proxy_io, pair.dialer_io):
            pings = [fr for fr in decode(io.stream) if fr.frame_type == f.FrameType.PING]
            self.assertEqual(len(pings), 1)
            self.assertFalse(pings[0].flags & f.FLAG_ACK)
        pair.clock.advance(0.25)  # the network takes 250 ms
        pair.flush()
        self.assertAlmostEqual(pair.proxy.rtt, 0.25)
        self.assertAlmostEqual(pair.dialer.rtt, 0.25)
        pair.clock.advance(TIMERS.ping_interval - 0.25)
        self.assertIn(f.FrameType.PING, types_of(decode(pair.proxy_io.stream)))
        pair.clock.advance(0.5)
        pair.flush()
        self.assertAlmostEqual(pair.proxy.rtt, 0.5)

    def test_live_tunnel_stays_up(self) -> None:
        pair = TunnelPair()
        pair.advance(3 * TIMERS.dead_after)
        self.assertFalse(pair.proxy.lost or pair.dialer.lost)
        self.assertFalse(pair.proxy_io.disconnecting or pair.dialer_io.disconnecting)

    def test_silent_peer_is_closed_when_dead_after_passes(self) -> None:
        pair = TunnelPair()
        start = pair.clock.seconds()
        closed_at = None
        while pair.clock.seconds() - start < TIMERS.dead_after + 2 * TIMERS.ping_interval:
            pair.clock.advance(0.5)
            # Only proxy -> dialer moves: the dialer's bytes (pings, ping answers) never reach the proxy.
            data = pair.proxy_io.getOutBuffer()
            if data:
                pair.dialer_io.bufferReceived(data)
            pair.dialer_io.getOutBuffer()
            if pair.proxy_io.disconnecting:
                closed_at = pair.clock.seconds() - start
                break
        assert closed_at is not None, "the proxy never noticed the silent connector"
        # Closed as soon as nothing has arrived for dead_after (not on the next ping tick): the connection's last
        # byte came in at the start, and the clock moves in 0.5 s steps.
        self.assertGreaterEqual(closed_at, TIMERS.dead_after)
        self.assertLessEqual(closed_at, TIMERS.dead_after + 0.5)
        self.assertFalse(pair.dialer.lost)
        pair.flush()
        self.assertEqual(pair.dialer.goaways[-1].code, ErrorCode.KEEPALIVE_TIMEOUT)
        self.assertTrue(pair.proxy.lost)
        self.assertTrue(pair.dialer.lost)
        self.assertEqual(pair.registry.count(), 0)


class OpenStreamTests(SynchronousTestCase):
    def test_accept_fires_with_the_protocol_attached(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        self.assertNoResult(d)
        pair.flush()
        self.assertEqual(len(pair.dialer.opened), 1)
        stream = pair.dialer.opened[0]
        self.assertEqual(stream.stream_id % 2, 0)  # the listener opens even IDs
        self.assertEqual(stream.request, TARGET)
        self.assertNoResult(d)
        remote = Recorder()
        pair.dialer.accept(stream, remote)
        pair.flush()
        proto = self.successResultOf(d)
        self.assertIsInstance(proto, Recorder)
        self.assertIs(proto.transport, pair.proxy.streams[stream.stream_id])
        proto.transport.write(b"hello")
        remote.transport.write(b"world")
        pair.flush()
        self.assertEqual(remote.received, b"hello")
        self.assertEqual(proto.received, b"world")
        self.assertEqual(pair.proxy.load, 1)

    def test_reset_fails_with_stream_refused_and_the_code(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        stream = pair.dialer.opened[0]
        pair.dialer.reset_stream(stream.stream_id, ErrorCode.ACCESS_DENIED, "no rule for erp.internal:443")
        stream.reset(ErrorCode.ACCESS_DENIED, "no rule")
        pair.flush()
        failure = self.failureResultOf(d, StreamRefusedError)
        self.assertEqual(failure.value.code, ErrorCode.ACCESS_DENIED)
        self.assertEqual(failure.value.reason, "no rule for erp.internal:443")
        self.assertEqual(pair.proxy.streams, {})
        self.assertEqual(pair.proxy.load, 0)
        # The open timer is gone with it.
        pair.advance(TIMERS.open_timeout + 1)
        self.assertEqual(pair.dialer.resets, [])

    def test_open_timeout_fails_and_resets_with_cancel(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.advance(TIMERS.open_timeout - 0.5, step=0.5)
        self.assertNoResult(d)
        pair.advance(0.5)
        self.failureResultOf(d, OpenTimeoutError)
        stream_id = pair.dialer.opened[0].stream_id
        self.assertEqual([(r.stream_id, r.code) for r in pair.dialer.resets], [(stream_id, ErrorCode.CANCEL)])
        self.assertEqual(pair.proxy.streams, {})
        self.assertEqual(pair.dialer.streams, {})
        self.assertFalse(pair.proxy.lost)

    def test_cancel_resets_with_cancel(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        pair.flush()
        stream_id = pair.dialer.opened[0].stream_id
        self.assertEqual([(r.stream_id, r.code) for r in pair.dialer.resets], [(stream_id, ErrorCode.CANCEL)])
        self.assertEqual(pair.proxy.streams, {})
        # A late ACCEPT-less timeout does not fire again, and the tunnel is fine.
        pair.advance(TIMERS.open_timeout + 1)
        self.assertEqual(len(pair.dialer.resets), 1)
        self.assertFalse(pair.proxy.lost)

    def test_open_before_handshake_is_refused(self) -> None:
        pair = TunnelPair(greet=False)
        failure = self.failureResultOf(pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder)),
                                       StreamRefusedError)
        self.assertEqual(failure.value.code, ErrorCode.REFUSED_STREAM)

    def test_tunnel_lost_fails_pending_opens_and_closes_open_streams(self) -> None:
        pair = TunnelPair()
        open_d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        remote = Recorder()
        pair.dialer.accept(pair.dialer.opened[0], remote)
        pair.flush()
        local = self.successResultOf(open_d)
        pending = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        self.assertNoResult(pending)
        pair.proxy_io.disconnectReason = ConnectionLost("network gone")
        pair.proxy_io.loseConnection()
        pair.flush()
        self.failureResultOf(pending, TunnelLostError)
        self.assertIsNotNone(local.lost)
        self.assertTrue(local.lost.check(StreamResetError))
        self.assertIsNotNone(remote.lost)
        self.assertTrue(pair.proxy.lost and pair.dialer.lost)
        self.assertEqual(pair.proxy.streams, {})
        self.assertEqual(pair.registry.count(), 0)
        self.successResultOf(pair.proxy.closed)
        self.assertEqual(pair.clock.getDelayedCalls(), [])
        self.assertNotIn(pair.proxy, pair.factory.tunnels)


class FlowControlTests(SynchronousTestCase):
    def test_credit_is_returned_while_the_consumer_reads(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        self.assertEqual(pair.proxy.session.send_window(s.stream_id), SMALL.stream_window)
        s.client.dataReceived(b"a" * SMALL.max_frame)
        self.assertEqual(pair.proxy.session.send_window(s.stream_id), SMALL.stream_window - SMALL.max_frame)
        pair.flush()
        self.assertEqual(s.backend_t.value(), b"a" * SMALL.max_frame)
        self.assertEqual(pair.proxy.session.send_window(s.stream_id), SMALL.stream_window)

    def test_paused_consumer_stalls_the_sender_and_resume_releases_it(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        # The glue: each socket is the streaming producer of the stream it feeds, and vice versa.
        self.assertIs(s.backend_t.producer, s.dialer_stream)
        self.assertIs(s.client_t.producer, s.proxy_stream)
        # The backend socket's buffer is full: it pauses the stream feeding it.
        s.backend_t.producer.pauseProducing()
        total = SMALL.stream_window + 7232
        s.client.dataReceived(b"x" * total)
        # The sender could only send one window; the client socket is paused for the rest.
        self.assertEqual(s.client_t.producerState, "paused")
        pair.flush()
        self.assertEqual(len(s.backend_t.value()), SMALL.stream_window)
        # Received, but not acknowledged: the sender's window stays empty.
        self.assertEqual(pair.proxy.session.send_window(s.stream_id), 0)
        self.assertEqual(s.client_t.producerState, "paused")
        pair.advance(TIMERS.ping_interval)  # pings come and go, still no credit
        self.assertEqual(pair.proxy.session.send_window(s.stream_id), 0)
        # The backend drains: the credit goes back and the client socket is resumed.
        s.backend_t.producer.resumeProducing()
        pair.flush()
        self.assertEqual(s.client_t.producerState, "producing")
        self.assertEqual(s.backend_t.value(), b"x" * total)

    def test_congested_tunnel_buffers_stream_writes_and_resume_flushes(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        pair.proxy.pauseProducing()  # the tunnel socket's buffer is full
        self.assertTrue(pair.proxy.congested)
        s.client.dataReceived(b"held back")
        self.assertEqual(s.client_t.producerState, "paused")
        self.assertNotIn(f.FrameType.DATA, types_of(decode(pair.proxy_io.stream)))
        # Control frames still go out while congested.
        pair.clock.advance(TIMERS.ping_interval)
        self.assertEqual(types_of(decode(pair.proxy_io.stream)), [f.FrameType.PING])
        pair.flush()
        self.assertEqual(s.backend_t.value(), b"")
        pair.proxy.resumeProducing()
        self.assertFalse(pair.proxy.congested)
        self.assertEqual(s.client_t.producerState, "producing")
        pair.flush()
        self.assertEqual(s.backend_t.value(), b"held back")

    def test_producer_registered_while_congested_is_paused_at_once(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        pair.dialer.accept(pair.dialer.opened[0], Recorder())
        pair.flush()
        stream = self.successResultOf(d).transport
        pair.proxy.pauseProducing()
        producer = StringTransport()
        stream.registerProducer(producer, True)
        self.assertEqual(producer.producerState, "paused")
        pair.proxy.resumeProducing()
        self.assertEqual(producer.producerState, "producing")

    def test_stream_accepted_while_congested_keeps_its_client_paused(self) -> None:
        """The ACCEPT arrives while the tunnel socket is congested: the relay's wiring must not leave the
        client socket reading into an unbounded stream buffer."""
        pair = TunnelPair()
        client = Relay()
        client_t = HalfCloseTransport()
        client.makeConnection(client_t)
        client_t.pauseProducing()  # the SOCKS front end pauses the client while connecting
        client.dataReceived(b"early")
        d = pair.proxy.open_stream(TARGET, RelayFactory(client))
        pair.flush()
        backend = Recorder()
        pair.proxy.pauseProducing()
        pair.dialer.accept(pair.dialer.opened[0], backend)
        pair.flush()
        self.successResultOf(d)
        # The early data waits in the congested stream. The relay's wiring resumes the client socket, so at most
        # one more read arrives; it must pause the client again (it used to leave it reading without bound).
        client.dataReceived(b"x" * 65536)
        self.assertEqual(client_t.producerState, "paused")
        self.assertEqual(backend.received, b"")
        pair.proxy.resumeProducing()
        pair.flush()
        self.assertEqual(client_t.producerState, "producing")
        self.assertEqual(backend.received, b"early" + b"x" * 65536)


def stall_timers(pair: TunnelPair) -> list[Any]:
    return [c for c in pair.clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_stall_expired"]


class StallTests(SynchronousTestCase):
    """Spec 3.4.2: a stream that waits without progress for the stall timeout is reset STREAM_STALLED and the
    connections it relays to are aborted; progress restarts the wait."""

    def stalled_upload(self) -> tuple[TunnelPair, RelayedStream]:
        pair = TunnelPair()
        # The proxy's timer fires first (the connector's would reset the stream from its side just the same).
        pair.dialer.timers = TunnelTimers(stall_timeout=2 * TIMERS.stall_timeout)
        s = pair.relayed_stream()
        s.backend_t.producer.pauseProducing()  # the backend does not read
        s.client.dataReceived(b"x" * (SMALL.stream_window + 5000))  # more than a window: the rest waits
        pair.flush()
        self.assertTrue(s.dialer_stream.stalled and s.proxy_stream.stalled)
        return pair, s

    def test_a_stalled_stream_is_reset_and_its_connections_aborted(self) -> None:
        pair, s = self.stalled_upload()
        pair.advance(TIMERS.stall_timeout - 1)
        self.assertFalse(s.proxy_stream.closed)
        pair.advance(1)
        self.assertTrue(s.proxy_stream.closed and s.dialer_stream.closed)
        self.assertTrue(s.client_t.aborted and s.backend_t.aborted)  # cut short: aborted, not closed cleanly
        codes = {r.code for r in pair.dialer.resets}
        self.assertEqual(codes, {ErrorCode.STREAM_STALLED})
        self.assertEqual(pair.proxy.streams, {})
        self.assertEqual(pair.dialer.streams, {})
        self.assertFalse(pair.proxy.lost)  # the tunnel lives on
        self.assertEqual(stall_timers(pair), [])

    def test_progress_restarts_the_wait(self) -> None:
        pair, s = self.stalled_upload()
        pair.advance(TIMERS.stall_timeout - 1)
        s.backend_t.producer.resumeProducing()  # the backend reads a little
        pair.flush()
        s.backend_t.producer.pauseProducing()
        s.client.dataReceived(b"y" * (2 * SMALL.stream_window))
        pair.flush()
        pair.advance(TIMERS.stall_timeout - 1)
        self.assertFalse(s.proxy_stream.closed)
        self.assertEqual(pair.dialer.resets, [])
        pair.advance(1)
        self.assertTrue(s.proxy_stream.closed)

    def test_a_reader_that_keeps_up_is_never_stalled(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        for _ in range(5):
            s.client.dataReceived(b"z" * SMALL.stream_window)
            pair.advance(TIMERS.stall_timeout / 2)
        self.assertFalse(s.proxy_stream.closed)
        self.assertEqual(len(s.backend_t.value()), 5 * SMALL.stream_window)
        self.assertEqual(stall_timers(pair), [])


class BrokenProtocol(Protocol):
    def connectionMade(self) -> None:
        raise RuntimeError("injected in connectionMade")


class StreamFaultTests(SynchronousTestCase):
    """An exception while handling one stream resets it INTERNAL_ERROR; the tunnel and other streams go on."""

    def test_factory_failing_at_accept_fails_the_open_and_resets_the_stream(self) -> None:
        pair = TunnelPair()

        class BrokenFactory(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                raise RuntimeError("injected in buildProtocol")

        d = pair.proxy.open_stream(TARGET, BrokenFactory())
        pair.flush()
        stream = pair.dialer.opened[0]
        pair.dialer.accept(stream, Recorder())
        pair.flush()
        failure = self.failureResultOf(d, StreamRefusedError)
        self.assertEqual(failure.value.code, ErrorCode.INTERNAL_ERROR)
        self.assertEqual([r.code for r in pair.dialer.resets], [ErrorCode.INTERNAL_ERROR])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(pair.proxy.streams, {})
        self.assertEqual(pair.dialer.streams, {})
        self.assert_still_works(pair)

    def test_protocol_failing_when_accepted_resets_the_stream(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        stream = pair.dialer.opened[0]
        pair.dialer.accept(stream, BrokenProtocol())
        pair.flush()
        # The ACCEPT was out before the protocol failed: the opener's stream is then reset.
        proto = self.successResultOf(d)
        assert proto.lost is not None
        self.assertEqual(proto.lost.value.code, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(pair.dialer.streams, {})
        self.assert_still_works(pair)

    def test_receiving_protocol_failing_resets_only_its_stream(self) -> None:
        pair = TunnelPair()
        good = pair.relayed_stream()
        bad = pair.relayed_stream()

        def broken(data: bytes) -> None:
            raise ValueError("injected in dataReceived")

        bad.proxy_relay.dataReceived = broken  # type: ignore[method-assign]
        bad.far.dataReceived(b"to the client")
        good.far.dataReceived(b"fine")
        pair.flush()
        self.assertTrue(bad.proxy_stream.closed and bad.dialer_stream.closed)
        self.assertTrue(bad.backend_t.aborted)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(good.client_t.value(), b"fine")
        self.assertFalse(good.proxy_stream.closed)
        self.assertFalse(pair.proxy.lost)

    def assert_still_works(self, pair: TunnelPair) -> None:
        s = pair.relayed_stream()
        s.client.dataReceived(b"ping")
        pair.flush()
        self.assertEqual(s.backend_t.value(), b"ping")
        self.assertFalse(pair.proxy.lost)


class HalfCloseTests(SynchronousTestCase):
    def test_fin_each_way_through_the_glue(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        s.client.dataReceived(b"request")
        s.client.readConnectionLost()  # the client shut its write side
        pair.flush()
        self.assertEqual(s.backend_t.value(), b"request")
        self.assertEqual(s.backend_t.write_closed, 1)  # FIN passed on to the backend
        self.assertFalse(s.backend_t.disconnecting)
        self.assertFalse(s.proxy_stream.closed)
        # The answer still flows back after the client's FIN.
        s.far.dataReceived(b"response")
        pair.flush()
        self.assertEqual(s.client_t.value(), b"response")
        s.far.readConnectionLost()  # the backend is done too
        pair.flush()
        self.assertTrue(s.proxy_stream.closed)
        self.assertTrue(s.dialer_stream.closed)
        self.assertEqual(pair.proxy.streams, {})
        self.assertEqual(pair.dialer.streams, {})
        self.assertFalse(pair.proxy.session.has_stream(s.stream_id))
        self.assertFalse(pair.dialer.session.has_stream(s.stream_id))
        self.assertTrue(s.client_t.disconnecting)
        self.assertTrue(s.backend_t.disconnecting)
        self.assertEqual(pair.dialer.resets, [])
        self.assertFalse(pair.proxy.lost)


class ResetNormalTests(SynchronousTestCase):
    """Spec 3.3: RESET NORMAL is a graceful close only after the sender's FIN; before it, an abort."""

    def test_reset_normal_after_fin_is_an_orderly_end(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        remote = Recorder()
        pair.dialer.accept(pair.dialer.opened[0], remote)
        pair.flush()
        proto = self.successResultOf(d)
        remote.transport.write(b"all of it")
        remote.transport.loseConnection()  # FIN, then RESET NORMAL behind it: it will read nothing more
        pair.flush()
        self.assertEqual(proto.received, b"all of it")
        assert proto.lost is not None
        self.assertTrue(proto.lost.check(ConnectionDone))

    def test_reset_normal_before_fin_is_an_abort(self) -> None:
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        remote = Recorder()
        stream = pair.dialer.opened[0]
        pair.dialer.accept(stream, remote)
        pair.flush()
        proto = self.successResultOf(d)
        pair.dialer.reset_stream(stream.stream_id, ErrorCode.NORMAL, "gone")
        pair.flush()
        assert proto.lost is not None
        self.assertTrue(proto.lost.check(StreamResetError))


class GoAwayUnprocessedTests(SynchronousTestCase):
    def test_opens_past_the_goaway_fail_at_once_with_refused_stream(self) -> None:
        """Streams the peer never saw fail when its GOAWAY arrives, not after the open timeout."""
        pair = TunnelPair()
        seen = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        pair.dialer.drain(ErrorCode.SHUTTING_DOWN, "stopping")  # GOAWAY with last stream = the one it saw
        unseen = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        failure = self.failureResultOf(unseen, StreamRefusedError)
        self.assertEqual(failure.value.code, ErrorCode.REFUSED_STREAM)
        self.assertNoResult(seen)  # the stream it saw is still served
        self.assertEqual(len(pair.proxy.streams), 1)


class DrainTests(SynchronousTestCase):
    def test_drain_stops_routing_and_closes_after_the_last_stream(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        pair.proxy.drain()
        pair.flush()
        self.assertFalse(pair.proxy.routable)
        self.assertIsNone(pair.registry.pick("tenant-a", "loc-1"))
        self.assertEqual([g.code for g in pair.dialer.goaways], [ErrorCode.SHUTTING_DOWN])
        failure = self.failureResultOf(pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder)),
                                       StreamRefusedError)
        self.assertEqual(failure.value.code, ErrorCode.REFUSED_STREAM)
        # The existing stream is served to completion.
        self.assertFalse(pair.proxy_io.disconnecting)
        s.client.dataReceived(b"still served")
        pair.flush()
        self.assertEqual(s.backend_t.value(), b"still served")
        s.client.readConnectionLost()
        s.far.readConnectionLost()
        self.assertFalse(pair.proxy_io.disconnecting)
        pair.flush()
        self.assertTrue(pair.proxy.lost)
        self.assertTrue(pair.dialer.lost)
        self.assertEqual(pair.registry.count(), 0)

    def test_drain_without_streams_closes_at_once(self) -> None:
        pair = TunnelPair()
        pair.proxy.drain()
        self.assertTrue(pair.proxy_io.disconnecting)
        pair.flush()
        self.assertEqual([g.code for g in pair.dialer.goaways], [ErrorCode.SHUTTING_DOWN])
        self.assertTrue(pair.dialer.lost)

    def test_newer_tunnel_of_the_same_connector_replaces_the_old_one(self) -> None:
        old = TunnelPair()
        s = old.relayed_stream()
        new = TunnelPair(clock=old.clock, factory=old.factory)
        self.assertEqual(old.registry.tunnels(), [new.proxy])
        self.assertIs(old.registry.pick("tenant-a", "loc-1"), new.proxy)
        old.flush()
        self.assertEqual([g.code for g in old.dialer.goaways], [ErrorCode.REPLACED])
        self.assertEqual(new.dialer.goaways, [])
        # The old tunnel finishes its stream first.
        self.assertFalse(old.proxy_io.disconnecting)
        s.client.dataReceived(b"last words")
        old.flush()
        self.assertEqual(s.backend_t.value(), b"last words")
        s.proxy_stream.abortConnection()
        old.flush()
        self.assertTrue(old.proxy.lost)
        # Its late unregistration does not remove the new tunnel.
        self.assertEqual(old.registry.tunnels(), [new.proxy])
        self.assertFalse(new.proxy.lost)
        self.assertEqual(sum("tunnel handshake success" in line for line in old.audit), 2)

    def test_goaway_from_the_dialer_makes_the_proxy_unroutable(self) -> None:
        pair = TunnelPair()
        pair.dialer.session.go_away(ErrorCode.SHUTTING_DOWN, "connector stopping")
        pair.dialer._flush()
        pair.flush()
        self.assertFalse(pair.proxy.routable)
        self.assertIsNone(pair.registry.pick("tenant-a", "loc-1"))
        self.assertFalse(pair.proxy.lost)


class DeferredHygieneTests(SynchronousTestCase):
    def test_open_deferred_is_not_fired_twice_on_late_accept(self) -> None:
        """An ACCEPT that races the open timeout must not fire the Deferred again."""
        pair = TunnelPair()
        d = pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder))
        pair.flush()
        stream = pair.dialer.opened[0]
        pair.clock.advance(TIMERS.open_timeout)  # times out; the RESET CANCEL is not delivered yet
        self.failureResultOf(d, OpenTimeoutError)
        pair.dialer.accept(stream, Recorder())  # the ACCEPT crosses the RESET on the wire
        pair.flush()
        self.assertEqual(pair.proxy.streams, {})
        self.assertFalse(pair.proxy.lost)

    def test_builder_returning_none_is_refused(self) -> None:
        class NoProtocol(Factory):
            def buildProtocol(self, addr: object) -> None:  # type: ignore[override]
                return None

        pair = TunnelPair()
        d: Deferred[Protocol] = pair.proxy.open_stream(TARGET, NoProtocol())
        pair.flush()
        pair.dialer.accept(pair.dialer.opened[0], Recorder())
        pair.flush()
        failure = self.failureResultOf(d, StreamRefusedError)
        self.assertEqual(failure.value.code, ErrorCode.CANCEL)
        self.assertEqual(pair.proxy.streams, {})


class TunnelsPerIdentityTests(SynchronousTestCase):
    """``maxTunnelsPerIdentity`` in the handshake: GOAWAY ``TOO_MANY_TUNNELS``, audited; reconnects still replace."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.audit: list[str] = []
        self.factory = ProxyTunnelFactory(
            ConnectorRegistry(max_tunnels_per_identity=2), self.clock, settings=SMALL, timers=TIMERS,
            replica_id="proxy-0", audit_writer=self.audit.append,
        )

    def pair(self, connector_id: str, location: str = "loc-1") -> TunnelPair:
        return TunnelPair(self.clock, self.factory,
                          hello={"connector_id": connector_id, "subaccount": "tenant-a", "location": location})

    def test_third_connector_id_of_one_certificate_is_refused(self) -> None:
        first, second = self.pair("c1"), self.pair("c2", location="loc-2")
        self.assertTrue(first.proxy.routable and second.proxy.routable)
        third = self.pair("c3", location="loc-3")
        self.assertEqual([g.code for g in third.dialer.goaways], [ErrorCode.TOO_MANY_TUNNELS])
        self.assertIn("maxTunnelsPerIdentity=2", third.dialer.goaways[0].reason)
        self.assertTrue(third.proxy.lost and third.dialer.lost)
        self.assertFalse(third.dialer.session.ready)
        self.assertIsNone(self.factory.registry.pick("tenant-a", "loc-3"))
        self.assertEqual(self.factory.registry.count(), 2)
        self.assertIn("tunnel handshake failure", self.audit[-1])
        self.assertIn("maxTunnelsPerIdentity", self.audit[-1])
        self.assertIn("c3", self.audit[-1])
        self.assertFalse(first.proxy.lost or second.proxy.lost)

    def test_reconnect_at_the_limit_replaces_the_stale_tunnel(self) -> None:
        self.factory.replaced_grace = 7.0
        first, second = self.pair("c1"), self.pair("c2")
        stream = first.relayed_stream()  # keeps the replaced tunnel draining
        again = self.pair("c1")
        self.assertTrue(again.proxy.routable)
        self.assertEqual(again.dialer.goaways, [])
        first.flush()
        self.assertEqual([g.code for g in first.dialer.goaways], [ErrorCode.REPLACED])
        self.assertCountEqual(self.factory.registry.tunnels(), [second.proxy, again.proxy])
        self.assertFalse(first.proxy.lost)
        # The replaced tunnel's streams get ``replaced_grace`` seconds, then it is closed.
        first.advance(7.5)
        self.assertTrue(first.proxy.lost)
        self.assertIsNotNone(stream)
        self.assertFalse(again.proxy.lost or second.proxy.lost)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """A :class:`Recorder` that keeps writing after the peer's FIN (a request/response server)."""

    read_closed = False

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


class EarlyDataTests(SynchronousTestCase):
    """``open_stream(..., early, early_fin)``: the first bytes travel with the OPEN when the peer announced
    ``early-data`` (spec section 3.2), else at ACCEPT; either way they arrive once, in order, before later writes."""

    def open_with_early(self, pair: TunnelPair) -> Deferred[Protocol]:
        """Open with early bytes and FIN; from now on every write of the proxy end is kept in ``self.written``."""
        self.written: list[bytes] = []
        write = pair.proxy_io.write

        def keep(data: bytes) -> None:
            self.written.append(data)
            write(data)

        pair.proxy_io.write = keep  # type: ignore[method-assign]
        return pair.proxy.open_stream(TARGET, Factory.forProtocol(Recorder), b"GET / HTTP/1.1\r\n\r\n", True)

    def test_early_bytes_and_fin_follow_the_open_in_the_same_flight(self) -> None:
        pair = TunnelPair(hello={**HELLO, "capabilities": ["half-close", "early-data"]})
        d = self.open_with_early(pair)
        frames = decode(self.written)  # written before any ACCEPT came back
        self.assertEqual(types_of(frames), [f.FrameType.OPEN, f.FrameType.DATA, f.FrameType.DATA])
        self.assertEqual(frames[1].payload, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(frames[2].flags & f.FLAG_FIN, f.FLAG_FIN)
        pair.flush()
        remote = HalfCloseRecorder()
        pair.dialer.accept(pair.dialer.opened[0], remote)
        pair.flush()
        self.assertEqual(remote.received, b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(remote.read_closed)
        proto = self.successResultOf(d)
        self.assertIsInstance(proto, Recorder)
        remote.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        pair.flush()
        self.assertEqual(proto.received, b"HTTP/1.1 200 OK\r\n\r\n")

    def test_without_the_capability_the_bytes_wait_for_the_accept(self) -> None:
        pair = TunnelPair(hello={**HELLO, "capabilities": ["half-close"]})
        self.assertFalse(pair.proxy.session.peer_supports("early-data"))
        d = self.open_with_early(pair)
        self.assertEqual(types_of(decode(self.written)), [f.FrameType.OPEN])
        pair.flush()
        self.assertEqual(pair.dialer.opened[0].request, TARGET)
        self.written.clear()
        remote = HalfCloseRecorder()
        pair.dialer.accept(pair.dialer.opened[0], remote)
        pair.flush()
        proto = self.successResultOf(d)
        proto.transport.write(b"later")  # after the FIN: dropped by the stream, never sent ahead of the early bytes
        pair.flush()
        self.assertEqual(remote.received, b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(remote.read_closed)
        frames = decode(self.written)
        self.assertEqual(types_of(frames)[:2], [f.FrameType.DATA, f.FrameType.DATA])
        self.assertEqual(frames[1].flags & f.FLAG_FIN, f.FLAG_FIN)

    def test_refused_open_drops_the_early_bytes_with_the_stream(self) -> None:
        pair = TunnelPair(hello={**HELLO, "capabilities": ["half-close"]})
        d = self.open_with_early(pair)
        pair.flush()
        stream = pair.dialer.opened[0]
        pair.dialer.reset_stream(stream.stream_id, ErrorCode.REFUSED_STREAM, "busy")
        stream.reset(ErrorCode.REFUSED_STREAM, "busy")
        pair.flush()
        self.failureResultOf(d, StreamRefusedError)
        self.assertEqual(pair.proxy.streams, {})
