"""``twistd connproxy-connector``: the on-premise connector (the plugin in ``twisted/plugins`` names this module)."""

from __future__ import annotations

from twisted.application.service import IService

from connproxy.config import verify_connector_config_file
from connproxy.twistd import ConfigOptions, make_service


class Options(ConfigOptions):
    """Command line of ``twistd connproxy-connector``."""


def makeService(options: Options) -> IService:
    """The connector service for ``--config`` (see :func:`connproxy.twistd.make_service`)."""
    from connproxy.connector.service import make_connector_process

    return make_service(options, verify_connector_config_file, make_connector_process)
