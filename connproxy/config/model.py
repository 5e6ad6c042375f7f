"""The configuration as frozen dataclasses, for both roles (fields are snake_case; keys are camelCase).

Constructing these directly (or with :func:`dataclasses.replace`) does not validate; call
:func:`connproxy.config.check_proxy_config`/:func:`~connproxy.config.check_connector_config` for the cross-field
rules. Access-rule *evaluation* (which rule serves a host and port, which path a rule admits) is
:mod:`connproxy.connector.acl`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Final

from connproxy.pki.state import DEV_SUBACCOUNT
from connproxy.wire import session as wire_defaults

DEFAULT_TUNNEL_PORT: Final = 8042
DEFAULT_HTTP_PORT: Final = 20003
DEFAULT_SOCKS5_PORT: Final = 20004
DEFAULT_METRICS_PORT: Final = 9494
DEFAULT_CONNECTOR_METRICS_PORT: Final = 9495
DEFAULT_INGRESS_PORT: Final = 8043

TENANT_MODES: Final = ("dedicated", "shared")
HIGH_AVAILABILITY_MODES: Final = ("off", "path", "subdomain")
LOG_FORMATS: Final = ("console", "json")
LOG_LEVELS: Final = ("debug", "info", "warn", "error")
#: Access-rule protocols: the scheme used towards the backend.
PROTOCOLS: Final = ("HTTP", "HTTPS", "TCP", "TCP_TLS")
HOST_IN_HEADER: Final = ("virtual", "internal")


# --------------------------------------------------------------------------------------------------------
# shared dataclasses


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for one TLS endpoint; ``None`` means "use the development PKI" (see :mod:`connproxy.pki.state`).

    ``ca_file`` is ``clientCaFile`` for the proxy (the CA that signs connector certificates) and ``caFile``
    for the connector (the CA that signs the proxy's certificate).
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None


@dataclass(frozen=True)
class TunnelTuning:
    """Tunnel protocol limits and timers (key ``tunnel``, the same block in both configurations)."""

    stream_window_bytes: int = wire_defaults.DEFAULT_STREAM_WINDOW
    connection_window_bytes: int = wire_defaults.DEFAULT_CONNECTION_WINDOW
    max_frame_bytes: int = wire_defaults.DEFAULT_MAX_FRAME
    max_streams: int = wire_defaults.DEFAULT_MAX_STREAMS
    ping_interval_seconds: float = wire_defaults.DEFAULT_PING_INTERVAL_SECONDS
    dead_after_seconds: float = wire_defaults.DEFAULT_DEAD_AFTER_SECONDS
    open_timeout_seconds: float = wire_defaults.DEFAULT_OPEN_TIMEOUT_SECONDS
    #: A stream whose buffered data makes no progress for this long is reset (STREAM_STALLED).
    stall_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class ShutdownConfig:
    """``shutdown``: the drain on SIGTERM (both configurations)."""

    drain_timeout_seconds: float = 20.0


# --------------------------------------------------------------------------------------------------------
# proxy dataclasses


@dataclass(frozen=True)
class IngressListenerConfig:
    """``servers.businessDataTunnel.ingress``: a plain-HTTP tunnel listener for an ingress that terminates TLS.

    Only ``GET /healthcheck`` and the HTTP/1.1 ``Upgrade`` to the tunnel are served; the connector's verified
    client certificate comes in ``client_certificate_header`` (NGINX ``ssl-client-cert``: URL-encoded PEM; Envoy
    ``x-forwarded-client-cert``: ``Cert="..."``), believed only from ``trusted_sources`` (CIDRs).
    """

    enabled: bool = False
    port: int = DEFAULT_INGRESS_PORT
    bind_address: str = "0.0.0.0"
    #: Stored lower-case.
    client_certificate_header: str = "ssl-client-cert"
    #: Normalised networks (``10.1.2.3`` becomes ``10.1.2.3/32``).
    trusted_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class TunnelListenerConfig:
    """``servers.businessDataTunnel``: the TLS listener connectors dial.

    ``external_port`` (what connectors are told to dial) defaults to ``port``, or 8042 when ``port`` is 0.
    """

    port: int = DEFAULT_TUNNEL_PORT
    bind_address: str = "0.0.0.0"
    external_host: str = "localhost"
    external_port: int = DEFAULT_TUNNEL_PORT
    tls: TlsFiles = field(default_factory=TlsFiles)
    #: Tunnels one certificate identity (subaccount and bound location; not the connector id) may hold at once.
    max_tunnels_per_identity: int = 4
    #: Streams open at once for one tenant, over all its tunnels.
    max_streams_per_tenant: int = 10_000
    #: Connections to the tunnel port at once (tunnels, health checks, handshakes); further ones are closed at accept.
    max_connections: int = 10_000
    #: Connections from one source address to the tunnel port at once.
    max_connections_per_client: int = 1_000
    #: Connections still in their TLS handshake; at the limit the oldest of them is aborted for a new one.
    max_pending_handshakes: int = 1_000
    #: A connection that has not completed its TLS handshake this long after accept is aborted.
    handshake_timeout_seconds: float = 10.0
    ingress: IngressListenerConfig = field(default_factory=IngressListenerConfig)


@dataclass(frozen=True)
class FrontEndConfig:
    """``servers.proxy.socks5`` (and the common part of ``servers.proxy.http``)."""

    enabled: bool = True
    port: int = DEFAULT_SOCKS5_PORT
    enable_proxy_authorization: bool = True
    allow_remote_connections: bool = True
    #: Connections to this front end at once; None: ``clientConnection.max_connections``.
    max_connections: int | None = None


@dataclass(frozen=True)
class HttpFrontEndConfig(FrontEndConfig):
    """``servers.proxy.http``: the HTTP proxy front end, with its request-size limits."""

    port: int = DEFAULT_HTTP_PORT
    allow_connect: bool = True
    max_line_bytes: int = 8192
    max_header_bytes: int = 65536


@dataclass(frozen=True)
class OAuthConfig:
    """``servers.proxy.authorization.oauth``: how JWTs in ``Proxy-Authorization`` are verified."""

    allowed_client_ids: tuple[str, ...] = ()
    token_keys_file: str | None = None
    token_keys_url: str | None = None
    uaa_domain: str | None = None
    leeway_seconds: int = 30


@dataclass(frozen=True)
class ClientConnectionConfig:
    """``servers.proxy.clientConnection``: timeouts for application connections to the front ends."""

    idle_timeout_seconds: float = 3600.0
    handshake_timeout_seconds: float = 30.0
    first_byte_timeout_seconds: float = 120.0
    #: A request body that makes no progress for this long ends the exchange (408 before any answer).
    body_timeout_seconds: float = 60.0
    #: Connections per front end at once (unless the front end sets its own); further ones are closed at accept.
    max_connections: int = 10_000
    #: Connections from one client address per front end at once.
    max_connections_per_client: int = 1_000
    #: The listen backlog of the front ends and the tunnel listener.
    listen_backlog: int = 1024


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics.prometheus``: the Prometheus endpoint (``/metrics``)."""

    enabled: bool = True
    port: int = DEFAULT_METRICS_PORT
    bind_address: str = "0.0.0.0"


@dataclass(frozen=True)
class LoggingConfig:
    """``logging``: ``format`` is ``console`` or ``json``; ``level`` is ``debug|info|warn|error``."""

    format: str = "console"
    level: str = "info"


@dataclass(frozen=True)
class ReadinessConfig:
    """``readiness``: what ``/ready`` on the metrics port reports."""

    #: Not ready while no connector tunnel is registered.
    require_connector: bool = False


@dataclass(frozen=True)
class HighAvailabilityConfig:
    """``highAvailability``: this replica's name and the replica set (docs/high-availability.md).

    ``replica_name`` ``None`` means ``$POD_NAME``, else the host name. The set is ``replicas`` (a static list)
    or, with ``headless_service``, the pods ``<statefulset>-<n>.<headlessService>`` that resolve, looked up every
    ``discovery_interval_seconds``; with neither, the set is this replica alone.
    """

    replica_name: str | None = None
    replicas: tuple[str, ...] = ()
    headless_service: str | None = None
    discovery_interval_seconds: float = 10.0


@dataclass(frozen=True)
class ProxyConfig:
    """The whole proxy configuration (see ``contract.md``)."""

    tenant_mode: str = "dedicated"
    subaccount_id: str | None = None
    high_availability_mode: str = "off"
    high_availability: HighAvailabilityConfig = field(default_factory=HighAvailabilityConfig)
    tunnel_listener: TunnelListenerConfig = field(default_factory=TunnelListenerConfig)
    http: HttpFrontEndConfig = field(default_factory=HttpFrontEndConfig)
    socks5: FrontEndConfig = field(default_factory=FrontEndConfig)
    oauth: OAuthConfig | None = None
    client_connection: ClientConnectionConfig = field(default_factory=ClientConnectionConfig)
    tunnel: TunnelTuning = field(default_factory=TunnelTuning)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    readiness: ReadinessConfig = field(default_factory=ReadinessConfig)

    @staticmethod
    def interface_for(front_end: FrontEndConfig) -> str:
        """The address a front end listens on: ``127.0.0.1`` unless ``allowRemoteConnections``."""
        return "0.0.0.0" if front_end.allow_remote_connections else "127.0.0.1"

    @property
    def authorization_enabled(self) -> bool:
        """Whether any enabled front end requires a token (so :attr:`oauth` is set and complete)."""
        return any(
            fe.enabled and fe.enable_proxy_authorization for fe in (self.http, self.socks5)
        )


# --------------------------------------------------------------------------------------------------------
# connector dataclasses


@dataclass(frozen=True)
class ProxyEndpointConfig:
    """``proxy``: where the connector dials the proxy's tunnel listener.

    ``server_name`` is the name verified in the proxy's certificate (and sent as SNI); ``None`` means
    ``host`` (use :attr:`verify_name`).
    """

    host: str = "localhost"
    port: int = DEFAULT_TUNNEL_PORT
    server_name: str | None = None
    #: ``off``: one tunnel; ``path``/``subdomain``: one tunnel per replica the proxy announces, reached through
    #: ``host:port`` by HTTP/1.1 Upgrade at ``/connectivity-proxy-<n>`` or by SNI ``connectivity-proxy-<n>.<host>``.
    high_availability_mode: str = "off"

    @property
    def verify_name(self) -> str:
        """The name to verify in the proxy's certificate: ``server_name``, else ``host``."""
        return self.server_name if self.server_name is not None else self.host


@dataclass(frozen=True)
class CorporateProxyConfig:
    """``corporateProxy``: an HTTP proxy the connector tunnels through with ``CONNECT`` (docs/high-availability.md).

    ``url`` is ``http://[user:password@]host:port`` (Basic credentials). Without ``url`` and with
    ``use_environment``, ``HTTPS_PROXY``/``https_proxy`` and ``NO_PROXY``/``no_proxy`` are read at start-up.
    ``no_proxy`` lists host names (a leading dot or ``*.`` matches subdomains), IP addresses or CIDRs that are
    dialled directly (stored stripped and lower-case).
    """

    url: str | None = None
    no_proxy: tuple[str, ...] = ()
    use_environment: bool = True


@dataclass(frozen=True)
class ReconnectConfig:
    """``reconnect``: back-off for (re)connecting to the proxy."""

    initial_delay_seconds: float = 0.2
    #: Low, so that a restarted proxy (replica) is found again within about 2 s of listening: while one is down,
    #: each connector dials it about once a second (a refused dial or an ingress 502 costs little).
    max_delay_seconds: float = 2.0
    fast_retries: int = 3


@dataclass(frozen=True)
class BackendConfig:
    """``backend``: connections from the connector to internal systems."""

    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class Resource:
    """One allowed URL path of an HTTP(S) access rule (:func:`connproxy.connector.acl.resource_allows`)."""

    path: str
    all_sub_paths: bool = False
    upgrade_allowed: bool = False


@dataclass(frozen=True)
class AccessRule:
    """One ``accessControl`` entry: a virtual host and port (range) exposed by the connector.

    ``virtual_host`` is stored normalised (IP literals compressed, without brackets; names lower-case).
    ``virtual_ports`` and ``internal_ports`` are inclusive ``(first, last)`` ranges of equal length.
    """

    virtual_host: str
    virtual_ports: tuple[int, int]
    internal_host: str
    internal_ports: tuple[int, int]
    protocol: str
    host_in_header: str = "virtual"
    ca_file: str | None = None
    resources: tuple[Resource, ...] = ()


@dataclass(frozen=True)
class ConnectorConfig:
    """The whole connector configuration (see ``contract.md``)."""

    subaccount_id: str = DEV_SUBACCOUNT
    location_id: str = ""
    connector_id: str = field(default_factory=socket.gethostname)
    proxy: ProxyEndpointConfig = field(default_factory=ProxyEndpointConfig)
    tls: TlsFiles = field(default_factory=TlsFiles)
    tunnel: TunnelTuning = field(default_factory=TunnelTuning)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    corporate_proxy: CorporateProxyConfig = field(default_factory=CorporateProxyConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    access_control: tuple[AccessRule, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    #: The connector's own Prometheus endpoint (off unless enabled; loopback by default).
    metrics: MetricsConfig = field(
        default_factory=lambda: MetricsConfig(enabled=False, port=DEFAULT_CONNECTOR_METRICS_PORT,
                                              bind_address="127.0.0.1"))
