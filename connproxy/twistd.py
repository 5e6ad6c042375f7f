"""What the two twistd plugins share: the ``--config`` option, turning a configuration error into a usage
error that names the key (no traceback), no pid file unless one is asked for, and the log where twistd's
``--logfile`` says (:func:`connproxy.obs.logs.set_log_file`).

twistd writes ``twistd.pid`` in the working directory by default and refuses to start a second process in the
same directory ("Another twistd server is running"). Both plugins switch that default off: twistd parses its own
options before the plugin's, and hands the plugin's options object its own as ``parent``; when ``--pidfile`` still
holds twistd's default and the command line does not name it, :meth:`ConfigOptions.postOptions` clears it (twistd
then writes and checks no pid file). ``--pidfile=PATH`` (even ``--pidfile=twistd.pid``) still writes one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import IService
from twisted.python import usage

from connproxy.config import ConfigError

C = TypeVar("C")

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
        tell :mod:`connproxy.obs.logs` where ``--logfile``/``--nodaemon`` send the log."""
        from connproxy.obs.logs import set_log_file

        parent = getattr(self, "parent", None)
        if parent is None or not hasattr(parent, "get"):
            return
        if parent.get("pidfile") == TWISTD_DEFAULT_PIDFILE and not names_pidfile(sys.argv[1:]):
            parent["pidfile"] = ""
        set_log_file(parent.get("logfile"), bool(parent.get("nodaemon")))


def make_service(
    options: ConfigOptions,
    load: Callable[[str], C],
    embedded: Callable[[], C],
    build: Callable[[C, Any], IService],
) -> IService:
    """Load the configuration named by ``--config`` (or the embedded defaults) and build the service with the
    global reactor (the one place it is imported, at start-up); the service's ``enable_process_control`` (if
    it has one) is called with the configuration path (signals, reload).

    :raises usage.UsageError: the configuration is invalid (the message names the key).
    """
    from twisted.internet import reactor

    try:
        config = load(options["config"]) if options["config"] else embedded()
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    service = build(config, reactor)
    # As the process: SIGTERM drains and exits 0, SIGHUP (and a changed file) reloads (connproxy.reload).
    enable = getattr(service, "enable_process_control", None)
    if enable is not None:
        enable(options["config"] or None)
    return service
