"""Building blocks for integration tests: a real proxy, connector and backends on 127.0.0.1 in this reactor.

Everything here uses real sockets and real TLS with certificates minted per test.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.config import connector_config_from_mapping, proxy_config_from_mapping
from connproxy.connector.dialer import ConnectorService, make_connector_service
from connproxy.proxy.service import ProxyService
from connproxy.testing import mint_test_pki

reactor: Any = global_reactor

FAST_TUNNEL = {"pingIntervalSeconds": 1, "deadAfterSeconds": 3, "openTimeoutSeconds": 5}


# ------------------------------------------------------------------------------------------------ backends


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes everything; answers FIN with FIN after the echo (half-close aware)."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class Banner(Protocol):
    """Speaks first: sends a greeting and waits."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"220 hello\r\n")


class Discard(Protocol):
    """Reads and discards; counts bytes."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)  # type: ignore[attr-defined]


def serve(protocol: type[Protocol], **attrs: Any) -> Deferred[IListeningPort]:
    """Listen on 127.0.0.1:0 with ``protocol``."""
    factory = Factory.forProtocol(protocol)
    for k, v in attrs.items():
        setattr(factory, k, v)
    return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


# ------------------------------------------------------------------------------------------------ stack


@dataclass
class Stack:
    """A proxy, one or more connectors and the PKI behind them."""

    tmp: Path
    pki: Any
    proxy: ProxyService | None = None
    connectors: list[ConnectorService] = field(default_factory=list)
    ports: list[IListeningPort] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)
    #: Called after everything else stopped (sockets the test reserved, ...).
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    @property
    def socks_port(self) -> int:
        assert self.proxy is not None and self.proxy.socks_listener is not None
        return self.proxy.socks_listener.port_number

    @property
    def http_port(self) -> int:
        assert self.proxy is not None and self.proxy.http_listener is not None
        return self.proxy.http_listener.port_number

    @property
    def tunnel_port(self) -> int:
        assert self.proxy is not None
        return self.proxy.tunnel_listener.port_number

    def proxy_files(self) -> dict[str, str]:
        files = self.pki.write(self.tmp / "pki")
        return {"certFile": str(files.proxy_cert), "keyFile": str(files.proxy_key), "clientCaFile": str(files.ca_cert)}

    def start_proxy(self, **overrides: Any) -> ProxyService:
        data: dict[str, Any] = {
            "tenantMode": "dedicated",
            "subaccountId": "tenant-a",
            "servers": {
                "businessDataTunnel": {"port": 0, "bindAddress": "127.0.0.1", "tls": self.proxy_files()},
                "proxy": {
                    "http": {"enabled": False, "port": 0, "enableProxyAuthorization": False,
                             "allowRemoteConnections": False},
                    "socks5": {"port": 0, "enableProxyAuthorization": False, "allowRemoteConnections": False},
                },
            },
            "tunnel": dict(FAST_TUNNEL),
            "metrics": {"prometheus": {"enabled": False}},
        }
        _merge(data, overrides)
        self.proxy = ProxyService(proxy_config_from_mapping(data, base_dir=self.tmp), reactor, audit_writer=self.audit.append,
                                  allow_insecure_loopback=True)
        self.proxy.startService()
        return self.proxy

    def start_connector(self, subaccount: str = "tenant-a", location: str | None = None,
                        bind_location: bool = False, access: list[dict[str, Any]] | None = None,
                        connector_id: str = "c1", claim_subaccount: str | None = None,
                        tunnel_port: int | None = None, **overrides: Any) -> ConnectorService:
        name = f"conn-{len(self.connectors)}"
        cert, key = self.pki.connector(subaccount, location if bind_location else None)
        (self.tmp / f"{name}.crt").write_bytes(cert)
        (self.tmp / f"{name}.key").write_bytes(key)
        (self.tmp / "ca.crt").write_bytes(self.pki.ca_cert_pem)
        data: dict[str, Any] = {
            "subaccountId": claim_subaccount or subaccount,
            "locationId": location or "",
            "connectorId": connector_id,
            "proxy": {"host": "127.0.0.1", "port": tunnel_port or self.tunnel_port, "serverName": "localhost"},
            "tls": {"certFile": str(self.tmp / f"{name}.crt"), "keyFile": str(self.tmp / f"{name}.key"),
                    "caFile": str(self.tmp / "ca.crt")},
            "tunnel": dict(FAST_TUNNEL),
            "reconnect": {"initialDelaySeconds": 0.05, "maxDelaySeconds": 0.5, "fastRetries": 3},
            "backend": {"connectTimeoutSeconds": 2},
            "accessControl": access or [],
        }
        _merge(data, overrides)
        service = make_connector_service(connector_config_from_mapping(data), reactor, audit_writer=self.audit.append)
        service.startService()
        self.connectors.append(service)
        return service

    @inlineCallbacks
    def stop(self) -> Iterator[Deferred[Any]]:
        for c in self.connectors:
            if c.running:
                yield c.stopService()
        if self.proxy is not None and self.proxy.running:
            yield self.proxy.stopService()
        for p in self.ports:
            yield p.stopListening()
        for cleanup in self.cleanups:
            cleanup()


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def tcp_rule(vhost: str, vport: int, port: int, protocol: str = "TCP", **extra: Any) -> dict[str, Any]:
    return {"virtualHost": vhost, "virtualPort": vport, "internalHost": "127.0.0.1", "internalPort": port,
            "protocol": protocol, **extra}


def new_stack(tmp_path: Path) -> Stack:
    return Stack(tmp=tmp_path, pki=mint_test_pki())


# ------------------------------------------------------------------------------------------------ SOCKS5 client


@implementer(IHalfCloseableProtocol)
class SocksClient(Protocol):
    """A SOCKS5 client (RFC 1928 + SAP 0x80), then a byte sink that hashes what it receives.

    ``negotiated`` fires with the reply code; ``done`` fires when the connection is fully closed.
    """

    def __init__(self, host: str, port: int, *, methods: bytes = b"\x80", token: str = "",
                 location: str = "", atyp: int | None = None) -> None:
        self.host = host
        self.port = port
        self.methods = methods
        self.token = token
        self.location = location
        self.atyp = atyp
        self.negotiated: Deferred[int] = Deferred()
        self.done: Deferred[None] = Deferred()
        self.eof: Deferred[None] = Deferred()
        self.buffer = b""
        self.state = "greeting"
        self.received = 0
        self.digest = hashlib.sha256()
        self.keep: bytearray | None = bytearray()
        self.reply: int | None = None
        self.auth_status: int | None = None
        self.lost_reason: Failure | None = None
        self._read_closed = False
        self._write_closed = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"\x05" + bytes([len(self.methods)]) + self.methods)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            self._take(data)
            return
        self.buffer += data
        assert self.transport is not None
        if self.state == "greeting" and len(self.buffer) >= 2:
            method = self.buffer[1]
            self.buffer = self.buffer[2:]
            if method == 0x80:
                import base64

                loc = base64.b64encode(self.location.encode()) if self.location else b""
                tok = self.token.encode()
                self.transport.write(b"\x01" + struct.pack(">I", len(tok)) + tok + bytes([len(loc)]) + loc)
                self.state = "auth"
            elif method == 0x00:
                self._send_request()
            else:
                self.state = "failed"
                self.negotiated.callback(0xFF)
                return
        if self.state == "auth" and len(self.buffer) >= 2:
            self.auth_status = self.buffer[1]
            self.buffer = self.buffer[2:]
            if self.auth_status != 0:
                self.state = "failed"
                self.negotiated.callback(0x100 | self.auth_status)
                return
            self._send_request()
        if self.state == "request" and len(self.buffer) >= 10:
            self.reply = self.buffer[1]
            rest = self.buffer[10:]
            self.buffer = b""
            self.state = "relay" if self.reply == 0 else "failed"
            self.negotiated.callback(self.reply)
            if rest:
                self._take(rest)

    def _send_request(self) -> None:
        assert self.transport is not None
        import ipaddress

        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            ip = None
        if ip is None:
            addr = b"\x03" + bytes([len(self.host)]) + self.host.encode()
        elif ip.version == 4:
            addr = b"\x01" + ip.packed
        else:
            addr = b"\x04" + ip.packed
        self.transport.write(b"\x05\x01\x00" + addr + struct.pack(">H", self.port))
        self.state = "request"

    def _take(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.keep is not None:
            self.keep += data
            if len(self.keep) > 1 << 20:
                self.keep = None

    def readConnectionLost(self) -> None:
        self._read_closed = True
        if not self.eof.called:
            self.eof.callback(None)
        if self._write_closed and self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._write_closed = True
        if self._read_closed and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        if not self.negotiated.called:
            self.negotiated.callback(-1)
        if not self.eof.called:
            self.eof.callback(None)
        self.done.callback(None)


@inlineCallbacks
def socks_connect(port: int, host: str, target_port: int, **kw: Any) -> Iterator[Deferred[Any]]:
    """Connect a :class:`SocksClient` to the proxy; returns ``(client, reply)``."""
    client = SocksClient(host, target_port, **kw)
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
    reply = yield client.negotiated
    return client, reply


@implementer(IPushProducer)
class PatternProducer:
    """Writes ``total`` pseudo-random bytes to a transport as a push producer; hashes what it wrote."""

    def __init__(self, transport: Any, total: int, chunk: int = 65536, seed: int = 1, fin: bool = True) -> None:
        self.transport = transport
        self.remaining = total
        self.chunk = chunk
        self.paused = False
        self.digest = hashlib.sha256()
        self.done: Deferred[None] = Deferred()
        self.fin = fin
        block = hashlib.sha256(str(seed).encode()).digest()
        self.pattern = (block * (chunk // len(block) + 1))[:chunk]
        transport.registerProducer(self, True)
        reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        while not self.paused and self.remaining > 0:
            n = min(self.chunk, self.remaining)
            data = self.pattern[:n]
            self.remaining -= n
            self.digest.update(data)
            self.transport.write(data)
        if self.remaining == 0 and not self.done.called:
            self.transport.unregisterProducer()
            if self.fin:
                self.transport.loseWriteConnection()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.remaining = 0


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> Deferred[None]:
    """Poll ``predicate`` on the reactor until true; fails after ``timeout`` seconds."""
    d: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(TimeoutError("condition not met in time"))
        else:
            reactor.callLater(interval, check)

    check()
    return d


__all__ = ["succeed"]


class Source(Protocol):
    """Streams pseudo-random bytes as fast as the client reads, as a push producer, until closed."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.producer = PatternProducer(self.transport, self.factory.total, fin=False)  # type: ignore[attr-defined]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@inlineCallbacks
def socks_to_backend(stack: Stack, protocol: type[Protocol] = Echo, host: str = "echo.internal", port: int = 7,
                     **backend_attrs: Any) -> Iterator[Deferred[Any]]:
    """Serve ``protocol`` as a backend, start the proxy (if not running) and a connector mapping ``host:port`` to
    it, and return a SOCKS5 client connected through the tunnel (reply 0 checked)."""
    backend = yield serve(protocol, **backend_attrs)
    stack.ports.append(backend)
    if stack.proxy is None:
        stack.start_proxy()
    connector = stack.start_connector(access=[tcp_rule(host, port, backend.getHost().port)])
    yield connector.when_up()
    client, reply = yield socks_connect(stack.socks_port, host, port)
    assert reply == 0, reply
    return client
