# -*- test-case-name: tests.integration.test_tcp_path -*-
"""Services: turn a :class:`~connproxy.config.ProxyConfig` or ``ConnectorConfig`` into running listeners.

Certificates and keys are read once here, at start-up. Where the configuration names no TLS files, the
development PKI in the state folder is used (minted on first use) and the log says where it is.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, SSL4ServerEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from connproxy import audit, tls
from connproxy.auth import Authorizer, KeyStore, make_authorizer
from connproxy.config import ConnectorConfig, FrontEndConfig, ProxyConfig, TlsFiles
from connproxy.connector import ConnectorService, settings_from
from connproxy.http_proxy import HttpProxyFactory
from connproxy.metrics import MetricsResource, ProxyMetrics
from connproxy.routing import Router
from connproxy.socks import Socks5Factory
from connproxy.state import ensure_dev_pki, state_dir
from connproxy.tunnel.registry import ConnectorRegistry
from connproxy.tunnel.server import ProxyTunnelFactory

log = Logger(namespace="connproxy.service")


class ListenerService(Service):
    """Listens on ``endpoint`` with ``factory`` while running. A failure to listen is raised from start-up."""

    def __init__(self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.setName(name)
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Start listening; raises (e.g. ``CannotListenError``) when the port cannot be bound."""
        super().startService()
        result: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(result.append)
        if result and isinstance(result[0], Failure):
            result[0].raiseException()
        if result:
            self.port = result[0]
            address: Any = self.port.getHost()
            log.info("{name} listening on {host}:{port}", name=self.name, host=address.host, port=address.port)
        else:
            d.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Deferred[None]:
        """Stop listening (connections stay up)."""
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        d: Deferred[None] = port.stopListening()  # type: ignore[assignment]
        return d

    @property
    def port_number(self) -> int:
        """The bound port (useful with port 0)."""
        assert self.port is not None
        address: Any = self.port.getHost()
        return int(address.port)


class _QuietSite(Site):
    """A ``Site`` that writes no access log line per scrape."""

    noisy = False

    def log(self, request: Any) -> None:
        """Scrapes are not logged."""


def _resolve_tls(files: TlsFiles, *, proxy: bool, subaccount: str | None = None) -> tuple[str, str, str]:
    """Certificate, key and CA file paths; the development PKI fills in what the configuration leaves out."""
    if files.cert_file and files.key_file and files.ca_file:
        return files.cert_file, files.key_file, files.ca_file
    kwargs: dict[str, Any] = {}
    if subaccount is not None:
        kwargs["subaccount"] = subaccount
    dev = ensure_dev_pki(**kwargs)
    log.warn(
        "using development certificates from {folder} (state folder {state}): not for production",
        folder=str(dev.dir), state=str(state_dir()),
    )
    if proxy:
        return (files.cert_file or str(dev.proxy_cert), files.key_file or str(dev.proxy_key),
                files.ca_file or str(dev.ca_cert))
    return (files.cert_file or str(dev.connector_cert), files.key_file or str(dev.connector_key),
            files.ca_file or str(dev.ca_cert))


class ProxyService(MultiService):
    """The proxy: tunnel listener, SOCKS5 (and, later, HTTP) front ends, sharing one registry and router."""

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        audit_writer: audit.AuditWriter | None = None,
        *,
        allow_insecure_loopback: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.registry = ConnectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self.router = Router(self.registry, self.metrics)
        settings, timers = settings_from(config)
        cert, key, ca = _resolve_tls(config.tunnel_listener.tls, proxy=True)
        options = tls.server_options_from_files(cert, key, ca)
        self.tunnel_factory = ProxyTunnelFactory(
            self.registry, reactor, settings, timers, replica_id=socket.gethostname(), audit_writer=audit_writer
        )
        listener = config.tunnel_listener
        self.tunnel_listener = ListenerService(
            "tunnel listener",
            SSL4ServerEndpoint(reactor, listener.port, options, interface=listener.bind_address),
            self.tunnel_factory,
        )
        self.tunnel_listener.setServiceParent(self)
        oauth = config.oauth
        self.key_store: KeyStore | None = None
        if config.authorization_enabled and oauth is not None:
            # One key cache and one fetch rate limit for both front ends.
            self.key_store = KeyStore(
                reactor=reactor,
                token_keys_file=oauth.token_keys_file,
                token_keys_url=oauth.token_keys_url,
                uaa_domain=oauth.uaa_domain,
                allow_insecure_loopback=allow_insecure_loopback,
            )
        self.socks_listener: ListenerService | None = None
        self.http_listener: ListenerService | None = None
        if config.socks5.enabled:
            fe = config.socks5
            authorizer = self.authorizer_for(fe)
            factory = Socks5Factory(
                self.router, authorizer, reactor,
                authorization_enabled=fe.enable_proxy_authorization,
                handshake_timeout=float(config.client_connection.handshake_timeout_seconds),
                idle_timeout=float(config.client_connection.idle_timeout_seconds),
                audit_writer=audit_writer,
            )
            self.socks_listener = ListenerService(
                "SOCKS5 proxy", TCP4ServerEndpoint(reactor, fe.port, interface=config.interface_for(fe)), factory
            )
            self.socks_listener.setServiceParent(self)
        if config.http.enabled:
            http = config.http
            http_factory = HttpProxyFactory(
                self.router, self.authorizer_for(http), reactor,
                authorization_enabled=http.enable_proxy_authorization,
                allow_connect=http.allow_connect,
                max_line_bytes=http.max_line_bytes,
                max_header_bytes=http.max_header_bytes,
                header_timeout=float(config.client_connection.handshake_timeout_seconds),
                idle_timeout=float(config.client_connection.idle_timeout_seconds),
                first_byte_timeout=float(config.client_connection.first_byte_timeout_seconds),
                audit_writer=audit_writer,
            )
            self.http_listener = ListenerService(
                "HTTP proxy", TCP4ServerEndpoint(reactor, http.port, interface=config.interface_for(http)),
                http_factory,
            )
            self.http_listener.setServiceParent(self)

        self.metrics_listener: ListenerService | None = None
        if config.metrics.enabled:
            site = _QuietSite(MetricsResource(self.metrics))
            self.metrics_listener = ListenerService(
                "Prometheus metrics",
                TCP4ServerEndpoint(reactor, config.metrics.port, interface=config.metrics.bind_address),
                site,
            )
            self.metrics_listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Join ``parent``; under twistd also hand it the configured log observer (``logging``)."""
        from connproxy.logs import install

        install(parent, self.config.logging)
        super().setServiceParent(parent)

    def authorizer_for(self, front_end: FrontEndConfig) -> Authorizer:
        """The authorizer of one front end (both share :attr:`key_store`)."""
        config = self.config
        oauth = config.oauth
        return make_authorizer(
            reactor=self.reactor,
            tenant_mode=config.tenant_mode,
            subaccount_id=config.subaccount_id,
            authorization_enabled=front_end.enable_proxy_authorization,
            allowed_client_ids=oauth.allowed_client_ids if oauth else (),
            leeway_seconds=oauth.leeway_seconds if oauth else 30,
            key_store=self.key_store,
        )

    def stopService(self) -> Deferred[Any]:
        """Stop listening, GOAWAY every connector tunnel, give streams up to 10 s, then close tunnels."""
        d = super().stopService()
        tunnels = list(self.tunnel_factory.tunnels)
        for tunnel in tunnels:
            tunnel.drain(grace=10.0)
        waits = [t.closed for t in tunnels if not t.lost]
        if not waits:
            return d
        return DeferredList([d, *waits], consumeErrors=True)


def connector_endpoint_factory(reactor: Any, config: ConnectorConfig) -> Callable[[], IStreamClientEndpoint]:
    """A factory of fresh TLS endpoints to the proxy (files read once; the name resolved on every connect)."""
    cert, key, ca = _resolve_tls(config.tls, proxy=False, subaccount=config.subaccount_id)
    options = tls.client_options_from_files(config.proxy.verify_name, ca, cert, key)

    def make() -> IStreamClientEndpoint:
        return wrapClientTLS(
            options,
            HostnameEndpoint(reactor, config.proxy.host, config.proxy.port,
                             timeout=config.tunnel.open_timeout_seconds),
        )

    return make


def make_connector_service(config: ConnectorConfig, reactor: Any,
                           audit_writer: audit.AuditWriter | None = None) -> ConnectorService:
    """The connector service for ``config``."""
    return ConnectorService(reactor, config, connector_endpoint_factory(reactor, config), audit_writer=audit_writer)
