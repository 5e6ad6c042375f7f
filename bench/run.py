"""The connproxy benchmark: connproxy against OpenSSH's tunnel, on 127.0.0.1, in one command.

    .venv/bin/python bench/run.py            # everything, about 6 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # smaller sizes and counts, about 2 minutes
    .venv/bin/python bench/run.py --smoke    # seconds: tiny sizes, connproxy only, no timing claims (CI)
    .venv/bin/python bench/run.py --only latency,bulk_socks --rounds 5

connproxy runs as two ``twistd`` processes (proxy and connector, dedicated mode, TLS tunnel); OpenSSH as a
throwaway ``sshd`` on a high port with generated keys and one ``ssh`` client (``-D`` dynamic SOCKS5 and ``-R``
forwards, ``aes128-gcm@openssh.com``). Each scenario runs connproxy and ssh alternately (A B A B ...) for
``--rounds`` rounds; the summary prints medians and the ratio connproxy / ssh, and every run goes to
``bench/results/<time>.json``. Nothing is installed: missing tools (``sshd``, ``wrk``, ``nginx``) are named
with the command that installs them and their scenarios are skipped. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BIN,
    HttpReader,
    SshTunnel,
    connector_config,
    cpu_seconds,
    download,
    echo_server,
    http_backend,
    http_connect,
    metric,
    mint,
    new_connections_per_second,
    nginx,
    parse_size,
    proxy_and_connector,
    pss_kib,
    raise_nofile,
    sink_backend,
    socks_connect,
    source_backend,
    upload,
    vm_rss_mib,
    write_configs,
)

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30


@dataclass
class Sizes:
    """How big each scenario is (``--quick`` and ``--smoke`` shrink them)."""

    bulk: int = GIB
    wrk_seconds: int = 8
    wrk_connections: int = 50
    cps_seconds: float = 4.0
    cps_clients: int = 16
    latency_requests: int = 800
    idle_streams: int = 1000
    concurrent_streams: int = 10000
    connectors: int = 1000
    rounds: int = 3


QUICK = Sizes(bulk=256 << 20, wrk_seconds=5, cps_seconds=3.0, latency_requests=300, idle_streams=500,
              concurrent_streams=2000, connectors=200)
SMOKE = Sizes(bulk=1 << 20, wrk_seconds=1, wrk_connections=4, cps_seconds=0.5, cps_clients=2, latency_requests=20,
              idle_streams=20, concurrent_streams=50, connectors=3, rounds=1)


# ------------------------------------------------------------------------------------------------ systems


@dataclass
class System:
    """One system under test: where its SOCKS5 port and HTTP entry points are, and which processes it runs."""

    name: str
    socks_port: int
    socks_targets: dict[str, tuple[str, int]]
    #: key -> (port to connect to, request target, Host header): the HTTP proxy for connproxy, a forward for ssh.
    http_targets: dict[str, tuple[int, str, str]]
    pids: Callable[[], dict[str, list[int]]]
    connect_port: int | None = None  # connproxy's HTTP proxy (CONNECT)
    extra: dict[str, Any] = field(default_factory=dict)

    def socks(self, key: str) -> socket.socket:
        host, port = self.socks_targets[key]
        return socks_connect(self.socks_port, host, port)


def cpu_by_label(system: System) -> dict[str, float]:
    """CPU seconds so far of each process group of ``system``."""
    return {label: sum(_cpu(p) for p in pids) for label, pids in system.pids().items()}


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def pss_by_label(system: System) -> dict[str, float]:
    """PSS (KiB) of each process group of ``system``."""
    out: dict[str, float] = {}
    for label, pids in system.pids().items():
        total = 0.0
        for pid in pids:
            try:
                total += pss_kib(pid)
            except OSError:
                pass
        out[label] = total
    return out


# ------------------------------------------------------------------------------------------------ scenarios


def bulk_socks(system: System, sizes: Sizes) -> dict[str, float]:
    """1 GiB up and 1 GiB down through SOCKS5; MB/s each way and CPU seconds per GiB of each process."""
    before = cpu_by_label(system)
    up = upload(system.socks("sink"), sizes.bulk)
    down = download(system.socks("source"), sizes.bulk)
    after = cpu_by_label(system)
    moved = 2 * sizes.bulk / GIB
    result = {"upload_MBps": sizes.bulk / up / 1e6, "download_MBps": sizes.bulk / down / 1e6}
    for label in before:
        result[f"cpu_s_per_GiB_{label}"] = (after[label] - before[label]) / moved
    return result


def bulk_connect(system: System, sizes: Sizes) -> dict[str, float]:
    """1 GiB down through HTTP CONNECT (ssh has no CONNECT: its ``-D`` SOCKS5 path instead)."""
    before = cpu_by_label(system)
    if system.connect_port is not None:
        host, port = system.socks_targets["source"]
        sock = http_connect(system.connect_port, f"{host}:{port}")
    else:
        sock = system.socks("source")
    seconds = download(sock, sizes.bulk)
    after = cpu_by_label(system)
    result = {"download_MBps": sizes.bulk / seconds / 1e6}
    for label in before:
        result[f"cpu_s_per_GiB_{label}"] = (after[label] - before[label]) / (sizes.bulk / GIB)
    return result


def http_rps(system: System, sizes: Sizes) -> dict[str, float]:
    """wrk, 50 keep-alive connections, 1 KiB GETs to nginx: through the HTTP proxy (ssh: an ``-R`` forward)."""
    port, target, host = system.http_targets["web"]
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f'wrk.path = "{target}"\nwrk.headers["Host"] = "{host}"\n')
    before = cpu_by_label(system)
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(sizes.wrk_connections), "-d", f"{sizes.wrk_seconds}s", "-s", str(script),
         f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=sizes.wrk_seconds + 60).stdout
    after = cpu_by_label(system)
    script.unlink()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    requests = int(total.group(1)) if total else 0
    result = {
        "requests_per_s": float(rps.group(1)) if rps else 0.0,
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": float(sum(int(g) for g in errors.groups())) if errors else 0.0,
    }
    for label in before:
        result[f"cpu_ms_per_1k_requests_{label}"] = (after[label] - before[label]) * 1e6 / max(requests, 1)
    return result


def socks_cps(system: System, sizes: Sizes) -> dict[str, float]:
    """New SOCKS5 connections per second, each with one tiny GET (``Connection: close``), from 16 clients."""
    rate, errors = new_connections_per_second(lambda: system.socks("web"), system.socks_targets["web"][0],
                                              sizes.cps_seconds, sizes.cps_clients)
    return {"connections_per_s": rate, "errors": float(errors)}


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return p(0.50) * 1000, p(0.99) * 1000, ordered[-1] * 1000


POST_BODY = b"p" * 512


def _sequential(sock: socket.socket, target: str, host: str, count: int) -> dict[str, float]:
    """``count`` GETs, then ``count`` 512-byte POSTs (head, 1 ms pause, body) on one keep-alive connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = HttpReader(sock)
    get = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    post = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(POST_BODY)}\r\n\r\n".encode()
    out: dict[str, float] = {}
    for method in ("GET", "POST"):
        samples: list[float] = []
        after_body: list[float] = []
        for i in range(count + 5):
            start = time.perf_counter()
            if method == "GET":
                sock.sendall(get)
            else:
                sock.sendall(post)
                time.sleep(0.001)
                body_at = time.perf_counter()
                sock.sendall(POST_BODY)
            if reader.response() != 200:
                raise SystemExit(f"latency: {method} {target} failed")
            if i >= 5:  # the first few warm the path up
                end = time.perf_counter()
                samples.append(end - start)
                if method == "POST":
                    after_body.append(end - body_at)
        p50, p99, worst = _percentiles(samples)
        out[f"{method}_p50_ms"], out[f"{method}_p99_ms"], out[f"{method}_max_ms"] = p50, p99, worst
    # From the body's send to the answer: the POST without the client's own pause (which a loaded machine
    # stretches well past 1 ms).
    out["POST_after_body_p50_ms"], out["POST_after_body_p99_ms"], _ = _percentiles(after_body)
    sock.close()
    return out


def latency(system: System, sizes: Sizes) -> dict[str, float]:
    """Sequential GET and POST latency on one keep-alive client: through the HTTP proxy (ssh: an ``-R``
    forward), through SOCKS5, and (beside, for reference) straight to the backend."""
    result: dict[str, float] = {}
    port, target, host = system.http_targets["lat"]
    plain = socket.create_connection(("127.0.0.1", port), timeout=30)
    for key, value in _sequential(plain, target, host, sizes.latency_requests).items():
        result[f"http_{key}"] = value
    socks_host = system.socks_targets["lat"][0]
    for key, value in _sequential(system.socks("lat"), "/x", socks_host, sizes.latency_requests).items():
        result[f"socks_{key}"] = value
    direct = socket.create_connection(("127.0.0.1", system.extra["lat_backend"]), timeout=30)
    for key, value in _sequential(direct, "/x", "backend", sizes.latency_requests).items():
        result[f"direct_{key}"] = value
    return result


def idle(system: System, sizes: Sizes) -> dict[str, float]:
    """PSS growth per idle SOCKS5 stream (to an echo backend) in each process. The streams stay open across the
    rounds (each round adds ``idle_streams`` more), so every round measures memory the processes had not yet
    allocated; they are closed after the last round."""
    held: list[socket.socket] = system.extra.setdefault("idle_held", [])
    if not held:
        held.append(system.socks("echo"))  # warm-up: code paths and the first allocations
    time.sleep(1.0)
    before = pss_by_label(system)
    deadline = time.monotonic() + 300
    opened = 0
    while opened < sizes.idle_streams and time.monotonic() < deadline:
        held.append(system.socks("echo"))
        opened += 1
    time.sleep(1.5)
    after = pss_by_label(system)
    result = {f"KiB_per_stream_{label}": (after[label] - before[label]) / opened for label in before}
    result["KiB_per_stream_total"] = sum(after.values()) / opened - sum(before.values()) / opened
    result["streams_open"] = float(len(held))
    return result


def close_idle(system: System) -> None:
    for s in system.extra.pop("idle_held", []):
        s.close()


def concurrent_streams(system: System, sizes: Sizes) -> dict[str, float]:
    """``concurrent_streams`` SOCKS5 streams open at once over the one tunnel, each echoing one byte."""
    import selectors

    count = sizes.concurrent_streams
    socks: list[socket.socket] = []
    lock = threading.Lock()
    failures: list[str] = []
    start = time.monotonic()

    def opener(n: int) -> None:
        for _ in range(n):
            try:
                s = system.socks("echo")
            except OSError as e:
                with lock:
                    failures.append(str(e))
                continue
            with lock:
                socks.append(s)

    per, extra = divmod(count, 16)
    threads = [threading.Thread(target=opener, args=(per + (i < extra),), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    opened_s = time.monotonic() - start
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        s.send(b"e")
        sel.register(s, selectors.EVENT_READ)
    echoed = 0
    deadline = time.monotonic() + 120
    while echoed < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            sock: Any = key.fileobj
            if sock.recv(1) == b"e":
                echoed += 1
            sel.unregister(sock)
    memory = {f"rss_MiB_{label}": sum(vm_rss_mib(p) for p in pids) for label, pids in system.pids().items()}
    for s in socks:
        s.close()
    return {"streams": float(count), "opened": float(len(socks)), "echoed": float(echoed),
            "errors": float(len(failures) + len(socks) - echoed), "open_seconds": opened_s, **memory}


def many_connectors(system: System, sizes: Sizes) -> dict[str, float]:
    """``connectors`` connectors (one process, one location ID each) on the one proxy; a request through a
    sample of them."""
    tmp: Path = system.extra["tmp"]
    spec = tmp / "connectors.json"
    config = connector_config(tmp, system.extra["tunnel_port"], [system.extra["lat_rule"]])
    spec.write_text(json.dumps({"count": sizes.connectors, "config": config}))
    metrics_port = system.extra["metrics_port"]
    base = metric(metrics_port, "connectivity_business_data_tunnels_count") or 0.0
    child = subprocess.Popen([sys.executable, str(Path(__file__).parent / "connectors.py"), str(spec)],
                             stdout=subprocess.DEVNULL,  # audit lines
                             stderr=open(tmp / "connectors.log", "wb"))
    start = time.monotonic()
    up = 0.0
    try:
        deadline = start + 300
        while time.monotonic() < deadline and child.poll() is None:
            up = (metric(metrics_port, "connectivity_business_data_tunnels_count") or 0.0) - base
            if up >= sizes.connectors:
                break
            time.sleep(0.5)
        up_seconds = time.monotonic() - start
        port, target, host = system.http_targets["lat"]
        sample = sorted({0, sizes.connectors - 1, *range(0, sizes.connectors, max(1, sizes.connectors // 20))})
        ok = 0
        for i in sample:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nSAP-Connectivity-SCC-Location_ID: loc-{i}\r\n"
                          "Connection: close\r\n\r\n".encode())
                ok += HttpReader(s).response() == 200
        rss = {f"rss_MiB_{label}": sum(vm_rss_mib(p) for p in pids) for label, pids in system.pids().items()}
        return {"connectors": float(sizes.connectors), "tunnels_up": up, "up_seconds": up_seconds,
                "sampled_requests": float(len(sample)), "sampled_ok": float(ok),
                "errors": float(sizes.connectors - up + len(sample) - ok), **rss}
    finally:
        child.terminate()
        child.wait(30)


@dataclass
class Scenario:
    name: str
    run: Callable[[System, Sizes], dict[str, float]]
    needs: tuple[str, ...] = ()
    compare: bool = True  # run ssh as well (A B A B ...); capacity checks run connproxy once
    headline: tuple[str, ...] = ()


SCENARIOS = [
    Scenario("bulk_socks", bulk_socks, headline=("upload_MBps", "download_MBps", "cpu_s_per_GiB_proxy",
                                                 "cpu_s_per_GiB_connector", "cpu_s_per_GiB_ssh",
                                                 "cpu_s_per_GiB_sshd")),
    Scenario("bulk_connect", bulk_connect, headline=("download_MBps", "cpu_s_per_GiB_proxy",
                                                     "cpu_s_per_GiB_connector", "cpu_s_per_GiB_ssh",
                                                     "cpu_s_per_GiB_sshd")),
    Scenario("http_rps", http_rps, needs=("wrk", "nginx"), headline=("requests_per_s", "non_2xx", "socket_errors")),
    Scenario("socks_cps", socks_cps, headline=("connections_per_s", "errors")),
    Scenario("latency", latency, headline=(
        "http_GET_p50_ms", "http_GET_p99_ms", "http_POST_p50_ms", "http_POST_p99_ms",
        "socks_GET_p50_ms", "socks_GET_p99_ms", "socks_POST_p50_ms", "socks_POST_p99_ms",
        "http_POST_after_body_p99_ms", "socks_POST_after_body_p99_ms",
        "direct_GET_p50_ms", "direct_GET_p99_ms", "direct_POST_p50_ms", "direct_POST_p99_ms",
        "direct_POST_after_body_p99_ms")),
    Scenario("idle", idle, headline=("KiB_per_stream_total", "KiB_per_stream_proxy", "KiB_per_stream_connector",
                                     "KiB_per_stream_ssh", "KiB_per_stream_sshd")),
    Scenario("concurrent_streams", concurrent_streams, compare=False,
             headline=("streams", "echoed", "errors", "open_seconds", "rss_MiB_proxy", "rss_MiB_connector")),
    Scenario("many_connectors", many_connectors, compare=False,
             headline=("connectors", "tunnels_up", "sampled_ok", "errors", "up_seconds", "rss_MiB_proxy")),
]

TOOLS = {
    "sshd": ("openssh-server", lambda: shutil.which("sshd") or Path("/usr/sbin/sshd").exists()),
    "ssh": ("openssh-client", lambda: shutil.which("ssh")),
    "wrk": ("wrk", lambda: shutil.which("wrk")),
    "nginx": ("nginx-light", lambda: shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
}


# ------------------------------------------------------------------------------------------------ set-up


@contextmanager
def backends(tmp: Path, have_nginx: bool) -> Iterator[dict[str, int]]:
    """Every backend the scenarios use; yields key -> port."""
    with ExitStack() as stack:
        ports = {"sink": sink_backend(), "source": source_backend(), "lat": http_backend(),
                 "echo": stack.enter_context(echo_server())}
        ports["web"] = stack.enter_context(nginx(tmp / "nginx")) if have_nginx else ports["lat"]
        yield ports


@contextmanager
def connproxy_system(tmp: Path, ports: dict[str, int]) -> Iterator[System]:
    """Proxy and connector as ``twistd`` processes with a mapping for each backend."""
    tmp.mkdir()
    mint(tmp)
    tcp = {"sink": ("sink.internal", 9), "source": ("source.internal", 9), "echo": ("echo.internal", 7),
           "web": ("webtcp.internal", 80), "lat": ("lattcp.internal", 80)}
    access = [{"virtualHost": host, "virtualPort": vport, "internalHost": "127.0.0.1", "internalPort": ports[key],
               "protocol": "TCP"} for key, (host, vport) in tcp.items()]
    http = {"web": "web.internal", "lat": "lat.internal"}
    rules = {key: {"virtualHost": host, "virtualPort": 80, "internalHost": "127.0.0.1", "internalPort": ports[key],
                   "protocol": "HTTP", "resources": [{"path": "/", "allSubPaths": True}]} for key, host in http.items()}
    access += list(rules.values())
    proxy_ports = write_configs(tmp, access)
    with proxy_and_connector(tmp) as (proxy, connector):
        yield System(
            name="connproxy", socks_port=proxy_ports["socks"], socks_targets=tcp,
            http_targets={key: (proxy_ports["http"], f"http://{host}/1k", host) for key, host in http.items()},
            pids=lambda: {"proxy": [proxy.pid], "connector": [connector.pid]},
            connect_port=proxy_ports["http"],
            extra={"tmp": tmp, "tunnel_port": proxy_ports["tunnel"], "metrics_port": proxy_ports["metrics"],
                   "lat_rule": rules["lat"], "lat_backend": ports["lat"],
                   "proxy_pid": proxy.pid, "connector_pid": connector.pid},
        )


@contextmanager
def ssh_system(tmp: Path, ports: dict[str, int]) -> Iterator[System]:
    """sshd + ssh with ``-D`` and ``-R`` forwards to the HTTP backends."""
    with SshTunnel(tmp, {"web": ports["web"], "lat": ports["lat"]}) as tunnel:
        yield System(
            name="ssh", socks_port=tunnel.socks_port,
            socks_targets={key: ("127.0.0.1", port) for key, port in ports.items()},
            http_targets={key: (port, "/1k", f"127.0.0.1:{port}") for key, port in tunnel.forwarded.items()},
            pids=tunnel.pids, extra={"lat_backend": ports["lat"]},
        )


# ------------------------------------------------------------------------------------------------ py-spy


def py_spy_start(out: Path, system: System, scenario: str) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` (raw collapsed stacks) on the proxy and the connector while one round runs."""
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    children = []
    for label in ("proxy", "connector"):
        pid = system.extra[f"{label}_pid"]
        children.append(subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--nonblocking",
             "-o", str(out / f"{scenario}-{label}.txt")],
            stdout=subprocess.DEVNULL, stderr=open(out / f"{scenario}-{label}.log", "wb")))
    time.sleep(1.0)  # py-spy attaches
    return children


def py_spy_stop(children: list[subprocess.Popen[bytes]]) -> None:
    import signal

    for child in children:
        child.send_signal(signal.SIGINT)
    for child in children:
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by self time and by inclusive time (share of samples) from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r" \(/.*?/(site-packages|lib/python3\.\d+|wt-perf)/", " (", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def share(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, round(100 * c / total, 1)) for f, c in sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self_percent": share(own), "inclusive_percent": share(inclusive)}


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts (about 2 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: tiny sizes, one round, connproxy only, no timing claims (for CI)")
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS))
    parser.add_argument("--rounds", type=int, help="rounds per compared scenario (default 3)")
    parser.add_argument("--no-ssh", action="store_true", help="connproxy only")
    parser.add_argument("--bulk", type=parse_size, help="bytes per bulk transfer (default 1GiB)")
    parser.add_argument("--py-spy", action="store_true",
                        help="record py-spy profiles of the proxy and the connector during connproxy's first round")
    parser.add_argument("--without", default="", help="treat these tools as missing (comma-separated: sshd,wrk,nginx)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/<time>.json)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else QUICK if args.quick else Sizes()
    if args.rounds:
        sizes.rounds = args.rounds
    if args.bulk:
        sizes.bulk = args.bulk
    nofile = raise_nofile()
    if nofile < sizes.concurrent_streams + 500:  # the clients are ours; the echo backend is a child process
        sizes.concurrent_streams = max(10, nofile - 500)
        print(f"nofile limit {nofile}: concurrent_streams lowered to {sizes.concurrent_streams}")
    without = set(filter(None, args.without.split(",")))
    missing = {tool: package for tool, (package, found) in TOOLS.items() if tool in without or not found()}
    for tool, package in missing.items():
        print(f"missing: {tool} (apt-get install {package}); its scenarios are skipped")
    if args.py_spy and not (shutil.which("py-spy") or (BIN / "py-spy").exists()):
        parser.error("--py-spy needs py-spy: .venv/bin/pip install py-spy (nothing is installed for you)")
    use_ssh = not (args.smoke or args.no_ssh or "ssh" in missing or "sshd" in missing)
    wanted = set(args.only.split(",")) if args.only else {s.name for s in SCENARIOS}
    unknown = wanted - {s.name for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    scenarios = [s for s in SCENARIOS if s.name in wanted]

    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report: dict[str, Any] = {
        "started": started, "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "machine": {"cpus": _cpus(), "cpu_model": _cpu_model(), "kernel": platform.release(),
                    "python": platform.python_version(), "load_before": list(_loadavg())},
        "sizes": sizes.__dict__, "runs": [], "summary": {}, "skipped": {}, "profiles": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-bench-"))
    tmp.chmod(0o755)  # nginx's workers (an unprivileged user) pass through it
    clock = time.monotonic()
    with ExitStack() as stack:
        ports = stack.enter_context(backends(tmp, "nginx" not in missing))
        systems = [stack.enter_context(connproxy_system(tmp / "connproxy", ports))]
        if use_ssh:
            systems.append(stack.enter_context(ssh_system(tmp / "ssh", ports)))
        for scenario in scenarios:
            lacking = [t for t in scenario.needs if t in missing]
            if lacking:
                report["skipped"][scenario.name] = "missing " + ", ".join(lacking)
                print(f"{scenario.name}: skipped (missing {', '.join(lacking)})")
                continue
            contenders = systems if scenario.compare else systems[:1]
            rounds = sizes.rounds if scenario.compare else 1
            for round_no in range(rounds):
                for system in contenders:
                    spy = []
                    if args.py_spy and round_no == 0 and system.name == "connproxy":
                        spy = py_spy_start(RESULTS / f"profile-{started}", system, scenario.name)
                    t0 = time.monotonic()
                    try:
                        values = scenario.run(system, sizes)
                    except (OSError, SystemExit, subprocess.SubprocessError) as error:  # recorded, the rest still runs
                        print(f"{scenario.name} [{system.name}] FAILED: {error!r}")
                        values = {"errors": 1.0, "failed": 1.0}
                    finally:
                        if spy:
                            py_spy_stop(spy)
                    values = {k: round(v, 3) for k, v in values.items()}
                    report["runs"].append({"scenario": scenario.name, "system": system.name, "round": round_no,
                                           "seconds": round(time.monotonic() - t0, 2), "values": values})
                    print(f"{scenario.name} [{system.name} {round_no + 1}/{rounds}] "
                          + " ".join(f"{k}={v}" for k, v in values.items() if k in scenario.headline))
            if scenario.name == "idle":
                for system in contenders:
                    close_idle(system)
            report["summary"][scenario.name] = summarize(report["runs"], scenario, [s.name for s in contenders])
    report["seconds"] = round(time.monotonic() - clock, 1)
    report["machine"]["load_after"] = list(_loadavg())
    if args.py_spy:
        for path in sorted((RESULTS / f"profile-{started}").glob("*.txt")):
            report["profiles"][path.stem] = profile_summary(path)
    print_summary(report)
    out = args.json or RESULTS / f"{started}-{report['mode']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"all runs: {out} ({report['seconds']} s)")
    if args.smoke:
        return smoke_check(report, scenarios, missing)
    return 0


def summarize(runs: list[dict[str, Any]], scenario: Scenario, names: list[str]) -> dict[str, Any]:
    """Median of each headline value per system, and connproxy / ssh."""
    out: dict[str, Any] = {}
    for key in scenario.headline:
        row: dict[str, Any] = {}
        for name in names:
            values = [r["values"][key] for r in runs
                      if r["scenario"] == scenario.name and r["system"] == name and key in r["values"]]
            if values:
                row[name] = round(statistics.median(values), 3)
        if "connproxy" in row and row.get("ssh"):
            row["ratio"] = round(row["connproxy"] / row["ssh"], 2)
        if row:
            out[key] = row
    return out


def print_summary(report: dict[str, Any]) -> None:
    print(f"\n{'scenario':<20} {'value':<28} {'connproxy':>11} {'ssh':>11} {'ratio':>7}")
    for scenario, rows in report["summary"].items():
        for key, row in rows.items():
            print(f"{scenario:<20} {key:<28} {_fmt(row.get('connproxy')):>11} {_fmt(row.get('ssh')):>11} "
                  f"{_fmt(row.get('ratio')):>7}")
    for name, summary in report["profiles"].items():
        print(f"\npy-spy {name} ({summary.get('samples', 0)} samples), top self time:")
        for frame, share in summary.get("self_percent", [])[:8]:
            print(f"  {share:5.1f}%  {frame}")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def smoke_check(report: dict[str, Any], scenarios: list[Scenario], missing: dict[str, str]) -> int:
    """The smoke run passes when every scenario that could run did, without errors (no timing claims)."""
    bad = []
    for scenario in scenarios:
        if any(t in missing for t in scenario.needs):
            continue
        runs = [r for r in report["runs"] if r["scenario"] == scenario.name]
        if not runs:
            bad.append(f"{scenario.name}: no run")
        for run in runs:
            values = run["values"]
            if values.get("errors") or values.get("non_2xx") or values.get("socket_errors"):
                bad.append(f"{scenario.name}: {values}")
    for line in bad:
        print("smoke FAILED:", line)
    return 1 if bad else 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _loadavg() -> tuple[float, float, float]:
    import os

    return os.getloadavg()


if __name__ == "__main__":
    sys.exit(main())
