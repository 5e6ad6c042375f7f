"""Tests for :mod:`connproxy.proxy.auth`: every attack refused with its own reason, the key store's fetch rate limit,
and the tenant-mode × authorization matrix. Synchronous: a ``task.Clock`` and a fake JWKS fetcher, no reactor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from connproxy.proxy.auth import (
    ALLOWED_ALGORITHMS,
    AUTH_REASONS,
    AuthError,
    Authorizer,
    Caller,
    KeyStore,
    TokenVerifier,
    bearer_token,
    client_id_of,
    make_authorizer,
    tenant_of,
)

NOW = 1_700_000_000.0
CLIENT = "sb-app!t1"
TENANT_A = "tenant-a"
TENANT_B = "tenant-b"
KEYS_URL = "https://keys.example.com/token_keys"
UAA = "authentication.eu10.example.com"


# --------------------------------------------------------------------------------------------------------
# helpers


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired; re-raises its failure."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def refusal(d: defer.Deferred[Any]) -> AuthError:
    """The AuthError a fired Deferred failed with."""
    with pytest.raises(AuthError) as info:
        result_of(d)
    return info.value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64url(json.dumps(value).encode())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    data.update({"kid": kid, "use": "sig", **extra})
    return data


def jwks_bytes(*jwks: object) -> bytes:
    return json.dumps({"keys": list(jwks)}).encode()


def claims_for(tenant: str | None = TENANT_A, client: str = CLIENT, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"client_id": client, "cid": client, "iat": int(NOW), "exp": int(NOW) + 600}
    if tenant is not None:
        claims.update(zid=tenant, ext_attr={"subaccountid": tenant})
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def sign(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    claims: Mapping[str, Any],
    *,
    kid: str | None = "k1",
    alg: str = "RS256",
    **headers: Any,
) -> str:
    header = dict(headers)
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(dict(claims), key, algorithm=alg, headers=header)


@dataclass
class FakeFetcher:
    """A JWKS fetch seam: answers from ``bodies`` at once, or hands out Deferreds the test fires (``hold``)."""

    bodies: dict[str, bytes] = field(default_factory=dict)
    hold: bool = False
    calls: list[str] = field(default_factory=list)
    pending: list[defer.Deferred[bytes]] = field(default_factory=list)

    def __call__(self, url: str) -> defer.Deferred[bytes]:
        self.calls.append(url)
        if self.hold:
            d: defer.Deferred[bytes] = defer.Deferred()
            self.pending.append(d)
            return d
        if url not in self.bodies:
            return defer.fail(OSError("connection refused"))
        return defer.succeed(self.bodies[url])


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def keys_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "token_keys.json"
    path.write_bytes(jwks_bytes(jwk_of(rsa_key, "k1", alg="RS256"), jwk_of(rsa_key, "k-noalg"), jwk_of(ec_key, "e1")))
    return path


@pytest.fixture
def file_verifier(clock: Clock, keys_file: Path) -> TokenVerifier:
    store = KeyStore(reactor=clock, token_keys_file=keys_file)
    return TokenVerifier(reactor=clock, allowed_client_ids=[CLIENT], key_store=store)


def url_store(clock: Clock, fetcher: FakeFetcher, **kwargs: Any) -> KeyStore:
    kwargs.setdefault("token_keys_url", KEYS_URL)
    return KeyStore(reactor=clock, fetch=fetcher, **kwargs)


def verifier_for(clock: Clock, store: KeyStore, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(reactor=clock, allowed_client_ids=[CLIENT], key_store=store, **kwargs)


@implementer(ILogObserver)
@dataclass
class Collect:
    events: list[LogEvent] = field(default_factory=list)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    observer = Collect()
    globalLogPublisher.addObserver(observer)
    yield observer.events
    globalLogPublisher.removeObserver(observer)


# --------------------------------------------------------------------------------------------------------
# AuthError, helpers


def test_every_reason_has_a_sentence_and_no_token() -> None:
    assert len(AUTH_REASONS) == 13
    for reason in AUTH_REASONS:
        error = AuthError(reason)  # type: ignore[arg-type]
        assert error.reason == reason
        assert str(error) and str(error) == error.args[0]
    assert str(AuthError("missing")) == "no proxy authorization token"
    assert "SAP-CP-Connectivity-Service-Token" in str(AuthError("missing", source="service_token"))


def test_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        AuthError("nope")  # type: ignore[arg-type]


def test_http_status_recommendation() -> None:
    assert AuthError("expired").http_status == 407
    assert AuthError("missing").http_status == 407
    assert AuthError("missing", source="service_token").http_status == 400
    assert AuthError("key_fetch_failed").http_status == 503
    assert not AuthError("key_fetch_failed").client_fault
    assert AuthError("bad_signature").client_fault


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        (b"bearer   abc ", "abc"),
        ("BEARER x", "x"),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
        (b"Bearer \xff", None),
    ],
)
def test_bearer_token(value: str | bytes | None, expected: str | None) -> None:
    assert bearer_token(value) == expected


def test_tenant_of_prefers_subaccountid_then_zid() -> None:
    assert tenant_of({"zid": "z", "ext_attr": {"subaccountid": "s"}}) == "s"
    assert tenant_of({"zid": "z", "ext_attr": {"subaccountid": ""}}) == "z"
    assert tenant_of({"zid": "z", "ext_attr": "nope"}) == "z"
    assert tenant_of({"zid": 5}) is None
    assert tenant_of({}) is None


def test_client_id_of() -> None:
    assert client_id_of({"client_id": "a", "cid": "b"}) == "a"
    assert client_id_of({"cid": "b"}) == "b"
    assert client_id_of({"client_id": 3}) is None


# --------------------------------------------------------------------------------------------------------
# TokenVerifier: accepted tokens


def test_valid_token_verifies(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    claims = result_of(file_verifier.verify(sign(rsa_key, claims_for())))
    assert claims["client_id"] == CLIENT
    assert tenant_of(claims) == TENANT_A


def test_cid_only_token_verifies(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(client_id=None))
    assert result_of(file_verifier.verify(token))["cid"] == CLIENT


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_algorithms_with_a_key_that_declares_no_alg(
    file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, alg: str
) -> None:
    token = sign(rsa_key, claims_for(), kid="k-noalg", alg=alg)
    assert result_of(file_verifier.verify(token))["client_id"] == CLIENT


def test_es256(file_verifier: TokenVerifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = sign(ec_key, claims_for(), kid="e1", alg="ES256")
    assert result_of(file_verifier.verify(token))["client_id"] == CLIENT


def test_no_audience_check(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(aud=["someone-else"]))
    assert result_of(file_verifier.verify(token))["aud"] == ["someone-else"]


# --------------------------------------------------------------------------------------------------------
# TokenVerifier: attacks, each with its reason


def test_alg_none_refused_before_any_key_lookup(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    for alg in ("none", "None", "NONE"):
        token = f"{b64json({'alg': alg, 'kid': 'k1', 'typ': 'JWT'})}.{b64json(claims_for())}."
        assert refusal(verifier.verify(token)).reason == "algorithm_not_allowed"
    assert fetcher.calls == []


def test_hs256_signed_with_the_rsa_public_key_pem_refused(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic key-confusion attack: HMAC keyed with the (public) RSA key PEM."""
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
        signing_input = f"{b64json({'alg': alg, 'kid': 'k1', 'typ': 'JWT'})}.{b64json(claims_for())}"
        signature = b64url(hmac.new(pem, signing_input.encode(), digest).digest())
        token = f"{signing_input}.{signature}"
        assert refusal(verifier.verify(token)).reason == "algorithm_not_allowed"
    assert fetcher.calls == []


def test_hs256_refused_by_the_key_store_and_by_pyjwt_with_a_pyjwk(
    clock: Clock, keys_file: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Defence in depth below the verifier's algorithm check."""
    store = KeyStore(reactor=clock, token_keys_file=keys_file)
    assert refusal(store.get_key(kid="k1", jku=None, alg="HS256")).reason == "algorithm_not_allowed"
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64json({'alg': 'HS256', 'kid': 'k1'})}.{b64json(claims_for())}"
    token = f"{signing_input}.{b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"
    key = result_of(store.get_key(kid="k1", jku=None, alg="RS256"))
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, key=key, algorithms=["HS256"])


def test_algorithm_must_fit_the_key(
    file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    # k1 declares alg RS256: a PS256 token naming it is refused.
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(), alg="PS256"))).reason == (
        "algorithm_not_allowed"
    )
    # An ES256 token naming an RSA key, and an RS256 token naming an EC key.
    assert refusal(file_verifier.verify(sign(ec_key, claims_for(), kid="k-noalg", alg="ES256"))).reason == (
        "algorithm_not_allowed"
    )
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(), kid="e1"))).reason == (
        "algorithm_not_allowed"
    )
    # ES384 does not fit a P-256 key.
    header = b64json({"alg": "ES384", "kid": "e1"})
    assert refusal(file_verifier.verify(f"{header}.{b64json(claims_for())}.AAAA")).reason == (
        "algorithm_not_allowed"
    )


def test_bad_signature(
    file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    assert refusal(file_verifier.verify(sign(other_rsa_key, claims_for()))).reason == "bad_signature"
    header, _, signature = sign(rsa_key, claims_for()).split(".")
    forged = f"{header}.{b64json(claims_for(TENANT_B))}.{signature}"
    assert refusal(file_verifier.verify(forged)).reason == "bad_signature"
    unsigned = f"{header}.{b64json(claims_for())}."
    assert refusal(file_verifier.verify(unsigned)).reason == "bad_signature"


def test_unknown_kid_from_file_only(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(), kid="other"))).reason == "unknown_key"


def test_token_without_kid_is_unknown_key(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(), kid=None))).reason == "unknown_key"


def test_expired(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(iat=int(NOW) - 3600, exp=int(NOW) - 31))
    assert refusal(file_verifier.verify(token)).reason == "expired"


def test_expired_exactly_at_the_leeway(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(iat=int(NOW) - 3600, exp=int(NOW) - 30))
    assert refusal(file_verifier.verify(token)).reason == "expired"


def test_expired_within_leeway_accepted(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(iat=int(NOW) - 3600, exp=int(NOW) - 29))
    assert result_of(file_verifier.verify(token))["client_id"] == CLIENT


def test_not_yet_valid(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(nbf=int(NOW) + 31)))).reason == (
        "not_yet_valid"
    )
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(iat=int(NOW) + 31)))).reason == (
        "not_yet_valid"
    )


def test_not_yet_valid_within_leeway_accepted(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(nbf=int(NOW) + 29, iat=int(NOW) + 29))
    assert result_of(file_verifier.verify(token))["client_id"] == CLIENT


def test_time_follows_the_injected_clock(
    clock: Clock, file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, claims_for(exp=int(NOW) + 60))
    assert result_of(file_verifier.verify(token))
    clock.advance(60 + 30)
    assert refusal(file_verifier.verify(token)).reason == "expired"


def test_custom_leeway(clock: Clock, keys_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = verifier_for(clock, KeyStore(reactor=clock, token_keys_file=keys_file), leeway_seconds=0)
    assert refusal(verifier.verify(sign(rsa_key, claims_for(exp=int(NOW) - 1)))).reason == "expired"


@pytest.mark.parametrize("bad", ["soon", True, None, [1], float("nan"), float("inf")])
def test_missing_or_non_numeric_exp(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, bad: Any) -> None:
    token = sign(rsa_key, claims_for(exp=bad))
    assert refusal(file_verifier.verify(token)).reason == "malformed"


def test_non_numeric_nbf(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    assert refusal(file_verifier.verify(sign(rsa_key, claims_for(nbf="later")))).reason == "malformed"


def test_wrong_client_id(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(client="sb-other!t9"))
    assert refusal(file_verifier.verify(token)).reason == "client_not_allowed"
    no_client = sign(rsa_key, claims_for(client_id=None, cid=None))
    assert refusal(file_verifier.verify(no_client)).reason == "client_not_allowed"


def test_truncated_token(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for())
    header, payload, signature = token.split(".")
    assert refusal(file_verifier.verify(f"{header}.{payload}")).reason == "malformed"
    assert refusal(file_verifier.verify(f"{header}.{payload[: len(payload) // 2]}")).reason == "malformed"
    # A shorter signature that is still canonical base64url: a signature check failure.
    assert len(signature) % 4 == 2
    cut_signature = f"{header}.{payload}.{signature[:-2]}"
    assert refusal(file_verifier.verify(cut_signature)).reason == "bad_signature"
    # One that is not (stray bits in the last character): malformed.
    assert refusal(file_verifier.verify(f"{header}.{payload}.{signature[:-4]}x")).reason == "malformed"


def test_oversized_token(file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims_for(padding="x" * 20000))
    assert len(token) > 16384
    assert refusal(file_verifier.verify(token)).reason == "too_large"
    assert refusal(file_verifier.verify("a" * 16385)).reason == "too_large"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "a.b.c",
        "....",
        "..",
        "x.y",
        "é.é.é",
        f"{b64json([1, 2])}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256'})}.{b64json('string')}.AAAA",
        f"{b64json({'alg': 'RS256'})}.{b64url(b'not json')}.AAAA",
        f"{b64json({'alg': 'RS256'})}.{b64json({})}.AA!A",
        f"{b64url(b'{')}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256', 'kid': 5})}.{b64json({})}.AAAA",
        f"{b64json({'alg': 'RS256', 'kid': 'k1', 'jku': ['x']})}.{b64json({})}.AAAA",
    ],
)
def test_garbage_is_malformed(file_verifier: TokenVerifier, garbage: str) -> None:
    assert refusal(file_verifier.verify(garbage)).reason == "malformed"


def test_header_without_alg(file_verifier: TokenVerifier) -> None:
    token = f"{b64json({'kid': 'k1'})}.{b64json(claims_for())}.AAAA"
    assert refusal(file_verifier.verify(token)).reason == "algorithm_not_allowed"


def test_allowed_algorithms_are_asymmetric_only() -> None:
    assert not any(alg.startswith("HS") or alg.lower() == "none" for alg in ALLOWED_ALGORITHMS)
    assert "RS256" in ALLOWED_ALGORITHMS


def test_verifier_needs_allowed_client_ids(clock: Clock, keys_file: Path) -> None:
    store = KeyStore(reactor=clock, token_keys_file=keys_file)
    with pytest.raises(ValueError, match="allowedClientId"):
        TokenVerifier(reactor=clock, allowed_client_ids=[], key_store=store)
    with pytest.raises(TypeError):
        TokenVerifier(reactor=clock, allowed_client_ids="sb-app", key_store=store)


def test_tokens_never_logged(
    clock: Clock,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    log_events: list[LogEvent],
) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    tokens = [
        sign(rsa_key, claims_for()),
        sign(other_rsa_key, claims_for()),
        sign(rsa_key, claims_for(), kid="unknown"),
        sign(rsa_key, claims_for(client="evil")),
        sign(rsa_key, claims_for(exp=int(NOW) - 100)),
    ]
    for token in tokens:
        verifier.verify(token).addErrback(lambda f: None)
    assert log_events, "expected some log events"
    logged = repr(log_events)
    for token in tokens:
        for segment in token.split(".")[1:]:
            assert segment not in logged


# --------------------------------------------------------------------------------------------------------
# KeyStore: remote keys, refetch and its rate limit


def test_keys_url_fetched_once_and_cached(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    for _ in range(3):
        assert result_of(verifier.verify(sign(rsa_key, claims_for())))
        clock.advance(100)
    assert fetcher.calls == [KEYS_URL]


def test_unknown_kid_refetch_is_rate_limited(
    clock: Clock, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    assert result_of(verifier.verify(sign(rsa_key, claims_for())))
    assert fetcher.calls == [KEYS_URL]

    # First unknown kid 31 s later: one refetch (the key is still unknown).
    clock.advance(31)
    assert refusal(verifier.verify(sign(other_rsa_key, claims_for(), kid="k2"))).reason == "unknown_key"
    assert len(fetcher.calls) == 2

    # A second unknown kid within 30 s of that refetch: refused without fetching.
    clock.advance(29)
    assert refusal(verifier.verify(sign(other_rsa_key, claims_for(), kid="k3"))).reason == "unknown_key"
    assert len(fetcher.calls) == 2

    # The key is published (rotation); after the window, the next lookup fetches and succeeds.
    fetcher.bodies[KEYS_URL] = jwks_bytes(jwk_of(rsa_key, "k1"), jwk_of(other_rsa_key, "k2"))
    assert refusal(verifier.verify(sign(other_rsa_key, claims_for(), kid="k2"))).reason == "unknown_key"
    assert len(fetcher.calls) == 2
    clock.advance(1)
    assert result_of(verifier.verify(sign(other_rsa_key, claims_for(), kid="k2")))
    assert len(fetcher.calls) == 3
    # Known keys need no fetch, whatever the window.
    assert result_of(verifier.verify(sign(rsa_key, claims_for())))
    assert len(fetcher.calls) == 3


def test_first_lookup_fetches_even_for_unknown_kid(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    assert refusal(verifier.verify(sign(rsa_key, claims_for(), kid="zz"))).reason == "unknown_key"
    assert refusal(verifier.verify(sign(rsa_key, claims_for(), kid="zz"))).reason == "unknown_key"
    assert fetcher.calls == [KEYS_URL]
    assert result_of(verifier.verify(sign(rsa_key, claims_for())))
    assert fetcher.calls == [KEYS_URL]


def test_concurrent_lookups_share_one_fetch(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher(hold=True)
    verifier = verifier_for(clock, url_store(clock, fetcher))
    token = sign(rsa_key, claims_for())
    pending = [verifier.verify(token) for _ in range(5)]
    unknown = verifier.verify(sign(rsa_key, claims_for(), kid="k9"))
    assert fetcher.calls == [KEYS_URL]
    assert not any(d.called for d in pending)
    fetcher.pending[0].callback(jwks_bytes(jwk_of(rsa_key, "k1")))
    assert all(result_of(d)["client_id"] == CLIENT for d in pending)
    assert refusal(unknown).reason == "unknown_key"
    assert fetcher.calls == [KEYS_URL]


def test_cancelled_waiter_does_not_stop_the_fetch(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher(hold=True)
    verifier = verifier_for(clock, url_store(clock, fetcher))
    token = sign(rsa_key, claims_for())
    first, second = verifier.verify(token), verifier.verify(token)
    first.cancel()
    with pytest.raises(defer.CancelledError):
        result_of(first)
    fetcher.pending[0].callback(jwks_bytes(jwk_of(rsa_key, "k1")))
    assert result_of(second)["client_id"] == CLIENT


def test_fetch_failure_is_key_fetch_failed_and_rate_limited(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher()  # every fetch fails
    verifier = verifier_for(clock, url_store(clock, fetcher))
    token = sign(rsa_key, claims_for())
    assert refusal(verifier.verify(token)).reason == "key_fetch_failed"
    clock.advance(10)
    assert refusal(verifier.verify(token)).reason == "key_fetch_failed"
    assert len(fetcher.calls) == 1
    fetcher.bodies[KEYS_URL] = jwks_bytes(jwk_of(rsa_key, "k1"))
    clock.advance(21)
    assert result_of(verifier.verify(token))
    assert len(fetcher.calls) == 2


def test_fetch_timeout(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher(hold=True)
    verifier = verifier_for(clock, url_store(clock, fetcher, fetch_timeout=5))
    d = verifier.verify(sign(rsa_key, claims_for()))
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    assert refusal(d).reason == "key_fetch_failed"
    assert fetcher.pending[0].called  # cancelled
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"keys": "nope"}',
        b'{"keys": []}',
        b'{"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}]}',
        b"{" + b" " * 5000 + b'"keys": []}',
    ],
)
def test_unusable_jwks_is_key_fetch_failed(clock: Clock, rsa_key: rsa.RSAPrivateKey, body: bytes) -> None:
    fetcher = FakeFetcher({KEYS_URL: body})
    verifier = verifier_for(clock, url_store(clock, fetcher, max_jwks_bytes=4096))
    assert refusal(verifier.verify(sign(rsa_key, claims_for()))).reason == "key_fetch_failed"


def test_failed_refetch_keeps_cached_keys(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, url_store(clock, fetcher))
    assert result_of(verifier.verify(sign(rsa_key, claims_for())))
    fetcher.bodies.clear()
    clock.advance(60)
    assert refusal(verifier.verify(sign(rsa_key, claims_for(), kid="k2"))).reason == "key_fetch_failed"
    assert result_of(verifier.verify(sign(rsa_key, claims_for())))


def test_unusable_keys_are_skipped(clock: Clock, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = jwt.algorithms.RSAAlgorithm.to_jwk(weak, as_dict=True)
    path = tmp_path / "keys.json"
    path.write_bytes(
        jwks_bytes(
            jwk_of(weak, "weak"),
            dict(private, kid="private"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            jwk_of(ec_key, "enc", use="enc"),
            jwk_of(ec_key, "hs", alg="HS256"),
            jwk_of(ec_key, "good"),
            {"kty": "RSA"},
            "nonsense",
        )
    )
    store = KeyStore(reactor=clock, token_keys_file=path)
    for kid in ("weak", "private", "hmac", "enc", "hs"):
        assert refusal(store.get_key(kid=kid, jku=None, alg="RS256")).reason == "unknown_key"
    assert result_of(store.get_key(kid="good", jku=None, alg="ES256"))


# --------------------------------------------------------------------------------------------------------
# KeyStore: jku under uaaDomain


def jku_token(key: rsa.RSAPrivateKey, jku: str, kid: str = "k1", **claims: Any) -> str:
    return sign(key, claims_for(**claims), kid=kid, jku=jku)


def test_jku_in_uaa_domain_is_fetched(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    jku = f"https://tenant-a.{UAA}/token_keys"
    fetcher = FakeFetcher({jku: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, KeyStore(reactor=clock, uaa_domain=UAA, fetch=fetcher))
    assert result_of(verifier.verify(jku_token(rsa_key, jku)))
    apex = f"https://{UAA.upper()}:443/token_keys?zid=tenant-a"
    fetcher.bodies[apex] = jwks_bytes(jwk_of(rsa_key, "k1"))
    assert result_of(verifier.verify(jku_token(rsa_key, apex)))
    assert fetcher.calls == [jku, apex]


@pytest.mark.parametrize(
    "jku",
    [
        "https://evil.com/token_keys",
        f"https://{UAA}.evil.com/token_keys",
        f"https://tenant.{UAA}.evil.com/token_keys",
        f"https://evil{UAA}/token_keys",
        f"http://tenant.{UAA}/token_keys",
        f"https://tenant.{UAA}@evil.com/token_keys",
        f"https://evil.com\\@tenant.{UAA}/token_keys",
        f"https://evil.com#tenant.{UAA}",
        f"https://evil.com/?x=.{UAA}",
        f"ftp://tenant.{UAA}/token_keys",
        f"//tenant.{UAA}/token_keys",
        f"https://tenant.{UAA}:notaport/token_keys",
        f"https://tenant.{UAA} /token_keys",
        "http://localhost/token_keys",
        "",
        f"https://tenant.{UAA}/token_keys/1",  # only /token_keys: no endless distinct URLs to fetch and cache
        f"https://tenant.{UAA}/token_keys?n=1",
        f"https://tenant.{UAA}/token_keys?zid=a&n=1",
    ],
)
def test_jku_outside_uaa_domain_refused(clock: Clock, rsa_key: rsa.RSAPrivateKey, jku: str) -> None:
    fetcher = FakeFetcher()
    verifier = verifier_for(clock, KeyStore(reactor=clock, uaa_domain=UAA, fetch=fetcher))
    assert refusal(verifier.verify(jku_token(rsa_key, jku))).reason == "untrusted_key_url"
    assert fetcher.calls == []


def test_insecure_loopback_jku_only_when_allowed(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    jku = "http://localhost:8080/token_keys"
    fetcher = FakeFetcher({jku: jwks_bytes(jwk_of(rsa_key, "k1"))})
    strict = verifier_for(clock, KeyStore(reactor=clock, uaa_domain="localhost", fetch=fetcher))
    assert refusal(strict.verify(jku_token(rsa_key, jku))).reason == "untrusted_key_url"
    assert fetcher.calls == []
    relaxed = verifier_for(
        clock, KeyStore(reactor=clock, uaa_domain="localhost", fetch=fetcher, allow_insecure_loopback=True)
    )
    assert result_of(relaxed.verify(jku_token(rsa_key, jku)))
    assert fetcher.calls == [jku]


def test_insecure_non_loopback_never_allowed(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher()
    store = KeyStore(reactor=clock, uaa_domain=UAA, fetch=fetcher, allow_insecure_loopback=True)
    verifier = verifier_for(clock, store)
    assert refusal(verifier.verify(jku_token(rsa_key, f"http://t.{UAA}/token_keys"))).reason == (
        "untrusted_key_url"
    )
    assert fetcher.calls == []


def test_jku_ignored_without_uaa_domain(clock: Clock, file_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    assert result_of(file_verifier.verify(jku_token(rsa_key, "https://evil.com/token_keys")))


def test_jku_rate_limit_is_per_url(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    a, b = f"https://a.{UAA}/token_keys", f"https://b.{UAA}/token_keys"
    fetcher = FakeFetcher({a: jwks_bytes(jwk_of(rsa_key, "k1")), b: jwks_bytes(jwk_of(rsa_key, "k1"))})
    verifier = verifier_for(clock, KeyStore(reactor=clock, uaa_domain=UAA, fetch=fetcher))
    assert refusal(verifier.verify(jku_token(rsa_key, a, kid="x"))).reason == "unknown_key"
    assert refusal(verifier.verify(jku_token(rsa_key, a, kid="y"))).reason == "unknown_key"
    assert result_of(verifier.verify(jku_token(rsa_key, b)))
    assert fetcher.calls == [a, b]


def test_remembered_jku_urls_are_bounded(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher(hold=True)
    store = KeyStore(reactor=clock, uaa_domain=UAA, fetch=fetcher, max_key_urls=2)
    verifier = verifier_for(clock, store)
    first = verifier.verify(jku_token(rsa_key, f"https://t1.{UAA}/token_keys"))
    second = verifier.verify(jku_token(rsa_key, f"https://t2.{UAA}/token_keys"))
    # Both URLs are being fetched: a third cannot be remembered.
    assert refusal(verifier.verify(jku_token(rsa_key, f"https://t3.{UAA}/token_keys"))).reason == "key_fetch_failed"
    for d in fetcher.pending:
        d.callback(jwks_bytes(jwk_of(rsa_key, "k1")))
    assert result_of(first) and result_of(second)
    # Now idle: the least recently used one makes room.
    fetcher.hold = False
    fetcher.bodies[f"https://t3.{UAA}/token_keys"] = jwks_bytes(jwk_of(rsa_key, "k1"))
    assert result_of(verifier.verify(jku_token(rsa_key, f"https://t3.{UAA}/token_keys")))
    assert len(fetcher.calls) == 3


# --------------------------------------------------------------------------------------------------------
# KeyStore construction


def test_key_store_needs_a_source(clock: Clock) -> None:
    with pytest.raises(ValueError, match="tokenKeysFile"):
        KeyStore(reactor=clock)


@pytest.mark.parametrize("url", ["http://keys.example.com/k", "ftp://x/k", "not a url", "http://127.0.0.1/k"])
def test_key_store_refuses_insecure_urls(clock: Clock, url: str) -> None:
    with pytest.raises(ValueError, match="tokenKeysUrl"):
        KeyStore(reactor=clock, token_keys_url=url, fetch=FakeFetcher())


def test_key_store_allows_loopback_http_for_tests(clock: Clock) -> None:
    KeyStore(reactor=clock, token_keys_url="http://127.0.0.1:1/k", fetch=FakeFetcher(), allow_insecure_loopback=True)


def test_key_store_refuses_bad_files(clock: Clock, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        KeyStore(reactor=clock, token_keys_file=tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    with pytest.raises(ValueError, match="no usable"):
        KeyStore(reactor=clock, token_keys_file=empty)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(ValueError, match="larger"):
        KeyStore(reactor=clock, token_keys_file=big, max_jwks_bytes=1000)


@pytest.mark.parametrize("domain", ["", ".", "a b", "https://uaa.example.com", "a..b"])
def test_key_store_refuses_bad_uaa_domain(clock: Clock, domain: str) -> None:
    with pytest.raises(ValueError, match="uaaDomain"):
        KeyStore(reactor=clock, uaa_domain=domain, fetch=FakeFetcher())


def test_default_fetcher_needs_a_tcp_reactor(clock: Clock) -> None:
    with pytest.raises(TypeError):
        KeyStore(reactor=clock, token_keys_url=KEYS_URL)


# --------------------------------------------------------------------------------------------------------
# Authorizer: the mode matrix


@pytest.fixture
def verifier(file_verifier: TokenVerifier) -> TokenVerifier:
    return file_verifier


def authorizer(mode: str, enabled: bool, verifier: TokenVerifier | None) -> Authorizer:
    return Authorizer(
        tenant_mode=mode,
        subaccount_id=TENANT_A if mode == "dedicated" else None,
        authorization_enabled=enabled,
        verifier=verifier,
    )


def test_dedicated_authorized(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authorizer("dedicated", True, verifier)
    caller = result_of(auth.authorize(proxy_token=sign(rsa_key, claims_for(TENANT_A, sub="user-1"))))
    assert caller == Caller(tenant=TENANT_A, client_id=CLIENT, subject="user-1", verified=True)


def test_dedicated_authorized_refuses_other_tenant(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authorizer("dedicated", True, verifier)
    assert refusal(auth.authorize(proxy_token=sign(rsa_key, claims_for(TENANT_B)))).reason == "wrong_tenant"
    # ext_attr.subaccountid decides over zid.
    mixed = claims_for(TENANT_B, zid=TENANT_A)
    assert refusal(auth.authorize(proxy_token=sign(rsa_key, mixed))).reason == "wrong_tenant"


def test_dedicated_authorized_refuses_token_without_tenant(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = authorizer("dedicated", True, verifier)
    assert refusal(auth.authorize(proxy_token=sign(rsa_key, claims_for(None)))).reason == "wrong_tenant"


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
@pytest.mark.parametrize("token", [None, ""])
def test_authorized_modes_require_a_token(verifier: TokenVerifier, mode: str, token: str | None) -> None:
    error = refusal(authorizer(mode, True, verifier).authorize(proxy_token=token))
    assert (error.reason, error.source, str(error)) == ("missing", "proxy_token", "no proxy authorization token")


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_authorized_modes_verify_the_token(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, mode: str) -> None:
    expired = sign(rsa_key, claims_for(exp=int(NOW) - 100))
    assert refusal(authorizer(mode, True, verifier).authorize(proxy_token=expired)).reason == "expired"


def test_shared_authorized_takes_the_tenant_from_the_token(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = authorizer("shared", True, verifier)
    service = sign(rsa_key, claims_for("tenant-c"))
    caller = result_of(auth.authorize(proxy_token=sign(rsa_key, claims_for(TENANT_B)), service_token=service))
    assert caller == Caller(tenant=TENANT_B, client_id=CLIENT, subject=None, verified=True)
    zid_only = claims_for(None, zid="tenant-z")
    assert result_of(auth.authorize(proxy_token=sign(rsa_key, zid_only))).tenant == "tenant-z"


def test_shared_authorized_needs_a_tenant_claim(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authorizer("shared", True, verifier)
    assert refusal(auth.authorize(proxy_token=sign(rsa_key, claims_for(None)))).reason == "no_tenant"


@pytest.mark.parametrize("token", [None, "", "garbage", "eyJhbGciOiJub25lIn0.e30.", "x" * 100000])
def test_dedicated_trusted_ignores_any_token(token: str | None) -> None:
    auth = authorizer("dedicated", False, None)
    caller = result_of(auth.authorize(proxy_token=token, service_token=token))
    assert caller == Caller(tenant=TENANT_A, client_id=None, subject=None, verified=False)


def test_trusted_mode_does_not_verify_even_if_given_a_verifier(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = authorizer("dedicated", False, verifier)
    caller = result_of(auth.authorize(proxy_token=sign(rsa_key, claims_for(TENANT_B, exp=1))))
    assert caller.tenant == TENANT_A and not caller.verified


def test_shared_trusted_takes_the_tenant_from_the_service_token(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = authorizer("shared", False, None)
    # Unverified by design: signed by an unknown key and long expired, still the tenant context.
    service = sign(other_rsa_key, claims_for("tenant-c", exp=1, sub="u"))
    caller = result_of(auth.authorize(proxy_token="garbage-ignored", service_token=service))
    assert caller == Caller(tenant="tenant-c", client_id=CLIENT, subject="u", verified=False)
    assert result_of(auth.authorize(proxy_token=None, service_token=f"Bearer {service}")).tenant == "tenant-c"


@pytest.mark.parametrize(
    ("service", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("  ", "missing"),
        ("garbage", "malformed"),
        ("a.b", "malformed"),
        (f"{b64json({'alg': 'none'})}.{b64json(['x'])}.", "malformed"),
        (f"{b64json({'alg': 'none'})}.{b64json({'client_id': 'c'})}.", "no_tenant"),
        (f"{b64json({'alg': 'none'})}.{b64json({'zid': 'x' * 20000})}.", "too_large"),
    ],
)
def test_shared_trusted_service_token_problems(service: str | None, reason: str) -> None:
    error = refusal(authorizer("shared", False, None).authorize(proxy_token="ignored", service_token=service))
    assert (error.reason, error.source) == (reason, "service_token")
    assert error.http_status == 400


def test_shared_trusted_accepts_an_unsigned_service_token() -> None:
    service = f"{b64json({'alg': 'none'})}.{b64json({'zid': 'tenant-z'})}."
    caller = result_of(authorizer("shared", False, None).authorize(proxy_token=None, service_token=service))
    assert caller == Caller(tenant="tenant-z", client_id=None, subject=None, verified=False)


def test_authorizer_settings_validated(verifier: TokenVerifier) -> None:
    with pytest.raises(ValueError, match="tenantMode"):
        Authorizer(tenant_mode="multi", subaccount_id="a", authorization_enabled=False, verifier=None)
    with pytest.raises(ValueError, match="subaccountId"):
        Authorizer(tenant_mode="dedicated", subaccount_id=None, authorization_enabled=False, verifier=None)
    with pytest.raises(ValueError, match="verifier"):
        Authorizer(tenant_mode="shared", subaccount_id=None, authorization_enabled=True, verifier=None)
    shared = Authorizer(tenant_mode="shared", subaccount_id="ignored", authorization_enabled=True, verifier=verifier)
    assert shared.subaccount_id is None


# --------------------------------------------------------------------------------------------------------
# make_authorizer


def test_make_authorizer_trusted_needs_no_keys(clock: Clock) -> None:
    auth = make_authorizer(
        reactor=clock,
        tenant_mode="dedicated",
        subaccount_id=TENANT_A,
        authorization_enabled=False,
        allowed_client_ids=(),
        token_keys_file="/nonexistent/never-read.json",
        token_keys_url=None,
        uaa_domain=None,
        leeway_seconds=30,
    )
    assert result_of(auth.authorize(proxy_token="x")).tenant == TENANT_A


def test_make_authorizer_with_key_file(clock: Clock, keys_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = make_authorizer(
        reactor=clock,
        tenant_mode="shared",
        subaccount_id=None,
        authorization_enabled=True,
        allowed_client_ids=[CLIENT],
        token_keys_file=str(keys_file),
        token_keys_url=None,
        uaa_domain=None,
        leeway_seconds=0,
    )
    assert result_of(auth.authorize(proxy_token=sign(rsa_key, claims_for(TENANT_B)))).tenant == TENANT_B
    late = sign(rsa_key, claims_for(TENANT_B, exp=int(NOW) - 1))
    assert refusal(auth.authorize(proxy_token=late)).reason == "expired"


def test_make_authorizer_shares_a_key_store(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetcher = FakeFetcher({KEYS_URL: jwks_bytes(jwk_of(rsa_key, "k1"))})
    store = url_store(clock, fetcher)
    common: dict[str, Any] = {
        "reactor": clock,
        "tenant_mode": "dedicated",
        "subaccount_id": TENANT_A,
        "authorization_enabled": True,
        "allowed_client_ids": [CLIENT],
        "key_store": store,
    }
    http, socks = make_authorizer(**common), make_authorizer(**common)
    token = sign(rsa_key, claims_for())
    assert result_of(http.authorize(proxy_token=token)).verified
    assert result_of(socks.authorize(proxy_token=token)).verified
    assert fetcher.calls == [KEYS_URL]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allowed_client_ids": [CLIENT]}, "token key source"),
        ({"allowed_client_ids": [], "uaa_domain": UAA}, "allowedClientId"),
        ({"allowed_client_ids": [CLIENT], "token_keys_url": "http://keys.example.com/k"}, "https"),
    ],
)
def test_make_authorizer_validates(clock: Clock, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_authorizer(
            reactor=clock, tenant_mode="shared", subaccount_id=None, authorization_enabled=True, **kwargs
        )

