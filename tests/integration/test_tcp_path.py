"""SOCKS5 -> proxy -> tunnel -> connector -> backend, end to end on 127.0.0.1 with real TLS."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.harness import Echo, PatternProducer, Stack, serve, socks_connect, socks_to_backend, tcp_rule, wait_for


@pytest_twisted.inlineCallbacks
def test_echo_round_trip(stack: Stack) -> Any:
    client = yield socks_to_backend(stack, Echo, "echo.internal", 7)
    client.transport.write(b"hello tunnel")
    yield wait_for(lambda: client.received >= 12)
    assert bytes(client.keep) == b"hello tunnel"
    client.transport.loseConnection()
    yield client.done


MIB = 1024 * 1024
SIZE = 64 * MIB


@pytest_twisted.inlineCallbacks
def test_64_mib_each_way_with_checksums(stack: Stack) -> Any:
    client = yield socks_to_backend(stack, Echo, "echo.internal", 7)
    client.keep = None
    producer = PatternProducer(client.transport, SIZE, seed=7)
    yield producer.done
    yield client.eof  # the echo answered our FIN with FIN after echoing everything
    assert client.received == SIZE
    assert client.digest.hexdigest() == producer.digest.hexdigest()
    yield client.done


@pytest_twisted.inlineCallbacks
def test_half_close_client_still_receives_whole_answer(stack: Stack) -> Any:
    """The client shuts its write side after the request; the backend's answer still arrives in full."""
    client = yield socks_to_backend(stack, Echo, "echo.internal", 7)
    payload = b"request-" * 100_000
    client.transport.write(payload)
    client.transport.loseWriteConnection()
    yield client.eof
    assert client.received == len(payload)
    assert bytes(client.keep or b"") == payload
    yield client.done


@pytest_twisted.inlineCallbacks
def test_server_speaks_first(stack: Stack) -> Any:
    from tests.harness import Banner

    client = yield socks_to_backend(stack, Banner, "smtp.internal", 25)
    yield wait_for(lambda: client.received >= 11)
    assert bytes(client.keep or b"") == b"220 hello\r\n"
    client.transport.loseConnection()
    yield client.done


@pytest_twisted.inlineCallbacks
def test_backend_closes_right_after_sending_everything(stack: Stack) -> Any:
    """A backend that writes a large answer and closes at once: the client still gets every byte (the
    connector's close is queued behind the data, and the proxy closes the client gracefully, not by abort)."""
    from tests.harness import Source

    class SendAndClose(Source):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.producer.done.addCallback(lambda _: self.transport.loseConnection())

    source = yield serve(SendAndClose, total=16 * MIB, connections=[])
    stack.ports.append(source)
    stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule("source.internal", 19, source.getHost().port)])
    yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, "source.internal", 19)
    assert reply == 0
    client.keep = None
    yield client.eof
    assert client.received == 16 * MIB
    client.transport.loseConnection()
    yield client.done
    assert client.lost_reason is not None and "ConnectionDone" in repr(client.lost_reason.type)


@pytest_twisted.inlineCallbacks
def test_prometheus_metrics(stack: Stack) -> Any:
    import os

    from twisted.internet.utils import getProcessOutputAndValue

    backend = yield serve(Echo)
    stack.ports.append(backend)
    stack.start_proxy(metrics={"prometheus": {"enabled": True, "port": 0, "bindAddress": "127.0.0.1"}})
    connector = stack.start_connector(access=[tcp_rule("echo.internal", 7, backend.getHost().port)])
    yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
    _c2, refused = yield socks_connect(stack.socks_port, "echo.internal", 8)
    assert (reply, refused) == (0, 2)
    port = stack.proxy.metrics_listener.port_number
    out, err, code = yield getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"], env=os.environ)
    assert code == 0, err
    text = out.decode()
    assert "connectivity_business_data_tunnels_count 1.0" in text
    assert 'connproxy_streams_open{location="",tenant="tenant-a"} 1.0' in text
    assert 'connproxy_stream_opens_total{front_end="socks5",result="ok"} 1.0' in text
    assert 'connproxy_stream_opens_total{front_end="socks5",result="access_denied"} 1.0' in text
    client.transport.loseConnection()
    yield client.done
