# Twisted's web server API and pytest_twisted's decorators are untyped:
# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""End-to-end token key fetching: a real JWKS HTTP server on 127.0.0.1, the real reactor (pytest-twisted),
the default ``Agent`` fetcher. Every listening port is closed at the end of its test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from typing import Any, cast

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connproxy.proxy.auth import AuthError, KeyStore, TokenVerifier

CLIENT = "sb-app!t1"


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@pytest.fixture
def fetch_errors() -> Generator[list[str], None, None]:
    """The ``error`` field of every "fetching token keys ... failed" log event during the test."""
    errors: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_format", "").startswith("fetching token keys from {url} failed"):
            errors.append(event["error"])

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield errors
    globalLogPublisher.removeObserver(observer)


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    return {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")}


def jwks(keys: dict[str, rsa.RSAPrivateKey], *kids: str) -> bytes:
    members = []
    for kid in kids:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(keys[kid].public_key(), as_dict=True)
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        members.append(jwk)
    return json.dumps({"keys": members}).encode()


def token(keys: dict[str, rsa.RSAPrivateKey], kid: str, signer: str | None = None, **headers: Any) -> str:
    now = int(time.time())
    claims = {"client_id": CLIENT, "zid": "tenant-a", "iat": now, "exp": now + 300}
    return jwt.encode(claims, keys[signer or kid], algorithm="RS256", headers={"kid": kid, **headers})


class JwksResource(Resource):
    """Serves ``body`` at any path, counting hits. ``mode``: ``ok``, ``hang`` (never answers), ``chunked``
    (no Content-Length), ``status`` (404)."""

    isLeaf = True

    def __init__(self, body: bytes, mode: str = "ok") -> None:
        super().__init__()
        self.body = body
        self.mode = mode
        self.hits = 0
        self.hanging: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.hits += 1
        request.setHeader(b"content-type", b"application/json")
        if self.mode == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.mode == "status":
            request.setResponseCode(404)
            return b"not found"
        if self.mode == "chunked":
            for start in range(0, len(self.body), 8192):
                request.write(self.body[start : start + 8192])
            request.finish()
            return NOT_DONE_YET
        return self.body


@defer.inlineCallbacks
def serve(resource: JwksResource) -> Generator[defer.Deferred[Any], Any, IListeningPort]:
    port: IListeningPort = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(Site(resource))
    return port


def url_of(port: IListeningPort, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port.getHost().port}/token_keys"  # type: ignore[attr-defined]


def verifier_for(store: KeyStore) -> TokenVerifier:
    return TokenVerifier(reactor=reactor(), allowed_client_ids=[CLIENT], key_store=store)


@defer.inlineCallbacks
def refused(d: defer.Deferred[Any]) -> Generator[defer.Deferred[Any], Any, str]:
    try:
        yield d
    except AuthError as error:
        return error.reason
    raise AssertionError("the token was accepted")


@pytest_twisted.inlineCallbacks
def test_token_keys_url_end_to_end(keys: dict[str, rsa.RSAPrivateKey]) -> Generator[Any, Any, None]:
    resource = JwksResource(jwks(keys, "k1"))
    port = yield serve(resource)
    try:
        store = KeyStore(reactor=reactor(), token_keys_url=url_of(port), allow_insecure_loopback=True)
        verifier = verifier_for(store)
        claims = yield verifier.verify(token(keys, "k1"))
        assert claims["client_id"] == CLIENT
        claims = yield verifier.verify(token(keys, "k1"))
        assert resource.hits == 1  # cached
        assert (yield refused(verifier.verify(token(keys, "k1", signer="k2")))) == "bad_signature"
        assert resource.hits == 1
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_unknown_kid_triggers_exactly_one_refetch(keys: dict[str, rsa.RSAPrivateKey]) -> Generator[Any, Any, None]:
    resource = JwksResource(jwks(keys, "k1"))
    port = yield serve(resource)
    now = [1000.0]
    try:
        store = KeyStore(
            reactor=reactor(), token_keys_url=url_of(port), allow_insecure_loopback=True, clock=lambda: now[0]
        )
        verifier = verifier_for(store)
        yield verifier.verify(token(keys, "k1"))
        assert resource.hits == 1

        # The issuer rotates in k2; three concurrent requests with k2 share one refetch.
        resource.body = jwks(keys, "k1", "k2")
        now[0] += 31
        results = yield defer.gatherResults([verifier.verify(token(keys, "k2")) for _ in range(3)])
        assert all(claims["client_id"] == CLIENT for claims in results)
        assert resource.hits == 2

        # Another unknown kid right away: refused without a fetch (rate limit).
        assert (yield refused(verifier.verify(token(keys, "k3", signer="k1")))) == "unknown_key"
        assert resource.hits == 2
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_jku_under_loopback_uaa_domain(keys: dict[str, rsa.RSAPrivateKey]) -> Generator[Any, Any, None]:
    resource = JwksResource(jwks(keys, "k1"))
    port = yield serve(resource)
    try:
        jku = url_of(port, host="localhost")
        relaxed = KeyStore(reactor=reactor(), uaa_domain="localhost", allow_insecure_loopback=True)
        claims = yield verifier_for(relaxed).verify(token(keys, "k1", jku=jku))
        assert claims["zid"] == "tenant-a"
        assert resource.hits == 1

        strict = KeyStore(reactor=reactor(), uaa_domain="localhost")
        assert (yield refused(verifier_for(strict).verify(token(keys, "k1", jku=jku)))) == "untrusted_key_url"
        other = KeyStore(reactor=reactor(), uaa_domain="uaa.example.com", allow_insecure_loopback=True)
        assert (yield refused(verifier_for(other).verify(token(keys, "k1", jku=jku)))) == "untrusted_key_url"
        assert resource.hits == 1
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_server_that_never_answers_times_out(
    keys: dict[str, rsa.RSAPrivateKey], fetch_errors: list[str]
) -> Generator[Any, Any, None]:
    resource = JwksResource(b"", mode="hang")
    port = yield serve(resource)
    try:
        store = KeyStore(
            reactor=reactor(), token_keys_url=url_of(port), allow_insecure_loopback=True, fetch_timeout=0.5
        )
        started = time.monotonic()
        assert (yield refused(verifier_for(store).verify(token(keys, "k1")))) == "key_fetch_failed"
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 5
        assert resource.hits == 1
        assert fetch_errors == ["no JWKS within the timeout of 0.5 seconds"]
        # The client gave up and closed the connection.
        yield deferLater(0.1)
        assert all(request.channel is None or request._disconnected for request in resource.hanging)
    finally:
        yield port.stopListening()


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor(), seconds, lambda: None)


@pytest.mark.parametrize("mode", ["ok", "chunked"])
@pytest_twisted.inlineCallbacks
def test_oversized_jwks_is_refused(
    keys: dict[str, rsa.RSAPrivateKey], mode: str, fetch_errors: list[str]
) -> Generator[Any, Any, None]:
    padding = [{"kty": "RSA", "kid": f"pad{i}", "n": "x" * 1000, "e": "AQAB"} for i in range(200)]
    body = json.dumps({"keys": [*json.loads(jwks(keys, "k1"))["keys"], *padding]}).encode()
    assert len(body) > 64 * 1024
    resource = JwksResource(body, mode=mode)
    port = yield serve(resource)
    try:
        store = KeyStore(
            reactor=reactor(), token_keys_url=url_of(port), allow_insecure_loopback=True, max_jwks_bytes=64 * 1024
        )
        assert (yield refused(verifier_for(store).verify(token(keys, "k1")))) == "key_fetch_failed"
        assert resource.hits == 1
        assert fetch_errors == [f"the JWKS is larger than {64 * 1024} bytes"]
        # Within the limit the same document is fine.
        roomy = KeyStore(reactor=reactor(), token_keys_url=url_of(port), allow_insecure_loopback=True)
        claims = yield verifier_for(roomy).verify(token(keys, "k1"))
        assert claims["client_id"] == CLIENT
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_error_status_is_key_fetch_failed(
    keys: dict[str, rsa.RSAPrivateKey], fetch_errors: list[str]
) -> Generator[Any, Any, None]:
    resource = JwksResource(jwks(keys, "k1"), mode="status")
    port = yield serve(resource)
    try:
        store = KeyStore(reactor=reactor(), token_keys_url=url_of(port), allow_insecure_loopback=True)
        assert (yield refused(verifier_for(store).verify(token(keys, "k1")))) == "key_fetch_failed"
        assert fetch_errors == ["the JWKS server answered HTTP 404"]
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_connection_refused_is_key_fetch_failed(keys: dict[str, rsa.RSAPrivateKey]) -> Generator[Any, Any, None]:
    port = yield serve(JwksResource(b""))
    url = url_of(port)
    yield port.stopListening()  # nothing listens there any more
    store = KeyStore(reactor=reactor(), token_keys_url=url, allow_insecure_loopback=True)
    assert (yield refused(verifier_for(store).verify(token(keys, "k1")))) == "key_fetch_failed"
