"""SOCKS5 -> proxy -> tunnel -> connector -> backend, end to end on 127.0.0.1 with real TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.harness import Echo, PatternProducer, Stack, new_stack, serve, socks_connect, tcp_rule, wait_for


@pytest.fixture
def stack(tmp_path: Path) -> Any:
    s = new_stack(tmp_path)
    yield s
    pytest_twisted.blockon(s.stop())


@pytest_twisted.inlineCallbacks
def test_echo_round_trip(stack: Stack) -> Any:
    backend = yield serve(Echo)
    stack.ports.append(backend)
    stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule("echo.internal", 7, backend.getHost().port)])
    yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    assert reply == 0
    client.transport.write(b"hello tunnel")
    yield wait_for(lambda: client.received >= 12)
    assert bytes(client.keep) == b"hello tunnel"
    client.transport.loseConnection()
    yield client.done
