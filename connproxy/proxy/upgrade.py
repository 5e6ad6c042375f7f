# -*- test-case-name: tests.unit.test_upgrade -*-
"""The HTTP/1.1 ``Upgrade`` entry to the tunnel, and the client certificate an ingress forwards in a header.

A connector behind an ingress that routes by path (``highAvailabilityMode: path``) cannot start with the
tunnel preface: it sends ::

    GET /connectivity-proxy-<n> HTTP/1.1        (or /connectivity for any replica)
    Host: <externalHost>:<externalPort>
    Connection: Upgrade
    Upgrade: connproxy-tunnel/1

and, after ``101 Switching Protocols``, the tunnel preface and HELLO as on a direct connection. The decision is
:func:`decide_upgrade`:

* a path that names another replica is answered ``421 Misdirected Request`` (the connector redials); an
  unknown path ``404``;
* on the TLS listener the connector identity comes from the TLS client certificate, as always (a forwarded
  certificate header there is ignored);
* on the plain ingress listener (``servers.businessDataTunnel.ingress``) the identity comes from the
  certificate the ingress verified and forwarded in ``clientCertificateHeader``: NGINX ``ssl-client-cert``
  (``$ssl_client_escaped_cert``, URL-encoded PEM) or Envoy ``x-forwarded-client-cert`` (``Cert="..."``). It is
  believed only from ``trustedSources``; from any other address, or without the header, the upgrade is refused
  with ``403`` and audited. The certificate is checked again here exactly as the TLS layer checks one: signed
  by ``clientCaFile``, within its validity, usable for client authentication, carrying a connector identity.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote

import h11
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from connproxy.pki.certs import CertificateIdentityError, ConnectorIdentity, connector_identity, is_signed_by
from connproxy.proxy.replicas import ANY_REPLICA_PATH, REPLICA_PREFIX, ReplicaSet

#: The ``Upgrade`` token of the tunnel protocol.
UPGRADE_TOKEN = b"connproxy-tunnel/1"
#: Longest forwarded certificate header accepted (a PEM chain, URL-encoded).
MAX_CERT_HEADER = 32768

_XFCC_CERT = re.compile(r'(?:^|;)\s*Cert="([^"]*)"', re.IGNORECASE)


class ForwardedCertificateError(ValueError):
    """The forwarded client certificate is missing, unreadable or not acceptable."""


@dataclass(frozen=True)
class UpgradeVerdict:
    """What to answer: ``101`` switches to the tunnel (with ``identity`` from a forwarded certificate, if any)."""

    status: int
    reason: str
    identity: ConnectorIdentity | None = None
    #: True when the refusal is about identity (audited as a failed tunnel handshake).
    audit: bool = False


def _header(request: h11.Request, name: bytes) -> list[bytes]:
    return [v for k, v in request.headers if k == name]


def is_upgrade_request(request: h11.Request) -> bool:
    """Whether ``request`` asks for the tunnel (``Connection: Upgrade``, ``Upgrade: connproxy-tunnel/1``)."""
    connection = b",".join(_header(request, b"connection")).lower()
    tokens = {t.strip() for t in connection.split(b",")}
    upgrade = [v.strip().lower() for v in b",".join(_header(request, b"upgrade")).split(b",")]
    return b"upgrade" in tokens and UPGRADE_TOKEN in upgrade


def source_trusted(host: str, trusted: Sequence[str]) -> bool:
    """Whether address ``host`` lies in one of the ``trusted`` CIDRs (an IPv4-mapped IPv6 address counts as IPv4)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(cidr, strict=False) for cidr in trusted)


def parse_forwarded_certificate(value: bytes) -> x509.Certificate:
    """The leaf certificate in a forwarded header: URL-encoded PEM (NGINX) or Envoy's ``Cert="..."`` element.

    :raises ForwardedCertificateError: empty, too long, more than one Envoy element, or no PEM certificate.
    """
    if not value.strip():
        raise ForwardedCertificateError("empty forwarded client certificate")
    if len(value) > MAX_CERT_HEADER:
        raise ForwardedCertificateError("forwarded client certificate header too long")
    text = value.decode("latin-1").strip()
    m = _XFCC_CERT.search(text)
    if m is not None:
        if text.count('Cert="') > 1 or "," in text.replace(m.group(0), ""):
            raise ForwardedCertificateError("x-forwarded-client-cert names more than one client")
        text = m.group(1)
    pem = unquote(text).encode("latin-1")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ForwardedCertificateError("forwarded client certificate is not a PEM certificate") from None
    return certs[0]


def check_forwarded_certificate(cert: x509.Certificate, client_cas: Sequence[x509.Certificate],
                                now: datetime | None = None) -> ConnectorIdentity:
    """Check ``cert`` as the TLS layer would and return the connector identity it binds.

    :raises ForwardedCertificateError: not signed by a connector CA, outside its validity, or not for client
        authentication.
    :raises CertificateIdentityError: no well-formed connector identity.
    """
    if not any(is_signed_by(cert, ca) for ca in client_cas):
        raise ForwardedCertificateError("forwarded client certificate is not signed by the connector CA")
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise ForwardedCertificateError("forwarded client certificate is expired or not yet valid")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ForwardedCertificateError("forwarded certificate is not for client authentication")
    return connector_identity(cert)


def decide_upgrade(
    request: h11.Request,
    replicas: ReplicaSet | None,
    *,
    via_ingress: bool,
    peer_host: str,
    certificate_header: str,
    trusted_sources: Sequence[str],
    client_cas: Sequence[x509.Certificate],
) -> UpgradeVerdict:
    """Answer an Upgrade request for the tunnel (see the module docstring)."""
    if request.method != b"GET":
        return UpgradeVerdict(405, "the tunnel upgrade is a GET")
    path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
    if path != ANY_REPLICA_PATH:
        own = replicas.me if replicas is not None else None
        if own is None or path != own.path():
            if replicas is not None and replicas.route_owner(path) is not None or path.startswith(
                f"/{REPLICA_PREFIX}-"
            ):
                who = own.name if own is not None else "this replica"
                return UpgradeVerdict(421, f"{path} is not served here ({who})")
            return UpgradeVerdict(404, f"no tunnel at {path}")
    if not via_ingress:
        return UpgradeVerdict(101, "switching to the tunnel")
    if not source_trusted(peer_host, trusted_sources):
        return UpgradeVerdict(403, f"forwarded client certificate from untrusted address {peer_host}", audit=True)
    values = _header(request, certificate_header.encode("ascii"))
    if len(values) != 1:
        return UpgradeVerdict(403, "client certificate required (no single forwarded certificate header)",
                              audit=True)
    try:
        identity = check_forwarded_certificate(parse_forwarded_certificate(values[0]), client_cas)
    except (ForwardedCertificateError, CertificateIdentityError) as e:
        return UpgradeVerdict(403, str(e), audit=True)
    return UpgradeVerdict(101, "switching to the tunnel", identity=identity)
