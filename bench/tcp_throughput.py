"""Bulk throughput through SOCKS5 -> proxy -> tunnel -> connector -> backend, with real processes.

Runs ``twistd -n connproxy`` and ``twistd -n connproxy-connector`` as child processes on 127.0.0.1 with freshly
minted certificates, pushes ``--size`` bytes through a SOCKS5 connection to a sink backend (upload) and pulls the
same amount from a source backend (download), and reports MB/s and the peak RSS (VmHWM) of the proxy and the
connector. Everything is bounded: one transfer each way, a timeout on every wait.

    .venv/bin/python bench/tcp_throughput.py --size 1GiB
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import vm_hwm_mib

BIN = Path(sys.executable).parent
CHUNK = 1 << 20


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend(kind: str, total: int, ready: threading.Event, port_box: list[int], result: dict[str, float]) -> None:
    """A one-shot sink (counts what it receives) or source (sends ``total`` bytes), on 127.0.0.1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(60)
        port_box.append(listener.getsockname()[1])
        ready.set()
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(120)
            if kind == "sink":
                buf = bytearray(CHUNK)
                got = 0
                while True:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got += n
                result["backend_bytes"] = got
                conn.sendall(struct.pack(">Q", got))
            else:
                block = memoryview(os.urandom(CHUNK))
                left = total
                while left:
                    n = min(left, CHUNK)
                    conn.sendall(block[:n])
                    left -= n
                conn.shutdown(socket.SHUT_WR)


def socks_connect(port: int, host: str, target_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack(">H", target_port))
    reply = s.recv(10)
    if reply[1] != 0:
        s.close()
        raise ConnectionError(f"SOCKS5 reply {reply[1]:#04x}")
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", type=parse_size)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    total: int = args.size
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-bench-"))
    subprocess.run([str(BIN / "connproxy"), "certs", "init", "--dir", str(tmp), "--host", "localhost"],
                   check=True, capture_output=True)
    subprocess.run([str(BIN / "connproxy"), "certs", "connector", "--dir", str(tmp), "--subaccount", "bench",
                    "--out", str(tmp / "connector")], check=True, capture_output=True)
    tunnel_port, socks_port, http_port = free_port(), free_port(), free_port()
    (tmp / "proxy.yaml").write_text(yaml.safe_dump({
        "tenantMode": "dedicated", "subaccountId": "bench",
        "servers": {
            "businessDataTunnel": {"port": tunnel_port, "bindAddress": "127.0.0.1",
                                   "tls": {"certFile": "proxy.crt", "keyFile": "proxy.key", "clientCaFile": "ca.crt"}},
            "proxy": {"http": {"enabled": False, "port": http_port},
                      "socks5": {"port": socks_port, "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False}},
        },
        "metrics": {"prometheus": {"enabled": False}},
    }))
    sink_ready, source_ready = threading.Event(), threading.Event()
    sink_port: list[int] = []
    source_port: list[int] = []
    sink_result: dict[str, float] = {}
    threading.Thread(target=backend, args=("sink", total, sink_ready, sink_port, sink_result), daemon=True).start()
    threading.Thread(target=backend, args=("source", total, source_ready, source_port, {}), daemon=True).start()
    sink_ready.wait(10)
    source_ready.wait(10)
    (tmp / "connector.yaml").write_text(yaml.safe_dump({
        "subaccountId": "bench", "connectorId": "bench",
        "proxy": {"host": "localhost", "port": tunnel_port},
        "tls": {"certFile": "connector.crt", "keyFile": "connector.key", "caFile": "ca.crt"},
        "accessControl": [
            {"virtualHost": "sink.internal", "virtualPort": 9, "internalHost": "127.0.0.1",
             "internalPort": sink_port[0], "protocol": "TCP"},
            {"virtualHost": "source.internal", "virtualPort": 19, "internalHost": "127.0.0.1",
             "internalPort": source_port[0], "protocol": "TCP"},
        ],
    }))
    env = {**os.environ, "CONNPROXY_STATE_DIR": str(tmp / "state")}
    common = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", ]
    proxy = subprocess.Popen([*common, str(tmp / "proxy.log"), "connproxy", "--config", str(tmp / "proxy.yaml")],
                             env=env, stdout=subprocess.DEVNULL)
    connector = subprocess.Popen([*common, str(tmp / "connector.log"), "connproxy-connector", "--config",
                                  str(tmp / "connector.yaml")], env=env, stdout=subprocess.DEVNULL)
    results: dict[str, object] = {"bytes": total}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = socks_connect(socks_port, "nothing.internal", 1)
                probe.close()
            except ConnectionError as e:
                if "0x02" in str(e):
                    break  # the connector answers: it is registered
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("proxy and connector did not come up in 30 s")
            time.sleep(0.2)

        s = socks_connect(socks_port, "sink.internal", 9)
        block = memoryview(os.urandom(CHUNK))
        start = time.perf_counter()
        left = total
        while left:
            n = min(left, CHUNK)
            s.sendall(block[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        count = struct.unpack(">Q", s.recv(8))[0]
        upload = time.perf_counter() - start
        s.close()
        assert count == total, (count, total)
        results["upload_MBps"] = round(total / upload / 1e6, 1)

        s = socks_connect(socks_port, "source.internal", 19)
        buf = bytearray(CHUNK)
        got = 0
        start = time.perf_counter()
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        download = time.perf_counter() - start
        s.close()
        assert got == total, (got, total)
        results["download_MBps"] = round(total / download / 1e6, 1)
        results["proxy_peak_rss_MiB"] = vm_hwm_mib(proxy.pid)
        results["connector_peak_rss_MiB"] = vm_hwm_mib(connector.pid)
    finally:
        for child in (connector, proxy):
            child.send_signal(signal.SIGTERM)
        for child in (connector, proxy):
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
