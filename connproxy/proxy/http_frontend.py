# -*- test-case-name: tests.unit.test_http_proxy -*-
"""The HTTP proxy front end (default port 20003): SAP's application-facing HTTP/1.1 proxy, parsed with h11.

One client connection is one :class:`HttpProxyProtocol`. It reads requests with an h11 ``SERVER`` connection
(keep-alive, pipelining held back until the previous answer is out), accepts the absolute form
``http://vhost:vport/path`` (no port means 80) and the origin form with ``Host``, authorizes the caller,
and sends each request through its own tunnel stream: ``router.endpoint(kind="http")`` opens the stream, the
connector decides access from the OPEN metadata (method, path, upgrade) and accepts once a backend connection is
ready; the proxy then writes the cleaned request into the stream with an h11 ``CLIENT`` connection (so chunked
bodies stay well-formed), FIN after the body, and re-frames the response it parses from the stream onto the
client connection. The bytes move through :mod:`connproxy.relay`: the client side and the stream side
(:class:`UpstreamRelay`) are wired for the duration of one exchange (each transport is the other's producer, so
a slow client stops the stream's credit and a blocked stream pauses the client socket) and unwired afterwards.

``CONNECT host:port`` (where ``allowConnect``) opens a ``kind="tcp"`` stream, answers 200 and becomes a plain
:class:`~connproxy.relay.Relay`, exactly like the SOCKS5 front end; an upgrade (``101``, WebSocket) does the
same after the backend agreed.

Answers of the proxy itself, each with a short ``text/plain`` body and a log event: 400 (malformed request,
broken header rules), 405 (``https://`` targets; CONNECT where not allowed), 407 with ``Proxy-Authenticate:
Bearer`` (missing or invalid token where authorization is on), 408 (request head not complete in time), 414
(request line longer than ``maxLineBytes``), 431 (a header line longer than ``maxLineBytes`` or a header block
larger than ``maxHeaderBytes``), and for failed tunnel streams the status of
:func:`connproxy.tunnel.errors.http_status_for`: 503 no connector, 403 access denied (the connector's sentence),
502 backend refused or reset, 504 backend or first-byte timeout.

:func:`end_to_end_headers` and :class:`H11Relay` are shared with the connector's side
(:mod:`connproxy.connector.http_gateway`).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.http.h11relay import REASONS, H11Relay, HttpError, error_response_events, send_event
from connproxy.http.headers import (
    end_to_end_headers,
    forwarded_request_headers,
    forwarded_response_headers,
    has_body,
    header_list,
    header_values,
    split_authority,
    upgrade_of,
)
from connproxy.obs import audit
from connproxy.proxy.auth import AuthError, bearer_token
from connproxy.proxy.frontend import Authorizing, FrontEndFactory
from connproxy.proxy.replies import http_status_for, open_failure_text
from connproxy.proxy.routing import Router
from connproxy.relay import Relay, RelayFactory, describe_transport, unwire, wire
from connproxy.tunnel.errors import StreamRefusedError, StreamResetError
from connproxy.tunnel.stream import reset_transport
from connproxy.wire.errors import ErrorCode

Headers = list[tuple[bytes, bytes]]

H_LOCATION_ID = b"sap-connectivity-scc-location_id"
H_USER = b"sap-connectivity-authentication"
H_TECHNICAL = b"sap-connectivity-technical-authentication"
H_SERVICE_TOKEN = b"sap-cp-connectivity-service-token"
H_PROXY_AUTHORIZATION = b"proxy-authorization"

#: The largest principal-propagation token carried in OPEN metadata (OPEN payloads are at most 64 KiB).
MAX_PROPAGATED_TOKEN_BYTES = 16384
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+(?: [\x21-\x7e]+)?")


def _carries_user(token: str) -> bool:
    """Whether a (verified) proxy token identifies a user: a token exchange result, not client credentials."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return False
    if not isinstance(claims, dict):
        return False
    grant = claims.get("grant_type")
    if isinstance(grant, str) and grant and grant != "client_credentials":
        return True
    return any(isinstance(claims.get(k), str) and claims.get(k) for k in ("user_name", "user_id", "user_uuid"))



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

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """The stream ended or was reset."""
        if self.raw:
            super().connectionLost(reason)
            return
        self._lost = True
        front, self.front = self.front, None
        if self.detached or front is None:
            return
        front.upstream_lost(self, reason)


# ---------------------------------------------------------------------------------------------------- front end


@dataclass
class _Exchange:
    """One request on a client connection."""

    request: h11.Request
    host: str = ""
    port: int = 0
    path: str = "/"
    location: str = ""
    tenant: str = ""
    connect: bool = False
    upgrade: bytes | None = None
    body: bool = False
    pending: Deferred[Any] | None = None
    upstream: UpstreamRelay | None = None
    request_done: bool = False
    response_started: bool = False
    response_done: bool = False
    rejected: HttpError | None = None
    proxy_token: str | None = None
    service_token: str | None = None
    first_byte: IDelayedCall | None = None
    must_close: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


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
        self._head_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._last_activity = 0.0
        self._closing = False

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        """Start the idle timer (the request head timer starts with its first byte)."""
        self.touch()
        self._idle_timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle_check)

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

    def dataReceived(self, data: bytes) -> None:
        """Parse requests (HTTP mode) or relay raw bytes (after CONNECT or an upgrade)."""
        self.touch()
        if self.tunnel_mode:
            super().dataReceived(data)
            return
        if self._closing:
            return
        if self.exchange is None and self.conn.their_state is h11.IDLE and not self._check_request_line(data):
            return
        super().dataReceived(data)

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.factory.clock.callLater(self.factory.header_timeout, self._head_timed_out)

    def _check_request_line(self, data: bytes) -> bool:
        """Watch the bytes of a request head until its first line ended: 414 when it is too long."""
        if self._head_timer is None and data.strip(b"\r\n"):
            self._start_head_timer()
        limit = self.factory.max_line_bytes
        self._probe = (self._probe + data).lstrip(b"\r\n")[: limit + 2]
        end = self._probe.find(b"\n")
        if end < 0 and len(self._probe) > limit + 1:
            self._fail_and_close(HttpError(414, f"request line longer than {limit} bytes"))
            return False
        return True

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.exchange is None and not self.tunnel_mode and self.transport is not None:
            self._fail_and_close(
                HttpError(408, f"request head not complete within {self.factory.header_timeout:g}s")
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None
        self._probe = b""

    def can_pump(self) -> bool:
        """Hold body events while the request is being authorized and routed."""
        ex = self.exchange
        return not self._closing and (
            ex is None or ex.upstream is not None or ex.rejected is not None or not ex.body
        )

    def protocol_error(self, error: h11.RemoteProtocolError) -> None:
        """A malformed request: 400, or 431 when the header block is too large."""
        status = error.error_status_hint or 400
        text = (
            f"request header block larger than {self.factory.max_header_bytes} bytes"
            if status == 431 else f"malformed request: {error}"
        )
        ex = self.exchange
        if ex is not None and ex.upstream is not None and not ex.request_done:
            # The request body broke off mid-way: the backend must not take a truncated request as complete.
            if ex.upstream.transport is not None:
                ex.upstream.transport.abortConnection()  # type: ignore[attr-defined]
        self._fail_and_close(HttpError(status, text))

    def internal_error(self) -> None:
        """Handling the request failed (a bug, logged already): 500, never a traceback."""
        self._fail_and_close(HttpError(500, "internal error in the proxy"))

    # ------------------------------------------------------------------ requests

    def handle_event(self, event: h11.Event) -> None:
        """Route a request head; pass body events upstream."""
        ex = self.exchange
        if isinstance(event, h11.Request):
            self._cancel_head_timer()
            self._begin(event)
        elif isinstance(event, h11.Data):
            if ex is not None and ex.upstream is not None and ex.rejected is None:
                ex.upstream.send(event)
                self._restart_first_byte(ex)
        elif isinstance(event, h11.EndOfMessage):
            if ex is None:
                return
            ex.request_done = True
            if ex.rejected is not None:
                self._answer(ex.rejected)
            elif ex.upstream is not None and not ex.connect:
                self._end_request(ex, ex.upstream)
        elif isinstance(event, h11.ConnectionClosed):
            if ex is None:
                self._close()

    def _begin(self, request: h11.Request) -> None:
        self.requests += 1
        ex = _Exchange(request=request, body=has_body(request))
        self.exchange = ex
        try:
            self._parse(ex)
        except HttpError as error:
            self.log.info(
                "HTTP {client} {method} {target} refused: {status} {reason}", client=self._client(),
                method=request.method.decode("latin-1"), target=request.target[:200].decode("latin-1"),
                status=error.status, reason=error.message,
            )
            self._reject(error)
            return
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        d = self.factory.authorizer.authorize(proxy_token=ex.proxy_token, service_token=ex.service_token)
        ex.pending = d
        d.addCallbacks(self._authorized, self._auth_failed, callbackArgs=(ex, ex.proxy_token), errbackArgs=(ex,))
        d.addErrback(self._bug, ex)

    @staticmethod
    def _single(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
        values = header_values(headers, name)
        if len(values) > 1:
            raise HttpError(400, f"header {name.decode()} sent more than once")
        return values[0] if values else None

    def _parse(self, ex: _Exchange) -> None:
        """Fill in the target and routing data of ``ex`` from its request; raise :class:`HttpError` to refuse."""
        request = ex.request
        headers = header_list(request.headers)
        limit = self.factory.max_line_bytes
        if len(request.method) + len(request.target) + 10 > limit:
            raise HttpError(414, f"request line longer than {limit} bytes")
        head = len(request.method) + len(request.target) + 12
        for name, value in headers:
            if len(name) + len(value) + 2 > limit:
                raise HttpError(431, f"header line {name.decode('latin-1')[:64]} longer than {limit} bytes")
            head += len(name) + len(value) + 4
        if head > self.factory.max_header_bytes:
            # h11 bounds an incomplete head only; one that arrives whole in fewer reads is measured here.
            raise HttpError(431, f"request header block larger than {self.factory.max_header_bytes} bytes")
        target = request.target.decode("ascii", "replace")
        if "#" in target:
            raise HttpError(400, "a request target must not contain a fragment (#)")
        if request.method == b"CONNECT":
            if not self.factory.allow_connect:
                raise HttpError(405, "CONNECT is not allowed on this proxy (allowConnect is false)",
                                [(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")])
            try:
                ex.host, ex.port = split_authority(target, None)
            except ValueError:
                raise HttpError(400, f"CONNECT target must be host:port, got {target[:200]}") from None
            ex.connect = True
        elif target.startswith("/"):
            host = self._single(headers, b"host")
            if not host:
                raise HttpError(400, "origin-form request without a Host header")
            try:
                ex.host, ex.port = split_authority(host.decode("ascii"), 80)
            except (ValueError, UnicodeDecodeError):
                raise HttpError(400, "bad Host header") from None
            ex.path = target
        else:
            scheme = target.split(":", 1)[0].lower() if ":" in target else ""
            if scheme == "https":
                raise HttpError(405, "https:// targets are not supported: send http:// (the connector may use "
                                     "HTTPS to the backend), or use SOCKS5 for TLS end to end")
            if scheme != "http":
                raise HttpError(400, f"request target must be http://host[:port]/path or /path, got {target[:200]}")
            try:
                parts = urlsplit(target)
                ex.host, ex.port = split_authority(parts.netloc, 80)
            except ValueError:
                raise HttpError(400, f"bad host in request target {target[:200]}") from None
            ex.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if header_values(headers, b"transfer-encoding") and header_values(headers, b"content-length"):
            # Framed as chunked (h11, RFC 9112 6.3), but whoever sent it may disagree: never reuse the connection.
            ex.must_close = True
        ex.proxy_token = bearer_token(self._single(headers, H_PROXY_AUTHORIZATION))
        service_token = self._single(headers, H_SERVICE_TOKEN)
        ex.service_token = service_token.decode("latin-1") if service_token else None
        location = self._single(headers, H_LOCATION_ID)
        try:
            ex.location = location.decode("utf-8").strip() if location else ""
        except UnicodeDecodeError:
            raise HttpError(400, "SAP-Connectivity-SCC-Location_ID is not UTF-8") from None
        user = self._single(headers, H_USER)
        technical = self._single(headers, H_TECHNICAL)
        if user and technical:
            raise HttpError(400, "send either SAP-Connectivity-Authentication (principal propagation) or "
                                 "SAP-Connectivity-Technical-Authentication (technical user propagation), "
                                 "not both")
        if (user or technical) and header_values(headers, b"authorization"):
            raise HttpError(400, "the Authorization header must be omitted when SAP-Connectivity-Authentication "
                                 "or SAP-Connectivity-Technical-Authentication propagates the user")
        for name, token in ((H_USER, user), (H_TECHNICAL, technical)):
            if token is not None and len(token) > MAX_PROPAGATED_TOKEN_BYTES:
                raise HttpError(431, f"header {name.decode()} larger than {MAX_PROPAGATED_TOKEN_BYTES} bytes")
            if token is not None and not _VISIBLE_ASCII.fullmatch(token):
                # A bearer token is visible ASCII; anything else would also grow in the OPEN's JSON.
                raise HttpError(400, f"header {name.decode()} must be visible ASCII (Bearer <token>)")
        ex.upgrade = None if ex.connect else upgrade_of(headers)
        meta: dict[str, Any] = {"client": self._client(), "via": "http-connect" if ex.connect else "http"}
        if not ex.connect:
            meta["http"] = {
                "method": request.method.decode("ascii"),
                "target": ex.path,
                "upgrade": ex.upgrade.decode("latin-1") if ex.upgrade is not None else None,
            }
        if user:
            meta["authentication"] = user.decode("latin-1")
        if technical:
            meta["technical_authentication"] = technical.decode("latin-1")
        ex.meta = meta

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
            method=ex.request.method.decode("latin-1"), target=ex.target, reason=str(error), status=status,
        )
        audit.proxy_call_refused(
            front_end="http", tenant=None, client_id=None, reason=error.reason, peer=self._client(),
            writer=self.factory.audit_writer,
        )
        headers = [(b"proxy-authenticate", b"Bearer")] if status == 407 else []
        self._reject(HttpError(status, str(error), headers))

    def _authorized(self, caller: Any, ex: _Exchange, proxy_token: str | None) -> None:
        ex.pending = None
        if not self._current(ex):
            return
        if (
            self.factory.authorization_enabled and proxy_token and "authentication" in ex.meta
            and _carries_user(proxy_token)
        ):
            self._reject(HttpError(
                400, "the user is already in Proxy-Authorization (a token exchange result): "
                     "SAP-Connectivity-Authentication must not be sent as well"))
            return
        ex.tenant = caller.tenant
        ex.meta["client_id"] = caller.client_id
        self._own_answers.release()  # the stream becomes the client transport's producer
        endpoint = self.factory.router.endpoint(
            tenant=caller.tenant, location=ex.location, host=ex.host, port=ex.port,
            kind="tcp" if ex.connect else "http", meta=ex.meta,
        )
        if ex.connect:
            factory = RelayFactory(self, _TunnelSide)
        else:
            max_header = self.factory.max_header_bytes
            factory = RelayFactory(self, lambda peer: UpstreamRelay(peer, max_header))
        d = endpoint.connect(factory)
        ex.pending = d
        d.addCallbacks(self._connected, self._open_failed, callbackArgs=(ex,), errbackArgs=(ex,))
        d.addErrback(self._bug, ex)

    def _open_failed(self, failure: Failure, ex: _Exchange) -> None:
        ex.pending = None
        if failure.check(CancelledError) or not self._current(ex):
            return
        status = http_status_for(failure)
        message = open_failure_text(failure, ex.target)
        self.log.info(
            "HTTP {client} {method} {target} (subaccount {tenant}, location {location}) failed: {error} "
            "({status})", client=self._client(), method=ex.request.method.decode("latin-1"), target=ex.target,
            tenant=ex.tenant, location=ex.location or "(default)", error=str(failure.value), status=status,
        )
        self._reject(HttpError(status, message))

    def _bug(self, failure: Failure, ex: _Exchange) -> None:
        self.log.failure("HTTP proxy bug while handling {target}", failure, target=ex.target)
        if self._current(ex):
            self._fail_and_close(HttpError(500, "internal error in the proxy"))

    def _connected(self, protocol: Any, ex: _Exchange) -> None:
        ex.pending = None
        if not self._current(ex):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            return
        if ex.connect:
            self._start_tunnel(ex, protocol)
            return
        upstream: UpstreamRelay = protocol
        ex.upstream = upstream
        request = ex.request
        request_headers = header_list(request.headers)
        host_header = self._single(request_headers, b"host") if ex.request.target.startswith(b"/") else None
        authority = host_header or _authority(ex.host, ex.port)
        headers = [(b"host", authority)]
        headers += [(n, v) for n, v in forwarded_request_headers(request_headers, ex.upgrade) if n != b"host"]
        upstream.send(h11.Request(method=request.method, target=ex.path.encode("ascii", "replace"),
                                  headers=headers))
        self._restart_first_byte(ex)
        if ex.request_done:
            self._end_request(ex, upstream)
        elif self.conn.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        self.pump()

    def _end_request(self, ex: _Exchange, upstream: UpstreamRelay) -> None:
        """The request body is complete: end it in the stream, and FIN unless the stream may switch protocols."""
        upstream.send(h11.EndOfMessage())
        if ex.upgrade is None and upstream.transport is not None:
            upstream.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self._restart_first_byte(ex)
        self._maybe_finish()

    def _start_tunnel(self, ex: _Exchange, far: Relay) -> None:
        self._send(h11.Response(status_code=200, headers=[], reason=REASONS[200]))
        self.log.debug(
            "HTTP CONNECT {client} -> {target} (subaccount {tenant}, location {location}) connected",
            client=self._client(), target=ex.target, tenant=ex.tenant, location=ex.location or "(default)",
        )
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

    def _restart_first_byte(self, ex: _Exchange) -> None:
        if ex.response_started:
            return
        timeout = self.factory.first_byte_timeout
        if ex.first_byte is not None and ex.first_byte.active():
            ex.first_byte.reset(timeout)
        else:
            ex.first_byte = self.factory.clock.callLater(timeout, self._first_byte_timed_out, ex)

    def _stop_first_byte(self, ex: _Exchange) -> None:
        if ex.first_byte is not None and ex.first_byte.active():
            ex.first_byte.cancel()
        ex.first_byte = None

    def _first_byte_timed_out(self, ex: _Exchange) -> None:
        ex.first_byte = None
        if not self._current(ex) or ex.response_started:
            return
        self.log.info(
            "HTTP {client} {method} {target}: no answer from the backend within {timeout}s",
            client=self._client(), method=ex.request.method.decode("latin-1"), target=ex.target,
            timeout=self.factory.first_byte_timeout,
        )
        self._drop_upstream(ex)
        self._fail_and_close(HttpError(
            504, f"gateway timeout: system {ex.target} did not answer within {self.factory.first_byte_timeout:g}s"))

    def upstream_event(self, upstream: UpstreamRelay, event: h11.Event) -> None:
        """A response event parsed from the stream."""
        ex = self.exchange
        if ex is None or ex.upstream is not upstream:
            return
        self.touch()
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and ex.upgrade is not None:
                self._switch(ex, event)
            elif event.status_code != 100:
                self._send(h11.InformationalResponse(
                    status_code=event.status_code, headers=end_to_end_headers(event.headers), reason=event.reason))
            return
        if isinstance(event, h11.Response):
            self._stop_first_byte(ex)
            ex.response_started = True
            headers = forwarded_response_headers(event.headers)
            # Every part comes from the response h11 parsed (and validated) from the stream, only filtered:
            # ``_parsed`` spares validating each header again with h11's regular expressions.
            self._send(h11.Response(status_code=event.status_code, headers=headers, reason=event.reason,
                                    _parsed=True))
        elif isinstance(event, h11.Data):
            self._send(event)
        elif isinstance(event, h11.EndOfMessage):
            self._send(h11.EndOfMessage())  # trailers are not passed on
            ex.response_done = True
            self._maybe_finish()
        elif isinstance(event, h11.ConnectionClosed):
            self.upstream_failed(upstream, 502, f"bad gateway: system {ex.target} sent no complete answer")

    def _switch(self, ex: _Exchange, event: h11.InformationalResponse) -> None:
        upstream = ex.upstream
        assert upstream is not None and ex.upgrade is not None
        self._stop_first_byte(ex)
        headers = end_to_end_headers(event.headers) + [(b"connection", b"upgrade"),
                                                       (b"upgrade", upgrade_of(event.headers) or ex.upgrade)]
        self._send(h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason))
        self.log.debug("HTTP {client} upgraded to {protocol} with {target}", client=self._client(),
                       protocol=ex.upgrade.decode("latin-1"), target=ex.target)
        self.exchange = None
        self._enter_tunnel_mode()
        upstream.switch_to_raw()
        self.switch_to_raw()

    def upstream_failed(self, upstream: UpstreamRelay, status: int, message: str) -> None:
        """The exchange cannot complete: answer ``status`` if nothing was answered yet, else cut the client off."""
        ex = self.exchange
        if ex is None or ex.upstream is not upstream:
            return
        self.log.info(
            "HTTP {client} {method} {target} failed: {status} {reason}", client=self._client(),
            method=ex.request.method.decode("latin-1"), target=ex.target, status=status, reason=message,
        )
        self._drop_upstream(ex)
        if ex.response_started:
            self._abort_all()
        else:
            self._fail_and_close(HttpError(status, message))

    def upstream_lost(self, upstream: UpstreamRelay, reason: Failure) -> None:
        """The stream ended before the exchange did."""
        ex = self.exchange
        if ex is None or ex.upstream is not upstream or ex.response_done:
            return
        if reason.check(StreamResetError):
            error: Any = reason.value
            refused = Failure(StreamRefusedError(error.code, error.reason))
            self.upstream_failed(upstream, http_status_for(refused), open_failure_text(refused, ex.target))
        else:
            self.upstream_failed(upstream, 502, f"bad gateway: system {ex.target} sent no complete answer")

    def _drop_upstream(self, ex: _Exchange) -> None:
        self._stop_first_byte(ex)
        upstream, ex.upstream = ex.upstream, None
        if upstream is None:
            return
        upstream.detached = True
        unwire(self, upstream)
        if upstream.transport is not None and not upstream._lost:
            upstream.transport.abortConnection()  # type: ignore[attr-defined]

    def _maybe_finish(self) -> None:
        """Both directions of the exchange are complete: release the stream and take the next request."""
        ex = self.exchange
        if ex is None or not (ex.request_done and ex.response_done):
            return
        upstream = ex.upstream
        self._stop_first_byte(ex)
        self.exchange = None
        if upstream is not None:
            upstream.detached = True
            unwire(self, upstream)
            if not upstream._lost and not upstream.got_fin:
                # The connector's FIN normally follows its last DATA at once; close if it does not.
                self.factory.clock.callLater(0, _close_if_open, upstream)
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
            if trailing.strip(b"\r\n") and self._head_timer is None:
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

    def _reject(self, error: HttpError) -> None:
        """Answer ``error`` for the current request: after its (empty) body, or at once and close."""
        ex = self.exchange
        if ex is None:
            self._fail_and_close(error)
            return
        ex.rejected = error
        if ex.request_done:
            self._answer(error)
            return
        if ex.body:
            self._fail_and_close(error)
            return
        assert self.transport is not None
        if not self._own_answers.paused:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.pump()

    def _answer(self, error: HttpError) -> None:
        """Send the answer of a rejected request whose body was read; keep the connection.

        While our own answers pile up unread (a client pipelining requests it never reads the answers of), we
        stop reading: a push producer on the client transport pauses and resumes reading with its buffer.
        """
        ex = self.exchange
        self.exchange = None
        head = ex is not None and ex.request.method == b"HEAD"
        for event in error_response_events(error.status, error.message, error.headers, head=head):
            self._send(event)
        if ex is not None and ex.must_close:
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
            if ex.pending is not None:
                pending, ex.pending = ex.pending, None
                pending.cancel()
            if ex.upstream is not None:
                self._drop_upstream(ex)
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            # An answer is under way (or the state is broken): the client can only learn of it by the cut.
            self._abort_all()
            return
        head = ex is not None and ex.request.method == b"HEAD"
        try:
            for event in error_response_events(error.status, error.message, error.headers, close=True, head=head):
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
            if ex.pending is not None:
                pending, ex.pending = ex.pending, None
                pending.cancel()
            self._drop_upstream(ex)
        self._closing = True
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """Cancel what is pending (an open in flight resets its stream), stop the timers, close the peer."""
        self._cancel_head_timer()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        ex, self.exchange = self.exchange, None
        if ex is not None:
            if ex.pending is not None:
                pending, ex.pending = ex.pending, None
                pending.cancel()
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


def _authority(host: str, port: int) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return (shown if port == 80 else f"{shown}:{port}").encode("idna" if not host.isascii() else "ascii")


class HttpProxyFactory(FrontEndFactory):
    """Builds :class:`HttpProxyProtocol` for the HTTP proxy listener.

    :param header_timeout: seconds from the first byte of a request head until it must be complete (408).
    :param first_byte_timeout: seconds a request may wait for the first byte of its answer, counted from its
        last request byte sent (504).
    :param idle_timeout: seconds a client connection may stay without traffic before it is closed.
    """

    def __init__(
        self,
        router: Router,
        authorizer: Authorizing,
        clock: IReactorTime,
        *,
        authorization_enabled: bool,
        allow_connect: bool = True,
        max_line_bytes: int = 8192,
        max_header_bytes: int = 65536,
        header_timeout: float = 30.0,
        first_byte_timeout: float = 120.0,
        idle_timeout: float = 3600.0,
        audit_writer: audit.AuditWriter | None = None,
    ) -> None:
        super().__init__(router, authorizer, clock, authorization_enabled=authorization_enabled,
                         idle_timeout=idle_timeout, audit_writer=audit_writer)
        self.allow_connect = allow_connect
        self.max_line_bytes = max_line_bytes
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.first_byte_timeout = first_byte_timeout

    def buildProtocol(self, addr: IAddress | None) -> HttpProxyProtocol:
        """A new client connection."""
        return HttpProxyProtocol(self)
