"""ProxyService and the connector service built on a MemoryReactor: listeners, interfaces, dev PKI fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from connproxy.config import connector_config_from_mapping, embedded_proxy_config, proxy_config_from_mapping
from connproxy.connector.dialer import make_connector_service
from connproxy.proxy.service import ProxyService
from connproxy.testing import mint_test_pki


def test_proxy_listeners_follow_the_configuration(tmp_path: Path) -> None:
    files = mint_test_pki().write(tmp_path / "pki")
    config = proxy_config_from_mapping({
        "subaccountId": "t",
        "servers": {
            "businessDataTunnel": {"port": 18042, "tls": {"certFile": str(files.proxy_cert),
                                                          "keyFile": str(files.proxy_key),
                                                          "clientCaFile": str(files.ca_cert)}},
            "proxy": {"socks5": {"port": 11080, "enableProxyAuthorization": False, "allowRemoteConnections": False},
                      "http": {"enabled": False, "enableProxyAuthorization": False}},
        },
    })
    reactor = MemoryReactorClock()
    service = ProxyService(config, reactor)
    service.startService()
    assert [(port, iface) for port, _f, _ctx, _b, iface in reactor.sslServers] == [(18042, "0.0.0.0")]
    socks = [(port, iface) for port, _f, _b, iface in reactor.tcpServers if port == 11080]
    assert socks == [(11080, "127.0.0.1")]  # allowRemoteConnections false: loopback only
    service.stopService()


def test_embedded_defaults_use_the_dev_pki_in_the_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "state"))
    reactor = MemoryReactorClock()
    service = ProxyService(embedded_proxy_config(), reactor)
    service.startService()
    assert (tmp_path / "state" / "dev-pki" / "proxy.crt").exists()
    assert all(iface == "127.0.0.1" for _p, _f, _c, _b, iface in reactor.sslServers)
    assert all(iface == "127.0.0.1" for _p, _f, _b, iface in reactor.tcpServers)
    service.stopService()


def test_connector_service_dials_the_configured_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "state"))
    config = connector_config_from_mapping({"subaccountId": "dev-subaccount", "proxy": {"host": "127.0.0.1", "port": 18042}})
    reactor = MemoryReactorClock()
    service = make_connector_service(config, reactor)
    service.startService()
    assert [(host, port) for host, port, *_rest in reactor.tcpClients] == [("127.0.0.1", 18042)]
    service.stopService()


def test_ingress_listener_has_its_key_backlog_and_is_drained(tmp_path: Path) -> None:
    files = mint_test_pki().write(tmp_path / "pki")
    config = proxy_config_from_mapping({
        "subaccountId": "t",
        "servers": {
            "businessDataTunnel": {"port": 18042, "tls": {"certFile": str(files.proxy_cert),
                                                          "keyFile": str(files.proxy_key),
                                                          "clientCaFile": str(files.ca_cert)},
                                   "ingress": {"enabled": True, "port": 18043, "bindAddress": "127.0.0.1",
                                               "trustedSources": ["127.0.0.1"]}},
            "proxy": {"socks5": {"enabled": False, "enableProxyAuthorization": False},
                      "http": {"enabled": False, "enableProxyAuthorization": False},
                      "clientConnection": {"listenBacklog": 77}},
        },
        "metrics": {"prometheus": {"enabled": False}},
    })
    reactor = MemoryReactorClock()
    service = ProxyService(config, reactor)
    ingress = service.ingress_listener
    assert ingress is not None
    assert ingress.config_key == "servers.businessDataTunnel.ingress.port"
    assert ingress.endpoint._backlog == 77  # type: ignore[attr-defined]
    service.startService()
    assert [(port, backlog, iface) for port, _f, backlog, iface in reactor.tcpServers] == [(18043, 77, "127.0.0.1")]
    assert service.readiness() == (True, "")
    stopped = service.stopService()
    assert not ingress.running  # stops accepting at once, with the tunnel listener
    assert stopped.called
