"""The real programs: the connector as a twistd process killed mid-stream, curl as a SOCKS5 client,
the health check over TLS, and the proxy as a twistd process on embedded defaults."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue

from tests.harness import FAST_TUNNEL, Echo, PatternProducer, Stack, serve, socks_connect, tcp_rule, wait_for

BIN = Path(sys.executable).parent


class Child(ProcessProtocol):
    """A child process we started; ``ended`` fires with its exit reason."""

    def __init__(self) -> None:
        self.ended: Deferred[Any] = Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data[-65536:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def spawn(args: list[str], env: dict[str, str] | None = None) -> Child:
    child = Child()
    reactor.spawnProcess(child, args[0], args, env={**os.environ, **(env or {})})
    return child


def connector_config(stack: Stack, access: list[dict[str, Any]]) -> Path:
    cert, key = stack.pki.connector("tenant-a", None)
    (stack.tmp / "proc.crt").write_bytes(cert)
    (stack.tmp / "proc.key").write_bytes(key)
    (stack.tmp / "ca.crt").write_bytes(stack.pki.ca_cert_pem)
    path = stack.tmp / "connector.yaml"
    path.write_text(yaml.safe_dump({
        "subaccountId": "tenant-a",
        "connectorId": "proc",
        "proxy": {"host": "localhost", "port": stack.tunnel_port},
        "tls": {"certFile": "proc.crt", "keyFile": "proc.key", "caFile": "ca.crt"},
        "tunnel": FAST_TUNNEL,
        "reconnect": {"initialDelaySeconds": 0.1, "maxDelaySeconds": 1},
        "accessControl": access,
    }))
    return path


def start_connector_process(config: Path) -> Child:
    return spawn([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "connproxy-connector", "--config", str(config)])


@pytest_twisted.inlineCallbacks
def test_connector_killed_mid_stream(stack: Stack) -> Any:
    echo = yield serve(Echo)
    stack.ports.append(echo)
    stack.start_proxy()
    config = connector_config(stack, [tcp_rule("echo.internal", 7, echo.getHost().port)])
    child = start_connector_process(config)
    try:
        yield wait_for(lambda: stack.proxy.registry.pick("tenant-a", "") is not None, timeout=20)
        client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
        assert reply == 0
        client.keep = None
        PatternProducer(client.transport, 1 << 40, fin=False)  # endless upload, echoed back
        yield wait_for(lambda: client.received > 1 << 20)
        os.kill(child.transport.pid, signal.SIGKILL)
        killed_at = reactor.seconds()
        yield client.done  # the client's connection is closed, not left hanging
        assert reactor.seconds() - killed_at < 5
        yield child.ended
        yield wait_for(lambda: stack.proxy.registry.count() == 0)
        _c, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
        assert reply == 0x03  # no connector for the tenant and location
        child = start_connector_process(config)
        yield wait_for(lambda: stack.proxy.registry.pick("tenant-a", "") is not None, timeout=20)
        client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
        assert reply == 0
        client.transport.write(b"back again")
        yield wait_for(lambda: client.received >= 10)
        client.transport.loseConnection()
        yield client.done
    finally:
        if child.transport.pid is not None:
            os.kill(child.transport.pid, signal.SIGTERM)
            yield child.ended


@pytest_twisted.inlineCallbacks
def test_connector_started_before_proxy_keeps_retrying(stack: Stack, tmp_path: Path) -> Any:
    from tests.harness import free_port

    echo = yield serve(Echo)
    stack.ports.append(echo)
    port = free_port()
    config = stack.tmp / "early.yaml"
    cert, key = stack.pki.connector("tenant-a", None)
    (stack.tmp / "early.crt").write_bytes(cert)
    (stack.tmp / "early.key").write_bytes(key)
    (stack.tmp / "ca.crt").write_bytes(stack.pki.ca_cert_pem)
    config.write_text(yaml.safe_dump({
        "subaccountId": "tenant-a", "connectorId": "early",
        "proxy": {"host": "localhost", "port": port},
        "tls": {"certFile": "early.crt", "keyFile": "early.key", "caFile": "ca.crt"},
        "tunnel": FAST_TUNNEL, "reconnect": {"initialDelaySeconds": 0.1, "maxDelaySeconds": 0.5},
        "accessControl": [tcp_rule("echo.internal", 7, echo.getHost().port)],
    }))
    child = start_connector_process(config)
    try:
        yield wait_for(lambda: b"could not connect" in child.output, timeout=20)
        stack.start_proxy(servers={"businessDataTunnel": {"port": port}})
        yield wait_for(lambda: stack.proxy.registry.count() == 1, timeout=10)
        client, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
        assert reply == 0
        client.transport.loseConnection()
        yield client.done
    finally:
        os.kill(child.transport.pid, signal.SIGTERM)
        yield child.ended


@pytest_twisted.inlineCallbacks
def test_curl_through_socks5(stack: Stack) -> Any:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    root = Resource()
    root.putChild(b"hello", Data(b"hello through the tunnel\n", "text/plain"))
    web = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    stack.ports.append(web)
    stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule("erp.internal", 80, web.getHost().port)])
    yield connector.when_up()
    out, err, code = yield getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{stack.socks_port}",
                 "http://erp.internal/hello"], env=os.environ)
    assert code == 0, err
    assert out == b"hello through the tunnel\n"
    out, err, code = yield getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{stack.socks_port}",
                 "http://unmapped.internal/hello"], env=os.environ)
    assert code != 0  # refused by the connector's access control (SOCKS reply 0x02)


@pytest_twisted.inlineCallbacks
def test_healthcheck_over_tls_without_client_certificate(stack: Stack) -> Any:
    stack.start_proxy()
    ca = stack.tmp / "ca-only.crt"
    ca.write_bytes(stack.pki.ca_cert_pem)
    out, err, code = yield getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "10", "--cacert", str(ca), "-w", "%{http_code}",
                 f"https://localhost:{stack.tunnel_port}/healthcheck"], env=os.environ)
    assert code == 0, err
    assert out.endswith(b"200") and out.startswith(b"OK")
    out, err, code = yield getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "10", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}",
                 f"https://localhost:{stack.tunnel_port}/nope"], env=os.environ)
    assert out == b"404"


@pytest_twisted.inlineCallbacks
def test_proxy_process_on_embedded_defaults(tmp_path: Path) -> Any:
    """``twistd -n connproxy`` with no configuration, and the embedded connector, in a private state folder."""
    env = {"CONNPROXY_STATE_DIR": str(tmp_path / "state")}
    out, err, code = yield getProcessOutputAndValue(
        str(BIN / "python"), ["-c", "import socket\nfor p in (8042, 20003, 20004, 9494):\n"
                              "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                              "    s.bind(('127.0.0.1', p)); s.close()"], env={**os.environ})
    if code != 0:
        pytest.skip("default ports are busy on this machine")
    proxy = spawn([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "connproxy"], env)
    connector = spawn([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "connproxy-connector"], env)
    try:
        yield wait_for(lambda: b"tunnel established" in connector.output, timeout=30)
        assert b"development certificates" in proxy.output
        # Audit events are bare JSON lines on the process's stdout, not wrapped into twistd's log format.
        audit_lines = [line for line in bytes(proxy.output).splitlines() if line.startswith(b"[AUDIT-EVENT] {")]
        assert any(b"tunnel handshake success" in line for line in audit_lines)
        assert str(tmp_path / "state").encode() in proxy.output
        _c, reply = yield socks_connect(20004, "anything.internal", 80)
        assert reply == 0x02  # the embedded connector exposes nothing
    finally:
        for child in (connector, proxy):
            os.kill(child.transport.pid, signal.SIGTERM)
        yield connector.ended
        yield proxy.ended


@pytest_twisted.inlineCallbacks
def test_proxy_process_writes_json_logs(stack: Stack) -> Any:
    """``logging: {format: json}``: twistd's output becomes one JSON object per line (audit events too)."""
    import json

    files = stack.pki.write(stack.tmp / "pki")
    config = stack.tmp / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "tenantMode": "dedicated", "subaccountId": "tenant-a",
        "servers": {
            "businessDataTunnel": {"port": 0, "bindAddress": "127.0.0.1",
                                   "tls": {"certFile": str(files.proxy_cert), "keyFile": str(files.proxy_key),
                                           "clientCaFile": str(files.ca_cert)}},
            "proxy": {"http": {"port": 0, "enableProxyAuthorization": False, "allowRemoteConnections": False},
                      "socks5": {"port": 0, "enableProxyAuthorization": False, "allowRemoteConnections": False}},
        },
        "metrics": {"prometheus": {"enabled": False}},
        "logging": {"format": "json", "level": "info"},
    }))
    proxy = spawn([str(BIN / "twistd"), "-n", "--pidfile=", "connproxy", "--config", str(config)])
    try:
        yield wait_for(lambda: b"listening on" in proxy.output, timeout=20)
    finally:
        os.kill(proxy.transport.pid, signal.SIGTERM)
        yield proxy.ended
    records = [json.loads(line) for line in bytes(proxy.output).splitlines() if line.startswith(b"{")]
    assert any(" listening on 127.0.0.1:" in r.get("message", "") and "port" in r for r in records)
    assert not [key for r in records for key in r if key.startswith("log_")]
    assert not [line for line in bytes(proxy.output).splitlines() if line and not line.startswith((b"{", b"["))]
