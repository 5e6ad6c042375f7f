"""TCP_NODELAY on every kind of socket connproxy owns, read back with ``getsockopt`` on the live sockets.

A real proxy and connector on 127.0.0.1 serve one stream to each kind of backend (TCP, TCP_TLS, HTTP, HTTPS);
the test then walks the reactor's registered sockets, finds each by the protocol on it (through TLS and endpoint
wrappers) and reads the option: the connector's backend connections, both ends of the tunnel, and the proxy's
metrics connection. Linux leaves TCP_NODELAY off on new sockets, so each assertion fails without the code that
sets it (the metrics one only with Twisted < 24.10, whose ``HTTPChannel`` does not set it itself).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.http import HTTPChannel

from connproxy.connector.http_gateway import HttpBackend
from connproxy.connector.tcp import BackendRelay
from connproxy.tunnel.connection import TunnelConnection
from tests.harness import Echo, Stack, reactor, serve, socks_connect, tcp_rule, wait_for
from tests.http_harness import http_rule, serve_http


def _unwrap(protocol: Any) -> Any:
    """The innermost protocol below endpoint, TLS and ``twisted.web`` channel wrappers."""
    for _ in range(5):
        inner = (getattr(protocol, "wrappedProtocol", None) or getattr(protocol, "_wrappedProtocol", None)
                 or getattr(protocol, "_channel", None))
        if inner is None:
            return protocol
        protocol = inner
    return protocol


def no_delay_by_kind(ports: set[int]) -> dict[str, list[int]]:
    """TCP_NODELAY of every socket the reactor watches whose local or peer port is in ``ports`` (this test's
    listeners: other tests' leftovers share the reactor), keyed by the class name of its (unwrapped) protocol."""
    found: dict[str, list[int]] = {}
    for selectable in {*reactor.getReaders(), *reactor.getWriters()}:
        protocol = _unwrap(getattr(selectable, "protocol", None))
        if protocol is None or not hasattr(selectable, "getHandle"):
            continue
        handle = selectable.getHandle()
        if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
            continue
        try:
            if not {handle.getsockname()[1], handle.getpeername()[1]} & ports:
                continue
        except OSError:
            continue
        for kind in (BackendRelay, HttpBackend, TunnelConnection, HTTPChannel, HTTP11ClientProtocol):
            if isinstance(protocol, kind):
                value = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                found.setdefault(kind.__name__, []).append(value)
    return found


class _Partial(Protocol):
    """Sends an incomplete request and waits: keeps a server connection open."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET /metrics HTTP/1.1\r\n")


@pytest_twisted.inlineCallbacks
def test_every_owned_socket_has_tcp_nodelay(stack: Stack) -> Any:
    from twisted.internet.ssl import PrivateCertificate

    from tests.integration.test_http_path import curl

    cert = PrivateCertificate.loadPEM(stack.pki.server_cert_pem + b"\n" + stack.pki.server_key_pem)
    tcp = yield serve(Echo)
    tls = yield SSL4ServerEndpoint(reactor, 0, cert.options(), interface="127.0.0.1").listen(Factory.forProtocol(Echo))
    http = yield serve_http()
    https = yield serve_http((stack.pki.server_cert_pem, stack.pki.server_key_pem))
    stack.ports += [tcp, tls, http, https]
    ca = stack.tmp / "backend-ca.crt"
    ca.write_bytes(stack.pki.ca_cert_pem)
    stack.start_proxy(servers={"proxy": {"http": {"enabled": True}}},
                      metrics={"prometheus": {"enabled": True, "port": 0, "bindAddress": "127.0.0.1"}})
    connector = stack.start_connector(access=[
        tcp_rule("plain.internal", 7, tcp.getHost().port),
        tcp_rule("secure.internal", 443, tls.getHost().port, protocol="TCP_TLS", internalHost="localhost",
                 caFile=str(ca)),
        http_rule("web.internal", 80, http.getHost().port),
        http_rule("tls-web.internal", 80, https.getHost().port, protocol="HTTPS", internalHost="localhost",
                  caFile=str(ca)),
    ])
    yield connector.when_up()
    clients = []
    for host, port in (("plain.internal", 7), ("secure.internal", 443)):
        client, reply = yield socks_connect(stack.socks_port, host, port)
        assert reply == 0
        client.transport.write(b"ping")
        yield wait_for(lambda c=client: c.received >= 4)
        clients.append(client)
    for host in ("web.internal", "tls-web.internal"):  # the backend connection then idles in the pool
        out, err, code = yield curl("-x", f"http://127.0.0.1:{stack.http_port}", f"http://{host}/x")
        assert code == 0 and out.startswith(b"{"), (out, err)
    assert stack.proxy is not None and stack.proxy.metrics_listener is not None
    metrics = yield TCP4ClientEndpoint(reactor, "127.0.0.1", stack.proxy.metrics_listener.port_number).connect(
        Factory.forProtocol(_Partial))
    ports = {p.getHost().port for p in (tcp, tls, http, https)}
    ports |= {stack.tunnel_port, stack.proxy.metrics_listener.port_number}
    yield wait_for(lambda: "HTTPChannel" in no_delay_by_kind(ports))

    found = no_delay_by_kind(ports)
    assert len(found.get("BackendRelay", [])) == 2, found  # TCP and TCP_TLS
    assert len(found.get("HttpBackend", [])) == 2, found  # HTTP and HTTPS, idle in the pool
    assert len(found.get("TunnelConnection", [])) == 2, found  # both ends of the tunnel
    assert len(found.get("HTTPChannel", [])) == 1, found  # the metrics connection
    assert all(all(values) for values in found.values()), found

    metrics.transport.loseConnection()
    for client in clients:
        client.transport.loseConnection()
        yield client.done


@pytest_twisted.inlineCallbacks
def test_token_key_fetches_have_tcp_nodelay(stack: Stack) -> Any:
    """The proxy's token key fetches (``tokenKeysUrl``, ``uaaDomain``: HTTPS) go through
    :class:`~connproxy.nodelay.NoDelayAgentEndpoints`: the connection to the key server has TCP_NODELAY, read back
    while the server holds the answer. The test's CA stands in for the system trust store. Recent Twisted (26.10
    here) sets the option in its HTTP client itself, so this assertion fails only with the older releases that
    ``setup.cfg`` admits (as the metrics one above)."""
    from twisted.internet.defer import Deferred
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
    from twisted.web.client import Agent
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site

    from connproxy.nodelay import NoDelayAgentEndpoints

    held: list[Request] = []

    class Keys(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> Any:
            held.append(request)
            return NOT_DONE_YET

    class TestTrust:
        def creatorForNetloc(self, host: bytes, port: int) -> Any:
            return optionsForClientTLS(host.decode(), trustRoot=Certificate.loadPEM(stack.pki.ca_cert_pem))

    cert = PrivateCertificate.loadPEM(stack.pki.server_cert_pem + b"\n" + stack.pki.server_key_pem)
    port = yield SSL4ServerEndpoint(reactor, 0, cert.options(), interface="127.0.0.1").listen(Site(Keys()))
    stack.ports.append(port)
    endpoints = NoDelayAgentEndpoints(reactor)
    endpoints.policy = TestTrust()  # type: ignore[assignment]
    answer: Deferred[Any] = Agent.usingEndpointFactory(reactor, endpoints).request(
        b"GET", f"https://localhost:{port.getHost().port}/keys".encode())
    yield wait_for(lambda: bool(held))
    found = no_delay_by_kind({port.getHost().port})
    assert found.get("HTTP11ClientProtocol") == [1], found
    held[0].write(b"{}")
    held[0].finish()
    response = yield answer
    assert response.code == 200
