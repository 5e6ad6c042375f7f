# -*- test-case-name: tests.unit.test_http_proxy -*-
"""h11 on a relay: the one module that touches h11 internals (the counted-body fast path) and so carries the
``h11<0.17`` pin of ``setup.cfg``. Used by the proxy's HTTP front end and the connector's HTTP gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h11
from twisted.logger import Logger

from connproxy.http.headers import Headers, escape_controls, header_list
from connproxy.relay import Relay

# ---------------------------------------------------------------------------------------------------- h11 relay

try:
    # h11's reader of a Content-Length body: the counted-body fast path of H11Relay lowers its count of the bytes
    # left. An internal class: without it (or the attributes used) the fast path stays off.
    from h11 import _readers

    _ContentLengthReader: Any = _readers.ContentLengthReader
except (ImportError, AttributeError):  # pragma: no cover - another h11
    _ContentLengthReader = None


def _fast_body_supported() -> bool:
    """Whether this h11 has the internals the counted-body fast path relies on."""
    if _ContentLengthReader is None:
        return False
    try:
        conn: Any = h11.Connection(h11.SERVER)
        reader: Any = _ContentLengthReader(1)
        return (
            reader._remaining == 1 and conn._reader is not None and not conn._receive_buffer
            and conn._receive_buffer_closed is False and conn.client_is_waiting_for_100_continue is False
        )
    except Exception:  # pragma: no cover - another h11
        return False


_FAST_BODY = _fast_body_supported()


def header_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    """The ``(lower-case name, value)`` pairs of an event's headers as a plain list.

    An ``h11.Headers`` iterates through ``Sequence.__iter__`` and ``__getitem__``, two Python calls per header; its
    ``_full_items`` (raw name, lower-case name, value) are read directly where this h11 has them.
    """
    items = getattr(headers, "_full_items", None)
    if type(items) is list:
        return [(name, value) for _raw, name, value in items]
    return header_list(headers)


class HttpError(Exception):
    """An answer of the proxy (or connector) itself: ``status`` with a short plain-text ``message``."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def send_event(conn: h11.Connection, transport: Any, event: h11.Event) -> None:
    """Serialize ``event`` with ``conn`` and write it to ``transport`` (body data is not copied).

    :raises h11.LocalProtocolError: the event does not fit the connection's state (a bug, or trailers on a
        non-chunked body).
    """
    chunks = conn.send_with_data_passthrough(event)
    if chunks and transport is not None:
        # h11 hands body data out as bytearrays; Twisted transports take bytes only.
        transport.writeSequence([c if type(c) is bytes else bytes(c) for c in chunks])


def error_response_events(
    status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = (), *, close: bool = False,
    head: bool = False, reason: bytes = b"",
) -> list[h11.Event]:
    """The h11 events of a short ``text/plain`` answer (without the body for a ``HEAD`` request); control
    characters in ``message`` are escaped (:func:`~connproxy.http.headers.escape_controls`)."""
    body = (escape_controls(message.rstrip("\n")) + "\n").encode("utf-8", "replace")
    head_fields: Headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *headers,
    ]
    if close:
        head_fields.append((b"connection", b"close"))
    response = h11.Response(status_code=status, headers=head_fields, reason=reason)
    if head:
        return [response, h11.EndOfMessage()]
    return [response, h11.Data(data=body), h11.EndOfMessage()]


class H11Relay(Relay):
    """A relay side that speaks HTTP/1.1 through an h11 connection until a protocol switch, then relays raw bytes.

    :meth:`dataReceived` feeds the h11 connection and :meth:`pump` hands each event to :meth:`handle_event`
    while :meth:`can_pump` allows it (a side waiting for routing keeps its events in h11's buffer; the
    transport is paused meanwhile). After :meth:`switch_to_raw` the side is a plain :class:`Relay`.
    """

    log = Logger()

    def __init__(self, conn: h11.Connection, peer: Relay | None = None) -> None:
        super().__init__(peer)
        self.conn = conn
        self.raw = False
        self._pumping = False

    def dataReceived(self, data: bytes) -> None:
        """Feed h11 (or relay raw bytes after a switch); the bytes of a counted body bypass h11's buffer."""
        if self.raw:
            super().dataReceived(data)
            return
        if _FAST_BODY and not self._pumping and self._pass_counted_body(data):
            return
        try:
            self.conn.receive_data(data)
        except RuntimeError:  # data after our side closed: nothing will read it
            return
        self.pump()

    def _pass_counted_body(self, data: bytes) -> bool:
        """The fast path for bytes of a ``Content-Length`` body: hand them on as one :class:`h11.Data` event of
        the very bytes read, without h11's buffer (which copies them twice) and its per-event state machine.

        Taken only where h11 would produce exactly that event: it reads a counted body (its reader is a
        ``ContentLengthReader`` with bytes left), nothing is buffered before ``data`` (so these are the next body
        bytes) and events may be taken now. h11's count of what is left is lowered by what passed, so h11 stays
        where it would be had it parsed them: it reports the end of the body (``EndOfMessage``, then the next
        cycle) and a body cut short at EOF (``RemoteProtocolError``) as ever, and bytes past the body go to it.
        Returns False (nothing done) where the ordinary path must be taken.
        """
        conn: Any = self.conn
        reader = conn._reader
        if type(reader) is not _ContentLengthReader:
            return False
        left: int = reader._remaining
        if not left or conn._receive_buffer or conn._receive_buffer_closed or self.transport is None or \
                not self.can_pump():
            return False
        if len(data) <= left:
            chunk, rest = data, b""
        else:
            chunk, rest = data[:left], data[left:]
        reader._remaining = left - len(chunk)
        if conn.their_role is h11.CLIENT:
            conn.client_is_waiting_for_100_continue = False  # as h11 does on request body data
        self._pumping = True
        try:
            self.handle_event(h11.Data(data=chunk))
        except Exception:
            self.log.failure("bug while handling an HTTP Data event")
            self.internal_error()
            failed = True
        else:
            failed = False
        finally:
            self._pumping = False
        if rest:
            try:
                conn.receive_data(rest)
            except RuntimeError:
                return True
        if not failed and (rest or not reader._remaining):
            self.pump()  # the end of the body (EndOfMessage) and whatever follows it
        return True

    def readConnectionLost(self) -> None:
        """The far end sent FIN: h11 learns it (a close-delimited body ends, a truncated one fails)."""
        if self.raw:
            super().readConnectionLost()
            return
        try:
            self.conn.receive_data(b"")
        except RuntimeError:
            return
        self.pump()

    def writeConnectionLost(self) -> None:
        """Our write side is shut (HTTP mode: the request or response was complete)."""
        if self.raw:
            super().writeConnectionLost()

    def can_pump(self) -> bool:
        """Hook: whether events may be taken from h11 now."""
        return True

    def pump(self) -> None:
        """Hand h11's events to :meth:`handle_event` until it needs data, pauses, or :meth:`can_pump` says stop."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self.raw and self.can_pump() and self.transport is not None:
                try:
                    event = self.conn.next_event()
                except h11.RemoteProtocolError as error:
                    self.protocol_error(error)
                    return
                if event is h11.NEED_DATA:
                    return
                if event is h11.PAUSED:
                    self.paused_by_h11()
                    return
                assert isinstance(event, h11.Event)
                try:
                    self.handle_event(event)
                except Exception:
                    self.log.failure("bug while handling an HTTP {event} event", event=type(event).__name__)
                    self.internal_error()
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
        finally:
            self._pumping = False

    def paused_by_h11(self) -> None:
        """h11 holds what follows the current message until the cycle ends: stop reading meanwhile."""
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()

    def handle_event(self, event: h11.Event) -> None:
        """Hook: one parsed event."""
        raise NotImplementedError

    def protocol_error(self, error: h11.RemoteProtocolError) -> None:
        """Hook: the far end broke HTTP/1.1."""
        raise NotImplementedError

    def internal_error(self) -> None:
        """Hook: handling an event failed (a bug, logged already); by default the connection is aborted."""
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def switch_to_raw(self) -> None:
        """After a protocol switch (CONNECT 2xx, 101): relay raw bytes, starting with what h11 read past the
        message. The side must be wired (or hold the bytes until it is)."""
        self.raw = True
        data, closed = self.conn.trailing_data
        if data:
            Relay.dataReceived(self, data)
        if closed:
            Relay.readConnectionLost(self)
        elif self.transport is not None:
            # h11 may have paused reading while the switch was pending (PAUSED).
            resume = getattr(self.transport, "resumeProducing", None)
            if resume is not None:
                resume()

