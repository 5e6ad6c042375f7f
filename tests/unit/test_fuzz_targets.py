"""The fuzz targets of ``fuzz/targets.py`` under hypothesis, in the normal suite: every parser that reads outside
bytes (tunnel frames and handshake, SOCKS5 with method 0x80, the HTTP request head, the YAML configuration files,
tokens) refuses garbage with its documented error and nothing else. The coverage-guided runs are ``fuzz/run.py``."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connproxy.wire.frames import frame
from fuzz.targets import TARGETS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(TARGETS))
@SETTINGS
@given(data=st.binary(max_size=2048))
def test_target_refuses_random_bytes_cleanly(name: str, data: bytes) -> None:
    TARGETS[name](data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["tenantMode", "subaccountId", "servers", "proxy", "http", "socks5", "port", "tls", "certFile",
         "accessControl", "virtualHost", "virtualPort", "internalHost", "internalPort", "protocol", "resources",
         "path", "tunnel", "streamWindowBytes", "logging", "level", "metrics", "prometheus", "oauth",
         "authorization", "allowedClientId", "businessDataTunnel", "shutdown", "drainTimeoutSeconds"]),
        inner, max_size=5),
    max_leaves=25,
)


@SETTINGS
@given(doc=json_values)
def test_config_loaders_refuse_structured_garbage_with_config_error(doc: object) -> None:
    TARGETS["config_json"](json.dumps(doc).encode())


@SETTINGS
@given(token=st.binary(max_size=300), location=st.binary(max_size=300), tail=st.binary(max_size=64))
def test_socks5_method_0x80_with_arbitrary_token_and_location(token: bytes, location: bytes, tail: bytes) -> None:
    message = b"\x05\x01\x80" + b"\x01" + struct.pack(">I", len(token)) + token + bytes([len(location) % 256]) + \
        location[:255] + tail
    TARGETS["socks5"](b"\x00" + message)


@SETTINGS
@given(frames=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 255), st.integers(0, 2**31 - 1),
                                 st.binary(max_size=64)), max_size=8))
def test_tunnel_session_with_well_framed_garbage(frames: list[tuple[int, int, int, bytes]]) -> None:
    """Frames with valid headers but arbitrary types, flags, stream ids and payloads, after a valid preface and
    HELLO (the first two bytes steer the target: 0x00 0x00 = preface and HELLO first)."""
    body = b"".join(frame(t, flags, sid, payload) for t, flags, sid, payload in frames)
    TARGETS["tunnel"](b"\x00\x00" + body)
