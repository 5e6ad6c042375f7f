"""JWKS documents: which of their keys are usable to verify proxy tokens.

One parser for the proxy's key store (:class:`connproxy.proxy.auth.KeyStore`, files and fetched key sets) and for
the configuration check of ``tokenKeysFile``, so that ``connproxy config check`` refuses exactly the files start-up
would refuse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["ALLOWED_ALGORITHMS", "MAX_JWKS_BYTES", "JwksError", "read_jwks_file", "usable_jwks"]

#: Signing algorithms accepted for proxy tokens: asymmetric only (XSUAA issues RS256).
ALLOWED_ALGORITHMS: Final[frozenset[str]] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
MIN_RSA_BITS: Final = 2048
#: Largest JWKS document read or fetched.
MAX_JWKS_BYTES: Final = 1 << 20


class JwksError(ValueError):
    """A JWKS document is unusable (not JSON, not ``{"keys": [...]}``, or no usable key)."""


def usable_jwk(data: object) -> str | None:
    """The ``kid`` of a JWKS member if it is a usable verification key, else ``None``.

    Usable: a JSON object with a string ``kid``, ``use`` absent or ``sig``, ``kty`` RSA (at least 2048 bits) or
    EC (P-256/384/521), holding a public key only, and, if it declares ``alg``, an allowed one.
    """
    if not isinstance(data, dict):
        return None
    kid = data.get("kid")
    if not isinstance(kid, str) or not kid:
        return None
    if data.get("use", "sig") != "sig" or data.get("kty") not in ("RSA", "EC"):
        return None
    if "d" in data:  # a private key has no place in a trust store
        return None
    declared = data.get("alg")
    if declared is not None and declared not in ALLOWED_ALGORITHMS:
        return None
    try:
        parsed = jwt.PyJWK(data).key
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    if isinstance(parsed, rsa.RSAPublicKey):
        if parsed.key_size < MIN_RSA_BITS:
            return None
    elif not isinstance(parsed, ec.EllipticCurvePublicKey):
        return None
    return kid


def usable_jwks(body: bytes) -> dict[str, dict[str, Any]]:
    """The usable keys of a JWKS document (``{"keys": [...]}``), by ``kid``, as JSON objects.

    Unusable members are skipped (see :func:`usable_jwk`); for a repeated ``kid`` the first usable one wins.

    :raises JwksError: not a JSON object with a ``keys`` list, or no usable key in it.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise JwksError("the JWKS is not JSON") from error
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('the JWKS is not an object with a "keys" list')
    keys: dict[str, dict[str, Any]] = {}
    for member in document["keys"]:
        kid = usable_jwk(member)
        if kid is not None and kid not in keys:
            keys[kid] = dict(member)
    if not keys:
        raise JwksError("the JWKS holds no usable signature verification key")
    return keys


def read_jwks_file(path: str | os.PathLike[str], max_bytes: int = MAX_JWKS_BYTES) -> dict[str, dict[str, Any]]:
    """:func:`usable_jwks` of a file.

    :raises OSError: the file cannot be read.
    :raises JwksError: it is larger than ``max_bytes`` or not a usable JWKS.
    """
    with Path(path).open("rb") as f:
        body = f.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise JwksError(f"larger than {max_bytes} bytes")
    return usable_jwks(body)
