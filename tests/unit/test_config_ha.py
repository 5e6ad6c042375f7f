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
    # An entry's problem names the entry (key paths with an index, as for allowedClientId).
    ({"trustedSources": ["10.0.0.300/8"]}, "servers.businessDataTunnel.ingress.trustedSources[0]"),
    ({"clientCertificateHeader": "bad header"}, "servers.businessDataTunnel.ingress.clientCertificateHeader"),
    ({"enabled": True, "port": 8042, "trustedSources": ["10.0.0.0/8"]}, "servers.businessDataTunnel.ingress.port"),
    ({"tls": {}}, "servers.businessDataTunnel.ingress.tls"),
])
def test_bad_ingress_keys_name_the_key(ingress: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        proxy(bdt={"port": 8042, "ingress": ingress})
    assert e.value.key_path == key


def test_replica_set_keys() -> None:
    config = proxy(highAvailability={"replicaName": "connectivity-proxy-1",
                                     "replicas": ["connectivity-proxy-0", "connectivity-proxy-1"],
                                     "discoveryIntervalSeconds": 1})
    assert config.high_availability == HighAvailabilityConfig(
        "connectivity-proxy-1", ("connectivity-proxy-0", "connectivity-proxy-1"), None, 1.0)
    headless = proxy(highAvailability={"headlessService": "cp-headless.ns.svc.cluster.local"})
    assert headless.high_availability.headless_service == "cp-headless.ns.svc.cluster.local"


@pytest.mark.parametrize(("ha", "key"), [
    ({"replicas": ["connectivity-proxy-0", "a.b"]}, "highAvailability.replicas[1]"),
    ({"replicas": ["cp-0", "cp-0"]}, "highAvailability.replicas"),
    ({"replicas": "cp-0"}, "highAvailability.replicas"),
    ({"headlessService": "not a name"}, "highAvailability.headlessService"),
    ({"replicas": ["cp-0"], "headlessService": "svc"}, "highAvailability.headlessService"),
    ({"discoveryIntervalSeconds": 0.5}, "highAvailability.discoveryIntervalSeconds"),
    ({"peers": []}, "highAvailability.peers"),
])
def test_bad_replica_set_keys_name_the_key(ha: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        proxy(highAvailability=ha)
    assert e.value.key_path == key
    assert str(e.value).startswith(key + ": ")


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


def test_config_check_names_a_busy_ingress_port() -> None:
    import socket

    from connproxy.config import verify_proxy_config

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = proxy(bdt={"port": 0, "ingress": {"enabled": True, "port": port, "bindAddress": "127.0.0.1",
                                                   "trustedSources": ["127.0.0.1"]}},
                       metrics={"prometheus": {"enabled": False}})
        with pytest.raises(ConfigError) as e:
            verify_proxy_config(config, check_ports=True)
    # (The front ends' default ports may be busy on a shared machine too: look at the ingress line only.)
    ingress = [p.line for p in e.value.problems if p.key_path == "servers.businessDataTunnel.ingress.port"]
    assert ingress == [f"servers.businessDataTunnel.ingress.port: port {port} is already in use (127.0.0.1:{port})"]
