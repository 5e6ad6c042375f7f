"""The ingress side of several replicas, in one process: the plain ingress listener and its forwarded
client-certificate header, and a connector reaching the proxy through a corporate HTTP CONNECT proxy."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tests.harness import Echo, Stack, free_port, reactor, serve, socks_connect, tcp_rule, wait_for

AUDIT_FAILURE = "tunnel handshake failure"


class RawClient(Protocol):
    """Sends one request, collects the answer until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.received)


def upgrade(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: Upgrade", "Upgrade: connproxy-tunnel/1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ask(port: int, request: bytes, source: str = "127.0.0.1") -> Deferred[bytes]:
    client = RawClient(request)
    d = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0)).connect(
        Factory.forProtocol(lambda: client))
    d.addCallback(lambda _p: client.done)
    return d


def start_ingress_proxy(stack: Stack) -> int:
    port = free_port()
    stack.start_proxy(
        highAvailabilityMode="path",
        highAvailability={"replicaName": "connectivity-proxy-0", "replicas": ["connectivity-proxy-0",
                                                                             "connectivity-proxy-1"]},
        servers={"businessDataTunnel": {"ingress": {"enabled": True, "port": port, "bindAddress": "127.0.0.1",
                                                    "trustedSources": ["127.0.0.1/32"]}}},
    )
    return port


@pytest_twisted.inlineCallbacks
def test_forwarded_certificate_only_from_trusted_sources(stack: Stack) -> Iterator[Any]:
    port = start_ingress_proxy(stack)
    cert, _key = stack.pki.connector("tenant-a", None)
    header = {"ssl-client-cert": quote(cert.decode(), safe="")}

    # From an address outside trustedSources: refused and audited, whatever the header says.
    answer = yield ask(port, upgrade("/connectivity-proxy-0", header), source="127.0.0.2")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"untrusted address 127.0.0.2" in answer
    assert any(AUDIT_FAILURE in line and "127.0.0.2" in line for line in stack.audit)

    # From the ingress, without the header, or with a certificate from another CA: refused and audited.
    answer = yield ask(port, upgrade("/connectivity-proxy-0", {}))
    assert answer.startswith(b"HTTP/1.1 403 ") and b"client certificate required" in answer
    from connproxy.testing import mint_test_pki

    foreign, _k = mint_test_pki().connector("tenant-a", None)
    answer = yield ask(port, upgrade("/connectivity-proxy-0", {"ssl-client-cert": quote(foreign.decode(), safe="")}))
    assert answer.startswith(b"HTTP/1.1 403 ") and b"not signed by the connector CA" in answer

    # Another replica's path: misdirected; the trusted ingress with a good certificate: switched.
    answer = yield ask(port, upgrade("/connectivity-proxy-1", header))
    assert answer.startswith(b"HTTP/1.1 421 ")
    answer = yield ask(port, upgrade("/connectivity-proxy-0", header) + b"not a preface")
    assert answer.startswith(b"HTTP/1.1 101 ")
    # The health check is served on the ingress listener too.
    answer = yield ask(port, b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.inlineCallbacks
def test_the_tunnel_preface_on_the_ingress_listener_is_refused(stack: Stack) -> Iterator[Any]:
    """A tunnel that skips the Upgrade on the plain listener has no identity: its HELLO is refused and audited."""
    from connproxy.wire.errors import ErrorCode
    from connproxy.wire.events import GoAwayReceived
    from connproxy.wire.session import Role, Session

    port = start_ingress_proxy(stack)
    dialer = Session(Role.DIALER)
    dialer.send_hello({"connector_id": "sneaky", "subaccount": "tenant-a", "location": ""})
    answer = yield ask(port, b"".join(dialer.take_output()))
    events = dialer.receive_data(answer)
    assert [e.code for e in events if isinstance(e, GoAwayReceived)] == [ErrorCode.AUTH_FAILED]
    assert any(AUDIT_FAILURE in line and "client certificate required" in line for line in stack.audit)
    assert stack.proxy is not None and stack.proxy.registry.count() == 0


# ------------------------------------------------------------------------------------------------ corporate proxy


class ConnectProxy(Protocol):
    """A small HTTP CONNECT proxy: Basic credentials checked, then bytes relayed both ways."""

    def __init__(self, factory: Any) -> None:
        self.f = factory
        self.buffer = b""
        self.peer: Protocol | None = None

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self.peer is not None:
            assert self.peer.transport is not None
            self.peer.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        method, target, _version = lines[0].split(" ")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        self.f.requests.append((method, target, headers.get("Proxy-Authorization")))
        if headers.get("Proxy-Authorization") != self.f.expected:
            self.transport.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
            self.transport.loseConnection()
            return
        host, port = target.rsplit(":", 1)
        me = self

        class Back(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None and me.transport is not None
                me.peer = self
                me.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    self.transport.write(rest)

            def dataReceived(self, data: bytes) -> None:
                assert me.transport is not None
                me.transport.write(data)

            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                if me.transport is not None:
                    me.transport.loseConnection()

        d = TCP4ClientEndpoint(reactor, host, int(port)).connect(Factory.forProtocol(Back))
        d.addErrback(lambda _f: self.transport.loseConnection() if self.transport else None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class ConnectProxyFactory(Factory):
    def __init__(self, user: str, password: str) -> None:
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, str, str | None]] = []

    def buildProtocol(self, addr: Any) -> ConnectProxy:
        return ConnectProxy(self)


@pytest_twisted.inlineCallbacks
def test_connector_through_a_corporate_connect_proxy(stack: Stack) -> Iterator[Any]:
    factory = ConnectProxyFactory("scc", "s3cr:et")
    corp = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    stack.ports.append(corp)
    url = f"http://scc:{quote('s3cr:et', safe='')}@127.0.0.1:{corp.getHost().port}"
    echo = yield serve(Echo)
    stack.ports.append(echo)
    stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule("echo.internal", 7, echo.getHost().port)],
                                      corporateProxy={"url": url, "useEnvironment": False})
    yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    client.transport.write(b"through the corporate proxy")
    yield wait_for(lambda: client.received == 27)
    assert factory.requests[0][:2] == ("CONNECT", f"127.0.0.1:{stack.tunnel_port}")
    assert factory.requests[0][2] == factory.expected
    assert client.transport is not None
    client.transport.loseConnection()
    yield client.done


@pytest_twisted.inlineCallbacks
def test_corporate_proxy_refusing_credentials_is_retried_and_no_proxy_bypasses_it(stack: Stack) -> Iterator[Any]:
    factory = ConnectProxyFactory("scc", "right")
    corp = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    stack.ports.append(corp)
    stack.start_proxy()
    wrong = stack.start_connector(corporateProxy={"url": f"http://scc:wrong@127.0.0.1:{corp.getHost().port}",
                                                  "useEnvironment": False})
    yield wait_for(lambda: len(factory.requests) >= 2, timeout=10)  # 407, then a retry
    assert stack.proxy is not None and stack.proxy.registry.count() == 0
    yield wrong.stopService()
    seen = len(factory.requests)
    direct = stack.start_connector(connector_id="c2", corporateProxy={
        "url": f"http://scc:wrong@127.0.0.1:{corp.getHost().port}", "noProxy": "localhost,127.0.0.0/8"})
    yield direct.when_up()
    assert len(factory.requests) == seen
