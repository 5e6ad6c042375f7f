"""What the two twistd plugins share: the ``--config`` option, start-up that fails with one line per problem
(never a traceback), no pid file unless one is asked for, and the log where twistd's ``--logfile`` says
(:func:`connproxy.obs.logs.set_log_file`).

``twistd -n connproxy --config F`` (and ``twist``, and ``connproxy-connector``) run :func:`make_service`:

* the configuration is checked exactly as ``connproxy config check --skip-ports`` checks it (keys, values,
  cross-field rules, the files it names); problems are printed to standard error, one line each, and the process
  exits with status 2 (:data:`EXIT_CONFIG`) before anything starts;
* a port that cannot be bound when the service starts is one line naming its key (``servers.proxy.http.port: port
  20003 is already in use (0.0.0.0:20003)``), status 2;
* anything else that goes wrong while starting is a bug: its traceback, then a line saying so, status 70.

The lines go to the process's real standard error (``sys.__stderr__``): once twistd's logging has begun,
``sys.stderr`` is redirected into the log. A daemonised twistd (no ``-n``) has no standard error any more when it
binds: the lines are logged then. Exiting is :class:`SystemExit`, which twistd and twist let through without a
traceback.

twistd writes ``twistd.pid`` in the working directory by default and refuses to start a second process in the
same directory ("Another twistd server is running"). Both plugins switch that default off: twistd parses its own
options before the plugin's, and hands the plugin's options object its own as ``parent``; when ``--pidfile`` still
holds twistd's default and the command line does not name it, :meth:`ConfigOptions.postOptions` clears it (twistd
then writes and checks no pid file). ``--pidfile=PATH`` (even ``--pidfile=twistd.pid``) still writes one.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from connproxy.config import ConfigError, ConnectorConfig, ProxyConfig, startup_warnings
from connproxy.pki.certs import PKIError

C = TypeVar("C", ProxyConfig, ConnectorConfig)

#: Exit status for a configuration that cannot start (also a port that cannot be bound).
EXIT_CONFIG = 2
#: Exit status for a bug at start-up (``EX_SOFTWARE``).
EXIT_BUG = 70

log = Logger(namespace="connproxy.startup")

#: twistd's default ``--pidfile`` (``twisted.scripts._twistd_unix.ServerOptions``).
TWISTD_DEFAULT_PIDFILE = "twistd.pid"


def names_pidfile(argv: Sequence[str]) -> bool:
    """Whether the twistd command line ``argv`` (without the program) sets ``--pidfile`` (also abbreviated, as
    getopt allows: ``--pi``, ``--pid``, ...)."""
    for arg in argv:
        if arg == "--":
            return False
        name = arg.split("=", 1)[0]
        if len(name) >= 4 and "--pidfile".startswith(name):
            return True
    return False


class ConfigOptions(usage.Options):
    """Command line of ``twistd connproxy`` and ``twistd connproxy-connector``."""

    optParameters = [["config", "c", None, "YAML configuration file (default: embedded development defaults)"]]

    def postOptions(self) -> None:
        """Under twistd, clear twistd's default pid file unless the command line names one (module docstring), and
        tell :mod:`connproxy.obs.logs` where ``--logfile``/``--nodaemon`` send the log; under twist, hand twist
        the configured log observer (:func:`connproxy.obs.logs.use_twist_options`)."""
        from connproxy.obs.logs import set_log_file, use_twist_options

        parent = getattr(self, "parent", None)
        if parent is None or not hasattr(parent, "get"):
            return
        if "logFile" in parent:  # twist's options (twistd's key is "logfile")
            use_twist_options(parent)
            return
        if parent.get("pidfile") == TWISTD_DEFAULT_PIDFILE and not names_pidfile(sys.argv[1:]):
            parent["pidfile"] = ""
        set_log_file(parent.get("logfile"), bool(parent.get("nodaemon")))


def _stderr() -> Any:
    return sys.__stderr__ or sys.stderr


def fail(lines: Sequence[str], status: int = EXIT_CONFIG, *, to_log: bool = False) -> NoReturn:
    """Print ``lines`` to the real standard error (and, with ``to_log``, log them), then exit with ``status`` (no
    traceback).

    :raises SystemExit: always.
    """
    out = _stderr()
    for line in lines:
        if to_log:
            log.critical("{line}", line=line)
        out.write(line + "\n")
    out.flush()
    raise SystemExit(status)


def bug(what: str, *, to_log: bool = False) -> NoReturn:
    """Print the exception being handled with its traceback and a line saying it is a bug; exit with
    :data:`EXIT_BUG`.

    :raises SystemExit: always.
    """
    if to_log:
        log.failure(what)
    traceback.print_exc(file=_stderr())
    fail([f"connproxy: {what} failed because of a bug (not a configuration problem); please report it with the "
          "traceback above"], EXIT_BUG, to_log=to_log)


def _guarded(start: Callable[[], Any], daemon: bool) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return start()
        except CannotListenError as error:  # ListenError names the key of the port
            fail([str(error)], to_log=daemon)
        except SystemExit:
            raise
        except Exception:
            bug("starting the service", to_log=daemon)

    return run


def guard_start(service: IService, *, daemon: bool = False) -> None:
    """Make a bind failure while ``service`` starts one line naming the port's key and exit status 2, and any
    other failure a bug (see the module docstring), for ``privilegedStartService`` (twistd) and ``startService``
    (twist, which binds there). ``daemon``: twistd will have daemonised by then, so the lines are logged too."""
    service.privilegedStartService = _guarded(  # type: ignore[method-assign]
        service.privilegedStartService, daemon)
    service.startService = _guarded(service.startService, daemon)  # type: ignore[method-assign]


def make_service(
    options: ConfigOptions,
    verify: Callable[..., C],
    build: Callable[[C, Any], IService],
) -> IService:
    """Check the configuration named by ``--config`` (or the embedded defaults) with ``verify`` (for example
    :func:`connproxy.config.verify_proxy_config_file`, called with ``check_ports=True``: the checks of
    ``connproxy config check``, listen ports included, all before anything binds) and build the service with the
    global reactor (the one place it is imported, at start-up). Warnings about listening beyond loopback without
    authorization or with the development certificates are logged. The service's ``enable_process_control`` (if it has one) is called with
    the configuration path (SIGTERM drains and exits 0, SIGHUP and a changed file reload: :mod:`connproxy.reload`).

    :raises SystemExit: a configuration problem (status 2, one line per problem on stderr), or a bug (status 70,
        with its traceback).
    """
    from twisted.internet import reactor

    try:
        config = verify(options["config"], check_ports=True)
    except ConfigError as error:
        fail(error.lines)
    except Exception:
        bug("checking the configuration")
    for warning in startup_warnings(config):
        log.warn("{warning}", warning=warning)
    try:
        service = build(config, reactor)
    except PKIError as error:  # the development PKI could not be minted or read (state folder)
        fail([f"development PKI: {error}"])
    except Exception:
        bug("building the service")
    enable = getattr(service, "enable_process_control", None)
    if enable is not None:
        enable(options["config"] or None)
    parent: Any = getattr(options, "parent", None)
    guard_start(service, daemon=parent is not None and not parent.get("nodaemon", True))
    return service
