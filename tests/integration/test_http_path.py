"""HTTP proxy -> tunnel -> connector -> HTTP(S) backend, end to end on 127.0.0.1 with real TLS on the tunnel.

Clients are curl (``-x``) and Python (``http.client`` or raw sockets in a thread, a Twisted protocol for the
slow reader); the backends are the h11 servers of ``tests/http_harness.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import h11
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from connproxy.pki.tokens import issue_token
from tests.harness import Echo, Stack, reactor, serve, tcp_rule, wait_for
from tests.http_harness import (
    Silent,
    http_rule,
    keepalive_requests,
    parse_response,
    raw_exchange,
    serve_http,
    websocket_echo,
)

MIB = 1024 * 1024
HTTP_ON: dict[str, Any] = {"servers": {"proxy": {"http": {"enabled": True}}}}
RESULTS: dict[str, float] = {}


def curl(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "60", *args], env=dict(os.environ))
    return d


def sh(command: str) -> Deferred[tuple[bytes, bytes, int]]:
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "bash", ["-o", "pipefail", "-c", command], env=dict(os.environ))
    return d


def http_config(**http: Any) -> dict[str, Any]:
    return {"servers": {"proxy": {"http": {"enabled": True, **http}}}}


@pytest_twisted.inlineCallbacks
def up(stack: Stack, access: list[dict[str, Any]], proxy: dict[str, Any] | None = None, **connector: Any) -> Any:
    stack.start_proxy(**(proxy or HTTP_ON))
    c = stack.start_connector(access=access, **connector)
    yield c.when_up()
    return c


@pytest_twisted.inlineCallbacks
def backend(stack: Stack, tls: tuple[bytes, bytes] | None = None) -> Any:
    port = yield serve_http(tls)
    stack.ports.append(port)
    return port


def proxy_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.http_port}"


# ------------------------------------------------------------------------------------------------ basics


@pytest_twisted.inlineCallbacks
def test_get_and_post_with_curl_and_the_headers_the_backend_sees(stack: Stack) -> Any:
    b = yield backend(stack)
    yield up(stack, [http_rule("erp.internal", 8080, b.getHost().port)])
    out, err, code = yield curl(
        "-x", proxy_url(stack), "http://erp.internal:8080/api/x?y=1",
        "-H", "SAP-Connectivity-SCC-Location_ID:", "-H", "SAP-Connectivity-Foo: bar",
        "-H", "SAP-CP-Connectivity-Service-Token: abc", "-H", "Proxy-Authorization: Bearer abc",
        "-H", "Proxy-Connection: keep-alive", "-H", "X-Custom: kept", "-H", "Connection: X-Hop", "-H", "X-Hop: 1",
        "-H", "Authorization: Basic dTpw",
    )
    assert code == 0, err
    seen = json.loads(out)
    assert seen["method"] == "GET" and seen["target"] == "/api/x?y=1"
    names = [n for n, _ in seen["headers"]]
    headers = dict(seen["headers"])
    assert headers["host"] == "erp.internal:8080"
    assert headers["x-custom"] == "kept" and headers["authorization"] == "Basic dTpw"
    for gone in ("proxy-authorization", "proxy-connection", "x-hop", "sap-connectivity-foo",
                 "sap-cp-connectivity-service-token", "x-forwarded-host"):
        assert gone not in names
    assert not [n for n in names if n.startswith(("sap-", "proxy-"))]

    out, err, code = yield curl("-x", proxy_url(stack), "-d", "hello=world", "http://erp.internal:8080/form")
    assert code == 0, err
    seen = json.loads(out)
    assert seen["method"] == "POST" and seen["length"] == 11
    assert seen["sha256"] == hashlib.sha256(b"hello=world").hexdigest()
    assert any(e.startswith('[AUDIT-EVENT]') and '"access allowed"' in e and '"/form"' in e for e in stack.audit)


@pytest_twisted.inlineCallbacks
def test_host_in_header_internal_and_origin_form(stack: Stack) -> Any:
    b = yield backend(stack)
    port = b.getHost().port
    yield up(stack, [http_rule("erp.internal", 80, port, hostInHeader="internal")])
    raw = yield deferToThread(
        raw_exchange, stack.http_port,
        b"GET /api HTTP/1.1\r\nHost: erp.internal\r\nConnection: close\r\n\r\n")
    status, _headers, body = parse_response(raw)
    assert status == 200
    seen = dict(json.loads(body)["headers"])
    assert seen["host"] == f"127.0.0.1:{port}"
    assert seen["x-forwarded-host"] == "erp.internal"


@pytest_twisted.inlineCallbacks
def test_location_rewritten_to_the_virtual_host(stack: Stack) -> Any:
    b = yield backend(stack)
    yield up(stack, [http_rule("erp.internal", 8080, b.getHost().port)])
    out, err, code = yield curl("-x", proxy_url(stack), "-D", "-", "-o", "/dev/null",
                                "http://erp.internal:8080/redirect")
    assert code == 0, err
    assert b"302" in out.split(b"\r\n")[0]
    assert b"location: http://erp.internal:8080/landing?x=1" in out.lower()


@pytest_twisted.inlineCallbacks
def test_chunked_both_ways(stack: Stack, tmp_path: Path) -> Any:
    b = yield backend(stack)
    yield up(stack, [http_rule("erp.internal", 8080, b.getHost().port)])
    payload = tmp_path / "chunked.bin"
    payload.write_bytes(os.urandom(3 * MIB + 17))
    out, err, code = yield curl("-x", proxy_url(stack), "-H", "Transfer-Encoding: chunked", "-D", "-",
                                "--data-binary", f"@{payload}", "http://erp.internal:8080/upload?chunked=1")
    assert code == 0, err
    heads, _, body = out.rpartition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in heads.lower()
    result = json.loads(body)
    assert result == {"length": 3 * MIB + 17, "sha256": hashlib.sha256(payload.read_bytes()).hexdigest()}
    request = b.http_factory.requests[-1]
    assert (b"transfer-encoding", b"chunked") in list(request.headers)


# ------------------------------------------------------------------------------------------------ big bodies


@pytest_twisted.inlineCallbacks
def test_256_mib_download_with_checksum(stack: Stack) -> Any:
    b = yield backend(stack)
    yield up(stack, [http_rule("erp.internal", 8080, b.getHost().port)])
    size = 256 * MIB
    started = time.monotonic()
    out, err, code = yield sh(
        f"curl -sS --max-time 60 -x {proxy_url(stack)} 'http://erp.internal:8080/download?size={size}' "
        "| sha256sum")
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert out.split()[0].decode() == b.http_factory.sent_digests[-1]
    RESULTS["download_mib_per_s"] = size / MIB / elapsed
    print(f"\n256 MiB download through the stack: {size / MIB / elapsed:.0f} MiB/s ({elapsed:.2f}s)")


@pytest_twisted.inlineCallbacks
def test_64_mib_upload_with_expect_100_continue(stack: Stack, tmp_path: Path) -> Any:
    b = yield backend(stack)
    yield up(stack, [http_rule("erp.internal", 8080, b.getHost().port)])
    payload = tmp_path / "upload.bin"
    digest = hashlib.sha256()
    with payload.open("wb") as f:
        block = os.urandom(MIB)
        for i in range(64):
            chunk = bytes([i]) + block[1:]
            digest.update(chunk)
            f.write(chunk)
    out, err, code = yield curl("-x", proxy_url(stack), "-v", "--data-binary", f"@{payload}",
                                "-H", "Content-Type: application/octet-stream",
                                "http://erp.internal:8080/upload")
    assert code == 0, err
    assert b"Expect: 100-continue" in err and b"HTTP/1.1 100 Continue" in err
    assert json.loads(out) == {"length": 64 * MIB, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------------------ keep-alive


@pytest_twisted.inlineCallbacks
def test_1000_sequential_keepalive_requests(stack: Stack) -> Any:
    b = yield backend(stack)
    yield up(stack, [http_rule("erp.internal", 8080, b.getHost().port)])
    started = time.monotonic()
    statuses, sockets = yield deferToThread(
        keepalive_requests, stack.http_port, 1000, lambda i: f"http://erp.internal:8080/api/{i}")
    elapsed = time.monotonic() - started
    assert statuses == [200] * 1000
    assert sockets == 1
    assert b.http_factory.connections <= 2  # the connector's keep-alive pool
    RESULTS["requests_per_s"] = 1000 / elapsed
    print(f"\n1000 keep-alive requests: {1000 / elapsed:.0f} requests/s")


@pytest_twisted.inlineCallbacks
def test_one_connection_several_hosts_and_locations(stack: Stack) -> Any:
    b1 = yield backend(stack)
    b2 = yield backend(stack)
    stack.start_proxy(**HTTP_ON)
    c1 = stack.start_connector(access=[http_rule("a.internal", 80, b1.getHost().port)])
    c2 = stack.start_connector(location="loc-2", connector_id="c2",
                               access=[http_rule("b.internal", 80, b2.getHost().port)])
    yield c1.when_up()
    yield c2.when_up()
    request = (b"GET http://a.internal/one HTTP/1.1\r\nHost: a.internal\r\n\r\n"
               b"GET http://b.internal/two HTTP/1.1\r\nHost: b.internal\r\n"
               b"SAP-Connectivity-SCC-Location_ID: loc-2\r\n\r\n"
               b"GET http://a.internal/three HTTP/1.1\r\nHost: a.internal\r\nConnection: close\r\n\r\n")
    raw = yield deferToThread(raw_exchange, stack.http_port, request, responses=None)
    assert raw.count(b"HTTP/1.1 200") == 3
    assert [r.target for r in b1.http_factory.requests] == [b"/one", b"/three"]
    assert [r.target for r in b2.http_factory.requests] == [b"/two"]


# ------------------------------------------------------------------------------------------------ errors


@pytest_twisted.inlineCallbacks
def test_error_statuses(stack: Stack) -> Any:
    b = yield backend(stack)
    silent = yield serve(Silent)
    refused = yield serve(Silent)
    refused_port = refused.getHost().port
    yield refused.stopListening()
    stack.ports.append(silent)
    yield up(stack, [
        http_rule("erp.internal", 80, b.getHost().port, resources=[{"path": "/api", "allSubPaths": True}]),
        http_rule("down.internal", 80, refused_port),
        http_rule("slow.internal", 80, silent.getHost().port),
    ], proxy={**HTTP_ON, "servers": {**HTTP_ON["servers"], "proxy": {
        **HTTP_ON["servers"]["proxy"], "clientConnection": {"firstByteTimeoutSeconds": 1}}}})
    assert stack.proxy.http_listener.factory.first_byte_timeout == 1.0  # type: ignore[union-attr]
    port = stack.http_port

    def ask(data: bytes) -> Any:
        return deferToThread(raw_exchange, port, data).addCallback(parse_response)

    cases: list[tuple[bytes, int, str]] = [
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (b"GET https://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 405, "https:// targets"),
        (b"GET http://nowhere.internal/ HTTP/1.1\r\nHost: nowhere.internal\r\n\r\n", 403,
         "access denied to system nowhere.internal:80"),
        (b"GET http://erp.internal/secret HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 403,
         "access denied to path /secret on system erp.internal:80"),
        (b"GET http://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\n"
         b"SAP-Connectivity-SCC-Location_ID: elsewhere\r\n\r\n", 503,
         "no connector for subaccount tenant-a, location elsewhere"),
        (b"GET http://down.internal/ HTTP/1.1\r\nHost: down.internal\r\n\r\n", 502, "refused the connection"),
        (b"GET http://slow.internal/ HTTP/1.1\r\nHost: slow.internal\r\n\r\n", 504, "did not answer within 1s"),
        (b"GET http://erp.internal/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: erp.internal\r\n\r\n", 414,
         "request line longer than 8192 bytes"),
        (b"GET http://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\n"
         + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 4000) for i in range(20)) + b"\r\n", 431,
         "header block larger than 65536 bytes"),
        (b"GET http://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\nX-Long: " + b"l" * 9000 + b"\r\n\r\n",
         431, "longer than 8192 bytes"),
        (b"GET http://erp.internal/api HTTP/1.1\r\nHost: erp.internal\r\nSAP-Connectivity-Authentication: Bearer a"
         b"\r\nSAP-Connectivity-Technical-Authentication: Bearer b\r\n\r\n", 400, "not both"),
    ]
    for request, status, text in cases:
        got, headers, body = yield ask(request)
        assert (got, text in body.decode()) == (status, True), (request[:80], got, body)
        assert headers.get("content-type", "").startswith("text/plain")
    assert any('"access denied"' in line and '"/secret"' in line for line in stack.audit)


@pytest_twisted.inlineCallbacks
def test_connect_not_allowed_is_405(stack: Stack) -> Any:
    yield up(stack, [], proxy=http_config(allowConnect=False))
    out, err, code = yield curl("-p", "-x", proxy_url(stack), "-w", "%{http_connect}", "-o", "/dev/null",
                                "http://echo.internal:7/")
    assert out.strip().endswith(b"405"), (out, err)
    raw = yield deferToThread(raw_exchange, stack.http_port,
                              b"CONNECT echo.internal:7 HTTP/1.1\r\nHost: echo.internal:7\r\n\r\n")
    status, _h, body = parse_response(raw)
    assert status == 405 and b"allowConnect is false" in body


@pytest_twisted.inlineCallbacks
def test_407_without_or_with_a_bad_token_and_200_with_a_good_one(stack: Stack, tmp_path: Path) -> Any:
    b = yield backend(stack)
    token = issue_token(tmp_path / "tokens", "tenant-a", "sb-app")
    other = issue_token(tmp_path / "tokens", "tenant-a", "sb-stranger")
    proxy = {"servers": {"proxy": {
        "http": {"enabled": True, "enableProxyAuthorization": True},
        "authorization": {"oauth": {"allowedClientId": "sb-app",
                                    "tokenKeysFile": str(tmp_path / "tokens" / "token_keys.json")}}}}}
    yield up(stack, [http_rule("erp.internal", 80, b.getHost().port)], proxy=proxy)
    for header, reason in ((None, "no proxy authorization token"),
                           (f"Bearer {token[:-4]}AAAA", "signature"),
                           (f"Bearer {other}", "client that is not allowed")):
        args = ["-x", proxy_url(stack), "-D", "-", "http://erp.internal/x"]
        if header:
            args[:0] = ["-H", f"Proxy-Authorization: {header}"]
        out, err, code = yield curl(*args)
        assert code == 0, err
        status, headers, body = parse_response(out)
        assert status == 407 and headers["proxy-authenticate"] == "Bearer", out
        assert reason in body.decode() and token[-20:] not in body.decode()
    assert sum('"proxy call refused"' in line for line in stack.audit) == 3
    out, err, code = yield curl("-x", proxy_url(stack), "-H", f"Proxy-Authorization: Bearer {token}",
                                "http://erp.internal/x")
    assert code == 0, err
    assert json.loads(out)["target"] == "/x"


# ------------------------------------------------------------------------------------------------ upgrade, CONNECT


@pytest_twisted.inlineCallbacks
def test_websocket_echo_where_upgrade_is_allowed_and_403_where_not(stack: Stack) -> Any:
    b = yield backend(stack)
    port = b.getHost().port
    yield up(stack, [
        http_rule("ws.internal", 80, port, resources=[{"path": "/ws", "upgradeAllowed": True}]),
        http_rule("nows.internal", 80, port, resources=[{"path": "/ws"}]),
    ])
    messages = [b"hello", os.urandom(70000), b"bye"]
    status, echoed, _ = yield deferToThread(websocket_echo, stack.http_port, "http://ws.internal/ws", messages)
    assert status == 101 and echoed == messages
    status, echoed, head = yield deferToThread(websocket_echo, stack.http_port, "http://nows.internal/ws", [])
    assert status == 403 and b"upgrade to websocket not allowed" in head


@pytest_twisted.inlineCallbacks
def test_connect_to_a_tcp_mapping_with_curl(stack: Stack) -> Any:
    b = yield backend(stack)
    echo = yield serve(Echo)
    stack.ports.append(echo)
    yield up(stack, [tcp_rule("tcp.internal", 9000, b.getHost().port),
                     tcp_rule("echo.internal", 7, echo.getHost().port)])
    out, err, code = yield curl("-p", "-x", proxy_url(stack), "http://tcp.internal:9000/through/connect")
    assert code == 0, err
    assert json.loads(out)["target"] == "/through/connect"
    # Bytes sent right behind the CONNECT head (before the 200) reach the backend too.
    raw = yield deferToThread(connect_and_echo, stack.http_port, b"echo.internal:7", b"ping")
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\nping")


def connect_and_echo(port: int, target: bytes, payload: bytes) -> bytes:
    """CONNECT with ``payload`` in the same packet as the head; read until the echo of it is back."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n%s" % (target, target, payload))
        raw = b""
        while not raw.endswith(b"\r\n\r\n" + payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        return raw


@pytest_twisted.inlineCallbacks
def test_https_mapping_verifies_the_backend_certificate(stack: Stack, tmp_path: Path) -> Any:
    b = yield backend(stack, tls=(stack.pki.server_cert_pem, stack.pki.server_key_pem))
    ca = tmp_path / "backend-ca.crt"
    ca.write_bytes(stack.pki.ca_cert_pem)
    wrong = tmp_path / "wrong-ca.crt"
    from connproxy.testing import mint_test_pki

    wrong.write_bytes(mint_test_pki().ca_cert_pem)
    yield up(stack, [
        http_rule("secure.internal", 80, b.getHost().port, protocol="HTTPS", caFile=str(ca)),
        http_rule("untrusted.internal", 80, b.getHost().port, protocol="HTTPS", caFile=str(wrong)),
    ])
    out, err, code = yield curl("-x", proxy_url(stack), "http://secure.internal/tls")
    assert code == 0, err
    assert out.startswith(b"{"), (out, stack.audit)
    assert json.loads(out)["target"] == "/tls"
    out, err, code = yield curl("-x", proxy_url(stack), "http://untrusted.internal/tls")
    assert code == 0, err
    assert b"TLS to the backend" in out


# ------------------------------------------------------------------------------------------------ backpressure


class SlowReader(Protocol):
    """Sends one request, then reads only when told to; hashes the body."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.conn = h11.Connection(h11.CLIENT)
        self.digest = hashlib.sha256()
        self.received = 0
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Data):
                self.digest.update(event.data)
                self.received += len(event.data)
            elif isinstance(event, h11.EndOfMessage) and not self.done.called:
                self.done.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.errback(reason)


def _buffered(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.inlineCallbacks
def test_slow_client_keeps_buffers_bounded(stack: Stack) -> Any:
    b = yield backend(stack)
    c = yield up(stack, [http_rule("erp.internal", 80, b.getHost().port)])
    size = 48 * MIB
    window = stack.proxy.config.tunnel.stream_window_bytes  # type: ignore[union-attr]
    client = SlowReader(f"GET http://erp.internal/download?size={size} HTTP/1.1\r\nHost: erp.internal\r\n\r\n"
                        .encode())
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", stack.http_port).connect(Factory.forProtocol(lambda: client))
    yield wait_for(lambda: client.received > 0)
    transport: Any = client.transport
    assert transport is not None
    worst = {"proxy": 0, "unacked": 0, "connector": 0}

    def sample() -> None:
        for tunnel in stack.proxy.tunnel_factory.tunnels:  # type: ignore[union-attr]
            for stream in tunnel.streams.values():
                upstream = stream.protocol
                front = getattr(upstream, "front", None)
                if front is None or front.transport is None:
                    continue
                # Bytes taken from the stream while the client socket was full sit in its buffer, uncredited.
                worst["proxy"] = max(worst["proxy"], _buffered(front.transport))
                worst["unacked"] = max(worst["unacked"], stream._unacked)
        if c.tunnel is not None:
            for stream in c.tunnel.streams.values():
                worst["connector"] = max(worst["connector"], len(stream._pending))

    for _ in range(3):  # stall: the client reads nothing for a while, three times
        transport.pauseProducing()
        for _ in range(20):
            sample()
            yield deferred_sleep(0.025)
        transport.resumeProducing()
        yield deferred_sleep(0.05)
    yield client.done
    assert client.received == size
    assert client.digest.hexdigest() == b.http_factory.sent_digests[-1]
    print(f"\nslow client: worst buffered bytes {worst} (stream window {window})")
    assert 0 < worst["proxy"] <= window + 2 * 65536, worst
    assert 0 < worst["unacked"] <= window, worst
    assert worst["connector"] <= 256 * 1024, worst
    transport.loseConnection()


def deferred_sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest_twisted.inlineCallbacks
def test_shared_trusted_mode_takes_the_tenant_from_the_service_token(stack: Stack, tmp_path: Path) -> Any:
    b = yield backend(stack)
    proxy = {"tenantMode": "shared", "servers": {"proxy": {"http": {"enabled": True}}}}
    yield up(stack, [http_rule("erp.internal", 80, b.getHost().port)], proxy=proxy, subaccount="tenant-b")
    out, err, code = yield curl("-x", proxy_url(stack), "http://erp.internal/x")
    assert code == 0, err
    assert b"SAP-CP-Connectivity-Service-Token" in out  # 400: the rule of trusted shared mode
    token = issue_token(tmp_path / "tokens", "tenant-b", "sb-app")
    out, err, code = yield curl("-x", proxy_url(stack), "-H", f"SAP-CP-Connectivity-Service-Token: {token}",
                                "-H", "SAP-Connectivity-Authentication: Bearer user.jwt", "http://erp.internal/x")
    assert code == 0, err
    seen = json.loads(out)
    assert not [n for n, _ in seen["headers"] if n.startswith("sap-")]
