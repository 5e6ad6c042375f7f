# -*- test-case-name: tests.integration.test_tcp_path -*-
"""The proxy's assembly: turn a :class:`~connproxy.config.ProxyConfig` into running listeners.

Certificates and keys are read once here, at start-up. Where the configuration names no TLS files, the
development PKI in the state folder is used (minted on first use) and the log says where it is.

Lifecycle (``docs/operations.md``): ``/ready`` on the metrics listener is false while starting, while draining
and (``readiness.requireConnector``) while no connector is registered. ``stopService`` (SIGTERM under twistd)
drains: readiness turns false, the front ends and the tunnel listener stop accepting, every connector tunnel
gets GOAWAY, streams may finish for ``shutdown.drainTimeoutSeconds``, the rest are RESET (their clients see a
TCP reset). SIGHUP, or a change of the configuration or token keys file, reloads ``allowedClientId`` and the
token keys (:meth:`ProxyService.apply_config`).
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger

from connproxy import reload
from connproxy.config import FrontEndConfig, ProxyConfig, verify_proxy_config_file
from connproxy.listener import Listener
from connproxy.obs import audit
from connproxy.obs.memory import MemoryTrimmer, interval_from_env
from connproxy.pki import tls
from connproxy.pki.state import resolve_tls_files
from connproxy.probes import metrics_site
from connproxy.proxy import fd_budget
from connproxy.proxy.auth import AuthError, Authorizer, KeyStore, make_authorizer
from connproxy.proxy.frontend import ConnectionCounts, FrontEndFactory, FrontEndOptions
from connproxy.proxy.http_frontend import HttpProxyFactory
from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.replicas import read_client_cas, replica_set_for
from connproxy.proxy.routing import Router
from connproxy.proxy.socks import Socks5Factory
from connproxy.proxy.tunnel_admission import TunnelAdmission
from connproxy.proxy.tunnel_listener import ProxyTunnelFactory
from connproxy.tunnel.settings import settings_from
from connproxy.wire.errors import ErrorCode

log = Logger(namespace="connproxy.proxy.service")


#: Proxy configuration keys a reload applies (everything else needs a restart).
RELOADABLE = ("servers.proxy.authorization.oauth",)

#: Seconds a drain may take beyond ``drainTimeoutSeconds`` for tunnels to close after their streams were reset.
CLOSE_MARGIN = 5.0


class CountingAuthorizer:
    """An authorizer that counts refusals by reason (``connproxy_token_failures_total``)."""

    def __init__(self, inner: Authorizer, front_end: str, metrics: ProxyMetrics) -> None:
        self.inner = inner
        self.front_end = front_end
        self.metrics = metrics

    def authorize(self, *, proxy_token: str | None, service_token: str | None = None) -> Deferred[Any]:
        """See :meth:`connproxy.proxy.auth.Authorizer.authorize`."""
        d = self.inner.authorize(proxy_token=proxy_token, service_token=service_token)
        d.addErrback(self._count)
        return d

    def __getattr__(self, name: str) -> Any:
        """Anything else is the wrapped authorizer's (``tenant_mode``, ``authorization_enabled`` ...)."""
        return getattr(self.inner, name)

    def _count(self, failure: Any) -> Any:
        if failure.check(AuthError):
            self.metrics.token_failures.labels(self.front_end, str(failure.value.reason)).inc()
        return failure


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
        self.metrics = ProxyMetrics(self.registry, clock=reactor.seconds)
        self.draining = False
        self.config_path: str | None = None
        self.reloader: reload.Reloader[ProxyConfig] | None = None
        self._process_control = False
        self._allow_insecure_loopback = allow_insecure_loopback
        #: The front ends' factories by metric label (``socks5``, ``http``), for reloads.
        self.front_ends: dict[str, tuple[FrontEndConfig, FrontEndFactory]] = {}
        self.router = Router(self.registry, self.metrics,
                             max_streams_per_tenant=config.tunnel_listener.max_streams_per_tenant)
        settings, timers = settings_from(config)
        cert, key, ca = resolve_tls_files(config.tunnel_listener.tls, proxy=True)
        options = tls.server_options_from_files(cert, key, ca)
        listener = config.tunnel_listener
        self.replicas, discovery = replica_set_for(config, reactor)
        self.tunnel_factory = ProxyTunnelFactory(
            self.registry, reactor, settings, timers, replica_id=socket.gethostname(), audit_writer=audit_writer,
            replicas=self.replicas, ingress=listener.ingress if listener.ingress.enabled else None,
            client_cas=read_client_cas(ca),
        )
        self.tunnel_factory.replaced_grace = float(config.shutdown.drain_timeout_seconds)
        self.tunnel_factory.on_stream_finished = self.metrics.bytes.stream_finished
        self.metrics.bytes.live = lambda: [s for t in list(self.tunnel_factory.tunnels) for s in t.streams.values()]
        if discovery is not None:
            discovery.setServiceParent(self)
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
            config_key="servers.businessDataTunnel.port",
        )
        self.tunnel_listener.setServiceParent(self)
        self.ingress_listener: Listener | None = None
        if listener.ingress.enabled:
            self.ingress_listener = Listener(
                "tunnel ingress listener (plain HTTP)",
                TCP4ServerEndpoint(reactor, listener.ingress.port, backlog=config.client_connection.listen_backlog,
                                   interface=listener.ingress.bind_address),
                self.tunnel_factory.ingress_factory(),
                config_key="servers.businessDataTunnel.ingress.port",
            )
            self.ingress_listener.setServiceParent(self)
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

        def common(fe: FrontEndConfig) -> FrontEndOptions:
            """What both front ends' factories take alike, with this one's authorization and connection limit."""
            return FrontEndOptions(
                authorization_enabled=fe.enable_proxy_authorization,
                idle_timeout=float(config.client_connection.idle_timeout_seconds),
                max_connections=fe.max_connections or config.client_connection.max_connections,
                max_connections_per_client=config.client_connection.max_connections_per_client,
                metrics=self.metrics,
                audit_writer=audit_writer,
            )

        if config.socks5.enabled:
            fe = config.socks5
            authorizer = self.authorizer_for(fe, "socks5")
            factory = Socks5Factory(
                self.router, authorizer, reactor,
                handshake_timeout=float(config.client_connection.handshake_timeout_seconds),
                **common(fe),
            )
            self.socks_listener = Listener(
                "SOCKS5 proxy",
                TCP4ServerEndpoint(reactor, fe.port, backlog=config.client_connection.listen_backlog,
                                   interface=config.interface_for(fe)),
                factory, config_key="servers.proxy.socks5.port",
            )
            self.socks_listener.setServiceParent(self)
            self.front_ends["socks5"] = (fe, factory)
        if config.http.enabled:
            http = config.http
            http_factory = HttpProxyFactory(
                self.router, self.authorizer_for(http, "http"), reactor,
                allow_connect=http.allow_connect,
                max_line_bytes=http.max_line_bytes,
                max_header_bytes=http.max_header_bytes,
                header_timeout=float(config.client_connection.handshake_timeout_seconds),
                first_byte_timeout=float(config.client_connection.first_byte_timeout_seconds),
                body_timeout=float(config.client_connection.body_timeout_seconds),
                **common(http),
            )
            self.http_listener = Listener(
                "HTTP proxy",
                TCP4ServerEndpoint(reactor, http.port, backlog=config.client_connection.listen_backlog,
                                   interface=config.interface_for(http)),
                http_factory, config_key="servers.proxy.http.port",
            )
            self.http_listener.setServiceParent(self)
            self.front_ends["http"] = (http, http_factory)

        # Freed stream buffers go back to the system after a wave of stalled streams (docs/reliability.md).
        self.memory_trimmer = MemoryTrimmer(reactor, interval_from_env())
        self.memory_trimmer.setServiceParent(self)

        self.metrics_listener: Listener | None = None
        if config.metrics.enabled:
            site = metrics_site(self.metrics, self.readiness)
            self.metrics_listener = Listener(
                "Prometheus metrics",
                TCP4ServerEndpoint(reactor, config.metrics.port, interface=config.metrics.bind_address),
                site, config_key="metrics.prometheus.port",
            )
            self.metrics_listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Join ``parent``; under twistd also hand it the configured log observer (``logging``)."""
        from connproxy.obs.logs import install

        install(parent, self.config.logging, self.reactor)
        super().setServiceParent(parent)

    def authorizer_for(self, front_end: FrontEndConfig, label: str = "unknown") -> CountingAuthorizer:
        """The authorizer of one front end (both share :attr:`key_store`), counting its refusals."""
        return self._authorizer(self.config, front_end, label, self.key_store)

    def _authorizer(self, config: ProxyConfig, front_end: FrontEndConfig, label: str,
                    key_store: KeyStore | None) -> CountingAuthorizer:
        oauth = config.oauth
        inner = make_authorizer(
            reactor=self.reactor,
            tenant_mode=config.tenant_mode,
            subaccount_id=config.subaccount_id,
            authorization_enabled=front_end.enable_proxy_authorization,
            allowed_client_ids=oauth.allowed_client_ids if oauth else (),
            leeway_seconds=oauth.leeway_seconds if oauth else 30,
            key_store=key_store,
        )
        return CountingAuthorizer(inner, label, self.metrics)

    # ------------------------------------------------------------------ readiness

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)`` for ``/ready``: not while starting (a listener not bound yet), not while draining,
        and not while no connector is registered if ``readiness.requireConnector``."""
        if self.draining:
            return False, "draining"
        if not self.running:
            return False, "starting"
        for listener in (self.tunnel_listener, self.ingress_listener, self.socks_listener, self.http_listener):
            if listener is not None and listener.port is None:
                return False, f"starting: {listener.name} not listening yet"
        if self.config.readiness.require_connector and self.registry.count() == 0:
            return False, "no connector registered"
        return True, ""

    # ------------------------------------------------------------------ process control and reload

    def enable_process_control(self, config_path: str | None) -> None:
        """Run as the process (twistd): SIGTERM drains and exits 0, SIGHUP (and, with ``config_path``, a change
        of the configuration or token keys file) reloads; the open-file limit is raised and the connection limits
        fitted to it (:meth:`fit_connection_limits`). Call before ``startService``."""
        self._process_control = True
        self.config_path = config_path
        self.fit_connection_limits(fd_budget.raise_nofile())
        if config_path is not None:
            self.reloader = reload.Reloader(
                self.reactor, config_path, verify_proxy_config_file, self.apply_config,
                lambda result: self.metrics.reloads.labels(result).inc(),
                extra_files=self._watched_key_files,
            )

    def fit_connection_limits(self, nofile: int) -> dict[str, int]:
        """Lower the listeners' connection limits (and the per-client ones with them) where together they do not
        fit in ``nofile`` open files (:mod:`connproxy.proxy.fd_budget`); one warning names what was lowered.
        Returns the limits now in force by key."""
        holders: dict[str, ConnectionCounts] = {
            (f"servers.proxy.{label}.maxConnections" if fe.max_connections
             else f"servers.proxy.clientConnection.maxConnections ({label})"): factory
            for label, (fe, factory) in self.front_ends.items()
        }
        holders["servers.businessDataTunnel.maxConnections"] = self.tunnel_admission
        configured = {key: holder.max_connections for key, holder in holders.items()}
        fitted = fd_budget.fit(configured, nofile)
        for key, holder in holders.items():
            holder.max_connections = fitted[key]
            holder.max_connections_per_client = min(holder.max_connections_per_client, fitted[key])
        if fitted != configured:
            log.warn(
                "the open-file limit ({nofile}) cannot hold the configured connection limits ({configured}, plus "
                "{reserved} reserved): lowered to {fitted} for this process, per-client limits capped at them; "
                "raise the limit (ulimit -n, LimitNOFILE, the container runtime's nofile) to keep them",
                nofile=nofile, reserved=fd_budget.RESERVED_FDS,
                configured=", ".join(f"{k} {v}" for k, v in configured.items()),
                fitted=", ".join(f"{k} {v}" for k, v in fitted.items()),
            )
        return fitted

    def _watched_key_files(self) -> list[str]:
        oauth = self.config.oauth
        return [oauth.token_keys_file] if oauth is not None and oauth.token_keys_file else []

    def reload(self) -> bool:
        """Reload the configuration file now (SIGHUP); False if refused or there is no file."""
        return reload.reload_now(self.reloader)

    def apply_config(self, new: ProxyConfig) -> None:
        """Apply what can change while running: ``allowedClientId`` and the token keys (the keys file is read
        again, also when its name did not change). Other changed keys are logged as needing a restart.

        :raises ValueError: the token keys cannot be loaded (the message names ``tokenKeysFile`` ...); nothing
            changes then.
        """
        old = self.config
        applicable, restart = reload.split_changes(reload.changed_keys(old, new), RELOADABLE)
        key_store = self.key_store
        if new.authorization_enabled and new.oauth is not None:
            oauth = new.oauth
            key_store = KeyStore(
                reactor=self.reactor, token_keys_file=oauth.token_keys_file, token_keys_url=oauth.token_keys_url,
                uaa_domain=oauth.uaa_domain, allow_insecure_loopback=self._allow_insecure_loopback,
            )
        effective = dataclasses.replace(old, oauth=new.oauth if new.oauth is not None else old.oauth)
        authorizers = {label: self._authorizer(effective, fe, label, key_store)
                       for label, (fe, _factory) in self.front_ends.items()}
        # Nothing above changed the running service; from here on nothing can fail.
        self.config = effective
        self.key_store = key_store
        for label, (_fe, factory) in self.front_ends.items():
            factory.authorizer = authorizers[label]
        reload.log_restart_needed(restart)
        log.info("configuration reloaded; applied: {keys}", keys=", ".join(applicable) or "(no change)")

    def startService(self) -> None:
        """Start the listeners (bound already in ``privilegedStartService``); as the process, also the signal
        handlers and the configuration file watch."""
        self.draining = False
        super().startService()
        if self._process_control:
            reload.take_process_control(self.reactor, self.reload, self.reloader)

    # ------------------------------------------------------------------ drain

    def stopService(self) -> Deferred[Any]:
        """Drain, then stop: see the module docstring. Fires once every tunnel closed (at most about
        ``shutdown.drainTimeoutSeconds`` plus a few seconds); the metrics listener stops last, so that ``/ready``
        answers 503 during the drain."""
        self.draining = True
        if self.reloader is not None:
            self.reloader.stop()
        grace = float(self.config.shutdown.drain_timeout_seconds)
        accepting = [s for s in (self.socks_listener, self.http_listener, self.tunnel_listener, self.ingress_listener)
                     if s is not None]
        stopped = gatherResults([maybeDeferred(s.stopService) for s in accepting], consumeErrors=True)
        tunnels = [t for t in self.tunnel_factory.tunnels if not t.lost]
        streams = sum(len(t.streams) for t in tunnels)
        log.info(
            "draining: {tunnels} connector tunnels told GOAWAY, {streams} streams may finish within {grace}s",
            tunnels=len(tunnels), streams=streams, grace=grace,
        )
        for tunnel in tunnels:
            if tunnel.session.ready:
                tunnel.drain(ErrorCode.SHUTTING_DOWN, "proxy shutting down", grace=grace)
            else:
                tunnel.close_transport()
        closed: Deferred[Any] = DeferredList([stopped, *(t.closed for t in tunnels)], consumeErrors=True)
        closed.addTimeout(grace + CLOSE_MARGIN, self.reactor)
        closed.addErrback(lambda _f: log.warn("drain: tunnels still open after the deadline; stopping anyway"))

        def finish(_: object) -> Deferred[Any]:
            log.info("drained; stopping")
            Service.stopService(self)
            rest = [maybeDeferred(child.stopService) for child in reversed(list(self)) if child.running]
            return DeferredList(rest, consumeErrors=True)

        closed.addCallback(finish)
        return closed
