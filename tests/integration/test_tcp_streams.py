"""Many streams on one tunnel, no head-of-line blocking, SOCKS5 reply codes, identity and routing."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet.defer import gatherResults

from tests.harness import (
    Echo,
    PatternProducer,
    Source,
    Stack,
    serve,
    socks_connect,
    tcp_rule,
    wait_for,
)

MIB = 1024 * 1024


@pytest_twisted.inlineCallbacks
def test_200_concurrent_streams_on_one_tunnel(stack: Stack) -> Any:
    backend = yield serve(Echo)
    stack.ports.append(backend)
    stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule("echo.internal", 7, backend.getHost().port)])
    tunnel = yield connector.when_up()
    results = yield gatherResults(
        [socks_connect(stack.socks_port, "echo.internal", 7) for _ in range(200)], consumeErrors=True
    )
    assert [reply for _c, reply in results] == [0] * 200
    assert len(tunnel.streams) == 200
    producers = [PatternProducer(c.transport, 64 * 1024, chunk=16384, seed=i) for i, (c, _r) in enumerate(results)]
    yield gatherResults([c.eof for c, _r in results])
    for (client, _r), producer in zip(results, producers, strict=True):
        assert client.received == 64 * 1024
        assert client.digest.hexdigest() == producer.digest.hexdigest()
    yield gatherResults([c.done for c, _r in results])
    yield wait_for(lambda: not tunnel.streams)


@pytest_twisted.inlineCallbacks
def test_stalled_reader_does_not_block_other_streams(stack: Stack) -> Any:
    """One client stops reading a stream that has far more data than windows and buffers hold; another
    stream on the same tunnel still transfers 32 MiB each way, and the stalled stream's buffering stays bounded."""
    source = yield serve(Source, total=1 << 40, connections=[])
    echo = yield serve(Echo)
    stack.ports += [source, echo]
    stack.start_proxy()
    connector = stack.start_connector(
        access=[tcp_rule("source.internal", 9, source.getHost().port), tcp_rule("echo.internal", 7, echo.getHost().port)]
    )
    yield connector.when_up()
    stalled, reply = yield socks_connect(stack.socks_port, "source.internal", 9)
    assert reply == 0
    stalled.keep = None
    yield wait_for(lambda: stalled.received > 0)
    stalled.transport.pauseProducing()  # stop reading: the kernel buffers fill, then the proxy's, then credit stops
    proxy_tunnel = next(iter(stack.proxy.tunnel_factory.tunnels))
    stalled_stream = next(iter(proxy_tunnel.streams.values()))

    def stalled_bytes() -> int:
        return stalled_stream.bytes_in

    # Let the stalled stream fill every window and buffer it can.
    previous = -1
    while stalled_bytes() != previous:
        previous = stalled_bytes()
        yield _sleep(0.3)
    window = proxy_tunnel.session.settings.stream_window
    # Bounded: what arrived at the proxy for the stalled stream is at most its window plus the client socket's
    # share (kernel buffers and Twisted's 64 KiB transport buffer) — nowhere near the source's 1 TiB.
    assert stalled_bytes() - stalled.received <= window + 8 * MIB

    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    client.keep = None
    producer = PatternProducer(client.transport, 32 * MIB, seed=3)
    yield client.eof
    assert client.received == 32 * MIB
    assert client.digest.hexdigest() == producer.digest.hexdigest()
    # The stalled stream is still stalled and still bounded.
    assert stalled_bytes() - stalled.received <= window + 8 * MIB
    stalled.transport.resumeProducing()
    before = stalled.received
    yield wait_for(lambda: stalled.received > before + 2 * window)
    stalled.transport.abortConnection()
    yield stalled.done


def _sleep(seconds: float) -> Any:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_reply_codes(stack: Stack) -> Any:
    echo = yield serve(Echo)
    stack.ports.append(echo)
    refused_port = echo.getHost().port
    # A port bound but not listening: connections are refused, and no other process can take the port meanwhile
    # (a port that was merely closed again may be reused by anyone on a busy machine).
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    closed_port = reserved.getsockname()[1]
    stack.cleanups.append(reserved.close)
    stack.start_proxy()
    connector = stack.start_connector(
        access=[
            tcp_rule("echo.internal", 7, refused_port),
            tcp_rule("down.internal", 7, closed_port),
            tcp_rule("10.1.2.3", 22, refused_port),
            tcp_rule("fd00::5", 22, refused_port),
            tcp_rule("nowhere.invalid", 7, 1, internalHost="nonexistent.invalid"),
            {"virtualHost": "web.internal", "virtualPort": 80, "internalHost": "127.0.0.1",
             "internalPort": refused_port, "protocol": "HTTP", "resources": [{"path": "/"}]},
        ]
    )
    yield connector.when_up()

    async def reply_for(host: str, port: int, **kw: Any) -> int:
        client, reply = await socks_connect(stack.socks_port, host, port, **kw)
        if client.transport.connected:
            client.transport.loseConnection()
        await client.done
        return reply

    def run(host: str, port: int, **kw: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(reply_for(host, port, **kw))

    assert (yield run("echo.internal", 7)) == 0x00
    assert (yield run("10.1.2.3", 22)) == 0x00  # IPv4 address type
    assert (yield run("fd00::5", 22)) == 0x00  # IPv6 address type
    assert (yield run("echo.internal", 8)) == 0x02  # no mapping for the port
    assert (yield run("other.internal", 7)) == 0x02  # no mapping for the host
    assert (yield run("web.internal", 80)) == 0x02  # an HTTP mapping is not reachable over SOCKS5
    assert (yield run("down.internal", 7)) == 0x04  # backend refused
    assert (yield run("nowhere.invalid", 7)) == 0x04  # backend name does not resolve
    assert (yield run("echo.internal", 7, location="loc-x")) == 0x03  # no connector for that location
    assert (yield run("echo.internal", 7, methods=b"\x00")) == 0x00  # method 0x00 in trusted mode


@pytest_twisted.inlineCallbacks
def test_unsupported_command_and_address_type(stack: Stack) -> Any:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    stack.start_proxy()

    class Raw(Protocol):
        def __init__(self, payload: bytes) -> None:
            self.payload = payload
            self.data = b""
            from twisted.internet.defer import Deferred

            self.done: Deferred[bytes] = Deferred()

        def connectionMade(self) -> None:
            self.transport.write(self.payload)

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(self.data)

    async def exchange(payload: bytes) -> bytes:
        proto = Raw(payload)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", stack.socks_port).connect(Factory.forProtocol(lambda: proto))
        return await proto.done

    from twisted.internet.defer import Deferred

    bind = b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50"  # BIND 127.0.0.1:80
    answer = yield Deferred.fromCoroutine(exchange(b"\x05\x01\x00" + bind))
    assert answer[:2] == b"\x05\x00" and answer[2:4] == b"\x05\x07"
    bad_atyp = b"\x05\x01\x00\x05\x00"
    answer = yield Deferred.fromCoroutine(exchange(b"\x05\x01\x00" + bad_atyp))
    assert answer[2:4] == b"\x05\x08"
    answer = yield Deferred.fromCoroutine(exchange(b"\x05\x01\x02"))  # only username/password offered
    assert answer == b"\x05\xff"
    answer = yield Deferred.fromCoroutine(exchange(b"\x05\x01\x80\x01\x00\x00\x00\x00\x03!!!"))  # garbage base64
    assert answer == b"\x05\x80\x01\x01"


@pytest_twisted.inlineCallbacks
def test_routing_by_location_and_least_loaded(stack: Stack) -> Any:
    a = yield serve(Echo)
    b = yield serve(Echo)
    stack.ports += [a, b]
    stack.start_proxy()
    default = stack.start_connector(access=[tcp_rule("svc", 1, a.getHost().port)], connector_id="default")
    located = stack.start_connector(location="loc-1", bind_location=True,
                                    access=[tcp_rule("svc", 1, b.getHost().port)], connector_id="located")
    yield default.when_up()
    yield located.when_up()
    c1, r1 = yield socks_connect(stack.socks_port, "svc", 1)
    c2, r2 = yield socks_connect(stack.socks_port, "svc", 1, location="loc-1")
    assert (r1, r2) == (0, 0)
    assert len(default.tunnel.streams) == 1 and len(located.tunnel.streams) == 1
    # A second connector for the default location: new streams go to the least loaded one.
    second = stack.start_connector(access=[tcp_rule("svc", 1, a.getHost().port)], connector_id="default-2")
    yield second.when_up()
    c3, r3 = yield socks_connect(stack.socks_port, "svc", 1)
    assert r3 == 0
    assert len(second.tunnel.streams) == 1 and len(default.tunnel.streams) == 1
    for c in (c1, c2, c3):
        c.transport.loseConnection()
        yield c.done


@pytest_twisted.inlineCallbacks
def test_connector_cannot_claim_another_tenant(stack: Stack, log_text: list[str]) -> Any:
    stack.start_proxy()
    impostor = stack.start_connector(subaccount="tenant-a", claim_subaccount="tenant-b", connector_id="evil")
    yield wait_for(lambda: any("tunnel handshake failure" in line for line in stack.audit))
    assert stack.proxy.registry.count() == 0
    failure = next(line for line in stack.audit if "tunnel handshake failure" in line)
    assert "tenant-b" in failure and "tenant-a" in failure
    # The connector logs why (and keeps retrying: tests/unit/test_connector.py).
    yield wait_for(lambda: any(line.startswith("the proxy refused this connector's identity: ") for line in log_text))
    refusal = next(line for line in log_text if line.startswith("the proxy refused this connector's identity: "))
    assert "tenant-b" in refusal.split("{", 1)[0], refusal
    # Bound location: a certificate for loc-1 cannot register loc-2.
    located = stack.start_connector(location="loc-2", bind_location=False, connector_id="loc")
    yield located.when_up()  # unbound certificate: the handshake's location is used
    assert stack.proxy.registry.pick("tenant-a", "loc-2") is not None
    bound = stack.start_connector(subaccount="tenant-a", location="loc-1", bind_location=True,
                                  connector_id="bound", locationId="loc-3")
    yield wait_for(lambda: sum("tunnel handshake failure" in line for line in stack.audit) >= 2)
    assert stack.proxy.registry.pick("tenant-a", "loc-3") is None
    assert impostor.tunnel is None or impostor.tunnel.established_at is None
    assert bound.tunnel is None or bound.tunnel.established_at is None


@pytest_twisted.inlineCallbacks
def test_connector_reconnect_replaces_stale_registration(stack: Stack) -> Any:
    echo = yield serve(Echo)
    stack.ports.append(echo)
    stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule("svc", 1, echo.getHost().port)])
    first = yield connector.when_up()
    # The connector's side vanishes without a word (the proxy still holds the old tunnel): it dials again.
    first.transport.abortConnection()
    yield wait_for(lambda: connector.tunnel is not None and connector.tunnel is not first
                   and connector.tunnel.established_at is not None)
    yield wait_for(lambda: stack.proxy.registry.count() == 1)
    client, reply = yield socks_connect(stack.socks_port, "svc", 1)
    assert reply == 0
    client.transport.loseConnection()
    yield client.done




def _tls_echo(stack: Stack) -> Any:
    """An echo backend speaking TLS with a certificate for localhost from the test CA."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.ssl import PrivateCertificate

    cert = PrivateCertificate.loadPEM(stack.pki.server_cert_pem + b"\n" + stack.pki.server_key_pem)
    return SSL4ServerEndpoint(reactor, 0, cert.options(), interface="127.0.0.1").listen(Factory.forProtocol(Echo))


@pytest_twisted.inlineCallbacks
def test_tcp_tls_mapping_verifies_the_backend(stack: Stack) -> Any:
    """TCP_TLS: the connector opens TLS to the backend and verifies it against the mapping's caFile; with the
    wrong CA the client gets 0x04 (TLS_ERROR), never a plaintext path."""
    from connproxy.testing import mint_test_pki

    backend = yield _tls_echo(stack)
    stack.ports.append(backend)
    good_ca = stack.tmp / "backend-ca.crt"
    good_ca.write_bytes(stack.pki.ca_cert_pem)
    other_ca = stack.tmp / "other-ca.crt"
    other_ca.write_bytes(mint_test_pki().ca_cert_pem)
    stack.start_proxy()
    port = backend.getHost().port
    connector = stack.start_connector(access=[
        tcp_rule("secure.internal", 443, port, protocol="TCP_TLS", internalHost="localhost", caFile=str(good_ca)),
        tcp_rule("mitm.internal", 443, port, protocol="TCP_TLS", internalHost="localhost", caFile=str(other_ca)),
    ])
    yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, "secure.internal", 443)
    assert reply == 0
    client.transport.write(b"over tls")
    yield wait_for(lambda: client.received >= 8)
    assert bytes(client.keep or b"") == b"over tls"
    client.transport.loseConnection()
    yield client.done
    _c, reply = yield socks_connect(stack.socks_port, "mitm.internal", 443)
    assert reply == 0x04


@pytest_twisted.inlineCallbacks
def test_connector_verifies_the_proxy_name_and_the_proxy_verifies_the_connector_ca(stack: Stack) -> Any:
    """A proxy certificate for another name is refused by the connector (service-identity), and a connector
    certificate from a foreign CA is refused by the proxy's TLS: neither registers, both keep retrying."""
    from connproxy.testing import mint_test_pki

    stack.start_proxy()
    wrong_name = stack.start_connector(connector_id="wrong-name", proxy={"serverName": "other.example"})
    foreign = mint_test_pki()
    cert, key = foreign.connector("tenant-a", None)
    (stack.tmp / "foreign.crt").write_bytes(cert)
    (stack.tmp / "foreign.key").write_bytes(key)
    impostor = stack.start_connector(connector_id="foreign-ca", tls={
        "certFile": str(stack.tmp / "foreign.crt"), "keyFile": str(stack.tmp / "foreign.key")})
    yield wait_for(lambda: wrong_name.connections >= 3 and impostor.connections >= 3, timeout=10)
    assert stack.proxy.registry.count() == 0
    assert wrong_name.tunnel is None or wrong_name.tunnel.established_at is None
    assert impostor.tunnel is None or impostor.tunnel.established_at is None
