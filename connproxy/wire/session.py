"""The tunnel session: a sans-IO state machine for one tunnel connection (``docs/tunnel-protocol.md``).

Feed received bytes to :meth:`Session.receive_data`, act on the events it returns, and write what
:meth:`Session.take_output` returns. Commands (``open_stream``, ``send_data``, ``acknowledge`` ...) queue frames.
The session has no clock and does no I/O; keepalive and timeouts are the caller's timers.

Flow control (spec section 3.4): received DATA is only credited back once the application calls
:meth:`Session.acknowledge` for it, i.e. once it has passed the bytes on.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from connproxy.wire import frames as f
from connproxy.wire.errors import ErrorCode, OpenTooLargeError, ProtocolError, StreamStateError
from connproxy.wire.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    OpenRequest,
    PingAcknowledged,
    ReplicasReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from connproxy.wire.streams import REMOTE_CLOSED, Outcome, StreamEvent, StreamState, transition
from connproxy.wire.windows import ConnectionReceiveWindow, SendCredit, StreamReceiveWindow, WindowBudget

SUPPORTED_VERSIONS = (1,)
#: GOAWAY codes that drain (streams go on) rather than end the session at once.
_DRAIN_CODES = frozenset({ErrorCode.NORMAL, ErrorCode.SHUTTING_DOWN, ErrorCode.REPLACED})
MAX_CONTROL_BACKLOG = 1 << 20
#: The reason of the REFUSED_STREAM reset a session reports for streams a GOAWAY declared unprocessed.
UNPROCESSED_REASON = "not processed by the peer (GOAWAY)"

_DATA = f.FrameType.DATA
_pack_header = f.HEADER.pack
_FV = f.FRAMING_VERSION
#: ``json.dumps(value, separators=(",", ":"))`` without building an encoder per call (one OPEN per request).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


class Role(enum.Enum):
    """Which end of the transport this session is: the dialer (connector) or the listener (proxy)."""

    DIALER = "dialer"
    LISTENER = "listener"


#: The one set of tunnel tuning defaults (spec section 6); the ``tunnel`` configuration block and the Twisted
#: glue take theirs from here.
DEFAULT_STREAM_WINDOW: Final = 4 * 1024 * 1024
#: Every stream starts with this receive window (or the stream window, if smaller) and grows towards the stream
#: window only while its reader keeps up (spec 3.4, auto-tuning).
DEFAULT_INITIAL_STREAM_WINDOW: Final = 256 * 1024
DEFAULT_CONNECTION_WINDOW: Final = 64 * 1024 * 1024
DEFAULT_MAX_FRAME: Final = 65536
DEFAULT_MAX_STREAMS: Final = 10000
DEFAULT_PING_INTERVAL_SECONDS: Final = 10.0
DEFAULT_DEAD_AFTER_SECONDS: Final = 30.0
DEFAULT_OPEN_TIMEOUT_SECONDS: Final = 15.0


@dataclass(frozen=True, slots=True)
class Settings:
    """What this side accepts (announced in HELLO). See spec section 6 for the defaults.

    ``stream_window`` is the largest a stream's receive window grows to; ``initial_stream_window`` (default: 256 KiB,
    or ``stream_window`` if smaller) is where every stream starts, and what HELLO announces as ``stream_window``.
    """

    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_streams: int = DEFAULT_MAX_STREAMS
    initial_stream_window: int = 0
    #: Local policy, not announced: received bytes the session may buffer with their session credit returned at
    #: once (spec 3.4); -1 means half the session window, 0 returns session credit only on acknowledgement.
    buffer_budget: int = -1

    def __post_init__(self) -> None:
        if not 1 <= self.stream_window <= f.MAX_WINDOW:
            raise ValueError("stream_window out of range")
        if self.initial_stream_window == 0:
            object.__setattr__(
                self, "initial_stream_window", min(DEFAULT_INITIAL_STREAM_WINDOW, self.stream_window)
            )
        if not 1 <= self.initial_stream_window <= self.stream_window:
            raise ValueError("initial_stream_window must be between 1 and stream_window")
        if self.buffer_budget < 0:
            object.__setattr__(self, "buffer_budget", self.connection_window >> 1)
        if not self.stream_window <= self.connection_window <= f.MAX_WINDOW:
            raise ValueError("connection_window must be at least stream_window and at most 2**31-1")
        if not f.MIN_MAX_FRAME <= self.max_frame <= f.MAX_MAX_FRAME:
            raise ValueError("max_frame out of range")
        if self.max_streams < 1:
            raise ValueError("max_streams must be positive")

    def to_json(self) -> dict[str, int]:
        """The ``settings`` object of a HELLO."""
        return {
            "stream_window": self.initial_stream_window,
            "connection_window": self.connection_window,
            "max_frame": self.max_frame,
            "max_streams": self.max_streams,
        }

    @classmethod
    def from_json(cls, value: object) -> Settings:
        """Parse a peer's ``settings`` object; absent fields take the defaults.

        :raises ProtocolError: ``PROTOCOL_ERROR`` when a field has the wrong type or range.
        """
        if value is None:
            return cls()
        if type(value) is not dict:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO settings is not an object")
        kwargs: dict[str, int] = {}
        for name in ("stream_window", "connection_window", "max_frame", "max_streams"):
            if name in value:
                item = value[name]
                # type() is int: True and False are ints to isinstance (and 1.0 == 1 to comparisons).
                if type(item) is not int:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO setting {name} is not an integer")
                kwargs[name] = item
        if "stream_window" in kwargs:
            # The peer announces where its streams start; that is all we need of its stream window.
            kwargs["initial_stream_window"] = kwargs["stream_window"]
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"bad HELLO settings: {e}") from None


class _Stream:
    """Per-stream bookkeeping: the lifecycle state (:mod:`connproxy.wire.streams`) and the two windows
    (:mod:`connproxy.wire.windows`). Kept small: an idle stream costs one of these."""

    __slots__ = ("state", "send", "recv")

    def __init__(self, state: StreamState, send: SendCredit, recv: StreamReceiveWindow) -> None:
        self.state = state
        self.send = send
        self.recv = recv


def _decode_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: json.loads gives up on deeply nested arrays/objects ("[[[[..."); a peer must only
        # ever be able to cause a ProtocolError (for OPEN: a stream reset), never another exception.
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} payload is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} payload is not a JSON object")
    return value


#: HELLO fields that, when present, must be JSON strings (spec section 3.1).
_HELLO_STRINGS = ("connector_id", "subaccount", "location", "replica_id", "tunnel_id")


def _check_hello_types(hello: dict[str, Any]) -> None:
    """Check the types of the HELLO fields this specification defines (exact types: ``true`` is no version).

    :raises ProtocolError: ``PROTOCOL_ERROR`` naming the field.
    """
    for name in _HELLO_STRINGS:
        if name in hello and type(hello[name]) is not str:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO {name} is not a string")
    capabilities = hello.get("capabilities", [])
    if type(capabilities) is not list or any(type(c) is not str for c in capabilities):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO capabilities is not a list of strings")
    if "versions" in hello:
        versions = hello["versions"]
        if type(versions) is not list or any(type(v) is not int for v in versions):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO versions is not a list of integers")


def _parse_open(payload: bytes) -> OpenRequest:
    value = _decode_json(payload, "OPEN")
    host = value.get("host")
    port = value.get("port")
    kind = value.get("kind", "tcp")
    meta = value.get("meta", {})
    # Exact type() checks throughout: bool is an int subclass (``"port": true`` would be port 1).
    if type(host) is not str or not host or len(host) > 255:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "OPEN without a valid host")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "OPEN without a valid port")
    if type(kind) is not str or type(meta) is not dict:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "OPEN with a bad kind or meta")
    return OpenRequest(host=host, port=port, kind=kind, meta=meta)


class Session:
    """One end of a tunnel connection.

    :param role: :attr:`Role.DIALER` for the connector (odd stream IDs, sends the preface first),
        :attr:`Role.LISTENER` for the proxy (even stream IDs, expects the preface).
    :param settings: what this side accepts; announced in its HELLO.
    """

    def __init__(self, role: Role, settings: Settings | None = None) -> None:
        self.role = role
        self.settings = settings or Settings()
        self.peer_settings = Settings()
        self.version: int | None = None
        self.peer_hello: dict[str, Any] | None = None
        self._decoder = f.FrameDecoder(self.settings.max_frame)
        self._need_preface = role is Role.LISTENER
        self._preface_buffer = b""
        self._hello_sent = False
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if role is Role.DIALER else 2
        self._highest_peer_id = 0
        self._peer_opened = 0
        self._conn_send = SendCredit(self.peer_settings.connection_window)
        self._conn_recv = ConnectionReceiveWindow(self.settings.connection_window)
        self._budget = WindowBudget(self.settings.connection_window)
        #: Received bytes not yet consumed, over all live streams (the buffered total of spec 3.4).
        self._unconsumed_total = 0
        self._control: list[bytes] = []
        self._control_bytes = 0
        self._data: list[bytes] = []
        self._data_bytes = 0
        self.local_goaway = False
        self.remote_goaway = False
        self.terminated = False

    # ---------------------------------------------------------------- state queries

    @property
    def ready(self) -> bool:
        """True once both HELLOs have been exchanged: streams may be opened."""
        return self._hello_sent and self.peer_hello is not None

    def peer_supports(self, capability: str) -> bool:
        """Whether the peer's HELLO announced ``capability`` (spec section 3.1); False before its HELLO."""
        capabilities = self.peer_hello.get("capabilities", ()) if self.peer_hello is not None else ()
        return capability in capabilities

    @property
    def open_streams(self) -> int:
        """How many streams are open (in either direction)."""
        return len(self._streams)

    def can_open(self) -> bool:
        """True if :meth:`open_stream` would succeed now."""
        return (
            self.ready
            and not self.remote_goaway
            and not self.local_goaway
            and not self.terminated
            and len(self._streams) - self._peer_opened < self.peer_settings.max_streams
        )

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes :meth:`send_data` would take for ``stream_id`` now (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        if stream is None or not transition(stream.state, StreamEvent.SEND_DATA).ok:
            return 0
        return min(stream.send.credit, self._conn_send.credit)

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's lifecycle state: ``IDLE`` for an ID never used, ``CLOSED`` for one that is gone."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        return StreamState.CLOSED if self._is_known_id(stream_id) else StreamState.IDLE

    def stream_windows(self, stream_id: int) -> tuple[SendCredit, StreamReceiveWindow] | None:
        """The send credit and receive window of a live stream (read them; the session changes them)."""
        stream = self._streams.get(stream_id)
        return None if stream is None else (stream.send, stream.recv)

    @property
    def connection_send(self) -> SendCredit:
        """The session's send credit (read it; the session changes it)."""
        return self._conn_send

    @property
    def connection_receive(self) -> ConnectionReceiveWindow:
        """The session's receive window (read it; the session changes it)."""
        return self._conn_recv

    def unconsumed(self, stream_id: int | None = None) -> int:
        """Received DATA bytes the application has not acknowledged yet: of ``stream_id`` (0 once it is gone), or
        of every live stream."""
        if stream_id is not None:
            stream = self._streams.get(stream_id)
            return stream.recv.unconsumed if stream is not None else 0
        return self._unconsumed_total

    def session_credit_held(self) -> int:
        """Received bytes whose session credit is withheld until they are consumed (spec 3.4)."""
        return sum(s.recv.session_held for s in self._streams.values())

    def has_stream(self, stream_id: int) -> bool:
        """True while the stream exists (not reset, not closed in both directions)."""
        return stream_id in self._streams

    @property
    def buffered_output(self) -> int:
        """Bytes queued by the session and not yet taken with :meth:`take_output`."""
        return self._control_bytes + self._data_bytes

    # ---------------------------------------------------------------- output

    def _queue_control(self, data: bytes) -> None:
        self._control.append(data)
        self._control_bytes += len(data)

    def take_output(self, include_data: bool = True) -> list[bytes]:
        """Return the chunks to write, control frames first, and forget them.

        With ``include_data=False`` only control frames are returned and DATA stays queued (the transport is
        congested: keepalives and credit must still get through).
        """
        out = self._control
        self._control = []
        self._control_bytes = 0
        if include_data and self._data:
            out.extend(self._data)
            self._data = []
            self._data_bytes = 0
        return out

    # ---------------------------------------------------------------- handshake

    def send_hello(self, fields: Mapping[str, Any] | None = None) -> None:
        """Queue this side's HELLO (the dialer also queues the preface first).

        The dialer calls it at once; the listener calls it after :class:`HelloReceived`, having checked the peer's
        identity. ``fields`` are added to the HELLO (connector id, tenant, location, replica id ...).

        :raises StreamStateError: if a HELLO was sent already.
        :raises ValueError: the HELLO would not fit the peer's ``max_frame`` (for the dialer: 16384 bytes).
        """
        if self._hello_sent:
            raise StreamStateError("HELLO already sent")
        body: dict[str, Any] = dict(fields or {})
        body["settings"] = self.settings.to_json()
        if self.role is Role.DIALER:
            body["versions"] = list(SUPPORTED_VERSIONS)
            self._queue_control(f.PREFACE)
        else:
            body["version"] = self.version
        payload = _compact_json(body).encode("utf-8")
        # The dialer does not know the listener's max_frame yet: a HELLO must fit the smallest allowed one.
        limit = f.MIN_MAX_FRAME if self.role is Role.DIALER else self.peer_settings.max_frame
        if len(payload) > min(limit, f.MAX_CONTROL_PAYLOAD):
            raise ValueError(f"HELLO of {len(payload)} bytes exceeds {min(limit, f.MAX_CONTROL_PAYLOAD)}")
        self._queue_control(f.frame(f.FrameType.HELLO, 0, 0, payload))
        self._hello_sent = True

    def send_replicas(self, replicas: Sequence[Mapping[str, Any]]) -> None:
        """Queue a REPLICAS frame (extension, docs/high-availability.md): the replica set changed.

        :raises StreamStateError: before our HELLO was sent.
        """
        if not self._hello_sent:
            raise StreamStateError("REPLICAS before HELLO")
        payload = _compact_json({"replicas": list(replicas)}).encode("utf-8")
        self._queue_control(f.frame(f.FrameType.REPLICAS, 0, 0, payload))

    # ---------------------------------------------------------------- commands

    def open_stream(self, request: OpenRequest) -> int:
        """Open a stream towards the peer and return its ID. DATA may follow at once (early data).

        :raises StreamStateError: if the handshake is not done, a GOAWAY was sent or received, or the peer's
            ``max_streams`` is reached (check :meth:`can_open` first).
        :raises OpenTooLargeError: the encoded OPEN payload would exceed the 64 KiB the peer must accept (nothing
            is queued; the session is unaffected).
        """
        if not self.can_open():
            raise StreamStateError("cannot open a stream now")
        body: dict[str, Any] = {"host": request.host, "port": request.port, "kind": request.kind}
        if request.meta:
            body["meta"] = request.meta
        payload = _compact_json(body).encode("utf-8")
        limit = min(f.MAX_CONTROL_PAYLOAD, self.peer_settings.max_frame)
        if len(payload) > limit:
            raise OpenTooLargeError(f"OPEN payload of {len(payload)} bytes exceeds {limit}")
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = self._new_stream(StreamState.OPENING)
        self._queue_control(f.frame(f.FrameType.OPEN, 0, stream_id, payload))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer opened (:class:`StreamOpened`).

        :raises StreamStateError: for an unknown stream or one already accepted.
        """
        stream = self._streams.get(stream_id)
        # Only streams the peer opened (PENDING) can be accepted: for one we opened, the ACCEPT would be a
        # protocol error at the peer.
        self._local(stream_id, stream, StreamEvent.SEND_ACCEPT)
        self._queue_control(f.frame(f.FrameType.ACCEPT, 0, stream_id))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Queue as much of ``data`` as the windows allow, cut into frames; return how many bytes were taken.

        With ``end_stream`` the FIN flag goes on the last frame if all of ``data`` was taken (nothing is sent
        otherwise beyond the taken bytes: call again with the rest once :class:`WindowUpdated` arrives).

        :raises StreamStateError: for an unknown stream or one whose sending side is already closed.
        """
        stream = self._streams.get(stream_id)
        if stream is None or not transition(stream.state, StreamEvent.SEND_DATA).ok:
            raise StreamStateError(f"stream {stream_id} is not open for sending")
        total = len(data)
        allowed = min(total, stream.send.credit, self._conn_send.credit)
        max_frame = self.peer_settings.max_frame
        out = self._data
        if allowed:
            stream.send.take(allowed)
            self._conn_send.take(allowed)
            # buffered_output counts what take_output() returns: payload plus one header per frame
            # (headers used to be left out, and end_stream()'s FIN frame entirely).
            self._data_bytes += allowed + f.HEADER_SIZE * -(-allowed // max_frame)
            if allowed <= max_frame:
                fin = f.FLAG_FIN if end_stream and allowed == total else 0
                out.append(_pack_header(_FV, _DATA, fin, stream_id, allowed))
                out.append(data if allowed == total else data[:allowed])
            else:
                view = memoryview(data)
                for start in range(0, allowed, max_frame):
                    chunk = view[start : min(start + max_frame, allowed)]
                    last = start + max_frame >= allowed
                    fin = f.FLAG_FIN if end_stream and last and allowed == total else 0
                    out.append(_pack_header(_FV, _DATA, fin, stream_id, len(chunk)))
                    out.append(bytes(chunk))
            if end_stream and allowed == total:
                self._local(stream_id, stream, StreamEvent.SEND_FIN)
        elif end_stream and total == 0:
            self.end_stream(stream_id)
        return allowed

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction of the stream (an empty DATA frame with FIN).

        :raises StreamStateError: for an unknown stream or one already half-closed by us.
        """
        stream = self._streams.get(stream_id)
        if stream is None or not transition(stream.state, StreamEvent.SEND_FIN).ok:
            raise StreamStateError(f"stream {stream_id} is not open for sending")
        self._data.append(_pack_header(_FV, _DATA, f.FLAG_FIN, stream_id, 0))
        self._data_bytes += f.HEADER_SIZE  # see send_data
        self._local(stream_id, stream, StreamEvent.SEND_FIN)

    def _new_stream(self, state: StreamState) -> _Stream:
        settings = self.settings
        return _Stream(
            state,
            SendCredit(self.peer_settings.initial_stream_window),
            StreamReceiveWindow(settings.initial_stream_window, settings.stream_window, self._budget),
        )

    def _local(self, stream_id: int, stream: _Stream | None, event: StreamEvent) -> None:
        """Apply a local action to the stream's state (forgetting it once closed).

        :raises StreamStateError: the state does not allow the action (spec 3.3, local actions table).
        """
        state = StreamState.CLOSED if stream is None else stream.state
        outcome = transition(state, event)
        if outcome.not_allowed or stream is None:
            raise StreamStateError(f"stream {stream_id}: {event.value} not allowed in state {state.value}")
        stream.state = outcome.state
        if outcome.state is StreamState.CLOSED:
            self._forget(stream_id, stream)

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "", *, after_data: bool = False) -> None:
        """Abort the stream with ``code``; unknown or already closed streams are ignored.

        A RESET normally jumps ahead of queued DATA (control priority). With ``after_data`` it is queued behind
        this session's DATA instead, so that the peer first receives everything sent so far (a graceful close
        of a stream whose peer is still sending).
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        encoded = f.frame(f.FrameType.RESET, 0, stream_id, f.U32.pack(code) + f.encode_reason(reason))
        if after_data and self._data:
            self._data.append(encoded)
            self._data_bytes += len(encoded)
        else:
            self._queue_control(encoded)
        self._forget(stream_id, stream)

    def acknowledge(self, stream_id: int, count: int) -> None:
        """The application has passed on ``count`` received bytes of the stream: return their credit.

        Stream updates are batched: a WINDOW_UPDATE is queued once half the stream's window is pending (and the
        window may grow, see :class:`~connproxy.wire.windows.StreamReceiveWindow`). Session credit these bytes
        still held goes back too. Acknowledgements for streams that are gone are ignored: their session credit went
        back when they ended.
        """
        if count <= 0:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        # Credit at most what was received and not yet acknowledged: an over-acknowledgement (a glue bug, or one
        # ack both per chunk and per stream) would hand the peer credit beyond our windows, breaking the memory
        # bound and, repeated, overflowing the peer's window (FLOW_CONTROL_ERROR).
        count = stream.recv.consume(count)
        if count <= 0:
            return
        self._unconsumed_total -= count
        if stream.state not in REMOTE_CLOSED:
            increment = stream.recv.take_update()
            if increment:
                self._queue_control(f.frame(f.FrameType.WINDOW_UPDATE, 0, stream_id, f.U32.pack(increment)))
        released = stream.recv.release_session_credit(count)
        if released:
            self._credit_connection(released)

    def _credit_connection(self, count: int) -> None:
        # Batched (see ConnectionReceiveWindow.take_update), but never withheld from a peer that has less session
        # credit left than we hold back: else stalled streams holding most of the window starve the others.
        self._conn_recv.credit(count)
        increment = self._conn_recv.take_update()
        if increment:
            self._queue_control(f.frame(f.FrameType.WINDOW_UPDATE, 0, 0, f.U32.pack(increment)))

    def ping(self, payload: bytes) -> None:
        """Queue a PING with an 8-byte payload; the echo arrives as :class:`PingAcknowledged`."""
        if len(payload) != 8:
            raise ValueError("PING payload must be 8 bytes")
        self._queue_control(f.frame(f.FrameType.PING, 0, 0, payload))

    def go_away(self, code: ErrorCode, reason: str = "") -> None:
        """Queue GOAWAY: the peer must open no new streams; ours continue. Only the first call sends."""
        if self.local_goaway:
            return
        self.local_goaway = True
        payload = f.GOAWAY_HEAD.pack(self._highest_peer_id, code) + f.encode_reason(reason)
        self._queue_control(f.frame(f.FrameType.GOAWAY, 0, 0, payload))
        if code not in _DRAIN_CODES:
            self.terminated = True

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        del self._streams[stream_id]
        stream.state = StreamState.CLOSED
        recv = stream.recv
        recv.release()
        if stream_id & 1 != self._next_id & 1:
            self._peer_opened -= 1
        # What the stream still buffers is the application's to drop or flush, bounded by the stream's window: its
        # session credit goes back now, exactly once (later acknowledgements of the stream are ignored).
        self._unconsumed_total -= recv.unconsumed
        held = recv.session_held
        recv.session_held = 0
        if held:
            self._credit_connection(held)

    def stream_ids(self) -> list[int]:
        """The IDs of all open streams."""
        return list(self._streams)

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> list[Event]:
        """Process received bytes and return the events they cause, in order.

        :raises ProtocolError: the peer broke the protocol; send :meth:`go_away` with ``error.code``, write the
            output and close the connection. The session is unusable afterwards.
        """
        if self.terminated:
            return []
        if self._need_preface:
            buffered = self._preface_buffer + data
            if len(buffered) < len(f.PREFACE):
                if not f.PREFACE.startswith(buffered):
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
                self._preface_buffer = buffered
                return []
            if not buffered.startswith(f.PREFACE):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            self._need_preface = False
            self._preface_buffer = b""
            data = buffered[len(f.PREFACE) :]
        events: list[Event] = []
        for raw in self._decoder.feed(data):
            self._handle(raw, events)
        if self._control_bytes > MAX_CONTROL_BACKLOG:
            raise ProtocolError(ErrorCode.CONTROL_BACKLOG, "control frame backlog exceeded (peer not reading)")
        return events

    def _handle(self, raw: f.RawFrame, events: list[Event]) -> None:
        frame_type = raw.frame_type
        if frame_type == _DATA:
            self._on_data(raw, events)
            return
        if self.peer_hello is None and frame_type not in (
            f.FrameType.HELLO,
            f.FrameType.PING,
            f.FrameType.GOAWAY,
        ):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"frame type {frame_type} before HELLO")
        if frame_type == f.FrameType.WINDOW_UPDATE:
            self._on_window_update(raw, events)
        elif frame_type == f.FrameType.OPEN:
            self._on_open(raw, events)
        elif frame_type == f.FrameType.ACCEPT:
            self._on_accept(raw, events)
        elif frame_type == f.FrameType.RESET:
            self._on_reset(raw, events)
        elif frame_type == f.FrameType.PING:
            self._on_ping(raw, events)
        elif frame_type == f.FrameType.GOAWAY:
            self._on_goaway(raw, events)
        elif frame_type == f.FrameType.HELLO:
            self._on_hello(raw, events)
        elif frame_type == f.FrameType.REPLICAS:
            self._on_replicas(raw, events)
        # Unknown frame types are ignored (spec section 2).

    def _require_stream_frame(self, raw: f.RawFrame) -> None:
        if raw.stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"frame type {raw.frame_type} on stream 0")

    def _is_known_id(self, stream_id: int) -> bool:
        """True if the ID was used already (by us or the peer), so frames for it may be stale."""
        if stream_id & 1 == self._next_id & 1:
            return stream_id < self._next_id
        return stream_id <= self._highest_peer_id

    def _lookup(self, raw: f.RawFrame, event: StreamEvent) -> tuple[_Stream | None, Outcome]:
        """The stream a received frame is for and what the transition table says about it.

        :raises ProtocolError: the table's session error (a frame for a never-used ID, a misplaced ACCEPT).
        """
        self._require_stream_frame(raw)
        stream = self._streams.get(raw.stream_id)
        if stream is not None:
            state = stream.state
        else:
            state = StreamState.CLOSED if self._is_known_id(raw.stream_id) else StreamState.IDLE
        outcome = transition(state, event)
        if outcome.session_error is not None:
            raise ProtocolError(
                outcome.session_error, f"{event.value} on stream {raw.stream_id} in state {state.value}"
            )
        return stream, outcome

    def _on_data(self, raw: f.RawFrame, events: list[Event]) -> None:
        if self.peer_hello is None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA before HELLO")
        fin = bool(raw.flags & f.FLAG_FIN)
        stream, outcome = self._lookup(raw, StreamEvent.RECV_DATA_FIN if fin else StreamEvent.RECV_DATA)
        length = len(raw.payload)
        self._conn_recv.receive(length)
        if self._conn_recv.pending:
            # The peer's session credit just shrank: release batched credit it may now need.
            self._credit_connection(0)
        stream_id = raw.stream_id
        if stream is None or outcome.ignored:
            self._credit_connection(length)  # stale frame of a closed stream
            return
        if outcome.stream_error is not None:
            self._credit_connection(length)
            reason = "DATA after FIN" if outcome.stream_error is ErrorCode.STREAM_CLOSED else "DATA before ACCEPT"
            self.reset_stream(stream_id, outcome.stream_error, reason)
            events.append(StreamReset(stream_id, outcome.stream_error, reason, remote=False))
            return
        stream.recv.receive(length, stream_id)
        if length:
            self._unconsumed_total += length
            # Spec 3.4: session credit goes back on receipt while the tunnel buffers at most half the session
            # window, so a stalled stream holds its own window but no session credit; beyond that, only once the
            # bytes are consumed (the session window then bounds memory again).
            if self._unconsumed_total <= self.settings.buffer_budget:
                self._credit_connection(length)
            else:
                stream.recv.session_held += length
            events.append(DataReceived(stream_id, raw.payload))
        if fin:
            events.append(StreamEnded(stream_id))
        stream.state = outcome.state
        if outcome.state is StreamState.CLOSED:
            self._forget(stream_id, stream)

    def _on_window_update(self, raw: f.RawFrame, events: list[Event]) -> None:
        if len(raw.payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        (increment,) = f.U32.unpack(raw.payload)
        if not 1 <= increment <= f.MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "WINDOW_UPDATE increment out of range")
        stream_id = raw.stream_id
        if stream_id == 0:
            self._conn_send.grant(increment, "session")
            events.append(WindowUpdated(0))
            return
        stream, outcome = self._lookup(raw, StreamEvent.RECV_WINDOW_UPDATE)
        if stream is None or outcome.ignored:
            return
        stream.send.grant(increment, f"stream {stream_id}")
        events.append(WindowUpdated(stream_id))

    def _on_open(self, raw: f.RawFrame, events: list[Event]) -> None:
        self._require_stream_frame(raw)
        stream_id = raw.stream_id
        if stream_id & 1 == self._next_id & 1 or stream_id <= self._highest_peer_id:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"OPEN with invalid stream ID {stream_id}")
        self._highest_peer_id = stream_id
        try:
            request = _parse_open(raw.payload)
        except ProtocolError as e:
            self._queue_control(
                f.frame(f.FrameType.RESET, 0, stream_id, f.U32.pack(e.code) + f.encode_reason(str(e)))
            )
            return
        if self.local_goaway or self._peer_opened >= self.settings.max_streams:
            reason = "draining" if self.local_goaway else "too many streams"
            self._queue_control(
                f.frame(
                    f.FrameType.RESET, 0, stream_id, f.U32.pack(ErrorCode.REFUSED_STREAM) + f.encode_reason(reason)
                )
            )
            return
        self._streams[stream_id] = self._new_stream(StreamState.PENDING)
        self._peer_opened += 1
        events.append(StreamOpened(stream_id, request))

    def _on_accept(self, raw: f.RawFrame, events: list[Event]) -> None:
        stream, outcome = self._lookup(raw, StreamEvent.RECV_ACCEPT)
        if stream is None or outcome.ignored:
            return
        stream.state = outcome.state
        events.append(StreamAccepted(raw.stream_id))

    def _on_reset(self, raw: f.RawFrame, events: list[Event]) -> None:
        self._require_stream_frame(raw)
        if len(raw.payload) < 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RESET payload shorter than 4 bytes")
        (code,) = f.U32.unpack_from(raw.payload)
        stream, outcome = self._lookup(raw, StreamEvent.RECV_RESET)
        if stream is None or outcome.ignored:
            return
        self._forget(raw.stream_id, stream)
        events.append(StreamReset(raw.stream_id, ErrorCode.from_wire(code), f.decode_reason(raw.payload[4:])))

    def _on_ping(self, raw: f.RawFrame, events: list[Event]) -> None:
        if raw.stream_id != 0 or len(raw.payload) != 8:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING must be 8 bytes on stream 0")
        if raw.flags & f.FLAG_ACK:
            events.append(PingAcknowledged(raw.payload))
        else:
            self._queue_control(f.frame(f.FrameType.PING, f.FLAG_ACK, 0, raw.payload))

    def _on_goaway(self, raw: f.RawFrame, events: list[Event]) -> None:
        if raw.stream_id != 0 or len(raw.payload) < 8:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY must be at least 8 bytes on stream 0")
        last, code = f.GOAWAY_HEAD.unpack_from(raw.payload)
        self.remote_goaway = True
        events.append(GoAwayReceived(last, ErrorCode.from_wire(code), f.decode_reason(raw.payload[8:])))
        # Spec 3.6: our streams past ``last`` never reached the peer's application. They fail at once with
        # REFUSED_STREAM (safe to retry elsewhere) instead of waiting for the open timeout.
        parity = self._next_id & 1
        for stream_id in [i for i in self._streams if i & 1 == parity and i > last]:
            self._forget(stream_id, self._streams[stream_id])
            events.append(StreamReset(stream_id, ErrorCode.REFUSED_STREAM, UNPROCESSED_REASON, remote=False))

    def _on_replicas(self, raw: f.RawFrame, events: list[Event]) -> None:
        if raw.stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "REPLICAS on a stream")
        body = _decode_json(raw.payload, "REPLICAS")
        replicas = body.get("replicas")
        if not isinstance(replicas, list):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "REPLICAS without a replicas list")
        events.append(ReplicasReceived(replicas))

    def _on_hello(self, raw: f.RawFrame, events: list[Event]) -> None:
        if raw.stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO on a stream")
        if self.peer_hello is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "second HELLO")
        if self.role is Role.DIALER and not self._hello_sent:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO before ours")
        hello = _decode_json(raw.payload, "HELLO")
        _check_hello_types(hello)
        if self.role is Role.LISTENER:
            offered = hello.get("versions")
            if offered is None:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO without versions")
            common = [v for v in SUPPORTED_VERSIONS if v in offered]
            if not common:
                raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"no common version in {offered!r:.100}")
            version = max(common)
        else:
            version = hello.get("version")  # type: ignore[assignment]
            # type() check: True == 1 and 1.0 == 1, so "version": true would otherwise pass and be stored.
            if type(version) is not int or version not in SUPPORTED_VERSIONS:
                raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"peer chose unsupported version {version!r:.20}")
        peer = Settings.from_json(hello.get("settings"))
        self.version = version
        self.peer_hello = hello
        self.peer_settings = peer
        self._conn_send = SendCredit(peer.connection_window)
        events.append(HelloReceived(hello, version))
