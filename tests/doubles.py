"""Test doubles shared by the unit tests."""

from __future__ import annotations

from typing import Any

import h11
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from connproxy.proxy.auth import Caller


class HalfCloseTransport(StringTransport):
    """``StringTransport`` plus what a TCP socket has and the relay uses: ``loseWriteConnection`` (counted in
    ``write_closed``) and ``abortConnection`` (recorded in ``aborted``)."""

    def __init__(self, peerAddress: Any = None) -> None:
        super().__init__(peerAddress=peerAddress)
        self.write_closed = 0
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed += 1

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


# ------------------------------------------------------------------------------------------------ front ends


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """What :meth:`FakeRouter.endpoint` hands a front end: ``connect()`` returns :attr:`deferred`, which the test
    fires with :meth:`accept` (the connector accepted) or errbacks; cancelling it is recorded in
    :attr:`cancelled` and in the router's ``cancelled`` list."""

    def __init__(self, router: FakeRouter, kwargs: dict[str, Any]) -> None:
        self.router = router
        self.kwargs = kwargs
        self.cancelled = False
        self.factory: Any = None
        #: The early bytes and FIN the front end handed to ``connect`` (sent behind the OPEN by a real tunnel).
        self.early: tuple[bytes, bool] = (b"", False)
        self.deferred: Deferred[Any] = Deferred(self._cancelled)

    @property
    def d(self) -> Deferred[Any]:
        """:attr:`deferred` (short name)."""
        return self.deferred

    def _cancelled(self, _d: Deferred[Any]) -> None:
        self.cancelled = True
        self.router.cancelled.append(self.kwargs)

    def connect(self, factory: IProtocolFactory, early: bytes = b"", early_fin: bool = False) -> Deferred[Any]:
        self.factory = factory
        self.early = (early, early_fin)
        return self.deferred

    def accept(self, transport: HalfCloseTransport | None = None) -> tuple[Any, HalfCloseTransport]:
        """The stream is open: build the stream side, connect it to ``transport`` (a fake stream), fire. Early
        bytes given to ``connect`` are in the transport first (and its write side closed after them when the
        FIN went with them), as a real tunnel stream would have sent them."""
        protocol = self.factory.buildProtocol(None)
        transport = transport or HalfCloseTransport()
        early, fin = self.early
        if early:
            transport.write(early)
        if fin:
            transport.loseWriteConnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.deferred.callback(protocol)
        return protocol, transport


class FakeRouter:
    """Records every endpoint a front end asked for (:attr:`endpoints`) and the cancelled ones' arguments."""

    def __init__(self) -> None:
        self.endpoints: list[FakeEndpoint] = []
        self.cancelled: list[dict[str, Any]] = []

    def endpoint(self, **kwargs: Any) -> FakeEndpoint:
        endpoint = FakeEndpoint(self, kwargs)
        self.endpoints.append(endpoint)
        return endpoint


class FakeAuthorizer:
    """Authorizes everyone as ``tenant`` (a verified caller of client ``sb-app``), fails with ``error``, or, with
    ``manual``, returns Deferreds the test fires (:attr:`pending`). Every call is recorded in :attr:`calls`."""

    def __init__(self, error: Exception | None = None, tenant: str = "tenant-a", manual: bool = False) -> None:
        self.error = error
        self.tenant = tenant
        self.manual = manual
        self.calls: list[tuple[str | None, str | None]] = []
        self.pending: list[Deferred[Any]] = []

    def caller(self) -> Caller:
        return Caller(tenant=self.tenant, client_id="sb-app", subject=None, verified=True)

    def authorize(self, *, proxy_token: str | None, service_token: str | None = None) -> Deferred[Any]:
        self.calls.append((proxy_token, service_token))
        if self.error is not None:
            return fail(self.error)
        if self.manual:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.caller())


def h11_events(conn: h11.Connection, raw: bytes) -> list[h11.Event]:
    """Feed ``raw`` to ``conn`` and drain every event it yields (up to ``NEED_DATA`` or ``PAUSED``)."""
    conn.receive_data(raw)
    events: list[h11.Event] = []
    while True:
        event = conn.next_event()
        if event in (h11.NEED_DATA, h11.PAUSED):
            return events
        events.append(event)  # type: ignore[arg-type]
