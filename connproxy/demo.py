"""``connproxy demo``: proxy, connector and a small backend in one process on loopback.

It prints commands that work against them at once: SOCKS5 (``curl --socks5-hostname``) and, where the HTTP proxy
is available, ``curl -x``. The front ends use their default ports (20003, 20004) when free, else free ports; the
tunnel listener always takes a free port. Development certificates come from the state folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connproxy.config import (
    AccessRule,
    embedded_connector_config,
    embedded_proxy_config,
)
from connproxy.config import (
    Resource as AccessResource,
)

log = Logger(namespace="connproxy.demo")

DEMO_HOST = "demo.internal"


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"hello from the on-premise backend, through the connproxy tunnel\n"

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        body: bytes = request.content.read()  # type: ignore[union-attr]
        return body


def _port_or_zero(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def run_demo(reactor: Any, out: Any = sys.stdout) -> Any:
    """Start everything and print the commands; returns the services (for tests)."""
    from connproxy.connector.dialer import ConnectorService, make_connector_service
    from connproxy.proxy.service import ProxyService

    backend = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(_Hello()))
    backend_port = backend.getHost().port
    base = embedded_proxy_config()
    config = dataclasses.replace(
        base,
        tunnel_listener=dataclasses.replace(base.tunnel_listener, port=0),
        socks5=dataclasses.replace(base.socks5, port=_port_or_zero(base.socks5.port)),
        http=dataclasses.replace(base.http, port=_port_or_zero(base.http.port)),
        metrics=dataclasses.replace(base.metrics, port=_port_or_zero(base.metrics.port)),
    )
    proxy = ProxyService(config, reactor)
    proxy.startService()
    connector_base = embedded_connector_config()
    rules = (
        AccessRule(DEMO_HOST, (8080, 8080), "127.0.0.1", (backend_port, backend_port), "TCP"),
        AccessRule(
            DEMO_HOST, (80, 80), "127.0.0.1", (backend_port, backend_port), "HTTP",
            resources=(AccessResource("/", all_sub_paths=True),),
        ),
    )
    connector_config = dataclasses.replace(
        connector_base,
        proxy=dataclasses.replace(connector_base.proxy, host="localhost", port=proxy.tunnel_listener.port_number),
        access_control=rules,
    )
    connector: ConnectorService = make_connector_service(connector_config, reactor)
    connector.startService()
    await connector.when_up()
    assert proxy.socks_listener is not None
    socks = proxy.socks_listener.port_number
    lines = [
        "",
        "connproxy demo is running: proxy, connector and a backend on this machine.",
        f"  backend      127.0.0.1:{backend_port}, published by the connector as {DEMO_HOST}:8080 (TCP)"
        f" and {DEMO_HOST}:80 (HTTP)",
        f"  SOCKS5 proxy 127.0.0.1:{socks}",
    ]
    http_listener = getattr(proxy, "http_listener", None)
    if http_listener is not None and http_listener.port is not None:
        lines.append(f"  HTTP proxy   127.0.0.1:{http_listener.port_number}")
    metrics_listener = getattr(proxy, "metrics_listener", None)
    if metrics_listener is not None and metrics_listener.port is not None:
        lines.append(f"  metrics      http://127.0.0.1:{metrics_listener.port_number}/metrics")
    lines += ["", "Try:", f"  curl --socks5-hostname 127.0.0.1:{socks} http://{DEMO_HOST}:8080/"]
    if http_listener is not None and http_listener.port is not None:
        lines.append(f"  curl -x http://127.0.0.1:{http_listener.port_number} http://{DEMO_HOST}/")
    lines += ["", "Press Ctrl-C to stop.", ""]
    out.write("\n".join(lines))
    out.flush()
    return proxy, connector, backend


def main_demo(args: argparse.Namespace) -> int:
    """Run the demo until interrupted; returns the exit code."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from connproxy.config import LoggingConfig
    from connproxy.obs.logs import observer_for

    if getattr(args, "state_dir", None):
        os.environ["CONNPROXY_STATE_DIR"] = str(args.state_dir)
    globalLogBeginner.beginLoggingTo([observer_for(LoggingConfig(), sys.stderr)], redirectStandardIO=False)
    status = [0]

    def started() -> None:
        d: Deferred[Any] = ensureDeferred(run_demo(reactor))

        def failed(failure: Any) -> None:
            sys.stderr.write(f"connproxy demo: {failure.getErrorMessage()}\n")
            status[0] = 1
            reactor.stop()  # type: ignore[attr-defined]

        d.addErrback(failed)

    reactor.callWhenRunning(started)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status[0]
