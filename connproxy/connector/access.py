# -*- test-case-name: tests.unit.test_connector,tests.unit.test_connector_http -*-
"""The connector's one access decision, for TCP and HTTP streams alike, and its one audit helper.

:func:`decide` reads a stream's OPEN (kind, virtual host and port, and for ``kind="http"`` the request's method,
origin-form target and upgrade offer) against the ``accessControl`` list, deny by default:

* the virtual host and port must have a mapping (:func:`connproxy.connector.acl.find_rule`);
* a ``tcp`` stream needs a ``TCP`` or ``TCP_TLS`` mapping, an ``http`` stream an ``HTTP`` or ``HTTPS`` one;
* an ``http`` stream's path must be admitted by a resource (exact, or with all sub-paths), and an upgrade offer
  by a resource with ``upgradeAllowed``.

A refusal carries two texts: ``why`` (for the audit line and the log: which rule did not match) and ``answer``
(what the proxy shows its client with 403: ``access denied to system vhost:vport`` or ``access denied to path
/x on system vhost:vport``). :func:`audit_decision` writes the audit event of every decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connproxy.config import AccessRule, ConnectorConfig, Resource
from connproxy.connector import acl
from connproxy.obs import audit
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import OpenRequest

TCP_PROTOCOLS = ("TCP", "TCP_TLS")
HTTP_PROTOCOLS = ("HTTP", "HTTPS")
_MAX_PATH_IN_ANSWER = 256


@dataclass(frozen=True, slots=True)
class HttpRequestMeta:
    """What the proxy told about one HTTP request in the OPEN metadata (``meta["http"]``)."""

    method: str
    target: str
    upgrade: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`.

    :ivar allowed: whether the stream may go on to its backend.
    :ivar code: the RESET code of a refusal (``ACCESS_DENIED``, or ``PROTOCOL_ERROR`` for a malformed OPEN).
    :ivar why: the reason for the audit line and the log (no tokens).
    :ivar answer: the sentence the proxy answers its client with, for a refusal.
    :ivar rule: the matching mapping (set when allowed).
    :ivar resource: the admitting resource of an HTTP mapping (set when an HTTP stream is allowed).
    :ivar internal_port: the backend port (set when allowed).
    :ivar http: the request metadata of an ``http`` stream, when it was well-formed.
    """

    allowed: bool
    code: ErrorCode
    why: str
    answer: str
    rule: AccessRule | None = None
    resource: Resource | None = None
    internal_port: int = 0
    http: HttpRequestMeta | None = None

    @property
    def internal(self) -> str:
        """``internal_host:internal_port`` of an allowed stream (for logs)."""
        assert self.rule is not None
        return f"{self.rule.internal_host}:{self.internal_port}"


def short_path(target: str) -> str:
    """The path of ``target`` (no query or fragment: they may carry credentials), cut to a length fit for an
    answer or a log line."""
    path = target.split("#", 1)[0].split("?", 1)[0] or "/"
    return path if len(path) <= _MAX_PATH_IN_ANSWER else path[:_MAX_PATH_IN_ANSWER] + "..."


def http_meta(request: OpenRequest) -> HttpRequestMeta | None:
    """The HTTP request metadata of an OPEN, or None when it is missing or malformed."""
    http = request.meta.get("http")
    if not isinstance(http, dict):
        return None
    method, target, upgrade = http.get("method"), http.get("target"), http.get("upgrade")
    if not isinstance(method, str) or not isinstance(target, str):
        return None
    return HttpRequestMeta(method, target, upgrade if isinstance(upgrade, str) else None)


def _deny(why: str, answer: str, http: HttpRequestMeta | None = None,
          code: ErrorCode = ErrorCode.ACCESS_DENIED) -> Decision:
    return Decision(False, code, why, answer, http=http)


def decide(config: ConnectorConfig, request: OpenRequest) -> Decision:
    """Decide on one opened stream against ``config.access_control`` (never raises for any OPEN)."""
    system = f"{request.host}:{request.port}"
    http: HttpRequestMeta | None = None
    if request.kind == "http":
        http = http_meta(request)
        if http is None:
            text = "http stream without request metadata"
            return _deny(text, text, code=ErrorCode.PROTOCOL_ERROR)
        wanted: tuple[str, ...] = HTTP_PROTOCOLS
    else:
        wanted = TCP_PROTOCOLS if request.kind == "tcp" else ()
    rule = acl.find_rule(config, request.host, request.port)
    if rule is None:
        return _deny("no access control rule for this host and port", f"access denied to system {system}", http)
    if rule.protocol not in wanted:
        why = (f"{rule.protocol} mapping does not serve HTTP requests" if http is not None
               else f"{rule.protocol} mapping does not allow {request.kind[:32]} streams")
        return _deny(why, f"access denied to system {system}", http)
    internal_port = acl.internal_port_for(rule, request.port)
    if http is None:
        return Decision(True, ErrorCode.NORMAL, f"{rule.protocol} mapping to {rule.internal_host}:{internal_port}",
                        "", rule=rule, internal_port=internal_port)
    resource = acl.allows_path(rule, http.target)
    denied_path = f"access denied to path {short_path(http.target)} on system {system}"
    if resource is None:
        return _deny("no resource allows this path", denied_path, http)
    if http.upgrade is not None and not resource.upgrade_allowed:
        return _deny(f"resource {resource.path} does not allow upgrades ({http.upgrade[:32]})",
                     f"{denied_path}: upgrade to {http.upgrade[:32]} not allowed", http)
    sub = " and sub-paths" if resource.all_sub_paths else ""
    return Decision(True, ErrorCode.NORMAL,
                    f"{rule.protocol} mapping to {rule.internal_host}:{internal_port}, resource {resource.path}{sub}",
                    "", rule=rule, resource=resource, internal_port=internal_port, http=http)


def describe_mapping(config: ConnectorConfig, decision: Decision) -> str:
    """The mapping an allowed stream uses, for log lines that must name it:
    ``accessControl[2] (HTTP erp.internal:80 -> 127.0.0.1:8080)``."""
    rule = decision.rule
    assert rule is not None
    try:
        index = f"accessControl[{config.access_control.index(rule)}]"
    except ValueError:  # a reload replaced the list meanwhile
        index = "accessControl"
    first, last = rule.virtual_ports
    ports = str(first) if first == last else f"{first}-{last}"
    return f"{index} ({rule.protocol} {rule.virtual_host}:{ports} -> {rule.internal_host}:{decision.internal_port})"


def audit_decision(decision: Decision, request: OpenRequest, *, connector_id: str | None,
                   writer: audit.AuditWriter | None = None) -> None:
    """Write the audit event of ``decision`` for the stream that ``request`` opened."""
    meta: dict[str, Any] = request.meta

    def text(key: str) -> str | None:
        value = meta.get(key)
        return None if value is None else str(value)

    audit.access_decision(
        allowed=decision.allowed,
        tenant=text("tenant"),
        location=text("location"),
        client_id=text("client_id"),
        method=decision.http.method if decision.http else None,
        virtual_host=request.host,
        virtual_port=request.port,
        path=decision.http.target if decision.http else None,
        why=decision.why,
        connector_id=connector_id,
        writer=writer,
    )
