"""Unit tests for the proxy's side of several replicas: :mod:`connproxy.proxy.replicas` (identity, set, DNS
discovery, announcements) and :mod:`connproxy.proxy.upgrade` (the Upgrade decision, forwarded certificates)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import h11
import pytest
from cryptography import x509
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from connproxy.config import HighAvailabilityConfig, ProxyConfig, proxy_config_from_mapping
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.proxy.replicas import ReplicaDiscovery, ReplicaSet, ordinal_of, own_replica_name, replica_set_for
from connproxy.proxy.tunnel_listener import ProxyTunnelFactory
from connproxy.proxy.upgrade import (
    ForwardedCertificateError,
    check_forwarded_certificate,
    decide_upgrade,
    is_upgrade_request,
    parse_forwarded_certificate,
    source_trusted,
)
from connproxy.testing import mint_test_pki
from connproxy.wire.events import ReplicasReceived

NAMES = [f"connectivity-proxy-{n}" for n in range(3)]


# ------------------------------------------------------------------------------------------------ identity and set


def test_replica_name_configured_then_pod_name_then_host_name() -> None:
    assert own_replica_name(HighAvailabilityConfig(replica_name="r-7"), {"POD_NAME": "p-1"}) == "r-7"
    assert own_replica_name(HighAvailabilityConfig(), {"POD_NAME": "connectivity-proxy-2"}) == "connectivity-proxy-2"
    assert own_replica_name(HighAvailabilityConfig(), {}, hostname=lambda: "node-4.example.com") == "node-4"
    assert (ordinal_of("connectivity-proxy-12"), ordinal_of("proxy"), ordinal_of("a-b")) == (12, None, None)


def test_announcement_per_mode_sorted_by_ordinal_and_always_including_itself() -> None:
    s = ReplicaSet("connectivity-proxy-1", "path", "cp.example.com", ["connectivity-proxy-10", "connectivity-proxy-2"])
    assert s.names() == ["connectivity-proxy-1", "connectivity-proxy-2", "connectivity-proxy-10"]
    assert s.announcement()[0] == {"name": "connectivity-proxy-1", "ordinal": 1, "path": "/connectivity-proxy-1"}
    sub = ReplicaSet("connectivity-proxy-0", "subdomain", "cp.example.com")
    assert sub.announcement() == [{"name": "connectivity-proxy-0", "ordinal": 0,
                                   "host": "connectivity-proxy-0.cp.example.com"}]
    # A name without an ordinal keeps its own name in the route.
    assert ReplicaSet("proxyhost", "path", "x").announcement() == [{"name": "proxyhost", "ordinal": None,
                                                                    "path": "/proxyhost"}]


def test_listeners_hear_changes_only() -> None:
    s = ReplicaSet("connectivity-proxy-0", "path", "x", NAMES)
    heard: list[list[str]] = []
    s.add_listener(lambda rs: heard.append(rs.names()))
    assert not s.update(NAMES)
    assert s.update(NAMES[:2])
    assert heard == [NAMES[:2]]


def test_replica_set_for_configuration() -> None:
    off = {"enableProxyAuthorization": False}
    base: dict[str, Any] = {"subaccountId": "t", "servers": {"proxy": {"http": off, "socks5": off}}}
    assert replica_set_for(proxy_config_from_mapping(base), Clock()) == (None, None)
    config = proxy_config_from_mapping({**base, "highAvailabilityMode": "path", "highAvailability": {
        "replicaName": "connectivity-proxy-1", "replicas": NAMES}})
    replica_set, discovery = replica_set_for(config, Clock())
    assert replica_set is not None and discovery is None
    assert replica_set.me.name == "connectivity-proxy-1" and replica_set.names() == NAMES
    config = proxy_config_from_mapping({**base, "highAvailabilityMode": "subdomain", "highAvailability": {
        "replicaName": "connectivity-proxy-0", "headlessService": "cp-headless.ns.svc.cluster.local"}})
    _s, discovery = replica_set_for(config, Clock())
    assert isinstance(discovery, ReplicaDiscovery) and discovery.prefix == "connectivity-proxy"
    assert isinstance(config, ProxyConfig)


@pytest.mark.parametrize("ha", [
    {"replicas": ["a b"]}, {"replicas": ["x", "x"]}, {"headlessService": "bad name!"},
    {"replicas": ["a"], "headlessService": "svc"}, {"discoveryIntervalSeconds": 0},
])
def test_bad_high_availability_keys_are_refused(ha: dict[str, Any]) -> None:
    from connproxy.config import ConfigError

    off = {"enableProxyAuthorization": False}
    with pytest.raises(ConfigError, match="highAvailability"):
        proxy_config_from_mapping({"subaccountId": "t", "highAvailability": ha,
                                   "servers": {"proxy": {"http": off, "socks5": off}}})


# ------------------------------------------------------------------------------------------------ DNS discovery


class FakeDns:
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.asked: list[str] = []

    def __call__(self, name: str) -> Deferred[list[str]]:
        self.asked.append(name)
        if name in self.records:
            return succeed(self.records[name])
        return fail(LookupError(name))


def test_discovery_probes_the_statefulset_names_and_follows_changes() -> None:
    svc = "cp-headless.ns.svc.cluster.local"
    dns = FakeDns({svc: ["10.0.0.1", "10.0.0.3"], f"connectivity-proxy-0.{svc}": ["10.0.0.1"],
                   f"connectivity-proxy-2.{svc}": ["10.0.0.3"]})
    clock = Clock()
    s = ReplicaSet("connectivity-proxy-0", "path", "x")
    discovery = ReplicaDiscovery(s, svc, dns, clock, interval=10)
    discovery.startService()
    assert s.names() == ["connectivity-proxy-0", "connectivity-proxy-2"]  # 1 is not ready: not in DNS
    assert len(dns.asked) == 1 + 5  # the service, then ordinals 0 .. 2 + 3 - 1
    dns.records[f"connectivity-proxy-1.{svc}"] = ["10.0.0.2"]
    dns.records[svc] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    clock.advance(10)
    assert s.names() == NAMES
    del dns.records[svc]  # a failed lookup keeps the set
    clock.advance(10)
    assert s.names() == NAMES
    discovery.stopService()
    assert clock.getDelayedCalls() == []


# ------------------------------------------------------------------------------------------------ announcements


def test_replica_set_changes_are_sent_to_connected_connectors() -> None:
    from tests.unit.test_tunnel import TunnelPair

    clock = Clock()
    s = ReplicaSet("connectivity-proxy-0", "path", "cp.example.com", NAMES)
    factory = ProxyTunnelFactory(ConnectorRegistry(), clock, replicas=s)
    pair = TunnelPair(clock, factory=factory)
    pair.flush()
    hello = pair.dialer.hellos[0].hello
    assert hello["replica_id"] == "connectivity-proxy-0"
    assert hello["high_availability_mode"] == "path"
    assert [r["path"] for r in hello["replicas"]] == [f"/{n}" for n in NAMES]
    got: list[ReplicasReceived] = []
    pair.dialer.replicas_received = got.append  # type: ignore[method-assign]
    s.update(NAMES[:2])
    pair.flush()
    assert [[r["name"] for r in e.replicas] for e in got] == [NAMES[:2]]


# ------------------------------------------------------------------------------------------------ upgrade


PKI = mint_test_pki()


def request(path: str = "/connectivity", headers: list[tuple[bytes, bytes]] | None = None,
            upgrade: bool = True) -> h11.Request:
    base = [(b"host", b"x")]
    if upgrade:
        base += [(b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"connproxy-tunnel/1")]
    return h11.Request(method="GET", target=path, headers=base + (headers or []))


def decide(req: h11.Request, via_ingress: bool = True, peer: str = "10.0.0.9") -> Any:
    replicas = ReplicaSet("connectivity-proxy-1", "path", "x", NAMES)
    return decide_upgrade(req, replicas, via_ingress=via_ingress, peer_host=peer,
                          certificate_header="ssl-client-cert", trusted_sources=["10.0.0.0/24"],
                          client_cas=[x509.load_pem_x509_certificate(PKI.ca_cert_pem)])


def cert_header(location: str | None = None) -> list[tuple[bytes, bytes]]:
    cert, _key = PKI.connector("tenant-a", location)
    return [(b"ssl-client-cert", quote(cert.decode(), safe="").encode())]


def test_upgrade_requests_are_recognised() -> None:
    assert is_upgrade_request(request())
    assert not is_upgrade_request(request(upgrade=False))
    assert not is_upgrade_request(h11.Request(method="GET", target="/", headers=[
        (b"host", b"x"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]))


def test_paths() -> None:
    assert decide(request("/connectivity"), via_ingress=False).status == 101
    assert decide(request("/connectivity-proxy-1"), via_ingress=False).status == 101
    assert decide(request("/connectivity-proxy-2"), via_ingress=False).status == 421
    assert decide(request("/connectivity-proxy-9"), via_ingress=False).status == 421
    assert decide(request("/elsewhere"), via_ingress=False).status == 404


def test_forwarded_certificate_binds_the_identity_from_trusted_sources_only() -> None:
    verdict = decide(request("/connectivity-proxy-1", cert_header("loc-1")))
    assert verdict.status == 101
    assert (verdict.identity.subaccount, verdict.identity.location) == ("tenant-a", "loc-1")
    untrusted = decide(request(headers=cert_header()), peer="10.0.1.9")
    assert (untrusted.status, untrusted.audit) == (403, True)
    assert decide(request(headers=cert_header()), peer="::ffff:10.0.0.9").status == 101
    assert decide(request()).status == 403  # no header
    assert decide(request(headers=cert_header() + cert_header())).status == 403  # two headers


def test_envoy_xfcc_and_nginx_formats() -> None:
    cert, _key = PKI.connector("tenant-a", None)
    pem = quote(cert.decode(), safe="")
    parsed = parse_forwarded_certificate(f'By=spiffe://x;Hash=abc;Cert="{pem}";Subject="CN=c"'.encode())
    assert parsed == x509.load_pem_x509_certificate(cert)
    assert parse_forwarded_certificate(pem.encode()) == parsed
    for bad in (b"", b"not a cert", f'Cert="{pem}",Cert="{pem}"'.encode(), b"x" * 40000):
        with pytest.raises(ForwardedCertificateError):
            parse_forwarded_certificate(bad)


def test_forwarded_certificate_checks_match_the_tls_layer() -> None:
    ca = x509.load_pem_x509_certificate(PKI.ca_cert_pem)
    cert = x509.load_pem_x509_certificate(PKI.connector("tenant-a", None)[0])
    assert check_forwarded_certificate(cert, [ca]).subaccount == "tenant-a"
    with pytest.raises(ForwardedCertificateError, match="not signed"):
        check_forwarded_certificate(cert, [x509.load_pem_x509_certificate(mint_test_pki().ca_cert_pem)])
    with pytest.raises(ForwardedCertificateError, match="expired"):
        check_forwarded_certificate(cert, [ca], now=datetime.now(UTC) + timedelta(days=20000))
    server = x509.load_pem_x509_certificate(PKI.server_cert_pem)  # EKU serverAuth, no connector identity
    with pytest.raises(ForwardedCertificateError, match="client authentication"):
        check_forwarded_certificate(server, [ca])
    assert source_trusted("10.0.0.1", ["10.0.0.0/8"]) and not source_trusted("nonsense", ["0.0.0.0/0"])
