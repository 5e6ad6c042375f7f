# -*- test-case-name: tests.unit.test_tunnel -*-
"""A tunnel stream as a Twisted transport (the shape of ``twisted.web._http2.H2Stream``).

The protocol on a stream (a :class:`connproxy.relay.Relay`) sees an ordinary half-closeable transport:

* ``write`` sends DATA within the flow-control windows; what does not fit waits here and the registered
  producer (the socket feeding us) is paused until credit returns, so at most one read is held per stream.
* Received DATA goes straight to the protocol; its credit is returned only if the protocol's consumer did not
  pause us while taking it. Bytes taken while paused are credited on ``resumeProducing``.
* ``loseWriteConnection`` sends FIN after the pending bytes; ``loseConnection`` also ends the stream once both
  directions are done; ``abortConnection`` resets it.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.tunnel.errors import StreamResetError
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import OpenRequest

if TYPE_CHECKING:
    from connproxy.tunnel.connection import TunnelConnection


@implementer(ITransport, IConsumer, IPushProducer)
class TunnelStream:
    """One stream of a :class:`~connproxy.tunnel.connection.TunnelConnection`, usable as a transport.

    A stream that waits without progress for the tunnel's stall timeout — received data its consumer does not
    take (we are paused with bytes not passed on), or bytes to send while the peer returns no credit — is reset
    ``STREAM_STALLED`` and its protocol loses the connection (spec 3.4.2).
    """

    log = Logger()

    __slots__ = (
        "stream_id",
        "request",
        "connection",
        "protocol",
        "_producer",
        "_producer_paused",
        "_pending",
        "_fin_pending",
        "_close_pending",
        "_local_fin",
        "_remote_fin",
        "_closed",
        "_reading_paused",
        "_unacked",
        "_early",
        "first_bytes",
        "_stall_timer",
        "_probe_timer",
        "disconnecting",
        "bytes_in",
        "bytes_out",
    )

    def __init__(self, connection: TunnelConnection, stream_id: int, request: OpenRequest) -> None:
        self.stream_id = stream_id
        self.request = request
        self.connection = connection
        self.protocol: Protocol | None = None
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self._pending: bytes = b""
        self._fin_pending = False
        self._close_pending = False
        self._local_fin = False
        self._remote_fin = False
        self._closed = False
        self._reading_paused = False
        self._unacked = 0
        self._early: list[bytes] | None = None
        #: Bytes (and FIN) to send at ACCEPT, ahead of the protocol: early data for a peer without ``early-data``.
        self.first_bytes: tuple[bytes, bool] | None = None
        self._stall_timer: IDelayedCall | None = None
        self._probe_timer: IDelayedCall | None = None
        self.disconnecting = False
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<TunnelStream {self.stream_id} {self.request.host}:{self.request.port}>"

    @property
    def closed(self) -> bool:
        """True once the stream is finished (both FINs, reset or tunnel lost)."""
        return self._closed

    # ------------------------------------------------------------------ attaching a protocol

    def attach(self, protocol: Protocol) -> None:
        """Connect ``protocol`` to this stream and deliver any data that arrived before (early data)."""
        self.protocol = protocol
        protocol.makeConnection(self)
        early, self._early = self._early, None
        if early:
            for index, chunk in enumerate(early):
                if self._closed:
                    # The protocol closed the stream on earlier data: the rest is dropped, its credit returned.
                    self.connection.acknowledge(self.stream_id, sum(len(c) for c in early[index:]))
                    break
                self._deliver(chunk)
        if self._remote_fin and not self._closed:
            self._notify_read_closed()

    def send_first(self, data: bytes, fin: bool) -> None:
        """Send the stream's first bytes (and FIN) before any protocol is connected: the opener's early data
        (:meth:`TunnelConnection.open_stream`). Bytes beyond the credit wait like any write."""
        self.first_bytes = None
        self.write(data)
        if fin:
            self.loseWriteConnection()

    # ------------------------------------------------------------------ events from the connection

    def data_received(self, data: bytes) -> None:
        """DATA arrived for this stream."""
        self.bytes_in += len(data)
        if self.protocol is None:
            if self._early is None:
                self._early = []
            self._early.append(data)  # bounded by the stream window: nothing is acknowledged yet
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)
        if self._reading_paused and not self._closed:
            self._unacked += len(data)
            self._check_stall()
        else:
            self.connection.acknowledge(self.stream_id, len(data))

    def remote_ended(self) -> None:
        """The peer sent FIN."""
        self._remote_fin = True
        if self.protocol is not None:
            self._notify_read_closed()

    def _notify_read_closed(self) -> None:
        protocol = self.protocol
        if self._local_fin:
            self._finish(Failure(ConnectionDone()))
            return
        half = IHalfCloseableProtocol(protocol, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.loseConnection()

    def refuse(self, code: ErrorCode, reason: str, local_reason: str | None = None) -> None:
        """End the stream from this side with RESET ``code``: the peer is told ``reason`` and the protocol (if
        any) sees a :class:`StreamResetError` with ``local_reason`` (default ``reason``). Does nothing on a
        stream already closed."""
        if self._closed:
            return
        self.connection.reset_stream(self.stream_id, code, reason)
        self.reset(code, reason if local_reason is None else local_reason)

    def reset(self, code: ErrorCode, reason: str) -> None:
        """The stream was reset (by the peer, or because the tunnel is gone).

        ``NORMAL`` after the peer's FIN is the graceful close of spec section 3.3 (the peer sent all its data
        and will read nothing more): the protocol sees a clean ``ConnectionDone``, so what it already passed on
        is flushed, not discarded. Any other code, and ``NORMAL`` before the peer's FIN (its data would be cut
        short), is an abort: the protocol sees :class:`StreamResetError`.
        """
        if code == ErrorCode.NORMAL and self._remote_fin:
            self._finish(Failure(ConnectionDone()))
        else:
            self._finish(Failure(StreamResetError(code, reason)))

    def window_available(self) -> None:
        """Send credit grew or the tunnel drained: push pending bytes and resume the producer if all went."""
        if self._closed:
            return
        if self._pending:
            data, self._pending = self._pending, b""
            self._send(data)
        if not self._pending:
            if self._fin_pending:
                self._fin_pending = False
                self._send_fin()
            if self._producer is not None and self._producer_paused and not self._closed:
                self._producer_paused = False
                self._producer.resumeProducing()
        self._check_stall(progress=True)

    # ------------------------------------------------------------------ ITransport

    def write(self, data: bytes) -> None:
        """Send ``data`` on the stream; pauses the registered producer while it waits for credit."""
        if self._closed or self._local_fin or self._fin_pending or not data:
            return
        self.bytes_out += len(data)
        if self._pending or self.connection.congested:
            self._pending += data
            self._block()
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        sent = self.connection.send_data(self.stream_id, data)
        if sent < len(data):
            self._pending = data[sent:]
            self._block()

    def _block(self) -> None:
        self.connection.stream_blocked(self)
        if self._producer is not None:
            # Pause even if we paused it before: someone else may have resumed it since (the relay's wiring
            # resumes both sockets), and a producer left running here would grow ``_pending`` without bound.
            self._producer_paused = True
            self._producer.pauseProducing()
        self._check_stall()  # after pausing: a paused producer is probed for a peer that goes away

    def writeSequence(self, data: list[bytes]) -> None:  # type: ignore[override]
        """Send the concatenation of ``data``."""
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Half-close: send FIN once pending bytes are out."""
        if self._closed or self._local_fin or self._fin_pending:
            return
        if self._pending:
            self._fin_pending = True
        else:
            self._send_fin()

    def _send_fin(self) -> None:
        self._local_fin = True
        self.connection.end_stream(self.stream_id)
        if self._remote_fin:
            self._finish(Failure(ConnectionDone()))
            return
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            half.writeConnectionLost()
        if self._close_pending:
            # We will read nothing more: the far end is told to stop after our FIN (graceful reset).
            self.connection.reset_stream(self.stream_id, ErrorCode.NORMAL, "closed", after_data=True)
            self._finish(Failure(ConnectionDone()))

    def loseConnection(self) -> None:
        """Close after pending bytes: FIN, then (if the peer still sends) a RESET queued behind the data."""
        if self._closed:
            return
        self.disconnecting = True
        if self._local_fin:
            if not self._remote_fin:
                self.connection.reset_stream(self.stream_id, ErrorCode.NORMAL, "closed", after_data=True)
                self._finish(Failure(ConnectionDone()))
            return
        self._close_pending = True
        if not self._fin_pending:
            self.loseWriteConnection()
        # else: _send_fin() runs when the pending bytes are out and completes the close

    def abortConnection(self) -> None:
        """Reset the stream at once (``CANCEL``), discarding pending bytes."""
        if self._closed:
            return
        self.connection.reset_stream(self.stream_id, ErrorCode.CANCEL, "aborted")
        self._finish(Failure(ConnectionDone()))

    def getPeer(self) -> IAddress:
        """The tunnel's peer address (the connector or the proxy)."""
        peer: IAddress = self.connection.peer_address()
        return peer

    def getHost(self) -> IAddress:
        """A placeholder local address: a stream has no socket of its own."""
        return IPv4Address("TCP", "0.0.0.0", 0)

    # ------------------------------------------------------------------ IConsumer

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:  # type: ignore[override]
        """Register the producer feeding this stream; it is paused at once if the stream is blocked."""
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        self._producer_paused = False
        if self._pending or self.connection.congested:
            self._block()  # registered as blocked, so that the tunnel's resumeProducing resumes the producer

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self._producer = None

    # ------------------------------------------------------------------ IPushProducer (our reading side)

    def pauseProducing(self) -> None:
        """Our consumer is full: stop returning credit, so the far end stops sending within a window."""
        self._reading_paused = True
        self._check_stall()

    def resumeProducing(self) -> None:
        """Our consumer drained: return the credit of everything delivered meanwhile."""
        self._reading_paused = False
        if self._unacked:
            count, self._unacked = self._unacked, 0
            self.connection.acknowledge(self.stream_id, count)
        self._check_stall(progress=True)

    # ------------------------------------------------------------------ stall detection (spec 3.4.2)

    @property
    def stalled(self) -> bool:
        """True while the stream waits without being able to make progress by itself: received bytes its
        consumer does not take, or bytes to send without credit (a congested tunnel does not count)."""
        if self._closed:
            return False
        if self._reading_paused and self._unacked > 0:
            return True
        return bool(self._pending) and not self.connection.congested

    def _check_stall(self, progress: bool = False) -> None:
        timer = self._stall_timer
        if not self.stalled:
            if timer is not None:
                if timer.active():
                    timer.cancel()
                self._stall_timer = None
            self._stop_probe()
            return
        timeout = self.connection.timers.stall_timeout
        if timer is None or not timer.active():
            self._stall_timer = self.connection.clock.callLater(timeout, self._stall_expired)
        elif progress:
            timer.reset(timeout)
        if self._pending and self._producer_paused and self._probe_timer is None:
            self._probe_timer = self.connection.clock.callLater(self._probe_interval(), self._probe_producer)

    def _probe_interval(self) -> float:
        return max(0.05, min(PROBE_INTERVAL_SECONDS, self.connection.timers.stall_timeout / 4))

    def _stop_probe(self) -> None:
        if self._probe_timer is not None:
            if self._probe_timer.active():
                self._probe_timer.cancel()
            self._probe_timer = None

    def _probe_producer(self) -> None:
        """While we keep the socket feeding us paused, it would not notice its peer resetting the connection:
        look at the socket itself (pending error, TCP state) and end the stream if the peer is gone."""
        self._probe_timer = None
        producer = self._producer
        if self._closed or producer is None or not self._producer_paused:
            return
        if socket_peer_gone(producer):
            self.log.info(
                "tunnel stream {stream_id} to {target}: the connection feeding it was reset while paused",
                stream_id=self.stream_id, target=f"{self.request.host}:{self.request.port}",
            )
            self.connection.reset_stream(self.stream_id, ErrorCode.CANCEL, "connection reset while paused")
            self._finish(Failure(StreamResetError(ErrorCode.CANCEL, "connection reset while paused")))
            return
        if self.stalled:
            self._probe_timer = self.connection.clock.callLater(self._probe_interval(), self._probe_producer)

    def _stall_expired(self) -> None:
        self._stall_timer = None
        if not self.stalled:
            return
        timeout = self.connection.timers.stall_timeout
        self.log.info(
            "tunnel stream {stream_id} to {target} stalled for {timeout}s ({why}): resetting STREAM_STALLED",
            stream_id=self.stream_id, target=f"{self.request.host}:{self.request.port}", timeout=timeout,
            why="its reader takes no data" if self._reading_paused and self._unacked else "no credit from the peer",
        )
        self.refuse(ErrorCode.STREAM_STALLED, f"no progress for {timeout:g}s")

    def stopProducing(self) -> None:
        """Our consumer went away: close the stream after what is pending."""
        self.loseConnection()

    # ------------------------------------------------------------------ teardown

    def _finish(self, reason: Failure) -> None:
        if self._closed:
            return
        self._closed = True
        self.disconnecting = True
        self._pending = b""
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None
        self._stop_probe()
        if self._early:
            # Early data that no protocol took: its session credit must still go back to the peer.
            self._unacked += sum(len(chunk) for chunk in self._early)
        self._early = None
        if self._unacked:
            count, self._unacked = self._unacked, 0
            self.connection.acknowledge(self.stream_id, count)
        self.connection.stream_finished(self)
        self._producer = None
        self._producer_paused = False
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


#: How often a stream probes the paused socket feeding it for a reset (at most, and at most a quarter of the
#: stall timeout).
PROBE_INTERVAL_SECONDS = 2.0
_TCP_CLOSE = 7  # tcpi_state of a connection the peer reset (Linux include/net/tcp_states.h)


def socket_peer_gone(transport: object) -> bool:
    """True if ``transport`` is a TCP socket transport whose peer reset the connection (a pending socket error, or
    the kernel's TCP state CLOSE). Best effort: anything else (TLS wrappers, no socket, other platforms) is
    "not known to be gone"."""
    sock = getattr(transport, "socket", None)
    if sock is None:
        return False
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is not None:
            return bool(sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0] == _TCP_CLOSE)
    except (OSError, ValueError, TypeError, IndexError):
        return False
    return False


def reset_transport(transport: object, code: ErrorCode, reason: str) -> bool:
    """RESET ``code`` if ``transport`` is an open :class:`TunnelStream` (a front end ending a relay whose far side
    is a stream, for example on its idle timeout); returns whether a RESET was sent. Anything else is left alone."""
    if isinstance(transport, TunnelStream) and not transport.closed:
        transport.refuse(code, reason)
        return True
    return False
