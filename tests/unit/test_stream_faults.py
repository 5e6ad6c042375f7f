"""Faults stay in their stream: backend failures and exceptions while serving one stream reset that stream with
the right code and leave the tunnel and its other streams alone (connector side)."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from connproxy.config import AccessRule
from connproxy.connector.dialer import ConnectorService, ConnectorTunnel
from connproxy.connector.tcp import BackendDialer
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import OpenRequest, StreamAccepted, StreamReset
from tests.unit.test_connector import BackendEndpoint, EndpointFactory, FakeProxy, make_config


class ConnectorStreamFaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints: list[BackendEndpoint] = []
        self.config = make_config()
        factory = EndpointFactory("ok")
        self.service = ConnectorService(self.reactor, self.config, factory, audit_writer=lambda _line: None)
        self.service.startService()
        self.tunnel: ConnectorTunnel = factory.built[0].protocol
        self.proxy = FakeProxy(self.tunnel)
        self.proxy.handshake()

        def endpoint_for(rule: AccessRule, host: str, port: int) -> BackendEndpoint:
            endpoint = BackendEndpoint(rule, host, port)
            self.endpoints.append(endpoint)
            return endpoint

        self.service.dialer = BackendDialer(self.reactor, self.config, endpoint_for=endpoint_for,
                                            audit_writer=lambda _line: None)

    def resets(self) -> list[tuple[int, ErrorCode]]:
        return [(e.stream_id, e.code) for e in self.proxy.events if isinstance(e, StreamReset)]

    def test_backend_failing_mid_relay_resets_backend_reset(self) -> None:
        """A TCP backend that fails after ACCEPT makes the connector RESET ``BACKEND_RESET``, not ``CANCEL``."""
        stream_id = self.proxy.open()
        self.endpoints[0].succeed()
        self.assertIn(StreamAccepted(stream_id), self.proxy.exchange())
        protocol: Any = self.tunnel.streams[stream_id].protocol.peer  # type: ignore[union-attr]
        protocol.connectionLost(Failure(ierror.ConnectionLost("backend went away")))
        self.proxy.exchange()
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.BACKEND_RESET)])
        self.assertEqual(self.tunnel.streams, {})

    def test_backend_closing_cleanly_is_a_fin_not_a_reset(self) -> None:
        stream_id = self.proxy.open()
        self.endpoints[0].succeed()
        self.proxy.exchange()
        protocol: Any = self.tunnel.streams[stream_id].protocol.peer  # type: ignore[union-attr]
        protocol.readConnectionLost()
        self.proxy.exchange()
        self.assertEqual(self.resets(), [])
        self.assertIn(stream_id, self.tunnel.streams)


class ConnectorDispatchFaultTests(SynchronousTestCase):
    """An exception while serving one stream resets that stream; the tunnel and its other streams go on."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.config = make_config(accessControl=[
            {"virtualHost": "erp.internal", "virtualPort": 443, "internalHost": "10.1.1.1",
             "internalPort": 8443, "protocol": "TCP"},
            {"virtualHost": "tls.internal", "virtualPort": 443, "internalHost": "10.1.1.3",
             "internalPort": 8443, "protocol": "TCP_TLS", "caFile": "/nonexistent/connproxy-test-ca.pem"},
        ])
        factory = EndpointFactory("ok")
        self.service = ConnectorService(self.reactor, self.config, factory, audit_writer=lambda _line: None)
        self.service.startService()
        self.tunnel: ConnectorTunnel = factory.built[0].protocol
        self.proxy = FakeProxy(self.tunnel)
        self.proxy.handshake()
        self.endpoints: list[BackendEndpoint] = []

    def fake_backends(self, dialer: BackendDialer) -> None:
        real = dialer._endpoint_for

        def endpoint_for(rule: AccessRule, host: str, port: int) -> Any:
            if rule.protocol == "TCP_TLS":
                return real(rule, host, port)  # the real one: its CA file is missing
            endpoint = BackendEndpoint(rule, host, port)
            self.endpoints.append(endpoint)
            return endpoint

        dialer._endpoint_for = endpoint_for  # type: ignore[method-assign]

    def resets(self) -> list[tuple[int, ErrorCode]]:
        return [(e.stream_id, e.code) for e in self.proxy.events if isinstance(e, StreamReset)]

    def assert_tunnel_serves_another_stream(self) -> None:
        self.fake_backends(self.service.dialer)
        other = self.proxy.open()
        self.endpoints[-1].succeed()
        self.assertIn(StreamAccepted(other), self.proxy.exchange())
        self.assertFalse(self.tunnel.lost)
        self.assertFalse(self.proxy.transport.disconnecting)

    def test_exception_in_the_access_decision_resets_only_that_stream(self) -> None:
        import connproxy.connector.tcp as tcp

        original = tcp.decide

        def broken(config: Any, request: Any) -> Any:
            if request.host == "erp.internal" and request.meta.get("boom"):
                raise RuntimeError("injected")
            return original(config, request)

        self.patch(tcp, "decide", broken)
        stream_id = self.proxy.session.open_stream(
            OpenRequest("erp.internal", 443, "tcp", {"tenant": "tenant-a", "boom": True}))
        self.proxy.exchange()
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.INTERNAL_ERROR)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged once, with its traceback
        self.assertEqual(self.tunnel.streams, {})
        self.assert_tunnel_serves_another_stream()

    def test_exception_in_stream_opened_resets_only_that_stream(self) -> None:
        def broken(tunnel: Any, stream: Any) -> None:
            raise KeyError("injected")

        self.service.dialer.handle = broken  # type: ignore[method-assign]
        stream_id = self.proxy.open()
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.INTERNAL_ERROR)])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.service.dialer = BackendDialer(self.reactor, self.config, audit_writer=lambda _line: None)
        self.assert_tunnel_serves_another_stream()

    def test_missing_ca_file_of_a_tls_mapping_is_tls_error(self) -> None:
        """``backend_options`` raises FileNotFoundError for the missing caFile: TLS_ERROR (SOCKS 0x04), not a
        dead tunnel."""
        self.fake_backends(self.service.dialer)
        stream_id = self.proxy.open("tls.internal", 443)
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.TLS_ERROR)])
        (reset,) = [e for e in self.proxy.events if isinstance(e, StreamReset)]
        self.assertIn("tls.internal", reset.reason)
        self.assertIn("FileNotFoundError", reset.reason)
        self.assert_tunnel_serves_another_stream()

    def test_exception_in_the_relay_resets_only_that_stream(self) -> None:
        self.fake_backends(self.service.dialer)
        stream_id = self.proxy.open()
        backend = self.endpoints[0].succeed()
        self.proxy.exchange()
        near: Any = self.tunnel.streams[stream_id].protocol

        def broken(data: bytes) -> None:
            raise ValueError("injected")

        near.forward = broken
        self.proxy.session.send_data(stream_id, b"data")
        self.proxy.exchange()
        self.assertEqual(self.resets(), [(stream_id, ErrorCode.INTERNAL_ERROR)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(backend.aborted)  # the backend connection is cut, not closed as if complete
        self.assertEqual(self.tunnel.streams, {})
        self.assert_tunnel_serves_another_stream()
