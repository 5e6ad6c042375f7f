"""Audit events: one ``[AUDIT-EVENT] {json}`` line each, on stdout, shaped like the SAP Connectivity proxy's.

SAP's proxy writes its audit events to stdout, prefixed ``[AUDIT-EVENT]``, on behalf of the consumer tenant,
as JSON with ``user`` (``fallback_for_missing_user`` when there is none), ``tenant`` and ``data``. The
documented events are the tunnel handshake success and failure, whose ``data`` holds ``action: "open
connectivity tunnel"``, ``message: "tunnel handshake success"|"tunnel handshake failure"``, ``tunnelId``,
``objectName: "connectivity tunnel management"``, ``clientId`` (the Cloud Connector's id), ``loggedByClass``
and ``handshakeDetails``. This module writes exactly that shape, plus two events of our own in the same shape
(with ``details`` in place of ``handshakeDetails``): a refused proxy call (:func:`proxy_call_refused`) and an
access control decision of the connector (:func:`access_decision`). Example::

    [AUDIT-EVENT] {"user":"fallback_for_missing_user","tenant":"tenant-a","time":"2026-01-02T03:04:05.678Z",
    "data":{"action":"open connectivity tunnel","message":"tunnel handshake success",
    "objectName":"connectivity tunnel management","tunnelId":"account:///tenant-a","clientId":"scc-1",
    "loggedByClass":"connproxy.tunnel","handshakeDetails":{"result":"success","locationId":"loc-1",
    "peer":"10.0.0.7:51514","reason":null}}}

(one line in reality). ``time`` is ISO-8601 UTC with milliseconds. ``tenant`` and ``tunnelId`` are ``null``
when the tenant is not known (for example a handshake refused before the connector proved one).

Every event is a log event in namespace :data:`AUDIT_NAMESPACE` (``connproxy.audit``, level info) whose field
``audit`` holds the object above; the process's log observer (:mod:`connproxy.obs.logs`) writes it whatever the
configured level: as the ``[AUDIT-EVENT] {json}`` line above in console format, as a JSON object with
``"audit": true`` in json format. A ``writer`` (``Callable[[str], None]``, taking the whole line without the
newline) given to these functions receives the ``[AUDIT-EVENT]`` line instead, and no log event is emitted (tests
use that). The JSON is ASCII-only (``ensure_ascii``), so a value cannot break the line. Caller-supplied strings
are cut at :data:`MAX_FIELD_CHARS` characters, and a request path loses its query and fragment.

**Never pass tokens** (proxy, service, user or connector credentials) to these functions: no parameter is
meant for one, and the query string of a path (where tokens sometimes travel) is dropped for that reason.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from twisted.logger import Logger, LogLevel

__all__ = [
    "AUDIT_NAMESPACE",
    "AUDIT_PREFIX",
    "FALLBACK_USER",
    "MAX_FIELD_CHARS",
    "AuditWriter",
    "access_decision",
    "audit_json_record",
    "build_event",
    "emit_event",
    "encode_json",
    "format_event",
    "proxy_call_refused",
    "tunnel_handshake",
]

AUDIT_NAMESPACE: Final = "connproxy.audit"
AUDIT_PREFIX: Final = "[AUDIT-EVENT] "
FALLBACK_USER: Final = "fallback_for_missing_user"
MAX_FIELD_CHARS: Final = 1024
_MAX_PATH_CHARS: Final = 2048

#: Receives one complete audit line (prefix + JSON, without a newline).
AuditWriter = Callable[[str], None]

_audit_log = Logger(namespace=AUDIT_NAMESPACE)
_AUDIT_FORMAT: Final = "audit {audit_action}: {audit_message}"
#: ``json.dumps(..., ensure_ascii=True, separators=(",", ":"))`` without building an encoder per event.
encode_json: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def _cut(value: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + "..."


def _tunnel_id(tenant: str | None) -> str | None:
    return None if tenant is None else f"account:///{tenant}"


#: The last whole second formatted by :func:`_iso_utc` (events come many per second; formatting a datetime was
#: a third of the cost of an audit event).
_last_second: list[Any] = [None, ""]


def _iso_utc(seconds: float) -> str:
    """``seconds`` since the epoch as ISO-8601 UTC with milliseconds (``2026-01-02T03:04:05.678Z``)."""
    # As datetime does: the fraction rounded to microseconds (half to even), then cut to milliseconds.
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    ms = micros // 1000
    if _last_second[0] != whole:
        _last_second[1] = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second[0] = whole
    return f"{_last_second[1]}.{ms:03d}Z"


def build_event(
    *,
    user: str | None,
    tenant: str | None,
    action: str,
    message: str,
    object_name: str,
    client_id: str | None,
    logged_by: str,
    details_key: str,
    details: Mapping[str, Any],
    now: float,
) -> dict[str, Any]:
    """The audit object (SAP's shape, see the module docstring) of one event."""
    return {
        "user": _cut(user) or FALLBACK_USER,
        "tenant": _cut(tenant),
        "time": _iso_utc(now),
        "data": {
            "action": action,
            "message": message,
            "objectName": _cut(object_name),
            "tunnelId": _cut(_tunnel_id(tenant)),
            "clientId": _cut(client_id),
            "loggedByClass": logged_by,
            details_key: {k: _cut(v) if isinstance(v, str) else v for k, v in details.items()},
        },
    }


def format_event(**fields: Any) -> str:
    """The audit line (prefix + one-line JSON, no newline) for one event (``fields`` as for
    :func:`build_event`)."""
    return AUDIT_PREFIX + encode_json(build_event(**fields))


def audit_json_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The audit object ``event`` as a record of the json log format: ``time``, ``level`` (``info``),
    ``logger`` (:data:`AUDIT_NAMESPACE`), ``message`` (``"<action>: <message>"``), ``"audit": true``, then
    ``user``, ``tenant`` and ``data`` as in the ``[AUDIT-EVENT]`` line."""
    data = event.get("data")
    data = data if isinstance(data, Mapping) else {}
    return {
        "time": event.get("time"),
        "level": "info",
        "logger": AUDIT_NAMESPACE,
        "message": f"{data.get('action')}: {data.get('message')}",
        "audit": True,
        **{k: v for k, v in event.items() if k != "time"},
    }


def emit_event(
    *,
    writer: AuditWriter | None = None,
    clock: Callable[[], float] | None = None,
    **fields: Any,
) -> None:
    """Build an event (``fields`` as for :func:`build_event`, without ``now``) and emit it as a log event in
    :data:`AUDIT_NAMESPACE` (field ``audit``), or, given a ``writer``, hand it the ``[AUDIT-EVENT]`` line.

    :param clock: seconds since the epoch; default :func:`time.time`.
    :raises Exception: whatever a custom ``writer`` raises (emitting a log event does not raise).
    """
    now = (clock or time.time)()
    event = build_event(now=now, **fields)
    if writer is not None:
        writer(AUDIT_PREFIX + encode_json(event))
        return
    data = event["data"]
    # What ``_audit_log.info(...)`` emits, built here: twisted's ``Logger.emit`` checks the level against every
    # ``LogLevel`` constant on each call, a third of an audit event's cost on the connector's per-stream path.
    _audit_log.observer({
        "audit": event, "audit_action": data["action"], "audit_message": data["message"],
        "log_logger": _audit_log, "log_level": LogLevel.info, "log_namespace": AUDIT_NAMESPACE,
        "log_source": None, "log_format": _AUDIT_FORMAT, "log_time": now if clock is None else time.time(),
    })


def tunnel_handshake(
    success: bool,
    *,
    tenant: str | None,
    connector_id: str | None,
    location: str | None,
    reason: str | None,
    peer: str | None,
    writer: AuditWriter | None = None,
    logged_by: str = "connproxy.tunnel",
    clock: Callable[[], float] | None = None,
) -> None:
    """Audit a connector's tunnel handshake (SAP's documented event).

    :param tenant: the subaccount the connector is registered for (or claimed, on failure); ``None`` if
        unknown.
    :param connector_id: the connector's id (SAP: the Cloud Connector installation id), written as
        ``clientId``.
    :param location: the location id (``""`` is the default location).
    :param reason: why a handshake failed (a short, token-free text); ``None`` on success.
    :param peer: the connector's address, e.g. ``"10.0.0.7:51514"``.
    """
    emit_event(
        writer=writer,
        clock=clock,
        user=None,
        tenant=tenant,
        action="open connectivity tunnel",
        message="tunnel handshake success" if success else "tunnel handshake failure",
        object_name="connectivity tunnel management",
        client_id=connector_id,
        logged_by=logged_by,
        details_key="handshakeDetails",
        details={
            "result": "success" if success else "failure",
            "locationId": location,
            "peer": peer,
            "reason": reason,
        },
    )


def proxy_call_refused(
    *,
    front_end: str,
    tenant: str | None,
    client_id: str | None,
    reason: str,
    peer: str | None,
    user: str | None = None,
    writer: AuditWriter | None = None,
    logged_by: str | None = None,
    clock: Callable[[], float] | None = None,
) -> None:
    """Audit a proxy call refused by authorization (``action: "authorize proxy call"``).

    :param front_end: ``"http"`` or ``"socks5"``; the ``objectName`` is ``"<front_end> proxy"``.
    :param tenant: the tenant, if it was determined before the refusal.
    :param client_id: the OAuth client id of the caller's token, if known (written as
        ``details.oauthClientId``; ``clientId`` is reserved for connector ids and is ``null`` here).
    :param reason: the :class:`connproxy.proxy.auth.AuthError` reason code (or another short code).
    :param peer: the caller's address.
    :param user: the caller's user, if known.
    """
    emit_event(
        writer=writer,
        clock=clock,
        user=user,
        tenant=tenant,
        action="authorize proxy call",
        message="proxy call refused",
        object_name=f"{front_end} proxy",
        client_id=None,
        logged_by=logged_by or f"connproxy.{front_end}",
        details_key="details",
        details={"frontEnd": front_end, "reason": reason, "oauthClientId": client_id, "peer": peer},
    )


def _path_only(path: str | None) -> str | None:
    if path is None:
        return None
    return _cut(path.split("?", 1)[0].split("#", 1)[0], _MAX_PATH_CHARS)


def access_decision(
    *,
    allowed: bool,
    tenant: str | None,
    location: str | None,
    client_id: str | None,
    method: str | None,
    virtual_host: str,
    virtual_port: int,
    path: str | None,
    why: str,
    connector_id: str | None = None,
    user: str | None = None,
    peer: str | None = None,
    writer: AuditWriter | None = None,
    logged_by: str = "connproxy.connector.dialer",
    clock: Callable[[], float] | None = None,
) -> None:
    """Audit an access control decision (``action: "access on-premise system"``, message ``"access
    allowed"`` or ``"access denied"``, ``objectName`` ``"<virtual_host>:<virtual_port>"``).

    :param client_id: the OAuth client id of the proxy caller, if known (``details.oauthClientId``).
    :param method: the HTTP method; ``None`` for TCP.
    :param path: the request path; its query and fragment are dropped (they may carry credentials).
    :param why: which rule matched, or why none did (short, token-free).
    :param connector_id: this connector's id (``clientId``).
    """
    emit_event(
        writer=writer,
        clock=clock,
        user=user,
        tenant=tenant,
        action="access on-premise system",
        message="access allowed" if allowed else "access denied",
        object_name=f"{virtual_host}:{virtual_port}",
        client_id=connector_id,
        logged_by=logged_by,
        details_key="details",
        details={
            "decision": "allowed" if allowed else "denied",
            "locationId": location,
            "oauthClientId": client_id,
            "method": method,
            "virtualHost": virtual_host,
            "virtualPort": virtual_port,
            "path": _path_only(path),
            "why": why,
            "peer": peer,
        },
    )
