# -*- test-case-name: tests.unit.test_http_proxy -*-
"""The HTTP proxy front end (default port 20003): SAP's application-facing HTTP/1.1 proxy, parsed with h11.

One client connection is one :class:`HttpProxyProtocol`: Twisted glue around the pure request rules of
:mod:`connproxy.proxy.http_request`. It reads requests with an h11 ``SERVER`` connection (keep-alive, pipelining
held back until the previous answer is out), has each request head decided by
:func:`~connproxy.proxy.http_request.parse_proxy_request`, authorizes the caller, and sends each request through
its own tunnel stream: ``router.endpoint(kind="http")`` opens the stream, the connector decides access from the
OPEN metadata (method, path, upgrade) and accepts once a backend connection is ready; the proxy then writes the
cleaned request into the stream with an h11 ``CLIENT`` connection (so chunked bodies stay well-formed), FIN after
the body, and re-frames the response it parses from the stream onto the client connection. The bytes move
through :mod:`connproxy.relay`: the client side and the stream side (:class:`UpstreamRelay`) are wired for the
duration of one exchange (each transport is the other's producer, so a slow client stops the stream's credit
and a blocked stream pauses the client socket) and unwired afterwards. Each exchange is in one :class:`Phase`;
the legal transitions are in :data:`TRANSITIONS`.

``CONNECT host:port`` (where ``allowConnect``) opens a ``kind="tcp"`` stream, answers 200 and becomes a plain
:class:`~connproxy.relay.Relay`, exactly like the SOCKS5 front end; an upgrade (``101``, WebSocket) does the
same after the backend agreed.

Answers of the proxy itself, each with a short ``text/plain`` body and a log event: 400 (malformed request or
request body, broken header rules), 405 (``https://`` targets; CONNECT where not allowed), 407 with
``Proxy-Authenticate: Bearer`` (missing or invalid token where authorization is on), 408 (request head not
complete within ``handshakeTimeoutSeconds`` of its first byte, or of the accept for a connection's first request;
a connection that sent no byte at all is closed without an answer; a request body too slow, see below), 414
(request line longer than ``maxLineBytes``), 431 (a header line longer than ``maxLineBytes`` or a header block
larger than ``maxHeaderBytes``), 503 with ``Connection: close`` when the front end is at its connection limits
(:class:`~connproxy.proxy.frontend.FrontEndFactory`), and for failed tunnel streams the status of
:func:`connproxy.proxy.replies.http_status_for`: 503 no connector, 403 access denied (the connector's sentence),
502 backend refused or reset, 504 backend or first-byte timeout.

Request body timeout (``bodyTimeoutSeconds``, T): while a request body streams into its tunnel stream, every
window of T seconds must carry at least ``max(1, MIN_BODY_RATE * T)`` body bytes (:data:`MIN_BODY_RATE` bytes/s
on average; so no body progress for T..2T seconds fails too), unless the stream itself holds the body back
(flow control) when the window ends. A body too slow gets 408 if nothing was answered yet (the stream is reset,
the connection closed), else the stream is reset and the client connection cut. The first-byte timeout
(``firstByteTimeoutSeconds``, 504) starts when the request is complete in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Unpack

import h11
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.http.h11relay import H11Relay, HttpError, error_response_events, header_pairs, send_event
from connproxy.http.headers import (
    end_to_end_headers,
    escape_controls,
    forwarded_response_headers,
    has_body,
    header_values,
    upgrade_of,
)
from connproxy.nodelay import set_no_delay
from connproxy.obs import audit
from connproxy.proxy.auth import AuthError
from connproxy.proxy.frontend import Authorizing, FrontEndFactory, FrontEndOptions
from connproxy.proxy.http_request import (
    ProxyRequest,
    RequestRules,
    check_propagation,
    parse_proxy_request,
)
from connproxy.proxy.replies import http_status_for, open_failure_text, reason_for
from connproxy.proxy.routing import Router
from connproxy.relay import Relay, RelayFactory, describe_transport, unwire, wire
from connproxy.tunnel.errors import StreamRefusedError, StreamResetError
from connproxy.tunnel.stream import reset_transport
from connproxy.wire.errors import ErrorCode

#: The average request body rate (bytes/s) each body timeout window must reach.
MIN_BODY_RATE = 100
#: Seconds by which a deadline may be early and still count as due (a delayed call's time is the sum of the
#: clock's time and a delay, which may round below the deadline it was computed from).
_SLACK = 1e-6

# ---------------------------------------------------------------------------------------------------- upstream


class UpstreamRelay(H11Relay):
    """The stream side of one HTTP exchange: writes the request with an h11 ``CLIENT`` connection and parses the
    response, which it hands to the client side (:class:`HttpProxyProtocol`)."""

    def __init__(self, peer: Relay, max_header_bytes: int = 65536) -> None:
        super().__init__(h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes), peer)
        self.front: HttpProxyProtocol | None = peer if isinstance(peer, HttpProxyProtocol) else None
        self.detached = False
        self.got_fin = False

    def can_pump(self) -> bool:
        """Parse only while attached to an exchange."""
        return not self.detached and self.front is not None

    def forward(self, data: bytes) -> None:
        """Raw bytes after an upgrade: they count as activity of the client connection."""
        if self.front is not None:
            self.front.touch()
        super().forward(data)

    def send(self, event: h11.Event) -> None:
        """Serialize a request event into the stream."""
        send_event(self.conn, self.transport, event)

    def early_bytes(self, request: ProxyRequest, whole: bool) -> bytes:
        """Serialize ``request``'s head now, before there is a stream, and with ``whole`` (a request without a
        body) its end too: the bytes go with the OPEN (early data). h11's state moves on as after :meth:`send`."""
        data = self.conn.send(forwarded_request(request))
        if whole:
            data = (data or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        assert data
        return data

    def handle_event(self, event: h11.Event) -> None:
        """Pass a response event to the client side."""
        assert self.front is not None
        self.front.upstream_event(self, event)

    def protocol_error(self, error: h11.RemoteProtocolError) -> None:
        """The response in the stream is not HTTP/1.1."""
        if self.front is not None:
            self.front.upstream_failed(self, 502, f"bad gateway: malformed response from the backend ({error})")

    def internal_error(self) -> None:
        """Passing the response on failed: answer 502 if nothing was answered yet."""
        if self.front is not None:
            self.front.upstream_failed(self, 502, "bad gateway: the proxy could not pass the answer on")

    def readConnectionLost(self) -> None:
        """The connector ended the stream: the response ends (close-delimited) or was cut."""
        self.got_fin = True
        if self.detached:
            return
        super().readConnectionLost()

    def dataReceived(self, data: bytes) -> None:
        """Response bytes; after the exchange ended there must be none."""
        if self.detached:
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The stream ended or was reset."""
        if self.raw:
            super().connectionLost(reason)
            return
        self._lost = True
        front, self.front = self.front, None
        if self.detached or front is None:
            return
        front.upstream_lost(self, reason)


# ---------------------------------------------------------------------------------------------------- exchange


def forwarded_request(request: ProxyRequest) -> h11.Request:
    """The request as it goes into the stream (origin-form target, the headers the proxy keeps).

    Method, target and every header come from the request h11 parsed (and validated) from the client, or are
    built from its validated parts (the Host of an absolute-form target): ``_parsed`` spares validating each header
    again (h11 still checks the framing headers, Host, method and target).
    """
    return h11.Request(method=request.method, target=request.path.encode("ascii", "replace"),
                       headers=request.headers, _parsed=True)


class Phase(Enum):
    """Where one request/answer exchange on a client connection stands.

    Whether the request itself is complete is h11's state (``their_state``), not ours: the body may still be
    coming while the answer is passed on already.
    """

    #: Authorizing and opening the stream; a request body waits in h11's buffer (reading paused).
    ROUTING = "routing"
    #: Refused (no body): the proxy's answer waits for the end of the request.
    REJECTED = "rejected"
    #: The stream is open and the request (body) goes into it; no answer yet (body timeout).
    SENDING = "sending"
    #: The request is complete in the stream; waiting for the answer (first-byte timeout).
    WAITING = "waiting"
    #: The answer is being passed on (the request body may still be going into the stream).
    ANSWERING = "answering"
    #: The answer is complete; the request body is still going into the stream.
    ANSWERED = "answered"
    #: Over: finished, failed, or turned into a tunnel (CONNECT, upgrade).
    ENDED = "ended"


#: The legal transitions of an exchange.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.ROUTING: frozenset({Phase.REJECTED, Phase.SENDING, Phase.WAITING, Phase.ENDED}),
    Phase.REJECTED: frozenset({Phase.ENDED}),
    Phase.SENDING: frozenset({Phase.WAITING, Phase.ANSWERING, Phase.ENDED}),
    Phase.WAITING: frozenset({Phase.ANSWERING, Phase.ENDED}),
    Phase.ANSWERING: frozenset({Phase.ANSWERED, Phase.ENDED}),
    Phase.ANSWERED: frozenset({Phase.ENDED}),
    Phase.ENDED: frozenset(),
}


@dataclass(eq=False)
class _Exchange:
    """One request on a client connection: its phase, what it decided, and the resources it holds."""

    method: bytes
    raw_target: bytes
    has_body: bool
    #: ``Transfer-Encoding`` and ``Content-Length`` together: the connection is not reused afterwards.
    must_close: bool = False
    request: ProxyRequest | None = None
    phase: Phase = Phase.ROUTING
    tenant: str = ""
    rejection: HttpError | None = None
    pending: Deferred[Any] | None = None
    upstream: UpstreamRelay | None = None
    timer: IDelayedCall | None = None
    #: When the first byte of the answer is due (504 after it), on the connection's clock; checked by the
    #: connection's one wake-up call (:meth:`HttpProxyProtocol._wake_up`) instead of a timer per request.
    first_byte_deadline: float | None = None
    body_bytes: int = 0
    #: The whole request (head, no body) went with the OPEN as early data, with the FIN unless it asks for an
    #: upgrade: nothing is written into the stream after ACCEPT. (The head of a request with a body goes early
    #: too; its body, end and FIN follow the ACCEPT.)
    early: bool = False

    def to(self, phase: Phase) -> None:
        """Move to ``phase``.

        :raises RuntimeError: the transition is not in :data:`TRANSITIONS` (a bug; the connection answers 500).
        """
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"HTTP exchange cannot go from {self.phase.name} to {phase.name}")
        self.phase = phase

    @property
    def answering(self) -> bool:
        """Whether the answer of the backend has started (the client can only learn of a failure by a cut)."""
        return self.phase in (Phase.ANSWERING, Phase.ANSWERED)

    @property
    def target(self) -> str:
        """``host:port`` once decided, else (a quote of) the request target, for logs and answers."""
        if self.request is not None:
            return self.request.target
        return escape_controls(self.raw_target[:200].decode("latin-1"))

    def stop_timer(self) -> None:
        """Stop the body timer and the first-byte deadline."""
        self.first_byte_deadline = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def cancel_pending(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()


#: h11's states of the client once its request is complete (a request offering an upgrade, or CONNECT, waits in
#: ``MIGHT_SWITCH_PROTOCOL``).
_REQUEST_COMPLETE = frozenset({h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.MIGHT_SWITCH_PROTOCOL,
                               h11.SWITCHED_PROTOCOL})


def _stream_holds_back(upstream: UpstreamRelay | None) -> bool:
    """Whether the tunnel stream is not taking more bytes now (flow control): a slow body is not the client's
    fault then. Read from :class:`~connproxy.tunnel.stream.TunnelStream`'s producer state where it has one."""
    transport = upstream.transport if upstream is not None else None
    return bool(getattr(transport, "_producer_paused", False))


@implementer(IPushProducer)
class _OwnAnswers:
    """Backpressure for the answers the proxy writes itself (errors), when no stream is wired to the client.

    Registered as the client transport's producer while such answers are written: when they pile up unread,
    the transport pauses us and we stop reading the client's further (pipelined) requests until it drains.
    """

    def __init__(self, protocol: HttpProxyProtocol) -> None:
        self.protocol = protocol
        self.registered = False
        self.paused = False

    def watch(self) -> None:
        transport: Any = self.protocol.transport
        if not self.registered and transport is not None and getattr(transport, "producer", None) is None:
            transport.registerProducer(self, True)
            self.registered = True

    def release(self) -> None:
        """Before a stream is wired to the client (it becomes the producer then)."""
        transport: Any = self.protocol.transport
        if self.registered and transport is not None:
            transport.unregisterProducer()
        self.registered = False
        if self.paused:
            self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        transport: Any = self.protocol.transport
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        protocol = self.protocol
        transport: Any = protocol.transport
        if transport is not None and protocol.exchange is None and not protocol._closing:
            transport.resumeProducing()
            protocol.pump()

    def stopProducing(self) -> None:
        self.paused = False


class HttpProxyProtocol(H11Relay):
    """One application connection to the HTTP proxy; see the module docstring."""

    log = Logger()

    def __init__(self, factory: HttpProxyFactory) -> None:
        super().__init__(h11.Connection(h11.SERVER, max_incomplete_event_size=factory.max_header_bytes))
        self.factory = factory
        self._own_answers = _OwnAnswers(self)
        self.exchange: _Exchange | None = None
        self.tunnel_mode = False
        self.requests = 0
        self._probe = b""
        self._received = 0
        #: When the current request head must be complete (408 after it), or None.
        self._head_deadline: float | None = None
        #: The one delayed call that checks the deadlines (head, first byte); it may fire early (a deadline that
        #: was met meanwhile) and then re-arms for what is still due, so no request creates or cancels a timer.
        self._wake: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._last_activity = 0.0
        self._closing = False

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        """Set TCP_NODELAY, start the idle timer and the timer of the first request head (counted from now)."""
        set_no_delay(self.transport)
        self.touch()
        self._idle_timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle_check)
        self._start_head_timer()

    def touch(self) -> None:
        """Note traffic on the connection (either direction) for the idle timeout."""
        self._last_activity = self.factory.clock.seconds()

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.transport is None or self._lost:
            return
        idle = self.factory.clock.seconds() - self._last_activity
        if idle < self.factory.idle_timeout:
            self._idle_timer = self.factory.clock.callLater(self.factory.idle_timeout - idle, self._idle_check)
            return
        self.log.info(
            "HTTP client {client} idle for {timeout}s: closing", client=self._client(),
            timeout=self.factory.idle_timeout,
        )
        if self.tunnel_mode and self.peer is not None:
            # A CONNECT or upgraded relay cut short by the timeout: RESET IDLE_TIMEOUT (spec section 4).
            reset_transport(self.peer.transport, ErrorCode.IDLE_TIMEOUT, f"idle for {self.factory.idle_timeout:g}s")
        self._abort_all()

    def _client(self) -> str:
        return describe_transport(self.transport)

    def _request_complete(self) -> bool:
        """Whether h11 has seen the whole current request (its ``EndOfMessage`` was handled)."""
        return self.conn.their_state in _REQUEST_COMPLETE

    def dataReceived(self, data: bytes) -> None:
        """Parse requests (HTTP mode) or relay raw bytes (after CONNECT or an upgrade)."""
        self.touch()
        if self.tunnel_mode:
            super().dataReceived(data)
            return
        if self._closing:
            return
        self._received += len(data)
        if self.exchange is None and self.conn.their_state is h11.IDLE and not self._check_request_line(data):
            return
        super().dataReceived(data)
        if self.exchange is not None and not self.tunnel_mode and not self.can_pump() and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]  # held (routing): read no further

    def _start_head_timer(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.factory.clock.seconds() + self.factory.header_timeout
            self._arm(self._head_deadline)

    def _arm(self, deadline: float) -> None:
        """Make sure :meth:`_wake_up` runs by ``deadline``."""
        wake = self._wake
        if wake is not None:
            if wake.active() and wake.getTime() <= deadline:
                return
            if wake.active():
                wake.cancel()
        clock = self.factory.clock
        self._wake = clock.callLater(max(0.0, deadline - clock.seconds()), self._wake_up)

    def _wake_up(self) -> None:
        """Run the deadlines that are due (head: 408; first byte: 504), re-arm for those still ahead."""
        self._wake = None
        if self.transport is None or self._lost:
            return
        now = self.factory.clock.seconds() + _SLACK
        head = self._head_deadline
        if head is not None and head <= now:
            self._head_timed_out()
        ex = self.exchange
        if ex is not None and ex.first_byte_deadline is not None and ex.first_byte_deadline <= now:
            self._first_byte_timed_out(ex)
        due = [d for d in (self._head_deadline,
                           self.exchange.first_byte_deadline if self.exchange is not None else None) if d is not None]
        if due and not self._lost and not self._closing:
            self._arm(min(due))

    def _check_request_line(self, data: bytes) -> bool:
        """Watch the bytes of a request head until its first line ended: 414 when it is too long."""
        if self._head_deadline is None and data.strip(b"\r\n"):
            self._start_head_timer()
        limit = self.factory.max_line_bytes
        self._probe = (self._probe + data).lstrip(b"\r\n")[: limit + 2]
        end = self._probe.find(b"\n")
        if end < 0 and len(self._probe) > limit + 1:
            self._fail_and_close(HttpError(414, f"request line longer than {limit} bytes"))
            return False
        return True

    def _head_timed_out(self) -> None:
        """No complete request head in time: 408, or just close a connection that never sent a byte."""
        self._head_deadline = None
        if self.exchange is not None or self.tunnel_mode or self.transport is None or self._closing:
            return
        timeout = self.factory.header_timeout
        if not self._received:
            self.log.info("HTTP client {client} sent nothing within {timeout}s of connecting: closing",
                          client=self._client(), timeout=timeout)
            self._close()
            return
        self.log.info("HTTP client {client}: request head not complete within {timeout}s (408)",
                      client=self._client(), timeout=timeout)
        self._fail_and_close(HttpError(408, f"request head not complete within {timeout:g}s"))

    def _cancel_head_timer(self) -> None:
        self._head_deadline = None  # the wake-up call stays: it finds nothing due and re-arms for what is
        self._probe = b""

    def can_pump(self) -> bool:
        """Hold body events while the request is being authorized and routed."""
        ex = self.exchange
        return not self._closing and (ex is None or ex.phase is not Phase.ROUTING or not ex.has_body)

    def protocol_error(self, error: h11.RemoteProtocolError) -> None:
        """A malformed request or request body (the client's fault): 400, or 431 when the header block is too
        large. A body that broke off mid-way resets its stream first (the backend must not take a truncated
        request as complete); once an answer is under way the client connection is cut instead."""
        status = error.error_status_hint or 400
        ex = self.exchange
        if status == 431:
            text = f"request header block larger than {self.factory.max_header_bytes} bytes"
        elif ex is not None:
            text = f"malformed request body: {error}"
        else:
            text = f"malformed request: {error}"
        self.log.info("HTTP client {client} sent a malformed request: {error} ({status})", client=self._client(),
                      error=str(error), status=status)
        if ex is not None:
            ex.cancel_pending()
            self._drop_upstream(ex)
        self._fail_and_close(HttpError(status, text))

    def internal_error(self) -> None:
        """Handling the request failed (a bug, logged already): 500, never a traceback."""
        self._fail_and_close(HttpError(500, "internal error in the proxy"))

    # ------------------------------------------------------------------ requests

    def handle_event(self, event: h11.Event) -> None:
        """Decide on a request head; pass body events into the stream."""
        ex = self.exchange
        if isinstance(event, h11.Request):
            self._cancel_head_timer()
            self._begin(event)
        elif isinstance(event, h11.Data):
            if ex is not None and ex.upstream is not None and ex.phase is not Phase.ROUTING:
                ex.upstream.send(event)
                ex.body_bytes += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            if ex is None:
                return
            if ex.phase is Phase.REJECTED:
                self._answer(ex)
            elif ex.upstream is not None and ex.phase is not Phase.ROUTING:
                self._end_request(ex)
            # ROUTING: h11's state records that the request is complete
        elif isinstance(event, h11.ConnectionClosed):
            if ex is None:
                self._close()

    def _begin(self, request: h11.Request) -> None:
        self.requests += 1
        headers = header_pairs(request.headers)
        ex = _Exchange(method=request.method, raw_target=request.target, has_body=has_body(headers),
                       must_close=bool(header_values(headers, b"transfer-encoding")
                                       and header_values(headers, b"content-length")))
        self.exchange = ex
        try:
            ex.request = parse_proxy_request(request.method, request.target, headers, self.factory.rules)
        except HttpError as error:
            self._refused(ex, error)
            return
        # The client socket is not paused here (two epoll_ctl calls per request): bytes that arrive while the
        # request is routed and cannot be taken pause it then (:meth:`dataReceived`), one read at most.
        d = self.factory.authorizer.authorize(proxy_token=ex.request.proxy_token,
                                              service_token=ex.request.service_token)
        ex.pending = d
        d.addCallbacks(self._authorized, self._auth_failed, callbackArgs=(ex,), errbackArgs=(ex,))
        d.addErrback(self._bug, ex)

    def _refused(self, ex: _Exchange, error: HttpError) -> None:
        self.log.info(
            "HTTP {client} {method} {target} refused: {status} {reason}", client=self._client(),
            method=ex.method.decode("latin-1"), target=ex.target, status=error.status,
            reason=escape_controls(error.message),
        )
        self._reject(ex, error)

    # ------------------------------------------------------------------ authorization and routing

    def _current(self, ex: _Exchange) -> bool:
        return self.exchange is ex and self.transport is not None and not self._lost and not self._closing

    def _auth_failed(self, failure: Failure, ex: _Exchange) -> None:
        ex.pending = None
        if not self._current(ex) or failure.check(CancelledError):
            return
        error = failure.value
        if not isinstance(error, AuthError):
            failure.raiseException()
        assert isinstance(error, AuthError)
        status = error.http_status
        self.log.info(
            "HTTP {client} {method} {target} not authorized: {reason} ({status})", client=self._client(),
            method=ex.method.decode("latin-1"), target=ex.target, reason=str(error), status=status,
        )
        audit.proxy_call_refused(
            front_end="http", tenant=None, client_id=None, reason=error.reason, peer=self._client(),
            writer=self.factory.audit_writer,
        )
        headers = [(b"proxy-authenticate", b"Bearer")] if status == 407 else []
        self._reject(ex, HttpError(status, str(error), headers))

    def _authorized(self, caller: Any, ex: _Exchange) -> None:
        ex.pending = None
        request = ex.request
        if not self._current(ex) or request is None:
            return
        try:
            check_propagation(request, authorization_enabled=self.factory.authorization_enabled)
        except HttpError as error:
            self._refused(ex, error)
            return
        ex.tenant = caller.tenant
        meta = request.meta(self._client())
        meta["client_id"] = caller.client_id
        self._own_answers.release()  # the stream becomes the client transport's producer
        endpoint = self.factory.router.endpoint(
            tenant=caller.tenant, location=request.location, host=request.host, port=request.port,
            kind=request.kind, meta=meta,
        )
        if request.connect:
            d = endpoint.connect(RelayFactory(self, _TunnelSide))
        else:
            # The head travels with the OPEN (one tunnel round trip and one write less per request); without a body
            # the whole request does, and the FIN too unless the backend may switch protocols. A body waits for
            # the ACCEPT (the connector's decision comes first: spec 7.2).
            upstream = UpstreamRelay(self, self.factory.max_header_bytes)
            ex.early = not ex.has_body
            d = endpoint.connect(RelayFactory(self, lambda peer: upstream),
                                 upstream.early_bytes(request, whole=ex.early),
                                 early_fin=ex.early and request.upgrade is None)
        ex.pending = d
        d.addCallbacks(self._connected, self._open_failed, callbackArgs=(ex,), errbackArgs=(ex,))
        d.addErrback(self._bug, ex)

    def _open_failed(self, failure: Failure, ex: _Exchange) -> None:
        ex.pending = None
        if failure.check(CancelledError) or not self._current(ex):
            return
        status = http_status_for(failure)
        message = open_failure_text(failure, ex.target)
        location = ex.request.location if ex.request is not None else ""
        self.log.info(
            "HTTP {client} {method} {target} (subaccount {tenant}, location {location}) failed: {error} "
            "({status})", client=self._client(), method=ex.method.decode("latin-1"), target=ex.target,
            tenant=escape_controls(ex.tenant), location=escape_controls(location) or "(default)",
            error=escape_controls(str(failure.value)), status=status,
        )
        self._reject(ex, HttpError(status, message))

    def _bug(self, failure: Failure, ex: _Exchange) -> None:
        self.log.failure("HTTP proxy bug while handling {target}", failure, target=ex.target)
        if self._current(ex):
            self._fail_and_close(HttpError(500, "internal error in the proxy"))

    def _connected(self, protocol: Any, ex: _Exchange) -> None:
        ex.pending = None
        request = ex.request
        if not self._current(ex) or request is None:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            return
        if request.connect:
            self._start_tunnel(ex, protocol)
            return
        upstream: UpstreamRelay = protocol
        ex.upstream = upstream  # its head went with the OPEN
        if self._request_complete():
            self._end_request(ex)
        else:
            ex.to(Phase.SENDING)
            if ex.has_body:
                ex.timer = self.factory.clock.callLater(self.factory.body_timeout, self._body_check, ex)
            if self.conn.they_are_waiting_for_100_continue:
                self._send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        self.pump()

    def _body_check(self, ex: _Exchange) -> None:
        """The end of a body timeout window: the body must have made enough progress (module docstring)."""
        ex.timer = None
        if not self._current(ex) or ex.upstream is None or self._request_complete():
            return
        timeout = self.factory.body_timeout
        need = max(1, int(MIN_BODY_RATE * timeout))
        got, ex.body_bytes = ex.body_bytes, 0
        if got >= need or _stream_holds_back(ex.upstream):
            ex.timer = self.factory.clock.callLater(timeout, self._body_check, ex)
            return
        self.log.info(
            "HTTP client {client} {method} {target}: request body too slow ({bytes} bytes in {timeout}s, at least "
            "{need} required)", client=self._client(), method=ex.method.decode("latin-1"), target=ex.target,
            bytes=got, timeout=timeout, need=need,
        )
        self._fail_and_close(HttpError(
            408, f"request body too slow: {got} bytes in {timeout:g}s, at least {need} required"))

    def _end_request(self, ex: _Exchange) -> None:
        """The request is complete: end it in the stream (FIN unless the stream may switch protocols); wait for
        the answer (first-byte timeout), or finish when the answer is complete already."""
        upstream, request = ex.upstream, ex.request
        assert upstream is not None and request is not None
        ex.stop_timer()
        if not ex.early:  # else the end (and the FIN) went with the OPEN
            upstream.send(h11.EndOfMessage())
            if request.upgrade is None and upstream.transport is not None:
                upstream.transport.loseWriteConnection()  # type: ignore[attr-defined]
        if ex.phase in (Phase.ROUTING, Phase.SENDING):
            ex.to(Phase.WAITING)
            ex.first_byte_deadline = self.factory.clock.seconds() + self.factory.first_byte_timeout
            self._arm(ex.first_byte_deadline)
        elif ex.phase is Phase.ANSWERED:
            self._finish(ex)

    def _start_tunnel(self, ex: _Exchange, far: Relay) -> None:
        self._send(h11.Response(status_code=200, headers=[], reason=reason_for(200)))
        location = ex.request.location if ex.request is not None else ""
        self.log.debug(
            "HTTP CONNECT {client} -> {target} (subaccount {tenant}, location {location}) connected",
            client=self._client(), target=ex.target, tenant=escape_controls(ex.tenant),
            location=escape_controls(location) or "(default)",
        )
        ex.to(Phase.ENDED)
        self.exchange = None
        self._enter_tunnel_mode()
        wire(self, far)
        data, closed = self.conn.trailing_data
        if data:
            self.forward(data)
        if closed:
            Relay.readConnectionLost(self)

    def _enter_tunnel_mode(self) -> None:
        self.tunnel_mode = True
        self.raw = True
        self._cancel_head_timer()

    # ------------------------------------------------------------------ responses

    def _first_byte_timed_out(self, ex: _Exchange) -> None:
        ex.first_byte_deadline = None
        if not self._current(ex) or ex.phase is not Phase.WAITING:
            return
        self.log.info(
            "HTTP {client} {method} {target}: no answer from the backend within {timeout}s",
            client=self._client(), method=ex.method.decode("latin-1"), target=ex.target,
            timeout=self.factory.first_byte_timeout,
        )
        self._drop_upstream(ex)
        self._fail_and_close(HttpError(
            504, f"gateway timeout: system {ex.target} did not answer within {self.factory.first_byte_timeout:g}s"))

    def upstream_event(self, upstream: UpstreamRelay, event: h11.Event) -> None:
        """A response event parsed from the stream."""
        ex = self.exchange
        if ex is None or ex.upstream is not upstream or ex.request is None:
            return
        self.touch()
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and ex.request.upgrade is not None:
                self._switch(ex, event)
            elif event.status_code != 100:
                self._send(h11.InformationalResponse(
                    status_code=event.status_code, headers=end_to_end_headers(header_pairs(event.headers)),
                    reason=event.reason))
            return
        if isinstance(event, h11.Response):
            if ex.phase is Phase.WAITING:
                ex.stop_timer()  # the first-byte timer; a body timer goes on while the body streams
            ex.to(Phase.ANSWERING)
            headers = forwarded_response_headers(header_pairs(event.headers))
            # Every part comes from the response h11 parsed (and validated) from the stream, only filtered:
            # ``_parsed`` spares validating each header again with h11's regular expressions.
            self._send(h11.Response(status_code=event.status_code, headers=headers, reason=event.reason,
                                    _parsed=True))
        elif isinstance(event, h11.Data):
            self._send(event)
        elif isinstance(event, h11.EndOfMessage):
            self._send(h11.EndOfMessage())  # trailers are not passed on
            ex.to(Phase.ANSWERED)
            if self._request_complete():
                self._finish(ex)
        elif isinstance(event, h11.ConnectionClosed):
            self.upstream_failed(upstream, 502, f"bad gateway: system {ex.target} sent no complete answer")

    def _switch(self, ex: _Exchange, event: h11.InformationalResponse) -> None:
        upstream, request = ex.upstream, ex.request
        assert upstream is not None and request is not None and request.upgrade is not None
        ex.stop_timer()
        pairs = header_pairs(event.headers)
        headers = end_to_end_headers(pairs) + [(b"connection", b"upgrade"),
                                               (b"upgrade", upgrade_of(pairs) or request.upgrade)]
        self._send(h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason))
        self.log.debug("HTTP {client} upgraded to {protocol} with {target}", client=self._client(),
                       protocol=escape_controls(request.upgrade.decode("latin-1")), target=ex.target)
        ex.to(Phase.ENDED)
        self.exchange = None
        self._enter_tunnel_mode()
        upstream.switch_to_raw()
        self.switch_to_raw()

    def upstream_failed(self, upstream: UpstreamRelay, status: int, message: str) -> None:
        """The exchange cannot complete (the backend's side failed): answer ``status`` if nothing was answered
        yet, else cut the client off."""
        ex = self.exchange
        if ex is None or ex.upstream is not upstream:
            return
        self.log.info(
            "HTTP {client} {method} {target} failed: {status} {reason}", client=self._client(),
            method=ex.method.decode("latin-1"), target=ex.target, status=status, reason=escape_controls(message),
        )
        self._drop_upstream(ex)
        if ex.answering:
            self._abort_all()
        else:
            self._fail_and_close(HttpError(status, message))

    def upstream_lost(self, upstream: UpstreamRelay, reason: Failure) -> None:
        """The stream ended before the exchange did."""
        ex = self.exchange
        if ex is None or ex.upstream is not upstream or ex.phase is Phase.ANSWERED:
            return
        if reason.check(StreamResetError):
            error: Any = reason.value
            refused = Failure(StreamRefusedError(error.code, error.reason))
            self.upstream_failed(upstream, http_status_for(refused), open_failure_text(refused, ex.target))
        else:
            self.upstream_failed(upstream, 502, f"bad gateway: system {ex.target} sent no complete answer")

    def _drop_upstream(self, ex: _Exchange) -> None:
        """Detach the exchange's stream and reset it (never a FIN: whatever it carried is incomplete)."""
        ex.stop_timer()
        upstream, ex.upstream = ex.upstream, None
        if upstream is None:
            return
        upstream.detached = True
        unwire(self, upstream)
        if upstream.transport is not None and not upstream._lost:
            upstream.transport.abortConnection()  # type: ignore[attr-defined]

    def _finish(self, ex: _Exchange) -> None:
        """Both directions of the exchange are complete: release the stream and take the next request."""
        upstream = ex.upstream
        ex.stop_timer()
        ex.to(Phase.ENDED)
        self.exchange = None
        if upstream is not None:
            upstream.detached = True
            unwire(self, upstream)
            if not upstream._lost and not upstream.got_fin:
                # The connector's FIN normally follows its last DATA at once; close if it does not.
                self.factory.close_soon(upstream)
        if ex.must_close:
            self._close()  # RFC 9112 6.1: Transfer-Encoding and Content-Length together: no reuse
            return
        self._next_cycle()

    def _next_cycle(self) -> None:
        if self.transport is None or self._lost:
            return
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            if not self._own_answers.paused:
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            trailing, _closed = self.conn.trailing_data
            if trailing.strip(b"\r\n") and self._head_deadline is None:
                self._start_head_timer()  # a pipelined request head has begun: it must complete in time
            self.pump()
        else:
            self._close()

    # ------------------------------------------------------------------ answers of our own

    def _send(self, event: h11.Event) -> None:
        if self.transport is None:
            return
        try:
            send_event(self.conn, self.transport, event)
        except h11.LocalProtocolError:
            self.log.failure("HTTP proxy could not send {event}", event=type(event).__name__)
            self._abort_all()

    def _reject(self, ex: _Exchange, error: HttpError) -> None:
        """Answer ``error`` for the current request: after its (empty) body, or at once and close."""
        ex.rejection = error
        ex.to(Phase.REJECTED)
        if self._request_complete():
            self._answer(ex)
            return
        if ex.has_body:
            self._fail_and_close(error)
            return
        assert self.transport is not None
        if not self._own_answers.paused:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.pump()

    def _answer(self, ex: _Exchange) -> None:
        """Send the answer of a rejected request whose body was read; keep the connection.

        While our own answers pile up unread (a client pipelining requests it never reads the answers of), we
        stop reading: a push producer on the client transport pauses and resumes reading with its buffer.
        """
        error = ex.rejection
        assert error is not None
        ex.to(Phase.ENDED)
        self.exchange = None
        for event in error_response_events(error.status, error.message, error.headers, head=ex.method == b"HEAD",
                                           reason=reason_for(error.status)):
            self._send(event)
        if ex.must_close:
            self._close()
            return
        self._own_answers.watch()
        self._next_cycle()

    def _fail_and_close(self, error: HttpError) -> None:
        """Answer ``error`` (if no answer started) and close once it is written."""
        if self.transport is None or self._closing:
            return
        ex = self.exchange
        if ex is not None:
            ex.cancel_pending()
            self._drop_upstream(ex)
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            # An answer is under way (or the state is broken): the client can only learn of it by the cut.
            self._abort_all()
            return
        head = ex is not None and ex.method == b"HEAD"
        try:
            for event in error_response_events(error.status, error.message, error.headers, close=True, head=head,
                                               reason=reason_for(error.status)):
                send_event(self.conn, self.transport, event)
        except h11.LocalProtocolError:
            self.log.failure("HTTP proxy could not answer {status}", status=error.status)
            self._abort_all()
            return
        self._close()

    def _close(self) -> None:
        """Close after the buffered answer is written."""
        self._closing = True
        self.exchange = None
        self._cancel_head_timer()
        if self.transport is not None and not self._lost:
            self.transport.loseConnection()

    def _abort_all(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.cancel_pending()
            self._drop_upstream(ex)
        self._closing = True
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Cancel what is pending (an open in flight resets its stream), stop the timers, close the peer and free
        the connection's place in the front end's limits."""
        self.factory.release(self)
        self._cancel_head_timer()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.cancel_pending()
            self._drop_upstream(ex)
        if self.tunnel_mode:
            super().connectionLost(reason)
        else:
            self._lost = True


class _TunnelSide(Relay):
    """The stream side of a CONNECT tunnel: wired by the front end once its 200 is written, not before."""

    def connectionMade(self) -> None:
        """Hold what the stream sends until wired."""

    def forward(self, data: bytes) -> None:
        """Bytes towards the client count as activity of the client connection."""
        if isinstance(self.peer, HttpProxyProtocol):
            self.peer.touch()
        super().forward(data)


def _close_if_open(upstream: UpstreamRelay) -> None:
    if not upstream._lost and upstream.transport is not None:
        upstream.transport.loseConnection()


class _Busy(Protocol):
    """A connection over the front end's limits: a short 503 with ``Connection: close``, then closed."""

    BODY = b"service unavailable: too many connections to the HTTP proxy, try again later\n"

    def connectionMade(self) -> None:
        """Answer and close (whatever the client sent is not read)."""
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 503 %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (reason_for(503), len(self.BODY), self.BODY)
        )
        self.transport.loseConnection()


class HttpProxyFactory(FrontEndFactory):
    """Builds :class:`HttpProxyProtocol` for the HTTP proxy listener (connection limits: see
    :class:`~connproxy.proxy.frontend.FrontEndFactory`; over them a connection gets :class:`_Busy`'s 503).

    :param header_timeout: seconds a request head has to complete from its first byte, the first request of a
        connection from the accept (408; a connection that sent nothing is closed without an answer).
    :param body_timeout: the request body timeout window in seconds (408; see the module docstring).
    :param first_byte_timeout: seconds a request may wait for the first byte of its answer, counted from its
        last request byte sent (504).
    :param idle_timeout: seconds a client connection may stay without traffic before it is closed.
    """

    front_end = "http"

    def __init__(
        self,
        router: Router,
        authorizer: Authorizing,
        clock: IReactorTime,
        *,
        allow_connect: bool = True,
        max_line_bytes: int = 8192,
        max_header_bytes: int = 65536,
        header_timeout: float = 30.0,
        body_timeout: float = 60.0,
        first_byte_timeout: float = 120.0,
        **common: Unpack[FrontEndOptions],
    ) -> None:
        super().__init__(router, authorizer, clock, **common)
        self.rules = RequestRules(max_line_bytes=max_line_bytes, max_header_bytes=max_header_bytes,
                                  allow_connect=allow_connect)
        self.allow_connect = allow_connect
        self.max_line_bytes = max_line_bytes
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.first_byte_timeout = first_byte_timeout
        self._awaiting_fin: list[UpstreamRelay] = []

    def close_soon(self, upstream: UpstreamRelay) -> None:
        """Close ``upstream``'s stream in the next reactor iteration unless its FIN came meanwhile: one delayed
        call for all the streams of an iteration (the FIN normally comes in the same read)."""
        self._awaiting_fin.append(upstream)
        if len(self._awaiting_fin) == 1:
            self.clock.callLater(0, self._close_awaiting)

    def _close_awaiting(self) -> None:
        awaiting, self._awaiting_fin = self._awaiting_fin, []
        for upstream in awaiting:
            _close_if_open(upstream)

    def build(self, addr: IAddress | None) -> HttpProxyProtocol:
        """A new client connection within the limits."""
        return HttpProxyProtocol(self)

    def refusal(self, addr: IAddress | None) -> Protocol | None:
        """Over the limits: a 503 and close."""
        return _Busy()
