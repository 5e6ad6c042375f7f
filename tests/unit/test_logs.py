"""The ``logging`` configuration becomes twistd's log observer."""

from __future__ import annotations

import io
import json

from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger

from connproxy.config import LoggingConfig
from connproxy.obs.logs import install, observer_for


def test_default_keeps_twistds_observer() -> None:
    app = Application("connproxy")
    install(app, LoggingConfig())
    assert app.getComponent(ILogObserver, None) is None  # type: ignore[attr-defined]


def test_json_lines_with_structured_fields_and_level_filter() -> None:
    out = io.StringIO()
    observer = observer_for(LoggingConfig(format="json", level="warn"), out)
    assert observer is not None
    log = Logger(namespace="test", observer=observer)
    log.info("not shown {x}", x=1)
    log.warn("connector {connector_id} gone", connector_id="c1")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["connector_id"] == "c1" and lines[0]["log_format"] == "connector {connector_id} gone"


def test_installed_on_the_application() -> None:
    app = Application("connproxy")
    install(app, LoggingConfig(format="json"))
    assert app.getComponent(ILogObserver, None) is not None  # type: ignore[attr-defined]
