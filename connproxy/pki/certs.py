"""A small private PKI for connproxy: the CA, the proxy's tunnel certificate, connector client certificates.

Everything here uses the ``cryptography`` library with EC P-256 keys and SHA-256 signatures, so that
minting a full set for a test takes about a millisecond.

The identity a connector certificate binds is carried in URI subject alternative names:

* ``urn:connproxy:subaccount:<percent-encoded subaccount>`` (exactly one, required), and
* ``urn:connproxy:location:<percent-encoded location>`` (at most one; absent means the certificate does not
  bind a location, an empty value binds the default location).

Percent-encoding is UTF-8 based (:func:`urllib.parse.quote` with no safe characters), so any Unicode
subaccount or location ID survives a round trip. The prefix ``urn:connproxy:`` and the key
(``subaccount``/``location``) are compared case-insensitively when reading, the value is case-sensitive.
Other ``urn:connproxy:`` URIs (``urn:connproxy:connector:<name>``, written for information) are ignored.

The command-line side (``connproxy certs init`` and ``connproxy certs connector``) is implemented by
:func:`init_dir` and :func:`issue_connector`; both raise :class:`PKIError` with a readable message.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "PROXY_CERT_FILE",
    "PROXY_KEY_FILE",
    "URN_PREFIX",
    "CertificateIdentityError",
    "ConnectorIdentity",
    "PKIError",
    "PKIFiles",
    "cert_to_pem",
    "connector_identity",
    "init_dir",
    "is_signed_by",
    "issue_connector",
    "key_to_pem",
    "load_ca",
    "load_cert_pem",
    "load_key_pem",
    "mint_ca",
    "mint_connector_cert",
    "mint_server_cert",
    "write_pem_pair",
]

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
PROXY_CERT_FILE = "proxy.crt"
PROXY_KEY_FILE = "proxy.key"

#: The URN namespace of the identity SANs (compared case-insensitively when reading).
URN_PREFIX = "urn:connproxy:"
_SUBACCOUNT_KEY = "subaccount"
_LOCATION_KEY = "location"
_CONNECTOR_KEY = "connector"

#: Backdating of ``notBefore``, to tolerate clock skew between the minting host and the verifier.
_BACKDATE = datetime.timedelta(minutes=5)
_ISSUER_PRIVATE_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
_ISSUER_PUBLIC_KEY_TYPES = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    dsa.DSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
#: RFC 5280 upper bound for a common name.
_MAX_CN = 64
#: What a percent-encoded URI value may consist of (RFC 3986 ``pchar``).
_PCHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*")


class PKIError(Exception):
    """A PKI directory operation failed; the message says which file and why (meant for the user)."""


class CertificateIdentityError(ValueError):
    """A certificate does not carry a well-formed connector identity (see the module docstring)."""


@dataclass(frozen=True)
class ConnectorIdentity:
    """The identity a connector certificate binds.

    ``location`` is ``None`` when the certificate binds no location (the connector may then name one in its
    handshake), ``""`` when it is bound to the default location.
    """

    subaccount: str
    location: str | None


@dataclass(frozen=True)
class PKIFiles:
    """The files of a PKI directory as written by :func:`init_dir` (and :meth:`TestPKI.write`)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    proxy_cert: Path
    proxy_key: Path


# --------------------------------------------------------------------------------------------------------
# minting


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign without a separate digest; everything else gets SHA-256.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _check_text(value: str, what: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError(f"{what} must not contain control characters: {value!r}")


def _common_name(value: str) -> x509.NameAttribute[str]:
    # The CN is capped at 64 (UTF-8 bytes, as cryptography counts); it is informational here, so shorten
    # it instead of failing.
    ellipsis = "\N{HORIZONTAL ELLIPSIS}"
    if len(value.encode("utf-8")) > _MAX_CN:
        while len((value + ellipsis).encode("utf-8")) > _MAX_CN:
            value = value[:-1]
        value += ellipsis
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _validity(
    days: int, ca_cert: x509.Certificate | None
) -> tuple[datetime.datetime, datetime.datetime]:
    if days <= 0:
        raise ValueError(f"days must be positive, got {days!r}")
    now = _now()
    not_before = now - _BACKDATE
    not_after = now + datetime.timedelta(days=days)
    if ca_cert is not None:
        # A leaf must not outlive its issuer.
        not_after = min(not_after, ca_cert.not_valid_after_utc)
        if not_after <= now:
            raise ValueError(f"the CA certificate expired on {ca_cert.not_valid_after_utc.isoformat()}")
    return not_before, not_after


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        if not isinstance(public_key, _ISSUER_PUBLIC_KEY_TYPES):
            raise TypeError("the CA certificate's key cannot sign certificates") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_issuer(ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes) -> None:
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError("the CA private key does not belong to the CA certificate")


def _leaf_builder(
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    days: int,
) -> x509.CertificateBuilder:
    not_before, not_after = _validity(days, ca_cert)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """KeyUsage of a CA (keyCertSign, cRLSign) or of a TLS leaf (digitalSignature, what EC keys need)."""
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def mint_ca(
    common_name: str = "connproxy dev CA", days: int = 3650
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Mint a self-signed CA: EC P-256 key, SHA-256, valid ``days`` days (backdated by five minutes).

    The certificate has BasicConstraints ``ca=True`` (critical), KeyUsage keyCertSign and cRLSign (critical)
    and a subject key identifier.

    :raises ValueError: ``common_name`` is empty, longer than 64 bytes (UTF-8) or ``days`` is not positive.
    :raises TypeError: ``common_name`` is not a string.
    """
    _check_text(common_name, "common_name")
    if len(common_name.encode("utf-8")) > _MAX_CN:
        raise ValueError(f"common_name must be at most {_MAX_CN} bytes (UTF-8)")
    key = _new_key()
    not_before, not_after = _validity(days, None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _host_general_name(host: str) -> x509.GeneralName:
    _check_text(host, "host")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return x509.IPAddress(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if any(ch.isspace() for ch in host) or "/" in host:
        raise ValueError(f"not a host name or IP address: {host!r}")
    try:
        ascii_name = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise ValueError(f"not a valid host name: {host!r} ({exc})") from None
    return x509.DNSName(ascii_name.lower())


def mint_server_cert(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    hosts: Sequence[str],
    days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Mint a TLS server certificate for ``hosts``, signed by the CA.

    Each host becomes a DNS SAN, or an IP SAN if it is an IPv4/IPv6 literal (``[::1]`` brackets are
    accepted); non-ASCII names are IDNA-encoded; duplicates are dropped. The CN is the first host, the EKU is
    serverAuth, the validity is capped at the CA's.

    :raises ValueError: no hosts, a host that is neither a name nor an IP literal, a CA key that does not
        match the CA certificate, or an expired CA.
    :raises TypeError: ``hosts`` is a single string, or holds a non-string.
    """
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of names, not a single string")
    if not hosts:
        raise ValueError("at least one host name or IP address is required")
    _check_issuer(ca_cert, ca_key)
    names: list[x509.GeneralName] = []
    for host in hosts:
        general_name = _host_general_name(host)
        if general_name not in names:
            names.append(general_name)
    key = _new_key()
    cert = (
        _leaf_builder(ca_cert, key, x509.Name([_common_name(hosts[0])]), days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )
    return cert, key


def _urn(key: str, value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"{URN_PREFIX}{key}:{quote(value, safe='')}")


def mint_connector_cert(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    subaccount: str,
    location: str | None,
    connector_name: str | None = None,
    days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Mint a connector client certificate binding ``subaccount`` (and ``location`` unless it is ``None``).

    The binding is in URI SANs (see the module docstring); ``location=""`` binds the default location. A
    ``connector_name`` is recorded as ``urn:connproxy:connector:<name>``, for information only. The CN is
    ``connector <subaccount>`` (shortened to 64 bytes), the EKU is clientAuth.

    :raises ValueError: an empty subaccount, control characters in a value, a CA key that does not match the
        CA certificate, or an expired CA.
    :raises TypeError: a value is not a string.
    """
    _check_text(subaccount, "subaccount")
    if location is not None:
        _check_text(location, "location", allow_empty=True)
    if connector_name is not None:
        _check_text(connector_name, "connector_name")
    _check_issuer(ca_cert, ca_key)
    uris = [_urn(_SUBACCOUNT_KEY, subaccount)]
    if location is not None:
        uris.append(_urn(_LOCATION_KEY, location))
    if connector_name is not None:
        uris.append(_urn(_CONNECTOR_KEY, connector_name))
    key = _new_key()
    cert = (
        _leaf_builder(ca_cert, key, x509.Name([_common_name(f"connector {subaccount}")]), days)
        .add_extension(x509.SubjectAlternativeName(uris), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )
    return cert, key


# --------------------------------------------------------------------------------------------------------
# reading the identity


def _decode_value(raw: str, what: str, uri: str) -> str:
    if _PCHARS.fullmatch(raw) is None:
        raise CertificateIdentityError(f"malformed {what} in certificate URI {uri!r}")
    try:
        value = unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise CertificateIdentityError(f"{what} in certificate URI {uri!r} is not UTF-8") from None
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise CertificateIdentityError(f"{what} in certificate URI {uri!r} contains control characters")
    return value


def connector_identity(cert: x509.Certificate) -> ConnectorIdentity:
    """Read the subaccount and location a connector certificate binds.

    Only the URI SANs count (not the CN). This does not verify the certificate's signature, validity or
    EKU: the TLS layer does that before this is called.

    :raises CertificateIdentityError: no SAN extension, no subaccount URI, a subaccount or location URI that
        appears more than once, an empty subaccount, or a value that is not valid percent-encoded UTF-8.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateIdentityError(
            "certificate has no subject alternative names, so no connector identity"
        ) from None
    found: dict[str, list[str]] = {_SUBACCOUNT_KEY: [], _LOCATION_KEY: []}
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri[: len(URN_PREFIX)].lower() != URN_PREFIX:
            continue
        key, sep, raw = uri[len(URN_PREFIX) :].partition(":")
        key = key.lower()
        if key not in found:
            continue
        if not sep:
            raise CertificateIdentityError(f"malformed certificate URI {uri!r}")
        found[key].append(_decode_value(raw, key, uri))
    subaccounts = found[_SUBACCOUNT_KEY]
    locations = found[_LOCATION_KEY]
    if not subaccounts:
        raise CertificateIdentityError(f"certificate binds no subaccount (no {URN_PREFIX}subaccount: URI)")
    if len(subaccounts) > 1:
        raise CertificateIdentityError(f"certificate binds more than one subaccount: {subaccounts!r}")
    if not subaccounts[0]:
        raise CertificateIdentityError("certificate binds an empty subaccount")
    if len(locations) > 1:
        raise CertificateIdentityError(f"certificate binds more than one location: {locations!r}")
    return ConnectorIdentity(subaccounts[0], locations[0] if locations else None)


# --------------------------------------------------------------------------------------------------------
# PEM files


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """Encode a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    """Encode a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_cert_pem(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load the first certificate of a PEM file.

    :raises OSError: the file cannot be read.
    :raises ValueError: the file holds no PEM certificate (the message names the file).
    """
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: not a PEM certificate ({exc})") from None


def load_key_pem(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key (PKCS#8, or the traditional EC/RSA formats).

    :raises OSError: the file cannot be read.
    :raises ValueError: the file holds no PEM private key, or an encrypted one (the message names the file).
    """
    data = Path(path).read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(
            f"{os.fspath(path)}: the private key is encrypted; connproxy needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{os.fspath(path)}: not a PEM private key ({exc})") from None


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_pem_pair(
    cert: x509.Certificate,
    key: PrivateKeyTypes,
    crt_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
) -> None:
    """Write a certificate (mode 0644) and its key (mode 0600, PKCS#8), each atomically (temp file + rename).

    The key is written first. The two renames are separate, so a concurrent reader may see a new key with an
    old certificate for a moment; :mod:`connproxy.pki.state` avoids that by renaming a whole directory.

    :raises OSError: a file cannot be written (the containing directory must exist).
    """
    atomic_write(Path(key_path), key_to_pem(key), 0o600)
    atomic_write(Path(crt_path), cert_to_pem(cert), 0o644)


# --------------------------------------------------------------------------------------------------------
# the PKI directory (`connproxy certs ...`)


def pki_files(directory: Path) -> PKIFiles:
    return PKIFiles(
        dir=directory,
        ca_cert=directory / CA_CERT_FILE,
        ca_key=directory / CA_KEY_FILE,
        proxy_cert=directory / PROXY_CERT_FILE,
        proxy_key=directory / PROXY_KEY_FILE,
    )


def issuer_key(key: PrivateKeyTypes, what: str) -> CertificateIssuerPrivateKeyTypes:
    if not isinstance(key, _ISSUER_PRIVATE_KEY_TYPES):
        raise TypeError(f"{what} is a {type(key).__name__}, which cannot sign certificates")
    return key


def load_ca(
    directory: str | os.PathLike[str],
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """Load and check ``DIR/ca.crt`` and ``DIR/ca.key``.

    :raises PKIError: a file is missing or unreadable, is not PEM, the key does not match the certificate,
        the certificate is not a CA or has expired.
    """
    files = pki_files(Path(directory))
    missing = [str(p) for p in (files.ca_cert, files.ca_key) if not p.exists()]
    if missing:
        raise PKIError(
            f"CA not found: {', '.join(missing)} missing "
            f"(create one with: connproxy certs init --dir {files.dir} --host NAME)"
        )
    try:
        cert = load_cert_pem(files.ca_cert)
        key = issuer_key(load_key_pem(files.ca_key), str(files.ca_key))
    except (OSError, TypeError, ValueError) as exc:
        raise PKIError(str(exc)) from None
    if cert.public_key() != key.public_key():
        raise PKIError(f"{files.ca_key} does not belong to {files.ca_cert}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError(f"{files.ca_cert} is not a CA certificate")
    if cert.not_valid_after_utc <= _now():
        raise PKIError(
            f"{files.ca_cert} expired on {cert.not_valid_after_utc.isoformat()}; "
            f"move {files.ca_cert} and {files.ca_key} away to create a new CA"
        )
    return cert, key


def init_dir(directory: str | os.PathLike[str], hosts: Iterable[str]) -> PKIFiles:
    """Implement ``connproxy certs init``: make sure ``DIR`` has a CA, and (re-)issue the proxy certificate.

    If ``DIR/ca.crt`` and ``DIR/ca.key`` both exist the CA is kept and reused (a CA others already trust is
    never silently replaced); if neither exists a new one is minted. ``DIR/proxy.crt``/``DIR/proxy.key``
    are always re-issued for ``hosts``. ``DIR`` is created (mode 0700) if needed. Keys are written 0600.

    :raises PKIError: no hosts, an invalid host, only one of the two CA files present, an unusable CA, or a
        file that cannot be written.
    """
    files = pki_files(Path(directory))
    host_list = list(hosts)
    if not host_list:
        raise PKIError("at least one --host is required")
    try:
        files.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        have_cert, have_key = files.ca_cert.exists(), files.ca_key.exists()
        if have_cert != have_key:
            present, absent = (files.ca_cert, files.ca_key) if have_cert else (files.ca_key, files.ca_cert)
            raise PKIError(
                f"{present} exists but {absent} does not; refusing to replace a CA. "
                "Restore the missing file, or move both away to create a new CA"
            )
        if have_cert:
            ca_cert, ca_key = load_ca(files.dir)
        else:
            ca_cert, new_key = mint_ca()
            ca_key = new_key
            write_pem_pair(ca_cert, new_key, files.ca_cert, files.ca_key)
        server_cert, server_key = mint_server_cert(ca_cert, ca_key, host_list)
        write_pem_pair(server_cert, server_key, files.proxy_cert, files.proxy_key)
    except (OSError, TypeError, ValueError) as exc:
        raise PKIError(str(exc)) from None
    return files


def issue_connector(
    directory: str | os.PathLike[str],
    subaccount: str,
    location: str | None,
    out_prefix: str | os.PathLike[str],
) -> tuple[Path, Path]:
    """Implement ``connproxy certs connector``: write ``PREFIX.crt`` and ``PREFIX.key`` signed by DIR's CA.

    The certificate binds ``subaccount`` and, unless ``location`` is ``None``, ``location``. The directory
    of ``PREFIX`` is created if needed. Returns ``(cert path, key path)``.

    :raises PKIError: the CA is missing or unusable, the subaccount is empty, or a file cannot be written.
    """
    ca_cert, ca_key = load_ca(directory)
    prefix = os.fspath(out_prefix)
    crt_path, key_path = Path(prefix + ".crt"), Path(prefix + ".key")
    try:
        cert, key = mint_connector_cert(ca_cert, ca_key, subaccount, location)
        crt_path.parent.mkdir(parents=True, exist_ok=True)
        write_pem_pair(cert, key, crt_path, key_path)
    except (OSError, TypeError, ValueError) as exc:
        raise PKIError(str(exc)) from None
    return crt_path, key_path


def is_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` names ``ca_cert`` as its issuer and carries a valid signature by its key.

    Only the signature and issuer name are checked (no validity period, no EKU); never raises.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
