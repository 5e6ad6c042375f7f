"""``twistd connproxy``: the proxy (the plugin in ``twisted/plugins`` names this module)."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from connproxy.config import ConfigError, embedded_proxy_config, load_proxy_config


class Options(usage.Options):
    """Command line of ``twistd connproxy``."""

    optParameters = [["config", "c", None, "YAML configuration file (default: embedded development defaults)"]]


def makeService(options: Options) -> IService:
    """Load the configuration and build the proxy service.

    :raises usage.UsageError: the configuration is invalid (the message names the key).
    """
    from twisted.internet import reactor

    from connproxy.service import ProxyService

    try:
        config = load_proxy_config(options["config"]) if options["config"] else embedded_proxy_config()
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    return ProxyService(config, reactor)
