"""Connection limits fitted to the open-file limit (``connproxy.proxy.fd_budget``, ``ProxyService``)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher

from connproxy.config import embedded_proxy_config
from connproxy.proxy import fd_budget
from connproxy.proxy.service import ProxyService


def test_limits_that_fit_are_kept() -> None:
    limits = {"a": 300, "b": 300, "c": 100}
    assert fd_budget.fit(limits, 1024) == limits
    assert fd_budget.fit(limits, -1) == limits  # unknown limit: nothing to fit to


def test_limits_that_do_not_fit_are_lowered_in_proportion() -> None:
    fitted = fd_budget.fit({"socks5": 10_000, "http": 10_000, "tunnel": 10_000}, 1024)
    assert fitted == {"socks5": 320, "http": 320, "tunnel": 320}  # (1024 - 64) / 3 each
    assert sum(fitted.values()) + fd_budget.RESERVED_FDS <= 1024


@given(st.dictionaries(st.text(min_size=1, max_size=3), st.integers(1, 1_000_000), min_size=1, max_size=4),
       st.integers(fd_budget.RESERVED_FDS + 4, 1 << 20))
def test_fitted_limits_never_exceed_the_budget_nor_the_configuration(limits: dict[str, int], nofile: int) -> None:
    fitted = fd_budget.fit(limits, nofile)
    assert fitted.keys() == limits.keys()
    assert all(1 <= fitted[k] <= limits[k] for k in limits)
    # Lowered limits fit the budget (each kept at 1 at least, which may add one per listener when tiny).
    assert fitted == limits or sum(fitted.values()) <= nofile - fd_budget.RESERVED_FDS + len(limits)


def test_raise_nofile_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        now = fd_budget.raise_nofile()
        assert now == (-1 if hard == resource.RLIM_INFINITY else hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_service_lowers_its_listeners_limits_and_says_which(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "state"))
    service = ProxyService(embedded_proxy_config(), MemoryReactorClock())
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        fitted = service.fit_connection_limits(1024)
    finally:
        globalLogPublisher.removeObserver(events.append)
    socks, http = service.front_ends["socks5"][1], service.front_ends["http"][1]
    admission = service.tunnel_admission
    assert (socks.max_connections, http.max_connections, admission.max_connections) == (320, 320, 320)
    assert socks.max_connections_per_client == http.max_connections_per_client == 320  # capped (1,000 configured)
    assert set(fitted) == {"servers.proxy.clientConnection.maxConnections (socks5)",
                           "servers.proxy.clientConnection.maxConnections (http)",
                           "servers.businessDataTunnel.maxConnections"}
    (warning,) = [e for e in events if "open-file limit" in e.get("log_format", "")]
    assert warning["nofile"] == 1024 and "servers.businessDataTunnel.maxConnections 10000" in warning["configured"]
    # With room enough nothing changes and nothing is said.
    roomy = ProxyService(embedded_proxy_config(), MemoryReactorClock())
    assert set(roomy.fit_connection_limits(1 << 20).values()) == {10_000}
    assert roomy.tunnel_admission.max_connections_per_client == 1_000


def test_a_front_end_may_have_its_own_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``servers.proxy.<front end>.maxConnections`` overrides ``clientConnection.maxConnections`` for that front
    end: many SOCKS5 streams beside a small HTTP proxy fit one open-file limit without being lowered, and where
    they are lowered the warning names the key that set them."""
    from connproxy.config import proxy_config_from_mapping

    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "state"))
    config = proxy_config_from_mapping({
        "tenantMode": "dedicated", "subaccountId": "t",
        "servers": {"businessDataTunnel": {"maxConnections": 3000},
                    "proxy": {"socks5": {"enableProxyAuthorization": False},
                              "http": {"enableProxyAuthorization": False, "maxConnections": 2000},
                              "clientConnection": {"maxConnections": 12000}}},
    })
    assert (config.socks5.max_connections, config.http.max_connections) == (None, 2000)
    service = ProxyService(config, MemoryReactorClock())
    socks, http = service.front_ends["socks5"][1], service.front_ends["http"][1]
    assert (socks.max_connections, http.max_connections) == (12000, 2000)
    assert service.fit_connection_limits(20000) == {  # 17,000 + 64 fit: kept
        "servers.proxy.clientConnection.maxConnections (socks5)": 12000,
        "servers.proxy.http.maxConnections": 2000,
        "servers.businessDataTunnel.maxConnections": 3000,
    }
    lowered = ProxyService(config, MemoryReactorClock()).fit_connection_limits(1024)
    assert lowered["servers.proxy.http.maxConnections"] == 2000 * 960 // 17000
