"""TLS contexts for the tunnel (both ends) and reading a connector's identity from its certificate.

The proxy's tunnel port asks for a client certificate but does not require one at the TLS layer, so that
``GET /healthcheck`` works without one (kubelet probes); the tunnel itself refuses a connection without a valid
connector certificate at its handshake. A certificate that is presented is always verified against the
connector CA (``clientCaFile``) by OpenSSL. TLS 1.2 is the minimum on both ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)

from connproxy.pki.certs import CertificateIdentityError, ConnectorIdentity, connector_identity

#: ALPN names: the tunnel's own, and HTTP/1.1 for the health check (curl offers ALPN; OpenSSL needs a
#: server-side selection to answer it).
ALPN_TUNNEL = b"connproxy-tunnel/1"
ALPN_SERVER = [ALPN_TUNNEL, b"http/1.1"]


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _ca_list(pem: bytes) -> list[crypto.X509]:
    certs = x509.load_pem_x509_certificates(pem)
    return [crypto.X509.from_cryptography(c) for c in certs]


def server_options(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes) -> CertificateOptions:
    """Options for the tunnel listener: our certificate, client certificates verified against the connector CA.

    :raises ValueError: if the PEM data cannot be loaded.
    """
    own = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        verify=True,
        caCerts=_ca_list(client_ca_pem),
        requireCertificate=False,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=ALPN_SERVER,
    )


def server_options_from_files(cert_file: str | Path, key_file: str | Path, ca_file: str | Path) -> CertificateOptions:
    """:func:`server_options` from PEM files (read once, at start-up)."""
    return server_options(_read(cert_file), _read(key_file), _read(ca_file))


def client_options(
    server_name: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, alpn: list[bytes] | None = None
) -> IOpenSSLClientConnectionCreator:
    """Options for the connector: verify the proxy's certificate and host name, present our certificate.

    ``alpn`` replaces the offered protocols (``[ALPN_TUNNEL]``); an HTTP/1.1 Upgrade through an ingress offers
    ``http/1.1``, which every ingress accepts.
    """
    trust = Certificate.loadPEM(ca_pem)
    own = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return optionsForClientTLS(
        server_name,
        trustRoot=trust,
        clientCertificate=own,
        acceptableProtocols=alpn or [ALPN_TUNNEL],
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    )


def client_options_from_files(
    server_name: str, ca_file: str | Path, cert_file: str | Path, key_file: str | Path
) -> IOpenSSLClientConnectionCreator:
    """:func:`client_options` from PEM files."""
    return client_options(server_name, _read(ca_file), _read(cert_file), _read(key_file))


def backend_options(host: str, ca_file: str | Path | None) -> IOpenSSLClientConnectionCreator:
    """Options for TLS towards a backend (TCP_TLS, HTTPS): verify against ``ca_file`` or the system trust."""
    if ca_file is None:
        return optionsForClientTLS(host, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})
    certs = x509.load_pem_x509_certificates(_read(ca_file))
    if len(certs) == 1:
        trust: Any = Certificate.loadPEM(certs[0].public_bytes(serialization_pem()))
    else:
        from twisted.internet.ssl import trustRootFromCertificates

        trust = trustRootFromCertificates(
            [Certificate.loadPEM(c.public_bytes(serialization_pem())) for c in certs]
        )
    return optionsForClientTLS(host, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})


def serialization_pem() -> Any:
    """The PEM encoding constant (kept here so callers need not import cryptography)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def peer_identity(transport: Any) -> ConnectorIdentity | None:
    """The connector identity of the TLS peer, or ``None`` when it sent no certificate.

    :raises CertificateIdentityError: the certificate carries no well-formed connector identity.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    peer = get()
    if peer is None:
        return None
    cert = peer.to_cryptography() if hasattr(peer, "to_cryptography") else peer
    if not isinstance(cert, x509.Certificate):
        raise CertificateIdentityError("unexpected peer certificate type")
    return connector_identity(cert)
