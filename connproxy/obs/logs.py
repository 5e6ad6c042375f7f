"""The ``logging`` configuration: the one log observer of a twistd process, its formats, levels and output.

Under twistd, :func:`install` (called by the services when they join twistd's application) gives the application
an ``ILogObserver`` component; twistd then uses it as the only observer (instead of its own, which filters
nothing: that is why ``#debug`` lines used to show at ``info``). The observer (:class:`LogObserver`):

* passes audit events (namespace :data:`connproxy.obs.audit.AUDIT_NAMESPACE`) whatever the level, written as
  ``[AUDIT-EVENT] {json}`` in console format and as JSON objects with ``"audit": true`` in json format;
* passes other events at the configured level or above (``logging.level``), written in ``logging.format``:
  ``console``: ``2026-12-05T12:00:00.123Z [namespace#level] message``, a traceback on tab-indented lines
  after it; ``json``: one object per line with ``time`` (RFC 3339, UTC), ``level``, ``logger`` (the namespace),
  ``message`` (rendered with ``formatEvent``), ``traceback`` when there is one, and the event's own fields
  (JSON-safe; a value JSON cannot represent is written as its ``repr``; Twisted's ``log_*`` keys and legacy keys
  are left out; a field named like one of the top-level keys is written with the prefix ``field_``);
* escapes control characters (C0, DEL, C1, U+2028/9) in every line: console lines show them as ``\\n``,
  ``\\r``, ``\\t``, ``\\xNN`` or ``\\uNNNN``, JSON as JSON escapes, so no client-supplied text can start a
  line of its own;
* toggles between the configured level and ``debug`` on SIGUSR2 (and says so in a line of the log);
* writes through a :class:`connproxy.obs.stdout.NonBlockingLineWriter` on standard output, so a stdout that is
  not read never blocks the process: at most :data:`connproxy.obs.stdout.DEFAULT_LIMIT` bytes are kept, the
  rest is dropped and counted (:func:`dropped_lines`, metric ``connproxy_log_lines_dropped_total``), and one
  line ``N log lines dropped ...`` is written when writing resumes.

The lines go where twistd's ``--logfile`` and ``--nodaemon`` say (:func:`set_log_file`; standard output under
``twistd -n``), or, under ``twist``, where its ``--log-file`` says (:func:`use_twist_options`: the same observer,
handed to twist through its observer factory); see ``docs/logging.md``.
"""

from __future__ import annotations

import atexit
import errno
import math
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any, Final, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

from connproxy.config import LoggingConfig
from connproxy.obs.audit import AUDIT_NAMESPACE, AUDIT_PREFIX, audit_json_record, encode_json
from connproxy.obs.stdout import NonBlockingLineWriter

__all__ = [
    "LOG_NAMESPACE",
    "DroppedLinesCollector",
    "LogObserver",
    "LineSink",
    "console_line",
    "dropped_lines",
    "escape_controls",
    "install",
    "json_line",
    "observer_for",
    "rfc3339",
    "set_log_file",
    "use_twist_options",
]

#: Namespace of the lines this module writes itself (level toggles, drop notices).
LOG_NAMESPACE: Final = "connproxy.obs.logs"
#: Seconds the end of the process (after the reactor's shutdown, and at exit) waits for a slow reader to take
#: what is still queued; lines written after that are still written if the descriptor takes them at once.
FINAL_FLUSH_SECONDS: Final = 1.0

#: Receives one complete line, without its newline.
LineSink = Callable[[str], object]

_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Keys of legacy (``twisted.python.log``) events, Twisted-internal like the ``log_*`` keys.
_LEGACY_KEYS: Final = frozenset({"message", "time", "isError", "system", "format", "why", "failure", "printed"})
_RESERVED: Final = frozenset({"time", "level", "logger", "message", "traceback", "audit"})
_MAX_DEPTH: Final = 8

#: The writer on standard output of this process, once :func:`install` made it.
_process_writer: NonBlockingLineWriter | None = None
#: The log file of this process, when twistd's command line names one (:func:`set_log_file`).
_process_file: _FileSink | None = None
#: Where the log goes: ``None`` for standard output (or :data:`_log_fd`), else a file name (:func:`set_log_file`).
_log_file: str | None = None
#: The descriptor written when the log goes to no file: 1, or 2 under ``twist --log-file=+``.
_log_fd: int = 1
#: The observer :func:`install` gave the application (``twist`` asks for it: :func:`use_twist_options`).
_installed: LogObserver | None = None


def escape_controls(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1, U+2028, U+2029) written as an escape sequence."""
    return _CONTROLS.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339 UTC with milliseconds, e.g. ``2026-12-05T12:00:00.123Z``."""
    stamp = datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as something :func:`json.dumps` takes (strict JSON); anything else as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth >= _MAX_DEPTH:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _own_fields(event: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The event's own fields: no ``log_*`` key, no legacy key, reserved names prefixed with ``field_``."""
    legacy = "isError" in event
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key == "__class_uuid__":
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        yield ("field_" + key if key in _RESERVED else key), value


def _traceback(event: Mapping[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        text: str = failure.getTraceback()
    except Exception:
        return "(the traceback could not be formatted)"
    return text


def _message(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    if not text and event.get("log_failure") is not None:
        try:
            text = str(event["log_failure"].getErrorMessage())
        except Exception:
            text = "(failure)"
    return text


def _level_name(event: Mapping[str, Any]) -> str:
    name = getattr(event.get("log_level"), "name", None)
    return name if isinstance(name, str) else "-"


def console_line(event: dict[str, Any]) -> str:
    """One event as a console line (plus tab-indented traceback lines); control characters escaped."""
    system = event.get("log_system")
    if system is None:
        system = "{}#{}".format(event.get("log_namespace", "-"), _level_name(event))
    when = event.get("log_time")
    stamp = rfc3339(when if isinstance(when, (int, float)) else time.time())
    line = f"{stamp} [{escape_controls(str(system))}] {escape_controls(_message(event))}"
    trace = _traceback(event)
    if trace:
        line += "".join("\n\t" + escape_controls(part) for part in trace.rstrip("\n").split("\n"))
    return line


def json_line(event: dict[str, Any]) -> str:
    """One event as one JSON object (see the module docstring); ASCII only, so control characters are escaped."""
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": rfc3339(when if isinstance(when, (int, float)) else time.time()),
        "level": _level_name(event),
        "logger": str(event.get("log_namespace", "-")),
        "message": _message(event),
    }
    trace = _traceback(event)
    if trace:
        record["traceback"] = trace
    for key, value in _own_fields(event):
        record[key] = _jsonable(value)
    return encode_json(record)


def _stream_sink(stream: IO[str]) -> LineSink:
    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return write


@implementer(ILogObserver)
class LogObserver:
    """The observer for a :class:`~connproxy.config.LoggingConfig`; see the module docstring.

    :param config: ``format`` (``console`` or ``json``) and ``level``.
    :param sink: receives each line (without its newline); it must not block and must not log.
    :param clock: seconds since the epoch, for the lines this observer writes itself.
    """

    def __init__(self, config: LoggingConfig, sink: LineSink, clock: Callable[[], float] = time.time) -> None:
        self.format = config.format
        self.configured_level = LogLevel.levelWithName(config.level)
        self.sink = sink
        self.clock = clock
        self._line = json_line if config.format == "json" else console_line
        self._predicate = LogLevelFilterPredicate(defaultLogLevel=self.configured_level)
        self._filtered = FilteringLogObserver(cast(ILogObserver, self._write), [self._predicate])
        self.level = self.configured_level

    def __call__(self, event: dict[str, Any]) -> None:
        """Write ``event`` if it passes the level (audit events always do)."""
        if event.get("log_namespace") == AUDIT_NAMESPACE and isinstance(event.get("audit"), Mapping):
            self._write_audit(event["audit"])
        else:
            self._filtered(event)

    def _write(self, event: dict[str, Any]) -> None:
        try:
            line = self._line(event)
        except Exception as e:  # a formatter bug must not lose the event silently nor break the publisher
            line = self._line({"log_namespace": LOG_NAMESPACE, "log_level": LogLevel.error,
                               "log_time": self.clock(), "log_format": "unformattable log event: {error}",
                               "error": repr(e)})
        self.sink(line)

    def _write_audit(self, record: Mapping[str, Any]) -> None:
        if self.format == "json":
            self.sink(encode_json(audit_json_record(record)))
        else:
            self.sink(AUDIT_PREFIX + encode_json(dict(record)))

    def _own_event(self, log_level: LogLevel, log_format: str, **fields: Any) -> dict[str, Any]:
        return {"log_namespace": LOG_NAMESPACE, "log_level": log_level, "log_time": self.clock(),
                "log_format": log_format, **fields}

    def set_level(self, level: LogLevel) -> None:
        """Pass events at ``level`` and above from now on; writes a line saying so (whatever the level)."""
        self.level = level
        self._predicate.setLogLevelForNamespace("", level)
        self._write(self._own_event(LogLevel.warn, "log level is now {new_level} (configured: {configured_level})",
                                    new_level=level.name, configured_level=self.configured_level.name))

    def toggle_debug(self) -> LogLevel:
        """Switch between the configured level and ``debug`` (SIGUSR2); returns the new level."""
        level = self.configured_level if self.level == LogLevel.debug else LogLevel.debug
        self.set_level(level)
        return level

    def drop_notice(self, count: int) -> str:
        """The line saying that ``count`` lines were dropped, in this observer's format."""
        return self._line(self._own_event(
            LogLevel.warn, "{dropped} log lines dropped: standard output was not read fast enough",
            dropped=count))


def observer_for(config: LoggingConfig, stream: IO[str] | None = None) -> LogObserver:
    """A :class:`LogObserver` for ``config`` writing to ``stream`` (blocking writes: for tests and tools) or, by
    default, where twistd's command line says (:func:`set_log_file`): this process's non-blocking standard
    output writer, or a log file."""
    if stream is not None:
        return LogObserver(config, _stream_sink(stream))
    if _log_file is not None:
        return LogObserver(config, _file_sink(_log_file))
    writer = _stdout_writer()
    observer = LogObserver(config, writer.write_line)
    writer.notice = observer.drop_notice
    return observer


def set_log_file(logfile: str | None, nodaemon: bool) -> None:
    """Record where twistd's command line sends the log (the plugins' option parser calls this), as twistd
    itself would: ``--logfile=-``, or no ``--logfile`` with ``--nodaemon``: standard output; ``--logfile=NAME``:
    that file, rotated as twistd rotates it (at 1 MB, and on SIGUSR1); no ``--logfile`` when daemonizing:
    ``twistd.log``. A ``NAME`` that exists and is not a regular file (``/dev/stdout`` in a container: a pipe; a
    FIFO; a terminal) is opened once and written never blocking, like standard output, not rotated (a log file's
    seek fails on it)."""
    global _log_file, _log_fd
    _log_file = None if logfile == "-" or (nodaemon and not logfile) else (logfile or "twistd.log")
    if _log_file is not None:
        try:
            special = not stat.S_ISREG(os.stat(_log_file).st_mode)
        except OSError:  # not there yet: twistd's log file, created on first write
            special = False
        if special:
            try:
                _log_fd = os.open(_log_file, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:  # left to the log file's own open, which says what is wrong
                return
            _log_file = None


def use_twist_options(options: MutableMapping[str, Any]) -> None:
    """Under ``twist`` (``options`` are its command line; the plugins' option parser calls this): log through the
    observer :func:`install` gives the application, where ``--log-file`` says (``-``, the default: standard
    output; ``+``: standard error; the name of a regular file: that file, rotated on SIGUSR1 and at 1 MB as under
    twistd; any other name, such as ``/dev/stdout`` or a FIFO: the descriptor twist opened, never blocking).

    twist has no application observer: after making the service it builds its own from the options'
    ``fileLogObserverFactory`` (blocking writes, its own JSON, no audit lines, ``logging`` ignored). That
    factory is replaced by one returning :func:`install`'s observer, and twist's level filter is opened to
    ``debug``: ``logging.level`` and ``logging.format`` decide, as under twistd (``--log-level`` and
    ``--log-format`` are not used).
    """
    global _log_file, _log_fd
    log_file = options.get("logFile")
    name = getattr(log_file, "name", None)
    try:
        fd = log_file.fileno() if log_file is not None else 1
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # not a real file (a test's stand-in): standard output
        fd, regular = 1, False
    if isinstance(name, str) and not name.startswith("<"):  # a name from the command line ("<stdout>" is not)
        # A regular file is rotated as under twistd; anything else (/dev/stdout in a container: a pipe; a FIFO)
        # is written through the descriptor twist opened, never blocking.
        _log_file, _log_fd = (name, 1) if regular else (None, fd)
    else:
        _log_file, _log_fd = None, 2 if fd == 2 or name == "<stderr>" else 1
    options["fileLogObserverFactory"] = _twist_observer
    options["logLevel"] = LogLevel.debug


def _twist_observer(_log_file_object: Any) -> LogObserver:
    """twist's ``fileLogObserverFactory``: the observer :func:`install` made (the configured one), or, if no
    service installed one, one for the default ``logging`` configuration."""
    return _installed if _installed is not None else observer_for(LoggingConfig())


class _FileSink:
    """Lines to a twistd-style rotating log file; a failed write drops the line and counts it."""

    def __init__(self, path: str) -> None:
        from twisted.python.logfile import LogFile

        self.file = LogFile.fromFullPath(path)
        self.dropped = 0

    def __call__(self, line: str) -> None:
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except Exception:  # OSError (disk full), or a closed file (AttributeError): never into the caller
            self.dropped += 1


def _file_sink(path: str) -> _FileSink:
    global _process_file
    if _process_file is None:
        _process_file = _FileSink(path)
    return _process_file


def _open_stdout(fd: int = 1) -> NonBlockingLineWriter:
    """The writer on ``fd``; if ``fd`` is not open, one that drops (and counts) every line."""
    try:
        return NonBlockingLineWriter(fd)
    except OSError:

        def closed(_data: memoryview) -> int:
            raise OSError(errno.EBADF, "standard output is closed")

        return NonBlockingLineWriter(fd, raw=(-1, closed))


def _stdout_writer() -> NonBlockingLineWriter:
    global _process_writer
    if _process_writer is None:
        _process_writer = _open_stdout(_log_fd)
        atexit.register(_process_writer.flush, FINAL_FLUSH_SECONDS)
    return _process_writer


def dropped_lines() -> int:
    """Log and audit lines this process dropped because standard output was not read (or its log file could
    not be written); 0 before :func:`install`."""
    return ((_process_writer.dropped if _process_writer is not None else 0)
            + (_process_file.dropped if _process_file is not None else 0))


class DroppedLinesCollector:
    """Prometheus collector of ``connproxy_log_lines_dropped_total`` (read from :func:`dropped_lines`)."""

    def collect(self) -> Iterator[Any]:
        """One counter sample."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "connproxy_log_lines_dropped", "Log and audit lines dropped because standard output was not read.")
        family.add_metric([], float(dropped_lines()))
        yield family


def install(parent: Any, config: LoggingConfig, reactor: Any = None, *, sink: LineSink | None = None,
            signals: bool = True) -> LogObserver | None:
    """Give twistd's application ``parent`` the configured log observer (see the module docstring).

    Does nothing (returns ``None``) when ``parent`` is not twistd's application (no ``setComponent``: a plain
    service collection, as in tests) or already has an observer.

    :param reactor: lets the standard output writer wait for writability and receives SIGUSR2; without it
        queued lines go out with the next line, and no signal handler is set.
    :param sink: where lines go instead of standard output (tests).
    :param signals: set the SIGUSR2 handler (with a reactor only; never fails: no handler off the main thread).
    """
    if not hasattr(parent, "setComponent") or parent.getComponent(ILogObserver, None) is not None:
        return None
    if sink is not None:
        observer = LogObserver(config, sink)
    else:
        observer = observer_for(config)
        if reactor is not None and _process_writer is not None:
            _process_writer.attach(reactor)
            # twistd ends a process stopped by a signal by killing itself with it again: no atexit then.
            reactor.addSystemEventTrigger("after", "shutdown", _process_writer.flush, FINAL_FLUSH_SECONDS)
        if reactor is not None and _process_file is not None and signals:
            _install_rotation(_process_file, reactor)
    parent.setComponent(ILogObserver, observer)
    global _installed
    _installed = observer
    if reactor is not None and signals:
        _install_toggle(observer, reactor)
    return observer


def _install_rotation(sink: _FileSink, reactor: Any) -> None:
    """SIGUSR1 rotates the log file, as under twistd's own file observer (unless SIGUSR1 is taken)."""

    def on_signal(_signum: int, _frame: Any) -> None:
        reactor.callFromThread(sink.file.rotate)

    try:
        if not signal.getsignal(signal.SIGUSR1):
            signal.signal(signal.SIGUSR1, on_signal)
    except (ValueError, OSError, AttributeError):
        pass


def _install_toggle(observer: LogObserver, reactor: Any) -> None:
    """SIGUSR2 toggles ``observer`` between its configured level and debug, in the reactor's thread."""

    def on_signal(_signum: int, _frame: Any) -> None:
        reactor.callFromThread(observer.toggle_debug)

    try:
        signal.signal(signal.SIGUSR2, on_signal)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGUSR2 on this platform
        pass
