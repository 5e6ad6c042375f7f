"""What the two twistd plugins share: the ``--config`` option and turning a configuration error into a usage
error that names the key (no traceback)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import IService
from twisted.python import usage

from connproxy.config import ConfigError

C = TypeVar("C")


class ConfigOptions(usage.Options):
    """Command line of ``twistd connproxy`` and ``twistd connproxy-connector``."""

    optParameters = [["config", "c", None, "YAML configuration file (default: embedded development defaults)"]]


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
