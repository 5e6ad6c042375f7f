"""Development and test tokens: ``connproxy token --dir DIR --subaccount ID --client-id CID [--ttl S]``.

A token directory holds:

* ``token.key``: the signing key, a PEM (PKCS#8) RSA 2048 private key, mode 0600, created on first use and
  kept from then on;
* ``token_keys.json``: the JWKS with its public key, ``{"keys": [{"kty": "RSA", "kid": ..., "use": "sig",
  "alg": "RS256", "n": ..., "e": ...}]}``, where ``kid`` is the key's RFC 7638 thumbprint. Point the proxy's
  ``tokenKeysFile`` at it to trust the tokens minted here.

Tokens are RS256 JWTs with header ``kid`` and claims ``client_id`` and ``cid`` (the client id), ``zid`` and
``ext_attr.subaccountid`` (the subaccount), ``iat`` and ``exp``: the XSUAA claims that
:mod:`connproxy.proxy.auth` reads. :func:`issue_token` is the library form, used by tests to mint tokens (with
extra claims or headers, or at another time); :func:`main_token` is the command.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connproxy.pki.certs import atomic_write

__all__ = [
    "SIGNING_KEY_FILE",
    "TOKEN_KEYS_FILE",
    "TokenError",
    "configure_parser",
    "issue_token",
    "load_or_create_signing_key",
    "main_token",
    "public_jwk",
    "rsa_thumbprint",
]

SIGNING_KEY_FILE: Final = "token.key"
TOKEN_KEYS_FILE: Final = "token_keys.json"
_RSA_BITS: Final = 2048
_DEFAULT_TTL: Final = 3600


class TokenError(Exception):
    """A token directory cannot be used (unreadable or foreign key file, unwritable directory, bad TTL)."""


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def rsa_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of an RSA public key."""
    numbers = public_key.public_numbers()
    canonical = json.dumps(
        {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def public_jwk(public_key: rsa.RSAPublicKey, kid: str) -> dict[str, str]:
    """The JWK of an RSA verification key for RS256 with key id ``kid``."""
    numbers = public_key.public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
        "n": _b64url_uint(numbers.n),
        "e": _b64url_uint(numbers.e),
    }


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` and ``mode`` atomically unless it exists; whether this call created it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise TokenError(f"cannot read the signing key {str(path)!r}: {error.strerror}") from None
    except (ValueError, TypeError):
        raise TokenError(f"{str(path)!r} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TokenError(f"{str(path)!r} is not an RSA private key")
    return key


def _ensure_jwks(path: Path, jwk: Mapping[str, str]) -> None:
    """Keep ``path`` if it already lists ``jwk`` (same kid, n and e); else (re)write it with ``jwk`` only."""
    try:
        current = json.loads(path.read_bytes())
        for member in current.get("keys", []):
            if all(member.get(name) == jwk[name] for name in ("kid", "n", "e")):
                return
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    atomic_write(path, (json.dumps({"keys": [dict(jwk)]}, indent=2) + "\n").encode("ascii"), 0o644)


def load_or_create_signing_key(dir: str | os.PathLike[str]) -> tuple[rsa.RSAPrivateKey, str]:
    """The signing key of token directory ``dir`` and its key id; created on first use.

    Creates ``dir`` (mode 0700) if missing, then ``DIR/token.key`` (RSA 2048, PEM, mode 0600) if missing:
    concurrent first calls agree on one key. Makes sure ``DIR/token_keys.json`` lists the key (written when
    missing or different, kept otherwise).

    :returns: ``(private_key, kid)``, ``kid`` being the RFC 7638 thumbprint of the public key.
    :raises TokenError: the key file exists but is not an unencrypted PEM RSA private key, or a file cannot be
        read or written.
    """
    directory = Path(dir)
    key_path = directory / SIGNING_KEY_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not key_path.exists():
            new_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
            pem = new_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_new(key_path, pem, 0o600)
        key = _load_key(key_path)
        kid = rsa_thumbprint(key.public_key())
        _ensure_jwks(directory / TOKEN_KEYS_FILE, public_jwk(key.public_key(), kid))
    except OSError as error:
        raise TokenError(f"cannot use the token directory {str(directory)!r}: {error}") from None
    return key, kid


def issue_token(
    dir: str | os.PathLike[str],
    subaccount: str,
    client_id: str,
    ttl: int = _DEFAULT_TTL,
    now: float | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Mint an RS256 JWT with the signing key of ``dir`` (see :func:`load_or_create_signing_key`).

    Claims: ``client_id`` and ``cid`` = ``client_id``, ``zid`` and ``ext_attr.subaccountid`` = ``subaccount``,
    ``iat`` = ``now`` (default: the current time) and ``exp`` = ``iat + ttl``; then ``extra_claims`` on top
    (a value of ``None`` removes a claim). Header: ``alg``, ``typ`` and ``kid``, then ``headers`` on top (tests
    use it for another ``kid`` or a ``jku``).

    :raises TokenError: ``ttl`` is not positive, or the directory cannot be used.
    """
    if ttl <= 0:
        raise TokenError("the token TTL must be a positive number of seconds")
    key, kid = load_or_create_signing_key(dir)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "client_id": client_id,
        "cid": client_id,
        "zid": subaccount,
        "ext_attr": {"subaccountid": subaccount},
        "iat": issued,
        "exp": issued + ttl,
    }
    for name, value in (extra_claims or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    header: dict[str, Any] = {"kid": kid, "typ": "JWT"}
    header.update(headers or {})
    return jwt.encode(claims, key, algorithm="RS256", headers=header)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``connproxy token`` options (``--dir``, ``--subaccount``, ``--client-id``, ``--ttl``)."""
    parser.add_argument("--dir", required=True, help="token directory (token.key, token_keys.json)")
    parser.add_argument("--subaccount", required=True, help="the tenant: zid and ext_attr.subaccountid")
    parser.add_argument("--client-id", required=True, help="the OAuth client: client_id and cid")
    parser.add_argument(
        "--ttl", type=int, default=_DEFAULT_TTL, help="lifetime in seconds (default %(default)s)"
    )


def main_token(args: argparse.Namespace) -> int:
    """``connproxy token``: print one JWT (and nothing else) on stdout; see :func:`issue_token`.

    :param args: with ``dir``, ``subaccount``, ``client_id`` and ``ttl`` (int seconds, default 3600).
    :returns: 0 on success; 1 with a message on stderr when the token cannot be issued.
    """
    ttl = getattr(args, "ttl", None)
    try:
        token = issue_token(
            Path(args.dir),
            args.subaccount,
            args.client_id,
            ttl=_DEFAULT_TTL if ttl is None else int(ttl),
        )
    except TokenError as error:
        print(f"connproxy token: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return 0
