"""``connproxy demo`` in-process: the SOCKS5 command it prints works."""

from __future__ import annotations

import io
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from connproxy.demo import run_demo


@pytest_twisted.ensureDeferred
async def test_demo_prints_commands_that_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "state"))
    out = io.StringIO()
    held = socket.socket()  # the default metrics port taken (e.g. by README command 1): the demo moves it
    try:
        held.bind(("127.0.0.1", 9494))
        held.listen(1)
    except OSError:
        pass  # taken by something else already: the same situation
    try:
        proxy, connector, backend = await Deferred.fromCoroutine(run_demo(reactor, out))
    finally:
        held.close()
    try:
        text = out.getvalue()
        (metrics_url,) = re.findall(r"^  metrics +(http://\S+)$", text, re.MULTILINE)
        assert not metrics_url.startswith("http://127.0.0.1:9494/")
        result, err, code = await getProcessOutputAndValue("curl", ["-sS", "--max-time", "10", metrics_url],
                                                           env=os.environ)
        assert code == 0 and b"connproxy_" in result, err
        commands = re.findall(r"^  (curl .*)$", text, re.MULTILINE)
        assert any("--socks5-hostname" in c for c in commands) and any(" -x " in c for c in commands)
        for command in commands:
            args: list[Any] = command.split()[1:]
            result, err, code = await getProcessOutputAndValue("curl", ["-sS", "--max-time", "10", *args],
                                                               env=os.environ)
            assert code == 0, (command, err)
            assert b"through the connproxy tunnel" in result
    finally:
        await connector.stopService()
        await proxy.stopService()
        await backend.stopListening()
