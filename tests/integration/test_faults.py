"""Fault injection: a black-holed tunnel (the network drops everything, nobody sends FIN or RST)."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from tests.harness import FAST_TUNNEL, Echo, PatternProducer, Stack, serve, socks_connect, tcp_rule, wait_for


class Hole:
    """A TCP forwarder that can be frozen: it then keeps both sockets open and silently drops all bytes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.pairs: list[tuple[Protocol, Protocol]] = []


class _Side(Protocol):
    def __init__(self, hole: Hole) -> None:
        self.hole = hole
        self.other: _Side | None = None
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        if self.hole.frozen:
            return
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.hole.frozen and self.other is not None and self.other.transport is not None:
            self.other.transport.loseConnection()


class _Inbound(_Side):
    def connectionMade(self) -> None:
        outbound = _Side(self.hole)
        outbound.other = self
        self.other = outbound

        def connected(_p: Any) -> None:
            if self.pending:
                outbound.transport.write(self.pending)  # type: ignore[union-attr]
                self.pending = b""

        TCP4ClientEndpoint(reactor, "127.0.0.1", self.hole.target_port).connect(
            Factory.forProtocol(lambda: outbound)).addCallback(connected)


@pytest_twisted.inlineCallbacks
def test_black_holed_tunnel_is_noticed_and_the_connector_comes_back(stack: Stack) -> Any:
    echo = yield serve(Echo)
    stack.ports.append(echo)
    stack.start_proxy()
    hole = Hole(stack.tunnel_port)
    hole_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: _Inbound(hole)))
    stack.ports.append(hole_port)
    connector = stack.start_connector(access=[tcp_rule("echo.internal", 7, echo.getHost().port)],
                                      proxy={"port": hole_port.getHost().port})
    first = yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    client.keep = None
    PatternProducer(client.transport, 1 << 40, fin=False)
    yield wait_for(lambda: client.received > 1 << 20)
    hole.frozen = True  # from now on the network eats everything; no FIN, no RST
    frozen_at = reactor.seconds()
    dead_after = FAST_TUNNEL["deadAfterSeconds"]
    # The proxy notices the silent tunnel, drops the registration and closes the client (no hang).
    yield wait_for(lambda: stack.proxy.registry.count() == 0, timeout=dead_after + 3)
    yield client.done
    assert reactor.seconds() - frozen_at <= dead_after + 2
    _c, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0x03
    # The connector notices too and dials again; once the network is back it is routable again.
    yield wait_for(lambda: first.lost, timeout=dead_after + 3)
    hole.frozen = False
    yield wait_for(lambda: stack.proxy.registry.count() == 1, timeout=10)
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    client.transport.loseConnection()
    yield client.done
