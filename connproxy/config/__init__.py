"""YAML configuration of the proxy and the connector, parsed into frozen dataclasses with strict validation.

Import every name from here (``from connproxy.config import ProxyConfig``), never from the modules:
:mod:`~connproxy.config.reader` (YAML, typed accessors, :class:`ConfigError`), :mod:`~connproxy.config.model`
(the dataclasses), :mod:`~connproxy.config.proxy` and :mod:`~connproxy.config.connector` (each role's keys,
declared once, parser, cross-field rules, embedded defaults), :mod:`~connproxy.config.checks` (files and ports,
what start-up needs beyond valid values), :mod:`~connproxy.config.paths` (host and path rules shared with the
connector's access decision) and :mod:`~connproxy.config.reference` (``docs/configuration.md`` from the keys).

Keys are camelCase as in ``contract.md`` (and the SAP Connectivity proxy); dataclass fields are snake_case.
Every key has a default except ``subaccountId`` (required by the proxy in dedicated mode and by the
connector file). Unknown keys, values of the wrong type and broken cross-field rules are collected, and one
:class:`ConfigError` reports all of them, one line each, starting with the offending key path, for example
``servers.proxy.socks5.port: expected an integer 1-65535, got 'abc'``. :func:`verify_proxy_config_file` and
:func:`verify_connector_config_file` also check the files a configuration names (and, for ``connproxy config
check``, free ports): what start-up runs.

Conventions:

* An explicit ``null`` (``key:`` with nothing after it) means the same as leaving the key out.
* Booleans must be YAML booleans (``true``/``false``; PyYAML also reads ``yes``/``no``/``on``/``off``),
  integers must be integers (``8042``, not ``"8042"`` or ``8042.0``); seconds may be integers or floats.
* Listener ports (``servers.businessDataTunnel.port``, ``servers.businessDataTunnel.ingress.port``,
  ``servers.proxy.{http,socks5}.port``, ``metrics.prometheus.port``) also accept ``0``: an ephemeral port, for
  tests.
* Duplicate keys in one YAML mapping are an error (PyYAML would silently keep the last one).
* File paths in a file loaded with :func:`load_proxy_config`/:func:`load_connector_config` are resolved
  relative to the directory of that file; the ``*_from_mapping`` functions take an optional ``base_dir``
  and otherwise keep them as written.
* Keys connproxy adds to SAP's set: ``servers.businessDataTunnel.bindAddress``,
  ``servers.proxy.http.{allowConnect,maxLineBytes,maxHeaderBytes}``,
  ``servers.proxy.authorization.oauth.{tokenKeysFile,tokenKeysUrl,uaaDomain,leewaySeconds}``,
  ``servers.proxy.clientConnection.{idleTimeoutSeconds,handshakeTimeoutSeconds,firstByteTimeoutSeconds}``,
  ``metrics.prometheus.bindAddress``, the ``tunnel`` block, ``highAvailability``,
  ``servers.businessDataTunnel.ingress`` and the connector's ``proxy.highAvailabilityMode`` and ``corporateProxy``
  (docs/high-availability.md). SAP keys connproxy does not implement
  (``subaccountSubdomain``, ``rfcAndLdap``, ...) are refused like any unknown key, with a note saying so.
* Constructing the dataclasses directly (or with :func:`dataclasses.replace`) does not validate; call
  :func:`check_proxy_config`/:func:`check_connector_config` for the cross-field rules and
  :func:`verify_proxy_config`/:func:`verify_connector_config` for the files.
"""

from __future__ import annotations

from connproxy.config.checks import (
    bind_problem,
    describe_bind_error,
    startup_warnings,
    verify_connector_config,
    verify_connector_config_file,
    verify_proxy_config,
    verify_proxy_config_file,
)
from connproxy.config.connector import (
    CONNECTOR_KEYS,
    check_connector_config,
    connector_config_from_mapping,
    embedded_connector_config,
    load_connector_config,
)
from connproxy.config.model import (
    DEFAULT_CONNECTOR_METRICS_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_INGRESS_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_SOCKS5_PORT,
    DEFAULT_TUNNEL_PORT,
    HIGH_AVAILABILITY_MODES,
    HOST_IN_HEADER,
    LOG_FORMATS,
    LOG_LEVELS,
    PROTOCOLS,
    TENANT_MODES,
    AccessRule,
    BackendConfig,
    ClientConnectionConfig,
    ConnectorConfig,
    CorporateProxyConfig,
    FrontEndConfig,
    HighAvailabilityConfig,
    HttpFrontEndConfig,
    IngressListenerConfig,
    LoggingConfig,
    MetricsConfig,
    OAuthConfig,
    ProxyConfig,
    ProxyEndpointConfig,
    ReadinessConfig,
    ReconnectConfig,
    Resource,
    ShutdownConfig,
    TlsFiles,
    TunnelListenerConfig,
    TunnelTuning,
)
from connproxy.config.paths import normalize_host, path_problem
from connproxy.config.proxy import (
    PROXY_KEYS,
    check_proxy_config,
    embedded_proxy_config,
    load_proxy_config,
    proxy_config_from_mapping,
    token_keys_url_problem,
    uaa_domain_problem,
)
from connproxy.config.reader import ConfigError, ConfigProblem, Key

__all__ = [
    "CONNECTOR_KEYS",
    "DEFAULT_CONNECTOR_METRICS_PORT",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_INGRESS_PORT",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_SOCKS5_PORT",
    "DEFAULT_TUNNEL_PORT",
    "HIGH_AVAILABILITY_MODES",
    "HOST_IN_HEADER",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PROTOCOLS",
    "PROXY_KEYS",
    "TENANT_MODES",
    "AccessRule",
    "BackendConfig",
    "ClientConnectionConfig",
    "ConfigError",
    "ConfigProblem",
    "ConnectorConfig",
    "CorporateProxyConfig",
    "FrontEndConfig",
    "HighAvailabilityConfig",
    "HttpFrontEndConfig",
    "IngressListenerConfig",
    "Key",
    "LoggingConfig",
    "MetricsConfig",
    "OAuthConfig",
    "ProxyConfig",
    "ProxyEndpointConfig",
    "ReadinessConfig",
    "ReconnectConfig",
    "Resource",
    "ShutdownConfig",
    "TlsFiles",
    "TunnelListenerConfig",
    "TunnelTuning",
    "bind_problem",
    "check_connector_config",
    "check_proxy_config",
    "connector_config_from_mapping",
    "describe_bind_error",
    "embedded_connector_config",
    "embedded_proxy_config",
    "load_connector_config",
    "load_proxy_config",
    "normalize_host",
    "path_problem",
    "proxy_config_from_mapping",
    "startup_warnings",
    "token_keys_url_problem",
    "uaa_domain_problem",
    "verify_connector_config",
    "verify_connector_config_file",
    "verify_proxy_config",
    "verify_proxy_config_file",
]
