"""``twistd connproxy``: the proxy (the plugin in ``twisted/plugins`` names this module)."""

from __future__ import annotations

from twisted.application.service import IService

from connproxy.config import verify_proxy_config_file
from connproxy.twistd import ConfigOptions, make_service


class Options(ConfigOptions):
    """Command line of ``twistd connproxy``."""


def makeService(options: Options) -> IService:
    """The proxy service for ``--config`` (see :func:`connproxy.twistd.make_service`)."""
    from connproxy.proxy.service import ProxyService

    return make_service(options, verify_proxy_config_file, ProxyService)
