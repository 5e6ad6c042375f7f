"""``connproxy probe``: the first thing to run to answer "does my tunnel work?".

Two forms, both printing what happened step by step and exiting 0 only when the target answered::

    connproxy probe socks --proxy 127.0.0.1:20004 [--location LOC] [--token JWT | --token-file F] HOST:PORT
    connproxy probe http  --proxy 127.0.0.1:20003 [--location LOC] [--token JWT | --token-file F] URL

``socks`` speaks SOCKS5 with SAP's method 0x80 (``01``, 4-byte big-endian JWT length, JWT, 1-byte length, base64
location ID), the only way to pass a location over SOCKS5, which curl cannot do; it falls back to method 0x00
only when neither a token nor a location is given. After the CONNECT reply (printed with its meaning) it sends
``GET / HTTP/1.0`` (unless ``--no-request``) and prints the first bytes of the answer. ``http`` sends one request
through the HTTP proxy with ``SAP-Connectivity-SCC-Location_ID`` and ``Proxy-Authorization: Bearer`` and prints
the status line and the first bytes of the body.

Blocking sockets with a timeout on every step: this is a command-line tool, not library code.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit

from connproxy.wire.socks5 import Reply

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: What each SOCKS5 reply means for connproxy (``sap-connectivity-proxy.md`` 2.3).
REPLY_MEANING: dict[int, str] = {
    Reply.SUCCEEDED: "succeeded: the connector reached the backend",
    Reply.GENERAL_FAILURE: "general failure in the proxy",
    Reply.NOT_ALLOWED: "refused by the connector's access control (no mapping for this host and port)",
    Reply.NETWORK_UNREACHABLE: "no connector is connected for this subaccount and location",
    Reply.HOST_UNREACHABLE: "the connector could not reach the backend (refused, timeout, DNS or TLS)",
    Reply.CONNECTION_REFUSED: "authentication failed (token refused)",
    Reply.TTL_EXPIRED: "TTL expired",
    Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}
_PREVIEW = 200


class ProbeError(Exception):
    """A step failed; the message says which and why."""


def _split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ProbeError(f"expected HOST:PORT, got {text!r}")
        return text, default_port
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ProbeError(f"bad port in {text!r}")
    return host, int(port)


def _recv_exact(sock: socket.socket, count: int, what: str) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProbeError(f"the proxy closed the connection while we waited for {what}")
        data += chunk
    return data


def _preview(data: bytes) -> str:
    text = data[:_PREVIEW].decode("utf-8", "replace")
    return "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)


def _connect(proxy: str, default_port: int, timeout: float, out: TextIO) -> socket.socket:
    host, port = _split_host_port(proxy, default_port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ProbeError(f"cannot connect to the proxy at {host}:{port}: {exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out.write(f"connected to the proxy at {host}:{port}\n")
    return sock


def sap_auth_message(token: str, location: str) -> bytes:
    """The method-0x80 sub-negotiation message: ``01``, JWT length (4 bytes), JWT, location length, base64 location."""
    jwt = token.encode("ascii")
    loc = base64.b64encode(location.encode("utf-8")) if location else b""
    if len(loc) > 255:
        raise ProbeError("the location ID is too long for SAP's SOCKS5 method (255 bytes base64)")
    return b"\x01" + struct.pack(">I", len(jwt)) + jwt + bytes([len(loc)]) + loc


def connect_request(host: str, port: int) -> bytes:
    """A SOCKS5 CONNECT request for ``host:port`` (IPv4, IPv6 or domain)."""
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        address = b"\x01" + packed
    except OSError:
        try:
            address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            name = host.encode("idna")
            if not 0 < len(name) < 256:
                raise ProbeError(f"bad host name {host!r}") from None
            address = b"\x03" + bytes([len(name)]) + name
    return b"\x05\x01\x00" + address + struct.pack(">H", port)


def probe_socks(proxy: str, target: str, token: str, location: str, *, request: bool, timeout: float,
                out: TextIO) -> int:
    """Open ``target`` through the SOCKS5 front end and report each step; returns the exit status."""
    host, port = _split_host_port(target)
    with _connect(proxy, 20004, timeout, out) as sock:
        sap = bool(token or location)
        sock.sendall(b"\x05\x02\x00\x80" if sap else b"\x05\x01\x00")
        version, method = _recv_exact(sock, 2, "the method choice")
        if version != 5:
            raise ProbeError(f"not a SOCKS5 server (version byte {version})")
        if method == 0xFF:
            raise ProbeError("the proxy accepted none of our methods (authorization on? give --token)")
        out.write(f"method chosen: 0x{method:02x}\n")
        if method == 0x80:
            sock.sendall(sap_auth_message(token, location))
            status = _recv_exact(sock, 2, "the authentication answer")
            if status != b"\x01\x00":
                raise ProbeError(f"method 0x80 refused: {status.hex()} (malformed token or location)")
            out.write(f"method 0x80 accepted (location {location or '(default)'!r})\n")
        sock.sendall(connect_request(host, port))
        head = _recv_exact(sock, 4, "the CONNECT reply")
        reply = head[1]
        tail = {1: 4, 4: 16}.get(head[3])
        if tail is None and head[3] == 3:
            tail = _recv_exact(sock, 1, "the bound address")[0]
        _recv_exact(sock, (tail or 0) + 2, "the bound address")
        meaning = REPLY_MEANING.get(reply, "unknown reply")
        out.write(f"CONNECT {host}:{port}: reply 0x{reply:02x}, {meaning}\n")
        if reply != Reply.SUCCEEDED:
            return EXIT_FAILED
        if not request:
            return EXIT_OK
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("idna" if not host.isascii() else "ascii"))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            out.write("the backend sent nothing within the timeout (not HTTP?)\n")
            return EXIT_OK
        out.write(f"first bytes from the backend ({len(data)}):\n{_preview(data)}\n")
        return EXIT_OK


def probe_http(proxy: str, url: str, token: str, location: str, *, timeout: float, out: TextIO) -> int:
    """Send ``GET url`` through the HTTP proxy with SAP's headers and report the answer; returns the exit status."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ProbeError(f"expected an http://host[:port]/path URL, got {url!r}")
    lines = [f"GET {url} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close", "User-Agent: connproxy-probe"]
    if location:
        lines.append(f"SAP-Connectivity-SCC-Location_ID: {location}")
    if token:
        lines.append(f"Proxy-Authorization: Bearer {token}")
    with _connect(proxy, 20003, timeout, out) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        data = b""
        try:
            while len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            if not data:
                raise ProbeError("no answer from the proxy within the timeout") from None
        status_line, _, rest = data.partition(b"\r\n")
        _, _, body = rest.partition(b"\r\n\r\n")
        out.write(f"answer: {_preview(status_line)}\n")
        out.write(f"first bytes of the body ({len(body)}):\n{_preview(body)}\n")
        fields = status_line.split(b" ", 2)
        ok = len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) < 400
        return EXIT_OK if ok else EXIT_FAILED


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``probe socks`` and ``probe http`` to the ``connproxy`` command line."""
    probe = commands.add_parser("probe", help="check a tunnel end to end through the SOCKS5 or HTTP front end")
    kinds = probe.add_subparsers(dest="probe_command", metavar="KIND")
    for kind, default, what in (("socks", "127.0.0.1:20004", "HOST:PORT"), ("http", "127.0.0.1:20003", "URL")):
        sub = kinds.add_parser(kind, help=f"probe through the {kind.upper()} front end")
        sub.add_argument("--proxy", default=default, metavar="HOST:PORT", help=f"the front end (default {default})")
        sub.add_argument("--location", default="", metavar="LOC", help="SAP location ID (default: none)")
        token = sub.add_mutually_exclusive_group()
        token.add_argument("--token", default="", metavar="JWT", help="a token for proxy authorization")
        token.add_argument("--token-file", metavar="FILE", help="read the token from FILE")
        sub.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per step (default 10)")
        sub.add_argument("--wait", type=float, default=0.0, metavar="S",
                         help="retry for up to S seconds while the proxy or the tunnel is not up yet")
        if kind == "socks":
            sub.add_argument("--no-request", action="store_true", help="stop after the CONNECT reply")
        sub.add_argument("target", metavar=what)
        sub.set_defaults(handler=main_probe, probe_kind=kind, help_parser=sub)
    probe.set_defaults(handler=None, help_parser=probe)
    return probe


def main_probe(args: argparse.Namespace, out: TextIO | None = None,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Run one probe from parsed arguments; print what happened; return the exit status.

    With ``--wait S`` a failed attempt is repeated (twice a second) until it succeeds or ``S`` seconds passed;
    only the last attempt's report is printed.
    """
    stream = out if out is not None else sys.stdout
    deadline = clock() + max(0.0, getattr(args, "wait", 0.0) or 0.0)
    while True:
        report = io.StringIO()
        status = _probe_once(args, report)
        if status == EXIT_OK or clock() >= deadline:
            stream.write(report.getvalue())
            return status
        sleep(0.5)


def _probe_once(args: argparse.Namespace, stream: TextIO) -> int:
    token = args.token
    try:
        if args.token_file:
            try:
                with open(args.token_file, encoding="ascii") as f:
                    token = f.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ProbeError(f"cannot read --token-file: {exc}") from None
        if args.probe_kind == "socks":
            return probe_socks(args.proxy, args.target, token, args.location, request=not args.no_request,
                               timeout=args.timeout, out=stream)
        return probe_http(args.proxy, args.target, token, args.location, timeout=args.timeout, out=stream)
    except ProbeError as exc:
        stream.write(f"probe failed: {exc}\n")
        return EXIT_FAILED
    except (TimeoutError, OSError) as exc:
        stream.write(f"probe failed: {exc}\n")
        return EXIT_FAILED
