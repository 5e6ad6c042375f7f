"""Unfinished TLS handshakes and connection limits on the tunnel port, with real sockets on 127.0.0.1.

``servers.businessDataTunnel.{handshakeTimeoutSeconds, maxPendingHandshakes, maxConnectionsPerClient}``: raw TCP
connections that never send a byte are closed after the handshake timeout while a real connector still gets its
tunnel; at the pending limit the oldest handshake makes room; over the per-source limit a connection is closed at
accept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.harness import Stack, reactor, wait_for


class Mute(Protocol):
    """Connects and never sends a byte; ``closed`` fires with the seconds the connection lasted."""

    def __init__(self) -> None:
        self.closed: Deferred[float] = Deferred()
        self.started = time.monotonic()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(time.monotonic() - self.started)


def mute(port: int) -> Deferred[Mute]:
    d: Deferred[Mute] = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10), Mute())
    return d


def tunnel_limits(**keys: Any) -> dict[str, Any]:
    return {"servers": {"businessDataTunnel": keys}}


@pytest_twisted.inlineCallbacks
def test_200_silent_connections_time_out_and_a_connector_still_gets_in(stack: Stack) -> Iterator[Deferred[Any]]:
    timeout = 3.0
    proxy = stack.start_proxy(**tunnel_limits(handshakeTimeoutSeconds=timeout))
    admission = proxy.tunnel_admission
    silent = []
    for _ in range(200):
        m = yield mute(stack.tunnel_port)
        silent.append(m)
    yield wait_for(lambda: admission.connections == 200, timeout=10)
    assert len(admission.pending) == 200
    # A real connector is admitted and registered while the 200 hang in their handshakes.
    connector = stack.start_connector()
    yield connector.when_up().addTimeout(10, reactor)
    assert proxy.registry.count() == 1
    results = yield DeferredList([m.closed for m in silent]).addTimeout(timeout + 15, reactor)
    lasted = [value for ok, value in results if ok]
    assert len(lasted) == 200
    assert min(lasted) >= timeout - 0.5  # not before the timeout ...
    assert max(lasted) < timeout + 10  # ... and every one soon after it (a loaded machine gets slack)
    assert all(m.received == b"" for m in silent)  # aborted: nothing was sent to them
    yield wait_for(lambda: admission.connections == 1 and not admission.pending, timeout=10)
    assert proxy.registry.count() == 1  # the connector's tunnel is untouched
    text = proxy.metrics.render().decode()
    assert 'connproxy_tunnel_handshakes_aborted_total{reason="handshake_timeout"} 200.0' in text


@pytest_twisted.inlineCallbacks
def test_pending_limit_aborts_the_oldest_handshake(stack: Stack) -> Iterator[Deferred[Any]]:
    proxy = stack.start_proxy(**tunnel_limits(maxPendingHandshakes=5, handshakeTimeoutSeconds=60))
    silent = []
    for _ in range(5):
        m = yield mute(stack.tunnel_port)
        silent.append(m)
    yield wait_for(lambda: len(proxy.tunnel_admission.pending) == 5, timeout=10)
    connector = stack.start_connector()
    yield connector.when_up().addTimeout(10, reactor)
    yield silent[0].closed.addTimeout(10, reactor)
    assert [m.closed.called for m in silent[1:]] == [False] * 4
    for m in silent[1:]:
        assert m.transport is not None
        m.transport.loseConnection()
        yield m.closed


@pytest_twisted.inlineCallbacks
def test_per_source_limit_on_the_tunnel_port(stack: Stack) -> Iterator[Deferred[Any]]:
    proxy = stack.start_proxy(**tunnel_limits(maxConnectionsPerClient=3, handshakeTimeoutSeconds=60))
    held = []
    for _ in range(3):
        m = yield mute(stack.tunnel_port)
        held.append(m)
    yield wait_for(lambda: proxy.tunnel_admission.connections == 3, timeout=10)
    over = yield mute(stack.tunnel_port)
    lasted = yield over.closed.addTimeout(10, reactor)
    assert lasted < 5.0 and over.received == b""
    assert proxy.tunnel_admission.connections == 3
    text = proxy.metrics.render().decode()
    assert 'connproxy_client_connections_refused_total{front_end="tunnel",limit="max_connections_per_client"} 1.0' \
        in text
    # A place freed is a place for a connector.
    for m in held:
        assert m.transport is not None
        m.transport.loseConnection()
        yield m.closed
    connector = stack.start_connector()
    yield connector.when_up().addTimeout(10, reactor)
    assert proxy.registry.count() == 1
