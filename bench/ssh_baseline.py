"""Baseline: the same 1 GiB upload and download through OpenSSH's reverse tunnel (``ssh -R``) on 127.0.0.1.

Starts a private ``sshd`` (its own host key, authorized key and port; Debian's openssh-server) and
``ssh -N -R PORT:127.0.0.1:BACKEND`` to it, then moves ``--size`` bytes each way through the forwarded port, and
reports MB/s and the peak RSS of sshd's session process and of the ssh client. Run it beside
``tcp_throughput.py`` in the same session for a fair comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, measure, one_shot_backend, parse_size, vm_hwm_mib


def small_requests(tmp: Path, ssh_port: int, clients: list[subprocess.Popen[bytes]], seconds: int) -> float | None:
    """wrk with 50 keep-alive connections for 1 KiB GETs to nginx through ``ssh -R`` (same load as
    ``http_throughput.py``); returns requests/s."""
    import re

    from http_throughput import NGINX_CONF

    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "1k").write_bytes(b"x" * 1024)
    tmp.chmod(0o755)
    nginx_port = free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port))
    nginx = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
    try:
        forwarded = free_port()
        client = subprocess.Popen([
            "ssh", "-N", "-p", str(ssh_port), "-i", str(tmp / "user"), "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={tmp}/known_hosts", "-o", "ExitOnForwardFailure=yes",
            "-R", f"127.0.0.1:{forwarded}:127.0.0.1:{nginx_port}", "root@127.0.0.1",
        ], stderr=subprocess.DEVNULL)
        clients.append(client)
        connect(forwarded).close()
        wrk = subprocess.run(["wrk", "-t", "2", "-c", "50", "-d", f"{seconds}s", f"http://127.0.0.1:{forwarded}/1k"],
                             capture_output=True, text=True, timeout=seconds + 60)
        match = re.search(r"Requests/sec:\s+([\d.]+)", wrk.stdout)
        return float(match.group(1)) if match else None
    finally:
        nginx.terminate()
        nginx.wait(10)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd forks a session process, which forks again)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        kids = [int(k) for k in out]
        found += kids
        todo += kids
    return found


def connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 20
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", type=parse_size)
    parser.add_argument("--small-requests", type=int, default=0, metavar="SECONDS",
                        help="also run wrk (50 keep-alive connections, 1 KiB GETs) through ssh -R to nginx")
    parser.add_argument("--json")
    args = parser.parse_args()
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise SystemExit("sshd not found (apt-get install openssh-server)")
    total: int = args.size
    tmp = Path(tempfile.mkdtemp(prefix="connproxy-ssh-bench-"))
    os.chmod(tmp, 0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "user")], check=True)
    (tmp / "authorized_keys").write_text((tmp / "user.pub").read_text())
    os.chmod(tmp / "authorized_keys", 0o600)
    port = free_port()
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp}/host\nAuthorizedKeysFile {tmp}/authorized_keys\n"
        f"PidFile {tmp}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nAllowTcpForwarding yes\nPermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(tmp / "sshd_config")], stderr=subprocess.DEVNULL)
    results: dict[str, object] = {"bytes": total}
    clients: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(0.5)
        for kind, label in (("sink", "upload_MBps"), ("source", "download_MBps")):
            backend_port = one_shot_backend(kind, total)
            forwarded = free_port()
            client = subprocess.Popen([
                "ssh", "-N", "-p", str(port), "-i", str(tmp / "user"), "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={tmp}/known_hosts", "-o", "ExitOnForwardFailure=yes",
                "-R", f"127.0.0.1:{forwarded}:127.0.0.1:{backend_port}", "root@127.0.0.1",
            ], stderr=subprocess.DEVNULL)
            clients.append(client)
            results[label] = measure(kind, connect(forwarded), total)
            results[f"ssh_client_peak_rss_MiB_{kind}"] = vm_hwm_mib(client.pid)
            results[f"sshd_session_peak_rss_MiB_{kind}"] = max(
                (vm_hwm_mib(p) for p in descendants(daemon.pid)), default=-1
            )
        if args.small_requests:
            results["small_requests_per_s"] = small_requests(tmp, port, clients, args.small_requests)
    finally:
        for client in clients:
            client.terminate()
            client.wait(10)
        daemon.terminate()
        daemon.wait(10)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
