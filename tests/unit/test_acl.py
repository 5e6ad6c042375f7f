"""Tests for connproxy.connector.acl: which rule serves a host and port, port mapping, which resource admits a
path (and which paths never are: dot segments, also percent-encoded, Unicode-normalised or oddly escaped)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connproxy.config import (
    AccessRule,
    ConfigError,
    ConnectorConfig,
    Resource,
    connector_config_from_mapping,
    path_problem,
)
from connproxy.connector import acl


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


def test_range_mapping() -> None:
    config = _connector_with(
        _rule(protocol="TCP", virtualPort="5000-5009", internalPort="6000-6009"),
        _rule(protocol="TCP_TLS", virtualPort=" 7000 - 7001 ", internalHost="db.local"),
        _rule(virtualPort="8080", internalPort=80),
    )
    tcp, tls, http = config.access_control
    assert (tcp.virtual_ports, tcp.internal_ports) == ((5000, 5009), (6000, 6009))
    assert acl.internal_port_for(tcp, 5000) == 6000
    assert acl.internal_port_for(tcp, 5009) == 6009
    assert tls.internal_ports == (7000, 7001)  # omitted: same as virtual
    assert http.virtual_ports == (8080, 8080)
    assert acl.internal_port_for(http, 8080) == 80
    assert acl.find_rule(config, "erp.internal", 5005) is tcp
    assert acl.find_rule(config, "erp.internal", 5010) is None
    assert acl.find_rule(config, "erp.internal", 7001) is tls
    with pytest.raises(ValueError, match="outside"):
        acl.internal_port_for(tcp, 4999)


@given(
    first=st.integers(1, 65535),
    length=st.integers(0, 100),
    internal=st.integers(1, 65535),
    offset=st.integers(0, 100),
)
def test_range_mapping_property(first: int, length: int, internal: int, offset: int) -> None:
    last = min(first + length, 65535)
    internal_last = internal + (last - first)
    if internal_last > 65535:
        return
    config = _connector_with(
        _rule(protocol="TCP", virtualPort=f"{first}-{last}", internalPort=f"{internal}-{internal_last}")
    )
    (rule,) = config.access_control
    port = first + offset
    if port <= last:
        assert acl.rule_matches(rule, "erp.internal", port)
        assert acl.internal_port_for(rule, port) == internal + offset
    else:
        assert acl.find_rule(config, "erp.internal", port) is None


@pytest.mark.parametrize(
    ("configured", "asked", "matches"),
    [
        ("erp.internal", "ERP.INTERNAL", True),
        ("ERP.internal", "erp.internal.", True),
        ("erp.internal", "erp.internal2", False),
        ("10.0.0.1", "10.0.0.1", True),
        ("10.0.0.1", "10.0.0.01", False),
        ("::1", "[::1]", True),
        ("[2001:db8::1]", "2001:DB8:0:0::1", True),
    ],
)
def test_virtual_host_matching(configured: str, asked: str, matches: bool) -> None:
    config = _connector_with(_rule(virtualHost=configured))
    assert (acl.find_rule(config, asked, 80) is not None) is matches


RESOURCES = [
    {"path": "/api", "allSubPaths": True},
    {"path": "/exact"},
    {"path": "/ws/", "allSubPaths": True, "upgradeAllowed": True},
]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/api/x/y", "/api"),
        ("/api?x=1", "/api"),
        ("/api/x?y=/../z", "/api"),
        ("/api#frag", None),  # a fragment never belongs in a request target
        ("/apix", None),
        ("/API", None),
        ("/exact", "/exact"),
        ("/exact?q", "/exact"),
        ("/exact/", None),
        ("/exact/sub", None),
        ("/ws/", "/ws/"),
        ("/ws/chat", "/ws/"),
        ("/ws", None),
        ("/", None),
        ("", None),
        ("api", None),
        ("*", None),
        ("http://erp.internal/api", None),
        ("/api/../admin", None),
        ("/api/./x", None),
        ("/api/%2e%2e/admin", None),
        ("/api/%252e%252e/admin", None),  # decoded twice by some backends
        ("/api/%u002e%u002e/admin", None),  # IIS-style %u encoding
        ("/api/%c0%ae%c0%ae/admin", None),  # overlong UTF-8 dots
        ("/api/%2E%2E%2fadmin", None),
        ("/api/..%2Fadmin", None),
        ("/api/..;/admin", None),
        ("/api\\..\\admin", None),
        ("/api/..x/y", "/api"),
    ],
)
def test_allows_path(path: str, allowed: str | None) -> None:
    (rule,) = _connector_with(_rule(resources=RESOURCES)).access_control
    resource = acl.allows_path(rule, path)
    assert (resource.path if resource else None) == allowed


def test_allows_path_returns_the_resource_flags() -> None:
    (rule,) = _connector_with(_rule(resources=RESOURCES)).access_control
    resource = acl.allows_path(rule, "/ws/x")
    assert resource == Resource("/ws/", all_sub_paths=True, upgrade_allowed=True)


def test_root_with_sub_paths_allows_everything() -> None:
    (rule,) = _connector_with(_rule(resources=[{"path": "/", "allSubPaths": True}])).access_control
    for path in ("/", "", "/a", "/a/b?c"):
        assert acl.allows_path(rule, path) is not None


def test_no_resources_allows_nothing() -> None:
    (rule,) = _connector_with(_rule()).access_control
    assert rule.resources == ()
    assert acl.allows_path(rule, "/") is None
    (tcp,) = _connector_with(_rule(protocol="TCP")).access_control
    assert acl.allows_path(tcp, "/") is None




# ------------------------------------------------------------------------------------- Unicode normalisation

UNICODE_ESCAPES = [
    "/api/%ef%bc%8e%ef%bc%8e/secret",  # FULLWIDTH FULL STOP twice: NFKC ".."
    "/api/%EF%BC%8E%EF%BC%8E/secret",
    "/api/%e2%80%a5/secret",  # TWO DOT LEADER: NFKC ".."
    "/api/%e2%80%a4/secret",  # ONE DOT LEADER: NFKC "."
    "/api/x%ef%bc%8f%ef%bc%8e%ef%bc%8e%ef%bc%8fsecret",  # FULLWIDTH SOLIDUS around fullwidth dots
    "/api/x%ef%bc%bc..%ef%bc%bcsecret",  # FULLWIDTH REVERSE SOLIDUS
    "/api/%ef%bc%85%ef%bc%92%ef%bd%85%ef%bc%85%ef%bc%92%ef%bd%85/secret",  # fullwidth "%2e%2e": NFKC, then decoded
    "/api/%25ef%25bc%258e%25ef%25bc%258e/secret",  # the fullwidth dots encoded twice
    "/api/\uff0e\uff0e/secret",  # raw fullwidth dots (a client that sends UTF-8 unescaped)
    "/api/\u2025/secret",
    "/api/%e0%80%ae%e0%80%ae/secret",  # overlong three-byte UTF-8 dots
    "/api/%f0%80%80%ae/secret",  # overlong four-byte UTF-8 dot
]


@pytest.mark.parametrize("path", UNICODE_ESCAPES)
def test_unicode_dot_segments_are_refused(path: str) -> None:
    (rule,) = _connector_with(_rule(resources=[{"path": "/api", "allSubPaths": True}])).access_control
    assert acl.allows_path(rule, path) is None
    assert acl.request_path_problem(path) is not None


@pytest.mark.parametrize("path", UNICODE_ESCAPES)
def test_unicode_dot_segments_are_refused_as_resources(path: str) -> None:
    with pytest.raises(ConfigError, match=r"accessControl\[0\]\.resources\[0\]\.path: must not contain '\.' or '\.\.'"):
        _connector_with(_rule(resources=[{"path": path}]))


@pytest.mark.parametrize(
    "path",
    [
        "/api/caf%C3%A9",  # é: no dots after normalisation
        "/api/%e2%80%a6x",  # HORIZONTAL ELLIPSIS is "..." after NFKC: not a dot segment unless alone
        "/api/%ef%bc%8ex",  # a fullwidth dot inside a name: ".x" is not a dot segment
        "/api/%E6%97%A5%E6%9C%AC",  # CJK
        "/api/a%20b",
    ],
)
def test_non_ascii_paths_without_dot_segments_are_allowed(path: str) -> None:
    (rule,) = _connector_with(_rule(resources=[{"path": "/api", "allSubPaths": True}])).access_control
    assert acl.allows_path(rule, path) == Resource("/api", all_sub_paths=True)
    assert path_problem(path) is None


def test_three_dots_after_normalisation_are_not_a_dot_segment_but_two_are() -> None:
    assert path_problem("/a/%e2%80%a6/b") is None  # "..." is a plain name to every backend
    assert path_problem("/a/%e2%80%a5/b") is not None


def test_find_rule_index_follows_a_new_configuration() -> None:
    """The host index is per ``access_control`` tuple: a reloaded configuration is looked up afresh, IP literals
    and names canonically, first rule in configuration order first."""
    from dataclasses import replace

    first = AccessRule(virtual_host="::1", virtual_ports=(80, 80), internal_host="a", internal_ports=(1, 1),
                       protocol="HTTP")
    second = AccessRule(virtual_host="erp.internal", virtual_ports=(80, 90), internal_host="b",
                        internal_ports=(2, 12), protocol="HTTP")
    shadowed = replace(second, internal_host="c")
    config = ConnectorConfig(access_control=(first, second, shadowed))
    assert acl.find_rule(config, "[0:0::1]", 80) is first
    assert acl.find_rule(config, "ERP.internal.", 85) is second
    assert acl.find_rule(config, "erp.internal", 91) is None
    reloaded = ConnectorConfig(access_control=(shadowed,))
    assert acl.find_rule(reloaded, "erp.internal", 85) is shadowed
    assert acl.find_rule(reloaded, "::1", 80) is None
    assert acl.find_rule(config, "erp.internal", 85) is second  # the old tuple again: rebuilt, same answer
