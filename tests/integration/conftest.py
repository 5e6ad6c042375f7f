"""Integration tests run on the real reactor through pytest-twisted, on 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.harness import Stack, new_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A proxy/connector stack with a fresh PKI; everything it started is stopped after the test."""
    s = new_stack(tmp_path)
    yield s
    pytest_twisted.blockon(s.stop())


@pytest.fixture
def log_text() -> Iterator[list[str]]:
    """Everything logged in this process during the test, each event formatted and then raw (``repr``): to check
    what a line says, and that no token leaks into any field."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)
