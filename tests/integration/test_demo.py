"""``connproxy demo`` in-process: the SOCKS5 command it prints works."""

from __future__ import annotations

import io
import os
import re
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
    proxy, connector, backend = await Deferred.fromCoroutine(run_demo(reactor, out))
    try:
        text = out.getvalue()
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
