# -*- test-case-name: tests.integration.test_tcp_path -*-
"""The proxy's assembly: turn a :class:`~connproxy.config.ProxyConfig` into running listeners.

Certificates and keys are read once here, at start-up. Where the configuration names no TLS files, the
development PKI in the state folder is used (minted on first use) and the log says where it is.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger

from connproxy.config import FrontEndConfig, ProxyConfig
from connproxy.listener import Listener
from connproxy.nodelay import NoDelaySite
from connproxy.obs import audit
from connproxy.obs.memory import MemoryTrimmer, interval_from_env
from connproxy.pki import tls
from connproxy.pki.state import resolve_tls_files
from connproxy.proxy.auth import Authorizer, KeyStore, make_authorizer
from connproxy.proxy.http_frontend import HttpProxyFactory
from connproxy.proxy.metrics import MetricsResource, ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.routing import Router
from connproxy.proxy.socks import Socks5Factory
from connproxy.proxy.tunnel_admission import TunnelAdmission
from connproxy.proxy.tunnel_listener import ProxyTunnelFactory
from connproxy.tunnel.settings import settings_from

log = Logger(namespace="connproxy.proxy.service")


class _QuietSite(NoDelaySite):
    """A ``Site`` (TCP_NODELAY) that writes no access log line per scrape."""

    noisy = False

    def log(self, request: Any) -> None:
        """Scrapes are not logged."""


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
        self.registry = ConnectorRegistry(max_tunnels_per_identity=config.tunnel_listener.max_tunnels_per_identity)
        self.metrics = ProxyMetrics(self.registry)
        self.router = Router(self.registry, self.metrics,
                             max_streams_per_tenant=config.tunnel_listener.max_streams_per_tenant)
        settings, timers = settings_from(config)
        cert, key, ca = resolve_tls_files(config.tunnel_listener.tls, proxy=True)
        options = tls.server_options_from_files(cert, key, ca)
        self.tunnel_factory = ProxyTunnelFactory(
            self.registry, reactor, settings, timers, replica_id=socket.gethostname(), audit_writer=audit_writer
        )
        self.tunnel_factory.replaced_grace = float(config.shutdown.drain_timeout_seconds)
        listener = config.tunnel_listener
        self.tunnel_admission = TunnelAdmission(
            self.tunnel_factory, reactor,
            max_connections=listener.max_connections,
            max_connections_per_client=listener.max_connections_per_client,
            max_pending_handshakes=listener.max_pending_handshakes,
            handshake_timeout=listener.handshake_timeout_seconds,
            metrics=self.metrics,
        )
        self.tunnel_listener = Listener(
            "tunnel listener",
            SSL4ServerEndpoint(reactor, listener.port, options, backlog=config.client_connection.listen_backlog,
                               interface=listener.bind_address),
            self.tunnel_admission,
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
        self.socks_listener: Listener | None = None
        self.http_listener: Listener | None = None
        if config.socks5.enabled:
            fe = config.socks5
            authorizer = self.authorizer_for(fe)
            factory = Socks5Factory(
                self.router, authorizer, reactor,
                authorization_enabled=fe.enable_proxy_authorization,
                handshake_timeout=float(config.client_connection.handshake_timeout_seconds),
                idle_timeout=float(config.client_connection.idle_timeout_seconds),
                max_connections=config.client_connection.max_connections,
                max_connections_per_client=config.client_connection.max_connections_per_client,
                metrics=self.metrics,
                audit_writer=audit_writer,
            )
            self.socks_listener = Listener(
                "SOCKS5 proxy",
                TCP4ServerEndpoint(reactor, fe.port, backlog=config.client_connection.listen_backlog,
                                   interface=config.interface_for(fe)),
                factory,
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
                body_timeout=float(config.client_connection.body_timeout_seconds),
                max_connections=config.client_connection.max_connections,
                max_connections_per_client=config.client_connection.max_connections_per_client,
                metrics=self.metrics,
                audit_writer=audit_writer,
            )
            self.http_listener = Listener(
                "HTTP proxy",
                TCP4ServerEndpoint(reactor, http.port, backlog=config.client_connection.listen_backlog,
                                   interface=config.interface_for(http)),
                http_factory,
            )
            self.http_listener.setServiceParent(self)

        # Freed stream buffers go back to the system after a wave of stalled streams (docs/reliability.md).
        self.memory_trimmer = MemoryTrimmer(reactor, interval_from_env())
        self.memory_trimmer.setServiceParent(self)

        self.metrics_listener: Listener | None = None
        if config.metrics.enabled:
            site = _QuietSite(MetricsResource(self.metrics))
            self.metrics_listener = Listener(
                "Prometheus metrics",
                TCP4ServerEndpoint(reactor, config.metrics.port, interface=config.metrics.bind_address),
                site,
            )
            self.metrics_listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Join ``parent``; under twistd also hand it the configured log observer (``logging``)."""
        from connproxy.obs.logs import install

        install(parent, self.config.logging, self.reactor)
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
