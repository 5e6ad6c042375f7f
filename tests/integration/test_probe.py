"""``connproxy probe``: the operator's end-to-end check, against a real stack on 127.0.0.1."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from connproxy.cli import build_parser
from connproxy.probe import main_probe
from tests.harness import Banner, Stack, serve, tcp_rule, wait_for


def run_probe(argv: list[str]) -> Deferred[tuple[int, str]]:
    """Run ``connproxy <argv>`` in a thread (the probe blocks) and fire with (status, output)."""
    args: argparse.Namespace = build_parser().parse_args(argv)
    out = io.StringIO()

    def run() -> tuple[int, str]:
        return main_probe(args, out), out.getvalue()

    return deferToThread(run)


@pytest_twisted.inlineCallbacks
def test_probe_socks_with_a_location_reaches_the_backend(stack: Stack) -> Iterator[Deferred[Any]]:
    backend = yield serve(Banner)
    stack.ports.append(backend)
    stack.start_proxy()
    connector = stack.start_connector(location="loc-1",
                                      access=[tcp_rule("smtp.internal", 25, backend.getHost().port)])
    yield connector.when_up()
    socks = f"127.0.0.1:{stack.socks_port}"
    status, text = yield run_probe(["probe", "socks", "--proxy", socks, "--location", "loc-1", "smtp.internal:25"])
    assert status == 0, text
    assert "method chosen: 0x80" in text
    assert "reply 0x00, succeeded" in text
    assert "first bytes from the backend (11):\n220 hello" in text
    status, text = yield run_probe(["probe", "socks", "--proxy", socks, "--location", "loc-2", "smtp.internal:25"])
    assert status == 1
    assert "reply 0x03, no connector is connected for this subaccount and location" in text
    status, text = yield run_probe(["probe", "socks", "--proxy", socks, "--location", "loc-1", "--no-request",
                                    "other.internal:25"])
    assert status == 1
    assert "reply 0x02, refused by the connector's access control" in text


@pytest_twisted.inlineCallbacks
def test_probe_http_reports_the_proxy_answer(stack: Stack) -> Iterator[Deferred[Any]]:
    stack.start_proxy(servers={"proxy": {"http": {"enabled": True}}})
    yield wait_for(lambda: stack.proxy is not None and stack.proxy.http_listener is not None)
    status, text = yield run_probe(["probe", "http", "--proxy", f"127.0.0.1:{stack.http_port}", "--location",
                                    "nowhere", "http://erp.internal/api"])
    assert status == 1
    assert "503" in text and "no connector for subaccount tenant-a, location nowhere" in text


@pytest_twisted.inlineCallbacks
def test_probe_names_an_unreachable_proxy() -> Iterator[Deferred[Any]]:
    status, text = yield run_probe(["probe", "socks", "--proxy", "127.0.0.1:1", "--timeout", "2", "a.internal:1"])
    assert status == 1
    assert "cannot connect to the proxy at 127.0.0.1:1" in text
