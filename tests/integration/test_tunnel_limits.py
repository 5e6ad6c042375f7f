"""Bounded memory and connections on the tunnel side, with real sockets and real TLS on 127.0.0.1.

* ``servers.businessDataTunnel.maxStreamsPerTenant``: the tenant's streams over all its tunnels; one more is
  refused with SOCKS5 reply 0x01 or HTTP 503 naming the limit, and counted in ``connproxy_stream_refusals_total``.
* ``servers.businessDataTunnel.maxTunnelsPerIdentity``: connectors of one certificate beyond the limit are refused
  in the handshake (GOAWAY ``TOO_MANY_TUNNELS``, audited); the same connector reconnecting still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.harness import Echo, Stack, serve, socks_connect, tcp_rule, wait_for
from tests.http_harness import parse_response, raw_exchange


@pytest_twisted.inlineCallbacks
def test_streams_per_tenant_socks_and_http(stack: Stack) -> Iterator[Deferred[Any]]:
    backend = yield serve(Echo)
    stack.ports.append(backend)
    proxy = stack.start_proxy(servers={"businessDataTunnel": {"maxStreamsPerTenant": 2},
                                       "proxy": {"http": {"enabled": True}}})
    # Two connectors of the tenant: the limit is counted over both tunnels.
    for cid in ("c1", "c2"):
        connector = stack.start_connector(connector_id=cid, access=[tcp_rule("echo.internal", 7, backend.getHost().port)])
        yield connector.when_up()
    held = []
    for _ in range(2):
        client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
        assert reply == 0
        held.append(client)
    assert sorted(t.load for t in proxy.registry.tunnels()) == [1, 1]
    _client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0x01  # general failure (not 0x03: the connector is connected)
    raw = yield deferToThread(raw_exchange, stack.http_port,
                              b"CONNECT echo.internal:7 HTTP/1.1\r\nHost: echo.internal:7\r\n\r\n")
    status, _headers, body = parse_response(raw)
    assert status == 503
    assert b"maxStreamsPerTenant=2" in body and b"tenant-a has 2 streams open" in body
    metrics = proxy.metrics.render().decode()
    assert 'connproxy_stream_refusals_total{reason="max_streams_per_tenant"} 2.0' in metrics
    # A stream that ends frees its place.
    first = held[0]
    first.transport.loseConnection()
    yield first.done
    yield wait_for(lambda: proxy.registry.tenant_streams("tenant-a") == 1, timeout=10)
    again, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    for c in (again, held[1]):
        c.transport.loseConnection()
        yield c.done


@pytest_twisted.inlineCallbacks
def test_tunnels_per_identity(stack: Stack) -> Iterator[Deferred[Any]]:
    proxy = stack.start_proxy(servers={"businessDataTunnel": {"maxTunnelsPerIdentity": 2}})
    # One certificate without a location binding, three connector ids in three locations.
    first = stack.start_connector(connector_id="c1", location="loc-1")
    second = stack.start_connector(connector_id="c2", location="loc-2")
    yield first.when_up()
    yield second.when_up()
    third = stack.start_connector(connector_id="c3", location="loc-3")
    yield wait_for(lambda: any("maxTunnelsPerIdentity=2" in line for line in stack.audit), timeout=10)
    refused = [line for line in stack.audit if "tunnel handshake failure" in line]
    assert refused and "c3" in refused[0]
    assert proxy.registry.count() == 2
    assert proxy.registry.pick("tenant-a", "loc-3") is None
    yield third.stopService()
    # The same connector reconnecting (a new process with the same connectorId) replaces its old tunnel.
    old = proxy.registry.pick("tenant-a", "loc-1")
    yield first.stopService()
    yield wait_for(lambda: proxy.registry.pick("tenant-a", "loc-1") is None, timeout=10)
    again = stack.start_connector(connector_id="c1", location="loc-1")
    yield again.when_up()
    assert proxy.registry.count() == 2
    assert proxy.registry.pick("tenant-a", "loc-1") not in (None, old)
