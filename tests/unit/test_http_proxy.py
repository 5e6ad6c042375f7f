"""The HTTP proxy front end's h11 glue, with StringTransports, a fake router and a task.Clock (no reactor)."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from connproxy.http.headers import end_to_end_headers, split_authority, upgrade_of
from connproxy.proxy.auth import AuthError
from connproxy.proxy.http_frontend import HttpProxyFactory, HttpProxyProtocol
from connproxy.relay import Relay
from connproxy.tunnel.errors import NoConnectorError, OpenTimeoutError, StreamRefusedError, StreamResetError
from connproxy.wire.errors import ErrorCode
from tests import doubles
from tests.doubles import FakeAuthorizer, FakeRouter


class HalfCloseTransport(doubles.HalfCloseTransport):
    """The client's socket (half-close and abort, which the relay uses)."""

    def __init__(self) -> None:
        super().__init__(IPv4Address("TCP", "10.0.0.7", 51234))


class Client:
    """One proxy client connection under test."""

    def __init__(self, *, authorizer: FakeAuthorizer | None = None, **factory_kwargs: Any) -> None:
        self.router = FakeRouter()
        self.clock = Clock()
        self.audit: list[str] = []
        self.authorizer = authorizer or FakeAuthorizer()
        factory_kwargs.setdefault("authorization_enabled", False)
        router: Any = self.router
        self.factory = HttpProxyFactory(router, self.authorizer, self.clock, audit_writer=self.audit.append,
                                        **factory_kwargs)
        self.protocol: HttpProxyProtocol = self.factory.build(None)
        self.transport = HalfCloseTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


def responses(raw: bytes, method: bytes = b"GET", count: int = 1) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Parse ``count`` responses (to requests of ``method``) from ``raw``."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    out: list[tuple[int, dict[bytes, bytes], bytes]] = []
    for _ in range(count):
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"incomplete response: {event}")
        out.append((status, headers, body))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return out


def one(raw: bytes, method: bytes = b"GET") -> tuple[int, dict[bytes, bytes], bytes]:
    return responses(raw, method)[0]


def requests_in(raw: bytes) -> list[h11.Event]:
    """The events of the request(s) the proxy wrote into a stream."""
    return doubles.h11_events(h11.Connection(h11.SERVER), raw)


GET = b"GET http://erp.internal:8080/api/x?y=1 HTTP/1.1\r\nHost: erp.internal:8080\r\n"


def answer(stream: HalfCloseTransport, protocol: Any, body: bytes = b"hello", extra: bytes = b"") -> None:
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))


# ------------------------------------------------------------------------------------------------ helpers


def test_split_authority() -> None:
    assert split_authority("erp.internal", 80) == ("erp.internal", 80)
    assert split_authority("erp.internal:8080", 80) == ("erp.internal", 8080)
    assert split_authority("[::1]:443", None) == ("::1", 443)
    for bad in ("", "erp:0", "erp:x", "::1", "a b", "erp:70000"):
        with pytest.raises(ValueError):
            split_authority(bad, 80)
    with pytest.raises(ValueError):
        split_authority("erp.internal", None)


def test_end_to_end_headers_drop_hop_by_hop_sap_and_connection_named() -> None:
    headers = [(b"Host", b"h"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"5"),
               (b"Proxy-Authorization", b"Bearer t"), (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"),
               (b"SAP-Connectivity-SCC-Location_ID", b"l"), (b"SAP-CP-Connectivity-Service-Token", b"t"),
               (b"sap-connectivity-authentication", b"Bearer u"), (b"Transfer-Encoding", b"chunked"),
               (b"Content-Length", b"3"), (b"X-Keep", b"yes"), (b"Upgrade", b"websocket"), (b"Expect", b"100-continue")]
    assert end_to_end_headers(headers) == [(b"host", b"h"), (b"content-length", b"3"), (b"x-keep", b"yes")]


def test_upgrade_needs_connection_upgrade() -> None:
    assert upgrade_of([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]) == b"websocket"
    assert upgrade_of([(b"upgrade", b"websocket")]) is None


# ------------------------------------------------------------------------------------------------ routing


def test_absolute_form_request_is_routed_cleaned_and_answered_with_keep_alive() -> None:
    c = Client()
    c.send(GET + b"Proxy-Connection: keep-alive\r\nSAP-Connectivity-SCC-Location_ID: loc-1\r\n"
           b"SAP-Connectivity-Authentication: Bearer user.jwt\r\nSAP-Connectivity-Foo: x\r\nX-Custom: 1\r\n\r\n")
    # A bodiless request held for routing does not pause the socket (an epoll_ctl pair per request); bytes
    # that arrive meanwhile would (test_bytes_while_routing_pause_the_client).
    assert c.transport.producerState == "producing"
    (endpoint,) = c.router.endpoints
    kwargs = endpoint.kwargs
    assert (kwargs["tenant"], kwargs["location"], kwargs["host"], kwargs["port"], kwargs["kind"]) == (
        "tenant-a", "loc-1", "erp.internal", 8080, "http")
    assert kwargs["meta"]["http"] == {"method": "GET", "target": "/api/x?y=1", "upgrade": None}
    assert kwargs["meta"]["authentication"] == "Bearer user.jwt"
    assert kwargs["meta"]["client_id"] == "sb-app" and kwargs["meta"]["client"] == "10.0.0.7:51234"
    upstream, stream = endpoint.accept()
    assert c.transport.producerState == "producing"
    assert stream.producer is c.transport and c.transport.producer is stream  # wired both ways
    events = requests_in(stream.value())
    request = events[0]
    assert isinstance(request, h11.Request) and request.target == b"/api/x?y=1"
    assert dict(request.headers) == {b"host": b"erp.internal:8080", b"x-custom": b"1"}
    assert isinstance(events[1], h11.EndOfMessage)
    assert stream.write_closed  # FIN after the request
    answer(stream, upstream)
    status, headers, body = one(c.take())
    assert (status, body) == (200, b"hello")
    assert c.transport.producer is None and stream.producer is None  # unwired after the exchange
    assert not c.transport.disconnecting
    # the next request on the same connection goes to another virtual host through a new stream
    c.send(b"GET /second HTTP/1.1\r\nHost: other.internal\r\n\r\n")
    assert c.router.endpoints[1].kwargs["host"] == "other.internal"
    assert c.router.endpoints[1].kwargs["port"] == 80
    assert c.router.endpoints[1].kwargs["location"] == ""
    upstream2, stream2 = c.router.endpoints[1].accept()
    assert requests_in(stream2.value())[0].target == b"/second"  # type: ignore[union-attr]
    answer(stream2, upstream2, b"two")
    assert one(c.take())[2] == b"two"


def test_the_request_head_goes_with_the_open_and_without_a_body_nothing_follows_the_accept() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    (endpoint,) = c.router.endpoints
    early, fin = endpoint.early
    events = requests_in(early)
    assert isinstance(events[0], h11.Request) and events[0].target == b"/api/x?y=1"
    assert isinstance(events[1], h11.EndOfMessage) and fin  # head, end and FIN before any ACCEPT
    upstream, stream = endpoint.accept()
    assert stream.value() == early  # the double put the early bytes there: the front end wrote nothing more
    answer(stream, upstream)
    assert one(c.take())[0] == 200
    # A request with a body: its head goes with the OPEN, without the FIN; the body follows the ACCEPT.
    c.send(b"POST http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 2\r\n\r\nhi")
    head, fin = c.router.endpoints[1].early
    assert head.startswith(b"POST /up HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n") and not fin
    _, stream2 = c.router.endpoints[1].accept()
    events = requests_in(stream2.value())
    assert [type(e) for e in events] == [h11.Request, h11.Data, h11.EndOfMessage] and stream2.write_closed


def test_an_upgrade_request_goes_with_the_open_without_the_fin() -> None:
    c = Client()
    c.send(b"GET http://ws.internal/ws HTTP/1.1\r\nHost: ws.internal\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\n\r\n")
    early, fin = c.router.endpoints[0].early
    assert early.startswith(b"GET /ws HTTP/1.1\r\n") and not fin


def test_pipelined_requests_wait_for_the_previous_answer() -> None:
    c = Client()
    c.send(GET + b"\r\n" + b"GET http://b.internal/ HTTP/1.1\r\nHost: b.internal\r\n\r\n")
    assert len(c.router.endpoints) == 1
    upstream, stream = c.router.endpoints[0].accept()
    assert len(c.router.endpoints) == 1
    answer(stream, upstream)
    assert len(c.router.endpoints) == 2


def test_request_body_streams_and_chunked_framing_is_kept() -> None:
    c = Client()
    c.send(b"POST http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    c.send(b"6\r\n world\r\n0\r\n\r\n")
    events = requests_in(stream.value())
    assert (b"transfer-encoding", b"chunked") in list(events[0].headers)  # type: ignore[attr-defined]
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"hello world"
    assert isinstance(events[-1], h11.EndOfMessage) and stream.write_closed


def test_expect_100_continue_is_answered_once_the_stream_is_open() -> None:
    c = Client()
    c.send(b"PUT http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 5\r\n"
           b"Expect: 100-continue\r\n\r\n")
    assert c.take() == b""
    upstream, stream = c.router.endpoints[0].accept()
    assert c.take().startswith(b"HTTP/1.1 100 ")
    assert b"expect" not in stream.value().lower()
    c.send(b"hello")
    assert stream.value().endswith(b"hello")


def test_origin_form_needs_host() -> None:
    c = Client()
    c.send(b"GET /x HTTP/1.0\r\n\r\n")
    status, _h, body = one(c.take())
    assert status == 400 and b"Host" in body


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("request_bytes", "status", "text"),
    [
        (b"NOT HTTP\r\n\r\n", 400, b"malformed request"),
        (b"GET https://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 405, b"https:// targets"),
        (b"GET ftp://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 400, b"request target must be"),
        (b"GET http://erp.internal:0/ HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 400, b"bad host"),
        (GET + b"SAP-Connectivity-Authentication: Bearer a\r\nSAP-Connectivity-Technical-Authentication: Bearer b"
         b"\r\n\r\n", 400, b"not both"),
        (GET + b"SAP-Connectivity-Authentication: Bearer a\r\nAuthorization: Basic x\r\n\r\n", 400,
         b"Authorization header must be omitted"),
        (GET + b"SAP-Connectivity-SCC-Location_ID: a\r\nSAP-Connectivity-SCC-Location_ID: b\r\n\r\n", 400,
         b"sent more than once"),
        (b"GET http://erp.internal/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, b"request line longer than 8192"),
        (GET + b"X-Long: " + b"x" * 8200 + b"\r\n\r\n", 431, b"header line x-long longer than 8192"),
        (GET + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 4000) for i in range(20)) + b"\r\n", 431,
         b"header block larger than 65536"),
        # A fragment would slip past the connector's path check on a backend that does not cut it off.
        (b"GET /api#/../admin HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 400, b"fragment"),
        # Non-ASCII bytes in a propagated token would grow sixfold in the OPEN's JSON (and are no JWT).
        (GET + b"SAP-Connectivity-Authentication: Bearer " + b"\xff" * 8000 + b"\r\n\r\n", 400, b"visible ASCII"),
    ],
)
def test_refusals(request_bytes: bytes, status: int, text: bytes) -> None:
    c = Client()
    c.send(request_bytes)
    got, headers, body = one(c.take())
    assert (got, text in body) == (status, True), body
    assert headers[b"content-type"].startswith(b"text/plain")
    assert c.router.endpoints == []


def test_incomplete_oversized_head_is_431() -> None:
    c = Client(max_header_bytes=16384)
    c.send(GET + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 1000) for i in range(20)))
    got, _h, body = one(c.take())
    assert got == 431 and c.transport.disconnecting


def test_request_line_too_long_is_414_before_the_head_ends() -> None:
    c = Client()
    c.send(b"GET http://erp.internal/" + b"a" * 8300)
    got, _h, _b = one(c.take())
    assert got == 414 and c.transport.disconnecting


def test_refused_request_without_body_keeps_the_connection() -> None:
    c = Client()
    c.send(b"GET https://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\n\r\n")
    assert one(c.take())[0] == 405
    assert not c.transport.disconnecting
    c.send(GET + b"\r\n")
    assert len(c.router.endpoints) == 1


def test_connect_not_allowed_is_405() -> None:
    c = Client(allow_connect=False)
    c.send(b"CONNECT erp.internal:443 HTTP/1.1\r\nHost: erp.internal:443\r\n\r\n")
    status, _h, body = one(c.take(), b"CONNECT")
    assert status == 405 and b"allowConnect is false" in body


@pytest.mark.parametrize(
    ("error", "status", "text"),
    [
        (AuthError("missing"), 407, b"no proxy authorization token"),
        (AuthError("expired"), 407, b"the token has expired"),
        (AuthError("missing", source="service_token"), 400, b"SAP-CP-Connectivity-Service-Token"),
        (AuthError("key_fetch_failed"), 503, b"could not be fetched"),
    ],
)
def test_authorization_failures(error: AuthError, status: int, text: bytes) -> None:
    c = Client(authorizer=FakeAuthorizer(error), authorization_enabled=True)
    c.send(GET + b"Proxy-Authorization: Bearer secret.token.value\r\n\r\n")
    got, headers, body = one(c.take())
    assert (got, text in body) == (status, True)
    assert b"secret.token.value" not in body
    assert (headers.get(b"proxy-authenticate") == b"Bearer") == (status == 407)
    assert c.authorizer.calls == [("secret.token.value", None)]
    (line,) = c.audit
    assert '"proxy call refused"' in line and error.reason in line and "secret" not in line


def _jwt(claims: str) -> str:
    import base64

    def enc(s: str) -> str:
        return base64.urlsafe_b64encode(s.encode()).rstrip(b"=").decode()

    return f"{enc('{}')}.{enc(claims)}.sig"


def test_user_in_proxy_authorization_and_sap_authentication_is_400() -> None:
    c = Client(authorization_enabled=True)
    token = _jwt('{"user_name": "alice", "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}')
    c.send(GET + f"Proxy-Authorization: Bearer {token}\r\n".encode()
           + b"SAP-Connectivity-Authentication: Bearer user\r\n\r\n")
    status, _h, body = one(c.take())
    assert status == 400 and b"already in Proxy-Authorization" in body
    # a client-credentials token may come with SAP-Connectivity-Authentication
    c = Client(authorization_enabled=True)
    client_token = _jwt('{"grant_type": "client_credentials"}')
    c.send(GET + f"Proxy-Authorization: Bearer {client_token}\r\n".encode()
           + b"SAP-Connectivity-Authentication: Bearer user\r\n\r\n")
    assert len(c.router.endpoints) == 1


@pytest.mark.parametrize(
    ("failure", "status", "text"),
    [
        (NoConnectorError("tenant-a", "loc-9"), 503, b"no connector for subaccount tenant-a, location loc-9"),
        (StreamRefusedError(ErrorCode.ACCESS_DENIED, "access denied to path /x on system erp.internal:8080"), 403,
         b"access denied to path /x on system erp.internal:8080"),
        (StreamRefusedError(ErrorCode.CONNECT_REFUSED, "Connection refused"), 502, b"refused the connection"),
        (StreamRefusedError(ErrorCode.CONNECT_TIMEOUT, "timeout"), 504, b"did not accept the connection"),
        (OpenTimeoutError("slow"), 504, b"did not open"),
    ],
)
def test_open_failures(failure: Exception, status: int, text: bytes) -> None:
    c = Client()
    c.send(GET + b"\r\n")
    c.router.endpoints[0].d.errback(failure)
    got, _h, body = one(c.take())
    assert (got, text in body) == (status, True), body
    assert not c.transport.disconnecting  # no body: the connection stays


def test_open_failure_with_a_pending_body_closes() -> None:
    c = Client()
    c.send(b"POST http://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 10\r\n\r\n12345")
    c.router.endpoints[0].d.errback(NoConnectorError("tenant-a", ""))
    status, headers, _body = one(c.take())
    assert status == 503 and headers[b"connection"] == b"close" and c.transport.disconnecting


def test_first_byte_timeout_is_504_and_resets_the_stream() -> None:
    c = Client(first_byte_timeout=5.0)
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    c.clock.advance(4.9)
    assert c.take() == b""
    c.clock.advance(0.2)
    status, _h, body = one(c.take())
    assert status == 504 and b"did not answer within 5s" in body
    assert stream.aborted


def test_stream_reset_before_the_answer_maps_its_code() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    upstream.connectionLost(Failure(StreamResetError(ErrorCode.BACKEND_RESET, "gone")))
    status, _h, body = one(c.take())
    assert status == 502 and b"closed the connection" in body


def test_stream_reset_during_the_answer_cuts_the_client_off() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    upstream.connectionLost(Failure(StreamResetError(ErrorCode.BACKEND_RESET, "gone")))
    assert c.transport.aborted


def test_client_gone_while_routing_cancels_the_open() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    c.protocol.connectionLost(Failure(Exception("gone")))
    assert len(c.router.cancelled) == 1


def test_header_timeout_is_408() -> None:
    c = Client(header_timeout=3.0)
    c.send(b"GET http://erp.internal/ HTTP/1.1\r\n")
    c.clock.advance(3.1)
    status, _h, _b = one(c.take())
    assert status == 408 and c.transport.disconnecting


def test_idle_connection_is_closed() -> None:
    c = Client(idle_timeout=10.0)
    c.clock.advance(9)
    assert not c.transport.disconnecting
    c.clock.advance(2)
    assert c.transport.disconnecting


# ------------------------------------------------------------------------------------------------ tunnels


def test_connect_relays_raw_bytes_including_those_read_with_the_head() -> None:
    c = Client()
    c.send(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nearly")
    endpoint = c.router.endpoints[0]
    assert (endpoint.kwargs["kind"], endpoint.kwargs["host"], endpoint.kwargs["port"]) == ("tcp", "db.internal", 5432)
    far, stream = endpoint.accept()
    assert isinstance(far, Relay)
    assert c.take().startswith(b"HTTP/1.1 200 ")
    assert stream.value() == b"early"
    c.send(b"more")
    assert stream.value() == b"earlymore"
    far.dataReceived(b"reply")
    assert c.take() == b"reply"
    c.protocol.readConnectionLost()
    assert stream.write_closed


def test_upgrade_switches_both_sides_to_raw() -> None:
    c = Client()
    c.send(b"GET http://ws.internal/ws HTTP/1.1\r\nHost: ws.internal\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n")
    endpoint = c.router.endpoints[0]
    assert endpoint.kwargs["meta"]["http"]["upgrade"] == "websocket"
    upstream, stream = endpoint.accept()
    request = requests_in(stream.value())[0]
    assert isinstance(request, h11.Request)
    assert (b"upgrade", b"websocket") in list(request.headers)
    assert not stream.write_closed  # no FIN: the stream may carry the new protocol
    stream.clear()
    upstream.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: a\r\n\r\nframe1")
    raw = c.take()
    assert raw.startswith(b"HTTP/1.1 101 ") and raw.endswith(b"\r\n\r\nframe1")
    assert b"sec-websocket-accept: a" in raw.lower()
    c.send(b"frame2")
    assert stream.value() == b"frame2"


def test_a_bug_is_a_500_without_a_traceback() -> None:
    c = Client()

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    c.router.endpoint = broken  # type: ignore[method-assign]
    c.send(GET + b"\r\n")
    status, _h, body = one(c.take())
    assert status == 500 and body == b"internal error in the proxy\n"
    assert c.transport.disconnecting


def test_head_and_no_content_answers_have_no_body() -> None:
    c = Client()
    c.send(b"HEAD http://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\n\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    status, headers, body = one(c.take(), b"HEAD")
    assert (status, headers[b"content-length"], body) == (200, b"1234", b"")
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[1].accept()
    upstream.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert one(c.take())[0] == 204 and not c.transport.disconnecting


def test_chunked_answer_to_an_http_1_0_client_is_close_delimited() -> None:
    c = Client()
    c.send(b"GET http://erp.internal/ HTTP/1.0\r\n\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    raw = c.take()
    assert b"transfer-encoding" not in raw.lower() and raw.endswith(b"\r\n\r\nhello")
    assert c.transport.disconnecting


def test_connection_header_cannot_strip_framing_or_host() -> None:
    from connproxy.http.headers import end_to_end_headers

    kept = end_to_end_headers([(b"Content-Length", b"5"), (b"Host", b"h"), (b"X-A", b"1"),
                               (b"Connection", b"content-length, host, x-a")])
    assert kept == [(b"content-length", b"5"), (b"host", b"h")]


# ------------------------------------------------------------------------------------------------ counted bodies


def _no_buffering(protocol: Any) -> list[bytes]:
    """Record what reaches ``protocol``'s h11 buffer (the counted-body fast path passes body bytes around it)."""
    fed: list[bytes] = []
    receive = protocol.conn.receive_data

    def record(data: bytes) -> None:
        fed.append(bytes(data))
        receive(data)

    protocol.conn.receive_data = record
    return fed


def test_counted_response_body_bypasses_h11_and_keeps_the_connection_alive() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    fed = _no_buffering(upstream)
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhel")
    upstream.dataReceived(b"lo wo")
    upstream.dataReceived(b"rld!")
    assert fed == [b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhel"]  # the rest went around h11's buffer
    status, headers, body = one(c.take())
    assert (status, headers[b"content-length"], body) == (200, b"12", b"hello world!")
    assert c.transport.producer is None and not c.transport.disconnecting
    # h11 saw the whole body: the connection goes on with the next request
    c.send(b"GET http://b.internal/ HTTP/1.1\r\nHost: b.internal\r\n\r\n")
    upstream2, stream2 = c.router.endpoints[1].accept()
    answer(stream2, upstream2, b"two")
    assert one(c.take())[2] == b"two"


def test_counted_response_body_cut_short_cuts_the_client_off() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    upstream.dataReceived(b"partial")  # through the fast path
    upstream.readConnectionLost()  # FIN before the 100 bytes: never a short answer on a kept-alive connection
    assert c.transport.aborted


def test_counted_request_body_bypasses_h11_and_a_pipelined_request_waits() -> None:
    c = Client()
    c.send(b"POST http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 10\r\n\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    fed = _no_buffering(c.protocol)
    c.send(b"hello")
    c.send(b"world" + GET + b"\r\n")  # the end of the body and a pipelined request in one read
    assert fed == [GET + b"\r\n"]
    events = requests_in(stream.value())
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"helloworld"
    assert isinstance(events[-1], h11.EndOfMessage) and stream.write_closed
    assert len(c.router.endpoints) == 1
    answer(stream, upstream)
    assert one(c.take())[0] == 200
    assert len(c.router.endpoints) == 2  # the pipelined request goes on after the answer


def test_counted_body_is_not_taken_around_h11_while_held() -> None:
    c = Client()
    c.send(b"POST http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 5\r\n\r\n")
    c.send(b"hel")  # routing: the body waits in h11's buffer (and the socket is paused)
    assert c.protocol.conn.trailing_data[0] == b"hel"
    upstream, stream = c.router.endpoints[0].accept()
    c.send(b"lo")
    events = requests_in(stream.value())
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"hello"
    assert isinstance(events[-1], h11.EndOfMessage)


def test_head_request_refused_gets_its_status_without_a_body() -> None:
    c = Client()
    c.send(b"HEAD https://erp.internal/x HTTP/1.1\r\nHost: erp.internal\r\n\r\n")  # 405, keep-alive
    raw = c.take()
    assert raw.startswith(b"HTTP/1.1 405 ")
    assert raw.endswith(b"\r\n\r\n")  # no body after the head of a HEAD answer
    assert not c.transport.disconnecting or b"connection: close" in raw.lower()


def test_malformed_ipv6_authority_is_400() -> None:
    c = Client()
    c.send(b"GET http://[::1/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.take().startswith(b"HTTP/1.1 400 ")


def test_bytes_while_routing_pause_the_client() -> None:
    """A request body (or a pipelined request) that arrives while its request is routed stays in the parser's
    buffer, one read at most: reading stops until the stream is wired."""
    c = Client()
    c.send(b"GET http://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\n\r\n")
    assert c.transport.producerState == "producing"  # nothing held
    c = Client()
    c.send(b"POST http://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 8\r\n\r\n")
    assert c.transport.producerState == "paused"  # a body will come and is held while routing
    c.send(b"abcd")
    assert c.transport.producerState == "paused"  # held while routing
    (endpoint,) = c.router.endpoints
    upstream, stream = endpoint.accept()
    assert c.transport.producerState == "producing"  # wired: the stream is the client's producer now
    c.send(b"efgh")
    events = requests_in(stream.value())
    assert b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data)) == b"abcdefgh"
    answer(stream, upstream)
    status, _headers, body = one(c.take())
    assert (status, body) == (200, b"hello")


def test_transfer_encoding_with_content_length_never_reuses_the_connection() -> None:
    c = Client()
    c.send(b"POST http://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 4\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    (endpoint,) = c.router.endpoints
    upstream, stream = endpoint.accept()
    answer(stream, upstream)
    status, _headers, body = one(c.take())
    assert (status, body) == (200, b"hello")
    assert c.transport.disconnecting  # RFC 9112 6.1: the connection is not reused after such a request


def test_own_answers_pile_up_unread_then_reading_stops() -> None:
    """A client pipelining requests the proxy refuses itself, never reading the answers, is not read forever."""
    c = Client()
    c.protocol._own_answers.watch()
    assert c.transport.producer is c.protocol._own_answers
    c.protocol._own_answers.pauseProducing()  # what the transport does once its buffer is full
    assert c.transport.producerState == "paused"
    c.send(b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n")  # a read already under way
    assert c.take().startswith(b"HTTP/1.1 405 ")
    assert c.transport.producerState == "paused"  # the next cycle does not resume reading while paused
    c.protocol._own_answers.resumeProducing()
    assert c.transport.producerState == "producing"


# ------------------------------------------------------------------------------------------------ timeouts


def test_a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() -> None:
    c = Client(header_timeout=5.0)
    c.clock.advance(4.9)
    assert not c.transport.disconnecting
    c.clock.advance(0.2)
    assert c.transport.disconnecting and c.take() == b""  # nothing was asked: nothing is answered


def test_the_first_request_head_is_timed_from_the_accept() -> None:
    c = Client(header_timeout=5.0)
    c.clock.advance(4.0)
    c.send(b"GET http://erp.internal/ HTTP/1.1\r\n")
    c.clock.advance(1.1)  # 5.1 s after the accept, 1.1 s after the first byte
    status, headers, body = one(c.take())
    assert status == 408 and b"5s" in body and headers[b"connection"] == b"close"


def test_a_kept_alive_connection_times_the_next_head_from_its_first_byte() -> None:
    c = Client(header_timeout=5.0)
    c.send(GET + b"\r\n")
    upstream, stream = c.router.endpoints[0].accept()
    answer(stream, upstream)
    assert one(c.take())[0] == 200
    c.clock.advance(60)  # idle between requests: the idle timeout's business, not the head timer's
    assert not c.transport.disconnecting
    c.send(b"GET http://erp.internal/ HTTP/1.1\r\n")
    c.clock.advance(5.1)
    assert one(c.take())[0] == 408


def _post(c: Client, length: int = 100_000) -> tuple[Any, HalfCloseTransport]:
    c.send(b"POST http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: %d\r\n\r\n" % length)
    return c.router.endpoints[0].accept()


def test_a_request_body_trickling_in_is_408_and_its_stream_reset() -> None:
    from connproxy.proxy.http_frontend import MIN_BODY_RATE

    c = Client(body_timeout=10.0)
    upstream, stream = _post(c)
    for _ in range(9):  # one byte a second: progress, but far below MIN_BODY_RATE
        c.send(b"x")
        c.clock.advance(1.0)
    assert not c.transport.disconnecting
    c.clock.advance(1.1)
    status, headers, body = one(c.take())
    assert status == 408 and b"request body too slow: 9 bytes in 10s" in body
    assert str(MIN_BODY_RATE * 10).encode() in body
    assert stream.aborted and headers[b"connection"] == b"close" and c.transport.disconnecting


def test_a_request_body_without_progress_is_408() -> None:
    c = Client(body_timeout=10.0)
    upstream, stream = _post(c)
    c.send(b"x" * 5000)
    c.clock.advance(10.1)  # the first window carried enough
    assert not c.transport.disconnecting
    c.clock.advance(10.0)  # the second one nothing at all
    assert one(c.take())[0] == 408 and stream.aborted


def test_a_request_body_at_a_fair_rate_is_never_cut() -> None:
    c = Client(body_timeout=10.0, first_byte_timeout=1000.0)
    upstream, stream = _post(c, 50_000)
    for _ in range(50):  # 1000 bytes per second for 50 s: exactly the minimum rate
        c.send(b"y" * 1000)
        c.clock.advance(1.0)
    assert not c.transport.disconnecting and not stream.aborted
    events = requests_in(stream.value())
    assert sum(len(e.data) for e in events if isinstance(e, h11.Data)) == 50_000
    answer(stream, upstream)
    assert one(c.take())[0] == 200


def test_a_request_body_held_back_by_the_stream_is_not_the_clients_fault() -> None:
    c = Client(body_timeout=10.0)
    upstream, stream = _post(c)
    stream._producer_paused = True  # type: ignore[attr-defined] # what TunnelStream sets while out of credit
    c.clock.advance(35)
    assert not c.transport.disconnecting and not stream.aborted
    stream._producer_paused = False  # type: ignore[attr-defined]
    c.clock.advance(10)
    assert one(c.take())[0] == 408


def test_a_slow_body_after_the_answer_started_cuts_both_off() -> None:
    c = Client(body_timeout=10.0)
    upstream, stream = _post(c)
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")  # an early answer
    c.clock.advance(10.1)
    assert stream.aborted and c.transport.aborted
    assert b" 408 " not in c.take()


def test_the_first_byte_timeout_starts_when_the_request_is_complete() -> None:
    c = Client(first_byte_timeout=5.0, body_timeout=100.0)
    upstream, stream = _post(c, 10)
    c.send(b"12345")
    c.clock.advance(30)  # the body is slow but within its timeout: no 504 while it streams
    assert c.take() == b""
    c.send(b"67890")
    c.clock.advance(4.9)
    assert c.take() == b""
    c.clock.advance(0.2)
    assert one(c.take())[0] == 504


# ------------------------------------------------------------------------------------------------ client faults


class ResettingStream(HalfCloseTransport):
    """A tunnel stream that, like :class:`~connproxy.tunnel.stream.TunnelStream`, ends its protocol at once when
    aborted."""

    def abortConnection(self) -> None:
        super().abortConnection()
        protocol: Any = getattr(self, "protocol", None)
        if protocol is not None:
            self.protocol = None
            protocol.connectionLost(Failure(ConnectionDone()))


def test_a_malformed_chunked_body_is_the_clients_fault_400_and_the_stream_is_reset() -> None:
    from twisted.internet.testing import EventLoggingObserver
    from twisted.logger import globalLogPublisher

    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    try:
        c = Client()
        c.send(b"POST http://erp.internal/up HTTP/1.1\r\nHost: erp.internal\r\nTransfer-Encoding: chunked\r\n\r\n")
        upstream, stream = c.router.endpoints[0].accept(ResettingStream())
        c.send(b"5\r\nhello\r\nnot-a-chunk-size\r\n")
    finally:
        globalLogPublisher.removeObserver(events)
    status, headers, body = one(c.take())
    assert (status, headers[b"connection"]) == (400, b"close") and b"malformed request body" in body
    assert stream.aborted and not stream.write_closed  # RESET, never a FIN that would complete the request
    formats = [e.get("log_format", "") for e in events]
    assert any("sent a malformed request" in f for f in formats)
    assert not any("failed: {status}" in f for f in formats)  # not logged as a backend failure


def test_client_text_in_an_answer_has_its_control_characters_escaped() -> None:
    c = Client()
    c.send(GET + b"\r\n")
    c.router.endpoints[0].d.errback(NoConnectorError("tenant\r\nX-Injected: 1", "loc\x1b[2J\x85"))
    status, headers, body = one(c.take())
    assert status == 503 and b"x-injected" not in headers
    assert body == b"no connector for subaccount tenant\\x0d\\x0aX-Injected: 1, location loc\\x1b[2J\\x85\n"


def test_tcp_nodelay_is_set_on_the_accepted_socket() -> None:
    class NoDelayTransport(HalfCloseTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.no_delay = enabled

    factory = Client().factory
    protocol = factory.build(None)
    transport = NoDelayTransport()
    protocol.makeConnection(transport)
    assert transport.no_delay


# ------------------------------------------------------------------------------------------------ limits


def test_connections_over_the_limits_get_503_and_are_closed_at_once() -> None:
    c = Client(max_connections=3, max_connections_per_client=2)
    factory = c.factory
    a = IPv4Address("TCP", "10.0.0.1", 1)
    b = IPv4Address("TCP", "10.0.0.2", 1)
    first, second = factory.buildProtocol(a), factory.buildProtocol(a)
    assert isinstance(first, HttpProxyProtocol) and isinstance(second, HttpProxyProtocol)
    busy = factory.buildProtocol(a)  # a third from the same client
    assert busy is not None and not isinstance(busy, HttpProxyProtocol)
    transport = HalfCloseTransport()
    busy.makeConnection(transport)
    status, headers, body = one(transport.value())
    assert (status, headers[b"connection"]) == (503, b"close") and b"too many connections" in body
    assert transport.disconnecting
    third = factory.buildProtocol(b)
    assert isinstance(third, HttpProxyProtocol)
    assert not isinstance(factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 1)), HttpProxyProtocol)  # total
    first.makeConnection(HalfCloseTransport())
    first.connectionLost(Failure(ConnectionDone()))
    first.connectionLost(Failure(ConnectionDone()))  # counted once
    assert (factory.connections, factory.by_client) == (2, {"10.0.0.1": 1, "10.0.0.2": 1})
    assert isinstance(factory.buildProtocol(a), HttpProxyProtocol)


# ------------------------------------------------------------------------------------------------ phases


def test_every_phase_can_end_and_illegal_transitions_are_bugs() -> None:
    from connproxy.proxy.http_frontend import TRANSITIONS, Phase, _Exchange

    assert set(TRANSITIONS) == set(Phase)
    assert all(Phase.ENDED in nxt for phase, nxt in TRANSITIONS.items() if phase is not Phase.ENDED)
    ex = _Exchange(method=b"GET", raw_target=b"/", has_body=False)
    ex.to(Phase.SENDING)
    with pytest.raises(RuntimeError, match="from SENDING to REJECTED"):
        ex.to(Phase.REJECTED)


def test_an_exchange_goes_through_its_phases() -> None:
    from connproxy.proxy.http_frontend import Phase

    c = Client()
    c.send(b"POST http://erp.internal/ HTTP/1.1\r\nHost: erp.internal\r\nContent-Length: 4\r\n\r\nab")
    ex = c.protocol.exchange
    assert ex is not None and ex.phase is Phase.ROUTING
    upstream, stream = c.router.endpoints[0].accept()
    assert ex.phase is Phase.SENDING
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")  # an early answer
    assert ex.phase is Phase.ANSWERING
    upstream.dataReceived(b"ok")
    assert ex.phase is Phase.ANSWERED and c.protocol.exchange is ex  # the request body is still coming
    c.send(b"cd")
    assert ex.phase is Phase.ENDED and c.protocol.exchange is None
    assert one(c.take()) == (200, {b"content-length": b"2"}, b"ok")
    assert not c.transport.disconnecting


def test_a_refused_upgrade_is_answered_and_the_connection_kept() -> None:
    c = Client()
    c.send(b"GET http://ws.internal/ws HTTP/1.1\r\nHost: ws.internal\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\n\r\n")
    c.router.endpoints[0].d.errback(StreamRefusedError(ErrorCode.ACCESS_DENIED, "resource /ws allows no upgrades"))
    status, _h, body = one(c.take())
    assert (status, body) == (403, b"resource /ws allows no upgrades\n")
    assert not c.transport.disconnecting
    c.send(GET + b"\r\n")
    assert len(c.router.endpoints) == 2
