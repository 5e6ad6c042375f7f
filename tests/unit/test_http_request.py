"""SAP's request rules of the HTTP proxy as a pure function: request heads in, decisions or HttpErrors out.

Plain pytest and hypothesis: no transport, no clock, no reactor.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connproxy.http.h11relay import HttpError
from connproxy.http.headers import escape_controls
from connproxy.proxy.http_request import (
    MAX_PROPAGATED_TOKEN_BYTES,
    ProxyRequest,
    RequestRules,
    carries_user,
    check_propagation,
    parse_proxy_request,
)

RULES = RequestRules()
Headers = list[tuple[bytes, bytes]]


def parse(method: bytes, target: bytes, headers: Headers, rules: RequestRules = RULES) -> ProxyRequest:
    """As the front end calls it: with the header names lower-cased, as h11 hands them out."""
    return parse_proxy_request(method, target, [(n.lower(), v) for n, v in headers], rules)


def refused(method: bytes, target: bytes, headers: Headers, rules: RequestRules = RULES) -> HttpError:
    with pytest.raises(HttpError) as caught:
        parse(method, target, headers, rules)
    return caught.value


def test_absolute_form_decides_target_path_location_and_tokens() -> None:
    request = parse(b"GET", b"http://erp.internal:8080/api/x?y=1", [
        (b"Host", b"erp.internal:8080"),
        (b"SAP-Connectivity-SCC-Location_ID", b" loc-1 "),
        (b"Proxy-Authorization", b"Bearer proxy.token"),
        (b"SAP-Connectivity-Authentication", b"Bearer user.token"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Accept", b"*/*"),
    ])
    assert (request.kind, request.host, request.port, request.path) == ("http", "erp.internal", 8080, "/api/x?y=1")
    assert (request.location, request.proxy_token, request.user_token) == ("loc-1", "proxy.token", "Bearer user.token")
    assert request.target == "erp.internal:8080" and not request.connect and not request.has_body
    # Host first, the end-to-end headers after it; hop-by-hop, named-in-Connection and SAP headers are gone
    assert request.headers == [(b"host", b"erp.internal:8080"), (b"accept", b"*/*")]
    meta = request.meta("10.0.0.7:1")
    assert meta == {"client": "10.0.0.7:1", "via": "http", "authentication": "Bearer user.token",
                    "http": {"method": "GET", "target": "/api/x?y=1", "upgrade": None}}


def test_absolute_form_without_port_is_80_and_host_is_restated() -> None:
    request = parse(b"POST", b"http://erp.internal", [(b"Content-Length", b"3")])
    assert (request.port, request.path, request.has_body) == (80, "/", True)
    assert request.headers[0] == (b"host", b"erp.internal")
    ipv6 = parse(b"GET", b"http://[fd00::1]:81/", [])
    assert (ipv6.host, ipv6.headers[0]) == ("fd00::1", (b"host", b"[fd00::1]:81"))


def test_origin_form_keeps_the_host_header_as_sent() -> None:
    request = parse(b"GET", b"/x", [(b"Host", b"Erp.Internal")])
    assert (request.host, request.port, request.path) == ("Erp.Internal", 80, "/x")
    assert request.headers[0] == (b"host", b"Erp.Internal")


def test_connect_is_a_tcp_stream_without_headers() -> None:
    request = parse(b"CONNECT", b"db.internal:5432", [(b"Host", b"db.internal:5432")])
    assert (request.kind, request.host, request.port, request.headers) == ("tcp", "db.internal", 5432, [])
    assert request.meta("c") == {"client": "c", "via": "http-connect"}
    assert refused(b"CONNECT", b"db.internal:5432", [], RequestRules(allow_connect=False)).status == 405
    assert refused(b"CONNECT", b"db.internal", []).status == 400


def test_upgrade_offer_and_chunked_framing_are_restated() -> None:
    request = parse(b"POST", b"http://ws.internal/ws", [
        (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"4"),
    ])
    assert request.upgrade == b"websocket" and request.must_close
    assert (b"content-length", b"4") not in request.headers
    assert request.headers[1:] == [(b"transfer-encoding", b"chunked"), (b"connection", b"upgrade"),
                                   (b"upgrade", b"websocket")]


@pytest.mark.parametrize(
    ("method", "target", "headers", "status", "text"),
    [
        (b"GET", b"https://erp.internal/", [], 405, "https:// targets"),
        (b"GET", b"ftp://erp.internal/", [], 400, "request target must be"),
        (b"GET", b"http://erp.internal:0/", [], 400, "bad host"),
        (b"GET", b"/x", [], 400, "without a Host header"),
        (b"GET", b"/x", [(b"Host", b"a"), (b"Host", b"b")], 400, "sent more than once"),
        (b"GET", b"/api#/../admin", [(b"Host", b"a")], 400, "fragment"),
        (b"GET", b"/", [(b"Host", b"a"), (b"SAP-Connectivity-SCC-Location_ID", b"\xff")], 400, "not UTF-8"),
        (b"GET", b"/", [(b"Host", b"a"), (b"SAP-Connectivity-Authentication", b"Bearer a"),
                        (b"SAP-Connectivity-Technical-Authentication", b"Bearer b")], 400, "not both"),
        (b"GET", b"/", [(b"Host", b"a"), (b"SAP-Connectivity-Authentication", b"Bearer a"),
                        (b"Authorization", b"Basic x")], 400, "Authorization header must be omitted"),
        (b"GET", b"/", [(b"Host", b"a"), (b"SAP-Connectivity-Authentication", b"Bearer \xff")], 400,
         "visible ASCII"),
        (b"GET", b"/" + b"a" * 9000, [(b"Host", b"a")], 414, "request line longer than 8192"),
        (b"GET", b"/", [(b"Host", b"a"), (b"X-Long", b"x" * 8200)], 431, "header line x-long longer than 8192"),
        (b"GET", b"/", [(b"Host", b"a")] + [(b"X-%d" % i, b"y" * 4000) for i in range(20)], 431,
         "header block larger than 65536"),
    ],
)
def test_refusals(method: bytes, target: bytes, headers: Headers, status: int, text: str) -> None:
    error = refused(method, target, headers)
    assert (error.status, text in error.message) == (status, True), error.message


def test_propagated_token_is_bounded_even_where_header_lines_may_be_longer() -> None:
    rules = RequestRules(max_line_bytes=65536, max_header_bytes=131072)
    token = b"Bearer " + b"B" * MAX_PROPAGATED_TOKEN_BYTES
    error = refused(b"GET", b"/", [(b"Host", b"a"), (b"SAP-Connectivity-Authentication", token)], rules)
    assert error.status == 431 and "larger than 16384" in error.message


def test_connect_refused_where_not_allowed_names_the_allowed_methods() -> None:
    error = refused(b"CONNECT", b"a:1", [], RequestRules(allow_connect=False))
    assert dict(error.headers)[b"allow"].startswith(b"GET")


def test_refusal_texts_escape_control_characters_of_the_target() -> None:
    error = refused(b"GET", b"gopher://x/\x1b[31m", [])
    assert "\x1b" not in error.message and "\\x1b" in error.message
    error = refused(b"GET", b"http://x\x85/", [])  # h11 lets no such target through; the rules refuse it too
    assert error.status == 400 and "\x85" not in error.message


def _jwt(claims: dict[str, str]) -> str:
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{enc(b'{}')}.{enc(json.dumps(claims).encode())}.sig"


def test_a_user_token_in_proxy_authorization_excludes_principal_propagation() -> None:
    user = _jwt({"user_name": "alice", "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"})
    client = _jwt({"grant_type": "client_credentials"})
    assert carries_user(user) and not carries_user(client) and not carries_user("junk")
    headers: Headers = [(b"Host", b"a"), (b"Proxy-Authorization", f"Bearer {user}".encode()),
                        (b"SAP-Connectivity-Authentication", b"Bearer u")]
    with pytest.raises(HttpError) as caught:
        check_propagation(parse(b"GET", b"/", headers), authorization_enabled=True)
    assert caught.value.status == 400 and "already in Proxy-Authorization" in caught.value.message
    check_propagation(parse(b"GET", b"/", headers), authorization_enabled=False)
    headers[1] = (b"Proxy-Authorization", f"Bearer {client}".encode())
    check_propagation(parse(b"GET", b"/", headers), authorization_enabled=True)


_BYTES = st.binary(max_size=40)
_HEADER = st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
                                     b"SAP-Connectivity-SCC-Location_ID", b"Proxy-Authorization",
                                     b"SAP-Connectivity-Authentication", b"X-A"]), _BYTES)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD"]),
    target=st.one_of(_BYTES, _BYTES.map(lambda b: b"http://" + b), _BYTES.map(lambda b: b"/" + b)),
    headers=st.lists(_HEADER, max_size=6),
)
def test_any_head_gets_a_decision_or_a_4xx(method: bytes, target: bytes, headers: Headers) -> None:
    """Whatever the head, the rules answer with a decision or an HttpError of a client status: nothing else
    escapes, and a decision names a usable target and a Host-first header block."""
    try:
        request = parse(method, target, headers)
    except HttpError as error:
        assert error.status in (400, 405, 414, 431)
        assert error.message == escape_controls(error.message)
        return
    assert request.host and 1 <= request.port <= 65535
    assert request.kind == ("tcp" if method == b"CONNECT" else "http")
    if not request.connect:
        assert request.headers[0][0] == b"host"
        assert all(not n.startswith(b"sap-") and n != b"proxy-authorization" for n, _v in request.headers)
    json.dumps(request.meta("client"))  # the OPEN metadata is JSON


@given(st.text(max_size=60))
def test_escape_controls_leaves_no_control_character(text: str) -> None:
    escaped = escape_controls(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in escaped)
    assert escape_controls(escaped) == escaped  # idempotent: escaping twice changes nothing
    if all(0x20 <= ord(c) < 0x7F for c in text):
        assert escaped == text
