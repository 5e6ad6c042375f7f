"""Tests for the ``connproxy`` console script (connproxy.cli)."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest

from connproxy import cli
from connproxy.pki import certs
from connproxy.pki.certs import ConnectorIdentity


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
    proxy.write_text("tenantMode: shared\nservers: {proxy: {http: {enableProxyAuthorization: false}, socks5: {enabled: false}}}\n")
    assert _run(capsys, "config", "check", "--proxy", str(proxy)) == (0, "ok\n", "")
    connector = tmp_path / "connector.yaml"
    connector.write_text("subaccountId: t\n")
    assert _run(capsys, "config", "check", "--connector", str(connector)) == (0, "ok\n", "")


def test_config_check_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text("subaccountId: t\nservers: {proxy: {socks5: {port: abc}}}\n")
    status, out, err = _run(capsys, "config", "check", "--proxy", str(proxy))
    assert status == 2
    assert out == ""
    assert err == "servers.proxy.socks5.port: expected an integer 1-65535, got 'abc'\n"
    status, _, err = _run(capsys, "config", "check", "--connector", str(proxy))
    assert status == 2
    assert err.startswith("servers: unknown key")
    status, _, err = _run(capsys, "config", "check", "--connector", str(tmp_path / "missing.yaml"))
    assert status == 2
    assert "missing.yaml: cannot read" in err


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
