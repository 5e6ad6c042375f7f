"""Memory per idle stream: open ``--streams`` SOCKS5 connections through proxy -> tunnel -> connector -> backend
and leave them idle; report the RSS growth of the proxy and of the connector per stream.

For comparison, OpenSSH's reverse tunnel holds about 67 KiB per idle forwarded connection on this machine
(the project's measurement). Bounded: a fixed number of connections, a timeout on every wait.

    .venv/bin/python bench/idle_streams.py --streams 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import mint, proxy_and_connector, vm_rss_mib, write_configs
from tcp_throughput import socks_connect


def holding_backend(held: list[socket.socket], limit: int) -> int:
    """Accept up to ``limit`` connections on 127.0.0.1 and keep them open without reading; return the port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.settimeout(120)

    def accept() -> None:
        with listener:
            while len(held) < limit:
                conn, _ = listener.accept()
                held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def settle(pid: int, seconds: float = 1.5) -> float:
    time.sleep(seconds)
    return vm_rss_mib(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--json")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.streams + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-idle-bench-"))
    mint(tmp)
    held: list[socket.socket] = []
    port = holding_backend(held, args.streams)
    ports = write_configs(tmp, [{"virtualHost": "idle.internal", "virtualPort": 1, "internalHost": "127.0.0.1",
                                 "internalPort": port, "protocol": "TCP"}])
    clients: list[socket.socket] = []
    results: dict[str, object] = {"streams": args.streams}
    with proxy_and_connector(tmp) as (proxy, connector):
        # Warm up (first stream, code paths, allocator) before the baseline.
        clients.append(socks_connect(ports["socks"], "idle.internal", 1))
        base_proxy, base_connector = settle(proxy.pid), vm_rss_mib(connector.pid)
        deadline = time.monotonic() + 300
        while len(clients) < args.streams and time.monotonic() < deadline:
            clients.append(socks_connect(ports["socks"], "idle.internal", 1))
        opened = len(clients) - 1
        proxy_rss, connector_rss = settle(proxy.pid, 3), vm_rss_mib(connector.pid)
        results["proxy_rss_MiB"] = [base_proxy, proxy_rss]
        results["connector_rss_MiB"] = [base_connector, connector_rss]
        results["proxy_KiB_per_stream"] = round((proxy_rss - base_proxy) * 1024 / opened, 1)
        results["connector_KiB_per_stream"] = round((connector_rss - base_connector) * 1024 / opened, 1)
        for c in clients:
            c.close()
    for c in held:
        c.close()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
