"""Tests for :mod:`connproxy.pki.tokens` (``connproxy token``): the minted tokens verify with the JWKS written
next to the key, the key and its kid are stable, and the command prints one JWT and nothing else.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from connproxy.pki.tokens import (
    SIGNING_KEY_FILE,
    TOKEN_KEYS_FILE,
    TokenError,
    configure_parser,
    issue_token,
    load_or_create_signing_key,
    main_token,
    rsa_thumbprint,
)
from connproxy.proxy.auth import Authorizer, KeyStore, TokenVerifier

NOW = 1_700_000_000


def result_of(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def test_issued_token_verifies_with_the_written_jwks(tmp_path: Path) -> None:
    token = issue_token(tmp_path, "tenant-a", "sb-app!t1", now=NOW)
    jwks = json.loads((tmp_path / TOKEN_KEYS_FILE).read_text())
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(token, key=key, algorithms=["RS256"], options={"verify_exp": False})
    assert header["alg"] == "RS256"
    assert claims == {
        "client_id": "sb-app!t1",
        "cid": "sb-app!t1",
        "zid": "tenant-a",
        "ext_attr": {"subaccountid": "tenant-a"},
        "iat": NOW,
        "exp": NOW + 3600,
    }


def test_issued_token_passes_the_proxy_verifier(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(NOW + 10)
    token = issue_token(tmp_path, "tenant-a", "sb-app!t1", now=NOW, ttl=60)
    store = KeyStore(reactor=clock, token_keys_file=tmp_path / TOKEN_KEYS_FILE)
    verifier = TokenVerifier(reactor=clock, allowed_client_ids=["sb-app!t1"], key_store=store)
    authorizer = Authorizer(
        tenant_mode="dedicated", subaccount_id="tenant-a", authorization_enabled=True, verifier=verifier
    )
    caller = result_of(authorizer.authorize(proxy_token=token))
    assert (caller.tenant, caller.client_id, caller.verified) == ("tenant-a", "sb-app!t1", True)


def test_jwks_shape_and_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    key, kid = load_or_create_signing_key(tmp_path)
    jwks = json.loads((tmp_path / TOKEN_KEYS_FILE).read_text())
    assert list(jwks) == ["keys"] and len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    assert sorted(jwk) == ["alg", "e", "kid", "kty", "n", "use"]
    assert (jwk["kty"], jwk["kid"], jwk["use"], jwk["alg"], jwk["e"]) == ("RSA", kid, "sig", "RS256", "AQAB")
    assert kid == rsa_thumbprint(key.public_key())
    assert key.key_size == 2048


def test_thumbprint_matches_the_rfc7638_example() -> None:
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj"
        "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qM"
        "QvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJz"
        "KnqDKgw"
    )
    modulus = int.from_bytes(base64.urlsafe_b64decode(n + "=="), "big")
    public = rsa.RSAPublicNumbers(65537, modulus).public_key()
    assert rsa_thumbprint(public) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "dir"
    first_token = issue_token(directory, "t", "c", now=NOW)
    key_path = directory / SIGNING_KEY_FILE
    pem = key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    jwks_before = (directory / TOKEN_KEYS_FILE).stat()

    second_token = issue_token(directory, "t", "c", now=NOW)
    assert key_path.read_bytes() == pem
    assert jwt.get_unverified_header(first_token)["kid"] == jwt.get_unverified_header(second_token)["kid"]
    assert first_token == second_token  # same key, same claims: RS256 is deterministic
    jwks_after = (directory / TOKEN_KEYS_FILE).stat()
    assert (jwks_after.st_ino, jwks_after.st_mtime_ns) == (jwks_before.st_ino, jwks_before.st_mtime_ns)
    assert sorted(p.name for p in directory.iterdir()) == [SIGNING_KEY_FILE, TOKEN_KEYS_FILE]


def test_kid_stable_across_calls(tmp_path: Path) -> None:
    kids = {load_or_create_signing_key(tmp_path)[1] for _ in range(3)}
    assert len(kids) == 1


def test_stale_jwks_is_rewritten(tmp_path: Path) -> None:
    _, kid = load_or_create_signing_key(tmp_path)
    (tmp_path / TOKEN_KEYS_FILE).write_text('{"keys": [{"kty": "RSA", "kid": "old", "n": "AQAB", "e": "AQAB"}]}')
    assert load_or_create_signing_key(tmp_path)[1] == kid
    assert [k["kid"] for k in json.loads((tmp_path / TOKEN_KEYS_FILE).read_text())["keys"]] == [kid]
    (tmp_path / TOKEN_KEYS_FILE).write_text("not json")
    load_or_create_signing_key(tmp_path)
    assert json.loads((tmp_path / TOKEN_KEYS_FILE).read_text())["keys"][0]["kid"] == kid


def test_extra_claims_and_headers(tmp_path: Path) -> None:
    token = issue_token(
        tmp_path,
        "t",
        "c",
        ttl=5,
        now=NOW,
        extra_claims={"sub": "user", "cid": None},
        headers={"jku": "https://x.example.com/token_keys", "kid": "other"},
    )
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["kid"] == "other" and header["jku"] == "https://x.example.com/token_keys"
    assert claims["sub"] == "user" and "cid" not in claims and claims["exp"] == NOW + 5


def test_bad_ttl(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="TTL"):
        issue_token(tmp_path, "t", "c", ttl=0)


def test_foreign_key_file(tmp_path: Path) -> None:
    (tmp_path / SIGNING_KEY_FILE).write_text("not a key")
    with pytest.raises(TokenError, match="not an unencrypted PEM"):
        load_or_create_signing_key(tmp_path)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="connproxy token")
    configure_parser(parser)
    return parser.parse_args(argv)


def test_main_token_prints_one_jwt_and_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--dir", str(tmp_path), "--subaccount", "tenant-a", "--client-id", "sb-app!t1", "--ttl", "120"])
    assert args.ttl == 120
    assert main_token(args) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    token = out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    assert claims["ext_attr"] == {"subaccountid": "tenant-a"} and claims["client_id"] == "sb-app!t1"


def test_main_token_default_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_token(parse(["--dir", str(tmp_path), "--subaccount", "a", "--client-id", "c"])) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600


def test_main_token_reports_errors_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / SIGNING_KEY_FILE).write_text("junk")
    assert main_token(parse(["--dir", str(tmp_path), "--subaccount", "a", "--client-id", "c"])) == 1
    out, err = capsys.readouterr()
    assert out == "" and "connproxy token:" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_directory(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(TokenError, match="token directory"):
            load_or_create_signing_key(tmp_path)
    finally:
        tmp_path.chmod(0o700)
