# -*- test-case-name: tests.unit.test_relay -*-
"""The one relay: splices two byte connections with backpressure and half-close, whatever carries them.

A :class:`Relay` protocol sits on each of the two connections (a client socket, a tunnel stream, a backend
socket). Once both are connected they are *wired*: each transport is registered as the other's streaming
producer, so a slow reader pauses the far sender instead of growing buffers (a paused tunnel stream stops
returning window credit). A FIN on one side becomes ``loseWriteConnection`` on the other; a connection is closed
once both of its directions are done. An abnormal loss on one side aborts the other.

Every front end (SOCKS5, HTTP CONNECT) and the connector's backend side use this module. The HTTP paths reuse
the same splice per request: :meth:`Relay.forward` is the hook through which a wired side passes what it read
(the HTTP relays re-frame it with h11 there instead of copying it), and :func:`unwire` ends the splice between
two sides without closing either, so that a keep-alive client connection or a pooled backend connection can be
wired to the next request's stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: Bytes a relay side holds for a peer that is not connected yet (pipelined client data); beyond it the
#: transport is paused.
MAX_BACKLOG = 256 * 1024


@implementer(IHalfCloseableProtocol)
class Relay(Protocol):
    """One side of a relay. Subclasses (the SOCKS5 front end) may negotiate first and relay afterwards.

    :ivar peer: the other side, or ``None`` until linked.
    """

    log = Logger()

    def __init__(self, peer: Relay | None = None) -> None:
        self.peer: Relay | None = None
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._wired = False
        self._read_done = False
        self._write_done = False
        self._lost = False
        self._backlog_fin = False
        if peer is not None:
            link(self, peer)

    @property
    def wired(self) -> bool:
        """True once both sides are connected and relaying."""
        return self._wired

    def connectionMade(self) -> None:
        """Wire the relay if the peer is connected already."""
        peer = self.peer
        if peer is not None and peer.connected and not peer._lost:
            wire(self, peer)

    #: Bytes read on this side (for idle detection without a timer per chunk).
    bytes_read = 0

    def dataReceived(self, data: bytes) -> None:
        """Pass bytes to the peer (through :meth:`forward`), or hold them (bounded) until the relay is wired."""
        self.bytes_read += len(data)
        if self._wired:
            self.forward(data)
        else:
            self.hold(data)

    def forward(self, data: bytes) -> None:
        """Hook: pass bytes read on this side to the wired peer; by default write them to its transport as they are.

        Subclasses that transform the byte stream (the HTTP relays parse and re-frame it) override this; whatever
        they write to the peer's transport stays under the peer's flow control, because the transports are each
        other's producers while wired.
        """
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def hold(self, data: bytes) -> None:
        """Keep ``data`` for the peer until wired; pause reading when the backlog passes :data:`MAX_BACKLOG`."""
        if not data:
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > MAX_BACKLOG and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def readConnectionLost(self) -> None:
        """Our side sent FIN: half-close the peer's write side (or remember it until wired)."""
        self._read_done = True
        if self._wired:
            assert self.peer is not None
            self.peer.half_close_write()
        else:
            self._backlog_fin = True
        self._maybe_close()

    def half_close_write(self) -> None:
        """Shut our transport's write side once its buffer is flushed (FIN, or a tunnel FIN frame)."""
        transport = self.transport
        if transport is None or self._lost:
            return
        # Nothing will come from the peer any more: a still-registered (paused) producer would make Twisted's
        # transport resume it instead of shutting down once its buffer is flushed.
        _unregister(transport)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is None:
            # TLS in Twisted cannot half-close: keep the connection until the other direction ends too.
            self._write_done = True
            self._maybe_close()
            return
        lose_write()

    def writeConnectionLost(self) -> None:
        """Our write side is shut; close once the read side is done as well."""
        self._write_done = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._read_done and self._write_done and self.transport is not None and not self._lost:
            _unregister(self.transport)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Close the peer: gracefully after a clean close, by abort after an error."""
        self._lost = True
        self._backlog = []
        _drop_write_buffer(self.transport)
        peer = self.peer
        if peer is None or peer._lost or peer.transport is None:
            return
        _unregister(peer.transport)
        if reason.check(ConnectionDone):
            peer.transport.loseConnection()
        else:
            abort = getattr(peer.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                peer.transport.loseConnection()


def _drop_write_buffer(transport: Any) -> None:
    """Forget what a lost TCP transport still held for writing (up to the peer's window of a stalled reader).

    Twisted keeps a lost transport's write buffer for as long as anything refers to the transport (a log event's
    ``log_source``, a protocol kept for its counters), which turned every stalled download into MiB kept after it
    ended (``bench/waves.py``, ``docs/reliability.md``).
    """
    if transport is None:
        return
    if isinstance(getattr(transport, "_tempDataBuffer", None), list):
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
    if isinstance(getattr(transport, "dataBuffer", None), bytes):
        transport.dataBuffer = b""
        transport.offset = 0


def _unregister(transport: Any) -> None:
    unregister = getattr(transport, "unregisterProducer", None)
    if unregister is not None and getattr(transport, "producer", True) is not None:
        unregister()


def link(a: Relay, b: Relay) -> None:
    """Make ``a`` and ``b`` peers; they wire themselves once both are connected."""
    a.peer = b
    b.peer = a


def wire(a: Relay, b: Relay) -> None:
    """Start relaying between two connected sides: producers both ways, then flush what each held back."""
    if a._wired:
        return
    assert a.transport is not None and b.transport is not None
    a._wired = b._wired = True
    a.transport.registerProducer(b.transport, True)  # type: ignore[attr-defined]
    b.transport.registerProducer(a.transport, True)  # type: ignore[attr-defined]
    for side, other in ((a, b), (b, a)):
        backlog, side._backlog, side._backlog_bytes = side._backlog, [], 0
        for chunk in backlog:
            side.forward(chunk)
        if side._backlog_fin:
            other.half_close_write()
    for side in (a, b):
        resume = getattr(side.transport, "resumeProducing", None)
        if resume is not None and not side._read_done:
            resume()


def unwire(a: Relay, b: Relay) -> None:
    """Stop relaying between ``a`` and ``b`` without closing either: drop the producer registrations both ways and
    the peer links.

    Neither transport is resumed here: a side that goes on reading (a keep-alive client connection waiting for its
    next request, a pooled backend connection) resumes its own transport, since the far side may have paused it.
    """
    for side in (a, b):
        side._wired = False
        if side.transport is not None and not side._lost:
            _unregister(side.transport)
    if a.peer is b:
        a.peer = None
    if b.peer is a:
        b.peer = None


class RelayFactory(Factory):
    """Builds the far side of a relay for ``endpoint.connect``: a :class:`Relay` linked to ``peer``.

    :param relay: what to build, called with ``peer``: :class:`Relay` by default, or a subclass that re-frames
        the bytes (the HTTP paths).
    """

    def __init__(self, peer: Relay, relay: Callable[[Relay], Relay] = Relay) -> None:
        self.peer = peer
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> Relay:
        """Return a new relay side linked to the near side."""
        return self.relay(self.peer)


def describe_transport(transport: ITransport | Any) -> str:
    """``host:port`` of the transport's peer for log lines, or ``"?"``."""
    try:
        peer: Any = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"
