"""Unit tests for :mod:`connproxy.relay`: producer wiring, the pre-wiring backlog, half-close and teardown.

Only Twisted's in-memory test doubles: ``StringTransport`` and a small half-closeable subclass of it.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from connproxy.relay import MAX_BACKLOG, Relay, RelayFactory, describe_transport, link, unwire, wire


class HalfCloseStringTransport(StringTransport):
    """A ``StringTransport`` that also has ``loseWriteConnection`` (TCP's half-close) and records the order of
    producer unregistration and closing."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = 0
        self.aborted = False
        self.calls: list[str] = []
        self.producer_at_close: object = "not closed"

    def loseWriteConnection(self) -> None:
        self.write_closed += 1
        self.calls.append("loseWriteConnection")

    def unregisterProducer(self) -> None:
        self.calls.append("unregisterProducer")
        super().unregisterProducer()

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")
        if self.producer_at_close == "not closed":
            self.producer_at_close = self.producer
        super().loseConnection()

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")
        self.aborted = True
        super().abortConnection()


def connected_pair() -> tuple[Relay, HalfCloseStringTransport, Relay, HalfCloseStringTransport]:
    """Two linked relays, both connected (so wired)."""
    a, b = Relay(), Relay()
    link(a, b)
    ta, tb = HalfCloseStringTransport(), HalfCloseStringTransport()
    a.makeConnection(ta)
    b.makeConnection(tb)
    return a, ta, b, tb


class WiringTests(SynchronousTestCase):
    def test_not_wired_until_both_sides_connected(self) -> None:
        a, b = Relay(), Relay()
        link(a, b)
        ta = HalfCloseStringTransport()
        a.makeConnection(ta)
        self.assertFalse(a.wired)
        self.assertIsNone(ta.producer)

    def test_each_transport_is_the_others_streaming_producer(self) -> None:
        a, ta, b, tb = connected_pair()
        self.assertTrue(a.wired)
        self.assertTrue(b.wired)
        self.assertIs(ta.producer, tb)
        self.assertTrue(ta.streaming)
        self.assertIs(tb.producer, ta)
        self.assertTrue(tb.streaming)

    def test_wire_is_idempotent(self) -> None:
        a, ta, b, tb = connected_pair()
        wire(a, b)  # StringTransport would raise on a second registerProducer
        wire(b, a)
        self.assertIs(ta.producer, tb)

    def test_relay_factory_links_the_far_side(self) -> None:
        near = Relay()
        tn = HalfCloseStringTransport()
        near.makeConnection(tn)
        far = RelayFactory(near).buildProtocol(IPv4Address("TCP", "10.0.0.1", 80))
        self.assertIs(far.peer, near)
        self.assertIs(near.peer, far)
        tf = HalfCloseStringTransport()
        far.makeConnection(tf)
        self.assertTrue(near.wired)
        self.assertIs(tn.producer, tf)

    def test_relay_factory_builds_the_given_relay_class(self) -> None:
        class Upper(Relay):
            def forward(self, data: bytes) -> None:
                super().forward(data.upper())

        near = Relay()
        near.makeConnection(HalfCloseStringTransport())
        far = RelayFactory(near, Upper).buildProtocol(None)
        self.assertIsInstance(far, Upper)
        self.assertIs(far.peer, near)

    def test_forward_hook_sees_backlog_and_live_data(self) -> None:
        class Upper(Relay):
            def forward(self, data: bytes) -> None:
                super().forward(data.upper())

        a, b = Upper(), Relay()
        link(a, b)
        ta, tb = HalfCloseStringTransport(), HalfCloseStringTransport()
        a.makeConnection(ta)
        a.dataReceived(b"held ")
        b.makeConnection(tb)
        a.dataReceived(b"live")
        self.assertEqual(tb.value(), b"HELD LIVE")
        b.dataReceived(b"back")
        self.assertEqual(ta.value(), b"back")

    def test_unwire_drops_producers_and_links_without_closing(self) -> None:
        a, ta, b, tb = connected_pair()
        ta.pauseProducing()  # b's socket had paused a's
        unwire(a, b)
        self.assertFalse(a.wired or b.wired)
        self.assertIsNone(a.peer)
        self.assertIsNone(b.peer)
        self.assertIsNone(ta.producer)
        self.assertIsNone(tb.producer)
        self.assertFalse(ta.disconnecting or tb.disconnecting)
        self.assertEqual(ta.producerState, "paused")  # not resumed behind the owner's back
        # A later loss of one side no longer touches the other.
        a.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(tb.aborted or tb.disconnecting)
        # b can be wired to a new peer.
        c = Relay()
        link(b, c)
        tc = HalfCloseStringTransport()
        c.makeConnection(tc)
        self.assertIs(tb.producer, tc)
        b.dataReceived(b"next request")
        self.assertEqual(tc.value(), b"next request")

    def test_data_after_wiring_goes_straight_to_the_peer(self) -> None:
        a, ta, b, tb = connected_pair()
        a.dataReceived(b"ping")
        b.dataReceived(b"pong")
        self.assertEqual(tb.value(), b"ping")
        self.assertEqual(ta.value(), b"pong")

    def test_describe_transport(self) -> None:
        t = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4567))
        self.assertEqual(describe_transport(t), "10.1.2.3:4567")
        self.assertEqual(describe_transport(object()), "?")


class BacklogTests(SynchronousTestCase):
    def test_data_before_wiring_is_held_and_flushed_in_order(self) -> None:
        a, b = Relay(), Relay()
        link(a, b)
        ta, tb = HalfCloseStringTransport(), HalfCloseStringTransport()
        a.makeConnection(ta)
        a.dataReceived(b"one,")
        a.dataReceived(b"two,")
        a.dataReceived(b"")
        a.dataReceived(b"three")
        self.assertEqual(tb.value(), b"")
        b.makeConnection(tb)
        self.assertEqual(tb.value(), b"one,two,three")
        a.dataReceived(b",four")
        self.assertEqual(tb.value(), b"one,two,three,four")

    def test_backlog_at_the_limit_does_not_pause(self) -> None:
        a, b = Relay(), Relay()
        link(a, b)
        ta = HalfCloseStringTransport()
        a.makeConnection(ta)
        a.dataReceived(b"x" * MAX_BACKLOG)
        self.assertEqual(ta.producerState, "producing")

    def test_backlog_over_the_limit_pauses_then_wiring_resumes(self) -> None:
        a, b = Relay(), Relay()
        link(a, b)
        ta, tb = HalfCloseStringTransport(), HalfCloseStringTransport()
        a.makeConnection(ta)
        a.dataReceived(b"x" * MAX_BACKLOG)
        a.dataReceived(b"y")
        self.assertEqual(ta.producerState, "paused")
        b.makeConnection(tb)
        self.assertEqual(tb.value(), b"x" * MAX_BACKLOG + b"y")
        self.assertEqual(ta.producerState, "producing")

    def test_fin_before_wiring_is_passed_on_after_the_backlog(self) -> None:
        a, b = Relay(), Relay()
        link(a, b)
        ta, tb = HalfCloseStringTransport(), HalfCloseStringTransport()
        a.makeConnection(ta)
        ta.pauseProducing()  # e.g. the SOCKS front end pauses while connecting
        a.dataReceived(b"request")
        a.readConnectionLost()
        self.assertEqual(tb.write_closed, 0)
        b.makeConnection(tb)
        self.assertEqual(tb.value(), b"request")
        self.assertEqual(tb.write_closed, 1)
        # The side that already sent FIN is not resumed: it has nothing more to read.
        self.assertEqual(ta.producerState, "paused")
        # The other direction still works.
        b.dataReceived(b"answer")
        self.assertEqual(ta.value(), b"answer")


class HalfCloseTests(SynchronousTestCase):
    def test_fin_on_one_side_half_closes_the_other(self) -> None:
        a, ta, b, tb = connected_pair()
        a.readConnectionLost()
        self.assertEqual(tb.write_closed, 1)
        self.assertEqual(ta.write_closed, 0)
        self.assertFalse(ta.disconnecting)
        self.assertFalse(tb.disconnecting)
        # b's transport must not keep a (paused) producer registered that would hold up its shutdown.
        self.assertIsNone(tb.producer)
        # The reverse direction keeps flowing.
        b.dataReceived(b"late answer")
        self.assertEqual(ta.value(), b"late answer")

    def test_both_directions_done_closes_with_producers_unregistered_first(self) -> None:
        a, ta, b, tb = connected_pair()
        a.readConnectionLost()  # a's client sent FIN -> tb.loseWriteConnection
        b.writeConnectionLost()  # Twisted: tb's write side is shut
        self.assertFalse(tb.disconnecting)
        b.readConnectionLost()  # b's server sent FIN too -> ta.loseWriteConnection; b is done both ways
        self.assertTrue(tb.disconnecting)
        self.assertIsNone(tb.producer_at_close)
        self.assertLess(tb.calls.index("unregisterProducer"), tb.calls.index("loseConnection"))
        self.assertEqual(ta.write_closed, 1)
        self.assertFalse(ta.disconnecting)
        a.writeConnectionLost()
        self.assertTrue(ta.disconnecting)
        self.assertIsNone(ta.producer_at_close)
        self.assertLess(ta.calls.index("unregisterProducer"), ta.calls.index("loseConnection"))
        self.assertFalse(ta.aborted or tb.aborted)

    def test_transport_without_half_close_does_not_crash(self) -> None:
        """TLS transports have no ``loseWriteConnection``: keep the connection until both directions end."""
        a, b = Relay(), Relay()
        link(a, b)
        ta = HalfCloseStringTransport()
        tls = StringTransport()  # no loseWriteConnection
        self.assertFalse(hasattr(tls, "loseWriteConnection"))
        a.makeConnection(ta)
        b.makeConnection(tls)
        a.readConnectionLost()
        self.assertFalse(tls.disconnecting)
        self.assertIsNone(tls.producer)
        b.dataReceived(b"still flowing")
        self.assertEqual(ta.value(), b"still flowing")
        b.readConnectionLost()
        self.assertTrue(tls.disconnecting)
        self.assertEqual(ta.write_closed, 1)


class LossTests(SynchronousTestCase):
    def test_clean_loss_closes_the_peer_gracefully(self) -> None:
        a, ta, b, tb = connected_pair()
        a.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(tb.disconnecting)
        self.assertFalse(tb.aborted)
        self.assertIsNone(tb.producer_at_close)
        self.assertLess(tb.calls.index("unregisterProducer"), tb.calls.index("loseConnection"))

    def test_error_loss_aborts_the_peer(self) -> None:
        a, ta, b, tb = connected_pair()
        a.connectionLost(Failure(ConnectionLost("reset by peer")))
        self.assertTrue(tb.aborted)
        self.assertIsNone(tb.producer)

    def test_error_loss_without_abort_falls_back_to_lose_connection(self) -> None:
        class NoAbort(StringTransport):
            abortConnection = None  # type: ignore[assignment]

        a, b = Relay(), Relay()
        link(a, b)
        ta, tb = HalfCloseStringTransport(), NoAbort()
        a.makeConnection(ta)
        b.makeConnection(tb)
        a.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(tb.disconnecting)

    def test_second_loss_does_not_touch_the_first(self) -> None:
        a, ta, b, tb = connected_pair()
        a.connectionLost(Failure(ConnectionDone()))
        ta.calls.clear()
        b.connectionLost(Failure(ConnectionLost()))  # a is lost already: no abort of ta
        self.assertEqual(ta.calls, [])
        self.assertFalse(ta.aborted)

    def test_loss_drops_the_backlog(self) -> None:
        a, b = Relay(), Relay()
        link(a, b)
        ta, tb = HalfCloseStringTransport(), HalfCloseStringTransport()
        a.makeConnection(ta)
        a.dataReceived(b"never delivered")
        a.connectionLost(Failure(ConnectionDone()))
        b.makeConnection(tb)
        self.assertEqual(tb.value(), b"")
        self.assertFalse(b.wired)

    def test_loss_before_peer_exists_is_harmless(self) -> None:
        a = Relay()
        ta = HalfCloseStringTransport()
        a.makeConnection(ta)
        a.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(ta.calls, [])
