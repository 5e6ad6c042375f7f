"""Integration tests run on the real reactor through pytest-twisted, on 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.harness import Stack, new_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A proxy/connector stack with a fresh PKI; everything it started is stopped after the test."""
    s = new_stack(tmp_path)
    yield s
    pytest_twisted.blockon(s.stop())
