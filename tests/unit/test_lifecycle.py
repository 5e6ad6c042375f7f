"""Lifecycle pieces without a running reactor: the reload logic (what changed, what needs a restart, the file
watch, refusals), the probes resource, the connector's metrics and the drain deadline of a tunnel."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from connproxy.config import (
    ConfigError,
    connector_config_from_mapping,
    load_connector_config,
    proxy_config_from_mapping,
)
from connproxy.connector.metrics import ConnectorMetrics
from connproxy.probes import MetricsResource
from connproxy.proxy.metrics import ProxyMetrics
from connproxy.proxy.registry import ConnectorRegistry
from connproxy.reload import Reloader, ReloadError, changed_keys, key_path, split_changes
from connproxy.wire.errors import ErrorCode
from tests.unit.test_tunnel import TunnelPair

RULE = {"virtualHost": "erp.internal", "virtualPort": 80, "internalHost": "127.0.0.1", "internalPort": 8080,
        "protocol": "TCP"}


def connector(**extra: Any) -> Any:
    return connector_config_from_mapping({"subaccountId": "t", "connectorId": "c", **extra})


def proxy(**extra: Any) -> Any:
    off = {"enableProxyAuthorization": False}
    base: dict[str, Any] = {"tenantMode": "dedicated", "subaccountId": "t",
                            "servers": {"proxy": {"http": dict(off), "socks5": dict(off)}}}
    base.update(extra)
    return proxy_config_from_mapping(base)


class DiffTests(SynchronousTestCase):
    def test_no_change(self) -> None:
        self.assertEqual(changed_keys(connector(), connector()), [])

    def test_access_control_is_named_as_a_whole_and_reloadable(self) -> None:
        changed = changed_keys(connector(), connector(accessControl=[RULE]))
        self.assertEqual(changed, ["accessControl"])
        self.assertEqual(split_changes(changed, ("accessControl",)), (["accessControl"], []))

    def test_nested_keys_are_named_by_their_yaml_path(self) -> None:
        old = proxy()
        new = proxy(servers={"proxy": {"socks5": {"port": 1081, "enableProxyAuthorization": False},
                                       "http": {"enableProxyAuthorization": False}},
                             "businessDataTunnel": {"port": 9042}},
                    tenantMode="shared")
        changed = changed_keys(old, new)
        self.assertIn("servers.proxy.socks5.port", changed)
        self.assertIn("servers.businessDataTunnel.port", changed)
        self.assertIn("tenantMode", changed)
        applicable, restart = split_changes(changed, ("servers.proxy.authorization.oauth",))
        self.assertEqual(applicable, [])
        self.assertEqual(sorted(restart), sorted(changed))

    def test_oauth_changes_are_reloadable_and_ports_are_not(self) -> None:
        old = dataclasses.replace(proxy(), oauth=None)
        from connproxy.config import OAuthConfig

        a = dataclasses.replace(old, oauth=OAuthConfig(allowed_client_ids=("a",), token_keys_file="k.json"))
        b = dataclasses.replace(a, oauth=OAuthConfig(allowed_client_ids=("a", "b"), token_keys_file="k.json"))
        b = dataclasses.replace(b, shutdown=dataclasses.replace(b.shutdown, drain_timeout_seconds=5))
        changed = changed_keys(a, b)
        self.assertEqual(sorted(changed), ["servers.proxy.authorization.oauth.allowedClientId",
                                           "shutdown.drainTimeoutSeconds"])
        self.assertEqual(split_changes(changed, ("servers.proxy.authorization.oauth",)),
                         (["servers.proxy.authorization.oauth.allowedClientId"], ["shutdown.drainTimeoutSeconds"]))
        # From no oauth block to one: the block is named as a whole.
        self.assertEqual(changed_keys(old, a), ["servers.proxy.authorization.oauth"])

    def test_key_path(self) -> None:
        self.assertEqual(key_path(("client_connection", "idle_timeout_seconds")),
                         "servers.proxy.clientConnection.idleTimeoutSeconds")
        self.assertEqual(key_path(("metrics", "bind_address")), "metrics.prometheus.bindAddress")


class Captured:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        import shutil
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="connproxy-reload-")).resolve()
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.clock = Clock()
        self.applied: list[Any] = []
        self.results: list[str] = []
        self.write("v1", [])
        self.reloader: Reloader[Any] = Reloader(
            self.clock, str(self.folder / "config.yaml"), load_connector_config, self.applied.append,
            self.results.append, poll_seconds=2.0)

    def write(self, version: str, rules: list[dict[str, Any]], broken: bool = False) -> None:
        import yaml

        target = self.folder / version
        target.mkdir(exist_ok=True)
        data: dict[str, Any] = {"subaccountId": "t", "connectorId": "c", "accessControl": rules}
        if broken:
            data["accessControl"] = [{**RULE, "protocol": "FTP"}]
        (target / "config.yaml").write_text(yaml.safe_dump(data))
        link = self.folder / "config.yaml"
        tmp = self.folder / ".tmp"
        os.symlink(target / "config.yaml", tmp)
        os.replace(tmp, link)

    def test_sighup_applies_a_valid_file(self) -> None:
        self.write("v2", [RULE])
        self.assertTrue(self.reloader.reload())
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(len(self.applied[0].access_control), 1)
        self.assertEqual(self.results, ["ok"])

    def test_invalid_file_is_refused_with_one_line_naming_the_key(self) -> None:
        logs = Captured(self)
        self.write("v2", [], broken=True)
        self.assertFalse(self.reloader.reload())
        self.assertEqual(self.applied, [])
        self.assertEqual(self.results, ["error"])
        [line] = logs.errors()
        self.assertEqual(line["key"], "accessControl[0].protocol")
        self.assertIn("accessControl[0].protocol", line["error"])

    def test_apply_may_refuse(self) -> None:
        def refuse(_config: Any) -> None:
            raise ReloadError("tokenKeysFile 'x' cannot be read", "tokenKeysFile")

        reloader: Reloader[Any] = Reloader(self.clock, str(self.folder / "config.yaml"), load_connector_config,
                                           refuse, self.results.append)
        logs = Captured(self)
        self.assertFalse(reloader.reload())
        self.assertEqual(self.results, ["error"])
        self.assertEqual(len(logs.errors()), 1)

    def test_symlink_swap_is_noticed_by_the_poll(self) -> None:
        self.reloader.start()
        self.addCleanup(self.reloader.stop)
        self.clock.advance(2.0)
        self.assertEqual(self.applied, [])  # nothing changed
        self.write("v2", [RULE])
        self.clock.advance(2.0)
        self.assertEqual(len(self.applied), 1)
        self.clock.advance(2.0)
        self.assertEqual(len(self.applied), 1)  # once per change
        self.write("v3", [], broken=True)
        self.clock.advance(2.0)
        self.assertEqual(self.results, ["ok", "error"])
        self.clock.advance(2.0)
        self.assertEqual(self.results, ["ok", "error"])  # a refused version is not retried until it changes

    def test_a_change_of_an_extra_file_reloads(self) -> None:
        keys = self.folder / "token_keys.json"
        keys.write_text("{}")
        reloader: Reloader[Any] = Reloader(
            self.clock, str(self.folder / "config.yaml"), load_connector_config, self.applied.append,
            self.results.append, extra_files=lambda: [str(keys)], poll_seconds=2.0)
        reloader.start()
        self.addCleanup(reloader.stop)
        self.clock.advance(2.0)
        self.assertEqual(self.results, [])
        keys.write_text('{"keys": []}')  # edited in place: size and time change
        self.clock.advance(2.0)
        self.assertEqual(self.results, ["ok"])

    def test_missing_file_is_not_a_reload(self) -> None:
        self.reloader.start()
        self.addCleanup(self.reloader.stop)
        (self.folder / "config.yaml").unlink()
        self.clock.advance(2.0)
        self.assertEqual(self.results, [])
        self.write("v2", [RULE])
        self.clock.advance(2.0)
        self.assertEqual(self.results, ["ok"])

    def test_config_error_type(self) -> None:
        self.write("v2", [], broken=True)
        with self.assertRaises(ConfigError):
            load_connector_config(self.folder / "config.yaml")


class ProbeTests(SynchronousTestCase):
    def get(self, resource: MetricsResource, path: bytes) -> tuple[int, bytes]:
        request = DummyRequest([path.lstrip(b"/")])
        request.path = path
        body = resource.render_GET(request)
        return request.responseCode or 200, body

    def test_ready_healthcheck_metrics_and_404(self) -> None:
        state = [(False, "starting")]
        resource = MetricsResource(ProxyMetrics(ConnectorRegistry()), lambda: state[0])
        self.assertEqual(self.get(resource, b"/ready"), (503, b"not ready: starting\n"))
        state[0] = (True, "")
        self.assertEqual(self.get(resource, b"/ready"), (200, b"ready\n"))
        self.assertEqual(self.get(resource, b"/healthcheck"), (200, b"OK\n"))
        code, body = self.get(resource, b"/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'connproxy_config_reloads_total{result="ok"} 0.0', body)
        self.assertEqual(self.get(resource, b"/nope")[0], 404)


class ConnectorMetricsTests(SynchronousTestCase):
    def test_resets_are_counted_by_kind(self) -> None:
        metrics = ConnectorMetrics(list)
        metrics.reset_sent(ErrorCode.ACCESS_DENIED)
        metrics.reset_sent(ErrorCode.CONNECT_REFUSED)
        metrics.reset_sent(ErrorCode.CONNECT_REFUSED)
        metrics.reset_sent(ErrorCode.NORMAL)
        sample = metrics.prometheus.get_sample_value
        self.assertEqual(sample("connproxy_connector_access_denials_total", {}), 1)
        self.assertEqual(sample("connproxy_connector_backend_dial_failures_total", {"code": "CONNECT_REFUSED"}), 2)

    def test_tunnel_up_per_replica(self) -> None:
        class T:
            lost = False
            established_at = 1.0
            replica_id = "proxy-1"
            streams = {1: object()}

        live: list[Any] = [T()]
        metrics = ConnectorMetrics(lambda: live)
        metrics.tunnel_up("proxy-0")
        metrics.tunnel_up("proxy-1")
        sample = metrics.prometheus.get_sample_value
        self.assertEqual(sample("connproxy_connector_tunnel_up", {"replica": "proxy-1"}), 1)
        self.assertEqual(sample("connproxy_connector_tunnel_up", {"replica": "proxy-0"}), 0)
        self.assertEqual(sample("connproxy_connector_streams_open", {}), 1)


class DrainDeadlineTests(SynchronousTestCase):
    def test_streams_open_at_the_deadline_are_reset_not_closed(self) -> None:
        pair = TunnelPair()
        s = pair.relayed_stream()
        pair.proxy.drain(ErrorCode.SHUTTING_DOWN, "proxy shutting down", grace=2.0)
        pair.flush()
        s.far.dataReceived(b"partial")
        pair.flush()
        self.assertEqual(s.client_t.value(), b"partial")
        pair.advance(1.5)
        self.assertFalse(s.client_t.aborted)
        pair.advance(1.0)
        self.assertTrue(s.client_t.aborted)  # the client socket is aborted (TCP RST), not closed with FIN
        self.assertEqual([r.code for r in pair.dialer.resets], [ErrorCode.SHUTTING_DOWN])
        self.assertTrue(s.backend_t.aborted)  # and so is the backend socket on the connector's side
        self.assertTrue(pair.proxy_io.disconnecting)
        self.assertTrue(s.proxy_stream.closed)
        self.assertEqual(pair.proxy.streams, {})



class ProxyMetricsTests(SynchronousTestCase):
    def test_open_latency_and_pending_opens(self) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.protocol import Factory, Protocol

        from connproxy.proxy.routing import Router

        clock = Clock()
        answer: Deferred[Any] = Deferred()

        class Tunnel:
            tenant, location, connector_id, load, routable = "t", "", "c", 0, True
            tunnel_id = "account:///t"

            def replaced(self) -> None:
                pass

            def open_stream(self, request: Any, factory: Any, early: bytes = b"", early_fin: bool = False) -> Deferred[Any]:
                return answer

        registry = ConnectorRegistry()
        registry.register(Tunnel())  # type: ignore[arg-type]
        metrics = ProxyMetrics(registry, clock=clock.seconds)
        d = Router(registry, metrics).endpoint(tenant="t", location="", host="h", port=1,
                                               meta={"via": "socks5"}).connect(Factory.forProtocol(Protocol))
        sample = metrics.prometheus.get_sample_value
        self.assertEqual(sample("connproxy_stream_opens_pending", {}), 1)
        clock.advance(0.3)
        answer.callback(Protocol())
        self.successResultOf(d)
        self.assertEqual(sample("connproxy_stream_opens_pending", {}), 0)
        self.assertEqual(sample("connproxy_stream_open_seconds_count", {"front_end": "socks5"}), 1)
        self.assertEqual(sample("connproxy_stream_open_seconds_bucket", {"front_end": "socks5", "le": "0.25"}), 0)
        self.assertEqual(sample("connproxy_stream_open_seconds_bucket", {"front_end": "socks5", "le": "0.5"}), 1)

    def test_client_bytes_count_live_and_finished_streams(self) -> None:
        from connproxy.wire.events import OpenRequest

        class Stream:
            def __init__(self, via: str, sent: int, received: int) -> None:
                self.request = OpenRequest("h", 1, "tcp", {"via": via})
                self.bytes_out = sent
                self.bytes_in = received

        metrics = ProxyMetrics(ConnectorRegistry())
        live = [Stream("http", 10, 100)]
        metrics.bytes.live = lambda: live
        metrics.bytes.stream_finished(Stream("http", 1, 2))
        sample = metrics.prometheus.get_sample_value
        self.assertEqual(sample("connproxy_client_bytes_total", {"front_end": "http", "direction": "in"}), 11)
        self.assertEqual(sample("connproxy_client_bytes_total", {"front_end": "http", "direction": "out"}), 102)
        metrics.bytes.stream_finished(live.pop())
        self.assertEqual(sample("connproxy_client_bytes_total", {"front_end": "http", "direction": "out"}), 102)


class ConnectorApplyTests(SynchronousTestCase):
    def test_access_control_applies_and_other_keys_are_named_for_a_restart(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from connproxy.connector.dialer import ConnectorService
        from connproxy.connector.service import ConnectorProcess

        reactor = MemoryReactorClock()
        old = connector()
        service = ConnectorService(reactor, old, endpoint_factory=lambda: None)  # type: ignore[arg-type,return-value]
        process = ConnectorProcess(old, reactor, connector=service)
        logs = Captured(self)
        new = connector(accessControl=[RULE], backend={"connectTimeoutSeconds": 3}, proxy={"port": 9000})
        process.apply_config(new)
        self.assertEqual(service.config.access_control, new.access_control)
        self.assertIs(service.dialer.config, service.config)
        self.assertIs(service.dialer.http.config, service.config)
        self.assertEqual(service.config.backend, old.backend)  # not applied
        self.assertEqual(service.config.proxy, old.proxy)
        warnings = [e for e in logs.events if e.get("log_level") == LogLevel.warn]
        [line] = warnings
        self.assertEqual(line["keys"], "proxy.port, backend.connectTimeoutSeconds")
        self.assertIn("need a restart", line["log_format"])
