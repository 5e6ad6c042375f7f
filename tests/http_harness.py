"""HTTP test helpers: one small h11 backend with several behaviours, and blocking clients to run in a thread.

The backend (:class:`HttpBackend`, served with :func:`serve_http`) answers by path:

* ``/headers...`` (any other path too): JSON with the method, target, the headers it received (in order),
  the body length and its SHA-256; ``?chunked=1`` answers with a chunked body.
* ``/download?size=N[&chunked=1]``: N pattern bytes streamed with a push producer (Content-Length, or chunked);
  the SHA-256 of what was sent is kept in ``factory.sent_digests``.
* ``/upload``: reads the body streaming and answers JSON ``{"length": ..., "sha256": ...}``.
* ``/redirect``: 302 with ``Location: http://<its own host:port>/landing?x=1``.
* ``/hang``: reads the request and never answers.
* ``/ws``: a WebSocket echo (RFC 6455 handshake, echoes each frame's payload with the same opcode).

Nothing here holds a large body in memory: downloads are produced from a 64 KiB pattern block, uploads hashed
as they arrive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.python.failure import Failure
from zope.interface import implementer

reactor: Any = global_reactor

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
CHUNK = 65536


def pattern_block(seed: int = 1, size: int = CHUNK) -> bytes:
    """A deterministic block of pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@implementer(IPushProducer)
class _BodyProducer:
    """Streams ``total`` pattern bytes as h11 Data events, pausing with the transport."""

    def __init__(self, backend: HttpBackend, total: int) -> None:
        self.backend = backend
        self.remaining = total
        self.paused = False
        self.digest = hashlib.sha256()
        self.block = pattern_block(total % 251)
        self.scheduled = False
        transport: Any = backend.transport
        assert transport is not None
        transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self.scheduled = False
        backend = self.backend
        transport: Any = backend.transport
        while not self.paused and self.remaining > 0 and transport is not None:
            n = min(CHUNK, self.remaining)
            data = self.block[:n]
            self.remaining -= n
            self.digest.update(data)
            transport.writeSequence(backend.conn.send_with_data_passthrough(h11.Data(data=data)))
        if self.remaining == 0 and transport is not None:
            transport.unregisterProducer()
            backend.factory.sent_digests.append(self.digest.hexdigest())
            backend.finish_response()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.remaining = 0
        self.paused = True


class HttpBackend(Protocol):
    """See the module docstring."""

    factory: Any

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.digest = hashlib.sha256()
        self.length = 0
        self.ws = False
        self.ws_buffer = b""
        self.busy = False

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        if self.ws:
            self._ws_data(data)
            return
        self.conn.receive_data(data)
        self._events()

    def _events(self) -> None:
        while not self.ws and not self.busy:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                assert self.transport is not None
                self.transport.loseConnection()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.digest = hashlib.sha256()
                self.length = 0
                self.factory.requests.append(event)
                if event.target.startswith(b"/ws") and self._header(b"upgrade").lower() == b"websocket":
                    self._ws_accept()
                    return
            elif isinstance(event, h11.Data):
                self.digest.update(event.data)
                self.length += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            elif isinstance(event, h11.ConnectionClosed):
                assert self.transport is not None
                self.transport.loseConnection()
                return

    def _header(self, name: bytes) -> bytes:
        assert self.request is not None
        return next((v for n, v in self.request.headers if n == name), b"")

    def _send(self, *events: h11.Event) -> None:
        transport: Any = self.transport
        assert transport is not None
        for event in events:
            transport.writeSequence(self.conn.send_with_data_passthrough(event))

    def _json(self, status: int, value: Any, chunked: bool = False) -> None:
        body = json.dumps(value).encode()
        headers = [(b"content-type", b"application/json")]
        if not chunked:
            headers.append((b"content-length", str(len(body)).encode()))
        self._send(h11.Response(status_code=status, headers=headers))
        if chunked:
            for i in range(0, len(body), 7):
                self._send(h11.Data(data=body[i:i + 7]))
        else:
            self._send(h11.Data(data=body))
        self.finish_response()

    def finish_response(self) -> None:
        self.busy = False
        self._send(h11.EndOfMessage())
        if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self._events()

    def _answer(self) -> None:
        request = self.request
        assert request is not None
        parts = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path == "/hang":
            self.busy = True
            return
        if path == "/redirect":
            host: Any = self.transport.getHost()  # type: ignore[union-attr]
            self._send(h11.Response(status_code=302, headers=[
                (b"location", f"http://{host.host}:{host.port}/landing?x=1".encode()),
                (b"content-length", b"0")]))
            self.finish_response()
            return
        if path == "/download":
            self.busy = True
            size = int(query.get("size", "0"))
            headers = [(b"content-type", b"application/octet-stream")]
            if not query.get("chunked"):
                headers.append((b"content-length", str(size).encode()))
            self._send(h11.Response(status_code=200, headers=headers))
            _BodyProducer(self, size)
            return
        if path == "/upload":
            self._json(200, {"length": self.length, "sha256": self.digest.hexdigest()},
                       chunked=bool(query.get("chunked")))
            return
        self._json(200, {
            "method": request.method.decode(),
            "target": request.target.decode(),
            "headers": [[n.decode(), v.decode("latin-1")] for n, v in request.headers],
            "length": self.length,
            "sha256": self.digest.hexdigest(),
        }, chunked=bool(query.get("chunked")))

    # ------------------------------------------------------------------ WebSocket echo

    def _ws_accept(self) -> None:
        key = self._header(b"sec-websocket-key")
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self._send(h11.InformationalResponse(status_code=101, headers=[
            (b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", accept)]))
        self.ws = True
        data, _closed = self.conn.trailing_data
        if data:
            self._ws_data(data)

    def _ws_data(self, data: bytes) -> None:
        self.ws_buffer += data
        while True:
            frame = parse_ws_frame(self.ws_buffer)
            if frame is None:
                return
            opcode, payload, used = frame
            self.ws_buffer = self.ws_buffer[used:]
            assert self.transport is not None
            self.transport.write(ws_frame(opcode, payload, mask=False))
            if opcode == 0x8:
                self.transport.loseConnection()
                return


def ws_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final WebSocket frame."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def parse_ws_frame(buffer: bytes) -> tuple[int, bytes, int] | None:
    """``(opcode, payload, bytes used)`` of the first complete frame in ``buffer``, or None."""
    if len(buffer) < 2:
        return None
    opcode = buffer[0] & 0x0F
    masked = buffer[1] & 0x80
    n = buffer[1] & 0x7F
    pos = 2
    if n == 126:
        if len(buffer) < 4:
            return None
        n = struct.unpack(">H", buffer[2:4])[0]
        pos = 4
    elif n == 127:
        if len(buffer) < 10:
            return None
        n = struct.unpack(">Q", buffer[2:10])[0]
        pos = 10
    key = b""
    if masked:
        if len(buffer) < pos + 4:
            return None
        key = buffer[pos:pos + 4]
        pos += 4
    if len(buffer) < pos + n:
        return None
    payload = buffer[pos:pos + n]
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + n


class HttpBackendFactory(Factory):
    protocol = HttpBackend

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[h11.Request] = []
        self.sent_digests: list[str] = []


def serve_http(tls: tuple[bytes, bytes] | None = None) -> Deferred[IListeningPort]:
    """Listen on 127.0.0.1:0 with an :class:`HttpBackend` (TLS with ``(cert PEM, key PEM)`` if given).

    The factory is ``port.http_factory``.
    """
    factory = HttpBackendFactory()
    if tls is None:
        endpoint: Any = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    else:
        cert = PrivateCertificate.loadPEM(tls[0] + b"\n" + tls[1])
        options = CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original)
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    d: Deferred[IListeningPort] = endpoint.listen(factory)

    def keep(port: IListeningPort) -> IListeningPort:
        port.http_factory = factory  # type: ignore[attr-defined]
        return port

    return d.addCallback(keep)


class Silent(Protocol):
    """Accepts and never answers."""


def http_rule(vhost: str, vport: int, port: int, protocol: str = "HTTP", resources: list[dict[str, Any]] | None = None,
              **extra: Any) -> dict[str, Any]:
    """An accessControl entry for an HTTP(S) mapping; by default everything under ``/`` is allowed."""
    return {"virtualHost": vhost, "virtualPort": vport, "internalHost": "127.0.0.1", "internalPort": port,
            "protocol": protocol,
            "resources": resources if resources is not None else [{"path": "/", "allSubPaths": True}],
            **extra}


# ------------------------------------------------------------------------------------------------ blocking clients


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, responses: int | None = 1) -> bytes:
    """Send ``data`` to 127.0.0.1:port and read until ``responses`` complete final responses arrived (None: until
    the peer closes). Blocking: run it in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if responses is not None and _complete_responses(b"".join(chunks)) >= responses:
                break
        return b"".join(chunks)


def _complete_responses(raw: bytes) -> int:
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    count = 0
    while True:
        if conn.our_state is h11.IDLE or conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return count
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return count
        if isinstance(event, h11.EndOfMessage):
            count += 1
            if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
                return count


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names, last wins) and body of the first response in ``raw``."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status = 0
    headers: dict[str, str] = {}
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {n.decode(): v.decode("latin-1") for n, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return status, headers, body


def websocket_echo(port: int, target: str, messages: list[bytes], headers: dict[str, str] | None = None,
                   timeout: float = 10.0) -> tuple[int, list[bytes], bytes]:
    """Open a WebSocket through the proxy on ``port`` and send ``messages``.

    Returns ``(status, echoed payloads, head of a non-101 answer)``. Blocking: run it in a thread.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    host = urlsplit(target).netloc
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        status_line = buffer.split(b"\r\n", 1)[0]
        status = int(status_line.split()[1]) if status_line else 0
        if status != 101:
            while _complete_responses(buffer) < 1:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
            return status, [], buffer
        expected = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        assert expected in buffer, buffer
        buffer = buffer.split(b"\r\n\r\n", 1)[1]
        echoed = []
        for message in messages:
            sock.sendall(ws_frame(0x2, message, mask=True))
            while True:
                frame = parse_ws_frame(buffer)
                if frame is not None:
                    buffer = buffer[frame[2]:]
                    echoed.append(frame[1])
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    return status, echoed, b""
                buffer += chunk
        sock.sendall(ws_frame(0x8, b"", mask=True))
        return status, echoed, b""


def keepalive_requests(port: int, count: int, target: Callable[[int], str]) -> tuple[list[int], int]:
    """``count`` sequential GETs on one ``http.client`` connection to the proxy; returns (statuses, sockets used)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    sockets = set()
    try:
        for i in range(count):
            conn.request("GET", target(i))
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            assert conn.sock is not None
            sockets.add(id(conn.sock))
    finally:
        conn.close()
    return statuses, len(sockets)


def failure_text(failure: Failure) -> str:
    return failure.getErrorMessage()
