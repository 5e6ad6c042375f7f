"""The connector's HTTP mappings: access decisions, request and response rewriting, the backend pool.

Fake tunnel, fake streams and fake backend endpoints over StringTransports; a task.Clock; no reactor.
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from connproxy.config import AccessRule, ConnectorConfig, Resource
from connproxy.connector.http_gateway import BackendPool, rewrite_location
from connproxy.connector.tcp import BackendDialer
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import OpenRequest
from tests import doubles


class Transport(doubles.HalfCloseTransport):
    def __init__(self) -> None:
        super().__init__(IPv4Address("TCP", "127.0.0.1", 40000))


class FakeStream(Transport):
    """A tunnel stream as the connector sees it: a transport with an OPEN request."""

    def __init__(self, tunnel: FakeTunnel, stream_id: int, request: OpenRequest) -> None:
        super().__init__()
        self.connection = tunnel
        self.stream_id = stream_id
        self.request = request
        self.closed = False
        self.reset_with: tuple[ErrorCode, str] | None = None
        self.protocol: Any = None

    def reset(self, code: ErrorCode, reason: str) -> None:
        self.closed = True
        self.reset_with = (code, reason)

    def refuse(self, code: ErrorCode, reason: str, local_reason: str | None = None) -> None:
        if self.closed:
            return
        self.connection.reset_stream(self.stream_id, code, reason)
        self.reset(code, reason if local_reason is None else local_reason)

    def loseConnection(self) -> None:
        super().loseConnection()
        self.closed = True


class FakeTunnel:
    def __init__(self) -> None:
        self.resets: list[tuple[int, ErrorCode, str]] = []
        self.accepted: list[FakeStream] = []
        self.pending_connects: dict[int, Deferred[Any]] = {}

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "", after_data: bool = False) -> None:
        self.resets.append((stream_id, code, reason))

    def accept(self, stream: FakeStream, protocol: Any) -> None:
        self.accepted.append(stream)
        stream.protocol = protocol
        protocol.makeConnection(stream)


class FakeEndpoint:
    def __init__(self, backends: Backends, rule: AccessRule, host: str, port: int) -> None:
        self.backends = backends
        self.target = (rule.protocol, host, port)

    def connect(self, factory: Any) -> Deferred[Any]:
        self.backends.connects.append(self.target)
        if self.backends.refuse:
            return fail(ConnectionRefusedError("refused"))
        protocol = factory.buildProtocol(None)
        transport = Transport()
        self.backends.transports.append(transport)
        protocol.makeConnection(transport)
        self.backends.protocols.append(protocol)
        return succeed(protocol)


class Backends:
    def __init__(self) -> None:
        self.connects: list[tuple[str, str, int]] = []
        self.transports: list[Transport] = []
        self.protocols: list[Any] = []
        self.refuse = False

    def endpoint_for(self, rule: AccessRule, host: str, port: int) -> FakeEndpoint:
        return FakeEndpoint(self, rule, host, port)


RULES = (
    AccessRule(virtual_host="erp.internal", virtual_ports=(8080, 8080), internal_host="10.1.1.1",
               internal_ports=(8000, 8000), protocol="HTTP",
               resources=(Resource("/api", all_sub_paths=True), Resource("/exact"),
                          Resource("/ws", upgrade_allowed=True))),
    AccessRule(virtual_host="int.internal", virtual_ports=(80, 80), internal_host="backend.lan",
               internal_ports=(8443, 8443), protocol="HTTPS", host_in_header="internal",
               resources=(Resource("/", all_sub_paths=True),)),
    AccessRule(virtual_host="db.internal", virtual_ports=(5432, 5432), internal_host="10.1.1.2",
               internal_ports=(5432, 5432), protocol="TCP"),
)


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.audit: list[str] = []
        self.backends = Backends()
        self.config = ConnectorConfig(connector_id="c1", access_control=RULES)
        self.dialer = BackendDialer(self.clock, self.config, self.backends.endpoint_for,  # type: ignore[arg-type]
                                    audit_writer=self.audit.append)
        self.gateway = self.dialer.http
        self.tunnel = FakeTunnel()
        self.next_id = 2

    def open(self, host: str, port: int, method: str = "GET", target: str = "/api/x",
             upgrade: str | None = None) -> FakeStream:
        meta = {"tenant": "tenant-a", "location": "", "client_id": "sb-app",
                "http": {"method": method, "target": target, "upgrade": upgrade}}
        stream = FakeStream(self.tunnel, self.next_id, OpenRequest(host, port, "http", meta))
        self.next_id += 2
        self.dialer.handle(self.tunnel, stream)  # type: ignore[arg-type]
        return stream


def backend_requests(raw: bytes) -> list[h11.Event]:
    return doubles.h11_events(h11.Connection(h11.SERVER), raw)


def stream_response(raw: bytes) -> list[h11.Event]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    return doubles.h11_events(conn, raw)


# ------------------------------------------------------------------------------------------------ decisions


@pytest.mark.parametrize(
    ("host", "port", "target", "upgrade", "reason", "why"),
    [
        ("nowhere.internal", 80, "/api", None, "access denied to system nowhere.internal:80",
         "no access control rule"),
        ("db.internal", 5432, "/api", None, "access denied to system db.internal:5432",
         "TCP mapping does not serve HTTP"),
        ("erp.internal", 8080, "/secret?token=abc", None, "access denied to path /secret on system erp.internal:8080",
         "no resource allows this path"),
        ("erp.internal", 8080, "/API/x", None, "access denied to path /API/x on system erp.internal:8080",
         "no resource"),
        ("erp.internal", 8080, "/exact/sub", None, "access denied to path /exact/sub on system erp.internal:8080",
         "no resource"),
        ("erp.internal", 8080, "/api/../secret", None, "access denied to path /api/../secret", "no resource"),
        ("erp.internal", 8080, "/api/chat", "websocket",
         "access denied to path /api/chat on system erp.internal:8080: upgrade to websocket not allowed",
         "does not allow upgrades"),
    ],
)
def test_denied(host: str, port: int, target: str, upgrade: str | None, reason: str, why: str) -> None:
    s = Setup()
    stream = s.open(host, port, target=target, upgrade=upgrade)
    ((stream_id, code, sent_reason),) = s.tunnel.resets
    assert (stream_id, code) == (stream.stream_id, ErrorCode.ACCESS_DENIED)
    assert sent_reason.startswith(reason)
    assert "token" not in sent_reason
    assert stream.closed and s.backends.connects == []
    (line,) = s.audit
    assert '"access denied"' in line and why in line and '"oauthClientId":"sb-app"' in line
    assert "token=abc" not in line


def test_allowed_exact_and_query_ignored() -> None:
    s = Setup()
    s.open("erp.internal", 8080, target="/exact?q=1")
    assert len(s.tunnel.accepted) == 1
    assert '"access allowed"' in s.audit[0] and '"method":"GET"' in s.audit[0] and '"path":"/exact"' in s.audit[0]


def test_missing_http_metadata_is_a_protocol_error() -> None:
    s = Setup()
    stream = FakeStream(s.tunnel, 2, OpenRequest("erp.internal", 8080, "http", {"tenant": "t"}))
    s.dialer.handle(s.tunnel, stream)  # type: ignore[arg-type]
    assert s.tunnel.resets[0][1] == ErrorCode.PROTOCOL_ERROR


def test_backend_refused_is_reset_with_connect_refused() -> None:
    s = Setup()
    s.backends.refuse = True
    with capturedLogs() as events:
        s.open("erp.internal", 8080)
    assert s.tunnel.resets[0][1] == ErrorCode.CONNECT_REFUSED
    assert s.tunnel.accepted == []
    # The log line names the mapping whose backend could not be reached.
    lines = [formatEvent(e) for e in events if "unreachable" in formatEvent(e)]
    assert lines == ["backend of accessControl[0] (HTTP erp.internal:8080 -> 10.1.1.1:8000) unreachable for "
                     "subaccount tenant-a: CONNECT_REFUSED Connection was refused by other side: refused."], lines


def test_dialer_dispatches_http_streams() -> None:
    config = ConnectorConfig(connector_id="c1", access_control=RULES)
    backends = Backends()
    dialer = BackendDialer(Clock(), config, endpoint_for=backends.endpoint_for,  # type: ignore[arg-type]
                           audit_writer=lambda _l: None)
    tunnel = FakeTunnel()
    meta = {"tenant": "t", "http": {"method": "GET", "target": "/api", "upgrade": None}}
    dialer.handle(tunnel, FakeStream(tunnel, 2, OpenRequest("erp.internal", 8080, "http", meta)))  # type: ignore[arg-type]
    assert len(tunnel.accepted) == 1 and backends.connects == [("HTTP", "10.1.1.1", 8000)]


# ------------------------------------------------------------------------------------------------ exchange


def test_request_goes_to_the_backend_with_the_virtual_host_and_the_answer_comes_back() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080, method="POST", target="/api/x?y=1")
    backend_transport = s.backends.transports[0]
    assert stream.producer is backend_transport and backend_transport.producer is stream  # wired
    stream.protocol.dataReceived(b"POST /api/x?y=1 HTTP/1.1\r\nHost: erp.internal:8080\r\nContent-Length: 3\r\n"
                                 b"Connection: keep-alive\r\n\r\nabc")
    events = backend_requests(backend_transport.value())
    request = events[0]
    assert isinstance(request, h11.Request)
    assert list(request.headers) == [(b"host", b"erp.internal:8080"), (b"content-length", b"3")]
    assert events[1] == h11.Data(data=b"abc")
    stream.protocol.readConnectionLost()  # the proxy's FIN after the request
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 302 Found\r\nLocation: http://10.1.1.1:8000/api/next?a=1\r\n"
                         b"Content-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok")
    response = stream_response(stream.value())
    assert isinstance(response[0], h11.Response)
    headers = dict(response[0].headers)
    assert headers[b"location"] == b"http://erp.internal:8080/api/next?a=1"
    assert b"keep-alive" not in headers
    assert response[1] == h11.Data(data=b"ok") and isinstance(response[2], h11.EndOfMessage)
    assert stream.closed  # FIN after the response
    assert s.gateway.pool.idle_count == 1 and backend_transport.producer is None
    # the next request reuses the pooled connection
    stream2 = s.open("erp.internal", 8080, target="/api/again")
    assert len(s.backends.connects) == 1
    backend_transport.clear()
    stream2.protocol.dataReceived(b"GET /api/again HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    assert backend_requests(backend_transport.value())[0].target == b"/api/again"  # type: ignore[union-attr]


def test_host_in_header_internal_sets_x_forwarded_host() -> None:
    s = Setup()
    stream = s.open("int.internal", 80, target="/x")
    assert s.backends.connects == [("HTTPS", "backend.lan", 8443)]
    backend = s.backends.protocols[0]
    backend.handshakeCompleted()  # HTTPS: ready after the TLS handshake
    stream = s.tunnel.accepted[0]
    stream.protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: int.internal\r\nX-Forwarded-Host: spoofed\r\n\r\n")
    request = backend_requests(s.backends.transports[0].value())[0]
    assert list(request.headers)[:2] == [(b"host", b"backend.lan:8443"),  # type: ignore[attr-defined]
                                         (b"x-forwarded-host", b"int.internal")]
    assert b"spoofed" not in s.backends.transports[0].value()


def test_https_backend_waits_for_the_handshake_and_fails_on_its_loss() -> None:
    s = Setup()
    s.open("int.internal", 80, target="/x")
    assert s.tunnel.accepted == []
    from OpenSSL import SSL

    s.backends.protocols[0].connectionLost(Failure(SSL.Error("certificate verify failed")))
    assert s.tunnel.resets[0][1] == ErrorCode.TLS_ERROR


def test_request_other_than_announced_is_refused() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080, target="/api/x")
    stream.protocol.dataReceived(b"GET /secret HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    assert s.tunnel.resets[-1][1] == ErrorCode.PROTOCOL_ERROR
    assert s.backends.transports[0].value() == b"" and s.backends.transports[0].aborted


def test_backend_closing_before_answering_resets_the_stream() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    s.backends.protocols[0].connectionLost(Failure(ConnectionDone()))
    assert s.tunnel.resets[-1][1] == ErrorCode.BACKEND_RESET


def test_close_delimited_answer_ends_with_the_backend_close() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    backend.connectionLost(Failure(ConnectionDone()))
    events = stream_response(stream.value())
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"until close"
    assert isinstance(events[-1], h11.EndOfMessage) and s.tunnel.resets == []
    assert s.gateway.pool.idle_count == 0


def test_stream_reset_by_the_proxy_aborts_the_backend() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    from connproxy.tunnel.errors import StreamResetError

    stream.protocol.connectionLost(Failure(StreamResetError(ErrorCode.CANCEL, "first-byte timeout")))
    assert s.backends.transports[0].aborted and s.gateway.pool.idle_count == 0


def test_upgrade_switches_to_a_raw_relay() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080, target="/ws", upgrade="websocket")
    stream.protocol.dataReceived(b"GET /ws HTTP/1.1\r\nHost: erp.internal:8080\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket\r\n\r\n")
    backend_transport = s.backends.transports[0]
    request = backend_requests(backend_transport.value())[0]
    assert (b"upgrade", b"websocket") in list(request.headers)  # type: ignore[attr-defined]
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi")
    assert stream.value().startswith(b"HTTP/1.1 101 ") and stream.value().endswith(b"\r\n\r\nhi")
    backend_transport.clear()
    stream.protocol.dataReceived(b"raw bytes")
    assert backend_transport.value() == b"raw bytes"


# ------------------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (b"http://10.1.1.1:8000/a?b=1#f", b"http://erp.internal:8080/a?b=1#f"),
        (b"https://10.1.1.1:8000/a", b"http://erp.internal:8080/a"),
        (b"http://10.1.1.1/a", b"http://10.1.1.1/a"),  # another port
        (b"http://elsewhere:8000/a", b"http://elsewhere:8000/a"),
        (b"/relative", b"/relative"),
        (b"http://10.1.1.1:bad/a", b"http://10.1.1.1:bad/a"),
    ],
)
def test_rewrite_location(location: bytes, expected: bytes) -> None:
    assert rewrite_location(location, RULES[0], "erp.internal", 8080) == expected


def test_pool_is_bounded_and_expires() -> None:
    clock = Clock()
    pool = BackendPool(clock, max_idle_per_backend=2, idle_timeout=5.0)
    from connproxy.connector.http_gateway import HttpBackend

    backends = []
    for _ in range(3):
        backend = HttpBackend(("HTTP", "h", 1, None), tls=False)
        backend.makeConnection(Transport())
        backends.append(backend)
        pool.put(backend)
    assert pool.idle_count == 2 and backends[2].transport.disconnecting  # type: ignore[union-attr]
    assert pool.take(("HTTP", "h", 1, None)) is backends[1]
    clock.advance(5.1)
    assert pool.idle_count == 0 and backends[0].transport.disconnecting  # type: ignore[union-attr]
    assert pool.take(("HTTP", "h", 1, None)) is None


def _first_exchange(s: Setup) -> None:
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    s.backends.protocols[0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert s.gateway.pool.idle_count == 1


def test_stale_pooled_connection_is_retried_once_for_a_bodiless_get() -> None:
    s = Setup()
    _first_exchange(s)
    stream = s.open("erp.internal", 8080, target="/api/y")
    stream.protocol.dataReceived(b"GET /api/y HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    s.backends.protocols[0].connectionLost(Failure(ConnectionDone()))  # the backend had closed it meanwhile
    assert len(s.backends.connects) == 2 and s.tunnel.resets == []
    request = backend_requests(s.backends.transports[1].value())[0]
    assert request.target == b"/api/y"  # type: ignore[attr-defined]
    s.backends.protocols[1].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert stream_response(stream.value())[1] == h11.Data(data=b"ok")


def test_stale_pooled_connection_is_not_retried_for_a_request_with_a_body() -> None:
    s = Setup()
    _first_exchange(s)
    stream = s.open("erp.internal", 8080, method="POST", target="/api/y")
    stream.protocol.dataReceived(b"POST /api/y HTTP/1.1\r\nHost: erp.internal:8080\r\nContent-Length: 1\r\n\r\nx")
    s.backends.protocols[0].connectionLost(Failure(ConnectionDone()))
    assert len(s.backends.connects) == 1 and s.tunnel.resets[-1][1] == ErrorCode.BACKEND_RESET


def test_counted_bodies_pass_around_h11_and_the_backend_is_reused() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080, method="POST", target="/api/x")
    backend_transport = s.backends.transports[0]
    stream.protocol.dataReceived(b"POST /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\nContent-Length: 6\r\n\r\n")
    stream.protocol.dataReceived(b"abc")
    stream.protocol.dataReceived(b"def")
    events = backend_requests(backend_transport.value())
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"abcdef"
    assert isinstance(events[-1], h11.EndOfMessage)
    stream.protocol.readConnectionLost()
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    backend.dataReceived(b"one")
    backend.dataReceived(b"two")
    assert not stream.closed and s.gateway.pool.idle_count == 0
    backend.dataReceived(b"six")
    response = stream_response(stream.value())
    assert b"".join(e.data for e in response if isinstance(e, h11.Data)) == b"onetwosix"
    assert isinstance(response[-1], h11.EndOfMessage)
    assert stream.closed and s.gateway.pool.idle_count == 1  # h11 is DONE both ways: the connection is reused


def test_counted_response_body_cut_short_resets_the_stream() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    backend.dataReceived(b"partial")
    backend.connectionLost(Failure(ConnectionDone()))
    assert s.tunnel.resets[-1][1] == ErrorCode.BACKEND_RESET and s.gateway.pool.idle_count == 0


def test_bytes_past_a_counted_response_keep_the_backend_out_of_the_pool() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    stream.protocol.readConnectionLost()
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    backend.dataReceived(b"cdHTTP/1.1 200 OK\r\n")  # the body's end and junk in one read
    response = stream_response(stream.value())
    assert b"".join(e.data for e in response if isinstance(e, h11.Data)) == b"abcd"
    assert s.gateway.pool.idle_count == 0 and s.backends.transports[0].disconnecting


def test_response_with_transfer_encoding_and_content_length_does_not_go_back_to_the_pool() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    stream.protocol.readConnectionLost()
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nok\r\n0\r\n\r\n")
    assert stream.closed
    assert s.gateway.pool.idle_count == 0  # RFC 9112 6.1: ambiguous framing, the connection is not reused


def test_idle_pooled_backend_that_talks_is_dropped_at_once() -> None:
    s = Setup()
    stream = s.open("erp.internal", 8080)
    stream.protocol.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: erp.internal:8080\r\n\r\n")
    stream.protocol.readConnectionLost()
    backend = s.backends.protocols[0]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert s.gateway.pool.idle_count == 1
    backend.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # a late word before the backend closes
    assert s.gateway.pool.idle_count == 0  # never handed out while it is closing
    assert not backend.alive
