"""The ``logging`` configuration: JSON or console lines and a minimum level, for twistd.

twistd starts its log observer after the plugin built the service, and uses an ``ILogObserver`` component of
the application when there is one. :func:`install` sets that component when the configuration asks for
anything but twistd's default (console lines at ``info``); the observer then writes to standard output. With
the default, twistd's own observer (and its ``--logfile``) stays. ``twist`` has its own ``--log-format`` and
``--log-level`` options.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

from connproxy.config import LoggingConfig


def observer_for(config: LoggingConfig, stream: IO[str] | None = None) -> ILogObserver | None:
    """The observer for ``config``, or ``None`` where twistd's default observer already fits."""
    if config.format == "console" and config.level == "info":
        return None
    out: Any = stream if stream is not None else (sys.__stdout__ or sys.stdout)
    # One JSON object per line (no RFC 7464 record separator): what log collectors expect.
    base = jsonFileLogObserver(out, recordSeparator="") if config.format == "json" else textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(config.level))
    return FilteringLogObserver(base, [predicate])


def install(parent: Any, config: LoggingConfig) -> None:
    """Give twistd's application ``parent`` the configured log observer (see the module docstring)."""
    observer = observer_for(config)
    if observer is not None and hasattr(parent, "setComponent"):
        parent.setComponent(ILogObserver, observer)
