# -*- test-case-name: tests.unit.test_lifecycle -*-
"""Prometheus metrics of the connector, on its own metrics listener (``metrics.prometheus``, off by default).

* ``connproxy_connector_tunnel_up{replica}``: 1 per proxy replica (its HELLO's ``replica_id``) this connector
  has an established tunnel to, 0 for replicas it had one to before (at most :data:`MAX_REPLICAS` remembered);
* ``connproxy_connector_streams_open``: streams open on its tunnels;
* ``connproxy_connector_backend_dial_failures_total{code}``: backend connections that failed, by RESET code
  (``CONNECT_REFUSED``, ``CONNECT_TIMEOUT``, ``HOST_UNREACHABLE``, ``TLS_ERROR``);
* ``connproxy_connector_access_denials_total``: streams refused by the access control;
* ``connproxy_connector_reconnects_total``: connection attempts to the proxy after the first;
* ``connproxy_config_reloads_total{result}``: reloads (SIGHUP or a changed file), ``ok`` or ``error``.

Gauges are read from the live tunnels at scrape time; counters are incremented where things happen (the
RESETs the connector sends, the dial loop, the reloader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from connproxy.wire.errors import ErrorCode

#: Replicas remembered for ``tunnel_up 0``.
MAX_REPLICAS = 64

#: RESET codes that mean the backend could not be reached.
BACKEND_FAILURE_CODES = frozenset(
    {ErrorCode.CONNECT_REFUSED, ErrorCode.CONNECT_TIMEOUT, ErrorCode.HOST_UNREACHABLE, ErrorCode.TLS_ERROR}
)


class _TunnelCollector:
    def __init__(self, tunnels: Callable[[], Iterable[Any]]) -> None:
        self.tunnels = tunnels
        self.replicas: list[str] = []

    def saw(self, replica: str) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        self.replicas.append(replica)
        del self.replicas[:-MAX_REPLICAS]

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "connproxy_connector_tunnel_up", "1 while a tunnel to the proxy replica is established",
            labels=["replica"],
        )
        live = [t for t in self.tunnels() if not t.lost and t.established_at is not None]
        up_replicas = {str(t.replica_id) for t in live}
        for replica in self.replicas:
            up.add_metric([replica], 1 if replica in up_replicas else 0)
        yield up
        yield GaugeMetricFamily(
            "connproxy_connector_streams_open", "Streams open on the connector's tunnels",
            value=sum(len(t.streams) for t in live),
        )


class ConnectorMetrics:
    """The connector's metric registry.

    :param tunnels: the connector's live tunnels (read at scrape time).
    """

    def __init__(self, tunnels: Callable[[], Iterable[Any]]) -> None:
        self.prometheus = CollectorRegistry()
        self._tunnels = _TunnelCollector(tunnels)
        self.prometheus.register(self._tunnels)  # type: ignore[arg-type]
        self.backend_failures = Counter(
            "connproxy_connector_backend_dial_failures", "Backend connections that failed, by RESET code",
            ["code"], registry=self.prometheus,
        )
        self.access_denials = Counter(
            "connproxy_connector_access_denials", "Streams refused by the access control",
            registry=self.prometheus,
        )
        self.reconnects = Counter(
            "connproxy_connector_reconnects", "Connection attempts to the proxy after the first",
            registry=self.prometheus,
        )
        self.reloads = Counter(
            "connproxy_config_reloads", "Configuration reloads (SIGHUP or a changed file) by result",
            ["result"], registry=self.prometheus,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def tunnel_up(self, replica: str) -> None:
        """A tunnel to ``replica`` was established."""
        self._tunnels.saw(replica)

    def reset_sent(self, code: ErrorCode) -> None:
        """The connector refused or cut a stream with ``code``."""
        if code == ErrorCode.ACCESS_DENIED:
            self.access_denials.inc()
        elif code in BACKEND_FAILURE_CODES:
            self.backend_failures.labels(code.name).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.prometheus)
