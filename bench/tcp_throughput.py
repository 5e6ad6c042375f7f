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
import socket
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure, mint, one_shot_backend, parse_size, proxy_and_connector, vm_hwm_mib, write_configs


def socks_connect(port: int, host: str, target_port: int) -> socket.socket:
    """A SOCKS5 CONNECT (method 0x00) through the proxy."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise SystemExit("SOCKS5 method negotiation failed")
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack(">H", target_port))
    reply = s.recv(10)
    if reply[1] != 0:
        raise SystemExit(f"SOCKS5 reply {reply[1]:#04x}")
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", type=parse_size)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    total: int = args.size
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-bench-"))
    mint(tmp)
    ports = {kind: one_shot_backend(kind, total) for kind in ("sink", "source")}
    proxy_ports = write_configs(tmp, [
        {"virtualHost": f"{kind}.internal", "virtualPort": 9, "internalHost": "127.0.0.1",
         "internalPort": port, "protocol": "TCP"} for kind, port in ports.items()
    ])
    results: dict[str, object] = {"bytes": total}
    with proxy_and_connector(tmp) as (proxy, connector):
        for kind, label in (("sink", "upload_MBps"), ("source", "download_MBps")):
            results[label] = measure(kind, socks_connect(proxy_ports["socks"], f"{kind}.internal", 9), total)
        results["proxy_peak_rss_MiB"] = vm_hwm_mib(proxy.pid)
        results["connector_peak_rss_MiB"] = vm_hwm_mib(connector.pid)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
