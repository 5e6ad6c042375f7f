"""Helpers for tests, ours and other projects': an in-memory PKI (CA, server certificate, connector
certificates) minted in about a millisecond with EC keys, written to disk in the ``connproxy certs init`` layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from connproxy.pki.certs import (
    PKIFiles,
    atomic_write,
    cert_to_pem,
    issuer_key,
    key_to_pem,
    mint_ca,
    mint_connector_cert,
    mint_server_cert,
    pki_files,
)

__all__ = ["TestPKI", "mint_test_pki"]



@dataclass(frozen=True)
class TestPKI:
    """A complete in-memory PKI for tests: PEM bytes of the CA and of a server certificate for ``hosts``.

    Mint one with :func:`mint_test_pki`; issue connector certificates with :meth:`connector`; put it on disk
    in the :func:`init_dir` layout with :meth:`write`.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    ca_cert_pem: bytes
    ca_key_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    hosts: tuple[str, ...]

    def _ca(self) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
        cert = x509.load_pem_x509_certificate(self.ca_cert_pem)
        key = serialization.load_pem_private_key(self.ca_key_pem, password=None)
        return cert, issuer_key(key, "the test CA key")

    def connector(
        self,
        subaccount: str,
        location: str | None = None,
        connector_name: str | None = None,
    ) -> tuple[bytes, bytes]:
        """Mint a connector certificate signed by this CA; return ``(cert PEM, key PEM)``.

        :raises ValueError: as :func:`mint_connector_cert` (and ``TypeError`` likewise).
        """
        ca_cert, ca_key = self._ca()
        cert, key = mint_connector_cert(ca_cert, ca_key, subaccount, location, connector_name)
        return cert_to_pem(cert), key_to_pem(key)

    def write(self, directory: str | os.PathLike[str]) -> PKIFiles:
        """Write ``ca.crt``, ``ca.key``, ``proxy.crt`` and ``proxy.key`` into ``directory`` (created if needed).

        :raises OSError: the files cannot be written.
        """
        files = pki_files(Path(directory))
        files.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(files.ca_key, self.ca_key_pem, 0o600)
        atomic_write(files.ca_cert, self.ca_cert_pem, 0o644)
        atomic_write(files.proxy_key, self.server_key_pem, 0o600)
        atomic_write(files.proxy_cert, self.server_cert_pem, 0o644)
        return files


def mint_test_pki(hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1")) -> TestPKI:
    """Mint a CA and a server certificate for ``hosts`` (about a millisecond: EC keys).

    :raises ValueError: as :func:`mint_server_cert` (and ``TypeError`` likewise).
    """
    ca_cert, ca_key = mint_ca("connproxy test CA")
    server_cert, server_key = mint_server_cert(ca_cert, ca_key, hosts)
    return TestPKI(
        ca_cert_pem=cert_to_pem(ca_cert),
        ca_key_pem=key_to_pem(ca_key),
        server_cert_pem=cert_to_pem(server_cert),
        server_key_pem=key_to_pem(server_key),
        hosts=tuple(hosts),
    )
