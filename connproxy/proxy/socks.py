# -*- test-case-name: tests.unit.test_socks -*-
"""The SOCKS5 front end (default port 20004): RFC 1928 CONNECT plus SAP's authentication method 0x80.

Twisted glue around :class:`connproxy.wire.socks5.Socks5Server`: negotiate, authorize the caller (tenant), ask
the router for an endpoint to the requested virtual host and port through the connector of (tenant, location),
answer with the SAP reply code, and then relay with :class:`connproxy.relay.Relay`.

Answers: ``05 FF`` when no method fits; ``01 01`` for malformed method-0x80 data; reply 0x05 for a refused
token; 0x03 when no connector serves (tenant, location); 0x02 when the connector's access control refuses;
0x04 when the backend cannot be reached; 0x07/0x08 for unsupported commands and address types.
"""

from __future__ import annotations

from typing import Any, Unpack

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from connproxy.http.headers import escape_controls
from connproxy.nodelay import set_no_delay
from connproxy.obs import audit
from connproxy.proxy.frontend import Authorizing, FrontEndFactory, FrontEndOptions
from connproxy.proxy.replies import socks_reply_for
from connproxy.proxy.routing import Router
from connproxy.relay import Relay, RelayFactory, describe_transport
from connproxy.tunnel.stream import reset_transport
from connproxy.wire.errors import ErrorCode
from connproxy.wire.socks5 import (
    METHOD_NO_ACCEPTABLE,
    ConnectRequest,
    MethodsOffered,
    Reply,
    SapAuthRequest,
    Socks5Error,
    Socks5Server,
    Socks5State,
)


class Socks5Protocol(Relay):
    """One SOCKS5 client connection: negotiation, then a relay to a tunnel stream."""

    log = Logger()

    def __init__(self, factory: Socks5Factory) -> None:
        super().__init__()
        self.factory = factory
        self.parser = Socks5Server(max_token_bytes=factory.max_token_bytes)
        self._token: str | None = None
        self._location = ""
        self._auth: Deferred[Any] | None = None
        self._connect: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._target = ""
        self._tenant = ""
        self._shown_location = ""
        self._idle_mark = -1

    def connectionMade(self) -> None:
        """Set TCP_NODELAY and start the negotiation timeout (counted from the accept)."""
        set_no_delay(self.transport)
        self._timer = self.factory.clock.callLater(self.factory.handshake_timeout, self._timed_out)

    def _traffic(self) -> int:
        peer = self.peer
        return self.bytes_read + (peer.bytes_read if peer is not None else 0)

    def _idle_check(self) -> None:
        """Close a relayed connection with no traffic either way for a whole ``idleTimeoutSeconds`` period."""
        self._timer = None
        if self.transport is None or self._lost:
            return
        traffic = self._traffic()
        if traffic != self._idle_mark:
            self._idle_mark = traffic
            self._timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle_check)
            return
        self.log.info(
            "SOCKS5 {client} -> {target} idle for {timeout}s: closing", client=describe_transport(self.transport),
            target=self._target, timeout=self.factory.idle_timeout,
        )
        if self.peer is not None:
            # The stream is cut short by the timeout: RESET IDLE_TIMEOUT (spec section 4), not a FIN.
            reset_transport(self.peer.transport, ErrorCode.IDLE_TIMEOUT, f"idle for {self.factory.idle_timeout:g}s")
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        if not self.wired and self.transport is not None:
            self.log.info(
                "SOCKS5 client {client} did not finish negotiating within {timeout}s",
                client=describe_transport(self.transport), timeout=self.factory.handshake_timeout,
            )
            if self._connect is not None:
                self._connect.cancel()
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Negotiate until CONNECT succeeded; afterwards relay."""
        if self.wired:
            super().dataReceived(data)
            return
        if self.parser.state in (Socks5State.WAIT_CONNECT_DECISION, Socks5State.ESTABLISHED):
            self.hold(data)
            return
        if self.parser.state is Socks5State.CLOSED:
            return
        self._feed(data)

    def readConnectionLost(self) -> None:
        """FIN from the client: during the negotiation it gave up (close now, freeing its place at once); once
        its CONNECT is in, the FIN is relayed (held until the stream is open)."""
        if not self.wired and self.parser.state not in (Socks5State.WAIT_CONNECT_DECISION, Socks5State.ESTABLISHED):
            self._cancel_timer()
            if self.transport is not None:
                self.transport.loseConnection()
            return
        super().readConnectionLost()

    def _feed(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.parser.receive_data(data)
        except Socks5Error as e:
            self._refuse(e.reply_bytes, e.reason)
            return
        for event in events:
            if isinstance(event, MethodsOffered):
                method = self.parser.select_method(
                    event.methods, authorization_enabled=self.factory.authorization_enabled
                )
                self.transport.write(self.parser.method_reply(method))
                if method == METHOD_NO_ACCEPTABLE:
                    self._refuse(b"", f"no acceptable method among {sorted(event.methods)}")
                    return
                self._feed(b"")
                return
            if isinstance(event, SapAuthRequest):
                self._token = event.token or None
                self._location = event.location_id
                self._shown_location = escape_controls(event.location_id)
                self.transport.write(self.parser.auth_reply(True))
                self._feed(b"")
                return
            if isinstance(event, ConnectRequest):
                self._start_connect(event)
                return

    def _refuse(self, reply: bytes, reason: str) -> None:
        assert self.transport is not None
        self.log.info(
            "SOCKS5 client {client} refused: {reason}", client=describe_transport(self.transport),
            reason=escape_controls(reason),
        )
        if reply:
            self.transport.write(reply)
        self.transport.loseConnection()

    def _start_connect(self, request: ConnectRequest) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.hold(self.parser.take_trailing_data())
        self._target = escape_controls(f"{request.host}:{request.port}")
        d = self.factory.authorizer.authorize(proxy_token=self._token, service_token=self._token)
        self._connect = d
        d.addCallbacks(self._authorized, self._auth_failed, callbackArgs=(request,))
        d.addErrback(self._open_failed, request)

    def _auth_failed(self, failure: Failure) -> None:
        from twisted.internet.defer import CancelledError

        if failure.check(CancelledError):
            return  # the client left (or timed out) while being authorized: nothing was refused, nothing to audit
        reason = getattr(failure.value, "reason", "error")
        self.log.info(
            "SOCKS5 client {client} not authorized for {target}: {reason}",
            client=describe_transport(self.transport), target=self._target, reason=str(failure.value),
        )
        audit.proxy_call_refused(
            front_end="socks5", tenant=None, client_id=None, reason=str(reason),
            peer=describe_transport(self.transport), writer=self.factory.audit_writer,
        )
        self._reply_and_close(Reply.CONNECTION_REFUSED)

    def _authorized(self, caller: Any, request: ConnectRequest) -> Deferred[Any] | None:
        if self.transport is None or self.parser.state is Socks5State.CLOSED:
            return None
        endpoint = self.factory.router.endpoint(
            tenant=caller.tenant,
            location=self._location,
            host=request.host,
            port=request.port,
            kind="tcp",
            meta={"client": describe_transport(self.transport), "client_id": caller.client_id, "via": "socks5"},
        )
        self._tenant = escape_controls(caller.tenant)
        d = endpoint.connect(RelayFactory(self))
        self._connect = d
        d.addCallback(self._connected)
        return d

    def _connected(self, protocol: Any) -> None:
        self._connect = None
        self._cancel_timer()
        if self.transport is None:
            return
        self.transport.write(self.parser.connect_reply(Reply.SUCCEEDED))
        self._idle_mark = -1
        self._timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle_check)
        self.log.debug(
            "SOCKS5 {client} -> {target} (subaccount {tenant}, location {location}) connected",
            client=describe_transport(self.transport), target=self._target, tenant=self._tenant,
            location=self._shown_location or "(default)",
        )

    def _open_failed(self, failure: Failure, request: ConnectRequest) -> None:
        self._connect = None
        if self.transport is None or self.parser.state is Socks5State.CLOSED:
            return
        from twisted.internet.defer import CancelledError

        if failure.check(CancelledError):
            return
        reply = socks_reply_for(failure)
        self.log.info(
            "SOCKS5 {client} -> {target} (location {location}) failed: {error} (reply {reply})",
            client=describe_transport(self.transport), target=self._target,
            location=self._shown_location or "(default)",
            error=escape_controls(str(failure.value)), reply=f"{int(reply):#04x}",
        )
        self._reply_and_close(reply)

    def _reply_and_close(self, reply: Reply) -> None:
        if self.transport is None:
            return
        self.transport.write(self.parser.connect_reply(reply))
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Cancel a pending open (its stream is reset) and the timeout; close the relay peer; free the connection's
        place in the front end's limits."""
        self.factory.release(self)
        self._cancel_timer()
        pending, self._connect = self._connect, None
        if pending is not None:
            pending.cancel()
        super().connectionLost(reason)


class Socks5Factory(FrontEndFactory):
    """Builds :class:`Socks5Protocol` for the SOCKS5 listener.

    Connections over the limits of :class:`~connproxy.proxy.frontend.FrontEndFactory` are closed at accept
    without a byte.

    :param handshake_timeout: seconds a client has from connecting until its CONNECT is answered.
    :param max_token_bytes: the largest method-0x80 token accepted.
    """

    front_end = "socks5"

    def __init__(
        self,
        router: Router,
        authorizer: Authorizing,
        clock: IReactorTime,
        *,
        handshake_timeout: float = 30.0,
        max_token_bytes: int = 65536,
        **common: Unpack[FrontEndOptions],
    ) -> None:
        super().__init__(router, authorizer, clock, **common)
        self.handshake_timeout = handshake_timeout
        self.max_token_bytes = max_token_bytes

    def build(self, addr: IAddress | None) -> Socks5Protocol:
        """A new client connection within the limits."""
        return Socks5Protocol(self)
