"""Configuration keys of several replicas: ``highAvailability``, ``servers.businessDataTunnel.ingress`` (proxy),
``proxy.highAvailabilityMode`` and ``corporateProxy`` (connector)."""

from __future__ import annotations

from typing import Any

import pytest

from connproxy.config import (
    ConfigError,
    CorporateProxyConfig,
    HighAvailabilityConfig,
    IngressListenerConfig,
    connector_config_from_mapping,
    proxy_config_from_mapping,
)

OFF = {"enableProxyAuthorization": False}


def proxy(**extra: Any) -> Any:
    data: dict[str, Any] = {"subaccountId": "t", "servers": {"proxy": {"http": dict(OFF), "socks5": dict(OFF)}}}
    for key, value in extra.items():
        if key == "bdt":
            data["servers"]["businessDataTunnel"] = value
        else:
            data[key] = value
    return proxy_config_from_mapping(data)


def test_defaults() -> None:
    config = proxy()
    assert config.high_availability == HighAvailabilityConfig()
    assert config.tunnel_listener.ingress == IngressListenerConfig()
    assert not config.tunnel_listener.ingress.enabled
    connector = connector_config_from_mapping({"subaccountId": "t"})
    assert connector.proxy.high_availability_mode == "off"
    assert connector.corporate_proxy == CorporateProxyConfig()
    assert connector.reconnect.max_delay_seconds == 2.0


def test_ingress_listener() -> None:
    config = proxy(bdt={"ingress": {"enabled": True, "port": 9000, "bindAddress": "127.0.0.1",
                                    "clientCertificateHeader": "X-Forwarded-Client-Cert",
                                    "trustedSources": ["10.1.2.3", "10.0.0.0/8", "::1"]}})
    ingress = config.tunnel_listener.ingress
    assert (ingress.enabled, ingress.port, ingress.bind_address) == (True, 9000, "127.0.0.1")
    assert ingress.client_certificate_header == "x-forwarded-client-cert"
    assert ingress.trusted_sources == ("10.1.2.3/32", "10.0.0.0/8", "::1/128")


@pytest.mark.parametrize(("ingress", "key"), [
    ({"enabled": True}, "servers.businessDataTunnel.ingress.trustedSources"),
    ({"trustedSources": ["10.0.0.300/8"]}, "servers.businessDataTunnel.ingress.trustedSources"),
    ({"clientCertificateHeader": "bad header"}, "servers.businessDataTunnel.ingress.clientCertificateHeader"),
    ({"enabled": True, "port": 8042, "trustedSources": ["10.0.0.0/8"]}, "servers.businessDataTunnel.ingress.port"),
    ({"tls": {}}, "servers.businessDataTunnel.ingress.tls"),
])
def test_bad_ingress_keys_name_the_key(ingress: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        proxy(bdt={"port": 8042, "ingress": ingress})
    assert e.value.key_path == key


def test_connector_keys() -> None:
    config = connector_config_from_mapping({
        "subaccountId": "t", "proxy": {"host": "cp.example.com", "port": 443, "highAvailabilityMode": "subdomain"},
        "corporateProxy": {"url": "http://u:p@proxy.corp:3128", "noProxy": ["Localhost", " .internal "],
                           "useEnvironment": False},
    })
    assert config.proxy.high_availability_mode == "subdomain"
    assert config.corporate_proxy == CorporateProxyConfig("http://u:p@proxy.corp:3128", ("localhost", ".internal"),
                                                          False)
    assert connector_config_from_mapping({"subaccountId": "t", "proxy": {"highAvailabilityMode": False}}
                                         ).proxy.high_availability_mode == "off"  # unquoted YAML off


@pytest.mark.parametrize(("data", "key"), [
    ({"proxy": {"highAvailabilityMode": "mesh"}}, "proxy.highAvailabilityMode"),
    ({"corporateProxy": {"url": "https://proxy:3128"}}, "corporateProxy.url"),
    ({"corporateProxy": {"url": "http://proxy"}}, "corporateProxy.url"),
    ({"corporateProxy": {"url": "http://proxy:99999"}}, "corporateProxy.url"),
    ({"corporateProxy": {"noProxy": [1]}}, "corporateProxy.noProxy"),
    ({"corporateProxy": {"user": "x"}}, "corporateProxy.user"),
])
def test_bad_connector_keys_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        connector_config_from_mapping({"subaccountId": "t", **data})
    assert e.value.key_path == key
