"""The connector's configuration: its keys (declared once, in :data:`CONNECTOR_KEYS`), the parser, the cross-field
rules and the embedded defaults. Adding a key works as in :mod:`connproxy.config.proxy`."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
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
    DEFAULT_CONNECTOR_METRICS_PORT,
    DEFAULT_TUNNEL_PORT,
    HOST_IN_HEADER,
    PROTOCOLS,
    AccessRule,
    BackendConfig,
    ConnectorConfig,
    CorporateProxyConfig,
    MetricsConfig,
    ProxyEndpointConfig,
    ReconnectConfig,
    Resource,
)
from connproxy.config.paths import normalize_host, path_problem
from connproxy.config.reader import (
    MISSING,
    BindAddress,
    Bool,
    Choice,
    Context,
    Custom,
    Entries,
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
    "CONNECTOR_KEYS",
    "check_connector_config",
    "connector_config_from_mapping",
    "embedded_connector_config",
    "load_connector_config",
]

_HTTP_PROTOCOLS: Final = frozenset({"HTTP", "HTTPS"})
_TLS_PROTOCOLS: Final = frozenset({"HTTPS", "TCP_TLS"})
_PORT_SPEC: Final = re.compile(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?")
_OTHER_NAMES: Final = {("tls", "clientCaFile"): "caFile"}


def _read_host(section: Section, name: str, value: object) -> str:
    host = Text().read(section, name, value).strip()
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if any(ch.isspace() or ch in "/:@?#[]" for ch in host):
        raise section.fail(name, f"expected a host name or IP address, got {show(value)}")
    return host


def _read_port_spec(section: Section, name: str, allow_range: bool) -> tuple[int, int] | None:
    """``virtualPort``/``internalPort``: a port, or a range ``first-last`` where ``allow_range``; ``None`` if
    absent. :raises Invalid: a bad value (recorded)."""
    value = section.raw(name)
    if value is None:
        return None
    wanted = "an integer 1-65535" + (" or a range 'first-last'" if allow_range else "")
    if isinstance(value, int) and not isinstance(value, bool):
        first = last = value
    elif isinstance(value, str) and (match := _PORT_SPEC.fullmatch(value)):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
    else:
        raise section.fail(name, f"expected {wanted}, got {show(value)}")
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise section.fail(name, f"expected {wanted}, got {show(value)}")
    if first > last:
        raise section.fail(name, f"the range must not be descending, got {show(value)}")
    if first != last and not allow_range:
        raise section.fail(
            name, f"expected {wanted}, got {show(value)} (port ranges are only allowed for TCP and TCP_TLS)"
        )
    return (first, last)


def _read_resource_path(section: Section, name: str, value: object) -> str:
    path = Text().read(section, name, value)
    if not path.startswith("/"):
        raise section.fail(name, f"must start with '/', got {show(path)}")
    if any(ch.isspace() or ch in "?#" for ch in path):
        raise section.fail(name, f"must not contain whitespace, '?' or '#', got {show(path)}")
    problem = path_problem(path)
    if problem is not None:
        raise section.fail(name, f"must not contain '.' or '..' segments: {problem}, got {show(path)}")
    return path


def _read_proxy_url(section: Section, name: str, value: object) -> str:
    """``corporateProxy.url``: ``http://[user:password@]host:port``."""
    url = Text().read(section, name, value)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise section.fail(name, f"not a URL: {e}") from None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise section.fail(name, f"expected http://[user:password@]host:port, got {show(url)}")
    return url


def _read_no_proxy(section: Section, name: str, value: object) -> tuple[str, ...]:
    """``corporateProxy.noProxy``: a list, or one comma-separated string as in ``NO_PROXY``; entries stripped and
    lower-cased, empty ones dropped."""
    items: list[object] = list(value.split(",")) if isinstance(value, str) else (
        value if isinstance(value, list) else [value])
    no_proxy: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise section.fail(name, f"expected host names, addresses or CIDRs, got {show(item)}")
        if item.strip():
            no_proxy.append(item.strip().lower())
    return tuple(no_proxy)


def _unused(section: Section, name: str, value: object) -> Any:  # pragma: no cover - read by _read_port_spec
    raise AssertionError(f"{section.at(name)} depends on the protocol and is read by _read_port_spec")


_RECONNECT: Final = ReconnectConfig()
_CORPORATE: Final = CorporateProxyConfig()
_PORT_SPEC_TEXT: Final = "port 1-65535, or a range 'first-last' (TCP, TCP_TLS)"

CONNECTOR_KEYS: Final[tuple[Key, ...]] = (
    Key("subaccountId", Text(), MISSING, "The subaccount (tenant) this connector serves; required.",
        default_text="(required)"),
    Key("locationId", Text(allow_empty=True), "", "The location; absent or \"\" is the default location.",
        default_text='""'),
    Key("connectorId", Text(), MISSING, "This connector's name; connectors of one location need distinct ids.",
        default_text="the host name"),
    block("proxy", "Where the connector dials the proxy's tunnel listener.",
          Key("host", Custom("host name or IP address", _read_host), ProxyEndpointConfig.host, "Proxy host."),
          Key("port", Port(listener=False), DEFAULT_TUNNEL_PORT, "Proxy tunnel port."),
          Key("serverName", Text(), None, "Name verified in the proxy's certificate (and sent as SNI).",
              default_text="host"),
          Key("highAvailabilityMode", HIGH_AVAILABILITY_MODE, ProxyEndpointConfig.high_availability_mode,
              "off: one tunnel; path/subdomain: one tunnel per replica the proxy announces, reached through "
              "host:port by HTTP/1.1 Upgrade at /connectivity-proxy-<n> or by SNI connectivity-proxy-<n>.<host> "
              "(see docs/high-availability.md).")),
    block("corporateProxy", "An HTTP proxy the connector reaches the proxy through, with CONNECT "
          "(see docs/high-availability.md).",
          Key("url", Custom("http://[user:password@]host:port", _read_proxy_url), _CORPORATE.url,
              "The corporate proxy (Basic credentials from the URL).",
              default_text="HTTPS_PROXY if useEnvironment, else none"),
          Key("noProxy", Custom("list, or comma-separated string, of hosts, addresses or CIDRs", _read_no_proxy),
              _CORPORATE.no_proxy, "Dialled directly; a leading dot or *. matches subdomains.",
              default_text="NO_PROXY if useEnvironment, else []"),
          Key("useEnvironment", Bool(), _CORPORATE.use_environment,
              "Without url, read HTTPS_PROXY/https_proxy and NO_PROXY/no_proxy at start-up.")),
    tls_key("Client certificate of this connector and the CA of the proxy's certificate. Left out: the development "
            "PKI minted into the state folder (not for production).",
            "caFile", "PEM CA certificate that signs the proxy's certificate."),
    TUNNEL_KEY,
    block("reconnect", "Back-off for (re)connecting to the proxy (full jitter).",
          Key("initialDelaySeconds", Seconds(), _RECONNECT.initial_delay_seconds, "First retry delay (ceiling)."),
          Key("maxDelaySeconds", Seconds(), _RECONNECT.max_delay_seconds,
              "Largest retry delay; at least initialDelaySeconds."),
          Key("fastRetries", Integer(0), _RECONNECT.fast_retries, "Retries at initialDelaySeconds before backing off.")),
    block("backend", "Connections to internal systems.",
          Key("connectTimeoutSeconds", Seconds(), BackendConfig.connect_timeout_seconds,
              "Time to connect to an internal system.")),
    Key("accessControl", Entries(), (), "What the connector exposes; nothing is reachable unless listed here.",
        default_text="[] (deny all)", children=(
            Key("virtualHost", Custom("host name or IP address", _read_host), MISSING,
                "The host applications ask for (case-insensitive); required.", default_text="(required)"),
            Key("virtualPort", Custom(_PORT_SPEC_TEXT, _unused), MISSING, "The port applications ask for; required.",
                default_text="(required)"),
            Key("internalHost", Custom("host name or IP address", _read_host), MISSING,
                "The internal system the connector connects to; required.", default_text="(required)"),
            Key("internalPort", Custom(_PORT_SPEC_TEXT, _unused), MISSING,
                "Its port (a range of the same length as virtualPort).", default_text="virtualPort"),
            Key("protocol", Choice(PROTOCOLS), MISSING, "Scheme towards the internal system; required.",
                default_text="(required)"),
            Key("hostInHeader", Choice(HOST_IN_HEADER), "virtual",
                "HTTP(S): the Host header sent to the internal system."),
            Key("caFile", FilePath(), None, "HTTPS, TCP_TLS: PEM CA certificate(s) of the internal system.",
                default_text="system trust store"),
            Key("resources", Entries(), (), "HTTP(S): the allowed URL paths; none listed allows nothing.",
                default_text="[] (deny all)", children=(
                    Key("path", Custom("URL path starting with /", _read_resource_path), MISSING,
                        "Path (exact, case-sensitive, as sent); no '.' or '..' segments.",
                        default_text="(required)"),
                    Key("allSubPaths", Bool(), False, "Also allow everything below path."),
                    Key("upgradeAllowed", Bool(), False, "Allow protocol upgrades (WebSocket) on these paths."),
                )),
        )),
    LOGGING_KEY,
    SHUTDOWN_KEY,
    block("metrics", "Monitoring.",
          block("prometheus", "The connector's own Prometheus endpoint.",
                Key("enabled", Bool(), False, "Serve metrics."),
                Key("port", Port(listener=True), DEFAULT_CONNECTOR_METRICS_PORT, "Metrics port."),
                Key("bindAddress", BindAddress(), "127.0.0.1", "Address to listen on."))),
)


def _read_resources(section: Section, protocol: str) -> tuple[Resource, ...]:
    if section.has("resources") and protocol not in _HTTP_PROTOCOLS:
        section.fail("resources", f"only allowed for HTTP and HTTPS, not {protocol}")
        return ()
    resources: list[Resource] = []
    for entry in section.entries("resources"):
        path = entry.required("path")
        if path is None:
            continue
        if any(r.path == path for r in resources):
            entry.fail("path", f"duplicate path {show(path)} in this rule")
            continue
        resources.append(Resource(path=path, all_sub_paths=entry.get("allSubPaths"),
                                  upgrade_allowed=entry.get("upgradeAllowed")))
    return tuple(resources)


def _read_rule(section: Section) -> AccessRule | None:
    """One access rule, or ``None`` if it has a problem (recorded)."""
    before = len(section.context.problems)
    if not section.has("protocol"):
        section.fail("protocol", f"is required (one of {', '.join(PROTOCOLS)})")
        protocol = None
    else:
        protocol = section.get("protocol")
    is_tcp = protocol not in _HTTP_PROTOCOLS
    virtual_host = section.required("virtualHost")
    virtual_ports = section.guard(lambda: _read_port_spec(section, "virtualPort", is_tcp))
    if virtual_ports is None and not section.has("virtualPort"):
        section.fail("virtualPort", "is required")
    internal_host = section.required("internalHost")
    internal_ports = section.guard(lambda: _read_port_spec(section, "internalPort", is_tcp)) or virtual_ports
    if (internal_ports is not None and virtual_ports is not None
            and internal_ports[1] - internal_ports[0] != virtual_ports[1] - virtual_ports[0]):
        section.fail(
            "internalPort",
            f"the range {internal_ports[0]}-{internal_ports[1]} must have the same length as virtualPort "
            f"{virtual_ports[0]}-{virtual_ports[1]}",
        )
    if protocol is not None:
        if section.has("hostInHeader") and is_tcp:
            section.fail("hostInHeader", f"only allowed for HTTP and HTTPS, not {protocol}")
        if section.has("caFile") and protocol not in _TLS_PROTOCOLS:
            section.fail("caFile", f"only allowed for HTTPS and TCP_TLS, not {protocol}")
    host_in_header = section.get("hostInHeader")
    ca_file = section.get("caFile")
    resources = _read_resources(section, protocol) if protocol is not None else ()
    if len(section.context.problems) != before or protocol is None:
        return None
    assert virtual_host is not None and virtual_ports is not None and internal_host is not None
    assert internal_ports is not None
    return AccessRule(
        virtual_host=normalize_host(virtual_host),
        virtual_ports=virtual_ports,
        internal_host=internal_host,
        internal_ports=internal_ports,
        protocol=protocol,
        host_in_header=host_in_header,
        ca_file=ca_file,
        resources=resources,
    )


def build_connector_config(data: Mapping[str, Any] | None, context: Context) -> ConnectorConfig:
    """A :class:`ConnectorConfig` from parsed YAML; problems are recorded in ``context``, not raised. A rule with
    a problem is left out (so later rules keep their index in messages)."""
    context.other_names = _OTHER_NAMES
    root = Section(data, "", CONNECTOR_KEYS, context)
    proxy = root.section("proxy")
    reconnect = root.section("reconnect")
    corporate = root.section("corporateProxy")
    metrics = root.section("metrics").section("prometheus")
    rules: list[AccessRule] = []
    indexes: list[int] = []
    for index, entry in enumerate(root.entries("accessControl")):
        rule = _read_rule(entry)
        if rule is not None:
            rules.append(rule)
            indexes.append(index)
    config = ConnectorConfig(
        subaccount_id=root.required("subaccountId") or "",
        location_id=root.get("locationId"),
        connector_id=root.get("connectorId", socket.gethostname()),
        proxy=ProxyEndpointConfig(host=proxy.get("host"), port=proxy.get("port"),
                                  server_name=proxy.get("serverName"),
                                  high_availability_mode=proxy.get("highAvailabilityMode")),
        tls=read_tls(root, "caFile"),
        tunnel=read_tunnel(root),
        reconnect=ReconnectConfig(
            initial_delay_seconds=reconnect.get("initialDelaySeconds"),
            max_delay_seconds=reconnect.get("maxDelaySeconds"),
            fast_retries=reconnect.get("fastRetries"),
        ),
        corporate_proxy=CorporateProxyConfig(
            url=corporate.get("url"),
            no_proxy=corporate.get("noProxy"),
            use_environment=corporate.get("useEnvironment"),
        ),
        backend=BackendConfig(connect_timeout_seconds=root.section("backend").get("connectTimeoutSeconds")),
        access_control=tuple(rules),
        logging=read_logging(root),
        shutdown=read_shutdown(root),
        metrics=MetricsConfig(enabled=metrics.get("enabled"), port=metrics.get("port"),
                              bind_address=metrics.get("bindAddress")),
    )
    context.rule_indexes = indexes
    connector_cross_field_problems(config, context, indexes)
    return config


def connector_config_from_mapping(
    data: Mapping[str, Any] | None, base_dir: str | os.PathLike[str] | None = None
) -> ConnectorConfig:
    """Build and validate a :class:`ConnectorConfig` from parsed YAML (``subaccountId`` is required).

    Relative file paths are resolved against ``base_dir`` if given. The files are not looked at (see
    :func:`connproxy.config.verify_connector_config`).

    :raises ConfigError: every unknown key, bad value, missing ``subaccountId`` and overlap of access rules, one
        line each.
    """
    context = Context(base_dir=None if base_dir is None else Path(base_dir))
    config = build_connector_config(data, context)
    context.raise_problems()
    return config


def connector_cross_field_problems(config: ConnectorConfig, context: Context,
                                   indexes: list[int] | None = None) -> None:
    """Record the broken cross-field rules of ``config`` in ``context``:

    * ``subaccountId`` is not empty; ``certFile``/``keyFile`` come in pairs;
      ``reconnect.maxDelaySeconds >= initialDelaySeconds``; the ``tunnel`` rules of the proxy;
    * no two access rules cover the same virtual host and port.

    :param indexes: the ``accessControl`` index of each rule (rules with problems are left out of ``config``).
    """
    if not config.subaccount_id and not context.is_bad("subaccountId"):
        context.report("subaccountId", "is required")
    check_tls_pair(config.tls, "tls", context)
    if config.reconnect.max_delay_seconds < config.reconnect.initial_delay_seconds and not context.is_bad(
            "reconnect.maxDelaySeconds", "reconnect.initialDelaySeconds"):
        context.report("reconnect.maxDelaySeconds", "must be at least reconnect.initialDelaySeconds")
    check_tunnel(config.tunnel, context)
    where = indexes if indexes is not None else list(range(len(config.access_control)))
    for position, rule in enumerate(config.access_control):
        for earlier_position, earlier in enumerate(config.access_control[:position]):
            if (
                normalize_host(rule.virtual_host) == normalize_host(earlier.virtual_host)
                and rule.virtual_ports[0] <= earlier.virtual_ports[1]
                and earlier.virtual_ports[0] <= rule.virtual_ports[1]
            ):
                first = max(rule.virtual_ports[0], earlier.virtual_ports[0])
                context.report(
                    f"accessControl[{where[position]}]",
                    f"virtual host {rule.virtual_host} port {first} is already mapped by "
                    f"accessControl[{where[earlier_position]}]",
                )
                break


def check_connector_config(config: ConnectorConfig) -> None:
    """Check the cross-field rules of a connector configuration (see :func:`connector_cross_field_problems`).

    :raises ConfigError: every broken rule, one line each, naming the keys.
    """
    context = Context()
    connector_cross_field_problems(config, context)
    context.raise_problems()


def load_connector_config(path: str | os.PathLike[str]) -> ConnectorConfig:
    """Load and validate a connector configuration file (relative paths in it are relative to its folder). The
    files it names are not looked at (see :func:`connproxy.config.verify_connector_config_file`).

    :raises ConfigError: the file cannot be read or is not YAML (one line), or every problem of the configuration.
    """
    return connector_config_from_mapping(read_yaml(path), Path(path).resolve().parent)


def embedded_connector_config() -> ConnectorConfig:
    """The configuration the connector runs with when no ``--config`` is given.

    :data:`~connproxy.pki.state.DEV_SUBACCOUNT`, the default location, the machine's host name as connector
    ID, the proxy at ``localhost:8042``, TLS files from the development PKI, and no access rules (so
    everything is denied until rules are configured).
    """
    return ConnectorConfig(
        subaccount_id=DEV_SUBACCOUNT,
        location_id="",
        proxy=ProxyEndpointConfig(host="localhost", port=DEFAULT_TUNNEL_PORT),
        access_control=(),
    )

