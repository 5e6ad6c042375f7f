"""Process lifecycle with real twistd processes: readiness, the drain on SIGTERM (a transfer in flight completes,
a stream still open at ``shutdown.drainTimeoutSeconds`` is reset, new connections are refused, exit status 0),
and live reload on SIGHUP or a changed file (the connector's ``accessControl``; the proxy's ``allowedClientId`` and
token keys, with a connector's tunnel and a stream on it kept throughout)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import yaml
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, readBody

from tests.harness import (
    FAST_TUNNEL,
    Echo,
    Source,
    Stack,
    free_port,
    reactor,
    serve,
    socks_connect,
    tcp_rule,
    wait_for,
)
from tests.integration.test_processes import Child, spawn

BIN = Path(sys.executable).parent
MiB = 1 << 20
DRAIN = 3.0


class Held(Protocol):
    """A backend that sends ``first`` bytes at once and the rest (then FIN) when the test calls :meth:`finish`."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.digest = hashlib.sha256()
        self._send(self.factory.first)  # type: ignore[attr-defined]

    def _send(self, count: int) -> None:
        assert self.transport is not None
        block = hashlib.sha256(b"held").digest() * 2048  # 64 KiB
        while count > 0:
            chunk = block[: min(count, len(block))]
            self.digest.update(chunk)
            self.transport.write(chunk)
            count -= len(chunk)

    def finish(self, rest: int) -> None:
        assert self.transport is not None
        self._send(rest)
        self.transport.loseConnection()


def http_get(port: int, path: str) -> Deferred[tuple[int, bytes]]:
    """GET ``http://127.0.0.1:port/path``; fires with (status, body)."""
    d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())

    def body(response: Any) -> Deferred[tuple[int, bytes]]:
        return readBody(response).addCallback(lambda b: (response.code, b))

    return d.addCallback(body)


@inlineCallbacks
def poll_status(port: int, path: str, status: int, timeout: float = 20.0) -> Any:
    """Poll until ``path`` answers ``status``; returns the body."""
    deadline = reactor.seconds() + timeout
    last: Any = None
    while reactor.seconds() < deadline:
        try:
            last = yield http_get(port, path)
        except Exception as e:  # not listening yet
            last = e
        else:
            if last[0] == status:
                return last[1]
        yield sleep(0.1)
    raise AssertionError(f"{path} did not answer {status}: last {last!r}")


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def twistd(role: str, config: Path) -> Child:
    return spawn([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", role, "--config", str(config)])


def proxy_yaml(stack: Stack, ports: dict[str, int], **extra: Any) -> dict[str, Any]:
    files = stack.pki.write(stack.tmp / "pki")
    data: dict[str, Any] = {
        "tenantMode": "dedicated", "subaccountId": "tenant-a",
        "servers": {
            "businessDataTunnel": {"port": ports["tunnel"], "bindAddress": "127.0.0.1",
                                   "tls": {"certFile": str(files.proxy_cert), "keyFile": str(files.proxy_key),
                                           "clientCaFile": str(files.ca_cert)}},
            "proxy": {"http": {"enabled": False},
                      "socks5": {"port": ports["socks"], "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False}},
        },
        "tunnel": dict(FAST_TUNNEL),
        "metrics": {"prometheus": {"enabled": True, "port": ports["metrics"], "bindAddress": "127.0.0.1"}},
        "shutdown": {"drainTimeoutSeconds": DRAIN},
    }
    for key, value in extra.items():
        data[key] = value
    return data


def connector_yaml(stack: Stack, tunnel_port: int, access: list[dict[str, Any]], metrics_port: int) -> dict[str, Any]:
    cert, key = stack.pki.connector("tenant-a", None)
    (stack.tmp / "proc.crt").write_bytes(cert)
    (stack.tmp / "proc.key").write_bytes(key)
    (stack.tmp / "ca.crt").write_bytes(stack.pki.ca_cert_pem)
    return {
        "subaccountId": "tenant-a", "connectorId": "proc",
        "proxy": {"host": "localhost", "port": tunnel_port},
        "tls": {"certFile": str(stack.tmp / "proc.crt"), "keyFile": str(stack.tmp / "proc.key"),
                "caFile": str(stack.tmp / "ca.crt")},
        "tunnel": dict(FAST_TUNNEL),
        "reconnect": {"initialDelaySeconds": 0.1, "maxDelaySeconds": 1},
        "accessControl": access,
        "shutdown": {"drainTimeoutSeconds": DRAIN},
        "metrics": {"prometheus": {"enabled": True, "port": metrics_port}},
    }


@inlineCallbacks
def backends() -> Any:
    held = yield serve(Held, connections=[], first=MiB)
    endless = yield serve(Source, connections=[], total=1 << 40)
    return held, endless


def expected_digest(total: int) -> str:
    block = hashlib.sha256(b"held").digest() * 2048
    digest = hashlib.sha256()
    while total > 0:
        digest.update(block[: min(total, len(block))])
        total -= len(block)
    return digest.hexdigest()


@inlineCallbacks
def drain_scenario(stack: Stack, child: Child, socks_port: int, target_pid: int, refused: Any) -> Any:
    """Two streams in flight, SIGTERM to ``target_pid``: the held one completes, the endless one is reset at
    the deadline; ``refused()`` checks that new work is refused during the drain. Returns measured numbers."""
    held_client, reply = yield socks_connect(socks_port, "held.internal", 1)
    assert reply == 0
    held_client.keep = None
    endless_client, reply = yield socks_connect(socks_port, "endless.internal", 2)
    assert reply == 0
    endless_client.keep = None
    yield wait_for(lambda: held_client.received >= MiB and endless_client.received > MiB, timeout=20)
    sent_at = reactor.seconds()
    os.kill(target_pid, signal.SIGTERM)
    yield wait_for(lambda: b"draining" in child.output, timeout=10)
    yield refused()
    held_backend = stack_ports_held(stack).factory.connections[0]
    held_backend.finish(7 * MiB)
    yield held_client.eof
    held_done_at = reactor.seconds()
    assert held_client.received == 8 * MiB
    assert held_client.digest.hexdigest() == expected_digest(8 * MiB) == held_backend.digest.hexdigest()
    assert held_client._read_closed  # a clean FIN after every byte
    held_client.transport.loseConnection()
    yield endless_client.done
    reset_at = reactor.seconds()
    reason = endless_client.lost_reason
    assert reason is not None and not reason.check(ierror.ConnectionDone), reason
    assert reason.check(ierror.ConnectionLost, ierror.ConnectionAborted), reason
    assert not endless_client._read_closed  # never an EOF: the client was reset
    assert reset_at - sent_at >= DRAIN - 0.5
    ended = yield child.ended
    exited_at = reactor.seconds()
    assert isinstance(ended, ProcessDone), (ended, bytes(child.output[-3000:]))
    return {
        "held_bytes": held_client.received, "held_done_after": round(held_done_at - sent_at, 2),
        "endless_bytes_before_reset": endless_client.received, "reset_after": round(reset_at - sent_at, 2),
        "exit_after": round(exited_at - sent_at, 2),
    }


def stack_ports_held(stack: Stack) -> Any:
    return stack.ports[0]


@pytest_twisted.inlineCallbacks
def test_proxy_process_drains_on_sigterm(stack: Stack) -> Any:
    held, endless = yield backends()
    stack.ports += [held, endless]
    ports = {"tunnel": free_port(), "socks": free_port(), "metrics": free_port()}
    config = stack.tmp / "proxy.yaml"
    config.write_text(yaml.safe_dump(proxy_yaml(stack, ports, readiness={"requireConnector": True})))
    child = twistd("connproxy", config)
    try:
        body = yield poll_status(ports["metrics"], "/ready", 503)
        assert body == b"not ready: no connector registered\n"
        assert (yield http_get(ports["metrics"], "/healthcheck")) == (200, b"OK\n")
        connector = stack.start_connector(
            access=[tcp_rule("held.internal", 1, held.getHost().port),
                    tcp_rule("endless.internal", 2, endless.getHost().port)],
            tunnel_port=ports["tunnel"], shutdown={"drainTimeoutSeconds": 30})
        yield connector.when_up()
        assert (yield poll_status(ports["metrics"], "/ready", 200)) == b"ready\n"

        @inlineCallbacks
        def refused() -> Any:
            status = yield http_get(ports["metrics"], "/ready")
            assert status == (503, b"not ready: draining\n")
            try:
                yield TCP4ClientEndpoint(reactor, "127.0.0.1", ports["socks"]).connect(Factory.forProtocol(Protocol))
            except ierror.ConnectionRefusedError:
                pass
            else:
                raise AssertionError("a new connection was accepted during the drain")

        numbers = yield drain_scenario(stack, child, ports["socks"], child.transport.pid, refused)
        print("proxy drain:", numbers)
        assert numbers["exit_after"] < DRAIN + 8
    finally:
        if child.transport.pid is not None:
            os.kill(child.transport.pid, signal.SIGKILL)
            yield child.ended


@pytest_twisted.inlineCallbacks
def test_connector_process_drains_on_sigterm(stack: Stack) -> Any:
    held, endless = yield backends()
    stack.ports += [held, endless]
    stack.start_proxy()
    metrics_port = free_port()
    config = stack.tmp / "connector.yaml"
    config.write_text(yaml.safe_dump(connector_yaml(
        stack, stack.tunnel_port, [tcp_rule("held.internal", 1, held.getHost().port),
                                   tcp_rule("endless.internal", 2, endless.getHost().port)], metrics_port)))
    child = twistd("connproxy-connector", config)
    try:
        assert (yield poll_status(metrics_port, "/ready", 200)) == b"ready\n"
        assert stack.proxy is not None

        @inlineCallbacks
        def refused() -> Any:
            status = yield http_get(metrics_port, "/ready")
            assert status == (503, b"not ready: draining\n")
            _client, reply = yield socks_connect(stack.socks_port, "held.internal", 1)
            assert reply == 0x03  # the draining connector takes no new stream: no connector for the tenant

        numbers = yield drain_scenario(stack, child, stack.socks_port, child.transport.pid, refused)
        print("connector drain:", numbers)
        assert numbers["exit_after"] < DRAIN + 8
        yield wait_for(lambda: stack.proxy is not None and stack.proxy.registry.count() == 0, timeout=10)
    finally:
        if child.transport.pid is not None:
            os.kill(child.transport.pid, signal.SIGKILL)
            yield child.ended


def swap_config(folder: Path, data: dict[str, Any], version: str) -> None:
    """Write ``data`` as a new version and swap the ``config.yaml`` symlink to it, the way a ConfigMap is
    updated."""
    target = folder / version
    target.mkdir()
    (target / "config.yaml").write_text(yaml.safe_dump(data))
    tmp = folder / f".{version}.link"
    os.symlink(target / "config.yaml", tmp)
    os.replace(tmp, folder / "config.yaml")


@pytest_twisted.inlineCallbacks
def test_connector_reloads_access_control(stack: Stack) -> Any:
    echo = yield serve(Echo)
    stack.ports.append(echo)
    stack.start_proxy()
    assert stack.proxy is not None
    metrics_port = free_port()
    echo_rule = tcp_rule("echo.internal", 7, echo.getHost().port)
    other_rule = tcp_rule("other.internal", 8, echo.getHost().port)
    folder = stack.tmp / "cm"
    folder.mkdir()
    base = connector_yaml(stack, stack.tunnel_port, [echo_rule], metrics_port)
    swap_config(folder, base, "v1")
    child = twistd("connproxy-connector", folder / "config.yaml")
    try:
        yield poll_status(metrics_port, "/ready", 200)
        tunnel = stack.proxy.registry.tunnels()[0]
        inflight, reply = yield socks_connect(stack.socks_port, "echo.internal", 7)
        assert reply == 0
        inflight.transport.write(b"before")
        yield wait_for(lambda: inflight.received >= 6)
        _c, reply = yield socks_connect(stack.socks_port, "other.internal", 8)
        assert reply == 0x02  # access denied

        # SIGHUP with a new rule: the next request uses it; tunnel and stream stay.
        (folder / "v1" / "config.yaml").write_text(yaml.safe_dump({**base, "accessControl": [echo_rule, other_rule]}))
        os.kill(child.transport.pid, signal.SIGHUP)
        yield wait_for(lambda: b"configuration reloaded" in child.output, timeout=10)
        client, reply = yield socks_connect(stack.socks_port, "other.internal", 8)
        assert reply == 0
        client.transport.loseConnection()

        # An invalid file: one line naming the key; the running configuration stays.
        bad_rule = {**other_rule, "protocol": "FTP"}
        (folder / "v1" / "config.yaml").write_text(yaml.safe_dump({**base, "accessControl": [echo_rule, bad_rule]}))
        os.kill(child.transport.pid, signal.SIGHUP)
        yield wait_for(lambda: b"reload (SIGHUP) refused" in child.output, timeout=10)
        refusals = [line for line in bytes(child.output).splitlines() if b"reload (SIGHUP) refused" in line]
        assert len(refusals) == 1 and b"accessControl[1].protocol" in refusals[0], refusals
        client, reply = yield socks_connect(stack.socks_port, "other.internal", 8)
        assert reply == 0
        client.transport.loseConnection()

        # A ConfigMap-style symlink swap, no signal: picked up by the file watch; the port change is named.
        swap_config(folder, {**base, "backend": {"connectTimeoutSeconds": 3}}, "v2")
        yield wait_for(lambda: bytes(child.output).count(b"configuration reloaded;") == 2, timeout=20)
        assert b"(the configuration file changed)" in child.output
        assert re.search(rb"need a restart.*backend\.connectTimeoutSeconds", bytes(child.output))
        _c, reply = yield socks_connect(stack.socks_port, "other.internal", 8)
        assert reply == 0x02

        inflight.transport.write(b"after")
        yield wait_for(lambda: inflight.received >= 11)
        assert stack.proxy.registry.tunnels() == [tunnel]  # the same tunnel all along
        assert child.transport.pid is not None  # SIGHUP never stopped the process

        status, text = yield http_get(metrics_port, "/metrics")
        assert status == 200
        excerpt = [line for line in text.decode().splitlines()
                   if line.startswith(("connproxy_config_reloads_total", "connproxy_connector_"))]
        print("connector /metrics excerpt:\n" + "\n".join(excerpt))
        assert 'connproxy_config_reloads_total{result="ok"} 2.0' in excerpt
        assert 'connproxy_config_reloads_total{result="error"} 1.0' in excerpt
        assert "connproxy_connector_access_denials_total 2.0" in excerpt
        assert any(line.startswith("connproxy_connector_tunnel_up{") and line.endswith(" 1.0") for line in excerpt)
        inflight.transport.loseConnection()
        yield inflight.done
    finally:
        if child.transport.pid is not None:
            os.kill(child.transport.pid, signal.SIGTERM)
            ended = yield child.ended
            assert isinstance(ended, ProcessDone)


@inlineCallbacks
def token(folder: Path, client_id: str) -> Any:
    out, err, code = yield getProcessOutputAndValue(
        str(BIN / "connproxy"), ["token", "--dir", str(folder), "--subaccount", "tenant-a", "--client-id", client_id],
        env=os.environ)
    assert code == 0, err
    return out.strip().decode()


@pytest_twisted.inlineCallbacks
def test_proxy_reloads_allowed_client_ids_and_token_keys(stack: Stack) -> Any:
    """SIGHUP on the proxy: a new ``allowedClientId`` and a rotated token key apply to the next request, while a
    connector's tunnel and a stream on it stay up throughout; a reload naming a missing keys file is refused."""
    keys, rotated = stack.tmp / "keys", stack.tmp / "keys-rotated"
    token_a = yield token(keys, "sb-a")
    token_b = yield token(keys, "sb-b")
    token_new = yield token(rotated, "sb-a")  # signed by another key, unknown to the proxy at first
    echo = yield serve(Echo)
    stack.ports.append(echo)
    ports = {"tunnel": free_port(), "socks": free_port(), "metrics": free_port()}
    data = proxy_yaml(stack, ports)
    socks = data["servers"]["proxy"]["socks5"]
    socks["enableProxyAuthorization"] = True
    oauth = {"allowedClientId": ["sb-a"], "tokenKeysFile": str(keys / "token_keys.json")}
    data["servers"]["proxy"]["authorization"] = {"oauth": oauth}
    config = stack.tmp / "proxy.yaml"
    config.write_text(yaml.safe_dump(data))
    child = twistd("connproxy", config)
    connector_metrics = free_port()
    connector_config = stack.tmp / "connector.yaml"
    connector_config.write_text(yaml.safe_dump(connector_yaml(
        stack, ports["tunnel"], [tcp_rule("echo.internal", 7, echo.getHost().port)], connector_metrics)))
    connector = twistd("connproxy-connector", connector_config)

    def reloaded(count: int) -> Any:
        os.kill(child.transport.pid, signal.SIGHUP)
        return wait_for(lambda: bytes(child.output).count(b"configuration reloaded") == count, timeout=10)

    try:
        yield poll_status(ports["metrics"], "/ready", 200)
        yield poll_status(connector_metrics, "/ready", 200)
        inflight, reply = yield socks_connect(ports["socks"], "echo.internal", 7, token=token_a)
        assert reply == 0
        inflight.transport.write(b"before")
        yield wait_for(lambda: inflight.received >= 6)
        for refused_token in (token_b, token_new):  # client not allowed; key not known
            _c, refused = yield socks_connect(ports["socks"], "echo.internal", 7, token=refused_token)
            assert refused not in (0, 0x03)  # refused before routing

        oauth["allowedClientId"] = ["sb-a", "sb-b"]
        config.write_text(yaml.safe_dump(data))
        yield reloaded(1)
        client, reply = yield socks_connect(ports["socks"], "echo.internal", 7, token=token_b)
        assert reply == 0
        client.transport.loseConnection()

        # The token key rotated: the keys file named now holds only the new key.
        oauth["tokenKeysFile"] = str(rotated / "token_keys.json")
        config.write_text(yaml.safe_dump(data))
        yield reloaded(2)
        client, reply = yield socks_connect(ports["socks"], "echo.internal", 7, token=token_new)
        assert reply == 0
        client.transport.loseConnection()
        _c, refused = yield socks_connect(ports["socks"], "echo.internal", 7, token=token_a)
        assert refused not in (0, 0x03)  # signed by the old key

        oauth["tokenKeysFile"] = str(keys / "missing.json")
        config.write_text(yaml.safe_dump(data))
        os.kill(child.transport.pid, signal.SIGHUP)
        yield wait_for(lambda: b"reload (SIGHUP) refused" in child.output, timeout=10)
        refusals = [line for line in bytes(child.output).splitlines() if b"reload (SIGHUP) refused" in line]
        assert len(refusals) == 1 and b"tokenKeysFile" in refusals[0], refusals
        client, reply = yield socks_connect(ports["socks"], "echo.internal", 7, token=token_new)
        assert reply == 0  # the running configuration stays
        client.transport.loseConnection()

        # The stream opened before the first reload still echoes: neither it nor its tunnel was dropped, and the
        # connector connected once.
        inflight.transport.write(b"after")
        yield wait_for(lambda: inflight.received >= 11)
        assert bytes(connector.output).count(b"tunnel established to proxy") == 1, bytes(connector.output[-3000:])
        status, text = yield http_get(ports["metrics"], "/metrics")
        excerpt = [line for line in text.decode().splitlines()
                   if line.startswith(("connproxy_config_reloads_total", "connproxy_token_failures_total",
                                       "connectivity_business_data_tunnels_count"))]
        print("proxy /metrics excerpt:\n" + "\n".join(excerpt))
        assert 'connproxy_config_reloads_total{result="ok"} 2.0' in excerpt
        assert 'connproxy_config_reloads_total{result="error"} 1.0' in excerpt
        assert 'connproxy_token_failures_total{front_end="socks5",reason="client_not_allowed"} 1.0' in excerpt
        assert any(line.startswith("connectivity_business_data_tunnels_count") and line.endswith(" 1.0")
                   for line in excerpt)
        inflight.transport.loseConnection()
        yield inflight.done
    finally:
        for process in (connector, child):
            if process.transport.pid is not None:
                os.kill(process.transport.pid, signal.SIGTERM)
                ended = yield process.ended
                assert isinstance(ended, ProcessDone), bytes(process.output[-2000:])
