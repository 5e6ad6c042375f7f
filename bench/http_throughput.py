"""HTTP proxy benchmark: 1 KiB GETs with concurrent keep-alive clients (wrk) and a 1 GiB download (curl),
through HTTP proxy -> tunnel -> connector -> nginx, all on 127.0.0.1.

Needs ``wrk``, ``curl`` and ``nginx`` (Debian: ``apt-get install wrk curl nginx-light``). Bounded: each run has a
fixed duration and every child process is stopped at the end.

    .venv/bin/python bench/http_throughput.py --connections 50 --duration 10 --download 1GiB
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, mint, parse_size, proxy_and_connector, vm_hwm_mib, write_configs

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
    }}
}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--download", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-http-bench-"))
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user and must read www/
    (tmp / "www").mkdir()
    (tmp / "www" / "1k").write_bytes(b"x" * 1024)
    with open(tmp / "www" / "big", "wb") as f:
        f.truncate(args.download)
    with open(tmp / "www" / "big", "rb") as f:  # into the page cache: measure the proxy, not nginx's first read
        while f.read(1 << 24):
            pass
    nginx_port = free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port))
    nginx = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
    results: dict[str, object] = {}
    try:
        time.sleep(0.5)
        mint(tmp)
        ports = write_configs(tmp, [{
            "virtualHost": "web.internal", "virtualPort": 80, "internalHost": "127.0.0.1", "internalPort": nginx_port,
            "protocol": "HTTP", "resources": [{"path": "/", "allSubPaths": True}],
        }], http=True)
        with proxy_and_connector(tmp) as (proxy, connector):
            proxy_url = f"http://127.0.0.1:{ports['http']}"
            check = subprocess.run(["curl", "-sS", "-x", proxy_url, "http://web.internal/1k"], capture_output=True)
            if check.returncode != 0 or len(check.stdout) != 1024:
                raise SystemExit(f"smoke request failed: {check.stderr.decode()} {check.stdout[:200]!r}")
            script = tmp / "proxy.lua"
            script.write_text('wrk.path = "http://web.internal/1k"\nwrk.headers["Host"] = "web.internal"\n')
            wrk = subprocess.run(
                ["wrk", "-t", "2", "-c", str(args.connections), "-d", f"{args.duration}s", "-s", str(script),
                 proxy_url], capture_output=True, text=True, timeout=args.duration + 60)
            match = re.search(r"Requests/sec:\s+([\d.]+)", wrk.stdout)
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk.stdout)
            results["small_requests_per_s"] = float(match.group(1)) if match else None
            results["small_non_2xx"] = int(errors.group(1)) if errors else 0
            results["wrk"] = wrk.stdout.strip().splitlines()[-6:]
            start = time.perf_counter()
            dl = subprocess.run(["curl", "-sS", "-x", proxy_url, "-o", "/dev/null", "-w", "%{size_download}",
                                 "http://web.internal/big"], capture_output=True, text=True, timeout=600)
            elapsed = time.perf_counter() - start
            got = int(dl.stdout or 0)
            results["download_bytes"] = got
            results["download_MBps"] = round(got / elapsed / 1e6, 1) if got == args.download else None
            results["proxy_peak_rss_MiB"] = vm_hwm_mib(proxy.pid)
            results["connector_peak_rss_MiB"] = vm_hwm_mib(connector.pid)
    finally:
        nginx.terminate()
        nginx.wait(10)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
