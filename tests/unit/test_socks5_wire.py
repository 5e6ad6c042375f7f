"""Tests for :mod:`connproxy.wire.socks5`: SAP's exact bytes, every error with its reply bytes,
pipelining, split-independence and fuzzing. Pure bytes in, events out: no reactor.
"""

from __future__ import annotations

import ast
import base64
import ipaddress
import itertools
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connproxy.wire import socks5
from connproxy.wire.socks5 import (
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_SAP_JWT,
    AddressType,
    ConnectRequest,
    MethodsOffered,
    Reply,
    SapAuthRequest,
    Socks5Error,
    Socks5Event,
    Socks5Server,
    Socks5State,
    Socks5StateError,
)

# The JWT from SAP/cloud-sdk-js packages/mail-client/src/__snapshots__/socket-proxy.spec.ts.snap.
JWT_155 = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwia"
    "WF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
FAIL_GENERAL = bytes.fromhex("05 01 00 01 00000000 0000")
AUTH_FAILED = b"\x01\x01"


def auth_message(token: bytes, location_field: bytes) -> bytes:
    """``01 | u32 N | token | u8 L | location field`` (location field sent as given)."""
    return b"\x01" + struct.pack(">I", len(token)) + token + bytes((len(location_field),)) + location_field


def sap_auth(token: str, location_id: str = "") -> bytes:
    """The 0x80 sub-negotiation as SAP's clients build it (base64 with padding)."""
    return auth_message(token.encode("ascii"), base64.b64encode(location_id.encode("utf-8")))


def connect(atyp: int, address: bytes, port: int, command: int = 0x01) -> bytes:
    """``05 CMD 00 ATYP ADDR PORT``; ``address`` includes the length byte for domains."""
    return bytes((0x05, command, 0x00, atyp)) + address + port.to_bytes(2, "big")


def connect_domain(name: bytes, port: int, command: int = 0x01) -> bytes:
    return connect(0x03, bytes((len(name),)) + name, port, command)


def connect_ipv4(host: str, port: int) -> bytes:
    return connect(0x01, ipaddress.IPv4Address(host).packed, port)


def connect_ipv6(host: str, port: int) -> bytes:
    return connect(0x04, ipaddress.IPv6Address(host).packed, port)


def at_auth(**kwargs: int) -> Socks5Server:
    """A server that chose method 0x80 and waits for the sub-negotiation."""
    server = Socks5Server(**kwargs)
    assert server.receive_data(b"\x05\x01\x80") == [MethodsOffered(frozenset({0x80}))]
    assert server.method_reply(METHOD_SAP_JWT) == b"\x05\x80"
    assert server.state is Socks5State.AUTH
    return server


def at_request() -> Socks5Server:
    """A server past authentication, waiting for the request."""
    server = at_auth()
    assert server.receive_data(sap_auth(JWT_155)) == [SapAuthRequest(JWT_155, "")]
    assert server.auth_reply(True) == b"\x01\x00"
    assert server.state is Socks5State.REQUEST
    return server


def at_connect_decision(early: bytes = b"") -> Socks5Server:
    server = at_request()
    events = server.receive_data(connect_domain(b"backend.internal", 443) + early)
    assert events == [ConnectRequest("backend.internal", 443, AddressType.DOMAIN)]
    assert server.state is Socks5State.WAIT_CONNECT_DECISION
    return server


def expect_error(server: Socks5Server, data: bytes, reply_bytes: bytes, *reason_parts: str) -> Socks5Error:
    with pytest.raises(Socks5Error) as info:
        server.receive_data(data)
    assert info.value.reply_bytes == reply_bytes
    for part in reason_parts:
        assert part in info.value.reason
    assert str(info.value) == info.value.reason
    assert server.state is Socks5State.CLOSED
    assert server.receive_data(b"\x05\x01\x00") == []  # a closed machine drops input
    return info.value


# -- greeting and method selection ----------------------------------------------------------


def test_sap_greeting() -> None:
    assert Socks5Server().state is Socks5State.GREETING
    server = Socks5Server()
    assert server.receive_data(bytes.fromhex("050180")) == [MethodsOffered(frozenset({0x80}))]
    assert server.state is Socks5State.WAIT_METHOD_CHOICE


@pytest.mark.parametrize(
    ("greeting", "authorization_enabled", "chosen"),
    [
        ("050180", True, METHOD_SAP_JWT),
        ("050180", False, METHOD_SAP_JWT),
        ("05020080", True, METHOD_SAP_JWT),
        ("05020080", False, METHOD_SAP_JWT),
        ("05028000", False, METHOD_SAP_JWT),
        ("050100", False, METHOD_NO_AUTH),
        ("050100", True, METHOD_NO_ACCEPTABLE),
        ("050102", False, METHOD_NO_ACCEPTABLE),  # username/password is not implemented
        ("05020102", True, METHOD_NO_ACCEPTABLE),
    ],
)
def test_select_method(greeting: str, authorization_enabled: bool, chosen: int) -> None:
    server = Socks5Server()
    [event] = server.receive_data(bytes.fromhex(greeting))
    assert isinstance(event, MethodsOffered)
    assert server.select_method(event.methods, authorization_enabled=authorization_enabled) == chosen
    assert server.state is Socks5State.WAIT_METHOD_CHOICE  # select_method is pure


@pytest.mark.parametrize(
    ("greeting", "method", "reply", "state"),
    [
        ("050180", METHOD_SAP_JWT, "0580", Socks5State.AUTH),
        ("050100", METHOD_NO_AUTH, "0500", Socks5State.REQUEST),
        ("050100", METHOD_NO_ACCEPTABLE, "05ff", Socks5State.CLOSED),
    ],
)
def test_method_reply(greeting: str, method: int, reply: str, state: Socks5State) -> None:
    server = Socks5Server()
    server.receive_data(bytes.fromhex(greeting))
    assert server.method_reply(method) == bytes.fromhex(reply)
    assert server.state is state


def test_greeting_duplicate_methods_collapse() -> None:
    assert Socks5Server().receive_data(bytes.fromhex("0503008080")) == [MethodsOffered(frozenset({0x00, 0x80}))]


@pytest.mark.parametrize("method", [0x02, 0x7F, 0x81])
def test_method_reply_rejects_unimplemented_method(method: int) -> None:
    server = Socks5Server()
    server.receive_data(bytes.fromhex("05030280ff"))
    with pytest.raises(ValueError, match="not implemented"):
        server.method_reply(method)
    assert server.state is Socks5State.WAIT_METHOD_CHOICE


def test_method_reply_rejects_method_not_offered() -> None:
    server = Socks5Server()
    server.receive_data(bytes.fromhex("050180"))
    with pytest.raises(ValueError, match="not offered"):
        server.method_reply(METHOD_NO_AUTH)
    assert server.state is Socks5State.WAIT_METHOD_CHOICE
    assert server.method_reply(METHOD_NO_ACCEPTABLE) == b"\x05\xff"  # always allowed


@pytest.mark.parametrize(
    ("first", "hint"),
    [(b"\x04", "SOCKS4"), (b"C", "HTTP"), (b"\x16", "TLS"), (b"\x00", "0x00")],
)
def test_greeting_wrong_version_fails_on_first_byte(first: bytes, hint: str) -> None:
    expect_error(Socks5Server(), first, b"", "expected 0x05", hint)


def test_greeting_without_methods() -> None:
    expect_error(Socks5Server(), b"\x05\x00", b"\x05\xff", "NMETHODS = 0")


# -- SAP method 0x80 sub-negotiation --------------------------------------------------------


def test_js_sdk_snapshot_without_location() -> None:
    message = sap_auth(JWT_155)
    assert message[:5] == bytes.fromhex("010000009b")
    assert message[-1:] == b"\x00"
    assert len(message) == 5 + 155 + 1
    server = at_auth()
    assert server.receive_data(message) == [SapAuthRequest(token=JWT_155, location_id="")]
    assert server.state is Socks5State.WAIT_AUTH_DECISION


def test_js_sdk_snapshot_with_location() -> None:
    message = sap_auth(JWT_155, "cloud-sdk-js")
    assert message[:5] == bytes.fromhex("010000009b")
    assert message[160:] == b"\x10" + b"Y2xvdWQtc2RrLWpz"
    assert at_auth().receive_data(message) == [SapAuthRequest(JWT_155, "cloud-sdk-js")]


def test_empty_token_with_location() -> None:
    message = bytes.fromhex("01 00000000 08") + b"bG9jLTE="
    assert at_auth().receive_data(message) == [SapAuthRequest(token="", location_id="loc-1")]


def test_empty_token_without_location() -> None:
    assert at_auth().receive_data(bytes.fromhex("01 00000000 00")) == [SapAuthRequest("", "")]


@pytest.mark.parametrize("field", [b"YQ", b"YQ=", b"YQ=="])
def test_location_padding_is_optional(field: bytes) -> None:
    assert at_auth().receive_data(auth_message(b"t", field)) == [SapAuthRequest("t", "a")]


def test_location_is_utf8() -> None:
    assert at_auth().receive_data(sap_auth("t", "Zürich-DC1 ☁")) == [SapAuthRequest("t", "Zürich-DC1 ☁")]


def test_token_at_the_limit_is_accepted() -> None:
    server = at_auth(max_token_bytes=10)
    assert server.receive_data(sap_auth("a" * 10)) == [SapAuthRequest("a" * 10, "")]


def test_auth_reply() -> None:
    server = at_auth()
    server.receive_data(sap_auth(JWT_155))
    assert server.auth_reply(True) == b"\x01\x00"
    assert server.state is Socks5State.REQUEST
    server = at_auth()
    server.receive_data(sap_auth(JWT_155))
    assert server.auth_reply(False) == b"\x01\x01"
    assert server.state is Socks5State.CLOSED


def test_token_not_in_repr() -> None:
    event = SapAuthRequest(token="secret.jwt.value", location_id="loc")
    assert "secret" not in repr(event)
    assert "loc" in repr(event)


def test_auth_wrong_version_fails_on_first_byte() -> None:
    expect_error(at_auth(), b"\x05", AUTH_FAILED, "version 0x05", "expected 0x01")


def test_token_too_long_detected_from_length_field() -> None:
    # Only the 5-byte header: the error must not wait for the announced bytes.
    expect_error(at_auth(max_token_bytes=100), bytes.fromhex("01 00000065"), AUTH_FAILED, "101", "100")


def test_token_length_field_maximum() -> None:
    expect_error(at_auth(), bytes.fromhex("01 ffffffff"), AUTH_FAILED, str(2**32 - 1))


def test_token_not_ascii_is_not_echoed() -> None:
    token = b"eyJTOPSECRET.payload." + "é".encode()
    error = expect_error(at_auth(), auth_message(token, b""), AUTH_FAILED, "not ASCII", "offset 21")
    assert "TOPSECRET" not in error.reason
    assert "TOPSECRET" not in repr(error)


@pytest.mark.parametrize(
    "field",
    [
        b"cloud-sdk-js",  # raw location ID, not base64 ("-" is outside the standard alphabet)
        b"bG9j_w",  # URL-safe alphabet
        b"Y",  # impossible length
        b"YQ===",  # excess padding
        b"YQ==YQ==",  # data after padding
        b"=",
        b"YQ ==",
        b"\xff\xfe",
    ],
)
def test_location_bad_base64(field: bytes) -> None:
    expect_error(at_auth(), auth_message(b"tok", field), AUTH_FAILED, "not valid base64")


def test_location_not_utf8() -> None:
    field = base64.b64encode(b"loc\xff")
    expect_error(at_auth(), auth_message(b"tok", field), AUTH_FAILED, "not valid UTF-8", "offset 3")


# -- request ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (bytes.fromhex("05 01 00 01 0a000001 01bb"), ConnectRequest("10.0.0.1", 443, AddressType.IPV4)),
        (
            bytes.fromhex("05 01 00 03 0d") + b"virtualhost_1" + bytes.fromhex("1f90"),
            ConnectRequest("virtualhost_1", 8080, AddressType.DOMAIN),
        ),
        (connect_domain(b"ERP.Example.com.", 3300), ConnectRequest("ERP.Example.com.", 3300, AddressType.DOMAIN)),
        (connect_ipv6("2001:db8:0:0:0:0:0:1", 22), ConnectRequest("2001:db8::1", 22, AddressType.IPV6)),
        (connect_ipv6("::1", 65535), ConnectRequest("::1", 65535, AddressType.IPV6)),
        (connect(0x01, bytes(4), 1, command=0x01), ConnectRequest("0.0.0.0", 1, AddressType.IPV4)),
        # RSV is ignored.
        (bytes.fromhex("05 01 ff 01 7f000001 0016"), ConnectRequest("127.0.0.1", 22, AddressType.IPV4)),
    ],
)
def test_connect_request(message: bytes, expected: ConnectRequest) -> None:
    server = at_request()
    assert server.receive_data(message) == [expected]
    assert server.state is Socks5State.WAIT_CONNECT_DECISION
    assert server.trailing_data == b""


def test_request_after_method_no_auth() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00")
    server.method_reply(METHOD_NO_AUTH)
    assert server.receive_data(connect_ipv4("192.0.2.1", 80)) == [ConnectRequest("192.0.2.1", 80, AddressType.IPV4)]


@pytest.mark.parametrize(
    ("reply", "bind_host", "bind_port", "expected"),
    [
        (Reply.SUCCEEDED, "0.0.0.0", 0, "05 00 00 01 00000000 0000"),
        (Reply.SUCCEEDED, "10.1.2.3", 1080, "05 00 00 01 0a010203 0438"),
        (Reply.SUCCEEDED, "::1", 20004, "05 00 00 04 00000000000000000000000000000001 4e24"),
        (Reply.SUCCEEDED, "2001:db8::a", 1, "05 00 00 04 20010db800000000000000000000000a 0001"),
        (Reply.SUCCEEDED, "proxy.local", 443, "05 00 00 03 0b 70726f78792e6c6f63616c 01bb"),
        (Reply.NOT_ALLOWED, "0.0.0.0", 0, "05 02 00 01 00000000 0000"),
        (Reply.NETWORK_UNREACHABLE, "0.0.0.0", 0, "05 03 00 01 00000000 0000"),
        (Reply.HOST_UNREACHABLE, "0.0.0.0", 0, "05 04 00 01 00000000 0000"),
        (Reply.CONNECTION_REFUSED, "0.0.0.0", 0, "05 05 00 01 00000000 0000"),
        (Reply.TTL_EXPIRED, "0.0.0.0", 0, "05 06 00 01 00000000 0000"),
    ],
)
def test_connect_reply_bytes(reply: Reply, bind_host: str, bind_port: int, expected: str) -> None:
    server = at_connect_decision()
    assert server.connect_reply(reply, bind_host, bind_port) == bytes.fromhex(expected)
    expected_state = Socks5State.ESTABLISHED if reply == Reply.SUCCEEDED else Socks5State.CLOSED
    assert server.state is expected_state


def test_connect_reply_defaults() -> None:
    assert at_connect_decision().connect_reply(Reply.SUCCEEDED) == bytes.fromhex("05 00 00 01 00000000 0000")


@pytest.mark.parametrize(
    ("reply", "bind_host", "bind_port"),
    [
        (Reply.SUCCEEDED, "0.0.0.0", -1),
        (Reply.SUCCEEDED, "0.0.0.0", 65536),
        (Reply.SUCCEEDED, "[::1]", 1),
        (Reply.SUCCEEDED, "bad host", 1),
        (Reply.SUCCEEDED, "", 1),
        (Reply.SUCCEEDED, "x" * 256, 1),
        (Reply.SUCCEEDED, "bücher.example", 1),
        (9, "0.0.0.0", 0),
    ],
)
def test_connect_reply_rejects_bad_arguments(reply: Reply, bind_host: str, bind_port: int) -> None:
    server = at_connect_decision()
    with pytest.raises(ValueError):
        server.connect_reply(reply, bind_host, bind_port)
    assert server.state is Socks5State.WAIT_CONNECT_DECISION


def test_request_wrong_version_fails_on_first_byte() -> None:
    expect_error(at_request(), b"\x04", FAIL_GENERAL, "version 0x04")


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_request_unsupported_address_type_fails_after_header(atyp: int) -> None:
    expect_error(at_request(), bytes((5, 1, 0, atyp)), bytes.fromhex("05 08 00 01 00000000 0000"), f"0x{atyp:02x}")


@pytest.mark.parametrize("command", [0x00, 0x02, 0x03, 0x04])
def test_request_unsupported_command_after_whole_request(command: int) -> None:
    server = at_request()
    message = connect_domain(b"host.example", 25, command=command) + b"early"
    assert server.receive_data(message[:-6]) == []  # not complete yet: no verdict
    expect_error(server, message[-6:], bytes.fromhex("05 07 00 01 00000000 0000"), "command", "CONNECT")


def test_request_unsupported_command_and_address_type() -> None:
    expect_error(at_request(), bytes((5, 2, 0, 9)), bytes.fromhex("05 08 00 01 00000000 0000"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (b"", "empty"),
        (b"bad host", "0x20"),
        (b"host\x00.example", "0x00"),
        (b"host\r\n", "0x0d"),
        ("bücher.example".encode(), "0xc3"),
        (b"host:22", "0x3a"),
        (b"[::1]", "0x5b"),
        (b"a/b", "0x2f"),
    ],
)
def test_request_invalid_domain(name: bytes, reason: str) -> None:
    expect_error(at_request(), connect_domain(name, 443), FAIL_GENERAL, "invalid destination", reason)


@pytest.mark.parametrize(
    "message",
    [connect_ipv4("10.0.0.1", 0), connect_ipv6("::1", 0), connect_domain(b"host", 0)],
)
def test_request_port_zero(message: bytes) -> None:
    expect_error(at_request(), message, FAIL_GENERAL, "port 0")


# -- state errors ------------------------------------------------------------------------------


def test_wrong_state_calls_raise_state_error() -> None:
    server = Socks5Server()
    with pytest.raises(Socks5StateError, match="GREETING"):
        server.auth_reply(True)
    with pytest.raises(Socks5StateError):
        server.method_reply(METHOD_SAP_JWT)
    with pytest.raises(Socks5StateError):
        server.connect_reply(Reply.SUCCEEDED)
    with pytest.raises(Socks5StateError):
        server.take_trailing_data()
    assert server.trailing_data == b""
    assert server.state is Socks5State.GREETING  # nothing moved

    server = at_auth()
    with pytest.raises(Socks5StateError, match="expected WAIT_AUTH_DECISION"):
        server.auth_reply(True)  # before the sub-negotiation arrived
    with pytest.raises(Socks5StateError):
        server.method_reply(METHOD_SAP_JWT)  # twice

    server = at_request()
    with pytest.raises(Socks5StateError):
        server.connect_reply(Reply.SUCCEEDED)
    with pytest.raises(Socks5StateError):
        server.take_trailing_data()

    server = at_connect_decision()
    server.connect_reply(Reply.SUCCEEDED)
    with pytest.raises(Socks5StateError, match="ESTABLISHED"):
        server.receive_data(b"data")
    with pytest.raises(Socks5StateError):
        server.connect_reply(Reply.SUCCEEDED)

    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00")
    server.method_reply(METHOD_NO_ACCEPTABLE)
    with pytest.raises(Socks5StateError, match="CLOSED"):
        server.method_reply(METHOD_NO_ACCEPTABLE)
    with pytest.raises(Socks5StateError):
        server.take_trailing_data()


def test_error_classes_are_distinct() -> None:
    assert issubclass(Socks5StateError, RuntimeError)
    assert not issubclass(Socks5StateError, Socks5Error)
    assert not issubclass(Socks5Error, RuntimeError)
    error = Socks5Error("why")
    assert (error.reason, error.reply_bytes) == ("why", b"")


@pytest.mark.parametrize("value", [-1, 2**32])
def test_max_token_bytes_validated(value: int) -> None:
    with pytest.raises(ValueError):
        Socks5Server(max_token_bytes=value)


# -- pipelining and trailing data --------------------------------------------------------------


def test_pipelined_conversation_in_one_chunk() -> None:
    early = b"\x16\x03\x01\x00\x05hello"  # e.g. the start of a TLS ClientHello
    chunk = (
        bytes.fromhex("05020080") + sap_auth(JWT_155, "loc-1") + connect_domain(b"erp.virtual", 44300) + early
    )
    server = Socks5Server()
    assert server.receive_data(chunk) == [MethodsOffered(frozenset({0x00, 0x80}))]
    assert server.trailing_data == b""  # not past a CONNECT yet
    assert server.method_reply(METHOD_SAP_JWT) == b"\x05\x80"  # returns bytes, never events
    assert server.receive_data(b"") == [SapAuthRequest(JWT_155, "loc-1")]
    assert server.receive_data(b"") == []  # waiting for the decision
    assert server.auth_reply(True) == b"\x01\x00"
    assert server.receive_data(b"") == [ConnectRequest("erp.virtual", 44300, AddressType.DOMAIN)]
    assert server.trailing_data == early
    assert server.connect_reply(Reply.SUCCEEDED) == bytes.fromhex("05 00 00 01 00000000 0000")
    assert server.trailing_data == early
    assert server.take_trailing_data() == early
    assert server.trailing_data == b""
    assert server.take_trailing_data() == b""


def test_pipelined_no_auth_greeting_and_request() -> None:
    server = Socks5Server()
    assert server.receive_data(b"\x05\x01\x00" + connect_ipv4("10.0.0.2", 80) + b"GET /") == [
        MethodsOffered(frozenset({0x00}))
    ]
    server.method_reply(server.select_method(frozenset({0x00}), authorization_enabled=False))
    assert server.receive_data(b"") == [ConnectRequest("10.0.0.2", 80, AddressType.IPV4)]
    assert server.trailing_data == b"GET /"


def test_early_data_during_connect_decision_is_kept() -> None:
    server = at_connect_decision(early=b"one")
    assert server.receive_data(b"two") == []
    assert server.take_trailing_data() == b"onetwo"
    assert server.receive_data(b"three") == []
    server.connect_reply(Reply.SUCCEEDED)
    assert server.take_trailing_data() == b"three"


def test_failed_connect_drops_early_data() -> None:
    server = at_connect_decision(early=b"early")
    assert server.connect_reply(Reply.HOST_UNREACHABLE) == bytes.fromhex("05 04 00 01 00000000 0000")
    assert server.state is Socks5State.CLOSED
    assert server.trailing_data == b""


def test_auth_failure_drops_pipelined_request() -> None:
    server = at_auth()
    server.receive_data(sap_auth("bad") + connect_ipv4("10.0.0.1", 1))
    assert server.auth_reply(False) == AUTH_FAILED
    assert server.receive_data(b"") == []
    assert server.state is Socks5State.CLOSED


def test_max_size_token_byte_at_a_time() -> None:
    server = at_auth()
    message = sap_auth("t" * 65536, "l" * 189)  # base64 of 189 bytes = 252 bytes
    events: list[Socks5Event] = []
    for i in range(len(message)):
        events += server.receive_data(message[i : i + 1])
    assert events == [SapAuthRequest("t" * 65536, "l" * 189)]


# -- buffer bound ------------------------------------------------------------------------------

LIMIT_FOR_100 = 100 + 1024


def test_buffer_bound_while_waiting_for_method_choice() -> None:
    server = Socks5Server(max_token_bytes=100)
    assert server.receive_data(b"\x05\x01\x80" + bytes(LIMIT_FOR_100)) == [MethodsOffered(frozenset({0x80}))]
    expect_error(server, b"x", b"\x05\xff", str(LIMIT_FOR_100 + 1), "WAIT_METHOD_CHOICE")


def test_buffer_bound_while_waiting_for_auth_decision() -> None:
    server = at_auth(max_token_bytes=100)
    assert server.receive_data(sap_auth("t" * 100) + bytes(LIMIT_FOR_100)) != []
    expect_error(server, b"x", AUTH_FAILED, "WAIT_AUTH_DECISION")


def test_buffer_bound_while_waiting_for_connect_decision() -> None:
    server = Socks5Server(max_token_bytes=100)
    server.receive_data(b"\x05\x01\x80")
    server.method_reply(METHOD_SAP_JWT)
    server.receive_data(sap_auth(""))
    server.auth_reply(True)
    server.receive_data(connect_ipv4("10.0.0.1", 1) + bytes(LIMIT_FOR_100))
    expect_error(server, b"x", FAIL_GENERAL, "WAIT_CONNECT_DECISION")


def test_buffer_bound_single_oversized_chunk() -> None:
    server = Socks5Server(max_token_bytes=100)
    expect_error(server, b"\x05\x01\x80" + bytes(LIMIT_FOR_100 + 1), b"\x05\xff", "limit")


def test_largest_pipelined_handshake_fits_the_bound() -> None:
    chunk = (
        b"\x05\xff" + bytes(range(255))
        + auth_message(b"t" * 100, base64.b64encode(b"l" * 189) + b"AAA")
        + connect_domain(b"d" * 255, 1)
    )
    assert len(chunk) == 257 + 5 + 100 + 1 + 255 + 262
    transcript = drive([chunk], max_token_bytes=100)
    assert transcript.error is None
    assert [type(event) for event in transcript.events] == [MethodsOffered, SapAuthRequest, ConnectRequest]


# -- a server-like driver, split-independence and fuzzing --------------------------------------


@dataclass
class Transcript:
    """Everything an observer of the connection sees."""

    events: list[Socks5Event] = field(default_factory=list)
    written: bytearray = field(default_factory=bytearray)
    relayed: bytearray = field(default_factory=bytearray)
    error: tuple[str, bytes] | None = None
    state: Socks5State = Socks5State.GREETING


def drive(
    chunks: list[bytes],
    *,
    authorization_enabled: bool = False,
    accept_auth: bool = True,
    reply: Reply = Reply.SUCCEEDED,
    max_token_bytes: int = 65536,
) -> Transcript:
    """Feed ``chunks`` and answer every event the way the Twisted glue does."""
    server = Socks5Server(max_token_bytes=max_token_bytes)
    transcript = Transcript()

    def state() -> Socks5State:  # a call, so that mypy does not keep a stale narrowing
        return server.state

    try:
        for chunk in chunks:
            if state() is Socks5State.ESTABLISHED:
                transcript.relayed += chunk
                continue
            pending = server.receive_data(chunk)
            while pending:
                assert len(pending) == 1
                event = pending[0]
                transcript.events.append(event)
                if isinstance(event, MethodsOffered):
                    method = server.select_method(event.methods, authorization_enabled=authorization_enabled)
                    transcript.written += server.method_reply(method)
                elif isinstance(event, SapAuthRequest):
                    transcript.written += server.auth_reply(accept_auth)
                else:
                    transcript.written += server.connect_reply(reply)
                if state() in (Socks5State.ESTABLISHED, Socks5State.CLOSED):
                    break
                pending = server.receive_data(b"")
            if state() is Socks5State.ESTABLISHED:
                transcript.relayed += server.take_trailing_data()
    except Socks5Error as e:
        assert state() is Socks5State.CLOSED
        assert server.trailing_data == b""
        transcript.error = (e.reason, e.reply_bytes)
    transcript.state = server.state
    return transcript


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def conversations(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """A valid client conversation: (all bytes, the early data, authorization_enabled)."""
    greeting = draw(st.sampled_from([b"\x05\x01\x80", b"\x05\x02\x00\x80", b"\x05\x02\x80\x00", b"\x05\x01\x00"]))
    authorization_enabled = greeting != b"\x05\x01\x00" and draw(st.booleans())
    data = greeting
    if 0x80 in greeting[2:]:
        token = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300))
        location = draw(st.text(max_size=40))
        data += sap_auth(token, location)
    atyp, address = draw(
        st.one_of(
            st.ip_addresses(v=4).map(lambda a: (0x01, a.packed)),
            st.ip_addresses(v=6).map(lambda a: (0x04, a.packed)),
            st.from_regex(rb"[a-zA-Z0-9._-]{1,255}", fullmatch=True).map(lambda n: (0x03, bytes((len(n),)) + n)),
        )
    )
    data += connect(atyp, address, draw(st.integers(1, 65535)))
    early = draw(st.binary(max_size=64))
    return data + early, early, authorization_enabled


@given(conversations(), st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_split_gives_the_same_transcript(conversation: tuple[bytes, bytes, bool], cuts: list[int]) -> None:
    data, early, authorization_enabled = conversation
    whole = drive([data], authorization_enabled=authorization_enabled)
    assert whole.error is None
    assert whole.state is Socks5State.ESTABLISHED
    assert isinstance(whole.events[-1], ConnectRequest)
    assert whole.relayed == early
    assert drive(split(data, cuts), authorization_enabled=authorization_enabled) == whole
    bytewise = [data[i : i + 1] for i in range(len(data))]
    assert drive(bytewise, authorization_enabled=authorization_enabled) == whole


def mutate(conversation: tuple[bytes, bytes, bool], position: int, value: int, cut: int) -> bytes:
    """A valid conversation with one byte replaced and the end possibly cut off."""
    data = bytearray(conversation[0])
    data[position % len(data)] = value
    return bytes(data[: len(data) - cut])


@given(
    st.one_of(
        st.binary(max_size=600),
        st.builds(mutate, conversations(), st.integers(0, 2000), st.integers(0, 255), st.integers(0, 8)),
        st.builds(lambda tail: b"\x05\x01\x80" + tail, st.binary(max_size=600)),
        st.builds(lambda tail: b"\x05\x01\x00\x05" + tail, st.binary(max_size=600)),
        st.builds(lambda tail: b"\x05\x01\x80\x01\x00\x00\x00" + tail, st.binary(max_size=600)),
        st.builds(lambda tail: b"\x05\x01\x80\x01\x00\x00\x00\x01t" + tail, st.binary(max_size=600)),
        st.builds(
            lambda atyp, tail: b"\x05\x01\x80" + sap_auth("t") + b"\x05\x01\x00" + atyp + tail,
            st.sampled_from([b"", b"\x01", b"\x03", b"\x04"]),
            st.binary(max_size=600),
        ),
    ),
    st.lists(st.integers(min_value=0, max_value=700), max_size=20),
    st.booleans(),
    st.booleans(),
    st.one_of(st.just(Reply.SUCCEEDED), st.sampled_from(Reply)),
    st.sampled_from([0, 5, 65536]),
)
def test_arbitrary_bytes_only_raise_socks5_error(
    data: bytes,
    cuts: list[int],
    authorization_enabled: bool,
    accept_auth: bool,
    reply: Reply,
    max_token_bytes: int,
) -> None:
    def run(chunks: list[bytes]) -> Transcript:
        return drive(
            chunks,
            authorization_enabled=authorization_enabled,
            accept_auth=accept_auth,
            reply=reply,
            max_token_bytes=max_token_bytes,
        )

    transcript = run(split(data, cuts))  # raises if anything but Socks5Error escapes
    # Inputs this small never hit the buffer bound, so the split cannot matter, errors included.
    assert run([data]) == transcript
    if transcript.error is not None:
        reply_bytes = transcript.error[1]
        assert reply_bytes in (b"", b"\x05\xff", AUTH_FAILED) or (
            len(reply_bytes) == 10 and reply_bytes[:1] == b"\x05" and reply_bytes[1] in Reply.__members__.values()
        )


# -- layering: standard library only ------------------------------------------------------------

SOURCE = Path(socks5.__file__)


def _imported_modules() -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(SOURCE.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("module", _imported_modules())
def test_imports_only_standard_library(module: str) -> None:
    assert not module.startswith("."), f"relative import {module!r}"
    assert module.split(".")[0] in sys.stdlib_module_names, f"{module!r} is not in the standard library"


def test_import_loads_no_twisted_or_zope() -> None:
    code = (
        "import sys, connproxy.wire.socks5\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'zope'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SOURCE.parents[2])
