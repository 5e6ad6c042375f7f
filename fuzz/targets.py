"""Fuzz targets: every parser that reads bytes from outside, each as ``check(data)`` that raises only on a bug.

Each target feeds ``data`` to one parser and accepts only the documented refusal (``ProtocolError``,
``Socks5Error``, ``ConfigError``, ``AuthError``, ``HttpError``/``h11.RemoteProtocolError``); anything else
escapes and is a finding. The same functions run under atheris (``fuzz/run.py``, coverage-guided) and under
hypothesis in the normal test suite (``tests/unit/test_fuzz_targets.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import h11
import yaml

from connproxy.config import ConfigError, connector_config_from_mapping, proxy_config_from_mapping
from connproxy.http.headers import end_to_end_headers, split_authority, upgrade_of
from connproxy.wire.errors import ProtocolError
from connproxy.wire.frames import PREFACE
from connproxy.wire.session import Role, Session
from connproxy.wire.socks5 import ConnectRequest, MethodsOffered, SapAuthRequest, Socks5Error, Socks5Server


def _chunks(data: bytes) -> list[bytes]:
    """Split ``data`` at points its first byte chooses, so that message boundaries move between runs."""
    if not data:
        return [b""]
    step = data[0] % 7 + 1
    body = data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)] or [b""]


def tunnel_listener(data: bytes) -> None:
    """The proxy's session reading a connector's bytes (preface, HELLO, frames); most inputs get a valid preface
    and, when the second byte is even, a valid HELLO first, so that the fuzzer reaches the frame handling."""
    prefix = b"" if not data or data[0] & 1 else PREFACE
    if prefix and len(data) > 1 and not data[1] & 1:
        hello = Session(Role.DIALER)
        hello.send_hello({"subaccount": "t", "location": "", "connector_id": "c"})
        prefix = b"".join(hello.take_output())
    for role in (Role.LISTENER, Role.DIALER):
        session = Session(role)
        try:
            for chunk in [prefix, *_chunks(data)]:
                session.receive_data(chunk)
                session.take_output()
        except ProtocolError:
            pass


def socks5(data: bytes) -> None:
    """The SOCKS5 front end's parser, answering each event the way the proxy does."""
    server = Socks5Server(max_token_bytes=4096)
    try:
        for chunk in _chunks(data):
            pending = server.receive_data(chunk)
            while pending:
                event = pending.pop(0)
                if isinstance(event, MethodsOffered):
                    server.method_reply(server.select_method(event.methods, authorization_enabled=False))
                elif isinstance(event, SapAuthRequest):
                    server.auth_reply(True)
                elif isinstance(event, ConnectRequest):
                    return
                pending.extend(server.receive_data(b""))
    except Socks5Error:
        pass


def http_head(data: bytes) -> None:
    """An HTTP/1.1 request head as the HTTP front end reads it: h11, then our header rules and authority parse."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    try:
        conn.receive_data(data)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return
    if not isinstance(event, h11.Request):
        return
    headers = list(event.headers)
    end_to_end_headers(headers)
    upgrade_of(headers)
    target = event.target.decode("latin-1")
    authority = target.split("/", 3)[2] if target.startswith("http://") and target.count("/") >= 2 else target
    try:
        split_authority(authority, 80)
    except ValueError:
        pass


def config_yaml(data: bytes) -> None:
    """The configuration loaders on arbitrary YAML (after PyYAML's own refusal)."""
    try:
        parsed = yaml.safe_load(data.decode("utf-8", "replace"))
    except yaml.YAMLError:
        return
    for load in (proxy_config_from_mapping, connector_config_from_mapping):
        try:
            load(parsed)  # type: ignore[operator]
        except ConfigError:
            pass


def config_json_shapes(data: bytes) -> None:
    """The loaders on JSON-shaped documents (deeper structure than random YAML reaches)."""
    try:
        parsed = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return
    for load in (proxy_config_from_mapping, connector_config_from_mapping):
        try:
            load(parsed)
        except ConfigError:
            pass


def token(data: bytes) -> None:
    """A bearer token as the trusted-mode decoder and the bearer parser see it."""
    from connproxy.proxy.auth import AuthError, _unverified_claims, bearer_token, client_id_of, tenant_of

    text = data.decode("latin-1")
    bearer_token(text)
    try:
        claims = _unverified_claims(text, 8192)
    except AuthError:
        return
    tenant_of(claims)
    client_id_of(claims)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "tunnel": tunnel_listener,
    "socks5": socks5,
    "http_head": http_head,
    "config_yaml": config_yaml,
    "config_json": config_json_shapes,
    "token": token,
}
