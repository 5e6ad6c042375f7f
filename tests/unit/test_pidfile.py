"""``twistd connproxy`` and ``twistd connproxy-connector`` write no pid file unless ``--pidfile`` names one, and
send the log where ``--logfile`` says."""

from __future__ import annotations

import os
import sys

import pytest
from twisted.scripts._twistd_unix import ServerOptions

from connproxy.obs import logs
from connproxy.twistd import names_pidfile


def parse(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> ServerOptions:
    monkeypatch.setattr(sys, "argv", ["twistd", *argv])
    monkeypatch.setattr(logs, "_log_file", None)  # restored after the test
    options = ServerOptions()
    options.parseOptions(argv)
    return options


@pytest.mark.parametrize("plugin", ["connproxy", "connproxy-connector"])
def test_no_pid_file_by_default(monkeypatch: pytest.MonkeyPatch, plugin: str) -> None:
    assert parse(monkeypatch, ["-n", plugin])["pidfile"] == ""
    assert parse(monkeypatch, [plugin])["pidfile"] == ""


@pytest.mark.parametrize("argv", [
    ["-n", "--pidfile=twistd.pid", "connproxy"],
    ["-n", "--pidfile", "twistd.pid", "connproxy"],
    ["--logfile", "x.log", "--pid=twistd.pid", "connproxy-connector"],
])
def test_an_explicit_pid_file_is_kept(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    assert parse(monkeypatch, argv)["pidfile"] == os.path.abspath("twistd.pid")


def test_another_pid_file_and_the_empty_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(monkeypatch, ["-n", "--pidfile=/tmp/p.pid", "connproxy"])["pidfile"] == "/tmp/p.pid"
    assert parse(monkeypatch, ["-n", "--pidfile=", "connproxy"])["pidfile"] == ""


def test_names_pidfile() -> None:
    assert names_pidfile(["--pidf=a"]) and names_pidfile(["--pi", "a"])
    assert not names_pidfile(["--p=a"]) and not names_pidfile(["--profile=x", "connproxy"])
    assert not names_pidfile(["connproxy", "--", "--pidfile=x"])


@pytest.mark.parametrize(("argv", "expected"), [
    (["-n", "connproxy"], None),
    (["-n", "--logfile=-", "connproxy"], None),
    (["-n", "--logfile", "proxy.log", "connproxy"], "proxy.log"),
    (["connproxy-connector"], "twistd.log"),
])
def test_the_log_goes_where_logfile_says(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                         expected: str | None) -> None:
    parse(monkeypatch, argv)
    assert logs._log_file == expected
