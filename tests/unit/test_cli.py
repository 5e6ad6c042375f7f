"""Tests for the ``connproxy`` console script (connproxy.cli)."""

from __future__ import annotations

import argparse
import socket
import sys
import types
from pathlib import Path

import pytest

from connproxy import cli
from connproxy.pki import certs
from connproxy.pki.certs import ConnectorIdentity
from connproxy.testing import mint_test_pki


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_certs_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    status, out, err = _run(
        capsys, "certs", "init", "--dir", str(pki), "--host", "proxy.example", "--host", "127.0.0.1"
    )
    assert status == 0, err
    names = ["ca.crt", "ca.key", "proxy.crt", "proxy.key"]
    assert out.splitlines() == [str(pki / name) for name in names]
    for name in names:
        assert (pki / name).is_file()
    ca = certs.load_cert_pem(pki / "ca.crt")
    assert certs.is_signed_by(certs.load_cert_pem(pki / "proxy.crt"), ca)


def test_certs_init_again_keeps_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "certs", "init", "--dir", str(tmp_path), "--host", "a.example")[0] == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    status, out, err = _run(capsys, "certs", "init", "--dir", str(tmp_path), "--host", "b.example")
    assert status == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert out.splitlines() == [str(tmp_path / "proxy.crt"), str(tmp_path / "proxy.key")]
    assert "kept the existing CA" in err


@pytest.mark.parametrize(
    ("extra", "identity"),
    [
        ([], ConnectorIdentity("tenant-a", None)),
        (["--location", ""], ConnectorIdentity("tenant-a", "")),
        (["--location", "loc 1"], ConnectorIdentity("tenant-a", "loc 1")),
    ],
)
def test_certs_connector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], identity: ConnectorIdentity
) -> None:
    assert _run(capsys, "certs", "init", "--dir", str(tmp_path), "--host", "localhost")[0] == 0
    prefix = tmp_path / "connectors" / "scc"
    status, out, err = _run(
        capsys, "certs", "connector", "--dir", str(tmp_path), "--subaccount", "tenant-a", *extra, "--out", str(prefix)
    )
    assert status == 0, err
    crt, key = Path(f"{prefix}.crt"), Path(f"{prefix}.key")
    assert out.splitlines() == [str(crt), str(key)]
    cert = certs.load_cert_pem(crt)
    assert certs.connector_identity(cert) == identity
    assert certs.is_signed_by(cert, certs.load_cert_pem(tmp_path / "ca.crt"))
    assert certs.load_key_pem(key).public_key() == cert.public_key()


def test_certs_connector_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(
        capsys, "certs", "connector", "--dir", str(tmp_path), "--subaccount", "t", "--out", str(tmp_path / "x")
    )
    assert status == 2
    assert out == ""
    assert err.startswith("connproxy certs connector: CA not found")
    assert "ca.crt" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.crt").exists()


def test_certs_init_with_half_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.crt").write_text("whatever")
    status, _, err = _run(capsys, "certs", "init", "--dir", str(tmp_path), "--host", "localhost")
    assert status == 2
    assert "refusing to replace a CA" in err
    assert (tmp_path / "ca.crt").read_text() == "whatever"


def test_certs_init_bad_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "certs", "init", "--dir", str(tmp_path), "--host", "not a host")
    assert status == 2
    assert "not a host" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["certs"],
        ["certs", "init", "--dir", "x"],
        ["certs", "connector", "--dir", "x", "--out", "y"],
        ["config", "check"],
        ["config", "check", "--proxy", "a", "--connector", "b"],
        ["token", "--dir", "x", "--subaccount", "s", "--client-id", "c", "--ttl", "0"],
        ["nonsense"],
    ],
)
def test_usage_errors_return_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, *argv)
    assert status == 2
    assert "usage:" in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    assert "certs" in out
    status, out, _ = _run(capsys, "--version")
    assert status == 0
    assert out.startswith("connproxy ")


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text("tenantMode: shared\nservers: {businessDataTunnel: {port: 0}, proxy: {http: {port: 0, "
                     "enableProxyAuthorization: false}, socks5: {enabled: false}}}\nmetrics: {prometheus: {port: 0}}\n")
    assert _run(capsys, "config", "check", "--proxy", str(proxy)) == (0, "ok\n", "")
    connector = tmp_path / "connector.yaml"
    connector.write_text("subaccountId: t\n")
    assert _run(capsys, "config", "check", "--connector", str(connector)) == (0, "ok\n", "")


def test_config_check_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text("subaccountId: t\nservers: {proxy: {socks5: {port: abc, enableProxyAuthorization: false}, "
                     "http: {enabled: false}}}\n")
    status, out, err = _run(capsys, "config", "check", "--proxy", str(proxy), "--skip-ports")
    assert status == 2
    assert out == ""
    assert err == "servers.proxy.socks5.port: expected an integer 1-65535, got 'abc'\n"
    status, _, err = _run(capsys, "config", "check", "--connector", str(proxy))
    assert status == 2
    assert err.startswith("servers: unknown key")
    status, _, err = _run(capsys, "config", "check", "--connector", str(tmp_path / "missing.yaml"))
    assert status == 2
    assert "missing.yaml: cannot read" in err


# ---------------------------------------------------------------------------------------------------------
# `config check` catches what start-up would: one line per problem, every problem, no traceback


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    """A PKI in tmp_path/pki: ca.crt/key, proxy.crt/key, other.crt/key (a second CA's server pair), conn.crt/key,
    token_keys.json."""
    from connproxy.pki import tokens

    pki = mint_test_pki()
    files = pki.write(tmp_path / "pki")
    other = mint_test_pki()
    (files.dir / "other.crt").write_bytes(other.server_cert_pem)
    (files.dir / "other.key").write_bytes(other.server_key_pem)
    cert, key = pki.connector("t", None)
    (files.dir / "conn.crt").write_bytes(cert)
    (files.dir / "conn.key").write_bytes(key)
    tokens.load_or_create_signing_key(files.dir)
    return files.dir


def _proxy_yaml(tls: str = "{certFile: pki/proxy.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.crt}",
                oauth: str = "{allowedClientId: app, tokenKeysFile: pki/token_keys.json}", http_port: int = 0,
                extra: str = "") -> str:
    return (
        "subaccountId: t\n"
        "servers:\n"
        f"  businessDataTunnel: {{port: 0, bindAddress: 127.0.0.1, tls: {tls}}}\n"
        "  proxy:\n"
        f"    http: {{port: {http_port}, allowRemoteConnections: false}}\n"
        "    socks5: {port: 0, allowRemoteConnections: false}\n"
        f"    authorization: {{oauth: {oauth}}}\n"
        "metrics: {prometheus: {enabled: false}}\n" + extra
    )


def _connector_yaml(tls: str = "{certFile: pki/conn.crt, keyFile: pki/conn.key, caFile: pki/ca.crt}",
                    ca_file: str = "pki/ca.crt", extra: str = "") -> str:
    return (
        "subaccountId: t\n"
        f"tls: {tls}\n"
        "accessControl:\n"
        "  - {virtualHost: erp, virtualPort: 443, internalHost: 10.0.0.1, protocol: HTTPS, "
        f"caFile: {ca_file}}}\n" + extra
    )


def _check(capsys: pytest.CaptureFixture[str], tmp_path: Path, role: str, text: str) -> tuple[int, list[str]]:
    path = tmp_path / f"{role}.yaml"
    path.write_text(text)
    status, out, err = _run(capsys, "config", "check", f"--{role}", str(path))
    assert "Traceback" not in err
    if status == 0:
        assert (out, err) == ("ok\n", "")
    else:
        assert out == ""
    return status, err.splitlines()


def test_check_good_files(tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(capsys, tmp_path, "proxy", _proxy_yaml()) == (0, [])
    assert _check(capsys, tmp_path, "connector", _connector_yaml()) == (0, [])


BROKEN = [
    pytest.param("proxy", _proxy_yaml(tls="{certFile: pki/missing.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.crt}"),
                 ["servers.businessDataTunnel.tls.certFile: no such file ({pki}/missing.crt)"], id="missing certificate"),
    pytest.param("proxy", _proxy_yaml(tls="{certFile: pki/proxy.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.key}"),
                 ["servers.businessDataTunnel.tls.clientCaFile: is a private key, not a certificate ({pki}/ca.key)"],
                 id="key file as CA"),
    pytest.param("proxy", _proxy_yaml(tls="{certFile: pki/proxy.crt, keyFile: pki/other.key, clientCaFile: pki/ca.crt}"),
                 ["servers.businessDataTunnel.tls.keyFile: does not match the certificate in "
                  "servers.businessDataTunnel.tls.certFile ({pki}/other.key)"], id="certificate and key do not match"),
    pytest.param("proxy", _proxy_yaml(tls="{certFile: pki/proxy.key, keyFile: pki/proxy.crt, clientCaFile: pki/ca.crt}"),
                 ["servers.businessDataTunnel.tls.certFile: is a private key, not a certificate ({pki}/proxy.key)",
                  "servers.businessDataTunnel.tls.keyFile: is a certificate, not a private key ({pki}/proxy.crt)"],
                 id="certificate and key swapped"),
    pytest.param("proxy", _proxy_yaml(oauth="{allowedClientId: app, tokenKeysFile: nokeys.json}"),
                 ["servers.proxy.authorization.oauth.tokenKeysFile: no such file ({tmp}/nokeys.json)"],
                 id="missing tokenKeysFile"),
    pytest.param("proxy", _proxy_yaml(oauth="{allowedClientId: app, tokenKeysFile: pki/ca.crt}"),
                 ["servers.proxy.authorization.oauth.tokenKeysFile: the JWKS is not JSON ({pki}/ca.crt)"],
                 id="tokenKeysFile not a JWKS"),
    pytest.param("proxy", _proxy_yaml(oauth="{allowedClientId: app, tokenKeysUrl: 'http://127.0.0.1:8080/keys'}"),
                 ["servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL, got "
                  "'http://127.0.0.1:8080/keys'"], id="http tokenKeysUrl"),
    pytest.param("proxy", _proxy_yaml(extra="bogusKey: 1\n"), ["bogusKey: unknown key"], id="unknown key"),
    pytest.param("proxy", _proxy_yaml(extra="tunnel: {maxStreams: many}\n"),
                 ["tunnel.maxStreams: expected an integer 1-2147483647, got 'many'"], id="bad value"),
    pytest.param("connector", _connector_yaml(ca_file="pki/missing-ca.crt"),
                 ["accessControl[0].caFile: no such file ({pki}/missing-ca.crt)"], id="missing accessControl caFile"),
    pytest.param("connector", _connector_yaml(tls="{certFile: pki/conn.crt, keyFile: pki/conn.key, caFile: pki/conn.key}"),
                 ["tls.caFile: is a private key, not a certificate ({pki}/conn.key)"], id="connector key file as CA"),
    pytest.param("connector", _connector_yaml(tls="{certFile: pki/conn.crt, keyFile: pki/proxy.key, caFile: pki/ca.crt}"),
                 ["tls.keyFile: does not match the certificate in tls.certFile ({pki}/proxy.key)"],
                 id="connector certificate and key do not match"),
]


@pytest.mark.parametrize(("role", "text", "expected"), BROKEN)
def test_check_broken(tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str], role: str, text: str,
                      expected: list[str]) -> None:
    status, lines = _check(capsys, tmp_path, role, text)
    assert status == 2
    assert lines == [line.format(pki=pki_dir, tmp=tmp_path) for line in expected]


def test_check_port_taken(tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        status, lines = _check(capsys, tmp_path, "proxy", _proxy_yaml(http_port=port))
        assert status == 2
        assert lines == [f"servers.proxy.http.port: port {port} is already in use (127.0.0.1:{port})"]
        path = tmp_path / "proxy.yaml"
        # --skip-ports: for the file of a proxy that is running
        assert _run(capsys, "config", "check", "--proxy", str(path), "--skip-ports") == (0, "ok\n", "")


def test_check_reports_every_problem(tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _proxy_yaml(
        tls="{certFile: pki/missing.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.key}",
        oauth="{allowedClientId: app, tokenKeysUrl: 'http://127.0.0.1/k', tokenKeysFile: none.json}",
        extra="bogus: 1\nlogging: {level: loud}\n",
    )
    status, lines = _check(capsys, tmp_path, "proxy", text)
    assert status == 2
    assert lines == [
        "bogus: unknown key",
        "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL, got 'http://127.0.0.1/k'",
        "logging.level: expected one of debug, info, warn, error, got 'loud'",
        f"servers.businessDataTunnel.tls.certFile: no such file ({pki_dir}/missing.crt)",
        f"servers.businessDataTunnel.tls.clientCaFile: is a private key, not a certificate ({pki_dir}/ca.key)",
        f"servers.proxy.authorization.oauth.tokenKeysFile: no such file ({tmp_path}/none.json)",
    ]


@pytest.mark.parametrize(("command", "module"), [("token", "connproxy.pki.tokens"), ("demo", "connproxy.demo")])
def test_delegates_not_available(
    command: str, module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail like a missing module
    argv = [command] + (["--dir", "d", "--subaccount", "s", "--client-id", "c"] if command == "token" else [])
    status, out, err = _run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err == f"connproxy {command}: not available yet\n"


def test_delegate_without_the_function(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "connproxy.demo", types.ModuleType("connproxy.demo"))
    status, _, err = _run(capsys, "demo")
    assert status == 2
    assert "not available yet" in err


def test_token_arguments_are_passed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[argparse.Namespace] = []

    def main_token(args: argparse.Namespace) -> int:
        seen.append(args)
        print("jwt")
        return 0

    fake = types.ModuleType("connproxy.pki.tokens")
    fake.main_token = main_token  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "connproxy.pki.tokens", fake)
    status, out, _ = _run(capsys, "token", "--dir", "d", "--subaccount", "s", "--client-id", "c")
    assert (status, out) == (0, "jwt\n")
    (args,) = seen
    assert (args.dir, args.subaccount, args.client_id, args.ttl) == ("d", "s", "c", 3600)
    _run(capsys, "token", "--dir", "d", "--subaccount", "s", "--client-id", "c", "--ttl", "60")
    assert seen[-1].ttl == 60


def test_demo_arguments_are_passed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[argparse.Namespace] = []

    def main_demo(args: argparse.Namespace) -> int:
        seen.append(args)
        return 3

    fake = types.ModuleType("connproxy.demo")
    fake.main_demo = main_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "connproxy.demo", fake)
    assert _run(capsys, "demo", "--state-dir", "/s")[0] == 3
    assert seen[-1].state_dir == "/s"
    assert _run(capsys, "demo")[0] == 3
    assert seen[-1].state_dir is None


def test_check_bug_shows_traceback_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from connproxy import config

    def broken(path: object, *, check_ports: bool) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(config, "verify_proxy_config_file", broken)
    status, out, err = _run(capsys, "config", "check", "--proxy", str(tmp_path / "p.yaml"))
    assert (status, out) == (70, "")
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.endswith("failed because of a bug (not a configuration problem); please report it with the "
                        "traceback above\n")


def test_check_ipv6_port_taken(capsys: pytest.CaptureFixture[str]) -> None:
    from connproxy.config import bind_problem

    try:
        taken = socket.socket(socket.AF_INET6)
        taken.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with taken:
        taken.listen(1)
        port = taken.getsockname()[1]
        assert bind_problem("::1", port) == f"port {port} is already in use ([::1]:{port})"
    assert bind_problem("::1", 0) is None
