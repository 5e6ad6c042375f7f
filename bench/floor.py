"""The floor under connproxy's figures: what a bare Twisted relay costs on this machine.

``bench/run.py`` compares connproxy with OpenSSH. This script measures the third corner the issue names ("a plain
Twisted TLS relay between two Python processes ... the gap is design, not language"): two ``python`` processes
relaying bytes with nothing else, so that the closing figures can say how much of connproxy's cost is Python,
Twisted and pyOpenSSL, and how much is connproxy's own work (the tunnel's frames and flow control, HTTP parsing,
streams, access decisions, audit events).

* ``entry`` accepts the client's TCP connection and opens one connection to ``exit`` for it; ``exit`` connects to
  the backend. Bytes are relayed both ways with Twisted's producer/consumer backpressure and TCP_NODELAY, as in
  ``twisted.protocols.portforward``. Between the two: TLS (server certificate from ``connproxy certs init``, no
  client certificate) for the keep-alive and bulk scenarios, plain TCP for new connections (a TLS handshake per
  connection would measure key exchange, which connproxy's multiplexed tunnel does once).
* Scenarios, as ``bench/run.py`` runs them against the same backends: ``http_rps`` (wrk ``-t2 -c50``, 1 KiB GETs
  to nginx, keep-alive), ``cps`` (16 client threads, a new connection per tiny GET), ``bulk`` (1 GiB download
  from a source backend); CPU seconds of both relay processes from ``/proc``.

Usage::

    .venv/bin/python bench/floor.py                # about 50 s; needs nginx (and wrk for http_rps)
    .venv/bin/python bench/floor.py --smoke        # seconds, one round, tiny sizes, no timing claims (CI)

Nothing is installed; the results go to ``bench/results/floor-<time>.json``. Only 127.0.0.1 is used, and every
loop is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    cpu_seconds,
    download,
    free_port,
    mint,
    new_connections_per_second,
    nginx,
    parse_size,
    source_backend,
    stop,
    wait_port,
)

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------ the relay


def relay(role: str, maps: list[tuple[int, int, str]], pki: Path) -> None:
    """Run one relay process: for each ``(listen port, target port, kind)`` accept on 127.0.0.1 and relay to
    the target (``kind``: ``tls-out`` connects with TLS, ``tls-in`` accepts TLS, ``plain`` neither)."""
    from twisted.internet import reactor, ssl
    from twisted.internet.endpoints import (
        SSL4ClientEndpoint,
        SSL4ServerEndpoint,
        TCP4ClientEndpoint,
        TCP4ServerEndpoint,
    )
    from twisted.internet.protocol import Factory, Protocol

    class Pipe(Protocol):
        peer: Pipe | None = None

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            if self.peer is not None and self.peer.transport is not None:  # else the other side is gone
                self.peer.transport.write(data)

        def connectionLost(self, reason: Any = None) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.loseConnection()
                self.peer.peer = None
            self.peer = None

    def wire(a: Pipe, b: Pipe) -> None:
        a.peer, b.peer = b, a
        a.transport.registerProducer(b.transport, True)  # type: ignore[union-attr]
        b.transport.registerProducer(a.transport, True)  # type: ignore[union-attr]

    class Inbound(Pipe):
        target: Any = None

        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.pauseProducing()  # type: ignore[union-attr]
            out = Pipe()
            d = self.target.connect(Factory.forProtocol(lambda: out))

            def connected(_p: Any) -> None:
                if self.transport is None or not self.connected:
                    out.transport.loseConnection()  # type: ignore[union-attr]
                    return
                wire(self, out)
                self.transport.resumeProducing()  # type: ignore[attr-defined]

            d.addCallbacks(connected, lambda _f: self.transport.loseConnection())  # type: ignore[union-attr]

    ca = ssl.Certificate.loadPEM((pki / "ca.crt").read_bytes())
    server = ssl.PrivateCertificate.loadPEM((pki / "proxy.crt").read_bytes() + (pki / "proxy.key").read_bytes())
    for listen, target, kind in maps:
        if kind == "tls-out":
            out_endpoint: Any = SSL4ClientEndpoint(reactor, "127.0.0.1", target,
                                                   ssl.optionsForClientTLS("localhost", trustRoot=ca))
        else:
            out_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", target)
        handler = type("Bound", (Inbound,), {"target": out_endpoint})
        if kind == "tls-in":
            listener: Any = SSL4ServerEndpoint(reactor, listen, server.options(), backlog=4096,
                                               interface="127.0.0.1")
        else:
            listener = TCP4ServerEndpoint(reactor, listen, backlog=4096, interface="127.0.0.1")
        listener.listen(Factory.forProtocol(handler))
    reactor.run()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ scenarios


def wrk(port: int, seconds: int, connections: int) -> tuple[float, int, str]:
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", f"http://127.0.0.1:{port}/1k"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit("floor: wrk saw errors:\n" + out)
    return float(rps.group(1)) if rps else 0.0, int(total.group(1)) if total else 0, out


def tcp_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", default="1GiB", help="bytes downloaded through the TLS relay (default 1GiB)")
    parser.add_argument("--seconds", type=int, default=8, help="wrk's duration (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each scenario; medians (default 3)")
    parser.add_argument("--smoke", action="store_true", help="seconds: one round, tiny sizes (for CI)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--map", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:  # a relay process
        maps = [(int(a), int(b), kind) for a, b, kind in (m.split(":") for m in args.map)]
        relay(args.role, maps, Path(args.pki))
        return
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        message = "floor: missing nginx (apt-get install nginx-light); nothing measured"
        if args.smoke:  # as bench/run.py: a missing tool skips what needs it, it does not fail the test run
            print(message)
            return
        raise SystemExit(message)
    has_wrk = shutil.which("wrk") is not None
    if not has_wrk:
        print("floor: missing wrk (apt-get install wrk): http_rps skipped")
    if args.smoke:
        args.bulk, args.seconds, args.rounds = "8MiB", 1, 1
    cps_seconds = 0.5 if args.smoke else 4.0
    total = parse_size(args.bulk)
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-floor-"))
    tmp.chmod(0o755)  # nginx's workers run unprivileged and must pass through it to www/
    mint(tmp)
    source = source_backend()
    with nginx(tmp / "nginx") as web:
        ports = {name: free_port() for name in ("web_in", "web_tls", "bulk_in", "bulk_tls", "cps_in", "cps_mid")}
        exit_maps = [f"{ports['web_tls']}:{web}:tls-in", f"{ports['bulk_tls']}:{source}:tls-in",
                     f"{ports['cps_mid']}:{web}:plain"]
        entry_maps = [f"{ports['web_in']}:{ports['web_tls']}:tls-out", f"{ports['bulk_in']}:{ports['bulk_tls']}:tls-out",
                      f"{ports['cps_in']}:{ports['cps_mid']}:plain"]
        children = {
            role: subprocess.Popen([sys.executable, __file__, "--role", role, "--pki", str(tmp),
                                    *[a for m in maps for a in ("--map", m)]])
            for role, maps in (("exit", exit_maps), ("entry", entry_maps))
        }
        try:
            for name in ("web_tls", "bulk_tls", "cps_mid", "web_in", "bulk_in", "cps_in"):
                wait_port(ports[name])
            runs: list[dict[str, float]] = []
            for round_no in range(args.rounds):
                run: dict[str, float] = {}
                if has_wrk:
                    before = {role: cpu_seconds(p.pid) for role, p in children.items()}
                    run["requests_per_s"], requests, _out = wrk(ports["web_in"], args.seconds, 50)
                    after = {role: cpu_seconds(p.pid) for role, p in children.items()}
                    for role in children:
                        run[f"cpu_us_per_request_{role}"] = (after[role] - before[role]) * 1e6 / max(requests, 1)
                run["connections_per_s"], errors = new_connections_per_second(
                    lambda: tcp_connect(ports["cps_in"]), "backend", cps_seconds, 16)
                if errors:
                    raise SystemExit(f"floor: {errors} new connections through the relay failed")
                before = {role: cpu_seconds(p.pid) for role, p in children.items()}
                sock = socket.create_connection(("127.0.0.1", ports["bulk_in"]), timeout=60)
                seconds = download(sock, total)
                after = {role: cpu_seconds(p.pid) for role, p in children.items()}
                run["bulk_download_MBps"] = total / seconds / 1e6
                for role in children:
                    run[f"cpu_s_per_GiB_{role}"] = (after[role] - before[role]) * (1 << 30) / total
                print(f"round {round_no + 1}/{args.rounds}: " + " ".join(f"{k}={v:.6g}" for k, v in run.items()),
                      flush=True)
                runs.append(run)
        finally:
            for child in children.values():
                stop(child, 10)
    medians = {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
    print("\nbare Twisted relay (two processes), medians of", len(runs), "rounds:")
    for key, value in medians.items():
        print(f"  {key:32} {value:12.6g}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"floor-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({"runs": runs, "medians": medians, "bulk_bytes": total, "wrk_seconds": args.seconds},
                              indent=2))
    print("all runs:", out)


if __name__ == "__main__":
    main()
