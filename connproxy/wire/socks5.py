"""Server side of SOCKS5 (RFC 1928) with SAP's custom authentication method 0x80, sans-IO.

:class:`Socks5Server` is a state machine: the glue feeds it the bytes it read with
:meth:`Socks5Server.receive_data`, gets back events, decides, and writes the bytes the
``*_reply`` methods return. It has no clock, no I/O and no logger; it imports the standard
library only.

Payload::

    Greeting, client -> server (RFC 1928 section 3)
        VER 0x05 (1) | NMETHODS (1, >= 1) | METHODS (NMETHODS)
        SAP's documentation and JS SDK send 05 01 80; SAP's own client also offers 0x00: 05 02 00 80.

    Method selection, server -> client
        VER 0x05 (1) | METHOD (1)       0x00 no auth, 0x80 SAP JWT, 0xFF nothing acceptable

    SAP JWT sub-negotiation (method 0x80), client -> server, integers big-endian
        VER 0x01 (1) | N (4, unsigned) | TOKEN (N) | L (1) | LOCATION (L)
        TOKEN     the JWT in compact form, ASCII, no "Bearer " prefix; N = 0 sends no token
        LOCATION  base64 (standard alphabet, padding optional) of the UTF-8 Cloud Connector
                  location ID; L = 0 means the default location

    Sub-negotiation status, server -> client
        VER 0x01 (1) | STATUS (1)       0x00 success, 0x01 failure (then the server closes)

    Request, client -> server (RFC 1928 section 4)
        VER 0x05 (1) | CMD (1) | RSV (1) | ATYP (1) | DST.ADDR (var) | DST.PORT (2)
        CMD       0x01 CONNECT is the only one supported (0x02 BIND, 0x03 UDP ASSOCIATE are not)
        RSV       ignored
        ATYP      0x01 IPv4: 4 bytes; 0x03 domain: 1 length byte + name; 0x04 IPv6: 16 bytes
        a domain name must be 1..255 bytes of A-Z a-z 0-9 "-" "." "_"; DST.PORT must not be 0

    Reply, server -> client (RFC 1928 section 6)
        VER 0x05 (1) | REP (1) | RSV 0x00 (1) | ATYP (1) | BND.ADDR (var) | BND.PORT (2)

States and who moves them::

    GREETING --receive_data: MethodsOffered--> WAIT_METHOD_CHOICE
    WAIT_METHOD_CHOICE --method_reply(0x80)--> AUTH
                       --method_reply(0x00)--> REQUEST
                       --method_reply(0xFF)--> CLOSED
    AUTH --receive_data: SapAuthRequest--> WAIT_AUTH_DECISION
    WAIT_AUTH_DECISION --auth_reply(True)--> REQUEST
                       --auth_reply(False)--> CLOSED
    REQUEST --receive_data: ConnectRequest--> WAIT_CONNECT_DECISION
    WAIT_CONNECT_DECISION --connect_reply(SUCCEEDED)--> ESTABLISHED
                          --connect_reply(other)--> CLOSED
    any state before ESTABLISHED --receive_data raises Socks5Error--> CLOSED

Failures and their replies (``Socks5Error.reply_bytes``)::

    greeting VER != 5 (checked on the first byte)          b"" (not a SOCKS5 client)
    greeting NMETHODS = 0                                  05 FF
    sub-negotiation VER != 1, N > max_token_bytes (checked
      on the 5-byte header), TOKEN not ASCII, LOCATION not
      base64 or not UTF-8                                  01 01
    request VER != 5 (checked on the first byte)           05 01 00 01 00000000 0000
    request ATYP not 1/3/4 (checked on the 4-byte header)  05 08 ...
    request CMD != CONNECT (after the whole request)       05 07 ...
    request with a bad domain name or port 0               05 01 ...
    over max_token_bytes + 1024 bytes buffered unparsed    the failure reply of the current phase

Pipelining: a client may send the greeting, the sub-negotiation, the request and its first
payload bytes in one write. The machine parses one message, returns its event and then only
buffers until the application answers; the answer methods never parse. After each answer call
``receive_data(b"")`` to get the event for bytes already buffered. Bytes after the request are
early data for the relay (:meth:`Socks5Server.take_trailing_data`).

Errors come in two kinds. :class:`Socks5Error` means the peer broke the protocol: send its
``reply_bytes`` (may be empty), then close the connection, and log its ``reason``.
:class:`Socks5StateError` means the local code called a method in the wrong state: a bug, to be
logged with a traceback.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Final, TypeAlias

__all__ = [
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "METHOD_SAP_JWT",
    "AddressType",
    "ConnectRequest",
    "MethodsOffered",
    "Reply",
    "SapAuthRequest",
    "Socks5Error",
    "Socks5Event",
    "Socks5Server",
    "Socks5State",
    "Socks5StateError",
]

SOCKS_VERSION: Final = 0x05
SAP_AUTH_VERSION: Final = 0x01

METHOD_NO_AUTH: Final = 0x00
METHOD_SAP_JWT: Final = 0x80
METHOD_NO_ACCEPTABLE: Final = 0xFF

CMD_CONNECT: Final = 0x01

#: Bytes allowed in a buffer on top of ``max_token_bytes`` before the session is established.
#: A whole pipelined greeting + sub-negotiation + request takes at most
#: ``max_token_bytes + 257 + 261 + 262`` bytes.
BUFFER_SLACK: Final = 1024

_AUTH_OK: Final = b"\x01\x00"
_AUTH_FAILED: Final = b"\x01\x01"
_U32: Final = struct.Struct(">I")
_MAX_U32: Final = 2**32 - 1

# Bytes allowed in an ATYP 0x03 name: LDH plus "." and "_" (used by internal and service names).
_DOMAIN_BYTES: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
)


class Reply(enum.IntEnum):
    """REP field of a request reply; meanings as the SAP Connectivity proxy documents them."""

    SUCCEEDED = 0x00
    #: Backend closed the connection, or another general failure; also malformed requests.
    GENERAL_FAILURE = 0x01
    #: No matching host mapping in the connector's access control.
    NOT_ALLOWED = 0x02
    #: No connector for the tenant / location.
    NETWORK_UNREACHABLE = 0x03
    #: The connector could not open the connection to the backend.
    HOST_UNREACHABLE = 0x04
    #: In SAP's product: authentication failure (token rejected at the CONNECT step).
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AddressType(enum.IntEnum):
    """ATYP field of a request or reply."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Socks5State(enum.Enum):
    """Where a :class:`Socks5Server` is; see the module docstring for the transitions."""

    GREETING = enum.auto()
    WAIT_METHOD_CHOICE = enum.auto()
    AUTH = enum.auto()
    WAIT_AUTH_DECISION = enum.auto()
    REQUEST = enum.auto()
    WAIT_CONNECT_DECISION = enum.auto()
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()


@dataclass(frozen=True, slots=True)
class MethodsOffered:
    """The client's greeting: the authentication methods it offers (duplicates collapsed).

    Answer with :meth:`Socks5Server.method_reply`, usually with the method
    :meth:`Socks5Server.select_method` picks.
    """

    methods: frozenset[int]


@dataclass(frozen=True, slots=True)
class SapAuthRequest:
    """The SAP method 0x80 sub-negotiation.

    :ivar token: the JWT as sent, ASCII; ``""`` when the client sent none (trusted mode). It is
        not verified here and is left out of ``repr()`` so it cannot leak into logs.
    :ivar location_id: the decoded Cloud Connector location ID; ``""`` means the default location.

    Answer with :meth:`Socks5Server.auth_reply`.
    """

    token: str = field(repr=False)
    location_id: str


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT request.

    :ivar host: dotted-quad IPv4, compressed IPv6 text without brackets (``"2001:db8::1"``), or
        the domain name exactly as sent (ASCII; case kept; not resolved; IDNs arrive as punycode).
    :ivar port: 1 to 65535.
    :ivar address_type: the ATYP the client used.

    Answer with :meth:`Socks5Server.connect_reply`.
    """

    host: str
    port: int
    address_type: AddressType


Socks5Event: TypeAlias = MethodsOffered | SapAuthRequest | ConnectRequest


class Socks5Error(Exception):
    """The peer broke the protocol (or sent something this server refuses).

    Send :attr:`reply_bytes` (if not empty), then close the connection; the machine is already
    :attr:`Socks5State.CLOSED`.

    :ivar reply_bytes: the failure reply owed to the client in the current phase: ``b""`` for a
        non-SOCKS5 greeting, ``05 FF`` in the greeting phase, ``01 01`` in the 0x80
        sub-negotiation, a request reply (``05 REP 00 01 00000000 0000``) in the request phase.
    :ivar reason: a description for the log line; it never contains the token.
    """

    def __init__(self, reason: str, *, reply_bytes: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply_bytes = reply_bytes


class Socks5StateError(RuntimeError):
    """A :class:`Socks5Server` method was called in a state that does not allow it: a local bug."""


def _encode_reply(reply: Reply, bind_host: str, bind_port: int) -> bytes:
    """Encode ``05 REP 00 ATYP BND.ADDR BND.PORT``; raise :class:`ValueError` on bad arguments."""
    code = Reply(reply)
    if not 0 <= bind_port <= 0xFFFF:
        raise ValueError(f"bind_port {bind_port} is outside 0..65535")
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        name = bind_host.encode("ascii", "replace")
        problem = _domain_problem(name)
        if problem is not None:
            raise ValueError(f"bind_host {bind_host!r} is neither an IP address nor a valid name: {problem}") from None
        address = bytes((AddressType.DOMAIN, len(name))) + name
    else:
        atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
        address = bytes((atyp,)) + ip.packed
    return bytes((SOCKS_VERSION, code, 0x00)) + address + bind_port.to_bytes(2, "big")


def _domain_problem(name: bytes) -> str | None:
    """Say what is wrong with an ATYP 0x03 name, or return ``None`` if it is acceptable."""
    if not name:
        return "empty domain name"
    if len(name) > 255:
        return f"domain name of {len(name)} bytes is longer than 255"
    for offset, byte in enumerate(name):
        if byte not in _DOMAIN_BYTES:
            return f"domain name contains byte 0x{byte:02x} at offset {offset}"
    return None


def _request_failure(reply: Reply) -> bytes:
    """The request reply sent with a :class:`Socks5Error`: ``reply`` with bind 0.0.0.0:0."""
    return _encode_reply(reply, "0.0.0.0", 0)


def _decode_location(field_bytes: bytes) -> str:
    """Decode the base64 LOCATION field into the location ID; raise :class:`Socks5Error`."""
    if not field_bytes:
        return ""
    padded = field_bytes + b"=" * (-len(field_bytes) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except binascii.Error as e:
        raise Socks5Error(
            f"location ID field {field_bytes[:64]!r} ({len(field_bytes)} bytes) is not valid base64: {e}",
            reply_bytes=_AUTH_FAILED,
        ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Socks5Error(
            f"location ID is not valid UTF-8 after base64 decoding (byte offset {e.start})",
            reply_bytes=_AUTH_FAILED,
        ) from None


def _greeting_version_hint(version: int) -> str:
    """A hint for the log line when the first byte is not 0x05."""
    if version == 0x04:
        return " (a SOCKS4 client?)"
    if 0x41 <= version <= 0x5A:
        return " (an HTTP request on the SOCKS5 port?)"
    if version == 0x16:
        return " (a TLS ClientHello?)"
    return ""


class Socks5Server:
    """One client connection, server side.

    Use::

        server = Socks5Server()
        # on every read:
        for event in server.receive_data(data):       # may raise Socks5Error
            ...  # decide (possibly later), then write one of:
            transport.write(server.method_reply(server.select_method(event.methods, ...)))
            transport.write(server.auth_reply(ok))
            transport.write(server.connect_reply(Reply.SUCCEEDED))
        # after answering, call receive_data(b"") to get events for bytes that were
        # already buffered (pipelined by the client); reply methods never return events.
        # once ESTABLISHED: relay server.take_trailing_data() first, then stop feeding the machine.

    :param max_token_bytes: the largest JWT accepted in the 0x80 sub-negotiation; a larger
        length field fails the sub-negotiation at once, without waiting for the bytes. Unparsed
        input is capped at ``max_token_bytes + 1024`` bytes until the session is established.
    """

    def __init__(self, *, max_token_bytes: int = 65536) -> None:
        if not 0 <= max_token_bytes <= _MAX_U32:
            raise ValueError(f"max_token_bytes {max_token_bytes} is outside 0..{_MAX_U32}")
        self._max_token_bytes = max_token_bytes
        self._max_buffered = max_token_bytes + BUFFER_SLACK
        self._buffer = bytearray()
        self._state = Socks5State.GREETING
        self._offered: frozenset[int] = frozenset()

    @property
    def state(self) -> Socks5State:
        """The current :class:`Socks5State`."""
        return self._state

    def receive_data(self, data: bytes) -> list[Socks5Event]:
        """Buffer ``data`` and return the event for the next complete message, if any.

        An event is produced only once its whole message is buffered, so any split of the input
        gives the same events. The list holds at most one event: after each event the machine
        waits for the application's answer (``method_reply``, ``auth_reply``,
        ``connect_reply``), and bytes that arrive meanwhile (a client pipelining greeting,
        sub-negotiation and request) stay buffered. The answer methods do not parse them; call
        ``receive_data(b"")`` after answering to get the event for bytes already buffered.

        Bytes after the CONNECT request are the client's early data: they are kept for
        :meth:`take_trailing_data`, not parsed.

        Returns ``[]`` without looking at ``data`` once the machine is CLOSED (bytes racing the
        close are dropped).

        :raises Socks5Error: the peer broke the protocol, or more than ``max_token_bytes + 1024``
            bytes are buffered unparsed; the machine is now CLOSED.
        :raises Socks5StateError: called once ESTABLISHED; from then on bytes belong to the relay.
        """
        if self._state is Socks5State.CLOSED:
            return []
        if self._state is Socks5State.ESTABLISHED:
            raise Socks5StateError(
                "receive_data() called in state ESTABLISHED; relay the bytes instead"
            )
        self._buffer += data
        try:
            event = self._next_event()
            if len(self._buffer) > self._max_buffered:
                raise Socks5Error(
                    f"{len(self._buffer)} bytes buffered unparsed in state {self._state.name}, "
                    f"more than the limit of {self._max_buffered}",
                    reply_bytes=self._failure_reply(),
                )
        except Socks5Error:
            self._close()
            raise
        return [] if event is None else [event]

    def select_method(self, offered: frozenset[int], *, authorization_enabled: bool) -> int:
        """Pick the method to answer a greeting with. Pure: it reads no state.

        0x80 whenever offered, even with authorization disabled (it is the only way for a client
        to pass a location ID; SAP's client offers ``05 02 00 80``); 0x00 only when 0x80 is not
        offered and authorization is disabled; else 0xFF (no acceptable method).
        """
        if METHOD_SAP_JWT in offered:
            return METHOD_SAP_JWT
        if METHOD_NO_AUTH in offered and not authorization_enabled:
            return METHOD_NO_AUTH
        return METHOD_NO_ACCEPTABLE

    def method_reply(self, method: int) -> bytes:
        """Answer the greeting: return ``05 METHOD`` to send.

        Moves to AUTH (0x80), REQUEST (0x00) or CLOSED (0xFF: send the bytes, then close).
        Does not parse buffered bytes; see :meth:`receive_data`.

        :raises Socks5StateError: not in WAIT_METHOD_CHOICE.
        :raises ValueError: ``method`` is not 0x00, 0x80 or 0xFF, or the client did not offer it.
        """
        self._require(Socks5State.WAIT_METHOD_CHOICE, "method_reply")
        if method not in (METHOD_NO_AUTH, METHOD_SAP_JWT, METHOD_NO_ACCEPTABLE):
            raise ValueError(f"method 0x{method:02x} is not implemented")
        if method != METHOD_NO_ACCEPTABLE and method not in self._offered:
            raise ValueError(f"method 0x{method:02x} was not offered by the client")
        if method == METHOD_SAP_JWT:
            self._state = Socks5State.AUTH
        elif method == METHOD_NO_AUTH:
            self._state = Socks5State.REQUEST
        else:
            self._close()
        return bytes((SOCKS_VERSION, method))

    def auth_reply(self, ok: bool) -> bytes:
        """Answer the 0x80 sub-negotiation: return ``01 00`` (ok) or ``01 01`` to send.

        Moves to REQUEST, or to CLOSED on failure (send the bytes, then close). Does not parse
        buffered bytes; see :meth:`receive_data`.

        :raises Socks5StateError: not in WAIT_AUTH_DECISION.
        """
        self._require(Socks5State.WAIT_AUTH_DECISION, "auth_reply")
        if ok:
            self._state = Socks5State.REQUEST
            return _AUTH_OK
        self._close()
        return _AUTH_FAILED

    def connect_reply(self, reply: Reply, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """Answer the CONNECT request: return ``05 REP 00 ATYP BND.ADDR BND.PORT`` to send.

        ATYP follows ``bind_host``: IPv4 literal -> 0x01, IPv6 literal -> 0x04, else a name (0x03).
        ``SUCCEEDED`` moves to ESTABLISHED (relay :meth:`take_trailing_data` first); any other
        code moves to CLOSED (send the bytes, then close) and drops buffered early data.

        :raises Socks5StateError: not in WAIT_CONNECT_DECISION.
        :raises ValueError: unknown ``reply``, ``bind_port`` outside 0..65535, or ``bind_host``
            neither an IP literal nor a valid name; the state is unchanged.
        """
        self._require(Socks5State.WAIT_CONNECT_DECISION, "connect_reply")
        encoded = _encode_reply(reply, bind_host, bind_port)
        if reply == Reply.SUCCEEDED:
            self._state = Socks5State.ESTABLISHED
        else:
            self._close()
        return encoded

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the CONNECT request (client early data), not yet taken.

        ``b""`` before the request is parsed and once CLOSED. Peeking does not clear them.
        """
        if self._state in (Socks5State.WAIT_CONNECT_DECISION, Socks5State.ESTABLISHED):
            return bytes(self._buffer)
        return b""

    def take_trailing_data(self) -> bytes:
        """Return the bytes received after the CONNECT request and forget them.

        Each byte is returned once: a second call returns only what arrived in between.

        :raises Socks5StateError: not in WAIT_CONNECT_DECISION or ESTABLISHED.
        """
        if self._state not in (Socks5State.WAIT_CONNECT_DECISION, Socks5State.ESTABLISHED):
            raise Socks5StateError(
                f"take_trailing_data() called in state {self._state.name}; "
                "expected WAIT_CONNECT_DECISION or ESTABLISHED"
            )
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # -- internals -------------------------------------------------------------------------

    def _require(self, expected: Socks5State, operation: str) -> None:
        if self._state is not expected:
            raise Socks5StateError(
                f"{operation}() called in state {self._state.name}; expected {expected.name}"
            )

    def _close(self) -> None:
        self._state = Socks5State.CLOSED
        self._buffer.clear()

    def _failure_reply(self) -> bytes:
        """The failure reply owed in the current phase (used when the buffer overflows)."""
        if self._state in (Socks5State.GREETING, Socks5State.WAIT_METHOD_CHOICE):
            return bytes((SOCKS_VERSION, METHOD_NO_ACCEPTABLE))
        if self._state in (Socks5State.AUTH, Socks5State.WAIT_AUTH_DECISION):
            return _AUTH_FAILED
        return _request_failure(Reply.GENERAL_FAILURE)

    def _next_event(self) -> Socks5Event | None:
        if self._state is Socks5State.GREETING:
            return self._parse_greeting()
        if self._state is Socks5State.AUTH:
            return self._parse_auth()
        if self._state is Socks5State.REQUEST:
            return self._parse_request()
        return None  # waiting for the application: keep the bytes

    def _parse_greeting(self) -> MethodsOffered | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            raise Socks5Error(
                f"greeting has version 0x{buf[0]:02x}, expected 0x05"
                f"{_greeting_version_hint(buf[0])}",
                reply_bytes=b"",
            )
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            raise Socks5Error(
                "greeting offers no authentication method (NMETHODS = 0)",
                reply_bytes=bytes((SOCKS_VERSION, METHOD_NO_ACCEPTABLE)),
            )
        end = 2 + count
        if len(buf) < end:
            return None
        methods = frozenset(buf[2:end])
        del buf[:end]
        self._offered = methods
        self._state = Socks5State.WAIT_METHOD_CHOICE
        return MethodsOffered(methods)

    def _parse_auth(self) -> SapAuthRequest | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SAP_AUTH_VERSION:
            raise Socks5Error(
                f"method 0x80 sub-negotiation has version 0x{buf[0]:02x}, expected 0x01",
                reply_bytes=_AUTH_FAILED,
            )
        if len(buf) < 5:
            return None
        (token_length,) = _U32.unpack_from(buf, 1)
        if token_length > self._max_token_bytes:
            raise Socks5Error(
                f"token length field announces {token_length} bytes, "
                f"more than the limit of {self._max_token_bytes}",
                reply_bytes=_AUTH_FAILED,
            )
        token_end = 5 + token_length
        if len(buf) <= token_end:
            return None
        location_end = token_end + 1 + buf[token_end]
        if len(buf) < location_end:
            return None
        token_bytes = bytes(buf[5:token_end])
        location_field = bytes(buf[token_end + 1 : location_end])
        del buf[:location_end]
        try:
            token = token_bytes.decode("ascii")
        except UnicodeDecodeError as e:
            raise Socks5Error(
                f"token of {token_length} bytes is not ASCII (byte offset {e.start})",
                reply_bytes=_AUTH_FAILED,
            ) from None
        location_id = _decode_location(location_field)
        self._state = Socks5State.WAIT_AUTH_DECISION
        return SapAuthRequest(token=token, location_id=location_id)

    def _parse_request(self) -> ConnectRequest | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            raise Socks5Error(
                f"request has version 0x{buf[0]:02x}, expected 0x05",
                reply_bytes=_request_failure(Reply.GENERAL_FAILURE),
            )
        if len(buf) < 4:
            return None
        command, atyp = buf[1], buf[3]
        if atyp == AddressType.IPV4:
            address_start, address_length = 4, 4
        elif atyp == AddressType.IPV6:
            address_start, address_length = 4, 16
        elif atyp == AddressType.DOMAIN:
            if len(buf) < 5:
                return None
            address_start, address_length = 5, buf[4]
        else:
            raise Socks5Error(
                f"request has unsupported address type 0x{atyp:02x}",
                reply_bytes=_request_failure(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        address_end = address_start + address_length
        end = address_end + 2
        if len(buf) < end:
            return None
        address = bytes(buf[address_start:address_end])
        port = int.from_bytes(buf[address_end:end], "big")
        del buf[:end]
        if command != CMD_CONNECT:
            raise Socks5Error(
                f"request has unsupported command 0x{command:02x} (only CONNECT 0x01)",
                reply_bytes=_request_failure(Reply.COMMAND_NOT_SUPPORTED),
            )
        if atyp == AddressType.DOMAIN:
            problem = _domain_problem(address)
            if problem is not None:
                raise Socks5Error(
                    f"request has an invalid destination: {problem}",
                    reply_bytes=_request_failure(Reply.GENERAL_FAILURE),
                )
            host = address.decode("ascii")
        elif atyp == AddressType.IPV4:
            host = str(ipaddress.IPv4Address(address))
        else:
            host = ipaddress.IPv6Address(address).compressed
        if port == 0:
            raise Socks5Error(
                f"request for {host} has destination port 0",
                reply_bytes=_request_failure(Reply.GENERAL_FAILURE),
            )
        self._state = Socks5State.WAIT_CONNECT_DECISION
        return ConnectRequest(host=host, port=port, address_type=AddressType(atyp))
