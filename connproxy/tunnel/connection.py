# -*- test-case-name: tests.unit.test_tunnel -*-
"""One tunnel connection as a Twisted protocol: feeds the sans-IO session and writes what it returns.

:class:`TunnelConnection` is shared by both ends; the proxy's listener and the connector subclass it for the
handshake and for what to do with streams the peer opens. It is a streaming producer for its transport: while the
transport is congested only control frames are written (PING, credit, RESET ...) and every stream that wants to
send is blocked, which pauses the socket feeding it.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.nodelay import set_no_delay
from connproxy.tunnel.errors import OpenTimeoutError, StreamRefusedError, TunnelLostError
from connproxy.tunnel.stream import TunnelStream
from connproxy.wire.errors import ErrorCode, OpenTooLargeError, ProtocolError
from connproxy.wire.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    OpenRequest,
    PingAcknowledged,
    ReplicasReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from connproxy.wire.session import (
    DEFAULT_DEAD_AFTER_SECONDS,
    DEFAULT_OPEN_TIMEOUT_SECONDS,
    DEFAULT_PING_INTERVAL_SECONDS,
    MAX_CONTROL_BACKLOG,
    Role,
    Session,
    Settings,
)

_PING = struct.Struct(">d")
DEFAULT_STALL_TIMEOUT_SECONDS = 60.0


class TunnelTimers:
    """Timer settings of a tunnel connection (seconds)."""

    __slots__ = ("ping_interval", "dead_after", "open_timeout", "handshake_timeout", "stall_timeout")

    def __init__(
        self,
        ping_interval: float = DEFAULT_PING_INTERVAL_SECONDS,
        dead_after: float = DEFAULT_DEAD_AFTER_SECONDS,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT_SECONDS,
        handshake_timeout: float = DEFAULT_OPEN_TIMEOUT_SECONDS,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_SECONDS,
    ) -> None:
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.open_timeout = open_timeout
        self.handshake_timeout = handshake_timeout
        #: Seconds a stream may wait without progress (data it cannot pass on, or credit) before it is reset
        #: ``STREAM_STALLED`` (spec 3.4.2).
        self.stall_timeout = stall_timeout


@implementer(IPushProducer)
class TunnelConnection(Protocol):
    """The Twisted side of one tunnel. Subclasses implement :meth:`hello_received` and :meth:`stream_opened`."""

    log = Logger()

    def __init__(self, role: Role, settings: Settings, clock: IReactorTime, timers: TunnelTimers) -> None:
        self.session = Session(role, settings)
        self.clock = clock
        self.timers = timers
        self.streams: dict[int, TunnelStream] = {}
        self._blocked: dict[int, TunnelStream] = {}
        self._opening: dict[int, tuple[Deferred[Protocol], IProtocolFactory, IDelayedCall]] = {}
        self._paused = False
        self._in_receive = False
        self._keepalive: LoopingCall | None = None
        self._handshake_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._drain_timer: IDelayedCall | None = None
        self.drain_requested = False
        self._dead_timer: IDelayedCall | None = None
        self._written_while_paused = 0
        self.last_received = 0.0
        self.rtt: float | None = None
        self.lost = False
        self.closed: Deferred[None] = Deferred()

    # ------------------------------------------------------------------ lifecycle

    def connectionMade(self) -> None:
        """Start the handshake and keepalive timers and register as the transport's producer."""
        assert self.transport is not None
        self.last_received = self.clock.seconds()
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        set_no_delay(self.transport)
        self._handshake_timer = self.clock.callLater(self.timers.handshake_timeout, self._handshake_timed_out)
        self.start_tunnel_timers()

    def start_tunnel_timers(self) -> None:
        """Start keepalive and dead-peer checks (at connect; again after an HTTP Upgrade to the tunnel)."""
        self.stop_tunnel_timers()
        self.last_received = self.clock.seconds()
        self._keepalive = LoopingCall(self._keepalive_tick)
        self._keepalive.clock = self.clock
        self._keepalive.start(self.timers.ping_interval, now=False)
        self._dead_timer = self.clock.callLater(self.timers.dead_after, self._dead_check)

    def stop_tunnel_timers(self) -> None:
        """Stop keepalive and dead-peer checks (the connection turned out not to be a tunnel)."""
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._dead_timer is not None and self._dead_timer.active():
            self._dead_timer.cancel()
        self._dead_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail pending opens, reset every stream (their relays abort) and stop the timers."""
        self.lost = True
        for timer in (self._handshake_timer, self._abort_timer, self._dead_timer, self._drain_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        opening, self._opening = self._opening, {}
        for d, _factory, timer in opening.values():
            if timer.active():
                timer.cancel()
            d.errback(TunnelLostError("the tunnel closed while the stream was being opened"))
        for stream in list(self.streams.values()):
            stream.reset(ErrorCode.INTERNAL_ERROR, "tunnel lost")
        self.streams.clear()
        self._blocked.clear()
        self.tunnel_lost(reason)
        self.closed.callback(None)

    def tunnel_lost(self, reason: Failure | None) -> None:
        """Hook: the connection is gone (deregister, schedule a reconnect ...)."""

    def close_transport(self) -> None:
        """Close the transport after its buffer is flushed.

        Our producer registration is dropped first: Twisted's TLS transport does not start its shutdown while a
        producer is registered.
        """
        transport = self.transport
        if transport is None or self.lost:
            return
        if getattr(transport, "producer", self) is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()

    def fail(self, code: ErrorCode, reason: str) -> None:
        """End the tunnel: GOAWAY ``code``, then close (abort if the peer does not read within 5 s)."""
        if self.lost or self.transport is None:
            return
        self.session.go_away(code, reason)
        self._flush(force=True)
        self.close_transport()
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(5.0, self._abort)

    def _abort(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if not self.session.ready:
            self.log.warn("tunnel handshake timed out with {peer}", peer=self.describe_peer())
            self.fail(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timeout")

    def _keepalive_tick(self) -> None:
        self.session.ping(_PING.pack(self.clock.seconds()))
        self._flush()

    def _dead_check(self) -> None:
        """Runs when ``dead_after`` may have passed since the last byte arrived (one lazily moved timer)."""
        self._dead_timer = None
        if self.lost:
            return
        silent = self.clock.seconds() - self.last_received
        if silent < self.timers.dead_after:
            self._dead_timer = self.clock.callLater(self.timers.dead_after - silent, self._dead_check)
            return
        self.log.warn("tunnel to {peer} silent for {silent:.1f}s: closing", peer=self.describe_peer(), silent=silent)
        self.fail(ErrorCode.KEEPALIVE_TIMEOUT, "nothing received")
        self._abort()

    def handshake_done(self) -> None:
        """Call when the HELLO exchange is complete (cancels the handshake timer)."""
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    # ------------------------------------------------------------------ input

    def dataReceived(self, data: bytes) -> None:
        """Feed the session and dispatch its events; a protocol error ends the tunnel."""
        self.last_received = self.clock.seconds()
        self._in_receive = True
        try:
            try:
                events = self.session.receive_data(data)
            except ProtocolError as e:
                self.log.warn(
                    "tunnel protocol error from {peer}: {code} {error}", peer=self.describe_peer(),
                    code=e.code.name, error=str(e),
                )
                self.fail(e.code, str(e))
                return
            for event in events:
                if self.lost:
                    break
                self._dispatch_guarded(event)
        finally:
            self._in_receive = False
        self._flush()

    def _dispatch_guarded(self, event: Event) -> None:
        """Dispatch one event; an exception while handling one stream ends that stream, never the tunnel."""
        try:
            self._dispatch(event)
        except Exception:
            stream_id = getattr(event, "stream_id", 0)
            if stream_id:
                self.stream_fault(stream_id, Failure(), type(event).__name__)
            else:
                self.log.failure(
                    "tunnel {peer}: handling {event} failed: closing the tunnel", Failure(),
                    peer=self.describe_peer(), event=type(event).__name__,
                )
                self.fail(ErrorCode.INTERNAL_ERROR, "internal error")

    def stream_fault(self, stream_id: int, failure: Failure, stage: str) -> None:
        """An exception while serving one stream (``stage`` names where): log it once, naming the stream's target,
        and RESET the stream ``INTERNAL_ERROR``; the tunnel and its other streams go on (spec section 4)."""
        stream = self.streams.get(stream_id)
        request = stream.request if stream is not None else None
        self.log.failure(
            "tunnel {peer}: stream {stream_id} to {target} ({kind}, subaccount {tenant}) failed in {stage}: "
            "resetting it INTERNAL_ERROR",
            failure,
            peer=self.describe_peer(), stream_id=stream_id, stage=stage,
            target=f"{request.host}:{request.port}" if request is not None else "?",
            kind=request.kind if request is not None else "?",
            tenant=request.meta.get("tenant") if request is not None else None,
        )
        self.session.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR, "internal error")
        entry = self._opening.pop(stream_id, None)
        if entry is not None:
            if entry[2].active():
                entry[2].cancel()
            entry[0].errback(StreamRefusedError(ErrorCode.INTERNAL_ERROR, "internal error"))
        if stream is not None and not stream.closed:
            try:
                stream.reset(ErrorCode.INTERNAL_ERROR, "internal error")
            except Exception:
                # The protocol failed again while being told: forget the stream regardless.
                self.log.failure("stream {stream_id}: closing after the fault failed too", stream_id=stream_id)
                self.streams.pop(stream_id, None)
                self._blocked.pop(stream_id, None)
                self.streams_changed()
        self._flush()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.data_received(event.data)
            else:
                self.session.acknowledge(event.stream_id, len(event.data))
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                self._unblock_all()
            else:
                blocked = self._blocked.pop(event.stream_id, None)
                if blocked is not None:
                    blocked.window_available()
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_ended()
        elif isinstance(event, StreamOpened):
            stream = TunnelStream(self, event.stream_id, event.request)
            self.streams[event.stream_id] = stream
            self.stream_opened(stream)
        elif isinstance(event, StreamAccepted):
            self._on_accepted(event.stream_id)
        elif isinstance(event, StreamReset):
            self._on_reset(event)
        elif isinstance(event, PingAcknowledged):
            (sent,) = _PING.unpack(event.payload)
            self.rtt = max(0.0, self.clock.seconds() - sent)
        elif isinstance(event, HelloReceived):
            self.hello_received(event)
        elif isinstance(event, GoAwayReceived):
            self.log.info(
                "tunnel peer {peer} sent GOAWAY {code}: {reason}", peer=self.describe_peer(),
                code=event.code.name, reason=event.reason,
            )
            self.goaway_received(event)
        elif isinstance(event, ReplicasReceived):
            self.replicas_received(event)

    def hello_received(self, event: HelloReceived) -> None:
        """Hook: the peer's HELLO arrived."""
        raise NotImplementedError

    def stream_opened(self, stream: TunnelStream) -> None:
        """Hook: the peer opened ``stream``; accept it with :meth:`accept` or refuse it with ``reset_stream``."""
        self.reset_stream(stream.stream_id, ErrorCode.REFUSED_STREAM, "this side accepts no streams")
        stream.reset(ErrorCode.REFUSED_STREAM, "refused")

    def goaway_received(self, event: GoAwayReceived) -> None:
        """Hook: the peer will accept no new streams."""

    def replicas_received(self, event: ReplicasReceived) -> None:
        """Hook: the proxy announced a changed replica set (docs/high-availability.md); ignored by default."""

    def send_replicas(self, replicas: list[dict[str, Any]]) -> None:
        """Send a REPLICAS frame (once the handshake is done; ignored on a closed tunnel)."""
        if self.lost or self.transport is None or not self.session.ready:
            return
        self.session.send_replicas(replicas)
        self._flush()

    # ------------------------------------------------------------------ streams we open

    def open_stream(self, request: OpenRequest, factory: IProtocolFactory, early: bytes = b"",
                    early_fin: bool = False) -> Deferred[Protocol]:
        """Open a stream to ``request``'s target; fire with the protocol ``factory`` built once ACCEPT arrives.

        ``early`` is the stream's first bytes, and ``early_fin`` says the sender's direction ends after them: when
        the connector announced ``early-data`` they travel right behind the OPEN, in the same write (spec section
        3.2: no round trip waits for ACCEPT), else they are sent at ACCEPT, before the protocol is connected.
        Either way the protocol must not write them again. Refused or retried opens lose nothing: the caller
        still has the bytes.

        Fails with :class:`StreamRefusedError` (RESET), :class:`OpenTimeoutError` or :class:`TunnelLostError`.
        Cancelling the Deferred resets the stream with ``CANCEL``.
        """
        if self.lost or not self.session.can_open():
            return fail(StreamRefusedError(ErrorCode.REFUSED_STREAM, "tunnel not accepting new streams"))
        try:
            stream_id = self.session.open_stream(request)
        except OpenTooLargeError as e:
            return fail(StreamRefusedError(ErrorCode.FRAME_SIZE_ERROR, str(e)))
        stream = self.streams[stream_id] = TunnelStream(self, stream_id, request)
        if early or early_fin:
            if self.session.peer_supports("early-data"):
                stream.send_first(early, early_fin)
            else:
                stream.first_bytes = (early, early_fin)

        def cancel(d: Deferred[Protocol]) -> None:
            entry = self._opening.pop(stream_id, None)
            if entry is not None:
                entry[2].cancel()
                self._drop_opening_stream(stream_id, ErrorCode.CANCEL, "opener cancelled")

        d: Deferred[Protocol] = Deferred(cancel)
        timer = self.clock.callLater(self.timers.open_timeout, self._open_timed_out, stream_id)
        self._opening[stream_id] = (d, factory, timer)
        self._flush()
        self.streams_changed()
        return d

    def _drop_opening_stream(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        self.reset_stream(stream_id, code, reason)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.reset(code, reason)

    def _open_timed_out(self, stream_id: int) -> None:
        entry = self._opening.pop(stream_id, None)
        if entry is None:
            return
        self._drop_opening_stream(stream_id, ErrorCode.CANCEL, "open timeout")
        entry[0].errback(OpenTimeoutError(f"no answer to OPEN within {self.timers.open_timeout:g}s"))

    def _on_accepted(self, stream_id: int) -> None:
        entry = self._opening.pop(stream_id, None)
        stream = self.streams.get(stream_id)
        if entry is None or stream is None:
            return
        d, factory, timer = entry
        timer.cancel()
        if stream.first_bytes is not None:
            stream.send_first(*stream.first_bytes)
        try:
            protocol = factory.buildProtocol(self.peer_address())
            if protocol is not None:
                stream.attach(protocol)  # type: ignore[arg-type]
        except Exception:
            self._opening[stream_id] = entry  # so that stream_fault (via _dispatch_guarded) fails the opener
            raise
        if protocol is None:
            self.reset_stream(stream_id, ErrorCode.CANCEL, "no protocol")
            stream.reset(ErrorCode.CANCEL, "no protocol")
            d.errback(StreamRefusedError(ErrorCode.CANCEL, "factory built no protocol"))
            return
        d.callback(protocol)  # type: ignore[arg-type]

    def _on_reset(self, event: StreamReset) -> None:
        entry = self._opening.pop(event.stream_id, None)
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.reset(event.code, event.reason)
        if entry is not None:
            entry[2].cancel()
            entry[0].errback(StreamRefusedError(event.code, event.reason))

    def accept(self, stream: TunnelStream, protocol: Protocol) -> None:
        """Accept a stream the peer opened and connect ``protocol`` to it (early data is delivered now).

        An exception from the protocol while it is connected (or takes the early data) resets the stream
        ``INTERNAL_ERROR`` (:meth:`stream_fault`) instead of reaching the caller.
        """
        if stream.closed:
            return
        self.session.accept_stream(stream.stream_id)
        self._flush()
        try:
            stream.attach(protocol)
        except Exception:
            self.stream_fault(stream.stream_id, Failure(), "accept")

    # ------------------------------------------------------------------ called by streams

    @property
    def congested(self) -> bool:
        """True while the transport paused us: streams must hold their data."""
        return self._paused

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Send stream bytes within the windows; returns how many were taken (all, for a vanished stream)."""
        if not self.session.has_stream(stream_id):
            return len(data)
        sent = self.session.send_data(stream_id, data)
        self._flush()
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Send FIN on the stream."""
        if self.session.has_stream(stream_id):
            self.session.end_stream(stream_id)
            self._flush()

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "", after_data: bool = False) -> None:
        """Send RESET for the stream."""
        self.session.reset_stream(stream_id, code, reason, after_data=after_data)
        self._flush()

    def acknowledge(self, stream_id: int, count: int) -> None:
        """Return credit for ``count`` bytes the stream passed on."""
        self.session.acknowledge(stream_id, count)
        self._flush()

    def stream_blocked(self, stream: TunnelStream) -> None:
        """``stream`` waits for credit or for the transport to drain."""
        self._blocked[stream.stream_id] = stream

    def stream_finished(self, stream: TunnelStream) -> None:
        """``stream`` is done: forget it."""
        self.streams.pop(stream.stream_id, None)
        self._blocked.pop(stream.stream_id, None)
        if stream.stream_id in self._opening:
            d, _factory, timer = self._opening.pop(stream.stream_id)
            timer.cancel()
            d.errback(TunnelLostError("stream closed before it was accepted"))
        self.streams_changed()

    def drain(self, code: ErrorCode, reason: str, grace: float | None = None) -> None:
        """GOAWAY ``code``: the peer opens no new streams here; close once the last stream ended.

        With ``grace``, streams still open after that many seconds are RESET and the transport is closed.
        """
        self.drain_requested = True
        if self.lost or self.transport is None:
            return
        self.session.go_away(code, reason)
        self._flush()
        if grace is not None and self._drain_timer is None:
            self._drain_timer = self.clock.callLater(grace, self._drain_expired)
        self.streams_changed()

    def _drain_expired(self) -> None:
        """The grace is over: every stream still open is RESET (``SHUTTING_DOWN``; its protocol sees an abort,
        never a clean end), then the tunnel closes."""
        self._drain_timer = None
        for stream in list(self.streams.values()):
            stream.refuse(ErrorCode.SHUTTING_DOWN, "drain deadline passed")
        self._close_drained()

    def streams_changed(self) -> None:
        """The number of streams changed: a draining tunnel closes once it carries none."""
        if self.drain_requested and not self.streams:
            self._close_drained()

    def _close_drained(self) -> None:
        if self.lost or self.transport is None:
            return
        self.close_transport()
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(2.0, self._abort)  # a peer that never closes its side

    def _unblock_all(self) -> None:
        blocked, self._blocked = self._blocked, {}
        for stream in blocked.values():
            if self._paused:
                self._blocked[stream.stream_id] = stream
            else:
                try:
                    stream.window_available()
                except Exception:
                    self.stream_fault(stream.stream_id, Failure(), "resume")

    # ------------------------------------------------------------------ output and IPushProducer

    def _flush(self, force: bool = False) -> None:
        if self._in_receive and not force:
            return
        transport = self.transport
        if transport is None or self.lost:
            return
        chunks = self.session.take_output(include_data=force or not self._paused)
        if chunks:
            if self._paused:
                # Only control frames go out while the peer does not read; a peer that keeps provoking them
                # (PING floods, OPENs to refuse) must not grow our transport buffer without bound.
                self._written_while_paused += sum(len(c) for c in chunks)
                if self._written_while_paused > MAX_CONTROL_BACKLOG and not force:
                    self.log.warn(
                        "tunnel peer {peer} is not reading while provoking control frames: aborting",
                        peer=self.describe_peer(),
                    )
                    self._abort()
                    return
            transport.writeSequence(chunks)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: hold DATA, block streams (their sockets pause)."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The transport drained: write held DATA and let blocked streams go on."""
        self._paused = False
        self._written_while_paused = 0
        self._flush()
        if not self._paused:
            self._unblock_all()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` follows."""

    # ------------------------------------------------------------------ helpers

    def peer_address(self) -> IAddress:
        """The transport's peer address."""
        assert self.transport is not None
        return self.transport.getPeer()  # type: ignore[no-any-return]

    def describe_peer(self) -> str:
        """``host:port`` of the peer for log lines."""
        try:
            peer: Any = self.peer_address()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "?"
