"""TCP_NODELAY on the sockets connproxy owns, both roles.

Every connproxy socket carries request/response traffic whose messages are written whole (a frame, an HTTP
head plus body, a metrics page). With Nagle's algorithm on, a second small write waits for the ACK of the
first, and Linux delays that ACK by up to 40 ms: a POST whose head and body leave in two writes took 44 ms
on loopback. :func:`set_no_delay` turns Nagle off on a connected transport (plain TCP, or TLS over TCP);
:class:`NoDelaySite` is a ``twisted.web`` ``Site`` whose connections do the same (metrics endpoints), and
:func:`no_delay_agent` a ``twisted.web`` ``Agent`` whose connections do (the proxy's token key fetches).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer


def set_no_delay(transport: Any) -> bool:
    """Set TCP_NODELAY on ``transport``'s socket; True if it was set.

    A transport without ``setTcpNoDelay`` (a tunnel stream, a test double) or a socket that refuses the
    option (already closed: ``OSError``) is left alone; nothing is raised. TLS transports
    (``TLSMemoryBIOProtocol``) pass the call on to the TCP transport beneath them.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        return False
    try:
        setter(True)
    except OSError:
        return False
    return True


class NoDelayChannel(HTTPChannel):
    """An HTTP/1.1 server channel with TCP_NODELAY on its socket."""

    def connectionMade(self) -> None:
        """Turn Nagle off, then start as any channel."""
        set_no_delay(self.transport)
        super().connectionMade()


class NoDelaySite(Site):
    """A ``Site`` whose connections have TCP_NODELAY (HTTP/1.1 only: no HTTP/2 negotiation).

    Twisted 24.10 and later set it in ``HTTPChannel`` too; ``setup.cfg`` admits older releases.
    """

    protocol = NoDelayChannel  # type: ignore[assignment]  # Twisted types it as the HTTP/2-negotiating wrapper


@implementer(IStreamClientEndpoint)
class NoDelayEndpoint:
    """A client endpoint whose connections get TCP_NODELAY once connected (``inner`` makes them)."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """Connect through ``inner``; fires with the protocol, its socket's Nagle turned off."""

        def no_delay(protocol: Any) -> Any:
            set_no_delay(getattr(protocol, "transport", None))
            return protocol

        return self.inner.connect(protocolFactory).addCallback(no_delay)


@implementer(IAgentEndpointFactory)
class NoDelayAgentEndpoints:
    """The endpoints an ``Agent`` connects with, as Twisted's own make them (``HostnameEndpoint``, TLS with
    ``BrowserLikePolicyForHTTPS`` for ``https``: the system trust store, the host name checked), with
    TCP_NODELAY."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.policy = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> NoDelayEndpoint:
        """The endpoint for ``uri``'s host and port (TLS for ``https``)."""
        endpoint: Any = HostnameEndpoint(self.reactor, uri.host, uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return NoDelayEndpoint(endpoint)


def no_delay_agent(reactor: Any) -> Agent:
    """An ``Agent`` on ``reactor`` whose connections have TCP_NODELAY (see :class:`NoDelayAgentEndpoints`).

    Recent Twisted sets it in its HTTP client too; ``setup.cfg`` admits releases that do not (as for
    :class:`NoDelaySite`)."""
    return Agent.usingEndpointFactory(reactor, NoDelayAgentEndpoints(reactor))
