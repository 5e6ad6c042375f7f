"""A listening port as a service, for both roles: Twisted's ``StreamServerEndpointService``, which binds in
``privilegedStartService`` (so ``twistd --uid`` can drop privileges after binding) and raises a bind failure
from start-up, plus the bound port number and a log line naming the listener."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

log = Logger(namespace="connproxy.listener")


class Listener(StreamServerEndpointService):
    """Listens on ``endpoint`` with ``factory`` while running.

    :raises twisted.internet.error.CannotListenError: from ``privilegedStartService`` (or ``startService``) when
        the port cannot be bound.
    """

    def __init__(self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self._raiseSynchronously = True
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Bind now; a failure to bind is raised here."""
        self._raiseSynchronously = True
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)  # type: ignore[union-attr]

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address: Any = port.getHost()
        log.info("{name} listening on {host}:{port}", name=self.name, host=address.host, port=address.port)
        return port

    def stopService(self) -> Any:
        """Stop listening (connections that are open stay up)."""
        self.port = None
        return super().stopService()

    @property
    def port_number(self) -> int:
        """The bound port (useful with port 0)."""
        assert self.port is not None, "not listening"
        address: Any = self.port.getHost()
        return int(address.port)
