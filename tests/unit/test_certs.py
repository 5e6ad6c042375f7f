"""Tests for connproxy.pki.certs (minting, identity, PEM files, the PKI directory) and connproxy.pki.state."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connproxy import testing
from connproxy.pki import certs, state
from connproxy.pki.certs import (
    CertificateIdentityError,
    ConnectorIdentity,
    PKIError,
    connector_identity,
    mint_ca,
    mint_connector_cert,
    mint_server_cert,
)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """One CA for the module (minting is cheap, but there is no need)."""
    return mint_ca()


_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E]:
    return cert.extensions.get_extension_for_class(kind)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert_with_uris(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], uris: list[str] | None
) -> x509.Certificate:
    """A leaf signed by ``ca`` with exactly these URI SANs (or no SAN extension at all for ``None``)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "connector tenant-a")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris is not None:
        names: list[x509.GeneralName] = [x509.DNSName("connector.example")]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


# ---------------------------------------------------------------------------------------------- minting


def test_ca_is_a_self_signed_ca() -> None:
    cert, key = mint_ca("my CA", days=10)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "my CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=10) <= lifetime <= datetime.timedelta(days=10, minutes=10)


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_ca_rejects_bad_common_name(name: str) -> None:
    with pytest.raises(ValueError, match="common_name"):
        mint_ca(name)


def test_server_cert(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    ca_cert, ca_key = ca
    cert, key = mint_server_cert(ca_cert, ca_key, ["proxy.example", "127.0.0.1", "::1", "[fe80::1]"])
    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "proxy.example"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["proxy.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("fe80::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not _ext(cert, x509.BasicConstraints).value.ca
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ca_ski = _ext(ca_cert, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_server_cert_dedupes_and_idna_encodes(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, _ = mint_server_cert(*ca, ["LocalHost", "localhost", "bücher.example", "*.svc.local"])
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "localhost",
        "xn--bcher-kva.example",
        "*.svc.local",
    ]


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["a/b"], [""]])
def test_server_cert_rejects_bad_hosts(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], hosts: list[str]
) -> None:
    with pytest.raises(ValueError):
        mint_server_cert(*ca, hosts)


def test_server_cert_rejects_a_single_string(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    with pytest.raises(TypeError):
        mint_server_cert(*ca, "localhost")


def test_mint_refuses_a_foreign_ca_key(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    _, other_key = mint_ca()
    with pytest.raises(ValueError, match="does not belong"):
        mint_server_cert(ca[0], other_key, ["localhost"])
    with pytest.raises(ValueError, match="does not belong"):
        mint_connector_cert(ca[0], other_key, "tenant-a", None)


def test_connector_cert(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    ca_cert, ca_key = ca
    cert, key = mint_connector_cert(ca_cert, ca_key, "tenant-a", "loc-1", connector_name="scc-1")
    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "connector tenant-a"
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    uris = _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [
        "urn:connproxy:subaccount:tenant-a",
        "urn:connproxy:location:loc-1",
        "urn:connproxy:connector:scc-1",
    ]
    assert _ext(cert, x509.AuthorityKeyIdentifier)


def test_connector_cert_long_subaccount_shortens_only_the_cn(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    for subaccount in ("s" * 200, "ü" * 40):
        cert, _ = mint_connector_cert(*ca, subaccount, None)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str)
        assert 60 <= len(cn.encode()) <= 64
        assert cn.startswith("connector ")
        assert connector_identity(cert).subaccount == subaccount


@pytest.mark.parametrize(
    ("subaccount", "location"), [("", None), ("tenant\x00", None), ("tenant-a", "loc\n1")]
)
def test_connector_cert_rejects_bad_values(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], subaccount: str, location: str | None
) -> None:
    with pytest.raises(ValueError):
        mint_connector_cert(*ca, subaccount, location)


def test_leaf_validity_is_capped_at_the_ca() -> None:
    ca_cert, ca_key = mint_ca(days=2)
    cert, _ = mint_server_cert(ca_cert, ca_key, ["localhost"], days=825)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("subaccount", "location"),
    [
        ("tenant-a", None),
        ("tenant-a", ""),
        ("tenant-a", "loc-1"),
        ("6f1c2a9e-0b7d-4b6c-9a57-1f0f6c1e4a10", "Berlin Office"),
        ("Ünïcödé tenant / 100% ", "位置:?#&="),
        ("urn:connproxy:location:x", "urn:connproxy:subaccount:y"),
    ],
)
def test_identity_round_trip(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], subaccount: str, location: str | None
) -> None:
    cert, _ = mint_connector_cert(*ca, subaccount, location)
    assert connector_identity(cert) == ConnectorIdentity(subaccount, location)


def test_identity_prefix_is_case_insensitive(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert = _cert_with_uris(ca, ["URN:ConnProxy:Subaccount:Tenant-A", "urn:connproxy:LOCATION:"])
    assert connector_identity(cert) == ConnectorIdentity("Tenant-A", "")


def test_identity_ignores_other_uris(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert = _cert_with_uris(
        ca, ["https://example.com/x", "urn:connproxy:connector:c1", "urn:connproxy:subaccount:t"]
    )
    assert connector_identity(cert) == ConnectorIdentity("t", None)


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        (None, "no subject alternative names"),
        ([], "binds no subaccount"),
        (["urn:connproxy:location:loc"], "binds no subaccount"),
        (["urn:connproxy:subaccount:a", "urn:connproxy:subaccount:b"], "more than one subaccount"),
        (["urn:connproxy:subaccount:a", "urn:connproxy:subaccount:a"], "more than one subaccount"),
        (["urn:connproxy:subaccount:a", "URN:CONNPROXY:SUBACCOUNT:b"], "more than one subaccount"),
        (
            ["urn:connproxy:subaccount:a", "urn:connproxy:location:x", "urn:connproxy:location:y"],
            "more than one location",
        ),
        (["urn:connproxy:subaccount:"], "empty subaccount"),
        (["urn:connproxy:subaccount"], "malformed"),
        (["urn:connproxy:subaccount:a%zz"], "malformed"),
        (["urn:connproxy:subaccount:a b"], "malformed"),
        (["urn:connproxy:subaccount:%FF"], "not UTF-8"),
        (["urn:connproxy:subaccount:a%00"], "control characters"),
    ],
)
def test_identity_refused(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], uris: list[str] | None, message: str
) -> None:
    cert = _cert_with_uris(ca, uris)
    with pytest.raises(CertificateIdentityError, match=message):
        connector_identity(cert)


def test_identity_error_is_a_value_error() -> None:
    assert issubclass(CertificateIdentityError, ValueError)


def test_server_cert_has_no_identity(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, _ = mint_server_cert(*ca, ["localhost"])
    with pytest.raises(CertificateIdentityError):
        connector_identity(cert)


# ---------------------------------------------------------------------------------------------- PEM files


def test_pem_pair_round_trip(tmp_path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = mint_connector_cert(*ca, "tenant-a", None)
    crt_path, key_path = tmp_path / "c.crt", tmp_path / "c.key"
    certs.write_pem_pair(cert, key, crt_path, key_path)
    assert _mode(key_path) == 0o600
    assert _mode(crt_path) == 0o644
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert certs.load_cert_pem(crt_path) == cert
    loaded = certs.load_key_pem(key_path)
    assert loaded.public_key() == key.public_key()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_pem_pair_overwrites(tmp_path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    crt_path, key_path = tmp_path / "c.crt", tmp_path / "c.key"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    cert, key = mint_connector_cert(*ca, "tenant-a", None)
    certs.write_pem_pair(cert, key, crt_path, key_path)
    assert _mode(key_path) == 0o600
    assert certs.cert_to_pem(cert) == crt_path.read_bytes()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not pem")
    with pytest.raises(ValueError, match="junk.pem"):
        certs.load_cert_pem(junk)
    with pytest.raises(ValueError, match="junk.pem"):
        certs.load_key_pem(junk)
    with pytest.raises(OSError):
        certs.load_cert_pem(tmp_path / "missing.pem")


def test_encrypted_key_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match="encrypted"):
        certs.load_key_pem(path)


# ---------------------------------------------------------------------------------------------- test PKI


def test_mint_test_pki() -> None:
    pki = testing.mint_test_pki()
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert_pem)
    server = x509.load_pem_x509_certificate(pki.server_cert_pem)
    server.verify_directly_issued_by(ca_cert)
    server_key = serialization.load_pem_private_key(pki.server_key_pem, None)
    assert server.public_key() == server_key.public_key()
    san = _ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert len(san.get_values_for_type(x509.IPAddress)) == 2
    cert_pem, key_pem = pki.connector("tenant-a", "loc")
    conn = x509.load_pem_x509_certificate(cert_pem)
    conn.verify_directly_issued_by(ca_cert)
    assert serialization.load_pem_private_key(key_pem, None).public_key() == conn.public_key()
    assert connector_identity(conn) == ConnectorIdentity("tenant-a", "loc")
    assert connector_identity(x509.load_pem_x509_certificate(pki.connector("t")[0])).location is None


def test_test_pki_is_not_collected_by_pytest() -> None:
    assert testing.TestPKI.__test__ is False


def test_test_pki_write_matches_init_layout(tmp_path: Path) -> None:
    pki = testing.mint_test_pki(("localhost",))
    files = pki.write(tmp_path / "pki")
    assert files.ca_cert.read_bytes() == pki.ca_cert_pem
    assert _mode(files.ca_key) == 0o600
    crt, _ = certs.issue_connector(files.dir, "tenant-a", None, tmp_path / "conn")
    assert certs.is_signed_by(certs.load_cert_pem(crt), x509.load_pem_x509_certificate(pki.ca_cert_pem))


# ---------------------------------------------------------------------------------------------- PKI directory


def test_init_dir_creates_everything(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "pki"
    files = certs.init_dir(directory, ["proxy.example", "10.0.0.1"])
    assert files.dir == directory
    for path in (files.ca_cert, files.ca_key, files.proxy_cert, files.proxy_key):
        assert path.exists()
    assert _mode(files.ca_key) == 0o600
    assert _mode(files.proxy_key) == 0o600
    assert _mode(directory) == 0o700
    ca_cert, _ = certs.load_ca(directory)
    proxy = certs.load_cert_pem(files.proxy_cert)
    assert certs.is_signed_by(proxy, ca_cert)
    assert sorted(os.listdir(directory)) == ["ca.crt", "ca.key", "proxy.crt", "proxy.key"]


def test_init_dir_keeps_an_existing_ca(tmp_path: Path) -> None:
    certs.init_dir(tmp_path, ["localhost"])
    ca_before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()
    proxy_before = (tmp_path / "proxy.crt").read_bytes()
    files = certs.init_dir(tmp_path, ["other.example"])
    assert ((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()) == ca_before
    proxy = certs.load_cert_pem(files.proxy_cert)
    assert files.proxy_cert.read_bytes() != proxy_before
    assert certs.is_signed_by(proxy, certs.load_cert_pem(files.ca_cert))
    san = _ext(proxy, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["other.example"]


@pytest.mark.parametrize("keep", ["ca.crt", "ca.key"])
def test_init_dir_refuses_half_a_ca(tmp_path: Path, keep: str) -> None:
    certs.init_dir(tmp_path, ["localhost"])
    (tmp_path / ("ca.key" if keep == "ca.crt" else "ca.crt")).unlink()
    before = (tmp_path / keep).read_bytes()
    with pytest.raises(PKIError, match="refusing to replace a CA"):
        certs.init_dir(tmp_path, ["localhost"])
    assert (tmp_path / keep).read_bytes() == before


def test_init_dir_refuses_a_mismatched_ca_key(tmp_path: Path) -> None:
    certs.init_dir(tmp_path, ["localhost"])
    _, other = mint_ca()
    (tmp_path / "ca.key").write_bytes(certs.key_to_pem(other))
    with pytest.raises(PKIError, match="does not belong"):
        certs.init_dir(tmp_path, ["localhost"])


def test_init_dir_refuses_a_non_ca(tmp_path: Path) -> None:
    pki = testing.mint_test_pki()
    (tmp_path / "ca.crt").write_bytes(pki.server_cert_pem)
    (tmp_path / "ca.key").write_bytes(pki.server_key_pem)
    with pytest.raises(PKIError, match="not a CA"):
        certs.init_dir(tmp_path, ["localhost"])


@pytest.mark.parametrize("hosts", [[], ["bad host"]])
def test_init_dir_bad_hosts(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(PKIError):
        certs.init_dir(tmp_path, hosts)


def test_issue_connector(tmp_path: Path) -> None:
    certs.init_dir(tmp_path / "pki", ["localhost"])
    crt, key = certs.issue_connector(tmp_path / "pki", "tenant-a", "", tmp_path / "out" / "scc")
    assert (crt, key) == (tmp_path / "out" / "scc.crt", tmp_path / "out" / "scc.key")
    cert = certs.load_cert_pem(crt)
    assert connector_identity(cert) == ConnectorIdentity("tenant-a", "")
    assert certs.is_signed_by(cert, certs.load_cert_pem(tmp_path / "pki" / "ca.crt"))
    assert _mode(key) == 0o600


def test_issue_connector_without_ca(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=r"ca\.crt.*missing.*certs init"):
        certs.issue_connector(tmp_path, "tenant-a", None, tmp_path / "x")
    assert not (tmp_path / "x.crt").exists()


def test_issue_connector_empty_subaccount(tmp_path: Path) -> None:
    certs.init_dir(tmp_path, ["localhost"])
    with pytest.raises(PKIError, match="subaccount"):
        certs.issue_connector(tmp_path, "", None, tmp_path / "x")


def test_is_signed_by() -> None:
    a, b = testing.mint_test_pki(), testing.mint_test_pki()
    server = x509.load_pem_x509_certificate(a.server_cert_pem)
    assert certs.is_signed_by(server, x509.load_pem_x509_certificate(a.ca_cert_pem))
    assert not certs.is_signed_by(server, x509.load_pem_x509_certificate(b.ca_cert_pem))


# ---------------------------------------------------------------------------------------------- state


def test_state_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONNPROXY_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    default = state.state_dir()
    assert default == tmp_path / "home" / ".local" / "state" / "connproxy"
    assert _mode(default) == 0o700
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state.state_dir() == tmp_path / "xdg" / "connproxy"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert state.state_dir() == default
    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "explicit"))
    assert state.state_dir() == tmp_path / "explicit"
    assert _mode(tmp_path / "explicit") == 0o700


def test_dev_pki_is_minted_once(tmp_path: Path) -> None:
    first = state.ensure_dev_pki(tmp_path)
    assert first.dir == tmp_path / "dev-pki"
    contents = {p: p.read_bytes() for p in (first.ca_cert, first.proxy_cert, first.connector_cert)}
    second = state.ensure_dev_pki(tmp_path)
    assert second == first
    assert {p: p.read_bytes() for p in contents} == contents
    ca = certs.load_cert_pem(first.ca_cert)
    proxy = certs.load_cert_pem(first.proxy_cert)
    connector = certs.load_cert_pem(first.connector_cert)
    assert certs.is_signed_by(proxy, ca)
    assert certs.is_signed_by(connector, ca)
    assert connector_identity(connector) == ConnectorIdentity(state.DEV_SUBACCOUNT, None)
    san = _ext(proxy, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    for key in (first.ca_key, first.proxy_key, first.connector_key):
        assert _mode(key) == 0o600
    assert _mode(first.dir) == 0o700


def test_dev_pki_uses_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "s"))
    assert state.ensure_dev_pki().dir == tmp_path / "s" / "dev-pki"


def test_dev_pki_other_subaccount(tmp_path: Path) -> None:
    base = state.ensure_dev_pki(tmp_path)
    other = state.ensure_dev_pki(tmp_path, "tenant b/ü")
    assert other.ca_cert == base.ca_cert
    assert other.connector_cert != base.connector_cert
    cert = certs.load_cert_pem(other.connector_cert)
    assert connector_identity(cert) == ConnectorIdentity("tenant b/ü", None)
    assert certs.is_signed_by(cert, certs.load_cert_pem(base.ca_cert))
    assert state.ensure_dev_pki(tmp_path, "tenant b/ü") == other
    assert certs.load_cert_pem(other.connector_cert) == cert
    assert state.ensure_dev_pki(tmp_path, "tenant-c").connector_cert.parent.name == "tenant-c"


@pytest.mark.parametrize("victim", ["proxy_key", "ca_cert", "connector_cert"])
def test_dev_pki_broken_set_is_replaced(tmp_path: Path, victim: str) -> None:
    first = state.ensure_dev_pki(tmp_path)
    old_ca = first.ca_cert.read_bytes()
    getattr(first, victim).unlink()
    second = state.ensure_dev_pki(tmp_path)
    assert second == first
    assert second.ca_cert.read_bytes() != old_ca
    assert certs.is_signed_by(certs.load_cert_pem(second.proxy_cert), certs.load_cert_pem(second.ca_cert))
    assert not [p for p in tmp_path.iterdir() if ".stale-" in p.name or ".tmp-" in p.name]


def test_dev_pki_mismatched_key_is_replaced(tmp_path: Path) -> None:
    first = state.ensure_dev_pki(tmp_path)
    first.proxy_key.write_bytes(certs.key_to_pem(ec.generate_private_key(ec.SECP256R1())))
    state.ensure_dev_pki(tmp_path)
    proxy_key = certs.load_key_pem(first.proxy_key)
    assert proxy_key.public_key() == certs.load_cert_pem(first.proxy_cert).public_key()


def test_dev_pki_concurrent_callers_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: state.ensure_dev_pki(tmp_path), range(16)))
    assert all(r == results[0] for r in results)
    pki = results[0]
    ca = certs.load_cert_pem(pki.ca_cert)
    assert certs.is_signed_by(certs.load_cert_pem(pki.proxy_cert), ca)
    assert certs.is_signed_by(certs.load_cert_pem(pki.connector_cert), ca)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev-pki", "dev-pki.lock"]


def test_dev_pki_rejects_empty_subaccount(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subaccount"):
        state.ensure_dev_pki(tmp_path, "")
