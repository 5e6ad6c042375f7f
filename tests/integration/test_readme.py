"""The README as a tested document: its set-up block runs word for word and prints what the README says, and each
of the four mode configurations works when pasted.

Blocks are marked in the README with an HTML comment on the line before the fence:
``<!-- readme-test: setup -->`` (a shell block run with bash in an empty folder, the virtual environment's ``bin``
first on ``PATH``), ``<!-- readme-test: setup-output -->`` (lines that must appear in its output) and
``<!-- readme-test: proxy-config -->`` (a proxy configuration). The README's fixed ports are replaced by free ones,
so a proxy already running on this machine does not matter.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from connproxy.pki.tokens import issue_token
from tests.harness import Banner, Stack, serve, tcp_rule

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)
README_PORTS = (20003, 20004, 8042, 9494, 8080)


def blocks(tag: str) -> list[str]:
    """The README's blocks marked ``tag``, in order."""
    found = [body for name, _lang, body in MARK.findall(README.read_text(encoding="utf-8")) if name == tag]
    assert found, f"the README has no block marked {tag}"
    return found


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_the_parser_finds_the_marked_blocks() -> None:
    assert len(blocks("proxy-config")) == 4
    assert "connproxy probe socks" in blocks("setup")[0]


def test_the_real_set_up_runs_as_written(tmp_path: Path) -> None:
    script = blocks("setup")[0]
    for old, new in zip(README_PORTS, free_ports(len(README_PORTS)), strict=True):
        script = re.sub(rf"\b{old}\b", str(new), script)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "CONNPROXY_STATE_DIR": str(tmp_path / "state")}
    work = tmp_path / "work"
    work.mkdir()
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        # The block leaves its three servers running in the background, in the session bash led: end them all.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in work.glob("*.log"))
    assert process.returncode == 0, output + logs
    for line in blocks("setup-output")[0].splitlines():
        assert line in output, f"missing {line!r} in:\n{output}{logs}"


def mode_configs() -> list[dict[str, Any]]:
    return [yaml.safe_load(text) for text in blocks("proxy-config")]


@pytest.mark.parametrize("index", range(4), ids=["dedicated-trusted", "dedicated-token", "shared-token",
                                                   "shared-trusted"])
def test_each_mode_configuration_passes_config_check(tmp_path: Path, index: int) -> None:
    text = blocks("proxy-config")[index]
    (tmp_path / "proxy.yaml").write_text(text)
    issue_token(tmp_path / "tokens", "tenant-a", "sb-app!t1")  # mode 2's tokenKeysFile, as the README says
    result = subprocess.run([str(Path(sys.executable).parent / "connproxy"), "config", "check", "--proxy",
                             str(tmp_path / "proxy.yaml")], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _probe(port: int, token: str) -> Deferred[tuple[int, str]]:
    from tests.integration.test_probe import run_probe

    argv = ["probe", "socks", "--proxy", f"127.0.0.1:{port}", "--no-request", "db.internal:5432"]
    return run_probe([*argv[:2], "--token", token, *argv[2:]] if token else argv)


@pytest.mark.parametrize("index", [0, 1, 3], ids=["dedicated-trusted", "dedicated-token", "shared-trusted"])
@pytest_twisted.inlineCallbacks
def test_each_mode_configuration_serves_when_pasted(stack: Stack, index: int) -> Iterator[Deferred[Any]]:
    """Start a proxy with the README's mode block (ports and TLS files set by the test), a connector for
    tenant-a, and open a SOCKS5 stream with a token where the mode needs one. (Mode 3 fetches keys from an
    XSUAA domain over https and is covered by test_jwks_fetch instead.)"""
    token = yield deferToThread(issue_token, stack.tmp / "tokens", "tenant-a", "sb-app!t1")
    backend = yield serve(Banner)
    stack.ports.append(backend)
    stack.start_proxy(**mode_configs()[index])
    connector = stack.start_connector(access=[tcp_rule("db.internal", 5432, backend.getHost().port)])
    yield connector.when_up()
    status, text = yield _probe(stack.socks_port, token if index else "")
    assert status == 0, text
    assert "reply 0x00" in text
    if index == 1:
        status, text = yield _probe(stack.socks_port, "")
        assert status == 1 and "accepted none of our methods" in text, text
