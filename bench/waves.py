"""Memory waves: repeated waves of hostile load against real ``twistd`` proxy and connector processes on
127.0.0.1; RSS (``VmRSS``) and open file descriptors of both sampled under load and after a settle period.

    .venv/bin/python bench/waves.py                       # 5 waves, the default load (a few minutes)
    .venv/bin/python bench/waves.py --waves 2 --hold 2    # quick look
    .venv/bin/python bench/waves.py --json waves.json     # also write the samples as JSON
    .venv/bin/python bench/waves.py --malloc-arena-max 0  # children without MALLOC_ARENA_MAX (glibc default)

One wave (every count bounded, every wait with a timeout):

* ``--downloads`` SOCKS5 streams that ask a source backend for ``--download-size`` bytes and never read;
* ``--uploads`` SOCKS5 streams that send to a backend that never reads, until their socket blocks (at most
  ``--upload-size`` each);
* one more tunnel from the connector certificate, beyond ``maxTunnelsPerIdentity`` (4 tunnels of that
  identity run already: the connector and three more connector processes with other connector ids); the
  GOAWAY code it gets is recorded;
* ``--handshakes`` TCP connections to the tunnel port that never send a byte (unfinished TLS handshakes);
* ``--idle-http`` TCP connections to the HTTP proxy that never send a request.

After ``--hold`` seconds the processes are sampled ("loaded"); then the streams' clients leave (the silent
connections are left for the proxy to close by its timeouts), and after ``--settle`` seconds the processes are
sampled again ("settled") and the silent connections the proxy closed are counted. Exit status 1 when a
process died or the settled RSS of the proxy grew by more than ``--max-growth-mib`` from the first wave to the
last (a ratchet).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BIN,
    TUNNEL_PORT_LIMITS,
    _read,
    connector_config,
    mint,
    parse_size,
    proxy_and_connector,
    raise_nofile,
    socks_connect,
    source_backend,
    stop,
    vm_rss_mib,
    write_configs,
)
from connproxy.config.model import TunnelListenerConfig  # noqa: E402
from connproxy.wire.errors import ErrorCode  # noqa: E402
from connproxy.wire.events import GoAwayReceived, HelloReceived  # noqa: E402
from connproxy.wire.session import Role, Session  # noqa: E402

TUNNEL_HANDSHAKE_TIMEOUT = 3.0
HTTP_HEADER_TIMEOUT = 5.0


# ------------------------------------------------------------------------------------------------ backends


class StallBackend:
    """Accepts connections and never reads from them; :meth:`drop` closes those accepted so far."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.port = int(self.listener.getsockname()[1])
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="stall-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.held.append(conn)

    def drop(self) -> None:
        with self.lock:
            held, self.held = self.held, []
        for conn in held:
            conn.close()


# ------------------------------------------------------------------------------------------------ sampling


def fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def sample(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, dict[str, float]]:
    """VmRSS (MiB) and open fds of each process."""
    return {name: {"rss_mib": round(vm_rss_mib(p.pid), 1), "fds": fds(p.pid)} for name, p in procs.items()}


# ------------------------------------------------------------------------------------------------ hostile clients


def stalled_downloads(socks_port: int, count: int, size: int) -> list[socket.socket]:
    """``count`` SOCKS5 streams asking the source backend for ``size`` bytes each, never reading."""
    socks = []
    for _ in range(count):
        s = socks_connect(socks_port, "source.internal", 2)
        s.sendall(size.to_bytes(8, "big"))
        socks.append(s)
    return socks


def stalled_uploads(socks_port: int, count: int, limit: int, seconds: float = 3.0) -> tuple[list[socket.socket], int]:
    """``count`` SOCKS5 streams to the never-reading backend, each fed until its socket blocks (at most ``limit``
    bytes, ``seconds`` in all); returns the sockets and the bytes the proxy took."""
    socks = [socks_connect(socks_port, "stall.internal", 1) for _ in range(count)]
    block = b"u" * 65536
    sent = [0] * count
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + seconds
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for i, s in enumerate(socks):
            if sent[i] >= limit:
                continue
            try:
                n = s.send(block[: limit - sent[i]])
            except (BlockingIOError, InterruptedError):
                continue
            sent[i] += n
            progress = progress or n > 0
        if not progress:
            time.sleep(0.2)  # the proxy may still be moving bytes: look again once
            progress = any(_writable(s) for s in socks)
    return socks, sum(sent)


def _writable(s: socket.socket) -> bool:
    import select

    _r, w, _x = select.select([], [s], [], 0)
    return bool(w)


def extra_tunnel(tmp: Path, tunnel_port: int, connector_id: str) -> str:
    """One more tunnel with the connector certificate: the GOAWAY code (or the HELLO) the proxy answers with."""
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    ctx.load_cert_chain(str(tmp / "connector.crt"), str(tmp / "connector.key"))
    ctx.set_alpn_protocols(["connproxy-tunnel/1"])
    session = Session(Role.DIALER)
    session.send_hello({"connector_id": connector_id, "subaccount": "bench", "location": ""})
    with socket.create_connection(("127.0.0.1", tunnel_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"".join(session.take_output()))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except (OSError, ssl.SSLError):
                break
            if not data:
                break
            for event in session.receive_data(data):
                if isinstance(event, GoAwayReceived):
                    return event.code.name
                if isinstance(event, HelloReceived):
                    return "ACCEPTED"
    return "NO_ANSWER"


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections to ``port`` that send nothing."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def closed_by_peer(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the peer closed (EOF or reset), without blocking."""
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(65536) == b"":
                closed += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed += 1
    return closed


def close_all(*groups: list[socket.socket]) -> None:
    for group in groups:
        for s in group:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            s.close()


# ------------------------------------------------------------------------------------------------ run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--downloads", type=int, default=50)
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--idle-http", type=int, default=200)
    parser.add_argument("--download-size", type=parse_size, default=parse_size("64MiB"))
    parser.add_argument("--upload-size", type=parse_size, default=parse_size("16MiB"))
    parser.add_argument("--hold", type=float, default=5.0, help="seconds under load before sampling")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after the clients left")
    parser.add_argument("--malloc-arena-max", type=int, default=2,
                        help="MALLOC_ARENA_MAX for the children (0: leave glibc's default)")
    parser.add_argument("--trim-seconds", type=float, default=None,
                        help="CONNPROXY_MALLOC_TRIM_SECONDS for the proxy (0: no malloc_trim; default: the proxy's)")
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    parser.add_argument("--json", help="write the samples to this file")
    args = parser.parse_args()
    if not 1 <= args.waves <= 50:
        parser.error("--waves must be 1..50")
    raise_nofile()
    if args.malloc_arena_max:
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    else:
        os.environ.pop("MALLOC_ARENA_MAX", None)

    if args.trim_seconds is not None:
        os.environ["CONNPROXY_MALLOC_TRIM_SECONDS"] = str(args.trim_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-waves-"))
    mint(tmp)
    stall = StallBackend()
    source = source_backend()
    access = [
        {"virtualHost": "stall.internal", "virtualPort": 1, "internalHost": "127.0.0.1", "internalPort": stall.port,
         "protocol": "TCP"},
        {"virtualHost": "source.internal", "virtualPort": 2, "internalHost": "127.0.0.1", "internalPort": source,
         "protocol": "TCP"},
    ]
    ports = write_configs(tmp, access)
    config = yaml.safe_load((tmp / "proxy.yaml").read_text())
    bdt = config["servers"]["businessDataTunnel"]
    for key in TUNNEL_PORT_LIMITS:  # raised for run.py's many_connectors; here the proxy's defaults are the point
        bdt.pop(key, None)
    bdt["handshakeTimeoutSeconds"] = TUNNEL_HANDSHAKE_TIMEOUT
    config["servers"]["proxy"]["clientConnection"]["handshakeTimeoutSeconds"] = HTTP_HEADER_TIMEOUT
    (tmp / "proxy.yaml").write_text(yaml.safe_dump(config))
    limit = TunnelListenerConfig.max_tunnels_per_identity  # the proxy's default

    rows: list[dict[str, Any]] = []
    extra: list[subprocess.Popen[bytes]] = []
    failed = False
    with proxy_and_connector(tmp) as (proxy, connector):
        env = {**os.environ, "CONNPROXY_STATE_DIR": str(tmp / "state")}
        for n in range(2, limit + 1):  # the identity's other tunnels: up to the limit
            path = tmp / f"connector-{n}.yaml"
            path.write_text(yaml.safe_dump(connector_config(tmp, ports["tunnel"], access, connector_id=f"bench-{n}")))
            with open(tmp / f"connector-{n}.log", "ab") as log:
                extra.append(subprocess.Popen(
                    [str(BIN / "twistd"), "-n", "--pidfile=", "connproxy-connector", "--config", str(path)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp))
        try:
            deadline = time.monotonic() + 60
            while _read(tmp / "proxy.log").count(b"registered for subaccount") < limit:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise SystemExit(f"the {limit} tunnels did not come up in 60 s; see {tmp}")
                time.sleep(0.1)
            procs = {"proxy": proxy, "connector": connector}
            base = sample(procs)
            rows.append({"wave": 0, "phase": "idle", **_flat(base)})
            print(_header(), flush=True)
            print(_row(rows[-1]), flush=True)
            for wave in range(1, args.waves + 1):
                started = time.monotonic()
                downloads = stalled_downloads(ports["socks"], args.downloads, args.download_size)
                uploads, uploaded = stalled_uploads(ports["socks"], args.uploads, args.upload_size)
                refusal = extra_tunnel(tmp, ports["tunnel"], f"intruder-{wave}")
                handshakes = silent_connections(ports["tunnel"], args.handshakes)
                idle = silent_connections(ports["http"], args.idle_http)
                time.sleep(max(0.0, args.hold - (time.monotonic() - started)))
                loaded = sample(procs)
                rows.append({"wave": wave, "phase": "loaded", **_flat(loaded), "fifth_tunnel": refusal,
                             "uploaded_mib": round(uploaded / 2**20, 1)})
                print(_row(rows[-1]), flush=True)
                close_all(downloads, uploads)
                stall.drop()
                time.sleep(args.settle)
                settled = sample(procs)
                rows.append({"wave": wave, "phase": "settled", **_flat(settled),
                             "handshakes_closed": closed_by_peer(handshakes), "idle_http_closed": closed_by_peer(idle)})
                print(_row(rows[-1]), flush=True)
                close_all(handshakes, idle)
                if any(p.poll() is not None for p in (proxy, connector, *extra)):
                    print("a process died; see", tmp, file=sys.stderr)
                    failed = True
                    break
        finally:
            for child in extra:
                stop(child)
    settled_rss = [r["proxy_rss_mib"] for r in rows if r["phase"] == "settled"]
    growth = settled_rss[-1] - settled_rss[0] if settled_rss else 0.0
    peak = max(r["proxy_rss_mib"] for r in rows)
    print(f"proxy RSS: idle {rows[0]['proxy_rss_mib']} MiB, peak {peak} MiB, settled first {settled_rss[:1]} "
          f"last {settled_rss[-1:]} MiB (growth {growth:+.1f} MiB over {len(settled_rss)} waves); "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}, "
          f"CONNPROXY_MALLOC_TRIM_SECONDS={os.environ.get('CONNPROXY_MALLOC_TRIM_SECONDS', 'unset')}")
    if growth > args.max_growth_mib:
        print(f"settled RSS grew by more than {args.max_growth_mib} MiB: a ratchet", file=sys.stderr)
        failed = True
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "growth_mib": growth, "peak_mib": peak}, indent=2))
    return 1 if failed else 0


def _flat(s: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{name}_{key}": value for name, values in s.items() for key, value in values.items()}


def _header() -> str:
    return (f"{'wave':>4} {'phase':<8} {'proxy RSS':>10} {'proxy fds':>9} {'conn RSS':>9} {'conn fds':>8}  notes")


def _row(r: dict[str, Any]) -> str:
    notes = []
    if "fifth_tunnel" in r:
        notes.append(f"5th tunnel: {r['fifth_tunnel']}, uploads took {r['uploaded_mib']} MiB")
    if "handshakes_closed" in r:
        notes.append(f"closed by the proxy: {r['handshakes_closed']} handshakes, {r['idle_http_closed']} idle HTTP")
    return (f"{r['wave']:>4} {r['phase']:<8} {r['proxy_rss_mib']:>8.1f}Mi {r['proxy_fds']:>9} "
            f"{r['connector_rss_mib']:>7.1f}Mi {r['connector_fds']:>8}  {'; '.join(notes)}")


if __name__ == "__main__":
    assert ErrorCode.TOO_MANY_TUNNELS  # the refusal the fifth tunnel is expected to get
    sys.exit(main())
