# -*- test-case-name: tests.unit.test_tunnel -*-
"""The proxy's end of connector tunnels: the TLS listener protocol on the tunnel port (default 8042).

The first bytes decide what a connection is: the tunnel preface starts a tunnel; anything else is read as an
HTTP/1.1 request, for ``GET /healthcheck`` (which needs no client certificate). A tunnel must present a connector
certificate signed by the connector CA; its identity (subaccount, optionally location) comes from the
certificate, never from the handshake alone.

An HTTP/1.1 ``Upgrade: connproxy-tunnel/1`` request turns the connection into a tunnel as well (path-routing
ingresses, see :mod:`connproxy.proxy.upgrade`); on the plain ingress listener the certificate comes from a
header the trusted ingress sets. With several replicas, the HELLO reply and later REPLICAS frames announce the
replica set (:mod:`connproxy.proxy.replicas`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
from cryptography import x509
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from connproxy.config import IngressListenerConfig
from connproxy.obs import audit
from connproxy.pki.certs import CertificateIdentityError, ConnectorIdentity
from connproxy.pki.tls import peer_identity
from connproxy.proxy.registry import ConnectorRegistry, TunnelLimitError
from connproxy.proxy.replicas import ReplicaSet
from connproxy.proxy.upgrade import UPGRADE_TOKEN, decide_upgrade, is_upgrade_request
from connproxy.tunnel.connection import TunnelConnection, TunnelTimers
from connproxy.tunnel.settings import CAPABILITIES
from connproxy.tunnel.stream import TunnelStream
from connproxy.wire.errors import ErrorCode
from connproxy.wire.events import HelloReceived
from connproxy.wire.frames import PREFACE
from connproxy.wire.session import Role, Settings

MAX_CONNECTOR_ID = 128

_REASONS = {
    200: b"OK", 302: b"Found", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 421: b"Misdirected Request",
}


class ProxyTunnel(TunnelConnection):
    """A tunnel from one connector, or a health-check request on the same port."""

    log = Logger()

    def __init__(self, factory: ProxyTunnelFactory) -> None:
        super().__init__(Role.LISTENER, factory.settings, factory.clock, factory.timers)
        self.factory = factory
        self.tenant = ""
        self.location = ""
        self.connector_id = ""
        self._sniffed = b""
        self._mode: str | None = None
        self._health: h11.Connection | None = None
        self._registered = False
        #: Accepted on the plain ingress listener: the identity comes from a forwarded certificate.
        self.via_ingress = False
        self.forwarded_identity: ConnectorIdentity | None = None

    # ------------------------------------------------------------------ registry view

    @property
    def load(self) -> int:
        """Open streams on this tunnel."""
        return len(self.streams)

    @property
    def routable(self) -> bool:
        """True while new streams may be routed here."""
        s = self.session
        return s.ready and not self.lost and not s.remote_goaway and not s.local_goaway and not s.terminated

    @property
    def tunnel_id(self) -> str:
        """SAP's tunnel identifier form, ``account:///<subaccount>``."""
        return f"account:///{self.tenant}"

    def replaced(self) -> None:
        """A newer tunnel of the same connector took over: GOAWAY REPLACED, close once the streams are done."""
        self._registered = False
        self.drain(ErrorCode.REPLACED, "replaced by a newer tunnel of the same connector",
                   grace=self.factory.replaced_grace)

    def drain(
        self, code: ErrorCode = ErrorCode.SHUTTING_DOWN, reason: str = "proxy shutting down",
        grace: float | None = None,
    ) -> None:
        """Take no new streams; close when the last stream ends (see :meth:`TunnelConnection.drain`)."""
        super().drain(code, reason, grace)

    # ------------------------------------------------------------------ sniffing

    def dataReceived(self, data: bytes) -> None:
        """Decide between tunnel and HTTP on the first bytes, then hand over."""
        if self._mode == "tunnel":
            super().dataReceived(data)
            return
        if self._mode == "http":
            self._health_data(data)
            return
        self._sniffed += data
        head = self._sniffed[: len(PREFACE)]
        if PREFACE.startswith(head) and len(self._sniffed) < len(PREFACE):
            return
        data, self._sniffed = self._sniffed, b""
        if head == PREFACE:
            self._mode = "tunnel"
            super().dataReceived(data)
        else:
            self._mode = "http"
            self.stop_tunnel_timers()
            self._health = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
            self._health_data(data)

    def _health_data(self, data: bytes) -> None:
        assert self._health is not None and self.transport is not None
        conn = self._health
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._health_reply(e.error_status_hint, b"bad request\n")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                path = event.target.split(b"?", 1)[0]
                if is_upgrade_request(event):
                    self._upgrade(event)
                elif event.method not in (b"GET", b"HEAD"):
                    self._health_reply(405, b"method not allowed\n")
                elif path == b"/healthcheck":
                    self._health_reply(200, b"OK\n", head=event.method == b"HEAD")
                elif path == b"/":
                    self._health_reply(302, b"", location=b"/healthcheck")
                else:
                    self._health_reply(404, b"not found\n")
                return
            if isinstance(event, h11.ConnectionClosed):
                self.close_transport()
                return

    def _upgrade(self, request: h11.Request) -> None:
        """Switch to the tunnel after ``101``, or refuse (and audit an identity refusal)."""
        assert self._health is not None and self.transport is not None
        factory = self.factory
        peer = self.describe_peer()
        ingress = factory.ingress
        verdict = decide_upgrade(
            request, factory.replicas, via_ingress=self.via_ingress, peer_host=getattr(self.peer_address(), "host", ""),
            certificate_header=ingress.client_certificate_header if ingress else "ssl-client-cert",
            trusted_sources=ingress.trusted_sources if ingress else (), client_cas=factory.client_cas,
        )
        if verdict.status != 101:
            self.log.warn("tunnel upgrade from {peer} refused: {status} {reason}", peer=peer, status=verdict.status,
                          reason=verdict.reason)
            if verdict.audit:
                audit.tunnel_handshake(False, tenant=None, connector_id=None, location=None, reason=verdict.reason,
                                       peer=peer, writer=factory.audit_writer)
            self._health_reply(verdict.status, verdict.reason.encode("utf-8", "replace") + b"\n")
            return
        conn = self._health
        out = conn.send(h11.InformationalResponse(
            status_code=101, headers=[(b"connection", b"Upgrade"), (b"upgrade", UPGRADE_TOKEN)],
            reason=b"Switching Protocols")) or b""
        leftover, _closed = conn.trailing_data
        self.transport.write(out)
        self._health = None
        self._mode = "tunnel"
        self.forwarded_identity = verdict.identity
        self.start_tunnel_timers()
        if leftover:
            super().dataReceived(bytes(leftover))

    def connector_identity(self) -> ConnectorIdentity | None:
        """The identity to check the HELLO against: the forwarded certificate's, else the TLS peer's.

        :raises CertificateIdentityError: the certificate carries no well-formed connector identity.
        """
        if self.via_ingress:
            return self.forwarded_identity  # never the transport's: the ingress listener speaks plain TCP
        return peer_identity(self.transport)

    def _health_reply(self, status: int, body: bytes, head: bool = False, location: bytes | None = None) -> None:
        assert self._health is not None and self.transport is not None
        conn = self._health
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if location is not None:
            headers.append((b"location", location))
        try:
            out = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))) or b""
            if body and not head:
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # no complete request to answer (a timeout, a broken request)
            out = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
                status, _REASONS.get(status, b""), len(body), body
            )
        self.transport.write(out)
        self.close_transport()
        self.handshake_done()

    # ------------------------------------------------------------------ tunnel handshake

    def _handshake_timed_out(self) -> None:
        """An HTTP request on the tunnel port that is not complete in time gets 408; a tunnel its GOAWAY."""
        if self._mode == "http" and self._health is not None:
            self._handshake_timer = None
            self._health_reply(408, b"request timeout\n")
            return
        super()._handshake_timed_out()

    def hello_received(self, event: HelloReceived) -> None:
        """Check the connector's identity against its certificate; register it, or refuse and audit."""
        hello = event.hello
        connector_id = hello.get("connector_id")
        claimed_tenant = hello.get("subaccount")
        claimed_location = hello.get("location")
        peer = self.describe_peer()
        try:
            identity = self.connector_identity()
        except CertificateIdentityError as e:
            self._refuse(str(e), str(connector_id), str(claimed_tenant), peer)
            return
        if identity is None:
            self._refuse("client certificate required", str(connector_id), str(claimed_tenant), peer)
            return
        if not isinstance(connector_id, str) or not connector_id or len(connector_id) > MAX_CONNECTOR_ID:
            self._refuse("HELLO without a valid connector_id", "", identity.subaccount, peer)
            return
        if claimed_tenant != identity.subaccount:
            self._refuse(
                f"certificate binds subaccount {identity.subaccount!r}, handshake claims {claimed_tenant!r:.80}",
                connector_id, identity.subaccount, peer,
            )
            return
        if claimed_location is not None and not isinstance(claimed_location, str):
            self._refuse("HELLO location is not a string", connector_id, identity.subaccount, peer)
            return
        if identity.location is not None:
            if claimed_location is not None and claimed_location != identity.location:
                self._refuse(
                    f"certificate binds location {identity.location!r}, handshake claims {claimed_location!r:.80}",
                    connector_id, identity.subaccount, peer,
                )
                return
            location = identity.location
        else:
            location = claimed_location or ""
        self.tenant = identity.subaccount
        self.location = location
        self.connector_id = connector_id
        try:
            # The certificate identity: a certificate binding no location counts once over all locations.
            self.factory.registry.register(self, identity=(identity.subaccount, identity.location))
        except TunnelLimitError as e:
            self._refuse(str(e), connector_id, identity.subaccount, peer, ErrorCode.TOO_MANY_TUNNELS)
            return
        reply: dict[str, Any] = {
            "replica_id": self.factory.replica_id,
            "tunnel_id": self.tunnel_id,
            "capabilities": list(CAPABILITIES),
        }
        if self.factory.replicas is not None:
            reply["high_availability_mode"] = self.factory.replicas.mode
            reply["replicas"] = self.factory.replicas.announcement()
        self.session.send_hello(reply)
        self.handshake_done()
        self._flush(force=True)
        self._registered = True
        self.log.info(
            "connector {connector_id} registered for subaccount {tenant} location {location} from {peer}",
            connector_id=connector_id, tenant=self.tenant, location=location or "(default)", peer=peer,
        )
        audit.tunnel_handshake(
            True, tenant=self.tenant, connector_id=connector_id, location=location, reason=None, peer=peer,
            writer=self.factory.audit_writer,
        )

    def _refuse(
        self, reason: str, connector_id: str, tenant: str, peer: str, code: ErrorCode = ErrorCode.AUTH_FAILED
    ) -> None:
        self.log.warn(
            "tunnel handshake refused for connector {connector_id} from {peer}: {reason}",
            connector_id=connector_id, peer=peer, reason=reason,
        )
        audit.tunnel_handshake(
            False, tenant=tenant, connector_id=connector_id, location=None, reason=reason, peer=peer,
            writer=self.factory.audit_writer,
        )
        self.fail(code, reason)

    def stream_finished(self, stream: TunnelStream) -> None:
        """Forget ``stream`` and hand it to the factory's ``on_stream_finished`` (the byte counters)."""
        super().stream_finished(stream)
        hook = self.factory.on_stream_finished
        if hook is not None:
            hook(stream)

    def tunnel_lost(self, reason: Failure | None) -> None:
        """Deregister at once, so that a reconnecting connector is not refused or shadowed."""
        if self.connector_id and self.session.ready:
            self.factory.registry.unregister(self)
            self.log.info(
                "tunnel of connector {connector_id} (subaccount {tenant}, location {location}) closed",
                connector_id=self.connector_id, tenant=self.tenant, location=self.location or "(default)",
            )
        self.factory.tunnels.discard(self)


class ProxyTunnelFactory(Factory):
    """Builds :class:`ProxyTunnel` protocols sharing one registry."""

    def __init__(
        self,
        registry: ConnectorRegistry,
        clock: IReactorTime,
        settings: Settings | None = None,
        timers: TunnelTimers | None = None,
        replica_id: str = "0",
        audit_writer: audit.AuditWriter | None = None,
        replicas: ReplicaSet | None = None,
        ingress: IngressListenerConfig | None = None,
        client_cas: list[x509.Certificate] | None = None,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.settings = settings or Settings()
        self.timers = timers or TunnelTimers()
        self.replica_id = replica_id
        self.audit_writer = audit_writer
        self.tunnels: set[ProxyTunnel] = set()
        #: Called with every stream that finished (set by the service for its metrics).
        self.on_stream_finished: Callable[[TunnelStream], None] | None = None
        #: The replica set announced to connectors (``None`` with ``highAvailabilityMode: off``).
        self.replicas = replicas
        #: The plain ingress listener's settings (forwarded certificate header, trusted sources).
        self.ingress = ingress
        #: The connector CAs, to check forwarded certificates.
        self.client_cas = client_cas or []
        #: Seconds a replaced tunnel may keep draining its streams before it is closed (``None``: no limit).
        self.replaced_grace: float | None = None
        if replicas is not None:
            self.replica_id = replicas.me.name
            replicas.add_listener(self._replicas_changed)

    def _replicas_changed(self, replicas: ReplicaSet) -> None:
        """Tell every connected connector (REPLICAS frame)."""
        announcement = replicas.announcement()
        for tunnel in list(self.tunnels):
            if tunnel.connector_id and tunnel.session.ready:
                tunnel.send_replicas(announcement)

    def ingress_factory(self) -> Factory:
        """A factory for the plain ingress listener: the same tunnels, marked as arriving through the ingress."""
        return _IngressFactory(self)

    def buildProtocol(self, addr: IAddress | None) -> ProxyTunnel:
        """A new connection on the tunnel port."""
        tunnel = ProxyTunnel(self)
        tunnel.factory = self
        self.tunnels.add(tunnel)
        return tunnel


class _IngressFactory(Factory):
    """Builds tunnels of the plain ingress listener through the main factory (one set of tunnels to drain)."""

    def __init__(self, main: ProxyTunnelFactory) -> None:
        self.main = main

    def buildProtocol(self, addr: IAddress | None) -> ProxyTunnel:
        """A new connection on the ingress port."""
        tunnel = self.main.buildProtocol(addr)
        tunnel.via_ingress = True
        return tunnel
