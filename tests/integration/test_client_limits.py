"""The front ends' connection limits, handshake timeout and socket options with real sockets on 127.0.0.1.

``servers.proxy.clientConnection.{maxConnectionsPerClient, handshakeTimeoutSeconds, listenBacklog}``: a client
over its limit gets a 503 (HTTP) or a closed socket (SOCKS5) at once, a connection that ends frees its place, a
silent connection is closed after the handshake timeout, and accepted sockets have TCP_NODELAY set.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.harness import Stack, reactor, wait_for


def limits(**client_connection: Any) -> dict[str, Any]:
    return {"servers": {"proxy": {"http": {"enabled": True}, "clientConnection": client_connection}}}


class Collect(Protocol):
    """Keeps what the server sends; ``closed`` fires with it when the connection ends."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.data)


def connect(port: int) -> Deferred[Collect]:
    d: Deferred[Collect] = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), Collect())
    return d


def within(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def built(factory: Any) -> list[Any]:
    """Record the protocols ``factory`` builds for connections within its limits."""
    protocols: list[Any] = []
    build = factory.build

    def recording(addr: Any) -> Any:
        protocol = build(addr)
        protocols.append(protocol)
        return protocol

    factory.build = recording
    return protocols


@pytest_twisted.inlineCallbacks
def test_per_client_limit_on_both_front_ends(stack: Stack) -> Iterator[Deferred[Any]]:
    proxy = stack.start_proxy(**limits(maxConnectionsPerClient=2))
    assert proxy.http_listener is not None and proxy.socks_listener is not None
    for name, port in (("http", stack.http_port), ("socks5", stack.socks_port)):
        first = yield connect(port)
        second = yield connect(port)
        third = yield connect(port)  # over maxConnectionsPerClient=2: answered and closed at once
        refused = yield within(third.closed, 5.0)
        if name == "http":
            assert refused.startswith(b"HTTP/1.1 503 ") and b"connection: close" in refused.lower()
            assert refused.endswith(b"too many connections to the HTTP proxy, try again later\n")
        else:
            assert refused == b""
        assert not first.closed.called and not second.closed.called
        assert first.transport is not None
        first.transport.loseConnection()
        yield within(first.closed)
        factory: Any = proxy.http_listener.factory if name == "http" else proxy.socks_listener.factory
        yield wait_for(lambda f=factory: f.connections == 1)
        fourth = yield connect(port)  # a place is free again
        yield wait_for(lambda f=factory: f.connections == 2)
        assert not fourth.closed.called
        for client in (second, fourth):
            assert client.transport is not None
            client.transport.loseConnection()
            yield within(client.closed)


@pytest_twisted.inlineCallbacks
def test_accepted_sockets_have_tcp_nodelay_and_silent_ones_are_closed(stack: Stack) -> Iterator[Deferred[Any]]:
    proxy = stack.start_proxy(**limits(handshakeTimeoutSeconds=2, listenBacklog=77))
    assert proxy.http_listener is not None and proxy.socks_listener is not None
    for listener in (proxy.http_listener, proxy.socks_listener):
        assert listener.endpoint._backlog == 77  # type: ignore[attr-defined]
    assert proxy.tunnel_listener.endpoint._backlog == 77  # type: ignore[attr-defined]
    for listener, port in ((proxy.http_listener, stack.http_port), (proxy.socks_listener, stack.socks_port)):
        protocols = built(listener.factory)
        client = yield connect(port)
        yield wait_for(lambda p=protocols: bool(p) and p[0].transport is not None)
        server_socket = protocols[0].transport.getHandle()
        assert server_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        started = reactor.seconds()
        data = yield within(client.closed, 15.0)  # handshakeTimeoutSeconds=2: closed, nothing said
        assert data == b"" and reactor.seconds() - started >= 1.5


# ------------------------------------------------------------------------------------------------ client faults


@pytest_twisted.inlineCallbacks
def test_client_faults_in_the_request_body_through_the_real_stack(stack: Stack) -> Iterator[Deferred[Any]]:
    from twisted.internet.threads import deferToThread

    from tests.http_harness import http_rule, parse_response, raw_exchange, serve_http

    backend = yield serve_http()
    stack.ports.append(backend)
    stack.start_proxy(**limits(bodyTimeoutSeconds=1))
    connector = stack.start_connector(access=[http_rule("erp.internal", 8080, backend.getHost().port)])
    yield connector.when_up()
    head = b"POST http://erp.internal:8080/up HTTP/1.1\r\nHost: erp.internal:8080\r\n"
    # a broken chunk header: the client's fault, 400 (not a 502 blamed on the backend)
    raw = yield deferToThread(raw_exchange, stack.http_port,
                              head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    status, headers, body = parse_response(raw)
    assert (status, headers.get("connection")) == (400, "close") and b"malformed request body" in body
    # a body that stops after 10 of 1000 bytes: 408 within the 1 s window (at 100 bytes/s), not after 120 s
    started = reactor.seconds()
    raw = yield deferToThread(raw_exchange, stack.http_port, head + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
    status, headers, body = parse_response(raw)
    assert status == 408 and b"request body too slow: 10 bytes in 1s" in body
    assert reactor.seconds() - started < 8
