"""``twistd connproxy-connector``: the on-premise connector."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from connproxy.config import ConfigError, embedded_connector_config, load_connector_config


class Options(usage.Options):
    """Command line of ``twistd connproxy-connector``."""

    optParameters = [["config", "c", None, "YAML configuration file (default: embedded development defaults)"]]


def makeService(options: Options) -> IService:
    """Load the configuration and build the connector service.

    :raises usage.UsageError: the configuration is invalid (the message names the key).
    """
    from twisted.internet import reactor

    from connproxy.service import make_connector_service

    try:
        config = load_connector_config(options["config"]) if options["config"] else embedded_connector_config()
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    return make_connector_service(config, reactor)
