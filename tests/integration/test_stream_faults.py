"""Faults stay in their stream, end to end: a TLS mapping whose CA file is missing answers SOCKS 0x04 (TLS_ERROR)
and the tunnel serves the next stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.harness import Echo, PatternProducer, Stack, serve, socks_connect, tcp_rule


@pytest_twisted.inlineCallbacks
def test_missing_ca_file_is_socks_0x04_and_the_tunnel_survives(stack: Stack, tmp_path: Path) -> Any:
    echo = yield serve(Echo)
    stack.ports.append(echo)
    stack.start_proxy()
    port = echo.getHost().port
    connector = stack.start_connector(access=[
        tcp_rule("echo.internal", 7, port),
        tcp_rule("tls.internal", 443, port, protocol="TCP_TLS", caFile=str(tmp_path / "missing-ca.pem")),
    ])
    tunnel = yield connector.when_up()
    _client, reply = yield socks_connect(stack.socks_port, "tls.internal", 443)
    assert reply == 0x04  # host unreachable: TLS_ERROR, not 0x03 (a dead tunnel)
    assert not tunnel.lost
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    client.keep = None
    producer = PatternProducer(client.transport, 100_000, seed=5)
    yield client.eof
    assert client.received == 100_000 and client.digest.hexdigest() == producer.digest.hexdigest()
