"""The proxy as a real ``twistd -n connproxy`` (and ``twist connproxy``) process, and the connector as a real
``twistd -n connproxy-connector`` process, whose standard output is a pipe nobody reads: each keeps serving (the
log never blocks the reactor), writes the configured log format, stops on SIGTERM with status 0, and leaves no
pid file behind."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread

from tests.harness import Stack, free_port, tcp_rule, wait_for
from tests.integration.test_processes import connector_config

BIN = Path(sys.executable).parent
#: Enough refused requests to write several times a pipe's 64 KiB of log lines (~280 bytes each).
REQUESTS = 600


class Unread(ProcessProtocol):
    """A child whose stdout and stderr are a pipe this test never reads while the child runs."""

    def __init__(self) -> None:
        self.ended: Deferred[Any] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def proxy_config(tmp: Path, http_port: int, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "tenantMode": "dedicated", "subaccountId": "tenant-a",
        "servers": {
            "businessDataTunnel": {"port": free_port(), "bindAddress": "127.0.0.1"},
            "proxy": {"http": {"port": http_port, "enableProxyAuthorization": False, "allowRemoteConnections": False},
                      "socks5": {"port": free_port(), "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False}},
        },
        "metrics": {"prometheus": {"enabled": False}},
        "logging": {"format": "console", "level": "info"},
    }))
    return path


def refused_requests(port: int, count: int, deadline: float) -> int:
    """``count`` HTTP proxy requests to a target no connector serves, one connection each (blocking: run it in
    a thread); returns how many were answered before the first one that was not, or the deadline."""
    answered = 0
    for i in range(count):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET http://unmapped-%d.internal/path HTTP/1.1\r\nHost: unmapped-%d.internal\r\n"
                             b"Connection: close\r\n\r\n" % (i, i))
                if not sock.recv(64).startswith(b"HTTP/1.1 503"):
                    break
        except OSError:
            break
        answered += 1
    return answered


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@inlineCallbacks
def stopped_cleanly(child: Unread, read_end: int) -> Any:
    """SIGTERM ``child`` (whose output went to the pipe ``read_end`` reads), check that it exits with status 0
    within 10 s, and return the lines the pipe holds."""
    os.kill(child.transport.pid, signal.SIGTERM)  # type: ignore[attr-defined]
    stopping = reactor.seconds()
    ended = yield child.ended
    assert reactor.seconds() - stopping < 10
    assert ended.exitCode == 0 and ended.signal is None
    os.set_blocking(read_end, False)
    return os.read(read_end, 1 << 20).split(b"\n")


class Collect(Unread):
    """A child whose output this test does read."""

    def __init__(self) -> None:
        super().__init__()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data[-65536:]

    errReceived = outReceived


#: The two ways the contract names to run the proxy. ``twist`` builds its own (blocking) log observer unless
#: connproxy hands it the configured one (``connproxy.obs.logs.use_twist_options``).
RUNNERS = {"twistd": ["twistd", "-n"], "twist": ["twist"]}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest_twisted.inlineCallbacks
def test_unread_stdout_does_not_stop_the_proxy(tmp_path: Path, runner: str) -> Any:
    read_end, write_end = os.pipe()
    env = {**os.environ, "CONNPROXY_STATE_DIR": str(tmp_path / "state")}
    blocked, other = Unread(), Collect()
    ports = [free_port(), free_port()]
    try:
        # Two proxies in the same working directory, without --pidfile: no "Another twistd server is running".
        for n, (child, port) in enumerate(zip((blocked, other), ports, strict=True)):
            command = RUNNERS[runner]
            args = [str(BIN / command[0]), *command[1:], "connproxy", "--config",
                    str(proxy_config(tmp_path, port, f"p{n}"))]
            fds: dict[int, Any] = {0: "w", 1: write_end, 2: write_end} if child is blocked else {0: "w", 1: "r", 2: "r"}
            reactor.spawnProcess(child, args[0], args, env=env, path=str(tmp_path), childFDs=fds)
        yield wait_for(lambda: all(accepts(p) for p in ports), timeout=30)
        assert not (tmp_path / "twistd.pid").exists()
        answered = yield deferToThread(refused_requests, ports[0], REQUESTS, time.monotonic() + 120)
        assert answered == REQUESTS
        lines = yield stopped_cleanly(blocked, read_end)
        # What reached the pipe is whole lines of the log, in the configured (console) format, with no log file.
        assert len(lines) > 100 and b"failed: no connector" in lines[-2]
        assert all(line.startswith((b"20", b"\t")) for line in lines[:-1])
        assert not list(tmp_path.glob("*.log"))
        # The other process, started in the same folder, was not disturbed.
        assert (yield deferToThread(refused_requests, ports[1], 3, time.monotonic() + 30)) == 3
        assert b"Another twistd server" not in other.output
    finally:
        for child in (blocked, other):
            if child.transport.pid is not None:  # type: ignore[attr-defined]
                os.kill(child.transport.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        os.close(write_end)
        os.close(read_end)
        yield blocked.ended
        yield other.ended


def denied_connects(port: int, count: int, deadline: float) -> int:
    """``count`` SOCKS5 CONNECTs (no authentication) to a target the connector's access control denies, one
    connection each (blocking: run it in a thread); returns how many got reply ``0x02`` before the first that
    did not, or the deadline."""
    host = b"denied.internal"
    request = b"\x05\x01\x00\x03" + bytes([len(host)]) + host + (9).to_bytes(2, "big")
    answered = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"\x05\x01\x00")
                if sock.recv(2) != b"\x05\x00":
                    break
                sock.sendall(request)
                if sock.recv(10)[:2] != b"\x05\x02":
                    break
        except OSError:
            break
        answered += 1
    return answered


@pytest_twisted.inlineCallbacks
def test_unread_stdout_does_not_stop_the_connector(stack: Stack) -> Any:
    """Each denied CONNECT makes the connector write an audit line and a log line (~700 bytes): 600 of them fill
    an unread pipe many times over."""
    stack.start_proxy()
    assert stack.proxy is not None
    read_end, write_end = os.pipe()
    config = connector_config(stack, [tcp_rule("allowed.internal", 1, free_port())])
    child = Unread()
    args = [str(BIN / "twistd"), "-n", "connproxy-connector", "--config", str(config)]
    env = {**os.environ, "CONNPROXY_STATE_DIR": str(stack.tmp / "state")}
    reactor.spawnProcess(child, args[0], args, env=env, path=str(stack.tmp),
                         childFDs={0: "w", 1: write_end, 2: write_end})
    try:
        yield wait_for(lambda: stack.proxy is not None and stack.proxy.registry.count() == 1, timeout=30)
        answered = yield deferToThread(denied_connects, stack.socks_port, REQUESTS, time.monotonic() + 120)
        assert answered == REQUESTS
        lines = yield stopped_cleanly(child, read_end)
        assert len(lines) > 100 and any(b"[AUDIT-EVENT]" in line and b"access denied" in line for line in lines)
        assert all(line.startswith((b"20", b"\t", b"[AUDIT-EVENT]")) for line in lines[:-1])
        assert not (stack.tmp / "twistd.pid").exists() and not list(stack.tmp.glob("*.log"))
    finally:
        if child.transport.pid is not None:  # type: ignore[attr-defined]
            os.kill(child.transport.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        os.close(write_end)
        os.close(read_end)
        yield child.ended


@pytest.mark.parametrize("role", ["connproxy", "connproxy-connector"])
@pytest_twisted.inlineCallbacks
def test_sigusr2_toggles_debug_in_both_processes(stack: Stack, role: str) -> Any:
    """SIGUSR2 switches the running process to ``debug`` and back, each switch said in a line (docs/logging.md),
    in the proxy and in the connector process (whose observer once had no reactor, so no handler)."""
    if role == "connproxy":
        config = proxy_config(stack.tmp, free_port(), "usr2")
    else:
        stack.start_proxy()
        config = connector_config(stack, [tcp_rule("allowed.internal", 1, free_port())])
    child = Collect()
    args = [str(BIN / "twistd"), "-n", role, "--config", str(config)]
    reactor.spawnProcess(child, args[0], args, env={**os.environ, "CONNPROXY_STATE_DIR": str(stack.tmp / "state")},
                         path=str(stack.tmp))
    try:
        # The handler is set once the reactor runs; the first lines after that: a listener, or the tunnel.
        yield wait_for(lambda: b"listening on" in child.output or b"tunnel established" in child.output, timeout=30)
        os.kill(child.transport.pid, signal.SIGUSR2)  # type: ignore[attr-defined]
        yield wait_for(lambda: b"log level is now debug (configured: info)" in child.output, timeout=10)
        os.kill(child.transport.pid, signal.SIGUSR2)  # type: ignore[attr-defined]
        yield wait_for(lambda: b"log level is now info (configured: info)" in child.output, timeout=10)
    finally:
        os.kill(child.transport.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        ended = yield child.ended
    assert ended.exitCode == 0, bytes(child.output[-2000:])
