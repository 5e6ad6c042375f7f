"""YAML configuration of the proxy and the connector, parsed into frozen dataclasses with strict validation.

Keys are camelCase as in ``contract.md`` (and the SAP Connectivity proxy); dataclass fields are snake_case.
Every key has a default except ``subaccountId`` (required by the proxy in dedicated mode and by the
connector file). Any unknown key, value of the wrong type or broken cross-field rule raises
:class:`ConfigError`, whose message starts with the offending key path, for example
``servers.proxy.socks5.port: expected an integer 1-65535, got 'abc'``.

Conventions:

* An explicit ``null`` (``key:`` with nothing after it) means the same as leaving the key out.
* Booleans must be YAML booleans (``true``/``false``; PyYAML also reads ``yes``/``no``/``on``/``off``),
  integers must be integers (``8042``, not ``"8042"`` or ``8042.0``); seconds may be integers or floats.
* Listener ports (``servers.businessDataTunnel.port``, ``servers.proxy.{http,socks5}.port``,
  ``metrics.prometheus.port``) also accept ``0``: an ephemeral port, for tests.
* Duplicate keys in one YAML mapping are an error (PyYAML would silently keep the last one).
* File paths in a file loaded with :func:`load_proxy_config`/:func:`load_connector_config` are resolved
  relative to the directory of that file; the ``*_from_mapping`` functions take an optional ``base_dir``
  and otherwise keep them as written.
* Keys connproxy adds to SAP's set: ``servers.businessDataTunnel.bindAddress``,
  ``servers.proxy.http.{allowConnect,maxLineBytes,maxHeaderBytes}``,
  ``servers.proxy.authorization.oauth.{tokenKeysFile,tokenKeysUrl,uaaDomain,leewaySeconds}``,
  ``servers.proxy.clientConnection.{idleTimeoutSeconds,handshakeTimeoutSeconds,firstByteTimeoutSeconds}``,
  ``metrics.prometheus.bindAddress`` and the ``tunnel`` block. SAP keys connproxy does not implement
  (``subaccountSubdomain``, ``rfcAndLdap``, ...) are refused like any unknown key, with a note saying so.
* Constructing the dataclasses directly (or with :func:`dataclasses.replace`) does not validate; call
  :func:`check_proxy_config`/:func:`check_connector_config` for the cross-field rules.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import yaml

from connproxy.pki.state import DEV_SUBACCOUNT
from connproxy.wire import session as wire_defaults

__all__ = [
    "DEFAULT_HTTP_PORT",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_SOCKS5_PORT",
    "DEFAULT_TUNNEL_PORT",
    "HIGH_AVAILABILITY_MODES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PROTOCOLS",
    "TENANT_MODES",
    "AccessRule",
    "BackendConfig",
    "ClientConnectionConfig",
    "ConfigError",
    "ConnectorConfig",
    "FrontEndConfig",
    "HttpFrontEndConfig",
    "LoggingConfig",
    "MetricsConfig",
    "OAuthConfig",
    "ProxyConfig",
    "ProxyEndpointConfig",
    "ReadinessConfig",
    "ReconnectConfig",
    "ShutdownConfig",
    "Resource",
    "TlsFiles",
    "TunnelListenerConfig",
    "TunnelTuning",
    "check_connector_config",
    "check_proxy_config",
    "connector_config_from_mapping",
    "embedded_connector_config",
    "embedded_proxy_config",
    "load_connector_config",
    "load_proxy_config",
    "proxy_config_from_mapping",
]

DEFAULT_TUNNEL_PORT: Final = 8042
DEFAULT_HTTP_PORT: Final = 20003
DEFAULT_SOCKS5_PORT: Final = 20004
DEFAULT_METRICS_PORT: Final = 9494
DEFAULT_CONNECTOR_METRICS_PORT: Final = 9495

TENANT_MODES: Final = ("dedicated", "shared")
HIGH_AVAILABILITY_MODES: Final = ("off", "path", "subdomain")
LOG_FORMATS: Final = ("console", "json")
LOG_LEVELS: Final = ("debug", "info", "warn", "error")
#: Access-rule protocols: the scheme used towards the backend.
PROTOCOLS: Final = ("HTTP", "HTTPS", "TCP", "TCP_TLS")
HOST_IN_HEADER: Final = ("virtual", "internal")

_HTTP_PROTOCOLS: Final = frozenset({"HTTP", "HTTPS"})
_TLS_PROTOCOLS: Final = frozenset({"HTTPS", "TCP_TLS"})
_MAX_WINDOW: Final = 2**31 - 1
_LOOPBACK_NAMES: Final = frozenset({"localhost"})
_DOMAIN: Final = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PORT_SPEC: Final = re.compile(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?")

#: SAP Connectivity proxy keys we recognise but do not implement, per section (for a better message).
_SAP_ONLY_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "": frozenset(
        {"subaccountSubdomain", "displayName", "serviceChannels", "multiRegionMode", "integration"}
    ),
    "servers.businessDataTunnel": frozenset({"enableTls", "strictSniEnabled", "threadPoolSize"}),
    "servers.proxy": frozenset({"rfcAndLdap", "threadPoolSize"}),
    "servers.proxy.clientConnection": frozenset({"writeTimeoutSeconds"}),
    "metrics.prometheus": frozenset({"jvmMetrics", "jmxMetrics"}),
}
#: Keys that belong to the other configuration's equivalent block, with the name used here.
_OTHER_NAMES: Final[Mapping[tuple[str, str], str]] = {
    ("tls", "clientCaFile"): "caFile",
    ("servers.businessDataTunnel.tls", "caFile"): "clientCaFile",
}


class ConfigError(Exception):
    """The configuration is invalid. ``str(error)`` is the message for the user.

    The message starts with the key path (``servers.proxy.http.port: ...``) for a single bad value, or is a
    sentence naming the keys involved for a cross-field rule. ``key_path`` holds the path of the offending
    key where there is one (``None`` for YAML syntax and file errors).
    """

    def __init__(self, message: str, key_path: str | None = None) -> None:
        super().__init__(message)
        self.key_path = key_path


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
class TunnelListenerConfig:
    """``servers.businessDataTunnel``: the TLS listener connectors dial.

    ``external_port`` (what connectors are told to dial) defaults to ``port``, or 8042 when ``port`` is 0.
    """

    port: int = DEFAULT_TUNNEL_PORT
    bind_address: str = "0.0.0.0"
    external_host: str = "localhost"
    external_port: int = DEFAULT_TUNNEL_PORT
    tls: TlsFiles = field(default_factory=TlsFiles)
    #: Tunnels one certificate identity (subaccount, location, connector id) may hold at once.
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


@dataclass(frozen=True)
class FrontEndConfig:
    """``servers.proxy.socks5`` (and the common part of ``servers.proxy.http``)."""

    enabled: bool = True
    port: int = DEFAULT_SOCKS5_PORT
    enable_proxy_authorization: bool = True
    allow_remote_connections: bool = True


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
    #: Connections per front end at once; further ones are closed at accept.
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
class ProxyConfig:
    """The whole proxy configuration (see ``contract.md``)."""

    tenant_mode: str = "dedicated"
    subaccount_id: str | None = None
    high_availability_mode: str = "off"
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

    @property
    def verify_name(self) -> str:
        """The name to verify in the proxy's certificate: ``server_name``, else ``host``."""
        return self.server_name if self.server_name is not None else self.host


@dataclass(frozen=True)
class ReconnectConfig:
    """``reconnect``: back-off for (re)connecting to the proxy."""

    initial_delay_seconds: float = 0.2
    max_delay_seconds: float = 30.0
    fast_retries: int = 3


@dataclass(frozen=True)
class BackendConfig:
    """``backend``: connections from the connector to internal systems."""

    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class Resource:
    """One allowed URL path of an HTTP(S) access rule."""

    path: str
    all_sub_paths: bool = False
    upgrade_allowed: bool = False

    def allows(self, path: str) -> bool:
        """Whether this resource admits ``path`` (a query-free, dot-segment-free origin-form path).

        Exact, case-sensitive match; with ``all_sub_paths`` also everything below it on a segment
        boundary (``/api`` admits ``/api`` and ``/api/x`` but not ``/apix``).
        """
        if path == self.path:
            return True
        if not self.all_sub_paths:
            return False
        prefix = self.path if self.path.endswith("/") else self.path + "/"
        return path.startswith(prefix)


def _normalize_host(host: str) -> str:
    """Canonical form for comparing virtual hosts: IP literals compressed, names lower-cased."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    name = host.lower()
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


_ODD_ENCODINGS = re.compile(r"%u[0-9a-fA-F]{4}|%[cC][01]", re.IGNORECASE)


def _has_dot_segment(path: str) -> bool:
    # Reject "." and ".." segments, also percent-encoded (repeatedly: a backend may decode twice), behind "\" or
    # before ";params", and the non-standard %uXXXX and overlong UTF-8 (%c0, %c1) forms some servers decode: a
    # backend that normalises them could otherwise be led out of an allowed subtree.
    if _ODD_ENCODINGS.search(path):
        return True
    candidate = path
    for _ in range(4):
        for segment in re.split(r"[/\\]", candidate):
            if segment.split(";", 1)[0] in (".", ".."):
                return True
        decoded = unquote(candidate)
        if decoded == candidate:
            return False
        candidate = decoded
    return True  # still changing after four decodings: refuse


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

    def matches(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is this rule's virtual host (case-insensitive for names) and port range."""
        return (
            self.virtual_ports[0] <= port <= self.virtual_ports[1]
            and _normalize_host(host) == _normalize_host(self.virtual_host)
        )

    def internal_port_for(self, port: int) -> int:
        """The internal port a virtual ``port`` maps to (same offset into the range).

        :raises ValueError: ``port`` is outside :attr:`virtual_ports`.
        """
        first, last = self.virtual_ports
        if not first <= port <= last:
            raise ValueError(f"port {port} is outside the virtual port range {first}-{last}")
        return self.internal_ports[0] + (port - first)

    def allows_path(self, path: str) -> Resource | None:
        """The first resource that admits the request ``path``, or ``None`` (access denied).

        The query string is ignored; ``""`` counts as ``/``. Paths not starting with ``/``, paths with a
        fragment (``#``) and paths with ``.``/``..`` segments (literal or percent-encoded) are always refused. Matching is
        case-sensitive and on the path as sent (write percent-encoded characters in resources the same
        way). TCP rules have no resources, so this returns ``None`` for them.
        """
        if "#" in path:
            # A fragment never belongs in a request target; a backend that does not cut it off might
            # normalise "/api#/../admin" to "/admin".
            return None
        path = path.split("?", 1)[0] or "/"
        if not path.startswith("/") or _has_dot_segment(path):
            return None
        for resource in self.resources:
            if resource.allows(path):
                return resource
        return None


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
    backend: BackendConfig = field(default_factory=BackendConfig)
    access_control: tuple[AccessRule, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    #: The connector's own Prometheus endpoint (off unless enabled; loopback by default).
    metrics: MetricsConfig = field(
        default_factory=lambda: MetricsConfig(enabled=False, port=DEFAULT_CONNECTOR_METRICS_PORT,
                                              bind_address="127.0.0.1"))

    def find_rule(self, host: str, port: int) -> AccessRule | None:
        """The access rule for virtual ``host:port``, or ``None`` (access denied)."""
        for rule in self.access_control:
            if rule.matches(host, port):
                return rule
        return None


# --------------------------------------------------------------------------------------------------------
# the validating reader


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Section:
    """A mapping being validated at key path ``path``; unknown keys are refused on construction."""

    def __init__(
        self, value: object, path: str, keys: Sequence[str], base_dir: Path | None
    ) -> None:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path or '(top level)'}: expected a mapping, got {_show(value)}", path)
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(
                    f"{path or '(top level)'}: keys must be strings, got {_show(key)} (quote it)", path
                )
            if key not in keys:
                raise ConfigError(f"{_join(path, key)}: unknown key{_hint(path, key, keys)}", _join(path, key))
        self._data: Mapping[str, object] = value
        self.path = path
        self.base_dir = base_dir

    def at(self, key: str) -> str:
        """The key path of ``key`` in this section."""
        return _join(self.path, key)

    def fail(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` for ``key``."""
        return ConfigError(f"{self.at(key)}: {problem}", self.at(key))

    def raw(self, key: str) -> object:
        """The value of ``key``, or ``None`` if absent or null."""
        return self._data.get(key)

    def has(self, key: str) -> bool:
        """Whether ``key`` is given (and not null)."""
        return self._data.get(key) is not None

    def section(self, key: str, keys: Sequence[str]) -> _Section:
        """The sub-mapping under ``key`` (empty if absent)."""
        return _Section(self._data.get(key), self.at(key), keys, self.base_dir)

    def boolean(self, key: str, default: bool) -> bool:
        """A YAML boolean."""
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        """An integer in ``low..high`` (no bools, no floats)."""
        value = self.raw(key)
        if value is None:
            return default
        wanted = f"an integer {low}-{high}" if high is not None else f"an integer >= {low}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected {wanted}, got {_show(value)}")
        if value < low or (high is not None and value > high):
            raise self.fail(key, f"expected {wanted}, got {_show(value)}")
        return value

    def port(self, key: str, default: int, *, listener: bool) -> int:
        """A TCP port 1-65535; a ``listener`` port may also be 0 (any free port)."""
        value = self.raw(key)
        if value is None:
            return default
        if listener and isinstance(value, int) and not isinstance(value, bool) and value == 0:
            return 0
        return self.integer(key, default, 1, 65535)

    def seconds(self, key: str, default: float, *, minimum: float = 0.0, inclusive: bool = False) -> float:
        """A finite number of seconds (int or float) above ``minimum`` (or equal, if ``inclusive``)."""
        value = self.raw(key)
        if value is None:
            return default
        wanted = f"a number {'>=' if inclusive else '>'} {minimum:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected {wanted}, got {_show(value)}")
        number = float(value)
        if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
            raise self.fail(key, f"expected {wanted}, got {_show(value)}")
        return number

    def _text(self, key: str, value: object, *, allow_empty: bool) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_show(value)}")
        if not allow_empty and not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def string(self, key: str, default: str, *, allow_empty: bool = False) -> str:
        """A string (non-empty unless ``allow_empty``)."""
        value = self.raw(key)
        if value is None:
            return default
        return self._text(key, value, allow_empty=allow_empty)

    def optional_string(self, key: str) -> str | None:
        """A non-empty string, or ``None`` if absent."""
        value = self.raw(key)
        return None if value is None else self._text(key, value, allow_empty=False)

    def required_string(self, key: str) -> str:
        """A non-empty string that must be present."""
        value = self.raw(key)
        if value is None:
            raise self.fail(key, "is required")
        return self._text(key, value, allow_empty=False)

    def file_path(self, key: str) -> str | None:
        """A file path, resolved against the configuration file's directory if relative."""
        value = self.optional_string(key)
        if value is None:
            return None
        path = Path(value).expanduser()
        if self.base_dir is not None and not path.is_absolute():
            path = self.base_dir / path
        return str(path)

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        """One of ``choices`` (case-sensitive)."""
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value

    def sequence(self, key: str) -> list[object]:
        """A YAML list (empty if absent)."""
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_show(value)}")
        return value


def _hint(path: str, key: str, keys: Sequence[str]) -> str:
    if key in _SAP_ONLY_KEYS.get(path, frozenset()):
        return " (a SAP Connectivity proxy setting that connproxy does not support)"
    if (path, key) in _OTHER_NAMES:
        return f" (did you mean {_OTHER_NAMES[path, key]!r}?)"
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------------
# YAML


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys within one mapping."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.MappingNode):  # registered for the map tag only
        return loader.construct_yaml_map(node)
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"line {line}: duplicate key {key_node.value!r}")
            seen.add(ident)
    return loader.construct_yaml_map(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _read_yaml(path: str | os.PathLike[str]) -> object:
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read the configuration file: {exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None


def _base_dir(base_dir: str | os.PathLike[str] | None) -> Path | None:
    return None if base_dir is None else Path(base_dir)


# --------------------------------------------------------------------------------------------------------
# shared blocks


def _parse_tunnel(root: _Section) -> TunnelTuning:
    section = root.section(
        "tunnel",
        (
            "streamWindowBytes",
            "connectionWindowBytes",
            "maxFrameBytes",
            "maxStreams",
            "pingIntervalSeconds",
            "deadAfterSeconds",
            "openTimeoutSeconds",
            "stallTimeoutSeconds",
        ),
    )
    d = TunnelTuning()
    return TunnelTuning(
        stream_window_bytes=section.integer("streamWindowBytes", d.stream_window_bytes, 65536, _MAX_WINDOW),
        connection_window_bytes=section.integer(
            "connectionWindowBytes", d.connection_window_bytes, 65536, _MAX_WINDOW
        ),
        max_frame_bytes=section.integer("maxFrameBytes", d.max_frame_bytes, 16384, 16_777_215),
        max_streams=section.integer("maxStreams", d.max_streams, 1, _MAX_WINDOW),
        ping_interval_seconds=section.seconds("pingIntervalSeconds", d.ping_interval_seconds),
        dead_after_seconds=section.seconds("deadAfterSeconds", d.dead_after_seconds),
        open_timeout_seconds=section.seconds("openTimeoutSeconds", d.open_timeout_seconds),
        stall_timeout_seconds=section.seconds("stallTimeoutSeconds", d.stall_timeout_seconds),
    )


def _parse_shutdown(root: _Section) -> ShutdownConfig:
    section = root.section("shutdown", ("drainTimeoutSeconds",))
    return ShutdownConfig(
        drain_timeout_seconds=section.seconds("drainTimeoutSeconds", ShutdownConfig.drain_timeout_seconds))


def _check_tunnel(tuning: TunnelTuning) -> None:
    if tuning.connection_window_bytes < tuning.stream_window_bytes:
        raise ConfigError(
            "tunnel.connectionWindowBytes: must be at least tunnel.streamWindowBytes "
            f"({tuning.connection_window_bytes} < {tuning.stream_window_bytes})",
            "tunnel.connectionWindowBytes",
        )
    if tuning.dead_after_seconds <= tuning.ping_interval_seconds:
        raise ConfigError(
            "tunnel.deadAfterSeconds: must be greater than tunnel.pingIntervalSeconds "
            f"({tuning.dead_after_seconds:g} <= {tuning.ping_interval_seconds:g})",
            "tunnel.deadAfterSeconds",
        )


def _parse_tls(parent: _Section, ca_key: str) -> TlsFiles:
    section = parent.section("tls", ("certFile", "keyFile", ca_key))
    return TlsFiles(
        cert_file=section.file_path("certFile"),
        key_file=section.file_path("keyFile"),
        ca_file=section.file_path(ca_key),
    )


def _check_tls_pair(tls: TlsFiles, path: str) -> None:
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(
            f"{path}: certFile and keyFile must be given together (or both left out for the development PKI)",
            path,
        )


def _bind_address(section: _Section, key: str, default: str) -> str:
    value = section.string(key, default)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise section.fail(
            key, f"expected an IP address such as 0.0.0.0, :: or 127.0.0.1, got {_show(value)}"
        ) from None


# --------------------------------------------------------------------------------------------------------
# proxy


_FRONT_END_KEYS: Final = ("enabled", "port", "enableProxyAuthorization", "allowRemoteConnections")


def _parse_socks5(proxy: _Section) -> FrontEndConfig:
    section = proxy.section("socks5", _FRONT_END_KEYS)
    d = FrontEndConfig()
    return FrontEndConfig(
        enabled=section.boolean("enabled", d.enabled),
        port=section.port("port", d.port, listener=True),
        enable_proxy_authorization=section.boolean("enableProxyAuthorization", d.enable_proxy_authorization),
        allow_remote_connections=section.boolean("allowRemoteConnections", d.allow_remote_connections),
    )


def _parse_http(proxy: _Section) -> HttpFrontEndConfig:
    section = proxy.section("http", (*_FRONT_END_KEYS, "allowConnect", "maxLineBytes", "maxHeaderBytes"))
    d = HttpFrontEndConfig()
    return HttpFrontEndConfig(
        enabled=section.boolean("enabled", d.enabled),
        port=section.port("port", d.port, listener=True),
        enable_proxy_authorization=section.boolean("enableProxyAuthorization", d.enable_proxy_authorization),
        allow_remote_connections=section.boolean("allowRemoteConnections", d.allow_remote_connections),
        allow_connect=section.boolean("allowConnect", d.allow_connect),
        max_line_bytes=section.integer("maxLineBytes", d.max_line_bytes, 1024, 16 * 1024 * 1024),
        max_header_bytes=section.integer("maxHeaderBytes", d.max_header_bytes, 1024, 64 * 1024 * 1024),
    )


def _parse_client_ids(section: _Section) -> tuple[str, ...]:
    key = "allowedClientId"
    value = section.raw(key)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise section.fail(key, f"expected a string or a non-empty list of strings, got {_show(value)}")
    ids: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            where = f"{section.at(key)}[{index}]" if isinstance(value, list) else section.at(key)
            raise ConfigError(f"{where}: expected a non-empty string, got {_show(item)}", where)
        if item not in ids:
            ids.append(item)
    return tuple(ids)


def _is_loopback_host(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_token_keys_url(section: _Section) -> str | None:
    key = "tokenKeysUrl"
    url = section.optional_string(key)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise section.fail(key, f"not a valid URL: {_show(url)}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise section.fail(key, f"expected an https:// URL, got {_show(url)}")
    if parts.scheme == "http" and not _is_loopback_host(host):
        raise section.fail(
            key,
            f"must use https:// (http:// is allowed only for 127.0.0.1, ::1 or localhost), got {_show(url)}",
        )
    return url


def _parse_uaa_domain(section: _Section) -> str | None:
    key = "uaaDomain"
    domain = section.optional_string(key)
    if domain is not None and _DOMAIN.fullmatch(domain) is None:
        raise section.fail(
            key,
            "expected a bare domain such as authentication.eu10.hana.ondemand.com "
            f"(no scheme, no port, no path), got {_show(domain)}",
        )
    return domain


def _parse_oauth(proxy: _Section) -> OAuthConfig | None:
    authorization = proxy.section("authorization", ("oauth",))
    if not authorization.has("oauth"):
        return None
    section = authorization.section(
        "oauth", ("allowedClientId", "tokenKeysFile", "tokenKeysUrl", "uaaDomain", "leewaySeconds")
    )
    return OAuthConfig(
        allowed_client_ids=_parse_client_ids(section),
        token_keys_file=section.file_path("tokenKeysFile"),
        token_keys_url=_parse_token_keys_url(section),
        uaa_domain=_parse_uaa_domain(section),
        leeway_seconds=section.integer("leewaySeconds", OAuthConfig().leeway_seconds, 0),
    )


def _parse_high_availability(root: _Section) -> str:
    key = "highAvailabilityMode"
    if root.raw(key) is False:  # an unquoted `off` is YAML 1.1 for false
        return "off"
    return root.choice(key, "off", HIGH_AVAILABILITY_MODES)


def proxy_config_from_mapping(
    data: Mapping[str, Any] | None, base_dir: str | os.PathLike[str] | None = None
) -> ProxyConfig:
    """Build and validate a :class:`ProxyConfig` from parsed YAML (``None`` counts as an empty mapping).

    Relative file paths are resolved against ``base_dir`` if given.

    :raises ConfigError: an unknown key, a bad value or a broken cross-field rule.
    """
    root = _Section(
        data,
        "",
        ("tenantMode", "subaccountId", "highAvailabilityMode", "servers", "tunnel", "metrics", "logging", "shutdown",
         "readiness"),
        _base_dir(base_dir),
    )
    servers = root.section("servers", ("businessDataTunnel", "proxy"))
    bdt = servers.section("businessDataTunnel", ("port", "bindAddress", "externalHost", "externalPort", "tls",
                                                 "maxTunnelsPerIdentity", "maxStreamsPerTenant", "maxConnections",
                                                 "maxConnectionsPerClient", "maxPendingHandshakes",
                                                 "handshakeTimeoutSeconds"))
    tunnel_port = bdt.port("port", DEFAULT_TUNNEL_PORT, listener=True)
    listener = TunnelListenerConfig(
        port=tunnel_port,
        bind_address=_bind_address(bdt, "bindAddress", TunnelListenerConfig.bind_address),
        external_host=bdt.string("externalHost", TunnelListenerConfig.external_host),
        # Connectors reach a non-default listener port unless told otherwise.
        external_port=bdt.port("externalPort", tunnel_port or DEFAULT_TUNNEL_PORT, listener=False),
        tls=_parse_tls(bdt, "clientCaFile"),
        max_tunnels_per_identity=bdt.integer("maxTunnelsPerIdentity", TunnelListenerConfig.max_tunnels_per_identity,
                                             1, 1_000_000),
        max_streams_per_tenant=bdt.integer("maxStreamsPerTenant", TunnelListenerConfig.max_streams_per_tenant,
                                           1, 10_000_000),
        max_connections=bdt.integer("maxConnections", TunnelListenerConfig.max_connections, 1, 1_000_000),
        max_connections_per_client=bdt.integer("maxConnectionsPerClient",
                                               TunnelListenerConfig.max_connections_per_client, 1, 1_000_000),
        max_pending_handshakes=bdt.integer("maxPendingHandshakes", TunnelListenerConfig.max_pending_handshakes,
                                           1, 1_000_000),
        handshake_timeout_seconds=bdt.seconds("handshakeTimeoutSeconds",
                                              TunnelListenerConfig.handshake_timeout_seconds),
    )
    proxy = servers.section("proxy", ("http", "socks5", "authorization", "clientConnection"))
    http = _parse_http(proxy)
    socks5 = _parse_socks5(proxy)
    client = proxy.section(
        "clientConnection", ("idleTimeoutSeconds", "handshakeTimeoutSeconds", "firstByteTimeoutSeconds",
                             "bodyTimeoutSeconds", "maxConnections", "maxConnectionsPerClient", "listenBacklog")
    )
    dc = ClientConnectionConfig()
    metrics = root.section("metrics", ("prometheus",)).section("prometheus", ("enabled", "port", "bindAddress"))
    logging = root.section("logging", ("format", "level"))
    config = ProxyConfig(
        tenant_mode=root.choice("tenantMode", "dedicated", TENANT_MODES),
        subaccount_id=root.optional_string("subaccountId"),
        high_availability_mode=_parse_high_availability(root),
        tunnel_listener=listener,
        http=http,
        socks5=socks5,
        oauth=_parse_oauth(proxy),
        client_connection=ClientConnectionConfig(
            idle_timeout_seconds=client.seconds("idleTimeoutSeconds", dc.idle_timeout_seconds),
            handshake_timeout_seconds=client.seconds("handshakeTimeoutSeconds", dc.handshake_timeout_seconds),
            first_byte_timeout_seconds=client.seconds("firstByteTimeoutSeconds", dc.first_byte_timeout_seconds),
            body_timeout_seconds=client.seconds("bodyTimeoutSeconds", dc.body_timeout_seconds),
            max_connections=client.integer("maxConnections", dc.max_connections, 1, 1_000_000),
            max_connections_per_client=client.integer("maxConnectionsPerClient", dc.max_connections_per_client,
                                                      1, 1_000_000),
            listen_backlog=client.integer("listenBacklog", dc.listen_backlog, 1, 65535),
        ),
        tunnel=_parse_tunnel(root),
        metrics=MetricsConfig(
            enabled=metrics.boolean("enabled", MetricsConfig.enabled),
            port=metrics.port("port", DEFAULT_METRICS_PORT, listener=True),
            bind_address=_bind_address(metrics, "bindAddress", MetricsConfig.bind_address),
        ),
        logging=LoggingConfig(
            format=logging.choice("format", LoggingConfig.format, LOG_FORMATS),
            level=logging.choice("level", LoggingConfig.level, LOG_LEVELS),
        ),
        shutdown=_parse_shutdown(root),
        readiness=ReadinessConfig(
            require_connector=root.section("readiness", ("requireConnector",)).boolean(
                "requireConnector", ReadinessConfig.require_connector)),
    )
    check_proxy_config(config)
    return config


def check_proxy_config(config: ProxyConfig) -> None:
    """Check the cross-field rules of a proxy configuration.

    * dedicated mode requires ``subaccountId``;
    * an enabled front end with ``enableProxyAuthorization`` requires ``allowedClientId`` and a key source
      (``tokenKeysFile``, ``tokenKeysUrl`` or ``uaaDomain``);
    * ``certFile``/``keyFile`` come in pairs; ``maxHeaderBytes >= maxLineBytes``;
    * ``tunnel.connectionWindowBytes >= streamWindowBytes``, ``deadAfterSeconds > pingIntervalSeconds``;
    * enabled listeners do not share a port (0 excepted).

    :raises ConfigError: naming the rule and the keys.
    """
    if config.tenant_mode == "dedicated" and not config.subaccount_id:
        raise ConfigError("subaccountId is required if tenantMode is dedicated", "subaccountId")
    oauth_path = "servers.proxy.authorization.oauth"
    for name, front_end in (("http", config.http), ("socks5", config.socks5)):
        if not (front_end.enabled and front_end.enable_proxy_authorization):
            continue
        why = f"if enableProxyAuthorization is true (servers.proxy.{name})"
        if config.oauth is None or not config.oauth.allowed_client_ids:
            raise ConfigError(f"{oauth_path}.allowedClientId is required {why}", f"{oauth_path}.allowedClientId")
        oauth = config.oauth
        if oauth.token_keys_file is None and oauth.token_keys_url is None and oauth.uaa_domain is None:
            raise ConfigError(
                f"{oauth_path}: tokenKeysFile, tokenKeysUrl or uaaDomain is required {why}", oauth_path
            )
    _check_tls_pair(config.tunnel_listener.tls, "servers.businessDataTunnel.tls")
    if config.http.max_header_bytes < config.http.max_line_bytes:
        raise ConfigError(
            "servers.proxy.http.maxHeaderBytes: must be at least servers.proxy.http.maxLineBytes",
            "servers.proxy.http.maxHeaderBytes",
        )
    _check_tunnel(config.tunnel)
    listeners = [("servers.businessDataTunnel.port", config.tunnel_listener.port)]
    if config.http.enabled:
        listeners.append(("servers.proxy.http.port", config.http.port))
    if config.socks5.enabled:
        listeners.append(("servers.proxy.socks5.port", config.socks5.port))
    if config.metrics.enabled:
        listeners.append(("metrics.prometheus.port", config.metrics.port))
    used: dict[int, str] = {}
    for path, port in listeners:
        if port == 0:
            continue
        if port in used:
            raise ConfigError(f"{path}: port {port} is already used by {used[port]}", path)
        used[port] = path


def load_proxy_config(path: str | os.PathLike[str]) -> ProxyConfig:
    """Load and validate a proxy configuration file (relative paths in it are relative to its folder).

    :raises ConfigError: the file cannot be read, is not YAML, or is not a valid configuration.
    """
    return proxy_config_from_mapping(_top_mapping(_read_yaml(path), path), Path(path).resolve().parent)


def _top_mapping(data: object, path: str | os.PathLike[str]) -> Mapping[str, Any] | None:
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{os.fspath(path)}: expected a mapping at the top level, got {_show(data)}")
    return data


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


# --------------------------------------------------------------------------------------------------------
# connector


def _parse_port_spec(section: _Section, key: str, *, allow_range: bool) -> tuple[int, int] | None:
    value = section.raw(key)
    if value is None:
        return None
    wanted = "an integer 1-65535" + (" or a range 'first-last'" if allow_range else "")
    first: int
    last: int
    if isinstance(value, int) and not isinstance(value, bool):
        first = last = value
    elif isinstance(value, str) and (match := _PORT_SPEC.fullmatch(value)):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
    else:
        raise section.fail(key, f"expected {wanted}, got {_show(value)}")
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise section.fail(key, f"expected {wanted}, got {_show(value)}")
    if first > last:
        raise section.fail(key, f"the range must not be descending, got {_show(value)}")
    if first != last and not allow_range:
        raise section.fail(
            key, f"expected {wanted}, got {_show(value)} (port ranges are only allowed for TCP and TCP_TLS)"
        )
    return (first, last)


def _parse_host(section: _Section, key: str) -> str:
    value = section.required_string(key)
    host = value.strip()
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if any(ch.isspace() or ch in "/:@?#[]" for ch in host):
        raise section.fail(key, f"expected a host name or IP address, got {_show(value)}")
    return host


def _parse_resources(section: _Section, protocol: str) -> tuple[Resource, ...]:
    key = "resources"
    if not section.has(key):
        return ()
    if protocol not in _HTTP_PROTOCOLS:
        raise section.fail(key, f"only allowed for HTTP and HTTPS, not {protocol}")
    resources: list[Resource] = []
    for index, item in enumerate(section.sequence(key)):
        entry = _Section(
            item, f"{section.at(key)}[{index}]", ("path", "allSubPaths", "upgradeAllowed"), section.base_dir
        )
        path = entry.required_string("path")
        if not path.startswith("/"):
            raise entry.fail("path", f"must start with '/', got {_show(path)}")
        if any(ch.isspace() or ch in "?#" for ch in path):
            raise entry.fail("path", f"must not contain whitespace, '?' or '#', got {_show(path)}")
        if _has_dot_segment(path):
            raise entry.fail("path", f"must not contain '.' or '..' segments, got {_show(path)}")
        if any(r.path == path for r in resources):
            raise entry.fail("path", f"duplicate path {_show(path)} in this rule")
        resources.append(
            Resource(
                path=path,
                all_sub_paths=entry.boolean("allSubPaths", False),
                upgrade_allowed=entry.boolean("upgradeAllowed", False),
            )
        )
    return tuple(resources)


def _parse_rule(item: object, path: str, base_dir: Path | None) -> AccessRule:
    section = _Section(
        item,
        path,
        (
            "virtualHost",
            "virtualPort",
            "internalHost",
            "internalPort",
            "protocol",
            "hostInHeader",
            "caFile",
            "resources",
        ),
        base_dir,
    )
    if not section.has("protocol"):
        raise section.fail("protocol", f"is required (one of {', '.join(PROTOCOLS)})")
    protocol = section.choice("protocol", "HTTP", PROTOCOLS)
    is_tcp = protocol not in _HTTP_PROTOCOLS
    virtual_host = _normalize_host(_parse_host(section, "virtualHost"))
    virtual_ports = _parse_port_spec(section, "virtualPort", allow_range=is_tcp)
    if virtual_ports is None:
        raise section.fail("virtualPort", "is required")
    internal_host = _parse_host(section, "internalHost")
    internal_ports = _parse_port_spec(section, "internalPort", allow_range=is_tcp) or virtual_ports
    if internal_ports[1] - internal_ports[0] != virtual_ports[1] - virtual_ports[0]:
        raise section.fail(
            "internalPort",
            f"the range {internal_ports[0]}-{internal_ports[1]} must have the same length as virtualPort "
            f"{virtual_ports[0]}-{virtual_ports[1]}",
        )
    if section.has("hostInHeader") and is_tcp:
        raise section.fail("hostInHeader", f"only allowed for HTTP and HTTPS, not {protocol}")
    if section.has("caFile") and protocol not in _TLS_PROTOCOLS:
        raise section.fail("caFile", f"only allowed for HTTPS and TCP_TLS, not {protocol}")
    return AccessRule(
        virtual_host=virtual_host,
        virtual_ports=virtual_ports,
        internal_host=internal_host,
        internal_ports=internal_ports,
        protocol=protocol,
        host_in_header=section.choice("hostInHeader", "virtual", HOST_IN_HEADER),
        ca_file=section.file_path("caFile"),
        resources=_parse_resources(section, protocol),
    )


def connector_config_from_mapping(
    data: Mapping[str, Any] | None, base_dir: str | os.PathLike[str] | None = None
) -> ConnectorConfig:
    """Build and validate a :class:`ConnectorConfig` from parsed YAML (``subaccountId`` is required).

    Relative file paths are resolved against ``base_dir`` if given.

    :raises ConfigError: an unknown key, a bad value, a missing ``subaccountId`` or overlapping access rules.
    """
    root = _Section(
        data,
        "",
        (
            "subaccountId",
            "locationId",
            "connectorId",
            "proxy",
            "tls",
            "tunnel",
            "reconnect",
            "backend",
            "accessControl",
            "logging",
            "shutdown",
            "metrics",
        ),
        _base_dir(base_dir),
    )
    proxy = root.section("proxy", ("host", "port", "serverName"))
    logging = root.section("logging", ("format", "level"))
    reconnect = root.section("reconnect", ("initialDelaySeconds", "maxDelaySeconds", "fastRetries"))
    dr = ReconnectConfig()
    backend = root.section("backend", ("connectTimeoutSeconds",))
    cmetrics = root.section("metrics", ("prometheus",)).section("prometheus", ("enabled", "port", "bindAddress"))
    rules = tuple(
        _parse_rule(item, f"accessControl[{index}]", root.base_dir)
        for index, item in enumerate(root.sequence("accessControl"))
    )
    config = ConnectorConfig(
        subaccount_id=root.required_string("subaccountId"),
        location_id=root.string("locationId", "", allow_empty=True),
        connector_id=root.string("connectorId", socket.gethostname()),
        proxy=ProxyEndpointConfig(
            host=_parse_host(proxy, "host") if proxy.has("host") else ProxyEndpointConfig.host,
            port=proxy.port("port", DEFAULT_TUNNEL_PORT, listener=False),
            server_name=proxy.optional_string("serverName"),
        ),
        tls=_parse_tls(root, "caFile"),
        tunnel=_parse_tunnel(root),
        reconnect=ReconnectConfig(
            initial_delay_seconds=reconnect.seconds("initialDelaySeconds", dr.initial_delay_seconds),
            max_delay_seconds=reconnect.seconds("maxDelaySeconds", dr.max_delay_seconds),
            fast_retries=reconnect.integer("fastRetries", dr.fast_retries, 0),
        ),
        backend=BackendConfig(
            connect_timeout_seconds=backend.seconds(
                "connectTimeoutSeconds", BackendConfig.connect_timeout_seconds
            )
        ),
        access_control=rules,
        logging=LoggingConfig(
            format=logging.choice("format", LoggingConfig.format, LOG_FORMATS),
            level=logging.choice("level", LoggingConfig.level, LOG_LEVELS),
        ),
        shutdown=_parse_shutdown(root),
        metrics=MetricsConfig(
            enabled=cmetrics.boolean("enabled", False),
            port=cmetrics.port("port", DEFAULT_CONNECTOR_METRICS_PORT, listener=True),
            bind_address=_bind_address(cmetrics, "bindAddress", "127.0.0.1"),
        ),
    )
    check_connector_config(config)
    return config


def check_connector_config(config: ConnectorConfig) -> None:
    """Check the cross-field rules of a connector configuration.

    * ``certFile``/``keyFile`` come in pairs; ``reconnect.maxDelaySeconds >= initialDelaySeconds``;
    * the ``tunnel`` rules of :func:`check_proxy_config`;
    * no two access rules cover the same virtual host and port.

    :raises ConfigError: naming the rule and the keys.
    """
    if not config.subaccount_id:
        raise ConfigError("subaccountId: is required", "subaccountId")
    _check_tls_pair(config.tls, "tls")
    if config.reconnect.max_delay_seconds < config.reconnect.initial_delay_seconds:
        raise ConfigError(
            "reconnect.maxDelaySeconds: must be at least reconnect.initialDelaySeconds",
            "reconnect.maxDelaySeconds",
        )
    _check_tunnel(config.tunnel)
    for index, rule in enumerate(config.access_control):
        for earlier_index, earlier in enumerate(config.access_control[:index]):
            if (
                _normalize_host(rule.virtual_host) == _normalize_host(earlier.virtual_host)
                and rule.virtual_ports[0] <= earlier.virtual_ports[1]
                and earlier.virtual_ports[0] <= rule.virtual_ports[1]
            ):
                path = f"accessControl[{index}]"
                first = max(rule.virtual_ports[0], earlier.virtual_ports[0])
                raise ConfigError(
                    f"{path}: virtual host {rule.virtual_host} port {first} is already mapped by "
                    f"accessControl[{earlier_index}]",
                    path,
                )


def load_connector_config(path: str | os.PathLike[str]) -> ConnectorConfig:
    """Load and validate a connector configuration file (relative paths in it are relative to its folder).

    :raises ConfigError: the file cannot be read, is not YAML, or is not a valid configuration.
    """
    return connector_config_from_mapping(_top_mapping(_read_yaml(path), path), Path(path).resolve().parent)


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
