"""Start-up of the real programs with a broken configuration: one line per problem on stderr, a non-zero exit, no
Python traceback (``twistd -n connproxy``, ``twistd -n connproxy-connector``, ``twist connproxy``)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from connproxy.pki.certs import PKIFiles
from connproxy.testing import mint_test_pki

BIN = Path(sys.executable).parent
#: Generous: twistd imports Twisted and the plugins on a loaded machine.
TIMEOUT = 90


def run(program: str, tap: str, config: Path) -> tuple[int, str, str]:
    args = [str(BIN / program)]
    if program == "twistd":
        args += ["-n", "--pidfile=", "--logfile=-"]
    args += [tap, "--config", str(config)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, cwd=config.parent, check=False)
    return done.returncode, done.stdout, done.stderr


def failed_start(config: Path, text: str, program: str = "twistd", tap: str = "connproxy") -> tuple[str, list[str]]:
    """Write ``text`` to ``config`` and start ``tap`` on it, which must fail: exit 2, no traceback. Returns stdout
    and the lines on stderr."""
    config.write_text(text)
    status, out, err = run(program, tap, config)
    assert status == 2, out + err
    assert "Traceback" not in out + err
    return out, err.splitlines()


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on while the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


@pytest.fixture
def pki(tmp_path: Path) -> PKIFiles:
    test_pki = mint_test_pki()
    files = test_pki.write(tmp_path / "pki")
    other = mint_test_pki()
    (files.dir / "other.key").write_bytes(other.server_key_pem)
    cert, key = test_pki.connector("t", None)
    (files.dir / "conn.crt").write_bytes(cert)
    (files.dir / "conn.key").write_bytes(key)
    return files


def proxy_yaml(tls: str, http_port: int = 0, oauth: str = "{allowedClientId: app, tokenKeysFile: pki/ca.crt}",
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


GOOD_TLS = "{certFile: pki/proxy.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.crt}"


def test_proxy_with_many_problems(tmp_path: Path, pki: PKIFiles) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(proxy_yaml(
        "{certFile: pki/missing.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.key}",
        oauth="{allowedClientId: app, tokenKeysUrl: 'http://127.0.0.1:1/keys', tokenKeysFile: nokeys.json}",
        extra="bogusKey: 1\ntunnel: {maxStreams: many}\n",
    ))
    status, _, err = run("twistd", "connproxy", config)
    assert status == 2
    assert "Traceback" not in err
    assert err.splitlines() == [
        "bogusKey: unknown key",
        "servers.proxy.authorization.oauth.tokenKeysUrl: must be an https:// URL, got 'http://127.0.0.1:1/keys'",
        "tunnel.maxStreams: expected an integer 1-2147483647, got 'many'",
        f"servers.businessDataTunnel.tls.certFile: no such file ({pki.dir}/missing.crt)",
        f"servers.businessDataTunnel.tls.clientCaFile: is a private key, not a certificate ({pki.dir}/ca.key)",
        f"servers.proxy.authorization.oauth.tokenKeysFile: no such file ({tmp_path}/nokeys.json)",
    ]


def test_connector_with_mismatched_key_and_missing_ca_file(tmp_path: Path, pki: PKIFiles) -> None:
    config = tmp_path / "connector.yaml"
    config.write_text(
        "subaccountId: t\n"
        "tls: {certFile: pki/conn.crt, keyFile: pki/other.key, caFile: pki/ca.crt}\n"
        "accessControl:\n"
        "  - {virtualHost: erp, virtualPort: 443, internalHost: 127.0.0.1, protocol: HTTPS, caFile: pki/erp-ca.crt}\n"
    )
    status, _, err = run("twistd", "connproxy-connector", config)
    assert status == 2
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"tls.keyFile: does not match the certificate in tls.certFile ({pki.dir}/other.key)",
        f"accessControl[0].caFile: no such file ({pki.dir}/erp-ca.crt)",
    ]


@pytest.mark.parametrize("program", ["twistd", "twist"])
def test_port_taken_at_start_up(tmp_path: Path, pki: PKIFiles, program: str) -> None:
    with held_port() as port:
        _, lines = failed_start(tmp_path / "proxy.yaml", proxy_yaml(
            GOOD_TLS, http_port=port, oauth="{allowedClientId: app, uaaDomain: uaa.example}"), program)
    assert lines == [f"servers.proxy.http.port: port {port} is already in use (127.0.0.1:{port})"]


def test_connector_metrics_port_taken_at_start_up(tmp_path: Path, pki: PKIFiles) -> None:
    with held_port() as port:
        _, lines = failed_start(tmp_path / "connector.yaml", (
            "subaccountId: t\n"
            "proxy: {host: 127.0.0.1, port: 1}\n"
            "tls: {certFile: pki/conn.crt, keyFile: pki/conn.key, caFile: pki/ca.crt}\n"
            f"metrics: {{prometheus: {{enabled: true, port: {port}, bindAddress: 127.0.0.1}}}}\n"
        ), tap="connproxy-connector")
    assert lines == [f"metrics.prometheus.port: port {port} is already in use (127.0.0.1:{port})"]


def test_start_up_reports_a_taken_port_with_the_other_problems_before_binding(tmp_path: Path, pki: PKIFiles) -> None:
    with held_port() as port:
        out, lines = failed_start(tmp_path / "proxy.yaml", proxy_yaml(
            "{certFile: pki/missing.crt, keyFile: pki/proxy.key, clientCaFile: pki/ca.crt}",
            http_port=port, oauth="{allowedClientId: app, uaaDomain: uaa.example}"))
    assert "listening" not in out  # nothing was bound before the answer
    assert lines == [
        f"servers.businessDataTunnel.tls.certFile: no such file ({pki.dir}/missing.crt)",
        f"servers.proxy.http.port: port {port} is already in use (127.0.0.1:{port})",
    ]
