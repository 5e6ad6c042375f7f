"""The proxy's configuration: its keys (declared once, in :data:`PROXY_KEYS`), the parser, the cross-field rules
and the embedded defaults.

To add a key: declare it in :data:`PROXY_KEYS` (name, type, default, one-line meaning; the default usually the
dataclass field's), give the dataclass a field with that default, read it in :func:`build_proxy_config` with
``section.get("name")``, and regenerate the reference (``python -m connproxy.config.reference >
docs/configuration.md``). Tests fail if the parser does not read a declared key or the reference is stale.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from connproxy.config.common import (
    HIGH_AVAILABILITY_MODE,
    LOGGING_KEY,
    SHUTDOWN_KEY,
    TUNNEL_KEY,
    check_tls_pair,
    check_tunnel,
    read_logging,
    read_shutdown,
    read_tls,
    read_tunnel,
    tls_key,
)
from connproxy.config.model import (
    DEFAULT_HTTP_PORT,
    DEFAULT_INGRESS_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_SOCKS5_PORT,
    DEFAULT_TUNNEL_PORT,
    TENANT_MODES,
    ClientConnectionConfig,
    FrontEndConfig,
    HighAvailabilityConfig,
    HttpFrontEndConfig,
    IngressListenerConfig,
    MetricsConfig,
    OAuthConfig,
    ProxyConfig,
    ReadinessConfig,
    TunnelListenerConfig,
)
from connproxy.config.reader import (
    MISSING,
    BindAddress,
    Bool,
    Choice,
    Context,
    Custom,
    FilePath,
    Integer,
    Key,
    Port,
    Seconds,
    Section,
    Text,
    block,
    read_yaml,
    show,
)
from connproxy.pki.state import DEV_SUBACCOUNT

__all__ = [
    "PROXY_KEYS",
    "check_proxy_config",
    "embedded_proxy_config",
    "load_proxy_config",
    "proxy_config_from_mapping",
    "token_keys_url_problem",
    "uaa_domain_problem",
]

OAUTH_PATH: Final = "servers.proxy.authorization.oauth"
_DOMAIN: Final = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_URL_CHARS: Final = re.compile(r"[!-~]+")  # printable ASCII, no space
_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token
HA_PATH: Final = "highAvailability"
INGRESS_PATH: Final = "servers.businessDataTunnel.ingress"

#: SAP Connectivity proxy keys we recognise but do not implement, per section (for a better message).
SAP_ONLY_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "": frozenset({"subaccountSubdomain", "displayName", "serviceChannels", "multiRegionMode", "integration"}),
    "servers.businessDataTunnel": frozenset({"enableTls", "strictSniEnabled", "threadPoolSize"}),
    "servers.proxy": frozenset({"rfcAndLdap", "threadPoolSize"}),
    "servers.proxy.clientConnection": frozenset({"writeTimeoutSeconds"}),
    "metrics.prometheus": frozenset({"jvmMetrics", "jmxMetrics"}),
}
_OTHER_NAMES: Final = {("servers.businessDataTunnel.tls", "caFile"): "clientCaFile"}


# --------------------------------------------------------------------------------------------------------
# value rules shared with connproxy.proxy.auth (one rule, applied by the configuration; the key store trusts it)


def token_keys_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the JWKS URL (``tokenKeysUrl``), or ``None``.

    An ``https`` URL of printable ASCII, at most 2048 characters, with a host and a valid port, and without user
    information, fragment or backslash. Plain ``http`` is refused (also to loopback: the key store allows it only
    in tests, which build it directly).
    """
    if len(url) > 2048 or not _URL_CHARS.fullmatch(url) or "\\" in url:
        return f"not a valid URL: {show(url)}"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"not a valid URL: {show(url)}"
    if parts.scheme.lower() != "https" or not host:
        return f"must be an https:// URL, got {show(url)}"
    if "@" in parts.netloc or parts.fragment:
        return f"must not contain user information or a fragment, got {show(url)}"
    return None


def uaa_domain_problem(domain: str) -> str | None:
    """Why ``domain`` cannot be ``uaaDomain`` (a bare DNS domain), or ``None``."""
    if _DOMAIN.fullmatch(domain) is None:
        return ("expected a bare domain such as authentication.eu10.hana.ondemand.com "
                f"(no scheme, no port, no path), got {show(domain)}")
    return None


def _read_token_keys_url(section: Section, name: str, value: object) -> str:
    url = Text().read(section, name, value)
    problem = token_keys_url_problem(url)
    if problem is not None:
        raise section.fail(name, problem)
    return url


def _read_uaa_domain(section: Section, name: str, value: object) -> str:
    domain = Text().read(section, name, value)
    problem = uaa_domain_problem(domain)
    if problem is not None:
        raise section.fail(name, problem)
    return domain


def _read_client_ids(section: Section, name: str, value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise section.fail(name, f"expected a string or a non-empty list of strings, got {show(value)}")
    ids: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            where = f"{section.at(name)}[{index}]" if isinstance(value, list) else section.at(name)
            raise section.context.report(where, f"expected a non-empty string, got {show(item)}")
        if item not in ids:
            ids.append(item)
    return tuple(ids)


def _list(section: Section, name: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise section.fail(name, f"expected a list, got {show(value)}")
    return value


def _read_replicas(section: Section, name: str, value: object) -> tuple[str, ...]:
    """``highAvailability.replicas``: distinct replica names (one DNS label each, such as connectivity-proxy-0)."""
    names: list[str] = []
    for index, item in enumerate(_list(section, name, value)):
        if not isinstance(item, str) or not _DOMAIN.fullmatch(item) or "." in item:
            raise section.context.report(f"{section.at(name)}[{index}]",
                                         f"expected a replica name such as connectivity-proxy-0, got {show(item)}")
        names.append(item)
    if len(set(names)) != len(names):
        raise section.fail(name, "a replica is listed twice")
    return tuple(names)


def _read_dns_name(section: Section, name: str, value: object) -> str:
    text = Text().read(section, name, value)
    if not _DOMAIN.fullmatch(text):
        raise section.fail(name, f"expected a DNS name, got {show(text)}")
    return text


def _read_discovery_interval(section: Section, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise section.fail(name, f"expected a number >= 1, got {show(value)}")
    return float(value)


def _read_trusted_sources(section: Section, name: str, value: object) -> tuple[str, ...]:
    """``ingress.trustedSources``: IP addresses or CIDRs, normalised to networks (``10.1.2.3`` -> ``10.1.2.3/32``;
    host bits are dropped)."""
    sources: list[str] = []
    for index, item in enumerate(_list(section, name, value)):
        try:
            sources.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise section.context.report(
                f"{section.at(name)}[{index}]",
                f"expected an IP address or CIDR such as 10.0.0.0/8, got {show(item)}") from None
    return tuple(sources)


def _read_header_name(section: Section, name: str, value: object) -> str:
    header = Text().read(section, name, value)
    if not _HEADER_NAME.fullmatch(header):
        raise section.fail(name, f"expected an HTTP header name, got {show(header)}")
    return header.lower()


# --------------------------------------------------------------------------------------------------------
# the keys

_FE: Final = FrontEndConfig()
_HTTP: Final = HttpFrontEndConfig()
_CLIENT: Final = ClientConnectionConfig()
_LISTENER: Final = TunnelListenerConfig()
_INGRESS: Final = IngressListenerConfig()
_HA: Final = HighAvailabilityConfig()


def _front_end_keys(port: int, name: str) -> tuple[Key, ...]:
    return (
        Key("enabled", Bool(), _FE.enabled, f"Run the {name} front end."),
        Key("port", Port(listener=True), port, f"Port of the {name} front end."),
        Key("enableProxyAuthorization", Bool(), _FE.enable_proxy_authorization,
            "Require a JWT from callers (servers.proxy.authorization.oauth). false: trusted mode, every caller "
            "that can reach the port is served."),
        Key("allowRemoteConnections", Bool(), _FE.allow_remote_connections,
            "true: listen on all interfaces (0.0.0.0); false: loopback (127.0.0.1) only.", exposes=True),
        Key("maxConnections", Integer(1, 1_000_000), None,
            f"Connections to the {name} front end at once, where it needs another limit than "
            "servers.proxy.clientConnection.maxConnections (for example many SOCKS5 streams beside a small "
            "HTTP proxy within one open-file limit); further ones are closed at accept.",
            default_text="servers.proxy.clientConnection.maxConnections"),
    )


PROXY_KEYS: Final[tuple[Key, ...]] = (
    Key("tenantMode", Choice(TENANT_MODES), "dedicated",
        "dedicated: one tenant, subaccountId; shared: the tenant comes from each caller's token "
        "(ext_attr.subaccountid, else zid)."),
    Key("subaccountId", Text(), None, "The tenant in dedicated mode (required there; ignored in shared mode).",
        default_text="(required in dedicated mode)"),
    Key("highAvailabilityMode", HIGH_AVAILABILITY_MODE, "off",
        "How connectors reach one replica of several (see docs/high-availability.md)."),
    block(
        "highAvailability", "This replica's name and the replica set, announced to connectors "
        "(see docs/high-availability.md).",
        Key("replicaName", Text(), _HA.replica_name, "This replica's name (connectivity-proxy-<n>).",
            default_text="$POD_NAME, else the host name"),
        Key("replicas", Custom("list of replica names", _read_replicas), _HA.replicas,
            "A static replica set; leave out with headlessService.", default_text="[] (this replica alone)"),
        Key("headlessService", Custom("DNS name", _read_dns_name), _HA.headless_service,
            "Discover the set: the pods <statefulset>-<n>.<headlessService> that resolve; not with replicas."),
        Key("discoveryIntervalSeconds", Custom("seconds >= 1", _read_discovery_interval),
            _HA.discovery_interval_seconds, "How often headlessService is looked up."),
    ),
    block(
        "servers", "The listeners.",
        block(
            "businessDataTunnel", "The TLS listener connectors dial (also GET /healthcheck).",
            Key("port", Port(listener=True), DEFAULT_TUNNEL_PORT, "Listening port."),
            Key("bindAddress", BindAddress(), _LISTENER.bind_address, "Address to listen on.", exposes=True),
            Key("externalHost", Text(), _LISTENER.external_host, "The name connectors use to reach the proxy."),
            Key("externalPort", Port(listener=False), MISSING, "The port connectors use to reach the proxy.",
                default_text="port (8042 if port is 0)"),
            tls_key("Server certificate of the tunnel listener and the CA of connector certificates. Left out: "
                    "the development PKI minted into the state folder (not for production).",
                    "clientCaFile", "PEM CA certificate(s) that sign connector client certificates."),
            Key("maxTunnelsPerIdentity", Integer(1, 1_000_000), _LISTENER.max_tunnels_per_identity,
                "Tunnels one certificate identity may hold at once: its subaccount and the location it binds (or "
                "none); not the connector id, which the certificate holder chooses in the HELLO."),
            Key("maxStreamsPerTenant", Integer(1, 10_000_000), _LISTENER.max_streams_per_tenant,
                "Streams open at once for one tenant, over all its tunnels."),
            Key("maxConnections", Integer(1, 1_000_000), _LISTENER.max_connections,
                "Connections to the tunnel port at once (tunnels, health checks, handshakes); further ones are "
                "closed at accept."),
            Key("maxConnectionsPerClient", Integer(1, 1_000_000), _LISTENER.max_connections_per_client,
                "Connections from one source address to the tunnel port at once."),
            Key("maxPendingHandshakes", Integer(1, 1_000_000), _LISTENER.max_pending_handshakes,
                "Connections still in their TLS handshake; at the limit the oldest of them is aborted for a new "
                "one."),
            Key("handshakeTimeoutSeconds", Seconds(), _LISTENER.handshake_timeout_seconds,
                "A connection that has not completed its TLS handshake this long after accept is aborted."),
            block(
                "ingress", "A plain-HTTP tunnel listener behind an ingress that terminates TLS and forwards the "
                "connector's client certificate (GET /healthcheck and the HTTP/1.1 Upgrade to the tunnel only).",
                Key("enabled", Bool(), _INGRESS.enabled, "Run the ingress listener."),
                Key("port", Port(listener=True), DEFAULT_INGRESS_PORT, "Listening port."),
                Key("bindAddress", BindAddress(), _INGRESS.bind_address, "Address to listen on.", exposes=True),
                Key("clientCertificateHeader", Custom("HTTP header name", _read_header_name),
                    _INGRESS.client_certificate_header,
                    "Header carrying the verified client certificate (NGINX ssl-client-cert: URL-encoded PEM; "
                    "Envoy x-forwarded-client-cert)."),
                Key("trustedSources", Custom("list of IP addresses or CIDRs", _read_trusted_sources),
                    _INGRESS.trusted_sources,
                    "Peers whose certificate header is believed (the ingress); required if enabled.",
                    default_text="[] (required if enabled)"),
            ),
        ),
        block(
            "proxy", "The front ends applications use.",
            block("http", "The HTTP proxy.", *_front_end_keys(DEFAULT_HTTP_PORT, "HTTP proxy"),
                  Key("allowConnect", Bool(), _HTTP.allow_connect, "Accept CONNECT requests (tunnelled TCP)."),
                  Key("maxLineBytes", Integer(1024, 16 * 1024 * 1024), _HTTP.max_line_bytes,
                      "Longest request line accepted."),
                  Key("maxHeaderBytes", Integer(1024, 64 * 1024 * 1024), _HTTP.max_header_bytes,
                      "Largest request header block accepted; at least maxLineBytes.")),
            block("socks5", "The SOCKS5 proxy.", *_front_end_keys(DEFAULT_SOCKS5_PORT, "SOCKS5")),
            block(
                "authorization", "How proxy callers are authorized.",
                block(
                    "oauth", "JWT verification (required where enableProxyAuthorization is true).",
                    Key("allowedClientId", Custom("string or list of strings", _read_client_ids), (),
                        "Client ids (client_id, else cid) whose tokens are accepted.",
                        default_text="(required where authorization is on)"),
                    Key("tokenKeysFile", FilePath(), None, "JWKS file of trusted token keys, read at start-up.",
                        default_text="(one key source is required where authorization is on)"),
                    Key("tokenKeysUrl", Custom("https URL", _read_token_keys_url), None,
                        "JWKS URL of trusted token keys, fetched on first use and for unknown key ids."),
                    Key("uaaDomain", Custom("domain", _read_uaa_domain), None,
                        "Trust a token's jku header if its host is this domain or below it (XSUAA)."),
                    Key("leewaySeconds", Integer(0), OAuthConfig().leeway_seconds,
                        "Clock skew allowed for exp, nbf and iat."),
                ),
            ),
            block(
                "clientConnection", "Application connections to the front ends.",
                Key("idleTimeoutSeconds", Seconds(), _CLIENT.idle_timeout_seconds,
                    "A connection with no traffic for this long is closed."),
                Key("handshakeTimeoutSeconds", Seconds(), _CLIENT.handshake_timeout_seconds,
                    "Time for the SOCKS5 handshake or the HTTP request head."),
                Key("firstByteTimeoutSeconds", Seconds(), _CLIENT.first_byte_timeout_seconds,
                    "Time for the backend's first response byte (HTTP)."),
                Key("bodyTimeoutSeconds", Seconds(), _CLIENT.body_timeout_seconds,
                    "The request body's timeout window: each window of this many seconds must carry at least 100 "
                    "bytes per second of it (at least 1 byte), else 408; a body held back by the tunnel's flow "
                    "control does not count against the client."),
                Key("maxConnections", Integer(1, 1_000_000), _CLIENT.max_connections,
                    "Connections per front end at once; further ones are closed at accept."),
                Key("maxConnectionsPerClient", Integer(1, 1_000_000), _CLIENT.max_connections_per_client,
                    "Connections from one client address per front end at once."),
                Key("listenBacklog", Integer(1, 65535), _CLIENT.listen_backlog,
                    "Listen backlog of the front ends and the tunnel listener."),
            ),
        ),
    ),
    TUNNEL_KEY,
    block(
        "metrics", "Monitoring.",
        block("prometheus", "The Prometheus endpoint (/metrics, also /ready).",
              Key("enabled", Bool(), MetricsConfig.enabled, "Serve metrics."),
              Key("port", Port(listener=True), DEFAULT_METRICS_PORT, "Metrics port."),
              Key("bindAddress", BindAddress(), MetricsConfig.bind_address, "Address to listen on.",
                  exposes=True)),
    ),
    LOGGING_KEY,
    SHUTDOWN_KEY,
    block("readiness", "What /ready on the metrics port reports.",
          Key("requireConnector", Bool(), ReadinessConfig.require_connector,
              "Not ready while no connector tunnel is registered.")),
)


# --------------------------------------------------------------------------------------------------------
# parsing


def _front_end(section: Section) -> dict[str, Any]:
    return {
        "enabled": section.get("enabled"),
        "port": section.get("port"),
        "enable_proxy_authorization": section.get("enableProxyAuthorization"),
        "allow_remote_connections": section.get("allowRemoteConnections"),
        "max_connections": section.get("maxConnections"),
    }


def _read_oauth(proxy: Section) -> OAuthConfig | None:
    authorization = proxy.section("authorization")
    if not authorization.has("oauth"):
        return None
    section = authorization.section("oauth")
    return OAuthConfig(
        allowed_client_ids=section.get("allowedClientId"),
        token_keys_file=section.get("tokenKeysFile"),
        token_keys_url=section.get("tokenKeysUrl"),
        uaa_domain=section.get("uaaDomain"),
        leeway_seconds=section.get("leewaySeconds"),
    )


def build_proxy_config(data: Mapping[str, Any] | None, context: Context) -> ProxyConfig:
    """A :class:`ProxyConfig` from parsed YAML; problems (bad values, which then keep their defaults, and broken
    cross-field rules) are recorded in ``context``, not raised."""
    context.sap_only = SAP_ONLY_KEYS
    context.other_names = _OTHER_NAMES
    root = Section(data, "", PROXY_KEYS, context)
    servers = root.section("servers")
    bdt = servers.section("businessDataTunnel")
    tunnel_port = bdt.get("port")
    ingress = bdt.section("ingress")
    listener = TunnelListenerConfig(
        port=tunnel_port,
        bind_address=bdt.get("bindAddress"),
        external_host=bdt.get("externalHost"),
        # Connectors reach a non-default listener port unless told otherwise.
        external_port=bdt.get("externalPort", tunnel_port or DEFAULT_TUNNEL_PORT),
        tls=read_tls(bdt, "clientCaFile"),
        max_tunnels_per_identity=bdt.get("maxTunnelsPerIdentity"),
        max_streams_per_tenant=bdt.get("maxStreamsPerTenant"),
        max_connections=bdt.get("maxConnections"),
        max_connections_per_client=bdt.get("maxConnectionsPerClient"),
        max_pending_handshakes=bdt.get("maxPendingHandshakes"),
        handshake_timeout_seconds=bdt.get("handshakeTimeoutSeconds"),
        ingress=IngressListenerConfig(
            enabled=ingress.get("enabled"),
            port=ingress.get("port"),
            bind_address=ingress.get("bindAddress"),
            client_certificate_header=ingress.get("clientCertificateHeader"),
            trusted_sources=ingress.get("trustedSources"),
        ),
    )
    proxy = servers.section("proxy")
    http = proxy.section("http")
    client = proxy.section("clientConnection")
    metrics = root.section("metrics").section("prometheus")
    ha = root.section("highAvailability")
    config = ProxyConfig(
        tenant_mode=root.get("tenantMode"),
        subaccount_id=root.get("subaccountId"),
        high_availability_mode=root.get("highAvailabilityMode"),
        high_availability=HighAvailabilityConfig(
            replica_name=ha.get("replicaName"),
            replicas=ha.get("replicas"),
            headless_service=ha.get("headlessService"),
            discovery_interval_seconds=ha.get("discoveryIntervalSeconds"),
        ),
        tunnel_listener=listener,
        http=HttpFrontEndConfig(
            **_front_end(http),
            allow_connect=http.get("allowConnect"),
            max_line_bytes=http.get("maxLineBytes"),
            max_header_bytes=http.get("maxHeaderBytes"),
        ),
        socks5=FrontEndConfig(**_front_end(proxy.section("socks5"))),
        oauth=_read_oauth(proxy),
        client_connection=ClientConnectionConfig(
            idle_timeout_seconds=client.get("idleTimeoutSeconds"),
            handshake_timeout_seconds=client.get("handshakeTimeoutSeconds"),
            first_byte_timeout_seconds=client.get("firstByteTimeoutSeconds"),
            body_timeout_seconds=client.get("bodyTimeoutSeconds"),
            max_connections=client.get("maxConnections"),
            max_connections_per_client=client.get("maxConnectionsPerClient"),
            listen_backlog=client.get("listenBacklog"),
        ),
        tunnel=read_tunnel(root),
        metrics=MetricsConfig(
            enabled=metrics.get("enabled"), port=metrics.get("port"), bind_address=metrics.get("bindAddress")
        ),
        logging=read_logging(root),
        shutdown=read_shutdown(root),
        readiness=ReadinessConfig(require_connector=root.section("readiness").get("requireConnector")),
    )
    proxy_cross_field_problems(config, context)
    return config


def proxy_config_from_mapping(
    data: Mapping[str, Any] | None, base_dir: str | os.PathLike[str] | None = None
) -> ProxyConfig:
    """Build and validate a :class:`ProxyConfig` from parsed YAML (``None`` counts as an empty mapping).

    Relative file paths are resolved against ``base_dir`` if given. The files are not looked at (see
    :func:`connproxy.config.verify_proxy_config`).

    :raises ConfigError: every unknown key, bad value and broken cross-field rule, one line each.
    """
    context = Context(base_dir=None if base_dir is None else Path(base_dir))
    config = build_proxy_config(data, context)
    context.raise_problems()
    return config


def proxy_cross_field_problems(config: ProxyConfig, context: Context) -> None:
    """Record the broken cross-field rules of ``config`` in ``context`` (rules involving a key that already had a
    problem are skipped):

    * dedicated mode requires ``subaccountId``;
    * an enabled front end with ``enableProxyAuthorization`` requires ``allowedClientId`` and a key source
      (``tokenKeysFile``, ``tokenKeysUrl`` or ``uaaDomain``);
    * ``certFile``/``keyFile`` come in pairs; ``maxHeaderBytes >= maxLineBytes``;
    * ``tunnel.connectionWindowBytes >= streamWindowBytes``, ``deadAfterSeconds > pingIntervalSeconds``;
    * ``highAvailability``: ``replicas`` or ``headlessService``, not both;
    * an enabled ingress listener requires ``trustedSources``;
    * enabled listeners do not share a port (0 excepted).
    """
    if config.tenant_mode == "dedicated" and not config.subaccount_id and not context.is_bad(
            "subaccountId", "tenantMode"):
        context.report("subaccountId", "is required if tenantMode is dedicated")
    requiring = [f"servers.proxy.{name}" for name, fe in (("http", config.http), ("socks5", config.socks5))
                 if fe.enabled and fe.enable_proxy_authorization]
    if requiring and not context.is_bad(OAUTH_PATH):
        why = f"if enableProxyAuthorization is true ({', '.join(requiring)})"
        oauth = config.oauth
        if oauth is None or not oauth.allowed_client_ids:
            context.report(f"{OAUTH_PATH}.allowedClientId", f"is required {why}")
        if oauth is None or (oauth.token_keys_file is None and oauth.token_keys_url is None
                             and oauth.uaa_domain is None):
            context.report(OAUTH_PATH, f"tokenKeysFile, tokenKeysUrl or uaaDomain is required {why}")
    check_tls_pair(config.tunnel_listener.tls, "servers.businessDataTunnel.tls", context)
    if config.http.max_header_bytes < config.http.max_line_bytes and not context.is_bad(
            "servers.proxy.http.maxHeaderBytes", "servers.proxy.http.maxLineBytes"):
        context.report("servers.proxy.http.maxHeaderBytes", "must be at least servers.proxy.http.maxLineBytes")
    check_tunnel(config.tunnel, context)
    ha = config.high_availability
    if ha.headless_service is not None and ha.replicas and not context.is_bad(
            f"{HA_PATH}.headlessService", f"{HA_PATH}.replicas"):
        context.report(f"{HA_PATH}.headlessService", "give either replicas or headlessService, not both")
    ingress = config.tunnel_listener.ingress
    if ingress.enabled and not ingress.trusted_sources and not context.is_bad(
            f"{INGRESS_PATH}.enabled", f"{INGRESS_PATH}.trustedSources"):
        context.report(f"{INGRESS_PATH}.trustedSources",
                       "is required if enabled is true (the addresses of the ingress)")
    used: dict[int, str] = {}
    for path, port in listener_ports(config):
        if port == 0 or context.is_bad(path):
            continue
        if port in used:
            context.report(path, f"port {port} is already used by {used[port]}")
        else:
            used[port] = path


def listener_ports(config: ProxyConfig) -> list[tuple[str, int]]:
    """(key path, port) of every enabled listener."""
    listeners = [("servers.businessDataTunnel.port", config.tunnel_listener.port)]
    if config.tunnel_listener.ingress.enabled:
        listeners.append((f"{INGRESS_PATH}.port", config.tunnel_listener.ingress.port))
    if config.http.enabled:
        listeners.append(("servers.proxy.http.port", config.http.port))
    if config.socks5.enabled:
        listeners.append(("servers.proxy.socks5.port", config.socks5.port))
    if config.metrics.enabled:
        listeners.append(("metrics.prometheus.port", config.metrics.port))
    return listeners


def check_proxy_config(config: ProxyConfig) -> None:
    """Check the cross-field rules of a proxy configuration (see :func:`proxy_cross_field_problems`).

    :raises ConfigError: every broken rule, one line each, naming the keys.
    """
    context = Context()
    proxy_cross_field_problems(config, context)
    context.raise_problems()


def load_proxy_config(path: str | os.PathLike[str]) -> ProxyConfig:
    """Load and validate a proxy configuration file (relative paths in it are relative to its folder). The files
    it names are not looked at (see :func:`connproxy.config.verify_proxy_config_file`).

    :raises ConfigError: the file cannot be read or is not YAML (one line), or every problem of the configuration.
    """
    return proxy_config_from_mapping(read_yaml(path), Path(path).resolve().parent)


def embedded_proxy_config() -> ProxyConfig:
    """The configuration the proxy runs with when no ``--config`` is given.

    Dedicated mode for :data:`~connproxy.pki.state.DEV_SUBACCOUNT`, trusted mode (no proxy authorization, no
    ``oauth`` block), front ends, tunnel listener and metrics on loopback only, default ports, TLS files
    from the development PKI.
    """
    loopback = "127.0.0.1"
    return ProxyConfig(
        tenant_mode="dedicated",
        subaccount_id=DEV_SUBACCOUNT,
        tunnel_listener=TunnelListenerConfig(bind_address=loopback),
        http=HttpFrontEndConfig(enable_proxy_authorization=False, allow_remote_connections=False),
        socks5=FrontEndConfig(enable_proxy_authorization=False, allow_remote_connections=False),
        oauth=None,
        metrics=MetricsConfig(bind_address=loopback),
    )
