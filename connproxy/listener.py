"""A listening port as a service, for both roles: Twisted's ``StreamServerEndpointService``, which binds in
``privilegedStartService`` (so ``twistd --uid`` can drop privileges after binding) and raises a bind failure
from start-up, plus the bound port number and a log line naming the listener."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from connproxy.config import describe_bind_error

log = Logger(namespace="connproxy.listener")


class ListenError(CannotListenError):
    """A listener could not bind: a :class:`CannotListenError` that also names the configuration key of its port.

    ``str(error)`` is one line for the user: ``<key>: port 8042 is already in use (0.0.0.0:8042)``.
    """

    def __init__(self, config_key: str, error: CannotListenError) -> None:
        super().__init__(error.interface, error.port, error.socketError)
        self.config_key = config_key

    def __str__(self) -> str:
        socket_error: Any = self.socketError
        address = self.interface or "0.0.0.0"
        problem = describe_bind_error(address, self.port, getattr(socket_error, "errno", None),
                                      getattr(socket_error, "strerror", None) or str(socket_error))
        return f"{self.config_key}: {problem}"


class Listener(StreamServerEndpointService):
    """Listens on ``endpoint`` with ``factory`` while running.

    :param config_key: the configuration key of the port (``servers.proxy.http.port``), named in a bind failure.
    :raises ListenError: from ``privilegedStartService`` (or ``startService``) when the port cannot be bound (a
        :class:`~twisted.internet.error.CannotListenError` naming ``config_key``, else the listener's name).
    """

    def __init__(self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory,
                 config_key: str | None = None) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self.config_key = config_key
        self._raiseSynchronously = True
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Bind now; a failure to bind is raised here (:class:`ListenError`)."""
        self._raiseSynchronously = True
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise ListenError(self.config_key or str(self.name), error) from error
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
