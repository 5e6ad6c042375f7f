"""The ``logging`` configuration becomes twistd's only log observer: formats, levels, audit lines, escaping."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.application.service import Application, MultiService
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from connproxy.config import LoggingConfig
from connproxy.obs import audit, logs
from connproxy.obs.audit import AUDIT_PREFIX
from connproxy.obs.logs import LogObserver, escape_controls, install, observer_for
from connproxy.obs.stdout import NonBlockingLineWriter

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
CONSOLE_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[([^\]]*)\] (.*)$")


def capture(fmt: str = "console", level: str = "info") -> tuple[LogObserver, list[str], Logger]:
    lines: list[str] = []
    observer = LogObserver(LoggingConfig(format=fmt, level=level), lines.append, clock=lambda: NOW)
    return observer, lines, Logger(namespace="connproxy.test", observer=observer)


def emit_audit(observer: LogObserver) -> dict[str, Any]:
    """An audit event through ``observer`` as the services emit it (no writer: a log event)."""
    events: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(events.append)
    try:
        audit.tunnel_handshake(False, tenant="t\r\n1", connector_id="c", location=None, reason="bad", peer=None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == audit.AUDIT_NAMESPACE]
    observer(event)
    record: dict[str, Any] = event["audit"]
    return record


# ------------------------------------------------------------------------------------------------ console


def test_console_line_shape_and_level_filter() -> None:
    observer, lines, log = capture("console", "info")
    log.debug("hidden {x}", x=1)
    log.info("connector {connector_id} up", connector_id="c1")
    assert len(lines) == 1
    match = CONSOLE_LINE.match(lines[0])
    assert match is not None, lines[0]
    assert match.groups() == ("connproxy.test#info", "connector c1 up")


def test_control_characters_are_escaped_in_console_lines() -> None:
    observer, lines, log = capture("console")
    log.warn("SOCKS location {location}", location="loc\r\n2026-01-01T00:00:00Z [forged#info] x\x1b[31m\x00\u2028")
    [line] = lines
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
    assert "\u2028" not in line
    assert line.endswith("loc\\r\\n2026-01-01T00:00:00Z [forged#info] x\\x1b[31m\\x00\\u2028")


def test_console_traceback_lines_are_indented_and_escaped() -> None:
    observer, lines, log = capture("console")
    try:
        raise ValueError("boom\rinjected")
    except ValueError:
        log.failure("relay {stream} failed", stream=3)
    [text] = lines
    first, *rest = text.split("\n")
    assert first.endswith("relay 3 failed")
    assert rest and all(part.startswith("\t") for part in rest)
    assert "\r" not in text and "boom\\rinjected" in text


def test_escape_controls_keeps_printable_text() -> None:
    assert escape_controls("héllo wörld → ok") == "héllo wörld → ok"
    assert escape_controls("a\tb\x7f\x85") == "a\\tb\\x7f\\x85"


# ------------------------------------------------------------------------------------------------ json


def test_json_lines_with_structured_fields_and_level_filter() -> None:
    out = io.StringIO()
    observer = observer_for(LoggingConfig(format="json", level="warn"), out)
    log = Logger(namespace="test", observer=observer)
    log.info("not shown {x}", x=1)
    log.warn("connector {connector_id} gone", connector_id="c1")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    record = lines[0]
    assert record["connector_id"] == "c1" and record["message"] == "connector c1 gone"
    assert record["level"] == "warn" and record["logger"] == "test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert not [key for key in record if key.startswith("log_") or key == "__class_uuid__"]


def test_json_values_are_json_safe_and_reserved_names_do_not_clash() -> None:
    observer, lines, log = capture("json", "debug")

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    log.debug("{message} {time}", message="m", time=3, data=b"\x00\xff", obj=Opaque(), nan=float("nan"),
              nested={1: (Opaque(), "x\n")})
    [line] = lines
    assert line.isascii() and "\n" not in line
    record = json.loads(line)
    assert record["message"] == "m 3" and record["field_message"] == "m" and record["field_time"] == 3
    assert record["data"] == repr(b"\x00\xff") and record["obj"] == "<opaque>" and record["nan"] == "nan"
    assert record["nested"] == {"1": ["<opaque>", "x\n"]}


def test_json_failure_has_a_traceback_field() -> None:
    observer, lines, log = capture("json")
    log.failure("stream {stream} failed", Failure(KeyError("k")), stream=1)
    record = json.loads(lines[0])
    assert record["level"] == "critical" and record["message"] == "stream 1 failed"
    assert "KeyError" in record["traceback"]


def test_legacy_events_lose_twisted_internal_keys() -> None:
    observer, lines, log = capture("json")
    from twisted.logger import LogPublisher
    from twisted.python import log as legacy

    publisher = LogPublisher(observer)
    legacy_publisher = legacy.LogPublisher(publisher, publisher)
    legacy_publisher.msg("legacy message", system="HTTPChannel,0,127.0.0.1", extra="kept")
    record = json.loads(lines[-1])
    assert record["message"] == "legacy message" and record["extra"] == "kept"
    assert not {"isError", "system", "field_message", "field_time"} & set(record)


# ------------------------------------------------------------------------------------------------ audit


def test_audit_events_are_bare_audit_lines_in_console_format_at_any_level() -> None:
    observer, lines, _log = capture("console", "error")
    record = emit_audit(observer)
    [line] = lines
    assert line.startswith(AUDIT_PREFIX + "{") and "\r" not in line and "\n" not in line
    assert json.loads(line[len(AUDIT_PREFIX):]) == record
    assert record["tenant"] == "t\r\n1"


def test_audit_events_are_json_records_marked_audit_in_json_format() -> None:
    observer, lines, _log = capture("json", "error")
    record = emit_audit(observer)
    [line] = lines
    parsed = json.loads(line)
    assert parsed["audit"] is True and parsed["logger"] == audit.AUDIT_NAMESPACE
    assert parsed["data"] == record["data"] and parsed["tenant"] == "t\r\n1" and parsed["time"] == record["time"]
    assert "\r" not in line


def test_an_event_in_the_audit_namespace_without_an_audit_object_is_an_ordinary_line() -> None:
    observer, lines, _log = capture("console", "info")
    Logger(namespace=audit.AUDIT_NAMESPACE, observer=observer).info("plain {x}", x=1)
    assert lines and not lines[0].startswith(AUDIT_PREFIX) and lines[0].endswith("plain 1")


# ------------------------------------------------------------------------------------------------ level toggle


def test_toggle_between_configured_level_and_debug() -> None:
    observer, lines, log = capture("console", "warn")
    log.debug("d1")
    assert observer.toggle_debug() == LogLevel.debug
    log.debug("d2")
    assert observer.toggle_debug() == LogLevel.warn
    log.debug("d3")
    log.info("i3")
    messages = [CONSOLE_LINE.match(line).group(2) for line in lines]  # type: ignore[union-attr]
    assert messages == ["log level is now debug (configured: warn)", "d2",
                        "log level is now warn (configured: warn)"]


class FakeReactor:
    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []
        self.triggers: list[tuple[str, str]] = []

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        self.calls.append(lambda: f(*args))

    def addSystemEventTrigger(self, phase: str, event: str, *args: Any) -> None:
        self.triggers.append((phase, event))


@pytest.fixture
def restore_sigusr2() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)


def test_sigusr2_toggles_debug_in_the_reactor_thread(restore_sigusr2: None) -> None:
    app = Application("connproxy")
    reactor = FakeReactor()
    lines: list[str] = []
    observer = install(app, LoggingConfig(level="info"), reactor, sink=lines.append)
    assert observer is not None
    os.kill(os.getpid(), signal.SIGUSR2)
    assert len(reactor.calls) == 1 and observer.level == LogLevel.info  # not toggled inside the handler
    reactor.calls.pop()()
    assert observer.level == LogLevel.debug and "log level is now debug" in lines[-1]


# ------------------------------------------------------------------------------------------------ install


def test_installed_on_the_application_also_for_the_default_configuration() -> None:
    app = Application("connproxy")
    lines: list[str] = []
    observer = install(app, LoggingConfig(), sink=lines.append)
    assert observer is not None and app.getComponent(ILogObserver, None) is observer  # type: ignore[attr-defined]
    Logger(namespace="x", observer=observer).debug("twistd's own observer used to print this")
    assert lines == []
    assert install(app, LoggingConfig(format="json"), sink=lines.append) is None  # the first one stays


def test_not_installed_outside_twistd() -> None:
    assert install(MultiService(), LoggingConfig()) is None


def test_drop_counter_and_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    try:
        writer = NonBlockingLineWriter(write_end, limit=10)
        monkeypatch.setattr(logs, "_process_writer", writer)
        writer.dropped = 7
        assert logs.dropped_lines() == 7
        [family] = list(logs.DroppedLinesCollector().collect())
        assert family.name == "connproxy_log_lines_dropped" and family.type == "counter"
        assert [s.value for s in family.samples if s.name.endswith("_total")] == [7.0]
    finally:
        os.close(read_end)
        os.close(write_end)


def test_drop_notice_in_the_configured_format() -> None:
    json_observer, _lines, _log = capture("json")
    record = json.loads(json_observer.drop_notice(12))
    assert record["dropped"] == 12 and record["level"] == "warn" and "12 log lines dropped" in record["message"]
    console_observer, _lines, _log = capture("console")
    assert console_observer.drop_notice(3).endswith(
        "[connproxy.obs.logs#warn] 3 log lines dropped: standard output was not read fast enough")


def test_a_log_file_named_on_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    path = tmp_path / "proxy.log"
    monkeypatch.setattr(logs, "_process_file", None)
    monkeypatch.setattr(logs, "_log_file", str(path))
    observer = observer_for(LoggingConfig(format="json"))
    Logger(namespace="x", observer=observer).info("to the file {n}", n=1)
    assert json.loads(path.read_text())["message"] == "to the file 1"
    logs._process_file.file.close()  # type: ignore[union-attr]
    observer.sink("lost")  # a closed file drops and counts, it does not raise
    assert logs.dropped_lines() >= 1


def test_both_services_install_the_observer_with_their_reactor(tmp_path: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from connproxy.config import connector_config_from_mapping, embedded_proxy_config
    from connproxy.connector.service import make_connector_process
    from connproxy.proxy.service import ProxyService

    monkeypatch.setenv("CONNPROXY_STATE_DIR", str(tmp_path / "state"))
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(logs, "install", lambda *args: calls.append(args))
    reactor = MemoryReactorClock()
    proxy = ProxyService(embedded_proxy_config(), reactor)
    connector = make_connector_process(
        connector_config_from_mapping({"subaccountId": "t", "proxy": {"host": "127.0.0.1", "port": 1}}), reactor)
    for service in (proxy, connector):
        app = Application("connproxy")
        service.setServiceParent(app)
        # Once per process (the connector's tunnel service inside the process does not install one of its own),
        # with the reactor: SIGUSR2, SIGUSR1 rotation and the writer waiting for writability need it.
        assert calls[-1] == (app, service.config.logging, reactor)
    assert len(calls) == 2


def test_under_twist_the_installed_observer_is_handed_to_twist(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Any) -> None:
    """``twist`` builds its observer from its options' factory after the service joined the application: the
    factory must give the configured observer (console format, our level, audit lines), with twist's own level
    filter opened to ``debug``; ``--log-file`` picks standard output, standard error or a file."""
    from twisted.application.twist._options import TwistOptions

    monkeypatch.setattr(logs, "_installed", None)
    monkeypatch.setattr(logs, "_log_file", None)
    monkeypatch.setattr(logs, "_log_fd", 1)
    options = TwistOptions()
    logs.use_twist_options(options)
    assert options["logLevel"] == LogLevel.debug
    assert (logs._log_file, logs._log_fd) == (None, 1)  # twist's default: standard output
    lines: list[str] = []
    installed = install(Application("connproxy"), LoggingConfig(format="json"), sink=lines.append)
    assert installed is not None and options["fileLogObserverFactory"](sys.stdout) is installed
    options["logFile"] = sys.__stderr__  # what --log-file=+ gives outside pytest's capture
    logs.use_twist_options(options)
    assert (logs._log_file, logs._log_fd) == (None, 2)
    options.opt_log_file(str(tmp_path / "proxy.log"))
    logs.use_twist_options(options)
    assert (logs._log_file, logs._log_fd) == (str(tmp_path / "proxy.log"), 1)
    options["logFile"].close()
    # A name that is not a regular file (/dev/stdout in a container: a pipe) is written through the descriptor
    # twist opened, never as a rotated log file (whose seek would fail).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with io.FileIO(str(fifo), "r+") as pipe:  # read-write: opening does not wait for a reader
        options["logFile"] = pipe
        logs.use_twist_options(options)
        assert (logs._log_file, logs._log_fd) == (None, pipe.fileno())


def test_a_closed_stdout_drops_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)  # a descriptor number that is not open
    writer = logs._open_stdout(write_end)
    assert not writer.write_line("lost") and writer.dropped == 1


def test_twistd_logfile_naming_a_pipe_is_written_never_blocking(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Any) -> None:
    """``twistd --logfile=/dev/stdout`` (a pipe in a container) or a FIFO: opened once and written like standard
    output, not as a rotated log file (whose seek fails on a pipe); a regular or missing file stays a log file."""
    monkeypatch.setattr(logs, "_log_file", None)
    monkeypatch.setattr(logs, "_log_fd", 1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that opening for writing does not wait
    try:
        logs.set_log_file(str(fifo), nodaemon=True)
        assert logs._log_file is None and logs._log_fd not in (1, 2)
        assert os.fstat(logs._log_fd).st_ino == os.stat(fifo).st_ino
        os.close(logs._log_fd)
    finally:
        os.close(reader)
    logs.set_log_file(str(tmp_path / "proxy.log"), nodaemon=True)  # missing: twistd's rotated log file
    assert logs._log_file == str(tmp_path / "proxy.log")
