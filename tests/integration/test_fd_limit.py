"""The proxy as a real ``twistd`` process under a small open-file limit (``ulimit -n 1024``, soft and hard): its
connection limits are fitted to the limit, each listener keeps its own share, and a flood of silent connections
to the HTTP proxy is answered 503 beyond its share, none dropped unanswered, while SOCKS5 keeps answering.

Every descriptor the flood would take past the limit would make ``accept()`` fail with EMFILE on every port at
once (Twisted's recovery then closes waiting connections without a byte): ``docs/client-connections.md``.
"""

from __future__ import annotations

import os
import resource
import selectors
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet.threads import deferToThread

from tests.harness import free_port, wait_for
from tests.integration.test_logging_process import accepts
from tests.integration.test_processes import Child, spawn

BIN = Path(sys.executable).parent
NOFILE = 1024
FLOOD = 1500


def flood(http_port: int, socks_port: int, count: int) -> dict[str, Any]:
    """Open ``count`` silent connections to the HTTP proxy, then sort them after a second: held open, answered
    503, or closed without a byte; then try a SOCKS5 greeting (blocking: run it in a thread)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", http_port), timeout=10))
        time.sleep(1.0)
        selector = selectors.DefaultSelector()
        for sock in held:
            selector.register(sock, selectors.EVENT_READ)
        ready = {key.fileobj for key, _ in selector.select(0)}
        result = {"held": 0, "503": 0, "dropped": 0}
        for sock in held:
            if sock not in ready:
                result["held"] += 1
                continue
            try:
                data = sock.recv(64)
            except ConnectionResetError:
                data = b""
            result["503" if data.startswith(b"HTTP/1.1 503") else "dropped"] += 1
        with socket.create_connection(("127.0.0.1", socks_port), timeout=5) as probe:
            probe.sendall(b"\x05\x01\x00")
            result["socks5"] = probe.recv(2)
        return result
    finally:
        for sock in held:
            sock.close()


@pytest_twisted.inlineCallbacks
def test_a_flood_under_a_small_open_file_limit(tmp_path: Path) -> Any:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"this test's client needs {FLOOD + 200} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    http_port, socks_port = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "tenantMode": "dedicated", "subaccountId": "tenant-a",
        "servers": {
            "businessDataTunnel": {"port": free_port(), "bindAddress": "127.0.0.1"},
            "proxy": {"http": {"port": http_port, "enableProxyAuthorization": False, "allowRemoteConnections": False},
                      "socks5": {"port": socks_port, "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False}},
        },
        "metrics": {"prometheus": {"enabled": False}},
    }))
    twistd = shlex.join([str(BIN / "twistd"), "-n", "connproxy", "--config", str(config)])
    child: Child = spawn(["/bin/sh", "-c", f"ulimit -n {NOFILE} && ulimit -Hn {NOFILE} && exec {twistd}"],
                         env={"CONNPROXY_STATE_DIR": str(tmp_path / "state")})
    try:
        yield wait_for(lambda: accepts(http_port) and accepts(socks_port), timeout=30)
        result = yield deferToThread(flood, http_port, socks_port, FLOOD)
        # (1024 - 64 reserved) / 3 listeners at their 10,000 default: 320 each; the rest answered, none dropped.
        assert result == {"held": 320, "503": FLOOD - 320, "dropped": 0, "socks5": b"\x05\x00"}, result
        assert b"the open-file limit (1024) cannot hold the configured connection limits" in child.output
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if child.transport.pid is not None:  # type: ignore[attr-defined]
            os.kill(child.transport.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        yield child.ended
