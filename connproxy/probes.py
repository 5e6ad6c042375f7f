"""The metrics listener's resource, for both roles: ``/metrics`` (Prometheus text), ``/ready`` (readiness probe)
and ``/healthcheck`` (liveness probe). See ``docs/operations.md``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request

from connproxy.nodelay import NoDelaySite

#: A readiness check: ``(ready, reason)``.
Readiness = Callable[[], "tuple[bool, str]"]


class MetricsResource(Resource):
    """``GET /metrics``, ``/ready`` and ``/healthcheck``; any other path is 404.

    No thread pool, no global reactor: rendering is cheap and synchronous. ``/ready`` answers 200 ``ready`` or
    503 ``not ready: <reason>`` from ``readiness`` (always ready without one); ``/healthcheck`` answers 200
    ``OK`` while the process serves.

    :param metrics: anything with ``render() -> bytes`` (the proxy's or the connector's metrics).
    """

    isLeaf = True

    def __init__(self, metrics: Any, readiness: Readiness | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        """Answer one of the three paths, or 404."""
        path = request.path.rstrip(b"/")
        if path == b"/metrics":
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            body: bytes = self.metrics.render()
            return body
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if path == b"/ready":
            ready, reason = self.readiness() if self.readiness is not None else (True, "")
            if ready:
                return b"ready\n"
            request.setResponseCode(503)
            return f"not ready: {reason}\n".encode()
        if path == b"/healthcheck":
            return b"OK\n"
        request.setResponseCode(404)
        return b"not found\n"


class QuietSite(NoDelaySite):
    """A ``Site`` (TCP_NODELAY) that writes no access log line per scrape or probe."""

    noisy = False

    def log(self, request: Any) -> None:
        """Scrapes are not logged."""


def metrics_site(metrics: Any, readiness: Readiness | None = None) -> QuietSite:
    """The site of a metrics listener."""
    return QuietSite(MetricsResource(metrics, readiness))
