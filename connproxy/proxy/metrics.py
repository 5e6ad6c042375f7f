# -*- test-case-name: tests.unit.test_metrics -*-
"""Prometheus metrics of the proxy, served as text on ``/metrics`` (``metrics.prometheus``).

Gauges are read from live state when scraped (the registry and its tunnels), so nothing has to be kept in step;
counters are incremented where things happen (the router counts stream opens and their failures by reason).
SAP's documented names are kept: ``connectivity_business_data_tunnels_count`` and
``connectivity_tunnel_opening_timeout_count_total{tunnel_id="account:///<subaccount>"}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from connproxy.obs.logs import DroppedLinesCollector
from connproxy.proxy.registry import ConnectorRegistry

#: At most this many (tenant, location) label sets are exported per gauge; the rest are summed under "_other".
MAX_LABEL_SETS = 500


class _RegistryCollector:
    """Reads tunnel and stream gauges from the connector registry at scrape time."""

    def __init__(self, registry: ConnectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        tunnels = self.registry.tunnels()
        yield GaugeMetricFamily(
            "connectivity_business_data_tunnels_count", "Connector tunnels registered on this replica",
            value=len(tunnels),
        )
        per_key = GaugeMetricFamily(
            "connproxy_tunnels", "Connector tunnels by subaccount and location", labels=["tenant", "location"]
        )
        streams = GaugeMetricFamily(
            "connproxy_streams_open", "Open streams by subaccount and location", labels=["tenant", "location"]
        )
        rtt = GaugeMetricFamily(
            "connproxy_tunnel_rtt_seconds", "Last measured round-trip time per tunnel",
            labels=["tenant", "location", "connector_id"],
        )
        counts: dict[tuple[str, str], list[int]] = {}
        for tunnel in tunnels:
            key = (tunnel.tenant, tunnel.location)
            if key not in counts and len(counts) >= MAX_LABEL_SETS:
                key = ("_other", "_other")
            entry = counts.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += tunnel.load
            measured: Any = getattr(tunnel, "rtt", None)
            if measured is not None and len(counts) < MAX_LABEL_SETS:
                rtt.add_metric([tunnel.tenant, tunnel.location, tunnel.connector_id], measured)
        for (tenant, location), (count, load) in counts.items():
            per_key.add_metric([tenant, location], count)
            streams.add_metric([tenant, location], load)
        yield per_key
        yield streams
        yield rtt


class ProxyMetrics:
    """The proxy's metric registry."""

    def __init__(self, registry: ConnectorRegistry) -> None:
        self.prometheus = CollectorRegistry()
        self.prometheus.register(_RegistryCollector(registry))  # type: ignore[arg-type]
        self.prometheus.register(DroppedLinesCollector())  # type: ignore[arg-type]
        self.stream_opens = Counter(
            "connproxy_stream_opens", "Streams opened through tunnels, by front end and result",
            ["front_end", "result"], registry=self.prometheus,
        )
        self.client_connections_refused = Counter(
            "connproxy_client_connections_refused", "Application connections refused at accept (connection limits)",
            ["front_end", "limit"], registry=self.prometheus,
        )
        self.stream_refusals = Counter(
            "connproxy_stream_refusals", "Stream opens the proxy refused itself, by limit",
            ["reason"], registry=self.prometheus,
        )
        self.tunnel_handshakes_aborted = Counter(
            "connproxy_tunnel_handshakes_aborted", "Tunnel-port connections aborted in their TLS handshake, by reason",
            ["reason"], registry=self.prometheus,
        )
        self.opening_timeouts = Counter(
            "connectivity_tunnel_opening_timeout_count", "Stream opens that timed out, by tunnel",
            ["tunnel_id"], registry=self.prometheus,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.prometheus)


class MetricsResource(Resource):
    """``GET /metrics`` (no thread pool, no global reactor: rendering is cheap and synchronous)."""

    isLeaf = True

    def __init__(self, metrics: ProxyMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """Render the metrics, or 404 for any other path."""
        if request.path not in (b"/metrics", b"/metrics/"):
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.render()
