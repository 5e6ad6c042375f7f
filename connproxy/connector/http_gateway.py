# -*- test-case-name: tests.unit.test_connector_http -*-
"""The connector's HTTP and HTTPS mappings: access control per request, then the request to the backend.

The proxy opens one ``kind="http"`` stream per request, with the request's method, origin-form target and
upgrade offer in the OPEN metadata (``meta["http"]``). :class:`HttpGateway` decides on the OPEN, before any body
travels: the mapping of the virtual host and port must be ``HTTP`` or ``HTTPS``, a resource must admit the path
(:func:`connproxy.connector.acl.allows_path`: exact or with all sub-paths, case-sensitive, query ignored)
and, for an ``Upgrade`` request, allow upgrades. Every decision is an audit event
(:func:`connproxy.obs.audit.access_decision`). A refusal is a RESET ``ACCESS_DENIED`` whose reason is the sentence
the proxy answers with 403: ``access denied to system vhost:vport`` or ``access denied to path /x on system
vhost:vport``.

An allowed request gets a backend connection from :class:`BackendPool` (idle keep-alive connections per
backend, bounded in number and idle time; new ones through the dialer's endpoint, TLS with certificate
verification for ``HTTPS``), and the stream is accepted once it is ready; a failed connection is a RESET with
the code of :func:`connproxy.connector.backend.reset_code_for` (the proxy answers 502 or 504).

On the accepted stream, :class:`HttpStreamServer` (h11 ``SERVER``) reads the request, checks that it is the
one the OPEN described, and writes it to the backend with :class:`HttpBackend`'s h11 ``CLIENT`` connection:
``Host`` is the virtual host or, with ``hostInHeader: internal``, the internal one (the virtual one then in
``X-Forwarded-Host``). The response comes back the same way; a ``Location`` that points at the internal host
and port is mapped back to the virtual ones. After ``101 Switching Protocols`` both directions are a raw relay.
The stream ends with FIN after the response and the backend connection goes back to the pool if both sides
kept it alive. Bytes move through :mod:`connproxy.relay` (the stream and the backend connection are wired for
one exchange), so credit and socket reads stop where a reader is slow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import h11
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.config import AccessRule, ConnectorConfig, Resource
from connproxy.connector import acl
from connproxy.connector.access import Decision, describe_mapping
from connproxy.connector.backend import OneShotFactory, backend_failed, reset_code_for, track_backend_connect
from connproxy.http.h11relay import H11Relay, header_pairs, send_event
from connproxy.http.headers import (
    forwarded_request_headers,
    forwarded_response_headers,
    header_values,
    upgrade_of,
)
from connproxy.nodelay import set_no_delay
from connproxy.obs import audit
from connproxy.relay import link, unwire, wire
from connproxy.wire.errors import ErrorCode

#: Largest request or response head accepted on either side (SCC: 64 KiB request headers).
MAX_HEAD_BYTES = 65536
#: Methods whose bodiless requests are sent again when a reused backend connection turns out to be closed.
_RETRYABLE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

BackendKey = tuple[str, str, int, str | None]


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def rewrite_location(value: bytes, rule: AccessRule, virtual_host: str, virtual_port: int) -> bytes:
    """``value`` of a ``Location`` header with the internal host and port replaced by the virtual ones.

    Only absolute ``http``/``https`` URLs that name the rule's internal host and port (default port per scheme)
    are rewritten, to ``http://vhost:vport/...`` (applications always speak ``http://`` to the proxy); anything
    else, relative references included, is returned unchanged.
    """
    try:
        text = value.decode("ascii")
        parts = urlsplit(text)
        port = parts.port
    except (UnicodeDecodeError, ValueError):
        return value
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        return value
    internal_port = rule.internal_ports[0]
    if parts.hostname.lower() != rule.internal_host.lower().strip("[]"):
        return value
    if (port or _default_port(parts.scheme)) != internal_port:
        return value
    host = f"[{virtual_host}]" if ":" in virtual_host else virtual_host
    return urlunsplit(("http", f"{host}:{virtual_port}", parts.path, parts.query, parts.fragment)).encode("ascii")


# ---------------------------------------------------------------------------------------------------- backend


@implementer(IHandshakeListener)
class HttpBackend(H11Relay):
    """One connection to a backend, speaking HTTP/1.1 as a client; reusable for sequential requests.

    ``ready`` fires once it is usable (after the TLS handshake for HTTPS) or fails with the connection's loss.
    While it serves a stream, response events go to :attr:`server`; while idle in the pool, any byte from the
    backend (or its close) ends it.
    """

    def __init__(self, key: BackendKey, tls: bool) -> None:
        super().__init__(h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES))
        self.key = key
        self.tls = tls
        self.ready: Deferred[HttpBackend] = Deferred()
        self.server: HttpStreamServer | None = None
        self.pool: BackendPool | None = None
        self.uses = 0
        #: When it went idle into the pool (the pool's clock).
        self.idle_since = 0.0

    def connectionMade(self) -> None:
        """TCP_NODELAY on the backend socket; plain TCP is ready now, TLS waits for the handshake."""
        set_no_delay(self.transport)
        if not self.tls:
            self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        """The TLS handshake with the backend (certificate verified) succeeded."""
        if not self.ready.called:
            self.ready.callback(self)

    @property
    def alive(self) -> bool:
        """Connected and not closing."""
        transport: Any = self.transport
        return (
            bool(self.connected) and not self._lost and transport is not None and not self.raw
            and not getattr(transport, "disconnecting", False)
        )

    def can_pump(self) -> bool:
        """Responses are parsed only while a stream is attached; idle bytes are handled by :meth:`dataReceived`."""
        return self.server is not None

    def dataReceived(self, data: bytes) -> None:
        """Response bytes for the attached stream; bytes while idle are a protocol error (the connection ends)."""
        if self.server is None and not self.raw:
            if self.pool is not None:
                self.pool.forget(self)  # never hand out a connection that is closing
            if self.transport is not None:
                self.transport.loseConnection()
            return
        super().dataReceived(data)

    def send(self, event: h11.Event) -> None:
        """Write a request event to the backend."""
        send_event(self.conn, self.transport, event)

    def handle_event(self, event: h11.Event) -> None:
        """Pass a response event to the stream."""
        assert self.server is not None
        self.server.backend_event(event)

    def internal_error(self) -> None:
        """Passing the answer on failed (a bug, logged already): RESET the stream, drop the connection."""
        if self.server is not None:
            self.server.internal_error()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def protocol_error(self, error: h11.RemoteProtocolError) -> None:
        """The backend's answer is not HTTP/1.1."""
        if self.server is not None:
            self.server.backend_failed(f"malformed response: {error}")
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Before ready: fail ``ready``. Idle: leave the pool. Serving: the stream learns (after h11 saw EOF)."""
        if not self.ready.called:
            self._lost = True
            self.ready.errback(reason)
            return
        if self.raw:
            super().connectionLost(reason)
            return
        self._lost = True
        if self.pool is not None:
            self.pool.forget(self)
        server = self.server
        if server is not None:
            if self.conn.their_state is not h11.ERROR:
                try:
                    self.conn.receive_data(b"")
                except RuntimeError:
                    pass
                self.pump()
            if self.server is server:
                server.backend_failed("the backend closed the connection")


class BackendPool:
    """Idle keep-alive backend connections, per backend (protocol, host, port, CA file).

    At most ``max_idle_per_backend`` idle connections per backend and ``max_idle`` in all are kept, each for at
    most ``idle_timeout`` seconds; a connection the backend closes leaves the pool at once.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_idle_per_backend: int = 64,
        max_idle: int = 1024,
        idle_timeout: float = 15.0,
    ) -> None:
        self.clock = clock
        self.max_idle_per_backend = max_idle_per_backend
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[BackendKey, list[HttpBackend]] = {}
        self._count = 0
        #: One delayed call expires idle connections for the whole pool (none is created or cancelled per
        #: request); it runs when the oldest idle connection is due and re-arms for the next one.
        self._sweep: IDelayedCall | None = None

    @property
    def idle_count(self) -> int:
        """Idle connections held."""
        return self._count

    def take(self, key: BackendKey) -> HttpBackend | None:
        """An idle live connection to ``key``'s backend, or None."""
        idle = self._idle.get(key)
        while idle:
            backend = idle.pop()
            self._count -= 1
            backend.pool = None
            if backend.alive:
                if not idle:
                    del self._idle[key]
                return backend
        self._idle.pop(key, None)
        return None

    def put(self, backend: HttpBackend) -> None:
        """Keep ``backend`` (at the end of a clean exchange) for reuse, or close it when the pool is full."""
        idle = self._idle.setdefault(backend.key, [])
        if not backend.alive or len(idle) >= self.max_idle_per_backend or self._count >= self.max_idle:
            if not idle:
                del self._idle[backend.key]
            if backend.transport is not None:
                backend.transport.loseConnection()
            return
        idle.append(backend)
        self._count += 1
        backend.pool = self
        backend.idle_since = self.clock.seconds()
        if self._sweep is None or not self._sweep.active():
            self._sweep = self.clock.callLater(self.idle_timeout, self._expire_due)
        backend.transport.resumeProducing()  # type: ignore[union-attr]

    def forget(self, backend: HttpBackend) -> None:
        """``backend`` closed while idle: drop it."""
        idle = self._idle.get(backend.key)
        if idle and backend in idle:
            idle.remove(backend)
            self._count -= 1
            if not idle:
                del self._idle[backend.key]
        backend.pool = None

    def _expire(self, backend: HttpBackend) -> None:
        self.forget(backend)
        if backend.transport is not None:
            backend.transport.loseConnection()

    def _expire_due(self) -> None:
        """Close the connections idle for ``idle_timeout`` or longer; re-arm for the oldest of the others."""
        self._sweep = None
        now = self.clock.seconds()
        oldest: float | None = None
        for idle in list(self._idle.values()):
            for backend in list(idle):
                if backend.idle_since + self.idle_timeout <= now + 1e-6:
                    self._expire(backend)
                elif oldest is None or backend.idle_since < oldest:
                    oldest = backend.idle_since
        if oldest is not None:
            self._sweep = self.clock.callLater(max(0.0, oldest + self.idle_timeout - now), self._expire_due)

    def close(self) -> None:
        """Close every idle connection."""
        for idle in list(self._idle.values()):
            for backend in list(idle):
                self._expire(backend)
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None


# ---------------------------------------------------------------------------------------------------- stream


class HttpStreamServer(H11Relay):
    """The stream side of one HTTP request at the connector (h11 ``SERVER`` over the tunnel stream)."""

    def __init__(self, gateway: HttpGateway, rule: AccessRule, resource: Resource, stream_request: Any,
                 method: str, target: str, upgrade: str | None, backend: HttpBackend) -> None:
        super().__init__(h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES))
        self.gateway = gateway
        self.rule = rule
        self.resource = resource
        self.virtual_host: str = stream_request.host
        self.virtual_port: int = stream_request.port
        self.method = method
        self.target = target
        self.upgrade = upgrade
        self.backend: HttpBackend | None = backend
        backend.server = self
        backend.uses += 1
        link(self, backend)
        self.request_done = False
        self.response_started = False
        self.ambiguous_framing = False
        self.response_done = False
        self.finished = False
        self.retried = False
        self._sent_request: h11.Request | None = None
        self._body_sent = False

    @property
    def system(self) -> str:
        """``vhost:vport`` for messages."""
        return f"{self.virtual_host}:{self.virtual_port}"

    # ------------------------------------------------------------------ request (stream -> backend)

    def can_pump(self) -> bool:
        """Take request events while attached to the backend."""
        return self.backend is not None and not self.finished

    def handle_event(self, event: h11.Event) -> None:
        """Forward the request to the backend."""
        backend = self.backend
        assert backend is not None
        if isinstance(event, h11.Request):
            if event.method.decode("ascii", "replace") != self.method or \
                    event.target.decode("ascii", "replace") != self.target:
                self._reset(ErrorCode.PROTOCOL_ERROR, "the request differs from the one the OPEN announced")
                return
            headers, parsed = self._backend_headers(event)
            # Where every header comes from the request h11 parsed from the stream (only filtered), ``_parsed``
            # spares validating each again; a Host built from the configuration is validated.
            self._sent_request = h11.Request(method=event.method, target=event.target, headers=headers,
                                             _parsed=parsed)
            backend.send(self._sent_request)
        elif isinstance(event, h11.Data):
            self._body_sent = True
            backend.send(event)
        elif isinstance(event, h11.EndOfMessage):
            backend.send(h11.EndOfMessage())
            self.request_done = True
            self._maybe_finish()
        elif isinstance(event, h11.ConnectionClosed):
            pass  # the proxy's FIN after the request: expected

    def _backend_headers(self, request: h11.Request) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The request's headers for the backend, and whether all of them come from the parsed request."""
        request_headers = header_pairs(request.headers)
        upgrade = upgrade_of(request_headers)
        forwarded = forwarded_request_headers(request_headers, upgrade)
        virtual_host = next((v for n, v in request_headers if n == b"host"), None)
        parsed = virtual_host is not None and self.rule.host_in_header != "internal"
        if virtual_host is None:
            shown = f"[{self.virtual_host}]" if ":" in self.virtual_host else self.virtual_host
            virtual_host = f"{shown}:{self.virtual_port}".encode("ascii", "replace")
        headers = [(n, v) for n, v in forwarded if n not in (b"host", b"x-forwarded-host")]
        if self.rule.host_in_header == "internal":
            host = self.rule.internal_host
            shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
            port = acl.internal_port_for(self.rule, self.virtual_port)
            default = 443 if self.rule.protocol == "HTTPS" else 80
            value = shown if port == default else f"{shown}:{port}"
            return [(b"host", value.encode("idna" if not value.isascii() else "ascii")),
                    (b"x-forwarded-host", virtual_host), *headers], False
        return [(b"host", virtual_host), *headers], parsed

    def protocol_error(self, error: h11.RemoteProtocolError) -> None:
        """The proxy sent something that is not HTTP/1.1."""
        self._reset(ErrorCode.PROTOCOL_ERROR, f"malformed request in the stream: {error}")

    def internal_error(self) -> None:
        """Handling the request failed (a bug, logged already): RESET ``INTERNAL_ERROR``."""
        self._reset(ErrorCode.INTERNAL_ERROR, "internal error in the connector")

    # ------------------------------------------------------------------ response (backend -> stream)

    def backend_event(self, event: h11.Event) -> None:
        """One response event from the backend."""
        if self.finished:
            return
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and self.upgrade is not None:
                self._switch(event)
            elif event.status_code != 100:
                self._send(h11.InformationalResponse(
                    status_code=event.status_code, headers=forwarded_response_headers(header_pairs(event.headers)),
                    reason=event.reason))
            return
        if isinstance(event, h11.Response):
            self.response_started = True
            pairs = header_pairs(event.headers)
            if header_values(pairs, b"transfer-encoding") and header_values(pairs, b"content-length"):
                self.ambiguous_framing = True  # RFC 9112 6.1: this backend connection is not reused
            headers = forwarded_response_headers(pairs)
            rewritten = False
            for index, (name, value) in enumerate(headers):
                if name == b"location":
                    location = rewrite_location(value, self.rule, self.virtual_host, self.virtual_port)
                    if location != value:
                        headers[index] = (name, location)
                        rewritten = True
            # Unless a Location was rewritten, every part comes from the response h11 parsed (and validated)
            # from the backend, only filtered: ``_parsed`` spares validating each header again.
            self._send(h11.Response(status_code=event.status_code, headers=headers, reason=event.reason,
                                    _parsed=not rewritten))
        elif isinstance(event, h11.Data):
            self._send(event)
        elif isinstance(event, h11.EndOfMessage):
            self._send(h11.EndOfMessage())
            self.response_done = True
            self._maybe_finish()
        elif isinstance(event, h11.ConnectionClosed):
            self.backend_failed("the backend closed the connection before answering")

    def _switch(self, event: h11.InformationalResponse) -> None:
        backend = self.backend
        assert backend is not None and self.upgrade is not None
        pairs = header_pairs(event.headers)
        headers = forwarded_response_headers(pairs) + [
            (b"connection", b"upgrade"), (b"upgrade", upgrade_of(pairs) or self.upgrade.encode("latin-1"))]
        self._send(h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason))
        self.gateway.log.debug("HTTP upgrade to {protocol} on {system}", protocol=self.upgrade, system=self.system)
        backend.server = None
        self.finished = True
        backend.switch_to_raw()
        self.switch_to_raw()

    def _send(self, event: h11.Event) -> None:
        try:
            send_event(self.conn, self.transport, event)
        except h11.LocalProtocolError as error:
            self.gateway.log.warn("cannot pass the backend's answer on {system}: {error}", system=self.system,
                                  error=str(error))
            self._reset(ErrorCode.INTERNAL_ERROR, "cannot pass the backend's answer on")

    def backend_failed(self, why: str) -> None:
        """The backend connection broke before the exchange completed: RESET ``BACKEND_RESET``.

        A kept-alive connection may have been closed by the backend just as it was reused: a request that can
        be sent again safely (idempotent method, no body, no answer received) is retried once on a new
        connection.
        """
        if self.finished:
            return
        backend = self.backend
        if (
            backend is not None and backend.uses > 1 and not self.retried and self.request_done
            and not self._body_sent and not self.response_started and self._sent_request is not None
            and self._sent_request.method in _RETRYABLE_METHODS
        ):
            self.gateway.log.debug("reused backend connection of {system} closed: retrying on a new one",
                                   system=self.system)
            self._retry()
            return
        self.gateway.log.info("backend of {system} failed during a request: {why}", system=self.system, why=why)
        self._reset(ErrorCode.BACKEND_RESET, why)

    def _retry(self) -> None:
        self.retried = True
        old = self._release_backend()
        if old is not None and old.transport is not None:
            old.transport.abortConnection()  # type: ignore[attr-defined]
        d = self.gateway.connect_backend(self.rule, acl.internal_port_for(self.rule, self.virtual_port), fresh=True)

        def ready(backend: HttpBackend) -> None:
            request = self._sent_request
            if self._lost or self.finished or self.transport is None or request is None:
                self.gateway.pool.put(backend)
                return
            self.backend = backend
            backend.server = self
            backend.uses += 1
            link(self, backend)
            wire(self, backend)
            backend.send(request)
            backend.send(h11.EndOfMessage())

        def failed(failure: Failure) -> None:
            if not self.finished:
                self._reset(reset_code_for(failure), failure.getErrorMessage()[:200])

        d.addCallbacks(ready, failed)

    # ------------------------------------------------------------------ ending

    def _maybe_finish(self) -> None:
        if self.finished or not (self.request_done and self.response_done):
            return
        self.finished = True
        backend = self._release_backend()
        if backend is not None:
            reusable = (
                backend.conn.our_state is h11.DONE and backend.conn.their_state is h11.DONE
                and not backend.conn.trailing_data[0]  # bytes past the response: not a clean connection
                and not self.ambiguous_framing
            )
            if reusable and backend.alive:
                backend.conn.start_next_cycle()
                self.gateway.pool.put(backend)
            elif backend.transport is not None:
                backend.transport.loseConnection()
        if self.transport is not None:
            self.transport.loseConnection()  # FIN after the response (the proxy already sent its FIN)

    def _release_backend(self) -> HttpBackend | None:
        backend, self.backend = self.backend, None
        if backend is None:
            return None
        backend.server = None
        unwire(self, backend)
        return backend

    def _reset(self, code: ErrorCode, reason: str) -> None:
        self.finished = True
        backend = self._release_backend()
        if backend is not None and backend.transport is not None:
            backend.transport.abortConnection()  # type: ignore[attr-defined]
        stream = self.transport
        if stream is not None and not self._lost:
            self.gateway.reset(stream, code, reason[:200])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The stream ended: a reset (the proxy gave up) or a close before the exchange completed drops the
        backend connection."""
        if self.raw:
            super().connectionLost(reason)
            return
        self._lost = True
        if not self.finished:
            self.finished = True
            backend = self._release_backend()
            if backend is not None and backend.transport is not None:
                backend.transport.abortConnection()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------- gateway


class HttpGateway:
    """Serves ``kind="http"`` streams for :class:`connproxy.connector.dialer.BackendDialer`."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        config: ConnectorConfig,
        endpoint_for: Callable[[AccessRule, str, int], IStreamClientEndpoint],
        audit_writer: audit.AuditWriter | None = None,
        pool: BackendPool | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.endpoint_for = endpoint_for
        self.audit_writer = audit_writer
        self.pool = pool or BackendPool(clock)

    def reset(self, stream: Any, code: ErrorCode, reason: str) -> None:
        """RESET an accepted stream (both towards the proxy and locally)."""
        stream.refuse(code, reason)

    def serve(self, tunnel: Any, stream: Any, decision: Decision) -> None:
        """Serve one ``kind="http"`` stream that :func:`connproxy.connector.access.decide` allowed: get a backend
        connection, then accept the stream with an :class:`HttpStreamServer`."""
        request = stream.request
        rule, resource, http = decision.rule, decision.resource, decision.http
        assert rule is not None and resource is not None and http is not None
        method, target, upgrade = http.method, http.target, http.upgrade
        system = f"{request.host}:{request.port}"
        internal_port = decision.internal_port
        ready = self.connect_backend(rule, internal_port)

        def on_ready(backend: HttpBackend) -> None:
            if stream.closed:
                self.pool.put(backend)  # no request was sent on it
                return
            server = HttpStreamServer(self, rule, resource, request, method, target, upgrade, backend)
            tunnel.accept(stream, server)

        ready.addCallbacks(
            on_ready, backend_failed, errbackArgs=(tunnel, stream, describe_mapping(self.config, decision))
        )
        ready.addErrback(lambda f: self.log.failure("HTTP gateway bug on {system}", f, system=system))
        track_backend_connect(tunnel, stream, ready)

    def connect_backend(self, rule: AccessRule, port: int, *, fresh: bool = False) -> Deferred[HttpBackend]:
        """A ready backend connection for ``rule``'s internal host and ``port``: an idle one from the pool unless
        ``fresh``, else a new one (within the backend connect timeout). Fails with the connection's failure."""
        key: BackendKey = (rule.protocol, rule.internal_host, port, rule.ca_file)
        idle = None if fresh else self.pool.take(key)
        if idle is not None:
            return succeed(idle)
        backend = HttpBackend(key, tls=rule.protocol == "HTTPS")
        try:
            connecting = self.endpoint_for(rule, rule.internal_host, port).connect(OneShotFactory(backend))
        except Exception:
            return fail()

        def connected(_: object) -> Deferred[HttpBackend]:
            return backend.ready

        def cancelled(failure: Failure) -> Failure:
            if failure.check(CancelledError) and backend.transport is not None:
                backend.transport.abortConnection()  # type: ignore[attr-defined]
            return failure

        d: Deferred[HttpBackend] = connecting.addCallback(connected)
        d.addErrback(cancelled)
        d.addTimeout(self.config.backend.connect_timeout_seconds + 1.0, self.clock)
        return d
