# -*- test-case-name: tests.unit.test_metrics -*-
"""Prometheus metrics of the proxy, served as text on ``/metrics`` (``metrics.prometheus``).

Gauges are read from live state when scraped (the registry and its tunnels), so nothing has to be kept in step;
counters are incremented where things happen (the router counts stream opens and their failures by reason).
SAP's documented names are kept: ``connectivity_business_data_tunnels_count`` and
``connectivity_tunnel_opening_timeout_count_total{tunnel_id="account:///<subaccount>"}``.

The same listener answers ``/ready`` (200 ``ready`` or 503 with the reason; see :class:`MetricsResource`), the
readiness probe of ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from connproxy.obs.logs import DroppedLinesCollector
from connproxy.probes import MetricsResource, Readiness
from connproxy.proxy.registry import ConnectorRegistry

__all__ = ["MetricsResource", "ProxyMetrics", "Readiness"]

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


#: Buckets of the stream open latency (seconds from OPEN to ACCEPT or refusal).
OPEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

class _ByteCollector:
    """``connproxy_client_bytes_total{front_end, direction}``: bytes of finished streams (added when they end)
    plus those of the streams open at scrape time, so nothing is counted per chunk."""

    def __init__(self) -> None:
        self.finished: dict[tuple[str, str], int] = {}
        self.live: Callable[[], Iterable[Any]] = lambda: ()

    def stream_finished(self, stream: Any) -> None:
        """Add a finished stream's bytes (``bytes_out``: from the client; ``bytes_in``: to the client)."""
        front_end = _front_end(stream)
        for direction, count in (("in", stream.bytes_out), ("out", stream.bytes_in)):
            key = (front_end, direction)
            self.finished[key] = self.finished.get(key, 0) + count

    def collect(self) -> Iterator[Metric]:
        totals = dict(self.finished)
        for stream in self.live():
            front_end = _front_end(stream)
            for direction, count in (("in", stream.bytes_out), ("out", stream.bytes_in)):
                key = (front_end, direction)
                totals[key] = totals.get(key, 0) + count
        family = CounterMetricFamily(
            "connproxy_client_bytes", "Bytes relayed for applications by front end; direction in = from the "
            "application towards the connector, out = towards the application", labels=["front_end", "direction"],
        )
        for (front_end, direction), count in sorted(totals.items()):
            family.add_metric([front_end, direction], count)
        yield family


def _front_end(stream: Any) -> str:
    request = getattr(stream, "request", None)
    meta = getattr(request, "meta", None) or {}
    return str(meta.get("via", "unknown"))


class ProxyMetrics:
    """The proxy's metric registry.

    :param clock: seconds (``reactor.seconds``) for the open latency; default ``time.monotonic``.
    """

    def __init__(self, registry: ConnectorRegistry, clock: Callable[[], float] | None = None) -> None:
        import time

        self.clock = clock or time.monotonic
        self.prometheus = CollectorRegistry()
        self.prometheus.register(_RegistryCollector(registry))  # type: ignore[arg-type]
        self.prometheus.register(DroppedLinesCollector())  # type: ignore[arg-type]
        self.bytes = _ByteCollector()
        self.prometheus.register(self.bytes)  # type: ignore[arg-type]
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
        self.open_latency = Histogram(
            "connproxy_stream_open_seconds", "Time from OPEN to the connector's answer (accept or refusal)",
            ["front_end"], buckets=OPEN_LATENCY_BUCKETS, registry=self.prometheus,
        )
        self.pending_opens = Gauge(
            "connproxy_stream_opens_pending", "Stream opens waiting for the connector's answer",
            registry=self.prometheus,
        )
        self.token_failures = Counter(
            "connproxy_token_failures", "Proxy calls refused by authorization, by front end and reason",
            ["front_end", "reason"], registry=self.prometheus,
        )
        self.reloads = Counter(
            "connproxy_config_reloads", "Configuration reloads (SIGHUP or a changed file) by result",
            ["result"], registry=self.prometheus,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def open_started(self) -> float:
        """A stream open starts: count it as pending; returns the start time for :meth:`open_finished`."""
        self.pending_opens.inc()
        return self.clock()

    def open_finished(self, started: float, front_end: str) -> None:
        """The open that started at ``started`` got its answer."""
        self.pending_opens.dec()
        self.open_latency.labels(front_end).observe(max(0.0, self.clock() - started))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.prometheus)
