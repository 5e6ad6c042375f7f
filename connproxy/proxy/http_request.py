# -*- test-case-name: tests.unit.test_http_request -*-
"""SAP's request rules of the HTTP proxy front end, as pure functions: a request head in, a decision out.

:func:`parse_proxy_request` takes the method, target and headers of one request (as h11 parsed them) and the
front end's :class:`RequestRules`, and returns a :class:`ProxyRequest`: where the request goes (virtual host and
port, stream kind ``http`` or ``tcp`` for ``CONNECT``), through which location, with which tokens (proxy token,
service token, the principal or technical user to propagate) and the header block to write into the stream; or
it raises :class:`~connproxy.http.h11relay.HttpError` with the status and text the client gets. No I/O, no
Twisted: the glue (:mod:`connproxy.proxy.http_frontend`) authorizes, routes and relays.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from connproxy.http.h11relay import HttpError
from connproxy.http.headers import (
    Headers,
    escape_controls,
    forwarded_request_headers,
    has_body,
    header_list,
    header_values,
    split_authority,
    upgrade_of,
)
from connproxy.proxy.auth import bearer_token

H_LOCATION_ID = b"sap-connectivity-scc-location_id"
H_USER = b"sap-connectivity-authentication"
H_TECHNICAL = b"sap-connectivity-technical-authentication"
H_SERVICE_TOKEN = b"sap-cp-connectivity-service-token"
H_PROXY_AUTHORIZATION = b"proxy-authorization"

#: The largest principal-propagation token carried in OPEN metadata (OPEN payloads are at most 64 KiB).
MAX_PROPAGATED_TOKEN_BYTES = 16384
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+(?: [\x21-\x7e]+)?")
_VISIBLE_TARGET = re.compile(rb"[\x21-\x7e]+")
#: What a refusal quotes of a client's request target, at most.
_QUOTE = 200


@dataclass(frozen=True)
class RequestRules:
    """The front end's settings the request rules depend on (``servers.proxy.http``)."""

    max_line_bytes: int = 8192
    max_header_bytes: int = 65536
    allow_connect: bool = True


@dataclass(frozen=True)
class ProxyRequest:
    """The decision on one request head: where it goes and what travels with it.

    :ivar kind: ``"http"`` (the request is re-framed into an ``http`` stream) or ``"tcp"`` (``CONNECT``).
    :ivar path: the origin-form target written into the stream (``""`` for ``CONNECT``).
    :ivar location: the location id (``SAP-Connectivity-SCC-Location_ID``), ``""`` for the default.
    :ivar user_token: ``SAP-Connectivity-Authentication`` (principal propagation), as sent.
    :ivar technical_token: ``SAP-Connectivity-Technical-Authentication``, as sent.
    :ivar upgrade: the protocol the client asks to switch to (``Connection: upgrade``), else None.
    :ivar has_body: whether the request announces a body.
    :ivar must_close: ``Transfer-Encoding`` and ``Content-Length`` together: the connection is not reused.
    :ivar headers: the header block to write into the stream (``Host`` first, then the end-to-end headers).
    """

    method: bytes
    kind: Literal["http", "tcp"]
    host: str
    port: int
    path: str = ""
    location: str = ""
    proxy_token: str | None = None
    service_token: str | None = None
    user_token: str | None = None
    technical_token: str | None = None
    upgrade: bytes | None = None
    has_body: bool = False
    must_close: bool = False
    headers: Headers = field(default_factory=list)

    @property
    def connect(self) -> bool:
        """Whether this is a ``CONNECT`` (a ``tcp`` stream)."""
        return self.kind == "tcp"

    @property
    def target(self) -> str:
        """``host:port`` for logs and answer texts (control characters escaped)."""
        return escape_controls(f"{self.host}:{self.port}")

    def meta(self, client: str) -> dict[str, Any]:
        """The OPEN metadata of the stream for this request (``client``: the caller's address, for the audit)."""
        meta: dict[str, Any] = {"client": client, "via": "http-connect" if self.connect else "http"}
        if not self.connect:
            meta["http"] = {
                "method": self.method.decode("ascii"),
                "target": self.path,
                "upgrade": self.upgrade.decode("latin-1") if self.upgrade is not None else None,
            }
        if self.user_token:
            meta["authentication"] = self.user_token
        if self.technical_token:
            meta["technical_authentication"] = self.technical_token
        return meta


def _single(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = header_values(headers, name)
    if len(values) > 1:
        raise HttpError(400, f"header {name.decode()} sent more than once")
    return values[0] if values else None


def _quote(target: str) -> str:
    return escape_controls(target[:_QUOTE])


def _authority(host: str, port: int) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return (shown if port == 80 else f"{shown}:{port}").encode("idna" if not host.isascii() else "ascii")


def _check_sizes(method: bytes, target: bytes, headers: Headers, rules: RequestRules) -> None:
    limit = rules.max_line_bytes
    if len(method) + len(target) + 10 > limit:
        raise HttpError(414, f"request line longer than {limit} bytes")
    head = len(method) + len(target) + 12
    for name, value in headers:
        if len(name) + len(value) + 2 > limit:
            raise HttpError(431, f"header line {escape_controls(name.decode('latin-1')[:64])} longer than "
                                 f"{limit} bytes")
        head += len(name) + len(value) + 4
    if head > rules.max_header_bytes:
        # h11 bounds an incomplete head only; one that arrives whole in fewer reads is measured here.
        raise HttpError(431, f"request header block larger than {rules.max_header_bytes} bytes")


def _destination(method: bytes, target: str, headers: Headers, rules: RequestRules) -> tuple[str, int, str]:
    """``(host, port, path)`` of the request (``path`` empty for ``CONNECT``)."""
    if method == b"CONNECT":
        if not rules.allow_connect:
            raise HttpError(405, "CONNECT is not allowed on this proxy (allowConnect is false)",
                            [(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")])
        try:
            host, port = split_authority(target, None)
        except ValueError:
            raise HttpError(400, f"CONNECT target must be host:port, got {_quote(target)}") from None
        return host, port, ""
    if target.startswith("/"):
        host_header = _single(headers, b"host")
        if not host_header:
            raise HttpError(400, "origin-form request without a Host header")
        try:
            host, port = split_authority(host_header.decode("ascii"), 80)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "bad Host header") from None
        return host, port, target
    scheme = target.split(":", 1)[0].lower() if ":" in target else ""
    if scheme == "https":
        raise HttpError(405, "https:// targets are not supported: send http:// (the connector may use "
                             "HTTPS to the backend), or use SOCKS5 for TLS end to end")
    if scheme != "http":
        raise HttpError(400, f"request target must be http://host[:port]/path or /path, got {_quote(target)}")
    try:
        parts = urlsplit(target)
        host, port = split_authority(parts.netloc, 80)
    except ValueError:
        raise HttpError(400, f"bad host in request target {_quote(target)}") from None
    return host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _propagated(headers: Headers) -> tuple[str | None, str | None]:
    """The principal and technical user tokens to propagate, checked."""
    user = _single(headers, H_USER)
    technical = _single(headers, H_TECHNICAL)
    if user and technical:
        raise HttpError(400, "send either SAP-Connectivity-Authentication (principal propagation) or "
                             "SAP-Connectivity-Technical-Authentication (technical user propagation), not both")
    if (user or technical) and header_values(headers, b"authorization"):
        raise HttpError(400, "the Authorization header must be omitted when SAP-Connectivity-Authentication "
                             "or SAP-Connectivity-Technical-Authentication propagates the user")
    for name, token in ((H_USER, user), (H_TECHNICAL, technical)):
        if token is not None and len(token) > MAX_PROPAGATED_TOKEN_BYTES:
            raise HttpError(431, f"header {name.decode()} larger than {MAX_PROPAGATED_TOKEN_BYTES} bytes")
        if token is not None and not _VISIBLE_ASCII.fullmatch(token):
            # A bearer token is visible ASCII; anything else would also grow in the OPEN's JSON.
            raise HttpError(400, f"header {name.decode()} must be visible ASCII (Bearer <token>)")
    return (user.decode("ascii") if user else None), (technical.decode("ascii") if technical else None)


def parse_proxy_request(
    method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], rules: RequestRules
) -> ProxyRequest:
    """Apply SAP's request rules to one request head (as h11 parsed it: method, target, header pairs).

    Accepts the absolute form ``http://vhost[:vport]/path`` (no port: 80), the origin form ``/path`` with
    ``Host``, and ``CONNECT host:port`` where ``rules.allow_connect``.

    :raises HttpError: 414 (request line longer than ``max_line_bytes``), 431 (a header line longer than
        ``max_line_bytes``, the header block larger than ``max_header_bytes``, a propagated token larger than
        :data:`MAX_PROPAGATED_TOKEN_BYTES`), 405 (``https://`` targets; ``CONNECT`` where not allowed, with an
        ``Allow`` header) or 400 (anything else malformed: a fragment, a bad host or port, a missing ``Host``, a
        SAP header sent twice, a location id that is not UTF-8, both propagation headers, ``Authorization`` next
        to a propagation header, a propagated token that is not visible ASCII). Texts quote client input with
        control characters escaped.
    """
    headers = header_list(headers)
    _check_sizes(method, target, headers, rules)
    if not _VISIBLE_TARGET.fullmatch(target):
        # h11 lets only visible ASCII through; the rules hold without it.
        raise HttpError(400, f"request target must be visible ASCII, got {_quote(target.decode('latin-1'))}")
    text = target.decode("ascii")
    if "#" in text:
        raise HttpError(400, "a request target must not contain a fragment (#)")
    host, port, path = _destination(method, text, headers, rules)
    connect = method == b"CONNECT"
    # Framed as chunked (h11, RFC 9112 6.3), but whoever sent it may disagree: never reuse the connection.
    must_close = bool(header_values(headers, b"transfer-encoding") and header_values(headers, b"content-length"))
    proxy_token = bearer_token(_single(headers, H_PROXY_AUTHORIZATION))
    service_token = _single(headers, H_SERVICE_TOKEN)
    location = _single(headers, H_LOCATION_ID)
    try:
        location_id = location.decode("utf-8").strip() if location else ""
    except UnicodeDecodeError:
        raise HttpError(400, "SAP-Connectivity-SCC-Location_ID is not UTF-8") from None
    user, technical = _propagated(headers)
    upgrade = None if connect else upgrade_of(headers)
    forwarded: Headers = []
    if not connect:
        host_header = _single(headers, b"host") if target.startswith(b"/") else None
        forwarded = [(b"host", host_header or _authority(host, port))]
        forwarded += [(n, v) for n, v in forwarded_request_headers(headers, upgrade) if n != b"host"]
    return ProxyRequest(
        method=method, kind="tcp" if connect else "http", host=host, port=port, path=path,
        location=location_id, proxy_token=proxy_token,
        service_token=service_token.decode("latin-1") if service_token else None,
        user_token=user, technical_token=technical, upgrade=upgrade,
        has_body=has_body(headers), must_close=must_close, headers=forwarded,
    )


def carries_user(token: str) -> bool:
    """Whether a (verified) proxy token identifies a user: a token exchange result, not client credentials."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return False
    if not isinstance(claims, dict):
        return False
    grant = claims.get("grant_type")
    if isinstance(grant, str) and grant and grant != "client_credentials":
        return True
    return any(isinstance(claims.get(k), str) and claims.get(k) for k in ("user_name", "user_id", "user_uuid"))


def check_propagation(request: ProxyRequest, *, authorization_enabled: bool) -> None:
    """The rule that needs the verified caller: a user already in ``Proxy-Authorization`` (a token exchange
    result) must not come with ``SAP-Connectivity-Authentication`` as well.

    :raises HttpError: 400 in that case.
    """
    if authorization_enabled and request.proxy_token and request.user_token and carries_user(request.proxy_token):
        raise HttpError(400, "the user is already in Proxy-Authorization (a token exchange result): "
                             "SAP-Connectivity-Authentication must not be sent as well")
