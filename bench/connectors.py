"""Child process of ``bench/run.py``: ``COUNT`` connectors in one reactor, each with its own location ID
(``loc-0`` ...), all dialing the same proxy; runs until SIGTERM.

    python bench/connectors.py CONFIG.json   # {"count": N, "config": <connector config mapping>}
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from twisted.internet import reactor

    from connproxy.config import connector_config_from_mapping
    from connproxy.connector.dialer import make_connector_service

    spec = json.loads(Path(sys.argv[1]).read_text())
    services: list[Any] = []
    for i in range(int(spec["count"])):
        data = {**spec["config"], "locationId": f"loc-{i}", "connectorId": f"c{i}"}
        service = make_connector_service(connector_config_from_mapping(data), reactor)
        service.startService()
        services.append(service)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
