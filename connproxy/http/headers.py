# -*- test-case-name: tests.unit.test_http_proxy -*-
"""HTTP/1.1 header rules both roles use: hop-by-hop removal, forwarding framing, authorities.

Pure functions over ``(name, value)`` byte pairs; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

#: Headers that describe one connection, never forwarded (RFC 9110 section 7.6.1), plus the proxy's own.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
#: Prefixes of SAP's service headers: consumed by the proxy, never forwarded to the connector or backend.
SAP_PREFIXES = (b"sap-connectivity-", b"sap-cp-connectivity-")
_NEVER_HOP_BY_HOP = frozenset({b"content-length", b"host"})


# ---------------------------------------------------------------------------------------------------- headers


def header_list(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` as a plain list of ``(name, value)`` pairs.

    An ``h11.Headers`` is a ``collections.abc.Sequence`` that iterates through ``__getitem__``, one Python call
    per header: a message's headers are scanned several times per request, so they are listed once.
    """
    return headers if type(headers) is list else list(headers)


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection" or name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case), in order."""
    return [v for n, v in headers if n.lower() == name]


def upgrade_of(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The ``Upgrade`` value of a message that asks for a protocol switch (``Connection: upgrade``), else None."""
    headers = header_list(headers)
    if b"upgrade" not in _connection_tokens(headers):
        return None
    values = header_values(headers, b"upgrade")
    return b", ".join(values) if values else None


def end_to_end_headers(
    headers: Iterable[tuple[bytes, bytes]], *, drop: Iterable[bytes] = (), drop_sap: bool = True
) -> Headers:
    """``headers`` without the hop-by-hop ones (also those named in ``Connection``), SAP's service headers and
    ``drop`` (lower-case names). Framing (``Content-Length`` stays; ``Transfer-Encoding`` goes) is h11's job;
    callers add ``Transfer-Encoding: chunked`` and the upgrade headers back where a message needs them."""
    items = [(n.lower(), v) for n, v in headers]
    # A header named in Connection is hop-by-hop, but never the message's framing or its Host: dropping those
    # would change what the request means (a POST whose Content-Length is gone has no body any more).
    named = _connection_tokens(items) - _NEVER_HOP_BY_HOP
    dropped = HOP_BY_HOP | named | frozenset(drop) if named or drop else HOP_BY_HOP
    if drop_sap:
        return [(n, v) for n, v in items if n not in dropped and not n.startswith(SAP_PREFIXES)]
    return [(n, v) for n, v in items if n not in dropped]


def is_chunked(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a message is framed with ``Transfer-Encoding: chunked`` (the only coding h11 accepts)."""
    return bool(header_values(headers, b"transfer-encoding"))


def forwarded_request_headers(headers: Sequence[tuple[bytes, bytes]], upgrade: bytes | None) -> Headers:
    """The end-to-end headers of a request to pass on, with its framing and upgrade offer restated.

    ``Content-Length`` goes where ``Transfer-Encoding`` is present (a request must not carry both onwards).
    """
    headers = header_list(headers)
    chunked = is_chunked(headers)
    out = end_to_end_headers(headers, drop=(b"content-length",) if chunked else ())
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if upgrade is not None:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return out


def forwarded_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The end-to-end headers of a response to pass on; h11 frames it again (chunked where no length is known)."""
    headers = header_list(headers)
    return end_to_end_headers(headers, drop=(b"content-length",) if is_chunked(headers) else ())


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request with ``headers`` announces a body (``Transfer-Encoding``, or a ``Content-Length`` other
    than 0)."""
    headers = header_list(headers)
    if header_values(headers, b"transfer-encoding"):
        return True
    return any(v.strip() not in (b"0", b"") for v in header_values(headers, b"content-length"))


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) as ``(host, port)``.

    :raises ValueError: empty host, a bad or missing port (where ``default_port`` is None), or junk.
    """
    if not authority or any(c in authority for c in "/?#@ \t"):
        raise ValueError(f"bad authority {authority!r}")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"bad IPv6 literal in {authority!r}")
        host, rest = authority[1:end], authority[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad authority {authority!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = authority.rpartition(":")
        if not sep:
            host, port_text = authority, None
        else:
            port_text = port_text_
        if ":" in host:
            raise ValueError(f"IPv6 literal without brackets in {authority!r}")
    if not host:
        raise ValueError(f"empty host in {authority!r}")
    if port_text is None or port_text == "":
        if default_port is None:
            raise ValueError(f"no port in {authority!r}")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {authority!r}")
    return host, int(port_text)


# ---------------------------------------------------------------------------------------------------- client text

_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """``text`` (client-controlled: a location id, a tenant from a token, a host name) safe to put into an
    answer body or a log line: every C0 control (CR, LF, TAB, NUL, ...), DEL, C1 control and the Unicode line and
    paragraph separators become ``\\xNN`` (``\\u2028``/``\\u2029``); everything else is kept as it is."""
    return text.translate(_CONTROLS)
