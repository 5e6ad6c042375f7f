"""Proxy authorization: who is calling, for which tenant, and may they.

This module implements the SAP Connectivity proxy's "operational modes" (two independent switches):

* **proxy authorization** (per front end, ``enableProxyAuthorization``): when on, every proxy call carries an
  XSUAA-style JWT (HTTP ``Proxy-Authorization: Bearer <JWT>``, or the SOCKS5 method 0x80 token) that is
  verified offline: size, structure, an asymmetric signing algorithm, a signature by a trusted key, ``exp``
  (required) and ``nbf``/``iat`` with a leeway, and ``client_id`` (or ``cid``) in the allowed list. When off
  ("trusted" mode), the caller is trusted and any proxy token it sends anyway is *ignored*, not verified
  (SAP's SOCKS5 client always sends one);
* **tenant mode** (``tenantMode``): ``dedicated`` serves the one configured ``subaccountId``; ``shared`` takes
  the tenant from the token (``ext_attr.subaccountid``, else ``zid``), or, in trusted shared mode, from the
  ``SAP-CP-Connectivity-Service-Token`` the application forwards.

The pieces, bottom up:

* :class:`KeyStore` holds the trusted verification keys (JWKS) by ``kid``: from a file read once at start-up,
  from a configured JWKS URL, or, XSUAA style, from the URL in the token header's ``jku`` when that URL lies in
  the configured ``uaaDomain``. Remote key sets are fetched with :class:`AgentJwksFetcher` (Twisted ``Agent``),
  with a timeout, a body size cap and a per-URL rate limit.
* :class:`TokenVerifier` checks a token and fires with its claims.
* :class:`Authorizer` applies the mode matrix and fires with a :class:`Caller`.
* :func:`make_authorizer` builds an :class:`Authorizer` for one front end from plain configuration values.

Every refusal is an :class:`AuthError` whose :attr:`AuthError.reason` is one of a fixed set of short,
client-safe codes (:data:`AUTH_REASONS`). Tokens never appear in errors or in log events: at most the key id
(``kid``), the key URL and the client id are logged.

Nothing here uses the global reactor: the reactor (for timeouts and HTTP fetches) and the clock (for token
times and the fetch rate limit) are injected. Nothing blocks the reactor after construction.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TypeGuard, get_args
from urllib.parse import urlsplit

import jwt
from jwt.types import Options
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from connproxy.config import TENANT_MODES, token_keys_url_problem, uaa_domain_problem
from connproxy.nodelay import no_delay_agent
from connproxy.pki.jwks import ALLOWED_ALGORITHMS, MAX_JWKS_BYTES, JwksError, read_jwks_file, usable_jwks

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AUTH_REASONS",
    "DEFAULT_FETCH_TIMEOUT_SECONDS",
    "DEFAULT_LEEWAY_SECONDS",
    "DEFAULT_MAX_JWKS_BYTES",
    "DEFAULT_MAX_TOKEN_BYTES",
    "DEFAULT_MIN_REFETCH_SECONDS",
    "AgentJwksFetcher",
    "AuthError",
    "AuthReason",
    "Authorizer",
    "Caller",
    "JwksError",
    "JwksFetchError",
    "JwksFetcher",
    "KeyStore",
    "TokenSource",
    "TokenVerifier",
    "bearer_token",
    "client_id_of",
    "make_authorizer",
    "tenant_of",
]

# --------------------------------------------------------------------------------------------------------
# errors and results

AuthReason = Literal[
    "missing",
    "malformed",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "unknown_key",
    "algorithm_not_allowed",
    "untrusted_key_url",
    "client_not_allowed",
    "wrong_tenant",
    "no_tenant",
    "key_fetch_failed",
    "too_large",
]

#: Which token a refusal is about: the proxy authorization token, or the trusted-mode service token.
TokenSource = Literal["proxy_token", "service_token"]

#: Every reason an :class:`AuthError` may carry.
AUTH_REASONS: Final[frozenset[str]] = frozenset(get_args(AuthReason))

_SENTENCES: Final[Mapping[str, str]] = {
    "missing": "no proxy authorization token",
    "malformed": "the token is not a well-formed JWT",
    "expired": "the token has expired",
    "not_yet_valid": "the token is not yet valid",
    "bad_signature": "the token signature is not valid",
    "unknown_key": "the token is signed with an unknown key",
    "algorithm_not_allowed": "the token signing algorithm is not allowed",
    "untrusted_key_url": "the token key URL (jku) is not trusted",
    "client_not_allowed": "the token was issued to a client that is not allowed",
    "wrong_tenant": "the token is not for this proxy's tenant",
    "no_tenant": "the token carries no tenant",
    "key_fetch_failed": "the token keys could not be fetched",
    "too_large": "the token is too large",
}
_SERVICE_TOKEN_SENTENCES: Final[Mapping[str, str]] = {
    "missing": "no connectivity service token (SAP-CP-Connectivity-Service-Token)",
}


_ZID_QUERY = re.compile(r"zid=[A-Za-z0-9-]{1,64}")


class AuthError(Exception):
    """A proxy call is refused; :attr:`reason` says why, in one short, client-safe code.

    ``str(error)`` is a fixed human sentence for the reason (for example ``"no proxy authorization token"``).
    Neither carries any part of a token, so both may be sent to the client and logged.

    :ivar reason: one of :data:`AUTH_REASONS`.
    :ivar source: which token the refusal is about (``"proxy_token"`` or ``"service_token"``).
    """

    reason: AuthReason
    source: TokenSource

    def __init__(self, reason: AuthReason, *, source: TokenSource = "proxy_token") -> None:
        """Make an error for ``reason``.

        :raises ValueError: ``reason`` is not one of :data:`AUTH_REASONS` (a programming error).
        """
        if reason not in _SENTENCES:
            raise ValueError(f"unknown authorization failure reason {reason!r}")
        sentence = (
            _SERVICE_TOKEN_SENTENCES.get(reason, _SENTENCES[reason])
            if source == "service_token"
            else _SENTENCES[reason]
        )
        super().__init__(sentence)
        self.reason = reason
        self.source = source

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def client_fault(self) -> bool:
        """Whether the caller can fix this by sending another token (false only for ``key_fetch_failed``)."""
        return self.reason != "key_fetch_failed"

    @property
    def http_status(self) -> int:
        """The HTTP status the HTTP front end should answer with.

        407 for every problem with the proxy token (SAP answers 407 for a missing or invalid
        ``Proxy-Authorization``), 400 for a missing or unusable ``SAP-CP-Connectivity-Service-Token`` in
        trusted shared mode, and 503 when the keys to check the token could not be fetched (a server-side
        problem, worth a retry).
        """
        if not self.client_fault:
            return 503
        return 400 if self.source == "service_token" else 407


@dataclass(frozen=True)
class Caller:
    """Who is calling the proxy, as far as the front ends, the router and the audit log need to know.

    :ivar tenant: the tenant (subaccount) the call is for; never empty.
    :ivar client_id: the OAuth client of the token (``client_id``, else ``cid``), if there was one.
    :ivar subject: the token's ``sub``, if there was one.
    :ivar verified: whether a token was verified (authorization on); false in trusted mode, where any
        ``client_id``/``subject`` come from an unverified service token and are informational only.
    """

    tenant: str
    client_id: str | None
    subject: str | None
    verified: bool


# --------------------------------------------------------------------------------------------------------
# claims helpers

_EC_CURVE_OF_ALG: Final[Mapping[str, str]] = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

DEFAULT_LEEWAY_SECONDS: Final = 30
DEFAULT_MAX_TOKEN_BYTES: Final = 16384
DEFAULT_MAX_JWKS_BYTES: Final = MAX_JWKS_BYTES
DEFAULT_FETCH_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_MIN_REFETCH_SECONDS: Final = 30.0
DEFAULT_MAX_KEY_URLS: Final = 64


def _nonempty_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def tenant_of(claims: Mapping[str, Any]) -> str | None:
    """The tenant a token is for: ``ext_attr.subaccountid``, else ``zid``; ``None`` if it names none.

    Claims that are not non-empty strings count as absent.
    """
    ext_attr = claims.get("ext_attr")
    if isinstance(ext_attr, Mapping):
        subaccount = _nonempty_str(ext_attr.get("subaccountid"))
        if subaccount is not None:
            return subaccount
    return _nonempty_str(claims.get("zid"))


def client_id_of(claims: Mapping[str, Any]) -> str | None:
    """The OAuth client a token was issued to: ``client_id``, else ``cid``; ``None`` if neither is a string."""
    return _nonempty_str(claims.get("client_id")) or _nonempty_str(claims.get("cid"))


def bearer_token(value: str | bytes | None) -> str | None:
    """The token of a ``Bearer <token>`` header value (scheme case-insensitive), else ``None``.

    For the HTTP front end's ``Proxy-Authorization`` header: a missing header, another scheme (``Basic``) or an
    empty token all give ``None``, which :meth:`Authorizer.authorize` refuses as ``missing`` where authorization
    is on. Bytes that are not ASCII give ``None`` too.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


_B64URL_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class _SegmentError(ValueError):
    """A JWT segment is not base64url-encoded JSON object."""


def _b64url_json_object(segment: str) -> dict[str, Any]:
    """Decode one base64url JWT segment holding a JSON object.

    :raises _SegmentError: not base64url, not UTF-8 JSON, or not an object.
    """
    if not _B64URL_SEGMENT.fullmatch(segment):
        raise _SegmentError("not base64url")
    stripped = segment.rstrip("=")
    if len(stripped) % 4 == 1 or (len(stripped) != len(segment) and len(segment) % 4):
        raise _SegmentError("bad base64url length")
    try:
        raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _SegmentError("not a JSON segment") from error
    if not isinstance(value, dict):
        raise _SegmentError("not a JSON object")
    return value


def _split_token(token: str, source: TokenSource) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, checked for shape only (no signature check).

    :raises AuthError: ``malformed``: not three dot-separated base64url parts, or header/payload not JSON
        objects.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1] or not token.isascii():
        raise AuthError("malformed", source=source)
    if not _B64URL_SEGMENT.fullmatch(parts[2]):
        raise AuthError("malformed", source=source)
    try:
        return _b64url_json_object(parts[0]), _b64url_json_object(parts[1])
    except _SegmentError:
        raise AuthError("malformed", source=source) from None


def _for_log(value: object, limit: int = 128) -> object:
    """A claim or header value made safe to log: long strings are cut (they come from the caller)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite JSON number (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------------
# keys


@dataclass
class _Jwk:
    """One trusted public key from a JWKS, with the :class:`jwt.PyJWK` objects bound per algorithm."""

    kid: str
    data: dict[str, Any]
    bound: dict[str, jwt.PyJWK] = field(default_factory=dict)

    def for_algorithm(self, alg: str) -> jwt.PyJWK:
        """This key bound to ``alg``.

        :raises AuthError: ``algorithm_not_allowed``: the key's type, curve or declared ``alg`` does not fit
            ``alg`` (for example an ``ES256`` token naming an RSA key).
        """
        cached = self.bound.get(alg)
        if cached is not None:
            return cached
        declared = self.data.get("alg")
        kty = self.data.get("kty")
        fits = (declared is None or declared == alg) and (
            (kty == "RSA" and alg[:2] in ("RS", "PS"))
            or (kty == "EC" and _EC_CURVE_OF_ALG.get(alg) == self.data.get("crv"))
        )
        if not fits or alg not in ALLOWED_ALGORITHMS:
            raise AuthError("algorithm_not_allowed")
        try:
            key = jwt.PyJWK(self.data, algorithm=alg)
        except jwt.PyJWTError:
            raise AuthError("algorithm_not_allowed") from None
        self.bound[alg] = key
        return key


def _parse_jwks(body: bytes) -> dict[str, _Jwk]:
    """The usable keys of a JWKS document by ``kid`` (see :func:`connproxy.pki.jwks.usable_jwks`, the one rule
    that the configuration check applies to ``tokenKeysFile`` too).

    :raises JwksError: not a JSON object with a ``keys`` list, or no usable key in it.
    """
    return {kid: _Jwk(kid=kid, data=data) for kid, data in usable_jwks(body).items()}


#: Fetches a URL and fires with the response body (status 200 only), or fails. The KeyStore applies the
#: timeout on top; implementations should enforce a body size cap themselves (see AgentJwksFetcher).
JwksFetcher = Callable[[str], "Deferred[bytes]"]


class JwksFetchError(Exception):
    """A JWKS could not be fetched (bad status, oversized body, broken connection). For logs only."""


def _stop_producing(transport: object) -> None:
    """Stop a response body transfer: its transport is a push producer (closing the connection)."""
    producer = IPushProducer(transport, None)
    if producer is not None:
        producer.stopProducing()


class _CappedBodyReader(Protocol):
    """Collects a response body of at most ``max_bytes``; stops the transfer as soon as it is larger."""

    def __init__(self, finished: Deferred[bytes], max_bytes: int) -> None:
        self._finished = finished
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0

    def stop(self) -> None:
        """Stop receiving (close the connection), used on overflow and on cancellation."""
        _stop_producing(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._max_bytes:
            self._chunks.clear()
            self._finished.errback(JwksFetchError(f"the JWKS is larger than {self._max_bytes} bytes"))
            self.stop()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:
            return
        if isinstance(reason.value, ResponseDone):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(JwksFetchError(f"the JWKS transfer broke off: {reason.getErrorMessage()}"))


class _DiscardBody(Protocol):
    """Receives nothing: closes the connection of a response we do not want."""

    def connectionMade(self) -> None:
        _stop_producing(self.transport)


class AgentJwksFetcher:
    """The default :data:`JwksFetcher`: ``GET`` with a Twisted :class:`~twisted.web.client.Agent`.

    Only status 200 counts. A body larger than ``max_bytes`` (by ``Content-Length``, or while streaming) is
    refused and its connection closed. HTTPS server certificates are verified against the system trust store
    (the ``Agent`` default); the connections have TCP_NODELAY. There is no timeout here: :class:`KeyStore` cancels
    a fetch that takes too long, which closes the connection.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        agent: IAgent | None = None,
    ) -> None:
        """Make a fetcher that connects through ``reactor`` (or uses ``agent``).

        :param reactor: must also provide ``IReactorTCP`` (and a name resolver) unless ``agent`` is given.
        :raises TypeError: no ``agent`` and ``reactor`` cannot make TCP connections.
        """
        if agent is None:
            if not IReactorTCP.providedBy(reactor):
                raise TypeError("fetching token keys needs a reactor that provides IReactorTCP")
            agent = no_delay_agent(reactor)
        self._agent = agent
        self._max_bytes = max_bytes

    def __call__(self, url: str) -> Deferred[bytes]:
        """Fetch ``url``; fires with the body, or fails with :class:`JwksFetchError` or a connection error."""
        headers = Headers({b"accept": [b"application/json"], b"user-agent": [b"connproxy"]})
        d = self._agent.request(b"GET", url.encode("ascii"), headers)
        return d.addCallback(self._read_body)

    def _read_body(self, response: IResponse) -> Deferred[bytes]:
        if response.code != 200:
            response.deliverBody(_DiscardBody())  # type: ignore[no-untyped-call]
            return fail(JwksFetchError(f"the JWKS server answered HTTP {response.code}"))
        length = response.length
        if length is not UNKNOWN_LENGTH and isinstance(length, int) and length > self._max_bytes:
            response.deliverBody(_DiscardBody())  # type: ignore[no-untyped-call]
            return fail(JwksFetchError(f"the JWKS is larger than {self._max_bytes} bytes"))
        reader: _CappedBodyReader

        def cancel(_: Deferred[bytes]) -> None:
            reader.stop()

        finished: Deferred[bytes] = Deferred(cancel)
        reader = _CappedBodyReader(finished, self._max_bytes)
        response.deliverBody(reader)  # type: ignore[no-untyped-call]
        return finished


@dataclass
class _RemoteKeySet:
    """The cached keys of one JWKS URL and its fetch state (for the rate limit)."""

    url: str
    keys: dict[str, _Jwk] = field(default_factory=dict)
    last_attempt: float | None = None
    last_failed: bool = False
    waiters: list[Deferred[bool]] | None = None  # not None while a fetch is in flight

    @property
    def fetching(self) -> bool:
        return self.waiters is not None

    def wait(self) -> Deferred[bool]:
        """A Deferred firing with the in-flight fetch's outcome (True: keys updated). Cancelling it only
        stops waiting; the fetch goes on for the others."""
        assert self.waiters is not None

        def cancel(d: Deferred[bool]) -> None:
            if self.waiters is not None and d in self.waiters:
                self.waiters.remove(d)

        d: Deferred[bool] = Deferred(cancel)
        self.waiters.append(d)
        return d

    def finish(self, ok: bool) -> None:
        waiters, self.waiters = self.waiters or [], None
        self.last_failed = not ok
        for d in waiters:
            if not d.called:
                d.callback(ok)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_URL_CHARS: Final = re.compile(r"[!-~]+")  # printable ASCII, no space


def _url_scheme_and_host(url: str) -> tuple[str, str] | None:
    """(scheme, host) of an absolute URL fit for fetching keys, or ``None`` if it is unusable.

    Unusable: not printable ASCII, backslashes, user info, a fragment, no host, or a bad port.
    """
    if len(url) > 2048 or not _URL_CHARS.fullmatch(url) or "\\" in url:
        return None
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        return None
    host = parts.hostname
    if not host or "@" in parts.netloc or parts.fragment:
        return None
    return parts.scheme.lower(), host.rstrip(".")


class KeyStore:
    """The trusted token verification keys, by key id (``kid``), and where to get more.

    Key sources (any combination):

    * ``token_keys_file``: a JWKS file, read once, synchronously, when the store is made (start-up time);
    * ``token_keys_url``: a JWKS URL, fetched on first use and again when a token names an unknown ``kid``;
    * ``uaa_domain``: XSUAA-style per-tenant keys. A token whose header has a ``jku`` is checked with the keys
      at that URL, but only if the URL's host is ``uaa_domain`` itself or a subdomain of it and its scheme is
      ``https`` (plain ``http`` only for a loopback host, and only with ``allow_insecure_loopback``, for
      tests); any other ``jku`` is refused as ``untrusted_key_url``. Without ``uaa_domain`` a ``jku`` is
      ignored and the file/URL keys are used.

    Keys from the file are consulted first, then those of the URL that applies (the ``jku``, else
    ``token_keys_url``). Remote key sets are cached; a lookup for an unknown ``kid`` refetches, but per URL at
    most one fetch is in flight (concurrent lookups wait for the same fetch) and at most one fetch starts per
    ``min_refetch_seconds``: inside that window an unknown ``kid`` is refused as ``unknown_key`` at once
    (``key_fetch_failed`` if the last fetch failed). A fetch that fails, times out (``fetch_timeout``), answers
    a status other than 200, sends more than ``max_jwks_bytes`` or no usable key is ``key_fetch_failed``; the
    keys cached before stay. At most ``max_key_urls`` ``jku`` URLs are remembered (least recently used go).

    Only asymmetric keys are kept: RSA of at least 2048 bits and EC P-256/384/521, public parts only, ``use``
    absent or ``sig``, keyed by a string ``kid``. A token without a ``kid`` is refused as ``unknown_key``.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        token_keys_file: str | Path | None = None,
        token_keys_url: str | None = None,
        uaa_domain: str | None = None,
        allow_insecure_loopback: bool = False,
        fetch: JwksFetcher | None = None,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_SECONDS,
        max_jwks_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        min_refetch_seconds: float = DEFAULT_MIN_REFETCH_SECONDS,
        max_key_urls: int = DEFAULT_MAX_KEY_URLS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Make a key store; reads ``token_keys_file`` now if given (nothing is fetched yet).

        :param reactor: schedules fetch timeouts; also makes the HTTP connections when ``fetch`` is not given
            (it must then provide ``IReactorTCP``).
        :param fetch: how to fetch a JWKS URL (a test seam); default :class:`AgentJwksFetcher`.
        :param clock: the time source of the rate limit; default ``reactor.seconds``.
        :raises ValueError: no key source at all; the file cannot be read, is larger than ``max_jwks_bytes``
            or holds no usable key; ``token_keys_url`` is not ``https`` (or loopback ``http`` with
            ``allow_insecure_loopback``); ``uaa_domain`` is not a host name. The message names the setting
            (``tokenKeysFile``, ``tokenKeysUrl``, ``uaaDomain``).
        :raises TypeError: a URL source needs the default fetcher and ``reactor`` does not provide
            ``IReactorTCP``.
        """
        self._reactor = reactor
        self._clock: Callable[[], float] = clock if clock is not None else reactor.seconds
        self._allow_insecure_loopback = allow_insecure_loopback
        self._fetch_timeout = fetch_timeout
        self._max_jwks_bytes = max_jwks_bytes
        self._min_refetch_seconds = min_refetch_seconds
        self._max_key_urls = max_key_urls
        if token_keys_file is None and token_keys_url is None and uaa_domain is None:
            raise ValueError("no token key source: set tokenKeysFile, tokenKeysUrl or uaaDomain")

        self._file_keys: dict[str, _Jwk] = {}
        if token_keys_file is not None:
            self._file_keys = self._read_file(Path(token_keys_file))

        self._configured: _RemoteKeySet | None = None
        # The configuration (connproxy.config) has already applied these rules to a configured proxy; they are
        # applied again here, by the same functions, only for stores built directly (tests, tools).
        if token_keys_url is not None:
            checked = _url_scheme_and_host(token_keys_url)
            test_loopback = checked is not None and checked[0] == "http" and self._scheme_allowed(*checked)
            problem = None if test_loopback else token_keys_url_problem(token_keys_url)
            if problem is not None:
                raise ValueError(f"tokenKeysUrl: {problem}")
            self._configured = _RemoteKeySet(token_keys_url)

        self._uaa_domain: str | None = None
        if uaa_domain is not None:
            domain = uaa_domain.strip().strip(".").lower()
            problem = uaa_domain_problem(domain)
            if problem is not None:
                raise ValueError(f"uaaDomain: {problem}")
            self._uaa_domain = domain
        self._jku_sets: OrderedDict[str, _RemoteKeySet] = OrderedDict()

        if fetch is None and (self._configured is not None or self._uaa_domain is not None):
            fetch = AgentJwksFetcher(reactor, max_bytes=max_jwks_bytes)
        self._fetch = fetch

    def _read_file(self, path: Path) -> dict[str, _Jwk]:
        try:
            keys = {kid: _Jwk(kid=kid, data=data) for kid, data in read_jwks_file(path, self._max_jwks_bytes).items()}
        except OSError as error:
            raise ValueError(f"tokenKeysFile {str(path)!r} cannot be read: {error.strerror}") from None
        except JwksError as error:
            raise ValueError(f"tokenKeysFile {str(path)!r}: {error}") from None
        self._log.info("loaded {count} token keys from {path}", count=len(keys), path=str(path))
        return keys

    def _scheme_allowed(self, scheme: str, host: str) -> bool:
        if scheme == "https":
            return True
        return scheme == "http" and self._allow_insecure_loopback and _is_loopback_host(host)

    def trusted_jku(self, jku: str) -> str:
        """``jku`` if keys may be fetched from it (see the class docstring), else raise.

        :raises AuthError: ``untrusted_key_url``, also when no ``uaa_domain`` is configured.
        """
        domain = self._uaa_domain
        checked = _url_scheme_and_host(jku)
        if domain is None or checked is None:
            raise AuthError("untrusted_key_url")
        scheme, host = checked
        if not (host == domain or host.endswith("." + domain)) or not self._scheme_allowed(scheme, host):
            raise AuthError("untrusted_key_url")
        # XSUAA's key URL is https://<subdomain>.<uaaDomain>/token_keys, optionally with ?zid=<zone id>: any
        # other path or query would let tokens make the proxy fetch from (and cache) endless distinct URLs.
        parsed = urlsplit(jku)
        if (
            parsed.path != "/token_keys"
            or parsed.fragment
            or parsed.username
            or parsed.password
            or (parsed.query and not _ZID_QUERY.fullmatch(parsed.query))
        ):
            raise AuthError("untrusted_key_url")
        return jku

    def get_key(self, *, kid: str | None, jku: str | None, alg: str) -> Deferred[jwt.PyJWK]:
        """The trusted key ``kid`` bound to algorithm ``alg``, fetching keys if need be.

        Fails with :class:`AuthError`: ``algorithm_not_allowed`` (``alg`` not allowed, or not fitting the
        key), ``untrusted_key_url`` (``jku`` outside ``uaa_domain``), ``unknown_key`` (no such key, also
        after a refetch or inside the refetch window; or no ``kid``), ``key_fetch_failed``.
        """
        return Deferred.fromCoroutine(self._get_key(kid, jku, alg))

    async def _get_key(self, kid: str | None, jku: str | None, alg: str) -> jwt.PyJWK:
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError("algorithm_not_allowed")
        trusted_jku = self.trusted_jku(jku) if jku is not None and self._uaa_domain is not None else None
        if kid is None:
            raise AuthError("unknown_key")
        remote = self._jku_set(trusted_jku) if trusted_jku is not None else self._configured
        key = self._file_keys.get(kid)
        if key is None and remote is not None:
            key = remote.keys.get(kid)
            if key is None:
                await self._refresh(remote)
                key = remote.keys.get(kid)
        if key is None:
            self._log.info(
                "no token key {kid} (key URL: {url})", kid=_for_log(kid), url=remote.url if remote else None
            )
            raise AuthError("unknown_key")
        return key.for_algorithm(alg)

    def _jku_set(self, url: str) -> _RemoteKeySet:
        remote = self._jku_sets.get(url)
        if remote is not None:
            self._jku_sets.move_to_end(url)
            return remote
        while len(self._jku_sets) >= self._max_key_urls:
            idle = next((u for u, s in self._jku_sets.items() if not s.fetching), None)
            if idle is None:
                self._log.warn("too many token key URLs being fetched at once; refusing {url}", url=url)
                raise AuthError("key_fetch_failed")
            del self._jku_sets[idle]
        remote = self._jku_sets[url] = _RemoteKeySet(url)
        return remote

    async def _refresh(self, remote: _RemoteKeySet) -> None:
        """Refetch ``remote`` if the rate limit allows (or join the fetch in flight).

        :raises AuthError: ``key_fetch_failed`` if the fetch failed, or if the last one failed and the
            window is still open.
        """
        if remote.fetching:
            ok = await remote.wait()
        elif (
            remote.last_attempt is not None
            and self._clock() - remote.last_attempt < self._min_refetch_seconds
        ):
            self._log.debug("not refetching token keys from {url} yet (rate limit)", url=remote.url)
            ok = not remote.last_failed
        else:
            ok = await self._start_fetch(remote)
        if not ok:
            raise AuthError("key_fetch_failed")

    def _start_fetch(self, remote: _RemoteKeySet) -> Deferred[bool]:
        remote.last_attempt = self._clock()
        remote.waiters = []
        outcome = remote.wait()
        self._log.info("fetching token keys from {url}", url=remote.url)
        assert self._fetch is not None
        d = maybeDeferred(self._fetch, remote.url)

        def timed_out(result: object, timeout: float) -> NoReturn:
            raise JwksFetchError(f"no JWKS within the timeout of {timeout} seconds")

        d.addTimeout(self._fetch_timeout, self._reactor, onTimeoutCancel=timed_out)

        def fetched(body: bytes) -> None:
            if len(body) > self._max_jwks_bytes:
                raise JwksFetchError(f"the JWKS is larger than {self._max_jwks_bytes} bytes")
            remote.keys = _parse_jwks(body)
            self._log.info(
                "fetched {count} token keys from {url}", count=len(remote.keys), url=remote.url
            )
            remote.finish(True)

        def failed(failure: Failure) -> None:
            self._log.warn(
                "fetching token keys from {url} failed: {error}",
                url=remote.url,
                error=failure.getErrorMessage(),
            )
            remote.finish(False)

        d.addCallback(fetched).addErrback(failed)
        return outcome


# --------------------------------------------------------------------------------------------------------
# verification

_DECODE_OPTIONS: Final[Options] = {
    "require": ["exp"],
    "verify_signature": True,
    "verify_aud": False,  # SAP documents no audience check
    "verify_iss": False,
    # Times are checked against the injected clock in TokenVerifier._check_times (PyJWT reads the wall clock).
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
}


class TokenVerifier:
    """Verifies proxy authorization tokens (XSUAA-style JWTs) offline.

    Checks, in order, each refusal an :class:`AuthError` with the reason given:

    1. size at most ``max_token_bytes`` (``too_large``);
    2. shape: three base64url parts, header and payload JSON objects, ``kid``/``jku`` strings if present
       (``malformed``);
    3. the header's ``alg`` is one of :data:`ALLOWED_ALGORITHMS`, before any key lookup; ``none`` and
       ``HS*`` never are (``algorithm_not_allowed``);
    4. the key, by ``kid`` through the :class:`KeyStore` (``unknown_key``, ``untrusted_key_url``,
       ``key_fetch_failed``), and that it fits ``alg`` (``algorithm_not_allowed``);
    5. the signature (``bad_signature``), with PyJWT restricted to that one algorithm and key;
    6. ``exp`` present and numeric (``malformed``), ``exp`` not passed by more than the leeway
       (``expired``), ``nbf`` and ``iat`` not ahead by more than the leeway (``not_yet_valid``), all against
       the injected clock;
    7. ``client_id`` (else ``cid``) is one of ``allowed_client_ids`` (``client_not_allowed``).

    No audience or issuer check (SAP documents none).
    """

    _log = Logger()

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        allowed_client_ids: Sequence[str],
        key_store: KeyStore,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Make a verifier.

        :param reactor: its ``seconds()`` is the default clock.
        :param clock: the time source for ``exp``/``nbf``/``iat`` (seconds since the epoch).
        :raises ValueError: ``allowed_client_ids`` is empty or holds an empty id, or ``leeway_seconds`` is
            negative.
        :raises TypeError: ``allowed_client_ids`` is a bare string.
        """
        if isinstance(allowed_client_ids, str):
            raise TypeError("allowedClientId must be a list of client ids, not a string")
        if not allowed_client_ids or not all(allowed_client_ids):
            raise ValueError("allowedClientId is required where proxy authorization is enabled")
        if leeway_seconds < 0:
            raise ValueError("the token time leeway cannot be negative")
        self._allowed = frozenset(allowed_client_ids)
        self._key_store = key_store
        self._leeway = leeway_seconds
        self._max_token_bytes = max_token_bytes
        self._clock: Callable[[], float] = clock if clock is not None else reactor.seconds

    def verify(self, token: str) -> Deferred[dict[str, Any]]:
        """Verify ``token`` (the bare JWT, without ``Bearer``); fires with its claims or fails with
        :class:`AuthError` (see the class docstring for the checks and reasons)."""
        return Deferred.fromCoroutine(self._verify(token))

    async def _verify(self, token: str) -> dict[str, Any]:
        try:
            claims = await self._verify_steps(token)
        except AuthError as error:
            self._log.debug("proxy token refused: {reason}", reason=error.reason)
            raise
        return claims

    async def _verify_steps(self, token: str) -> dict[str, Any]:
        if len(token) > self._max_token_bytes:
            raise AuthError("too_large")
        header, _ = _split_token(token, "proxy_token")
        kid, jku = header.get("kid"), header.get("jku")
        if not isinstance(kid, (str, type(None))) or not isinstance(jku, (str, type(None))):
            raise AuthError("malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthError("algorithm_not_allowed")

        key = await self._key_store.get_key(kid=kid, jku=jku, alg=alg)
        try:
            claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=[alg], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm_not_allowed") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed") from None

        self._check_times(claims)
        client_id = client_id_of(claims)
        if client_id is None or client_id not in self._allowed:
            self._log.info("token of client {client_id} is not allowed", client_id=_for_log(client_id))
            raise AuthError("client_not_allowed")
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp = claims.get("exp")
        if not _is_number(exp):
            raise AuthError("malformed")
        if exp <= now - self._leeway:
            raise AuthError("expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise AuthError("malformed")
            if value > now + self._leeway:
                raise AuthError("not_yet_valid")


# --------------------------------------------------------------------------------------------------------
# the mode matrix

def _check_mode(tenant_mode: str, subaccount_id: str | None) -> None:
    """:raises ValueError: unknown ``tenant_mode``, or ``dedicated`` without ``subaccount_id``."""
    if tenant_mode not in TENANT_MODES:
        raise ValueError(f"tenantMode must be one of {', '.join(TENANT_MODES)}, not {tenant_mode!r}")
    if tenant_mode == "dedicated" and not subaccount_id:
        raise ValueError("subaccountId is required in dedicated tenant mode")


def _unverified_claims(token: str, max_bytes: int) -> dict[str, Any]:
    """The payload of a service token, WITHOUT checking its signature or times (trusted mode only).

    :raises AuthError: ``too_large``, ``malformed`` (with ``source="service_token"``).
    """
    if len(token) > max_bytes:
        raise AuthError("too_large", source="service_token")
    _, payload = _split_token(token, "service_token")
    return payload


class Authorizer:
    """Decides, for one front end, whether a proxy call may go ahead and for which tenant.

    With authorization **enabled** a proxy token is required (``missing``) and verified
    (:class:`TokenVerifier`; any of its reasons). In ``dedicated`` mode the tenant is ``subaccount_id`` and the
    token's tenant (:func:`tenant_of`) must be that one (``wrong_tenant``, also when the token names no
    tenant); in ``shared`` mode the tenant is the token's (``no_tenant`` if it names none). A service token is
    ignored.

    With authorization **disabled** (trusted mode) the caller is trusted: a proxy token sent anyway is
    ignored, not even parsed. In ``dedicated`` mode the tenant is ``subaccount_id``. In ``shared`` mode the
    tenant comes from the service token (HTTP ``SAP-CP-Connectivity-Service-Token``; for SOCKS5 the method
    0x80 token), which is decoded **without** verifying its signature or times: trusted mode means the
    network position of the caller is what is trusted (SAP: the application obtained that token with its
    ``connectivity_proxy`` service key), and this proxy has no keys to check it with. Refusals then carry
    ``source="service_token"``: ``missing`` (absent or empty), ``too_large``, ``malformed`` (not a decodable
    JWT), ``no_tenant``.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        tenant_mode: str,
        subaccount_id: str | None,
        authorization_enabled: bool,
        verifier: TokenVerifier | None,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    ) -> None:
        """Make an authorizer.

        :param subaccount_id: the tenant in ``dedicated`` mode (required there); ignored in ``shared`` mode.
        :param verifier: required when ``authorization_enabled``; ignored otherwise.
        :param max_token_bytes: size cap for a service token in trusted shared mode.
        :raises ValueError: unknown ``tenant_mode``, ``dedicated`` without ``subaccount_id``, or
            authorization enabled without a ``verifier``.
        """
        _check_mode(tenant_mode, subaccount_id)
        if authorization_enabled and verifier is None:
            raise ValueError("proxy authorization is enabled but no token verifier was given")
        self.tenant_mode = tenant_mode
        self.subaccount_id = subaccount_id if tenant_mode == "dedicated" else None
        self.authorization_enabled = authorization_enabled
        self._verifier = verifier if authorization_enabled else None
        self._max_token_bytes = max_token_bytes

    def authorize(self, *, proxy_token: str | None, service_token: str | None = None) -> Deferred[Caller]:
        """Authorize one proxy call; fires with the :class:`Caller` or fails with :class:`AuthError`.

        :param proxy_token: the bare proxy JWT (HTTP: :func:`bearer_token` of ``Proxy-Authorization``; SOCKS5:
            the method 0x80 token), or ``None``/``""`` if none was sent.
        :param service_token: the ``SAP-CP-Connectivity-Service-Token`` value (a leading ``Bearer`` is
            tolerated); used only in trusted shared mode. For SOCKS5 pass the 0x80 token here too.
        """
        if self._verifier is None:
            # Trusted mode decides synchronously: skip the coroutine machinery (once per proxied request).
            return maybeDeferred(self._trusted, service_token)
        return Deferred.fromCoroutine(self._authorize(proxy_token, service_token))

    async def _authorize(self, proxy_token: str | None, service_token: str | None) -> Caller:
        if self._verifier is None:
            return self._trusted(service_token)
        if not proxy_token:
            raise AuthError("missing")
        claims = await self._verifier.verify(proxy_token)
        token_tenant = tenant_of(claims)
        if self.subaccount_id is not None:
            if token_tenant != self.subaccount_id:
                self._log.info(
                    "token of tenant {token_tenant} refused by the proxy of tenant {tenant}",
                    token_tenant=_for_log(token_tenant),
                    tenant=self.subaccount_id,
                )
                raise AuthError("wrong_tenant")
            tenant = self.subaccount_id
        elif token_tenant is None:
            raise AuthError("no_tenant")
        else:
            tenant = token_tenant
        return Caller(
            tenant=tenant,
            client_id=client_id_of(claims),
            subject=_nonempty_str(claims.get("sub")),
            verified=True,
        )

    def _trusted(self, service_token: str | None) -> Caller:
        if self.subaccount_id is not None:
            return Caller(tenant=self.subaccount_id, client_id=None, subject=None, verified=False)
        token = bearer_token(service_token) or (service_token or "").strip()
        if not token:
            raise AuthError("missing", source="service_token")
        claims = _unverified_claims(token, self._max_token_bytes)
        tenant = tenant_of(claims)
        if tenant is None:
            raise AuthError("no_tenant", source="service_token")
        return Caller(
            tenant=tenant,
            client_id=client_id_of(claims),
            subject=_nonempty_str(claims.get("sub")),
            verified=False,
        )


def make_authorizer(
    *,
    reactor: IReactorTime,
    tenant_mode: str,
    subaccount_id: str | None,
    authorization_enabled: bool,
    allowed_client_ids: Sequence[str] = (),
    token_keys_file: str | None = None,
    token_keys_url: str | None = None,
    uaa_domain: str | None = None,
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
    allow_insecure_loopback: bool = False,
    key_store: KeyStore | None = None,
) -> Authorizer:
    """Build the :class:`Authorizer` of one front end from configuration values.

    With authorization disabled nothing but the mode is used (no key file is read). With it enabled, a
    :class:`KeyStore` is built from ``token_keys_file``/``token_keys_url``/``uaa_domain`` unless ``key_store``
    is given: build one store with :class:`KeyStore` and pass it to every front end so that they share the
    key cache and the fetch rate limit.

    :raises ValueError: see :class:`Authorizer`, :class:`TokenVerifier` and :class:`KeyStore` (no
        ``allowedClientId``, no key source, unreadable key file, non-https key URL, ...).
    """
    verifier: TokenVerifier | None = None
    _check_mode(tenant_mode, subaccount_id)
    if authorization_enabled:
        if isinstance(allowed_client_ids, str) or not allowed_client_ids:
            raise ValueError("allowedClientId is required where proxy authorization is enabled")
        if key_store is None:
            key_store = KeyStore(
                reactor=reactor,
                token_keys_file=token_keys_file,
                token_keys_url=token_keys_url,
                uaa_domain=uaa_domain,
                allow_insecure_loopback=allow_insecure_loopback,
            )
        verifier = TokenVerifier(
            reactor=reactor,
            allowed_client_ids=tuple(allowed_client_ids),
            key_store=key_store,
            leeway_seconds=leeway_seconds,
        )
    return Authorizer(
        tenant_mode=tenant_mode,
        subaccount_id=subaccount_id,
        authorization_enabled=authorization_enabled,
        verifier=verifier,
    )
