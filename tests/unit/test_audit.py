"""Tests for :mod:`connproxy.obs.audit`: SAP's ``[AUDIT-EVENT]`` line shape, one line per event, no tokens."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from connproxy.obs import audit
from connproxy.obs.audit import AUDIT_NAMESPACE, AUDIT_PREFIX, FALLBACK_USER

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def only_event(self) -> dict[str, Any]:
        assert len(self.lines) == 1
        line = self.lines[0]
        assert line.startswith(AUDIT_PREFIX)
        assert "\n" not in line and line.isascii()
        event: dict[str, Any] = json.loads(line[len(AUDIT_PREFIX) :])
        return event


def clock() -> float:
    return NOW


def test_tunnel_handshake_success_has_sap_shape() -> None:
    out = Lines()
    audit.tunnel_handshake(
        True, tenant="tenant-a", connector_id="scc-1", location="loc-1", reason=None, peer="10.0.0.7:5151",
        writer=out, clock=clock,
    )
    assert out.only_event() == {
        "user": FALLBACK_USER,
        "tenant": "tenant-a",
        "time": "2023-11-14T22:13:20.250Z",
        "data": {
            "action": "open connectivity tunnel",
            "message": "tunnel handshake success",
            "objectName": "connectivity tunnel management",
            "tunnelId": "account:///tenant-a",
            "clientId": "scc-1",
            "loggedByClass": "connproxy.tunnel",
            "handshakeDetails": {"result": "success", "locationId": "loc-1", "peer": "10.0.0.7:5151", "reason": None},
        },
    }


def test_tunnel_handshake_failure_with_unknown_tenant() -> None:
    out = Lines()
    audit.tunnel_handshake(
        False, tenant=None, connector_id=None, location="", reason="certificate binds another subaccount",
        peer=None, writer=out, clock=clock,
    )
    event = out.only_event()
    assert event["tenant"] is None and event["user"] == FALLBACK_USER
    assert event["data"]["message"] == "tunnel handshake failure"
    assert event["data"]["tunnelId"] is None
    assert event["data"]["handshakeDetails"]["result"] == "failure"
    assert event["data"]["handshakeDetails"]["reason"] == "certificate binds another subaccount"


def test_proxy_call_refused() -> None:
    out = Lines()
    audit.proxy_call_refused(
        front_end="http", tenant=None, client_id="sb-x!t2", reason="client_not_allowed", peer="10.1.1.1:40000",
        writer=out, clock=clock,
    )
    event = out.only_event()
    assert event["user"] == FALLBACK_USER
    assert event["data"] == {
        "action": "authorize proxy call",
        "message": "proxy call refused",
        "objectName": "http proxy",
        "tunnelId": None,
        "clientId": None,
        "loggedByClass": "connproxy.http",
        "details": {
            "frontEnd": "http", "reason": "client_not_allowed", "oauthClientId": "sb-x!t2", "peer": "10.1.1.1:40000"
        },
    }


@pytest.mark.parametrize("allowed", [True, False])
def test_access_decision(allowed: bool) -> None:
    out = Lines()
    audit.access_decision(
        allowed=allowed, tenant="tenant-a", location="", client_id="sb-app!t1", method="GET",
        virtual_host="erp.internal", virtual_port=80, path="/api/x?access_token=SECRET#frag",
        why="resource /api (sub-paths)" if allowed else "no resource matches", connector_id="conn-1",
        user="alice", writer=out, clock=clock,
    )
    event = out.only_event()
    assert event["user"] == "alice"
    data = event["data"]
    assert data["message"] == ("access allowed" if allowed else "access denied")
    assert data["objectName"] == "erp.internal:80"
    assert data["tunnelId"] == "account:///tenant-a" and data["clientId"] == "conn-1"
    assert data["details"]["path"] == "/api/x"
    assert data["details"]["decision"] == ("allowed" if allowed else "denied")
    assert "SECRET" not in out.lines[0]


def test_values_cannot_break_the_line_and_are_cut() -> None:
    out = Lines()
    audit.tunnel_handshake(
        False, tenant="t\n[AUDIT-EVENT] {\"forged\": 1}", connector_id="é\u2028", location="x" * 5000,
        reason=None, peer=None, writer=out, clock=clock,
    )
    event = out.only_event()
    assert event["tenant"].startswith("t\n[AUDIT-EVENT]")
    assert event["data"]["clientId"] == "é\u2028"
    assert len(event["data"]["handshakeDetails"]["locationId"]) == audit.MAX_FIELD_CHARS + 3


def test_without_a_writer_it_is_a_log_event_in_the_audit_namespace() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        audit.tunnel_handshake(True, tenant="a", connector_id="c", location=None, reason=None, peer=None,
                               clock=clock)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == AUDIT_NAMESPACE]
    assert event["log_level"] == LogLevel.info
    assert event["audit"]["tenant"] == "a" and event["audit"]["time"] == "2023-11-14T22:13:20.250Z"
    assert event["audit"]["data"]["message"] == "tunnel handshake success"
    assert formatEvent(event) == "audit open connectivity tunnel: tunnel handshake success"


def test_json_record_marks_audit_and_keeps_the_sap_fields() -> None:
    out = Lines()
    audit.proxy_call_refused(front_end="socks5", tenant="t", client_id=None, reason="no_token", peer=None,
                             writer=out, clock=clock)
    event = out.only_event()
    record = audit.audit_json_record(event)
    assert record["audit"] is True and record["logger"] == AUDIT_NAMESPACE and record["level"] == "info"
    assert record["time"] == event["time"] and record["message"] == "authorize proxy call: proxy call refused"
    assert {k: record[k] for k in ("user", "tenant", "data")} == {k: event[k] for k in ("user", "tenant", "data")}


@pytest.mark.parametrize(
    "seconds",
    [0.0, 1764900000.0, 1764900000.0005, 1764900000.9999995, 1764900000.999, 1299765235.7189994,
     852264350.3039999, 1764900001.4999999],
)
def test_time_is_what_datetime_writes(seconds: float) -> None:
    """The per-second cache of the timestamp writes what ``datetime.isoformat`` would, rounding included."""
    from datetime import UTC, datetime

    expected = datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert audit._iso_utc(seconds) == expected
    assert audit._iso_utc(seconds + 3600.25) == datetime.fromtimestamp(seconds + 3600.25, tz=UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")  # another second: the cache is replaced
