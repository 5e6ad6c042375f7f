# -*- test-case-name: tests.integration.test_lifecycle -*-
"""The connector as a process (``twistd connproxy-connector``): the tunnel service, its metrics listener and
live reload.

* The metrics listener (``metrics.prometheus``, off by default, loopback) serves ``/metrics``, ``/ready``
  (ready while the tunnel to the proxy is up; with several replicas, a tunnel to at least one) and
  ``/healthcheck``.
* SIGTERM drains (:meth:`ConnectorService.stopService`; with several replicas
  :meth:`~connproxy.connector.replicas.ReplicaConnector.stopService`, every replica tunnel) and exits 0; the
  metrics listener stops last.
* SIGHUP, or a change of the configuration file, reloads ``accessControl`` without touching the tunnel or the
  streams on it; other changed keys are logged as needing a restart, and an invalid file is refused with one
  log line naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger

from connproxy import reload
from connproxy.config import ConnectorConfig, verify_connector_config_file
from connproxy.connector.dialer import ConnectorService, make_connector_service
from connproxy.listener import Listener
from connproxy.obs import audit
from connproxy.probes import metrics_site

log = Logger(namespace="connproxy.connector.service")

#: Connector configuration keys a reload applies (everything else needs a restart).
RELOADABLE = ("accessControl",)


class ConnectorProcess(MultiService):
    """The connector service plus its metrics listener and reload.

    :ivar connector: the :class:`ConnectorService` (the tunnel and the streams on it).
    """

    def __init__(self, config: ConnectorConfig, reactor: Any, audit_writer: audit.AuditWriter | None = None,
                 connector: ConnectorService | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.connector = connector or make_connector_service(config, reactor, audit_writer)
        self.connector.setServiceParent(self)
        self.reloader: reload.Reloader[ConnectorConfig] | None = None
        self._process_control = False
        self.metrics_listener: Listener | None = None
        if config.metrics.enabled:
            self.metrics_listener = Listener(
                "connector metrics",
                TCP4ServerEndpoint(reactor, config.metrics.port, interface=config.metrics.bind_address),
                metrics_site(self.connector.metrics, self.connector.readiness),
                config_key="metrics.prometheus.port",
            )
            self.metrics_listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Join ``parent``; under twistd also hand it the configured log observer (``logging``)."""
        from connproxy.obs.logs import install

        install(parent, self.config.logging, self.reactor)
        super().setServiceParent(parent)

    def enable_process_control(self, config_path: str | None) -> None:
        """Run as the process: SIGTERM drains and exits 0; SIGHUP (and, with ``config_path``, a change of the
        file) reloads. Call before ``startService``."""
        self._process_control = True
        if config_path is not None:
            self.reloader = reload.Reloader(
                self.reactor, config_path, verify_connector_config_file, self.apply_config,
                lambda result: self.connector.metrics.reloads.labels(result).inc(),
            )

    def reload(self) -> bool:
        """Reload the configuration file now (SIGHUP); False if refused or there is no file."""
        return reload.reload_now(self.reloader)

    def apply_config(self, new: ConnectorConfig) -> None:
        """Apply ``accessControl`` from ``new`` to the next stream (streams open now keep their decision); log
        other changed keys as needing a restart."""
        old = self.config
        applicable, restart = reload.split_changes(reload.changed_keys(old, new), RELOADABLE)
        effective = dataclasses.replace(old, access_control=new.access_control)
        apply_connector_config(self.connector, effective)
        self.config = effective
        reload.log_restart_needed(restart)
        log.info(
            "configuration reloaded; applied: {keys} ({rules} access rules)",
            keys=", ".join(applicable) or "(no change)", rules=len(effective.access_control),
        )

    def startService(self) -> None:
        """Start the tunnel and the metrics listener; as the process also the signal handlers and file watch."""
        super().startService()
        if self._process_control:
            reload.take_process_control(self.reactor, self.reload, self.reloader)

    def stopService(self) -> Deferred[Any]:
        """Drain the connector (see :meth:`ConnectorService.stopService`), then stop the metrics listener."""
        if self.reloader is not None:
            self.reloader.stop()
        Service.stopService(self)
        drained = maybeDeferred(self.connector.stopService)

        def rest(_: object) -> Deferred[Any]:
            others = [maybeDeferred(s.stopService) for s in reversed(list(self)) if s.running]
            return DeferredList(others, consumeErrors=True)

        return drained.addBoth(rest)


def apply_connector_config(connector: ConnectorService, config: ConnectorConfig) -> None:
    """Make ``config`` the running configuration of ``connector`` (the access decision reads it per stream)."""
    connector.config = config
    connector.dialer.config = config
    connector.dialer.http.config = config


def make_connector_process(config: ConnectorConfig, reactor: Any,
                           audit_writer: audit.AuditWriter | None = None) -> ConnectorProcess:
    """The connector process's service for ``config``."""
    return ConnectorProcess(config, reactor, audit_writer)
