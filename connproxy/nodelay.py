"""TCP_NODELAY on the sockets connproxy owns, both roles.

Every connproxy socket carries request/response traffic whose messages are written whole (a frame, an HTTP
head plus body, a metrics page). With Nagle's algorithm on, a second small write waits for the ACK of the
first, and Linux delays that ACK by up to 40 ms: a POST whose head and body leave in two writes took 44 ms
on loopback. :func:`set_no_delay` turns Nagle off on a connected transport (plain TCP, or TLS over TCP);
:class:`NoDelaySite` is a ``twisted.web`` ``Site`` whose connections do the same (metrics endpoints).
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.server import Site


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
