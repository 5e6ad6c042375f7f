"""Shared pieces of the benchmarks: certificates, configs and child processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a process, in MiB (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def vm_rss_mib(pid: int) -> float:
    """Current resident set size of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def mint(tmp: Path, subaccount: str = "bench") -> None:
    """A CA, the proxy's certificate and a connector certificate in ``tmp``."""
    subprocess.run([str(BIN / "connproxy"), "certs", "init", "--dir", str(tmp), "--host", "localhost"],
                   check=True, capture_output=True)
    subprocess.run([str(BIN / "connproxy"), "certs", "connector", "--dir", str(tmp), "--subaccount", subaccount,
                    "--out", str(tmp / "connector")], check=True, capture_output=True)


def write_configs(tmp: Path, access: list[dict[str, Any]], *, http: bool = False,
                  subaccount: str = "bench") -> dict[str, int]:
    """Proxy and connector configuration files; returns the chosen ports."""
    ports = {"tunnel": free_port(), "socks": free_port(), "http": free_port()}
    (tmp / "proxy.yaml").write_text(yaml.safe_dump({
        "tenantMode": "dedicated", "subaccountId": subaccount,
        "servers": {
            "businessDataTunnel": {"port": ports["tunnel"], "bindAddress": "127.0.0.1",
                                   "tls": {"certFile": "proxy.crt", "keyFile": "proxy.key", "clientCaFile": "ca.crt"}},
            "proxy": {"http": {"enabled": http, "port": ports["http"], "enableProxyAuthorization": False,
                               "allowRemoteConnections": False},
                      "socks5": {"port": ports["socks"], "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False}},
        },
        "metrics": {"prometheus": {"enabled": False}},
    }))
    (tmp / "connector.yaml").write_text(yaml.safe_dump({
        "subaccountId": subaccount, "connectorId": "bench",
        "proxy": {"host": "localhost", "port": ports["tunnel"]},
        "tls": {"certFile": "connector.crt", "keyFile": "connector.key", "caFile": "ca.crt"},
        "accessControl": access,
    }))
    return ports


@contextmanager
def proxy_and_connector(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """Run ``twistd -n connproxy`` and ``twistd -n connproxy-connector`` from ``tmp``; SIGTERM them at the end."""
    env = {**os.environ, "CONNPROXY_STATE_DIR": str(tmp / "state")}
    common = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile"]
    proxy = subprocess.Popen([*common, str(tmp / "proxy.log"), "connproxy", "--config", str(tmp / "proxy.yaml")],
                             env=env, stdout=subprocess.DEVNULL)
    connector = subprocess.Popen([*common, str(tmp / "connector.log"), "connproxy-connector", "--config",
                                  str(tmp / "connector.yaml")], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while b"registered for subaccount" not in _read(tmp / "proxy.log"):
            if time.monotonic() > deadline or proxy.poll() is not None or connector.poll() is not None:
                raise SystemExit("proxy and connector did not come up in 30 s; see " + str(tmp))
            time.sleep(0.1)
        yield proxy, connector
    finally:
        for child in (connector, proxy):
            child.send_signal(signal.SIGTERM)
        for child in (connector, proxy):
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


CHUNK = 1 << 20


def parse_size(text: str) -> int:
    """``1GiB``, ``64MiB``, ``512KiB`` or a plain number of bytes."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def send_all(sock: socket.socket, total: int) -> None:
    """Send ``total`` pseudo-random bytes."""
    block = memoryview(os.urandom(CHUNK))
    left = total
    while left:
        n = min(left, CHUNK)
        sock.sendall(block[:n])
        left -= n


def receive_all(sock: socket.socket) -> int:
    """Read until EOF; return the byte count."""
    buf = bytearray(CHUNK)
    got = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return got
        got += n


def one_shot_backend(kind: str, total: int) -> int:
    """Start a one-connection backend thread on 127.0.0.1 and return its port.

    ``sink`` counts what it receives and answers the count (8 bytes, big-endian); ``source`` sends ``total``
    bytes and half-closes. The listener gives up after 60 s without a connection.
    """
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(60)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(120)
                if kind == "sink":
                    conn.sendall(struct.pack(">Q", receive_all(conn)))
                else:
                    send_all(conn, total)
                    conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def measure(kind: str, sock: socket.socket, total: int) -> float:
    """Upload to a sink or download from a source through ``sock``; return MB/s (checked byte counts)."""
    import struct

    start = time.perf_counter()
    if kind == "sink":
        send_all(sock, total)
        sock.shutdown(socket.SHUT_WR)
        count = struct.unpack(">Q", sock.recv(8))[0]
    else:
        count = receive_all(sock)
    elapsed = time.perf_counter() - start
    sock.close()
    if count != total:
        raise SystemExit(f"{kind}: moved {count} bytes, expected {total}")
    return round(total / elapsed / 1e6, 1)
