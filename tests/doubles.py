"""Test doubles shared by the unit tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport


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
