"""``twistd connproxy-connector``: the on-premise connector (the plugin in ``twisted/plugins`` names this module)."""

from __future__ import annotations

from twisted.application.service import IService

from connproxy.config import embedded_connector_config, load_connector_config
from connproxy.twistd import ConfigOptions, make_service


class Options(ConfigOptions):
    """Command line of ``twistd connproxy-connector``."""


def makeService(options: Options) -> IService:
    """The connector service for ``--config`` (see :func:`connproxy.twistd.make_service`)."""
    from connproxy.connector.service import make_connector_process

    return make_service(options, load_connector_config, embedded_connector_config, make_connector_process)
