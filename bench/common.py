"""Shared pieces of the benchmark (``bench/run.py``): certificates, configs, child processes, backends and
blocking clients, all on 127.0.0.1. Every wait has a timeout; every loop is bounded."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent
CHUNK = 1 << 20
#: The machine's hard ``nofile`` limit; the bench and its children raise their soft limit to it.
NOFILE = 20000


# ------------------------------------------------------------------------------------------------ processes


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``limit`` (at most the hard limit); children inherit it. Returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts a connection. :raises OSError: not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a process, in MiB (Linux ``VmHWM``)."""
    return _status_kib(pid, "VmHWM:") / 1024


def vm_rss_mib(pid: int) -> float:
    """Current resident set size of a process, in MiB."""
    return _status_kib(pid, "VmRSS:") / 1024


def _status_kib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return float(line.split()[1])
    return -1.0


def pss_kib(pid: int) -> float:
    """Proportional set size of a process in KiB (``/proc/PID/smaps_rollup``)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return float(line.split()[1])
    return -1.0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (``/proc/PID/stat`` utime + stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd forks a session process, which forks again)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stop(child: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM a child we started, SIGKILL it if it does not exit within ``timeout``."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5)


# ------------------------------------------------------------------------------------------------ connproxy


def mint(tmp: Path, subaccount: str = "bench") -> None:
    """A CA, the proxy's certificate and a connector certificate in ``tmp``."""
    subprocess.run([str(BIN / "connproxy"), "certs", "init", "--dir", str(tmp), "--host", "localhost"],
                   check=True, capture_output=True)
    subprocess.run([str(BIN / "connproxy"), "certs", "connector", "--dir", str(tmp), "--subaccount", subaccount,
                    "--out", str(tmp / "connector")], check=True, capture_output=True)


#: Limits raised for the capacity scenarios (10,000 streams, 1,000 connectors, all from 127.0.0.1). They fit an
#: open-file limit of 20,000 together (SOCKS5 12,000 + HTTP 2,000 + tunnel port 3,000 + 64 reserved), so the proxy
#: keeps them as they are instead of fitting them to it (``connproxy/proxy/fd_budget.py``).
BENCH_LIMITS: dict[str, Any] = {"maxConnections": 12000, "maxConnectionsPerClient": 12000, "listenBacklog": 4096}
BENCH_HTTP_MAX_CONNECTIONS = 2000
#: The tunnel port's limits for ``many_connectors``: its 1,000 connectors share one certificate (minting 1,000
#: would measure key generation) and one source address, so the per-identity and per-source limits are raised;
#: this scenario measures the proxy's capacity, not those limits (``bench/waves.py`` exercises them).
TUNNEL_PORT_LIMITS: dict[str, Any] = {"maxTunnelsPerIdentity": 2000, "maxConnections": 3000,
                                      "maxConnectionsPerClient": 3000, "maxPendingHandshakes": 3000}


def write_configs(tmp: Path, access: list[dict[str, Any]], *, http: bool = True, subaccount: str = "bench",
                  max_streams: int = 20000) -> dict[str, int]:
    """Proxy and connector configuration files (dedicated mode, TLS tunnel, no proxy authorization, metrics on);
    returns the chosen ports (``tunnel``, ``socks``, ``http``, ``metrics``)."""
    ports = {"tunnel": free_port(), "socks": free_port(), "http": free_port(), "metrics": free_port()}
    tunnel = {"maxStreams": max_streams}
    (tmp / "proxy.yaml").write_text(yaml.safe_dump({
        "tenantMode": "dedicated", "subaccountId": subaccount,
        "servers": {
            "businessDataTunnel": {"port": ports["tunnel"], "bindAddress": "127.0.0.1",
                                   "maxStreamsPerTenant": max_streams, **TUNNEL_PORT_LIMITS,
                                   "tls": {"certFile": "proxy.crt", "keyFile": "proxy.key", "clientCaFile": "ca.crt"}},
            "proxy": {"http": {"enabled": http, "port": ports["http"], "enableProxyAuthorization": False,
                               "allowRemoteConnections": False, "maxConnections": BENCH_HTTP_MAX_CONNECTIONS},
                      "socks5": {"port": ports["socks"], "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False},
                      "clientConnection": BENCH_LIMITS},
        },
        "tunnel": tunnel,
        "metrics": {"prometheus": {"enabled": True, "port": ports["metrics"], "bindAddress": "127.0.0.1"}},
    }))
    (tmp / "connector.yaml").write_text(yaml.safe_dump(connector_config(tmp, ports["tunnel"], access, subaccount)))
    return ports


def connector_config(tmp: Path, tunnel_port: int, access: list[dict[str, Any]], subaccount: str = "bench",
                     connector_id: str = "bench", location: str = "", max_streams: int = 20000) -> dict[str, Any]:
    """A connector configuration mapping (TLS files in ``tmp``)."""
    return {
        "subaccountId": subaccount, "connectorId": connector_id, "locationId": location,
        "proxy": {"host": "localhost", "port": tunnel_port},
        "tls": {"certFile": str(tmp / "connector.crt"), "keyFile": str(tmp / "connector.key"),
                "caFile": str(tmp / "ca.crt")},
        "tunnel": {"maxStreams": max_streams},
        "accessControl": access,
    }


@contextmanager
def proxy_and_connector(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """Run ``twistd -n connproxy`` and ``twistd -n connproxy-connector`` from ``tmp``; SIGTERM them at the end.

    :raises SystemExit: the tunnel is not up within 30 s.
    """
    env = {**os.environ, "CONNPROXY_STATE_DIR": str(tmp / "state")}
    # The processes log to standard output (never blocking; see docs/logging.md): each into its own file.
    common = [str(BIN / "twistd"), "-n", "--pidfile="]
    with open(tmp / "proxy.log", "ab") as proxy_log, open(tmp / "connector.log", "ab") as connector_log:
        proxy = subprocess.Popen([*common, "connproxy", "--config", str(tmp / "proxy.yaml")],
                                 env=env, stdout=proxy_log, stderr=subprocess.STDOUT, cwd=tmp)
        connector = subprocess.Popen([*common, "connproxy-connector", "--config", str(tmp / "connector.yaml")],
                                     env=env, stdout=connector_log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        deadline = time.monotonic() + 30
        while b"registered for subaccount" not in _read(tmp / "proxy.log"):
            if time.monotonic() > deadline or proxy.poll() is not None or connector.poll() is not None:
                raise SystemExit("proxy and connector did not come up in 30 s; see " + str(tmp))
            time.sleep(0.05)
        yield proxy, connector
    finally:
        for child in (connector, proxy):
            stop(child)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def metric(port: int, name: str) -> float | None:
    """The value of an unlabelled series on the proxy's ``/metrics`` (None if absent)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


# ------------------------------------------------------------------------------------------------ sizes, bytes


def parse_size(text: str) -> int:
    """``1GiB``, ``64MiB``, ``512KiB`` or a plain number of bytes."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


_BLOCK = memoryview(os.urandom(CHUNK))


def send_all(sock: socket.socket, total: int) -> None:
    """Send ``total`` pseudo-random bytes."""
    left = total
    while left:
        n = min(left, CHUNK)
        sock.sendall(_BLOCK[:n])
        left -= n


def receive_all(sock: socket.socket, limit: int | None = None) -> int:
    """Read until EOF (or ``limit`` bytes); return the byte count."""
    buf = bytearray(CHUNK)
    got = 0
    while limit is None or got < limit:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    return got


# ------------------------------------------------------------------------------------------------ backends


def _serve_forever(handler: Any, name: str) -> int:
    """A listener on 127.0.0.1 whose connections each get a daemon thread running ``handler(conn)``."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(300)
            threading.Thread(target=_guarded, args=(handler, conn), daemon=True, name=name).start()

    threading.Thread(target=accept, daemon=True, name=name + "-accept").start()
    return int(listener.getsockname()[1])


def _guarded(handler: Any, conn: socket.socket) -> None:
    with conn:
        try:
            handler(conn)
        except OSError:
            pass


def sink_backend() -> int:
    """Counts what each connection sends until EOF and answers the count (8 bytes, big-endian)."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(struct.pack(">Q", receive_all(conn)))

    return _serve_forever(handle, "sink")


def source_backend() -> int:
    """Reads an 8-byte big-endian count, sends that many bytes and half-closes."""

    def handle(conn: socket.socket) -> None:
        want = struct.unpack(">Q", _read_exactly(conn, 8))[0]
        send_all(conn, want)
        conn.shutdown(socket.SHUT_WR)
        receive_all(conn)

    return _serve_forever(handle, "source")


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("EOF")
        data += chunk
    return data


def upload(sock: socket.socket, total: int) -> float:
    """Send ``total`` bytes to a sink backend through ``sock``; return seconds. :raises SystemExit: count mismatch."""
    start = time.perf_counter()
    send_all(sock, total)
    sock.shutdown(socket.SHUT_WR)
    count = struct.unpack(">Q", _read_exactly(sock, 8))[0]
    elapsed = time.perf_counter() - start
    sock.close()
    if count != total:
        raise SystemExit(f"upload: moved {count} bytes, expected {total}")
    return elapsed


def download(sock: socket.socket, total: int, request: bytes | None = None) -> float:
    """Ask a source backend for ``total`` bytes through ``sock`` and read them; return seconds."""
    start = time.perf_counter()
    sock.sendall(request if request is not None else struct.pack(">Q", total))
    count = receive_all(sock, total)
    elapsed = time.perf_counter() - start
    sock.close()
    if count != total:
        raise SystemExit(f"download: moved {count} bytes, expected {total}")
    return elapsed


ONE_KIB = b"x" * 1024


def http_backend() -> int:
    """A keep-alive HTTP/1.1 backend: ``GET`` answers 1 KiB, ``POST`` reads its body and answers ``ok``;
    ``Connection: close`` closes after the answer."""

    def handle(conn: socket.socket) -> None:
        reader = HttpReader(conn)
        while True:
            head = reader.head()
            if head is None:
                return
            first, headers = head
            length = int(headers.get("content-length", "0"))
            if length:
                reader.body(length)
            body = ONE_KIB if first.startswith("GET") else b"ok"
            close = headers.get("connection", "").lower() == "close"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (len(body), b"Connection: close\r\n" if close else b"", body))
            if close:
                return

    return _serve_forever(handle, "http")


ECHO_SERVER = r"""
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(4096)
listener.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is listener:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            continue
        conn = key.fileobj
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if data:
            try:
                conn.send(data)
            except OSError:
                pass
        else:
            sel.unregister(conn)
            conn.close()
"""


@contextmanager
def echo_server() -> Iterator[int]:
    """An echo server in a child process (its own file descriptors, for 10,000 connections); yields its port."""
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    try:
        wait_port(port)
        yield port
    finally:
        stop(child, 5)


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
    }}
}}
"""


@contextmanager
def nginx(tmp: Path) -> Iterator[int]:
    """nginx serving ``/1k`` (1 KiB) from ``tmp/www``; yields its port."""
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user and must read www/ (and pass its parent)
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "1k").write_bytes(ONE_KIB)
    port = free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
    child = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        stop(child, 10)


# ------------------------------------------------------------------------------------------------ clients


def new_connections_per_second(connect: Callable[[], socket.socket], host: str, seconds: float,
                               clients: int) -> tuple[float, int]:
    """``clients`` threads that, for ``seconds``, each open a connection with ``connect()``, send one tiny GET
    (``Connection: close``) for ``/1k`` with ``Host: host`` and read the answer; returns (connections per second,
    failures). A thread gives up after 100 failures."""
    deadline = time.monotonic() + seconds
    done = [0] * clients
    errors = [0] * clients
    request = f"GET /1k HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()

    def client(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                with connect() as s:
                    s.sendall(request)
                    if HttpReader(s).response() != 200:
                        raise OSError("status")
                done[i] += 1
            except OSError:
                errors[i] += 1
                if errors[i] > 100:
                    return

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return sum(done) / (time.monotonic() - start), sum(errors)


def socks_connect(port: int, host: str, target_port: int, timeout: float = 30.0) -> socket.socket:
    """A SOCKS5 CONNECT (method 0x00) through 127.0.0.1:``port`` (TCP_NODELAY on).

    :raises OSError: the proxy refused (the reply code in the message) or the connection failed.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if host.replace(".", "").isdigit():
            address = b"\x01" + socket.inet_aton(host)
        else:
            address = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00")  # not pipelined with the request: OpenSSH's -D waits for the greeting's answer
        if _read_exactly(s, 2) != b"\x05\x00":
            raise OSError("SOCKS5 method negotiation failed")
        s.sendall(b"\x05\x01\x00" + address + struct.pack(">H", target_port))
        reply = _read_exactly(s, 4)
        if reply[1] != 0:
            raise OSError(f"SOCKS5 reply {reply[1]:#04x}")
        bound = {1: 4, 4: 16}.get(reply[3]) or _read_exactly(s, 1)[0]
        _read_exactly(s, bound + 2)
    except BaseException:
        s.close()
        raise
    return s


def http_connect(port: int, authority: str, timeout: float = 30.0) -> socket.socket:
    """An HTTP ``CONNECT authority`` through the HTTP proxy on 127.0.0.1:``port``. :raises OSError: not 2xx."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = HttpReader(s).head()
    if head is None or not head[0].split(" ")[1].startswith("2"):
        s.close()
        raise OSError(f"CONNECT refused: {head}")
    return s


class HttpReader:
    """Reads HTTP/1.1 heads and ``Content-Length`` bodies from a blocking socket (no chunked encoding)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def head(self) -> tuple[str, dict[str, str]] | None:
        """The first line and the headers (lower-case names) of the next message; None at EOF before one."""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return lines[0], headers

    def body(self, length: int) -> bytes:
        """Exactly ``length`` body bytes. :raises OSError: EOF first."""
        while len(self.buf) < length:
            data = self.sock.recv(65536)
            if not data:
                raise OSError("EOF in a body")
            self.buf += data
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def response(self) -> int:
        """Read one response; return its status. :raises OSError: EOF first."""
        head = self.head()
        if head is None:
            raise OSError("EOF before a response")
        self.body(int(head[1].get("content-length", "0")))
        return int(head[0].split(" ")[1])


# ------------------------------------------------------------------------------------------------ OpenSSH


SSH_CIPHER = "aes128-gcm@openssh.com"


class SshTunnel:
    """A throwaway ``sshd`` on a high port of 127.0.0.1 and one ``ssh`` client connected to it with a dynamic
    SOCKS5 forward (``-D``) and remote forwards (``-R``) to the given backends: OpenSSH's equivalent of one
    connproxy tunnel."""

    def __init__(self, tmp: Path, remote: dict[str, int]) -> None:
        import getpass
        import shutil

        self.tmp = tmp
        self.sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        tmp.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o700)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
        (tmp / "authorized_keys").write_text((tmp / "user.pub").read_text())
        os.chmod(tmp / "authorized_keys", 0o600)
        self.port = free_port()
        (tmp / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {tmp}/host\nAuthorizedKeysFile {tmp}/authorized_keys\n"
            f"PidFile {tmp}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nAllowTcpForwarding yes\nPermitRootLogin prohibit-password\nCiphers {SSH_CIPHER}\n"
            "MaxSessions 100\nMaxStartups 100\n"
        )
        self.socks_port = free_port()
        self.forwarded = {name: free_port() for name in remote}
        self.user = getpass.getuser()
        self.remote = remote
        self.daemon: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SshTunnel:
        Path("/run/sshd").mkdir(exist_ok=True)
        self.daemon = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.tmp / "sshd_config")],
                                       stderr=open(self.tmp / "sshd.log", "wb"))
        wait_port(self.port)
        forwards: list[str] = []
        for name, backend in self.remote.items():
            forwards += ["-R", f"127.0.0.1:{self.forwarded[name]}:127.0.0.1:{backend}"]
        self.client = subprocess.Popen([
            "ssh", "-N", "-p", str(self.port), "-i", str(self.tmp / "user"), "-c", SSH_CIPHER,
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.tmp}/known_hosts",
            "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", "-o", "Compression=no",
            "-D", f"127.0.0.1:{self.socks_port}", *forwards, f"{self.user}@127.0.0.1",
        ], stderr=open(self.tmp / "ssh.log", "wb"))
        try:
            wait_port(self.socks_port)
            for port in self.forwarded.values():
                wait_port(port)
        except OSError:
            self.__exit__()
            raise SystemExit("ssh tunnel did not come up; see " + str(self.tmp)) from None
        return self

    def pids(self) -> dict[str, list[int]]:
        """The ssh client and sshd's session processes (the listener excluded)."""
        assert self.daemon is not None and self.client is not None
        return {"ssh": [self.client.pid], "sshd": descendants(self.daemon.pid)}

    def __exit__(self, *_: object) -> None:
        for child in (self.client, self.daemon):
            if child is not None:
                stop(child, 10)
