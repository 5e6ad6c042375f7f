"""Stalled streams on a tunnel: they cannot starve the others (no head-of-line blocking, spec 3.4).

Attackers open up to 64 streams on one tunnel that never make progress, of three kinds: SOCKS downloads nobody
reads, uploads to a backend that does not read, echo clients that write and never read. A fresh request on the
same tunnel must still complete quickly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from connproxy.wire.errors import ErrorCode
from tests.harness import (
    Echo,
    PatternProducer,
    SocksClient,
    Source,
    Stack,
    reactor,
    serve,
    socks_connect,
    tcp_rule,
    wait_for,
)

MIB = 1024 * 1024


class Sink(Protocol):
    """A backend that accepts the connection and never reads from it (so it notices no close either, until the
    test resumes it)."""

    lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class FlowEcho(Echo):
    """An echo with backpressure: it stops reading while its write buffer is full (the harness's plain Echo
    reads on and buffers without bound when its client does not read)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]


def _sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if sys.platform.startswith("linux") else 0


@pytest_twisted.inlineCallbacks
def start_attack_stack(stack: Stack, **connector_overrides: Any) -> Iterator[Any]:
    """A proxy and a connector with a source, a sink and an echo backend; returns the connector tunnel."""
    source = yield serve(Source, total=1 << 40, connections=[])
    sink = yield serve(Sink, connections=[])
    stack.sinks = sink.factory.connections  # type: ignore[attr-defined]
    echo = yield serve(FlowEcho)
    stack.ports += [source, sink, echo]
    connector = stack.start_connector(
        access=[
            tcp_rule("source.internal", 9, source.getHost().port),
            tcp_rule("sink.internal", 9, sink.getHost().port),
            tcp_rule("echo.internal", 7, echo.getHost().port),
        ],
        **connector_overrides,
    )
    tunnel = yield connector.when_up()
    return tunnel


@pytest_twisted.inlineCallbacks
def open_stalled(stack: Stack, n: int) -> Iterator[Any]:
    """``n`` stalled streams, the three kinds in turn; returns the SOCKS clients and their producers."""
    clients: list[SocksClient] = []
    producers: list[PatternProducer] = []
    kinds = ["source.internal", "sink.internal", "echo.internal"]
    results = yield gatherResults(
        [socks_connect(stack.socks_port, kinds[i % 3], 7 if i % 3 == 2 else 9) for i in range(n)],
        consumeErrors=True,
    )
    for i, (client, reply) in enumerate(results):
        assert reply == 0
        client.keep = None
        client.transport.pauseProducing()  # never reads
        if i % 3:
            # Uploads to the sink / the echo: far more than every window and buffer holds.
            producers.append(PatternProducer(client.transport, 1 << 40, fin=False, seed=i))
        clients.append(client)
    return clients, producers


@pytest_twisted.inlineCallbacks
def settle(proxy_tunnel: Any, timeout: float = 30.0) -> Iterator[Any]:
    """Wait until the tunnel's streams stop moving bytes (everything that can be buffered is)."""
    def moved() -> int:
        return sum(s.bytes_in + s.bytes_out for s in proxy_tunnel.streams.values())

    previous = -1
    deadline = reactor.seconds() + timeout
    while moved() != previous and reactor.seconds() < deadline:
        previous = moved()
        yield _sleep(0.5)
    return moved()


@pytest_twisted.inlineCallbacks
def fresh_request_seconds(stack: Stack, size: int = 64 * 1024, limit: float = 20.0) -> Iterator[Any]:
    """Time a fresh SOCKS echo of ``size`` bytes on the same tunnel; ``limit`` if it did not complete."""
    start = reactor.seconds()
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    PatternProducer(client.transport, size, seed=99)
    try:
        yield wait_for(lambda: client.received >= size, timeout=limit)
    except TimeoutError:
        client.transport.abortConnection()
        return limit
    elapsed = reactor.seconds() - start
    client.transport.loseConnection()
    return elapsed


@pytest_twisted.inlineCallbacks
def test_64_stalled_streams_do_not_block_a_fresh_request(stack: Stack) -> Any:
    stack.start_proxy()
    yield start_attack_stack(stack)
    proxy_tunnel = next(iter(stack.proxy.tunnel_factory.tunnels))  # type: ignore[union-attr]
    baseline = yield fresh_request_seconds(stack)
    clients, producers = yield open_stalled(stack, 64)
    buffered = yield settle(proxy_tunnel)
    elapsed = yield fresh_request_seconds(stack)
    print(f"\nfresh 64 KiB echo: {baseline:.3f}s idle, {elapsed:.3f}s with 64 stalled streams "
          f"({buffered / MIB:.1f} MiB moved by them)")
    assert elapsed < 5.0, f"a fresh request took {elapsed:.2f}s next to 64 stalled streams"
    for p in producers:
        p.stopProducing()
    for c in clients:
        c.transport.abortConnection()
    yield gatherResults([c.done for c in clients])


@pytest_twisted.inlineCallbacks
def test_stalled_streams_are_ended_and_leave_nothing_behind(stack: Stack) -> Any:
    """With a 2 s stall timeout: streams of attackers that stay are reset STREAM_STALLED and their client
    connections closed; attackers that leave while the proxy has paused reading their sockets are noticed; open
    streams and file descriptors return to where they started, and the tunnel carries on."""
    tunnel_conf = {"tunnel": {"stallTimeoutSeconds": 2}}
    stack.start_proxy(**tunnel_conf)
    connector_tunnel = yield start_attack_stack(stack, **tunnel_conf)
    proxy_tunnel = next(iter(stack.proxy.tunnel_factory.tunnels))  # type: ignore[union-attr]
    resets: list[Any] = []
    for tunnel in (proxy_tunnel, connector_tunnel):
        original = tunnel._on_reset

        def record(event: Any, original: Any = original) -> None:
            resets.append(event.code)
            original(event)

        tunnel._on_reset = record
    warm = yield fresh_request_seconds(stack)
    assert warm < 5.0
    yield wait_for(lambda: not proxy_tunnel.streams, timeout=10)
    fds_before = open_fds()
    start = reactor.seconds()
    clients, producers = yield open_stalled(stack, 24)
    assert len(proxy_tunnel.streams) == 24
    leavers, stayers = clients[::2], clients[1::2]
    for c in leavers:
        c.transport.abortConnection()  # gone while the proxy holds its socket paused
    yield wait_for(lambda: not proxy_tunnel.streams and not connector_tunnel.streams, timeout=20)
    ended = reactor.seconds() - start
    assert ErrorCode.STREAM_STALLED in resets
    # The attackers that stayed leave too (their sockets were paused, so they may not have noticed the close).
    for p in producers:
        p.stopProducing()
    for c in stayers:
        c.transport.abortConnection()
    yield gatherResults([c.done for c in clients])
    # The sink backend stopped reading, so it notices the connector's close only once it reads again: it does,
    # and every sink connection ends (the connector did close its side).
    sinks = stack.sinks  # type: ignore[attr-defined]
    for sink in sinks:
        sink.transport.resumeProducing()
    yield wait_for(lambda: all(sink.lost for sink in sinks), timeout=10)
    yield wait_for(lambda: open_fds() <= fds_before, timeout=20)
    print(f"\n24 stalled streams (stall timeout 2 s): every stream reset and its connections closed after "
          f"{ended:.1f}s; fds {fds_before} before, {open_fds()} after")
    assert not proxy_tunnel.lost and connector_tunnel.session.ready  # the tunnel survived
    again = yield fresh_request_seconds(stack)
    assert again < 5.0


@pytest_twisted.inlineCallbacks
def test_idle_timeout_resets_the_stream_idle_timeout(stack: Stack) -> Any:
    """The SOCKS idle timeout cuts a relay short: the connector sees RESET IDLE_TIMEOUT, not a FIN."""
    stack.start_proxy(servers={"proxy": {"clientConnection": {"idleTimeoutSeconds": 1}}})
    connector_tunnel = yield start_attack_stack(stack)
    resets: list[Any] = []
    original = connector_tunnel._on_reset

    def record(event: Any) -> None:
        resets.append(event.code)
        original(event)

    connector_tunnel._on_reset = record
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    yield client.done
    yield wait_for(lambda: resets, timeout=10)
    assert resets == [ErrorCode.IDLE_TIMEOUT]


@pytest_twisted.inlineCallbacks
def test_a_client_that_resets_while_paused_is_noticed_before_the_stall_timeout(stack: Stack) -> Any:
    """Uploads to a backend that does not read: the proxy stops reading the clients' sockets. Clients that then
    reset their connections are noticed by the probe of the paused socket within seconds, long before the
    default 60 s stall timeout."""
    small = {"tunnel": {"streamWindowBytes": 262144}}  # less to fill before the uploads stall
    stack.start_proxy(**small)
    connector_tunnel = yield start_attack_stack(stack, **small)
    assert connector_tunnel.timers.stall_timeout == 60
    proxy_tunnel = next(iter(stack.proxy.tunnel_factory.tunnels))  # type: ignore[union-attr]
    results = yield gatherResults([socks_connect(stack.socks_port, "sink.internal", 9) for _ in range(8)])
    producers = []
    for client, reply in results:
        assert reply == 0
        producers.append(PatternProducer(client.transport, 1 << 40, fin=False))
    yield wait_for(lambda: all(s.stalled for s in proxy_tunnel.streams.values()), timeout=60)
    start = reactor.seconds()
    for p in producers:
        p.stopProducing()
    for client, _reply in results:
        client.transport.abortConnection()  # RST: the proxy is not reading these sockets
    yield wait_for(lambda: not proxy_tunnel.streams and not connector_tunnel.streams, timeout=20)
    noticed = reactor.seconds() - start
    print(f"\n8 clients reset while paused: noticed and cleaned up after {noticed:.1f}s (stall timeout 60 s)")
    assert noticed < 20
