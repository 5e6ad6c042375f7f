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
from connproxy.wire.events import StreamAccepted, StreamReset
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
