# -*- test-case-name: tests.unit.test_egress -*-
"""The way out of the on-premise network: an HTTP ``CONNECT`` through a corporate proxy, and HTTP preambles.

:class:`PreambleEndpoint` connects an inner endpoint, sends one HTTP/1.1 request, waits for the expected status
(``200`` for ``CONNECT``, ``101`` for the tunnel ``Upgrade``) and then hands the connection, with any bytes that
followed the response head, to the real protocol. It serves both:

* the corporate proxy (:class:`CorporateProxy`): ``CONNECT host:port`` with ``Proxy-Authorization: Basic``
  when the URL carries credentials; TLS to the proxy runs inside the ``CONNECT`` tunnel;
* the ``path`` mode of several replicas: ``GET /connectivity-proxy-<n>`` with ``Upgrade: connproxy-tunnel/1``
  inside TLS (see :mod:`connproxy.proxy.upgrade`).

The corporate proxy is ``corporateProxy.url``, else (with ``corporateProxy.useEnvironment``) ``HTTPS_PROXY`` /
``https_proxy``; ``corporateProxy.noProxy`` and ``NO_PROXY``/``no_proxy`` name hosts dialled directly.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.config import CorporateProxyConfig

#: Longest response head accepted from a proxy or ingress.
MAX_RESPONSE_HEAD = 16384

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r\n")


class PreambleError(ConnectionError):
    """The HTTP preamble failed: a status other than the expected one, a broken response, or a closed connection."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def connect_request(host: str, port: int, authorization: str | None) -> bytes:
    """A ``CONNECT host:port`` request (IPv6 literals in brackets)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if authorization:
        lines.append(f"Proxy-Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def upgrade_request(host: str, port: int, path: str, token: bytes) -> bytes:
    """A ``GET path`` asking to switch to ``token`` (the tunnel protocol)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n"
        f"Upgrade: {token.decode('ascii')}\r\n\r\n"
    ).encode()


class _Preamble(Protocol):
    """Sends the request, reads the response head, then delegates everything to the real protocol."""

    log = Logger()

    def __init__(self, endpoint: PreambleEndpoint, factory: IProtocolFactory, done: Deferred[Protocol]) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.done = done
        self.buffer = b""
        self.inner: Any = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.endpoint.request)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_RESPONSE_HEAD:
                self._fail(PreambleError(f"{self.endpoint.what}: response head too long"))
            return
        head, rest = self.buffer[: end + 4], self.buffer[end + 4 :]
        self.buffer = b""
        m = _STATUS.match(head)
        if m is None:
            self._fail(PreambleError(f"{self.endpoint.what}: not an HTTP/1.1 response"))
            return
        status = int(m.group(1))
        if status != self.endpoint.expect:
            reason = (m.group(2) or b"").decode("latin-1")[:100]
            self._fail(PreambleError(f"{self.endpoint.what} answered {status} {reason}".rstrip(), status))
            return
        assert self.transport is not None
        self.inner = self.factory.buildProtocol(self.transport.getPeer())
        if self.inner is None:
            self._fail(PreambleError(f"{self.endpoint.what}: no protocol"))
            return
        self.inner.makeConnection(self.transport)
        if not self.done.called:
            self.done.callback(self.inner)
        if rest:
            self.inner.dataReceived(rest)

    def _fail(self, error: PreambleError) -> None:
        if not self.done.called:
            self.done.errback(error)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.done.called:
            self.done.errback(PreambleError(f"{self.endpoint.what}: connection closed before the response"))


class _PreambleFactory:
    def __init__(self, endpoint: PreambleEndpoint, factory: IProtocolFactory, done: Deferred[Protocol]) -> None:
        self.endpoint, self.factory, self.done = endpoint, factory, done
        self.protocol: _Preamble | None = None

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> _Preamble:
        self.protocol = _Preamble(self.endpoint, self.factory, self.done)
        return self.protocol


@implementer(IStreamClientEndpoint)
class PreambleEndpoint:
    """``inner`` plus one HTTP request/response before the real protocol (see the module docstring).

    ``connect`` fails with :class:`PreambleError` on an unexpected answer; cancelling it aborts the connection.
    """

    def __init__(self, inner: IStreamClientEndpoint, request: bytes, expect: int, what: str) -> None:
        self.inner = inner
        self.request = request
        self.expect = expect
        self.what = what

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """Connect, send the request, fire with the real protocol once the expected status arrived."""
        holder: dict[str, Any] = {}

        def cancel(d: Deferred[Protocol]) -> None:
            connecting = holder.get("connecting")
            if connecting is not None and not connecting.called:
                connecting.cancel()
                return
            protocol = builder.protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

        done: Deferred[Protocol] = Deferred(cancel)
        builder = _PreambleFactory(self, protocolFactory, done)
        connecting = self.inner.connect(builder)  # type: ignore[arg-type]
        holder["connecting"] = connecting

        def failed(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        connecting.addErrback(failed)
        return done


# ------------------------------------------------------------------------------------------------ corporate proxy


@dataclass(frozen=True)
class CorporateProxy:
    """An HTTP proxy to ``CONNECT`` through; ``authorization`` is the ``Proxy-Authorization`` value, if any."""

    host: str
    port: int
    authorization: str | None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: CorporateProxyConfig, environ: Mapping[str, str]) -> CorporateProxy | None:
        """The corporate proxy of ``config`` (or of ``HTTPS_PROXY``/``NO_PROXY``), or ``None`` for none.

        :raises ValueError: ``HTTPS_PROXY`` is not ``http://[user:password@]host:port``.
        """
        url = config.url
        no_proxy = list(config.no_proxy)
        if config.use_environment:
            if url is None:
                url = environ.get("HTTPS_PROXY") or environ.get("https_proxy") or None
            env_no = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
            no_proxy += [item.strip().lower() for item in env_no.split(",") if item.strip()]
        if not url:
            return None
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"corporate proxy must be http://[user:password@]host:port, got {parts.scheme}://")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(parts.hostname, parts.port or 3128, authorization, tuple(no_proxy))

    def bypass(self, host: str) -> bool:
        """Whether ``host`` is dialled directly (``noProxy``: ``*``, names, ``.suffix``/``*.suffix``, IPs, CIDRs)."""
        name = host.lower().rstrip(".")
        try:
            address: Any = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            address = None
        for entry in self.no_proxy:
            entry = entry.strip().lower()
            if entry == "*":
                return True
            if address is not None and "/" in entry:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            suffix = entry[2:] if entry.startswith("*.") else entry.lstrip(".")
            if name == suffix or name.endswith("." + suffix):
                return True
        return False

    def endpoint(self, reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        """A TCP endpoint to ``host:port`` through this proxy (``CONNECT``)."""
        return PreambleEndpoint(
            HostnameEndpoint(reactor, self.host, self.port, timeout=timeout),
            connect_request(host, port, self.authorization), 200,
            f"corporate proxy {self.host}:{self.port} (CONNECT {host}:{port})",
        )
