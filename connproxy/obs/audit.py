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

Every event is written through a writer, ``Callable[[str], None]`` that takes the whole line without the
newline; the default, :func:`stdout_writer`, writes it to ``sys.stdout`` with a newline and flushes. The JSON
is ASCII-only (``ensure_ascii``), so a value cannot break the line. Caller-supplied strings are cut at
:data:`MAX_FIELD_CHARS` characters, and a request path loses its query and fragment.

**Never pass tokens** (proxy, service, user or connector credentials) to these functions: no parameter is
meant for one, and the query string of a path (where tokens sometimes travel) is dropped for that reason.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from twisted.logger import Logger

__all__ = [
    "AUDIT_PREFIX",
    "FALLBACK_USER",
    "MAX_FIELD_CHARS",
    "AuditWriter",
    "access_decision",
    "emit_event",
    "format_event",
    "proxy_call_refused",
    "stdout_writer",
    "tunnel_handshake",
]

AUDIT_PREFIX: Final = "[AUDIT-EVENT] "
FALLBACK_USER: Final = "fallback_for_missing_user"
MAX_FIELD_CHARS: Final = 1024
_MAX_PATH_CHARS: Final = 2048

#: Receives one complete audit line (prefix + JSON, without a newline).
AuditWriter = Callable[[str], None]

_log = Logger()
#: ``json.dumps(..., ensure_ascii=True, separators=(",", ":"))`` without building an encoder per event.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def _stdout() -> Any:
    """The stream audit lines go to: the process's standard output.

    twistd replaces ``sys.stdout`` with a file that turns writes into log events (timestamped, possibly sent to
    a log file); audit events are written to the real standard output instead, as bare ``[AUDIT-EVENT] {json}``
    lines, as SAP's proxy does.
    """
    out = sys.stdout
    if type(out).__name__ == "LoggingFile" and sys.__stdout__ is not None:
        return sys.__stdout__
    return out


def stdout_writer(line: str) -> None:
    """Write ``line`` and a newline to standard output (see :func:`_stdout`) and flush.

    A closed or broken stdout does not raise: the failure is logged (the event is lost).
    """
    try:
        out = _stdout()
        out.write(line + "\n")
        out.flush()
    except (OSError, ValueError):
        _log.failure("could not write an audit event to stdout")


def _cut(value: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + "..."


def _tunnel_id(tenant: str | None) -> str | None:
    return None if tenant is None else f"account:///{tenant}"


def _iso_utc(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def format_event(
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
) -> str:
    """The audit line (prefix + one-line JSON, no newline) for one event; see the module docstring."""
    event = {
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
    return AUDIT_PREFIX + _encode(event)


def emit_event(
    *,
    writer: AuditWriter | None = None,
    clock: Callable[[], float] | None = None,
    **fields: Any,
) -> None:
    """Format an event (``fields`` as for :func:`format_event`, without ``now``) and write it.

    :param writer: default :func:`stdout_writer`.
    :param clock: seconds since the epoch; default :func:`time.time`.
    :raises Exception: whatever a custom ``writer`` raises (the default one does not raise).
    """
    line = format_event(now=(clock or time.time)(), **fields)
    (writer or stdout_writer)(line)


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
