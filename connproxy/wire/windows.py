"""Flow-control accounting of the tunnel protocol (``docs/tunnel-protocol.md`` 3.4), behind a small public API.

* :class:`SendCredit`: what this side may still send (one per stream, one for the session).
* :class:`StreamReceiveWindow`: the receive side of one stream: the credit the peer holds, the bytes received
  and not yet consumed by the application, the consumed bytes whose credit is not yet returned, and the stream's
  current window size (its *limit*), which grows while the application keeps up (auto-tuning).
* :class:`ConnectionReceiveWindow`: the receive side of the session: the credit the peer holds and the credit
  withheld for batching.
* :class:`WindowBudget`: the sum of all stream limits of a session, so that growing windows stay within the
  session's memory budget.

No I/O and no frames here: the session turns the increments these objects return into WINDOW_UPDATE frames.
"""

from __future__ import annotations

from connproxy.wire.errors import ErrorCode, ProtocolError

MAX_WINDOW = 2**31 - 1


class SendCredit:
    """Credit for sending: starts at the peer's announced window, shrinks by what is sent, grows by its updates.

    :ivar credit: bytes that may be sent now.
    """

    __slots__ = ("credit",)

    def __init__(self, initial: int) -> None:
        self.credit = initial

    def take(self, count: int) -> None:
        """``count`` bytes were sent (the caller checked ``count <= credit``)."""
        self.credit -= count

    def grant(self, increment: int, what: str) -> None:
        """Add a WINDOW_UPDATE's increment.

        :raises ProtocolError: ``FLOW_CONTROL_ERROR`` when the window would exceed 2**31-1.
        """
        self.credit += increment
        if self.credit > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"{what} send window overflow")


class WindowBudget:
    """The sum of the stream windows (limits) of one session, bounded by ``total`` for growth.

    Streams start at the initial window whatever the budget says (the peer may send that much at once); they grow
    beyond it only while the sum of all limits stays within ``total``.
    """

    __slots__ = ("total", "used")

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def available(self) -> int:
        """How much the stream limits may still grow in all."""
        return max(0, self.total - self.used)


class StreamReceiveWindow:
    """The receive side of one stream.

    :ivar available: bytes the peer may still send on the stream (its send credit, as we track it).
    :ivar unconsumed: bytes received and not yet consumed (passed on) by the application.
    :ivar pending: consumed bytes whose credit is not yet returned (batched).
    :ivar limit: the stream's current window: ``available + unconsumed + pending`` (never more).
    :ivar max_limit: how far auto-tuning may grow ``limit``.
    :ivar session_held: unconsumed bytes whose *session* credit is withheld (the session returns session credit
        on receipt while the tunnel's buffered total is small, else only once the bytes are consumed).
    """

    __slots__ = ("available", "unconsumed", "pending", "limit", "max_limit", "session_held", "_budget")

    def __init__(self, initial: int, max_limit: int, budget: WindowBudget) -> None:
        self.available = initial
        self.unconsumed = 0
        self.pending = 0
        self.limit = initial
        self.max_limit = max(initial, max_limit)
        self.session_held = 0
        self._budget = budget
        budget.used += initial

    def receive(self, count: int, stream_id: int) -> None:
        """``count`` DATA bytes arrived.

        :raises ProtocolError: ``FLOW_CONTROL_ERROR`` when they exceed the peer's credit.
        """
        if count > self.available:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream_id} receive window exceeded")
        self.available -= count
        self.unconsumed += count

    def consume(self, count: int) -> int:
        """The application passed ``count`` bytes on; returns how many were really outstanding (at most
        ``unconsumed``: an over-acknowledgement must not hand the peer credit beyond the window)."""
        count = min(count, self.unconsumed)
        self.unconsumed -= count
        self.pending += count
        return count

    def release_session_credit(self, consumed: int) -> int:
        """Session credit withheld for bytes of this stream that may go back now that ``consumed`` bytes were
        consumed (at most what is held, and never more held than unconsumed)."""
        released = min(consumed, self.session_held)
        self.session_held -= released
        return released

    def take_update(self) -> int:
        """The increment to send now in a WINDOW_UPDATE, or 0 to keep batching.

        Credit goes back once half the window is pending. Auto-tuning: if at that moment the application keeps up
        (nothing of the window waits unconsumed) and the peer has used most of its credit (the window, not the
        reader, limits the transfer), the window doubles, up to ``max_limit`` and within the session's budget.
        A stalled reader consumes nothing, so its stream never grows and never gets credit back.
        """
        if self.pending < self.limit >> 1:
            return 0
        growth = 0
        if self.limit < self.max_limit and self.unconsumed <= self.limit >> 3:
            growth = min(self.limit, self.max_limit - self.limit, self._budget.available())
            if growth > 0:
                self.limit += growth
                self._budget.used += growth
        increment = self.pending + growth
        self.pending = 0
        self.available += increment
        return increment

    def release(self) -> None:
        """The stream is gone: give its window back to the session's budget."""
        self._budget.used -= self.limit
        self.limit = 0


class ConnectionReceiveWindow:
    """The receive side of the session.

    :ivar available: bytes the peer may still send on the session.
    :ivar pending: credit ready to return, withheld for batching.
    :ivar size: the announced session window.
    """

    __slots__ = ("available", "pending", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.available = size
        self.pending = 0

    def receive(self, count: int) -> None:
        """``count`` DATA bytes arrived on some stream.

        :raises ProtocolError: ``FLOW_CONTROL_ERROR`` when they exceed the peer's session credit.
        """
        if count > self.available:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "session receive window exceeded")
        self.available -= count

    def credit(self, count: int) -> None:
        """``count`` bytes' session credit may go back (sent by :meth:`take_update`)."""
        self.pending += count

    def take_update(self) -> int:
        """The increment to send now, or 0 to keep batching.

        Batched at a quarter of the window, but flushed as soon as the peer has less session credit left than we
        withhold, so that batching can never stall the peer.
        """
        if self.pending > 0 and (self.pending >= self.size >> 2 or self.pending >= self.available):
            increment, self.pending = self.pending, 0
            self.available += increment
            return increment
        return 0
