"""Tests for connproxy.config: defaults, strict validation, cross-field rules, access-rule semantics."""

from __future__ import annotations

import dataclasses
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from connproxy.config import (
    CONNECTOR_KEYS,
    PROXY_KEYS,
    AccessRule,
    ConfigError,
    ConnectorConfig,
    FrontEndConfig,
    HttpFrontEndConfig,
    OAuthConfig,
    ProxyConfig,
    Resource,
    TlsFiles,
    check_connector_config,
    check_proxy_config,
    connector_config_from_mapping,
    embedded_connector_config,
    embedded_proxy_config,
    load_connector_config,
    load_proxy_config,
    proxy_config_from_mapping,
    reference,  # the generator module itself
    startup_warnings,
)
from connproxy.config.connector import build_connector_config
from connproxy.config.proxy import build_proxy_config
from connproxy.config.reader import Context, walk
from connproxy.connector import acl
from connproxy.pki.state import DEV_SUBACCOUNT

# The samples from contract.md, verbatim.
CONTRACT_PROXY_YAML = """\
tenantMode: dedicated            # dedicated | shared
subaccountId: tenant-a           # the tenant in dedicated mode
highAvailabilityMode: "off"      # off | path | subdomain
servers:
  businessDataTunnel:
    port: 8042
    externalHost: localhost      # the name connectors use; per-replica routing builds on it
    externalPort: 8042
    tls: {certFile: ..., keyFile: ..., clientCaFile: ...}   # clientCaFile signs connector certificates
  proxy:
    http:   {enabled: true, port: 20003, enableProxyAuthorization: true, allowRemoteConnections: true}
    socks5: {enabled: true, port: 20004, enableProxyAuthorization: true, allowRemoteConnections: true}
    authorization:
      oauth:
        allowedClientId: sb-app!t1        # a string or a list
        tokenKeysFile: token_keys.json    # JWKS; or tokenKeysUrl, or uaaDomain for jku-based key lookup
metrics: {prometheus: {enabled: true, port: 9494}}
logging: {format: console, level: info}    # console | json
"""

CONTRACT_CONNECTOR_YAML = """\
subaccountId: tenant-a
locationId: loc-1                # optional; absent or "" is the default location
proxy: {host: localhost, port: 8042}
tls: {certFile: ..., keyFile: ..., caFile: ...}
accessControl:
  - virtualHost: erp.internal
    virtualPort: 80
    internalHost: 127.0.0.1
    internalPort: 8080
    protocol: HTTP               # HTTP | HTTPS | TCP | TCP_TLS  (scheme used towards the backend)
    hostInHeader: virtual        # virtual | internal
    resources:                   # HTTP(S) only; none listed means nothing is allowed
      - {path: /api, allSubPaths: true, upgradeAllowed: false}
"""

TRUSTED = """\
subaccountId: t
servers:
  proxy:
    http: {enableProxyAuthorization: false}
    socks5: {enableProxyAuthorization: false}
"""


def _yaml(text: str) -> Any:
    return yaml.safe_load(textwrap.dedent(text))


def _proxy(text: str) -> ProxyConfig:
    return proxy_config_from_mapping(_yaml(text))


def _connector(text: str) -> ConnectorConfig:
    return connector_config_from_mapping(_yaml(text))


def _rule(**overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "virtualHost": "erp.internal",
        "virtualPort": 80,
        "internalHost": "10.0.0.5",
        "protocol": "HTTP",
    }
    rule.update(overrides)
    return {key: value for key, value in rule.items() if value is not None}


def _connector_with(*rules: dict[str, Any]) -> ConnectorConfig:
    return connector_config_from_mapping({"subaccountId": "t", "accessControl": list(rules)})


# ---------------------------------------------------------------------------------------------- proxy


def test_proxy_defaults() -> None:
    config = _proxy(TRUSTED)
    assert config.tenant_mode == "dedicated"
    assert config.subaccount_id == "t"
    assert config.high_availability_mode == "off"
    listener = config.tunnel_listener
    assert (listener.port, listener.bind_address, listener.external_host, listener.external_port) == (
        8042,
        "0.0.0.0",
        "localhost",
        8042,
    )
    assert listener.tls == TlsFiles(None, None, None)
    http = config.http
    assert (http.enabled, http.port, http.enable_proxy_authorization, http.allow_remote_connections) == (
        True,
        20003,
        False,
        True,
    )
    assert (http.allow_connect, http.max_line_bytes, http.max_header_bytes) == (True, 8192, 65536)
    assert config.socks5 == FrontEndConfig(
        enabled=True, port=20004, enable_proxy_authorization=False, allow_remote_connections=True
    )
    assert config.oauth is None
    assert config.client_connection.idle_timeout_seconds == 3600
    assert config.client_connection.handshake_timeout_seconds == 30
    tunnel = config.tunnel
    assert tunnel.stream_window_bytes == 4194304
    assert tunnel.connection_window_bytes == 67108864
    assert tunnel.max_frame_bytes == 65536
    assert tunnel.max_streams == 10000
    assert tunnel.ping_interval_seconds == 10
    assert tunnel.dead_after_seconds == 30
    assert tunnel.open_timeout_seconds == 15
    assert (config.metrics.enabled, config.metrics.port, config.metrics.bind_address) == (True, 9494, "0.0.0.0")
    assert (config.logging.format, config.logging.level) == ("console", "info")
    assert not config.authorization_enabled


def test_dataclass_defaults_match_parser_defaults() -> None:
    parsed = _proxy(TRUSTED)
    built = ProxyConfig(
        subaccount_id="t",
        http=HttpFrontEndConfig(enable_proxy_authorization=False),
        socks5=FrontEndConfig(enable_proxy_authorization=False),
    )
    assert parsed == built


def test_contract_proxy_sample(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(CONTRACT_PROXY_YAML)
    config = load_proxy_config(path)
    assert config.subaccount_id == "tenant-a"
    assert config.authorization_enabled
    assert config.oauth == OAuthConfig(
        allowed_client_ids=("sb-app!t1",), token_keys_file=str(tmp_path / "token_keys.json")
    )
    assert config.tunnel_listener.tls == TlsFiles(
        str(tmp_path / "..."), str(tmp_path / "..."), str(tmp_path / "...")
    )


def test_relative_paths_without_base_dir_are_kept() -> None:
    config = proxy_config_from_mapping(_yaml(CONTRACT_PROXY_YAML))
    assert config.oauth is not None
    assert config.oauth.token_keys_file == "token_keys.json"
    with_base = proxy_config_from_mapping(_yaml(CONTRACT_PROXY_YAML), base_dir="/etc/connproxy")
    assert with_base.oauth is not None
    assert with_base.oauth.token_keys_file == "/etc/connproxy/token_keys.json"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(TRUSTED + "  businessDataTunnel: {tls: {certFile: /a/c.pem, keyFile: /a/k.pem}}\n")
    config = load_proxy_config(path)
    assert config.tunnel_listener.tls == TlsFiles("/a/c.pem", "/a/k.pem", None)


def test_empty_document_needs_subaccount() -> None:
    with pytest.raises(ConfigError, match="^subaccountId: is required if tenantMode is dedicated\n"):
        proxy_config_from_mapping(None)


def test_shared_mode_needs_no_subaccount() -> None:
    config = _proxy(TRUSTED.replace("subaccountId: t", "tenantMode: shared"))
    assert config.tenant_mode == "shared"
    assert config.subaccount_id is None


@pytest.mark.parametrize(("raw", "mode"), [("off", "off"), ('"off"', "off"), ("false", "off"), ("path", "path"), ("subdomain", "subdomain")])
def test_high_availability_mode(raw: str, mode: str) -> None:
    assert _proxy(TRUSTED + f"highAvailabilityMode: {raw}\n").high_availability_mode == mode


def test_oauth_client_id_list_and_sources() -> None:
    config = _proxy(
        """\
        tenantMode: shared
        servers:
          proxy:
            authorization:
              oauth:
                allowedClientId: [a, b, a]
                tokenKeysUrl: https://uaa.example/token_keys
                uaaDomain: authentication.eu10.hana.ondemand.com
                leewaySeconds: 0
        """
    )
    assert config.oauth == OAuthConfig(
        allowed_client_ids=("a", "b"),
        token_keys_url="https://uaa.example/token_keys",
        uaa_domain="authentication.eu10.hana.ondemand.com",
        leeway_seconds=0,
    )


@pytest.mark.parametrize("url", ["https://x.example/k", "https://127.0.0.1:8443/keys", "HTTPS://[::1]:1/k"])
def test_token_keys_url_allowed(url: str) -> None:
    config = _proxy(
        f"""\
        tenantMode: shared
        servers: {{proxy: {{authorization: {{oauth: {{allowedClientId: c, tokenKeysUrl: "{url}"}}}}}}}}
        """
    )
    assert config.oauth is not None
    assert config.oauth.token_keys_url == url


def test_listener_ports_may_be_zero() -> None:
    config = _proxy(
        TRUSTED
        + """\
  businessDataTunnel: {port: 0}
metrics: {prometheus: {port: 0}}
"""
    )
    assert config.tunnel_listener.port == 0
    assert config.tunnel_listener.external_port == 8042
    assert config.metrics.port == 0
    both_zero = _proxy(TRUSTED.replace("{enableProxyAuthorization: false}", "{enableProxyAuthorization: false, port: 0}"))
    assert both_zero.http.port == both_zero.socks5.port == 0


def test_external_port_follows_a_custom_listener_port() -> None:
    config = _proxy(TRUSTED + "  businessDataTunnel: {port: 9443}\n")
    assert config.tunnel_listener.external_port == 9443
    config = _proxy(TRUSTED + "  businessDataTunnel: {port: 9443, externalPort: 443}\n")
    assert config.tunnel_listener.external_port == 443


def test_disabled_listeners_may_share_ports() -> None:
    config = _proxy(
        """\
        subaccountId: t
        servers:
          proxy:
            http: {enabled: false, port: 8042}
            socks5: {enableProxyAuthorization: false}
        metrics: {prometheus: {enabled: false, port: 20004}}
        """
    )
    assert not config.http.enabled


def test_null_means_default() -> None:
    config = _proxy(TRUSTED + "tunnel:\nmetrics: {prometheus: {port: null}}\nlogging:\n")
    assert config.metrics.port == 9494
    assert config.tunnel.max_streams == 10000


def test_floats_allowed_for_seconds() -> None:
    config = _proxy(TRUSTED + "tunnel: {pingIntervalSeconds: 0.5, deadAfterSeconds: 2}\n")
    assert config.tunnel.ping_interval_seconds == 0.5
    assert config.tunnel.dead_after_seconds == 2.0


def test_bind_address_is_normalised() -> None:
    config = _proxy(TRUSTED + "  businessDataTunnel: {bindAddress: '0:0::0'}\n")
    assert config.tunnel_listener.bind_address == "::"


def test_interface_for() -> None:
    config = _proxy(TRUSTED.replace("http: {", "http: {allowRemoteConnections: false, "))
    assert config.interface_for(config.http) == "127.0.0.1"
    assert config.interface_for(config.socks5) == "0.0.0.0"
    assert ProxyConfig.interface_for(FrontEndConfig(allow_remote_connections=False)) == "127.0.0.1"


def test_replace_builds_variants() -> None:
    config = embedded_proxy_config()
    variant = dataclasses.replace(config, http=dataclasses.replace(config.http, port=0, allow_connect=False))
    assert variant.http.port == 0
    assert not variant.http.allow_connect
    assert isinstance(variant.http, HttpFrontEndConfig)
    check_proxy_config(variant)
    with pytest.raises(ConfigError, match="allowedClientId: is required"):
        check_proxy_config(dataclasses.replace(config, socks5=dataclasses.replace(config.socks5, enable_proxy_authorization=True)))


def test_embedded_proxy_config() -> None:
    config = embedded_proxy_config()
    check_proxy_config(config)
    assert config.tenant_mode == "dedicated"
    assert config.subaccount_id == DEV_SUBACCOUNT
    assert config.oauth is None
    assert not config.authorization_enabled
    for front_end in (config.http, config.socks5):
        assert front_end.enabled
        assert not front_end.enable_proxy_authorization
        assert not front_end.allow_remote_connections
        assert config.interface_for(front_end) == "127.0.0.1"
    assert (config.http.port, config.socks5.port) == (20003, 20004)
    assert config.tunnel_listener.bind_address == "127.0.0.1"
    assert config.tunnel_listener.port == 8042
    assert config.tunnel_listener.tls == TlsFiles()
    assert (config.metrics.enabled, config.metrics.port, config.metrics.bind_address) == (True, 9494, "127.0.0.1")


PROXY_ERRORS = [
    # unknown keys, at every level
    ("bogus: 1", "bogus: unknown key"),
    ("servers: {proxy: {htp: {}}}", "servers.proxy.htp: unknown key (did you mean 'http'?)"),
    ("servers: {businessDataTunnel: {tls: {caFile: x}}}", "servers.businessDataTunnel.tls.caFile: unknown key (did you mean 'clientCaFile'?)"),
    ("servers: {proxy: {http: {maxHeaders: 1}}}", "servers.proxy.http.maxHeaders: unknown key"),
    ("servers: {proxy: {socks5: {allowConnect: true}}}", "servers.proxy.socks5.allowConnect: unknown key"),
    ("servers: {proxy: {authorization: {basic: {}}}}", "servers.proxy.authorization.basic: unknown key"),
    ("servers: {proxy: {authorization: {oauth: {clientId: x}}}}", "servers.proxy.authorization.oauth.clientId: unknown key"),
    ("servers: {proxy: {clientConnection: {writeTimeoutSeconds: 1}}}", "servers.proxy.clientConnection.writeTimeoutSeconds: unknown key (a SAP"),
    ("servers: {proxy: {rfcAndLdap: {enabled: false}}}", "servers.proxy.rfcAndLdap: unknown key (a SAP"),
    ("subaccountSubdomain: x", "subaccountSubdomain: unknown key (a SAP"),
    ("tunnel: {window: 1}", "tunnel.window: unknown key"),
    ("metrics: {port: 1}", "metrics.port: unknown key"),
    ("metrics: {prometheus: {path: /m}}", "metrics.prometheus.path: unknown key"),
    ("logging: {colour: true}", "logging.colour: unknown key"),
    ("servers: {grpc: {}}", "servers.grpc: unknown key"),
    ("1: x", "(top level): keys must be strings, got 1"),
    ("servers: {proxy: {on: 1}}", "servers.proxy: keys must be strings, got True"),
    # wrong shapes and types
    ("servers: []", "servers: expected a mapping, got []"),
    ("servers: {proxy: {http: true}}", "servers.proxy.http: expected a mapping, got True"),
    ("servers: {proxy: {socks5: {port: abc}}}", "servers.proxy.socks5.port: expected an integer 1-65535, got 'abc'"),
    ("servers: {proxy: {socks5: {port: '20004'}}}", "servers.proxy.socks5.port: expected an integer 1-65535, got '20004'"),
    ("servers: {proxy: {socks5: {port: 70000}}}", "servers.proxy.socks5.port: expected an integer 1-65535, got 70000"),
    ("servers: {proxy: {socks5: {port: -1}}}", "servers.proxy.socks5.port: expected an integer 1-65535, got -1"),
    ("servers: {proxy: {socks5: {port: 20004.0}}}", "servers.proxy.socks5.port: expected an integer"),
    ("servers: {proxy: {socks5: {port: 0.0}}}", "servers.proxy.socks5.port: expected an integer"),
    ("servers: {proxy: {http: {port: true}}}", "servers.proxy.http.port: expected an integer 1-65535, got True"),
    ("servers: {businessDataTunnel: {externalPort: 0}}", "servers.businessDataTunnel.externalPort: expected an integer 1-65535, got 0"),
    ("servers: {businessDataTunnel: {bindAddress: localhost}}", "servers.businessDataTunnel.bindAddress: expected an IP address"),
    ("servers: {businessDataTunnel: {externalHost: ''}}", "servers.businessDataTunnel.externalHost: must not be empty"),
    ("servers: {businessDataTunnel: {externalHost: 5}}", "servers.businessDataTunnel.externalHost: expected a string, got 5"),
    ("servers: {businessDataTunnel: {tls: {certFile: 1}}}", "servers.businessDataTunnel.tls.certFile: expected a string, got 1"),
    ("servers: {proxy: {http: {enabled: 'true'}}}", "servers.proxy.http.enabled: expected true or false, got 'true'"),
    ("servers: {proxy: {http: {enabled: 1}}}", "servers.proxy.http.enabled: expected true or false, got 1"),
    ("servers: {proxy: {socks5: {allowRemoteConnections: 'no'}}}", "servers.proxy.socks5.allowRemoteConnections: expected true or false"),
    ("servers: {proxy: {http: {allowConnect: null, maxLineBytes: 10}}}", "servers.proxy.http.maxLineBytes: expected an integer 1024-16777216, got 10"),
    ("servers: {proxy: {http: {maxLineBytes: 4096, maxHeaderBytes: 2048}}}", "servers.proxy.http.maxHeaderBytes: must be at least servers.proxy.http.maxLineBytes"),
    ("servers: {proxy: {clientConnection: {idleTimeoutSeconds: 0}}}", "servers.proxy.clientConnection.idleTimeoutSeconds: expected a number > 0, got 0"),
    ("servers: {proxy: {clientConnection: {handshakeTimeoutSeconds: .nan}}}", "servers.proxy.clientConnection.handshakeTimeoutSeconds: expected a number > 0"),
    ("servers: {proxy: {clientConnection: {handshakeTimeoutSeconds: '5'}}}", "servers.proxy.clientConnection.handshakeTimeoutSeconds: expected a number > 0, got '5'"),
    ("tenantMode: multi", "tenantMode: expected one of dedicated, shared, got 'multi'"),
    ("tenantMode: Dedicated", "tenantMode: expected one of dedicated, shared"),
    ("subaccountId: ''", "subaccountId: must not be empty"),
    ("subaccountId: 12", "subaccountId: expected a string, got 12"),
    ("highAvailabilityMode: on", "highAvailabilityMode: expected one of off, path, subdomain, got True"),
    ("highAvailabilityMode: replica", "highAvailabilityMode: expected one of off, path, subdomain, got 'replica'"),
    ("logging: {format: text}", "logging.format: expected one of console, json, got 'text'"),
    ("logging: {level: warning}", "logging.level: expected one of debug, info, warn, error, got 'warning'"),
    ("metrics: {prometheus: {enabled: yes please}}", "metrics.prometheus.enabled: expected true or false"),
    ("tunnel: {streamWindowBytes: 1000}", "tunnel.streamWindowBytes: expected an integer 65536-2147483647, got 1000"),
    ("tunnel: {maxFrameBytes: 16383}", "tunnel.maxFrameBytes: expected an integer 16384-16777215, got 16383"),
    ("tunnel: {maxFrameBytes: 16777216}", "tunnel.maxFrameBytes: expected an integer 16384-16777215"),
    ("tunnel: {maxStreams: 0}", "tunnel.maxStreams: expected an integer 1-2147483647, got 0"),
    ("tunnel: {pingIntervalSeconds: 0}", "tunnel.pingIntervalSeconds: expected a number > 0, got 0"),
    ("tunnel: {pingIntervalSeconds: -1.5}", "tunnel.pingIntervalSeconds: expected a number > 0"),
    ("tunnel: {openTimeoutSeconds: false}", "tunnel.openTimeoutSeconds: expected a number > 0, got False"),
    ("tunnel: {streamWindowBytes: 1048576, connectionWindowBytes: 65536}", "tunnel.connectionWindowBytes: must be at least tunnel.streamWindowBytes"),
    ("tunnel: {pingIntervalSeconds: 30, deadAfterSeconds: 30}", "tunnel.deadAfterSeconds: must be greater than tunnel.pingIntervalSeconds"),
    # cross-field rules
    ("servers: {businessDataTunnel: {tls: {certFile: c.pem}}}", "servers.businessDataTunnel.tls: certFile and keyFile must be given together"),
    ("servers: {businessDataTunnel: {port: 20003}}", "servers.proxy.http.port: port 20003 is already used by servers.businessDataTunnel.port"),
    ("servers: {proxy: {socks5: {port: 20003}}}", "servers.proxy.socks5.port: port 20003 is already used by servers.proxy.http.port"),
    ("metrics: {prometheus: {port: 8042}}", "metrics.prometheus.port: port 8042 is already used by servers.businessDataTunnel.port"),
]


@pytest.mark.parametrize(("snippet", "message"), PROXY_ERRORS)
def test_proxy_errors(snippet: str, message: str) -> None:
    data = _yaml(snippet)
    merged = _yaml(TRUSTED)
    if isinstance(data, dict):
        _deep_merge(merged, data)
    with pytest.raises(ConfigError) as info:
        proxy_config_from_mapping(merged)
    assert str(info.value).startswith(message)


def _deep_merge(target: dict[Any, Any], extra: dict[Any, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value


def test_error_carries_the_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        _proxy(TRUSTED + "  businessDataTunnel: {externalPort: abc}\n")
    assert info.value.key_path == "servers.businessDataTunnel.externalPort"


AUTH_ERRORS = [
    (
        "subaccountId: t",
        "servers.proxy.authorization.oauth.allowedClientId: is required if enableProxyAuthorization is true (servers.proxy.http, servers.proxy.socks5)",
    ),
    (
        "subaccountId: t\nservers: {proxy: {http: {enabled: false}}}",
        "servers.proxy.authorization.oauth.allowedClientId: is required if enableProxyAuthorization is true (servers.proxy.socks5)",
    ),
    (
        "subaccountId: t\nservers: {proxy: {authorization: {oauth: {tokenKeysFile: k.json}}}}",
        "servers.proxy.authorization.oauth.allowedClientId: is required",
    ),
    (
        "subaccountId: t\nservers: {proxy: {authorization: {oauth: {allowedClientId: c}}}}",
        "servers.proxy.authorization.oauth: tokenKeysFile, tokenKeysUrl or uaaDomain is required if enableProxyAuthorization is true",
    ),
    ("servers: {proxy: {authorization: {oauth: {allowedClientId: []}}}}", "servers.proxy.authorization.oauth.allowedClientId: expected a string or a non-empty list"),
    ("servers: {proxy: {authorization: {oauth: {allowedClientId: [a, '']}}}}", "servers.proxy.authorization.oauth.allowedClientId[1]: expected a non-empty string, got ''"),
    ("servers: {proxy: {authorization: {oauth: {allowedClientId: [a, 3]}}}}", "servers.proxy.authorization.oauth.allowedClientId[1]: expected a non-empty string, got 3"),
    ("servers: {proxy: {authorization: {oauth: {allowedClientId: {a: b}}}}}", "servers.proxy.authorization.oauth.allowedClientId: expected a string or a non-empty list"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'http://uaa.example/keys'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL, got 'http://uaa.example/keys'"),
    # http to loopback too: the proxy's key store allows it only in tests (KeyStore(allow_insecure_loopback=True))
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'http://127.0.0.1/keys'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL, got 'http://127.0.0.1/keys'"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'http://localhost:8080/k'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'ftp://uaa.example/keys'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'uaa.example/keys'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'https://u:p@uaa.example/keys'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: must not contain user information"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'https://uaa.example/k eys'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: not a valid URL"),
    ("servers: {proxy: {authorization: {oauth: {tokenKeysUrl: 'https://x:99999/'}}}}", "servers.proxy.authorization.oauth.tokenKeysUrl: not a valid URL"),
    ("servers: {proxy: {authorization: {oauth: {uaaDomain: 'https://auth.example'}}}}", "servers.proxy.authorization.oauth.uaaDomain: expected a bare domain"),
    ("servers: {proxy: {authorization: {oauth: {uaaDomain: 'auth.example/x'}}}}", "servers.proxy.authorization.oauth.uaaDomain: expected a bare domain"),
    ("servers: {proxy: {authorization: {oauth: {uaaDomain: 'auth.example:443'}}}}", "servers.proxy.authorization.oauth.uaaDomain: expected a bare domain"),
    ("servers: {proxy: {authorization: {oauth: {leewaySeconds: -1}}}}", "servers.proxy.authorization.oauth.leewaySeconds: expected an integer >= 0, got -1"),
    ("servers: {proxy: {authorization: {oauth: {leewaySeconds: 1.5}}}}", "servers.proxy.authorization.oauth.leewaySeconds: expected an integer >= 0, got 1.5"),
    ("tenantMode: dedicated", "subaccountId: is required if tenantMode is dedicated"),
]


@pytest.mark.parametrize(("text", "message"), AUTH_ERRORS)
def test_authorization_errors(text: str, message: str) -> None:
    data = _yaml(text)
    data.setdefault("tenantMode", "shared")
    with pytest.raises(ConfigError) as info:
        proxy_config_from_mapping(data)
    assert str(info.value).startswith(message)


def test_authorization_off_everywhere_needs_no_oauth_block() -> None:
    assert _proxy(TRUSTED).oauth is None


def test_oauth_block_is_kept_when_authorization_is_off() -> None:
    config = _proxy(TRUSTED + "    authorization: {oauth: {leewaySeconds: 5}}\n")
    assert config.oauth == OAuthConfig(leeway_seconds=5)


# ---------------------------------------------------------------------------------------------- files


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_proxy_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_proxy_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: expected a mapping at the top level"):
        load_connector_config(scalar)
    dup = tmp_path / "dup.yaml"
    dup.write_text("subaccountId: a\nservers:\n  proxy: {}\n  proxy: {}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 4: duplicate key 'proxy'"):
        load_proxy_config(dup)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            subaccountId: t
            x-front: &front {enableProxyAuthorization: false, allowRemoteConnections: false}
            """
        )
    )
    with pytest.raises(ConfigError, match="x-front: unknown key"):
        load_proxy_config(path)
    path.write_text(
        textwrap.dedent(
            """\
            subaccountId: t
            servers:
              proxy:
                http: &front {enableProxyAuthorization: false, allowRemoteConnections: false}
                socks5: {<<: *front, allowRemoteConnections: true}
            """
        )
    )
    config = load_proxy_config(path)
    assert not config.socks5.enable_proxy_authorization
    assert config.socks5.allow_remote_connections


# ---------------------------------------------------------------------------------------------- connector


def test_connector_defaults() -> None:
    config = connector_config_from_mapping({"subaccountId": "t"})
    assert config.subaccount_id == "t"
    assert config.location_id == ""
    assert config.connector_id == socket.gethostname()
    assert (config.proxy.host, config.proxy.port, config.proxy.server_name) == ("localhost", 8042, None)
    assert config.proxy.verify_name == "localhost"
    assert config.tls == TlsFiles()
    assert config.tunnel == _proxy(TRUSTED).tunnel
    assert config.reconnect.initial_delay_seconds == 0.2
    assert config.reconnect.max_delay_seconds == 2
    assert config.reconnect.fast_retries == 3
    assert config.backend.connect_timeout_seconds == 10
    assert config.access_control == ()
    assert acl.find_rule(config, "erp.internal", 80) is None
    assert config == ConnectorConfig(subaccount_id="t")


def test_contract_connector_sample(tmp_path: Path) -> None:
    path = tmp_path / "connector.yaml"
    path.write_text(CONTRACT_CONNECTOR_YAML)
    config = load_connector_config(path)
    assert config.location_id == "loc-1"
    assert config.tls.ca_file == str(tmp_path / "...")
    (rule,) = config.access_control
    assert rule == AccessRule(
        virtual_host="erp.internal",
        virtual_ports=(80, 80),
        internal_host="127.0.0.1",
        internal_ports=(8080, 8080),
        protocol="HTTP",
        host_in_header="virtual",
        ca_file=None,
        resources=(Resource("/api", all_sub_paths=True, upgrade_allowed=False),),
    )
    assert acl.find_rule(config, "ERP.Internal", 80) is rule
    assert acl.find_rule(config, "erp.internal", 81) is None
    assert acl.internal_port_for(rule, 80) == 8080


def test_connector_server_name_and_ids() -> None:
    config = _connector(
        """\
        subaccountId: t
        locationId: ""
        connectorId: scc-1
        proxy: {host: "[::1]", port: 9443, serverName: proxy.example}
        """
    )
    assert config.connector_id == "scc-1"
    assert config.proxy.host == "::1"
    assert config.proxy.verify_name == "proxy.example"


def test_embedded_connector_config() -> None:
    config = embedded_connector_config()
    check_connector_config(config)
    assert config.subaccount_id == DEV_SUBACCOUNT
    assert config.location_id == ""
    assert (config.proxy.host, config.proxy.port) == ("localhost", 8042)
    assert config.access_control == ()
    assert config.tls == TlsFiles()


CONNECTOR_ERRORS = [
    ({}, "subaccountId: is required"),
    ({"subaccountId": ""}, "subaccountId: must not be empty"),
    ({"subaccountId": "t", "tenantMode": "shared"}, "tenantMode: unknown key"),
    ({"subaccountId": "t", "locationId": 5}, "locationId: expected a string, got 5"),
    ({"subaccountId": "t", "connectorId": ""}, "connectorId: must not be empty"),
    ({"subaccountId": "t", "proxy": {"hots": "x"}}, "proxy.hots: unknown key (did you mean 'host'?)"),
    ({"subaccountId": "t", "proxy": {"port": 0}}, "proxy.port: expected an integer 1-65535, got 0"),
    ({"subaccountId": "t", "proxy": {"host": "http://x"}}, "proxy.host: expected a host name or IP address"),
    ({"subaccountId": "t", "tls": {"clientCaFile": "x"}}, "tls.clientCaFile: unknown key (did you mean 'caFile'?)"),
    ({"subaccountId": "t", "tls": {"keyFile": "k"}}, "tls: certFile and keyFile must be given together"),
    ({"subaccountId": "t", "tunnel": {"maxStreams": "many"}}, "tunnel.maxStreams: expected an integer"),
    ({"subaccountId": "t", "reconnect": {"initialDelaySeconds": 0}}, "reconnect.initialDelaySeconds: expected a number > 0"),
    ({"subaccountId": "t", "reconnect": {"fastRetries": -1}}, "reconnect.fastRetries: expected an integer >= 0, got -1"),
    ({"subaccountId": "t", "reconnect": {"initialDelaySeconds": 5, "maxDelaySeconds": 1}}, "reconnect.maxDelaySeconds: must be at least reconnect.initialDelaySeconds"),
    ({"subaccountId": "t", "backend": {"connectTimeoutSeconds": -1}}, "backend.connectTimeoutSeconds: expected a number > 0"),
    ({"subaccountId": "t", "accessControl": {"virtualHost": "x"}}, "accessControl: expected a list"),
    ({"subaccountId": "t", "accessControl": ["x"]}, "accessControl[0]: expected a mapping, got 'x'"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol=None)]}, "accessControl[0].protocol: is required"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="http")]}, "accessControl[0].protocol: expected one of HTTP, HTTPS, TCP, TCP_TLS, got 'http'"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualHost=None)]}, "accessControl[0].virtualHost: is required"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualHost="a b")]}, "accessControl[0].virtualHost: expected a host name or IP address"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualPort=None)]}, "accessControl[0].virtualPort: is required"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualPort=0)]}, "accessControl[0].virtualPort: expected an integer 1-65535, got 0"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualPort=True)]}, "accessControl[0].virtualPort: expected an integer 1-65535, got True"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualPort="80-81")]}, "accessControl[0].virtualPort: expected an integer 1-65535, got '80-81' (port ranges are only allowed for TCP and TCP_TLS)"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", virtualPort="90-80")]}, "accessControl[0].virtualPort: the range must not be descending"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", virtualPort="1-70000")]}, "accessControl[0].virtualPort: expected an integer 1-65535 or a range 'first-last', got '1-70000'"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", virtualPort="a-b")]}, "accessControl[0].virtualPort: expected an integer 1-65535 or a range"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", virtualPort="80-89", internalPort="90-100")]}, "accessControl[0].internalPort: the range 90-100 must have the same length as virtualPort 80-89"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", virtualPort="80-89", internalPort=90)]}, "accessControl[0].internalPort: the range 90-90 must have the same length"),
    ({"subaccountId": "t", "accessControl": [_rule(internalHost="")]}, "accessControl[0].internalHost: must not be empty"),
    ({"subaccountId": "t", "accessControl": [_rule(hostInHeader="both")]}, "accessControl[0].hostInHeader: expected one of virtual, internal, got 'both'"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", hostInHeader="virtual")]}, "accessControl[0].hostInHeader: only allowed for HTTP and HTTPS, not TCP"),
    ({"subaccountId": "t", "accessControl": [_rule(caFile="ca.pem")]}, "accessControl[0].caFile: only allowed for HTTPS and TCP_TLS, not HTTP"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", resources=[{"path": "/"}])]}, "accessControl[0].resources: only allowed for HTTP and HTTPS, not TCP"),
    ({"subaccountId": "t", "accessControl": [_rule(resources={"path": "/"})]}, "accessControl[0].resources: expected a list"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{"path": "api"}])]}, "accessControl[0].resources[0].path: must start with '/', got 'api'"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{}])]}, "accessControl[0].resources[0].path: is required"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{"path": "/a?b"}])]}, "accessControl[0].resources[0].path: must not contain whitespace, '?' or '#'"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{"path": "/a/../b"}])]}, "accessControl[0].resources[0].path: must not contain '.' or '..' segments"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{"path": "/a"}, {"path": "/a"}])]}, "accessControl[0].resources[1].path: duplicate path '/a'"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{"path": "/a", "allSubPaths": "yes"}])]}, "accessControl[0].resources[0].allSubPaths: expected true or false, got 'yes'"),
    ({"subaccountId": "t", "accessControl": [_rule(resources=[{"path": "/a", "recursive": True}])]}, "accessControl[0].resources[0].recursive: unknown key"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualhost="x")]}, "accessControl[0].virtualhost: unknown key (did you mean 'virtualHost'?)"),
    ({"subaccountId": "t", "accessControl": [_rule(), _rule(internalHost="other")]}, "accessControl[1]: virtual host erp.internal port 80 is already mapped by accessControl[0]"),
    ({"subaccountId": "t", "accessControl": [_rule(), _rule(virtualHost="ERP.Internal.")]}, "accessControl[1]: virtual host erp.internal port 80 is already mapped by accessControl[0]"),
    ({"subaccountId": "t", "accessControl": [_rule(protocol="TCP", virtualPort="100-200"), _rule(virtualPort=81), _rule(protocol="TCP_TLS", virtualPort="150-160")]}, "accessControl[2]: virtual host erp.internal port 150 is already mapped by accessControl[0]"),
    ({"subaccountId": "t", "accessControl": [_rule(virtualHost="::1"), _rule(virtualHost="[0:0::1]")]}, "accessControl[1]: virtual host ::1 port 80 is already mapped by accessControl[0]"),
]


@pytest.mark.parametrize(("data", "message"), CONNECTOR_ERRORS)
def test_connector_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        connector_config_from_mapping(data)
    assert str(info.value).startswith(message), str(info.value)


def test_rule_options_and_paths(tmp_path: Path) -> None:
    config = connector_config_from_mapping(
        {
            "subaccountId": "t",
            "accessControl": [
                _rule(protocol="HTTPS", hostInHeader="internal", caFile="certs/erp.pem", virtualPort=443),
                _rule(protocol="TCP_TLS", virtualPort=5432, caFile="/abs/ca.pem"),
            ],
        },
        base_dir=tmp_path,
    )
    https, tcp_tls = config.access_control
    assert https.host_in_header == "internal"
    assert https.ca_file == str(tmp_path / "certs" / "erp.pem")
    assert tcp_tls.ca_file == "/abs/ca.pem"
    assert tcp_tls.host_in_header == "virtual"


def test_same_host_different_ports_do_not_overlap() -> None:
    config = _connector_with(_rule(), _rule(virtualPort=81), _rule(virtualHost="other", virtualPort=80))
    assert len(config.access_control) == 3


def test_connector_check_on_variants() -> None:
    config = _connector_with(_rule())
    doubled = dataclasses.replace(config, access_control=config.access_control * 2)
    with pytest.raises(ConfigError, match=r"accessControl\[1\]"):
        check_connector_config(doubled)


def test_connector_logging_block() -> None:
    from connproxy.config import connector_config_from_mapping

    config = connector_config_from_mapping({"subaccountId": "a", "logging": {"format": "json", "level": "warn"}})
    assert (config.logging.format, config.logging.level) == ("json", "warn")
    with pytest.raises(ConfigError, match="logging.format"):
        connector_config_from_mapping({"subaccountId": "a", "logging": {"format": "xml"}})


# ---------------------------------------------------------------------------------------------- every problem


def test_every_problem_is_reported_once_each() -> None:
    with pytest.raises(ConfigError) as info:
        _proxy(
            """\
            subaccountId: t
            bogus: 1
            servers:
              proxy:
                http: {port: abc, enableProxyAuthorization: false}
                socks5: {port: 70000, enableProxyAuthorization: false}
            tunnel: {maxStreams: 0, pingIntervalSeconds: 40}
            logging: {format: xml}
            """
        )
    assert info.value.lines == [
        "bogus: unknown key",
        "servers.proxy.http.port: expected an integer 1-65535, got 'abc'",
        "servers.proxy.socks5.port: expected an integer 1-65535, got 70000",
        "tunnel.maxStreams: expected an integer 1-2147483647, got 0",
        "logging.format: expected one of console, json, got 'xml'",
        "tunnel.deadAfterSeconds: must be greater than tunnel.pingIntervalSeconds (30 <= 40)",
    ]
    assert info.value.key_path == "bogus"
    assert [p.key_path for p in info.value.problems][:2] == ["bogus", "servers.proxy.http.port"]


def test_cross_field_rules_skip_keys_that_already_had_a_problem() -> None:
    # the bad port falls back to its default, which must not then be reported as "already used"
    with pytest.raises(ConfigError) as info:
        _proxy(TRUSTED + "  businessDataTunnel: {port: 20004.5}\nmetrics: {prometheus: {port: 20003}}\n")
    assert info.value.lines == [
        "servers.businessDataTunnel.port: expected an integer 1-65535, got 20004.5",
        "metrics.prometheus.port: port 20003 is already used by servers.proxy.http.port",
    ]
    with pytest.raises(ConfigError) as info:
        _proxy(TRUSTED + "tunnel: {streamWindowBytes: 1, connectionWindowBytes: 65536}\n")
    assert info.value.lines == ["tunnel.streamWindowBytes: expected an integer 65536-2147483647, got 1"]


def test_a_bad_access_rule_keeps_the_indexes_of_the_others() -> None:
    with pytest.raises(ConfigError) as info:
        _connector_with(_rule(protocol="FTP"), _rule(virtualPort=81), _rule(virtualPort=81, internalHost="x"))
    assert info.value.lines == [
        "accessControl[0].protocol: expected one of HTTP, HTTPS, TCP, TCP_TLS, got 'FTP'",
        "accessControl[2]: virtual host erp.internal port 81 is already mapped by accessControl[1]",
    ]


# ---------------------------------------------------------------------------------------------- the schema


def test_connector_dataclass_defaults_match_parser_defaults() -> None:
    parsed = connector_config_from_mapping({"subaccountId": "t", "connectorId": "c"})
    assert parsed == ConnectorConfig(subaccount_id="t", connector_id="c")


def _unread_keys(context: Context) -> list[str]:
    return sorted(section.at(name) for section in context.sections for name in set(section.keys) - section.used)


def test_the_parser_reads_every_declared_proxy_key() -> None:
    context = Context()
    build_proxy_config(_yaml(CONTRACT_PROXY_YAML), context)
    assert context.problems == []
    assert _unread_keys(context) == []


def test_the_parser_reads_every_declared_connector_key() -> None:
    context = Context()
    data = _yaml(CONTRACT_CONNECTOR_YAML)
    data["accessControl"].append(_rule(protocol="HTTPS", virtualPort=443, caFile="ca.pem", hostInHeader="internal"))
    build_connector_config(data, context)
    assert context.problems == []
    assert _unread_keys(context) == []


def test_configuration_reference_matches_the_schema() -> None:
    """docs/configuration.md is generated from the key declarations; regenerate it with
    `python -m connproxy.config.reference > docs/configuration.md`."""
    document = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert document.read_text(encoding="utf-8") == reference.render()


def test_reference_lists_every_key_with_its_default() -> None:
    text = reference.render()
    for keys in (PROXY_KEYS, CONNECTOR_KEYS):
        for path, _ in walk(keys):
            assert f"| `{path}` |" in text
    assert "| `servers.proxy.http.allowRemoteConnections` | boolean | `true` |" in text
    assert "| `servers.businessDataTunnel.bindAddress` | IP address | `0.0.0.0` |" in text


# ---------------------------------------------------------------------------------------------- warnings


def test_startup_warnings_for_a_proxy_open_to_the_network() -> None:
    config = _proxy(TRUSTED)
    assert startup_warnings(config) == [
        "servers.proxy.http: listens on 0.0.0.0:20003 without proxy authorization: anyone who can reach it can use "
        "every connector of the tenant (set enableProxyAuthorization: true, or allowRemoteConnections: false for "
        "loopback only)",
        "servers.proxy.socks5: listens on 0.0.0.0:20004 without proxy authorization: anyone who can reach it can use "
        "every connector of the tenant (set enableProxyAuthorization: true, or allowRemoteConnections: false for "
        "loopback only)",
        "servers.businessDataTunnel: listens on 0.0.0.0:8042 with the development certificates (tls.certFile, "
        "keyFile or clientCaFile left out): not for production",
        "metrics.prometheus: serves /metrics on 0.0.0.0:9494 to the network (bindAddress: 127.0.0.1 for loopback "
        "only)",
    ]


def test_no_startup_warnings_on_loopback_or_with_authorization_and_files() -> None:
    assert startup_warnings(embedded_proxy_config()) == []
    config = _proxy(
        """\
        subaccountId: t
        servers:
          businessDataTunnel: {tls: {certFile: c.pem, keyFile: k.pem, clientCaFile: ca.pem}}
          proxy: {authorization: {oauth: {allowedClientId: a, uaaDomain: uaa.example}}}
        metrics: {prometheus: {bindAddress: 127.0.0.1}}
        """
    )
    assert startup_warnings(config) == []
    assert startup_warnings(embedded_connector_config()) == [
        "tls: the connector uses the development certificates (certFile, keyFile or caFile left out): not for "
        "production"
    ]
