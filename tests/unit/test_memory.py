""":class:`connproxy.obs.memory.MemoryTrimmer` on a Clock with an injected trim and RSS reader."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from connproxy.obs.memory import MemoryTrimmer, interval_from_env


def test_trims_every_interval_above_the_minimum() -> None:
    clock = Clock()
    calls: list[int] = []
    rss = [200.0]
    trimmer = MemoryTrimmer(clock, 10.0, min_rss_mib=100.0, trim=lambda pad: calls.append(pad) or 1,
                            rss=lambda: rss[0])
    trimmer.startService()
    clock.advance(9.9)
    assert calls == []
    clock.advance(0.1)
    assert calls == [0]
    rss[0] = 50.0  # below the minimum: left alone
    clock.advance(10)
    assert calls == [0]
    trimmer.stopService()
    assert clock.getDelayedCalls() == []


def test_off_without_trim_or_interval() -> None:
    clock = Clock()
    for trimmer in (MemoryTrimmer(clock, 0.0, trim=lambda pad: 1), MemoryTrimmer(clock, 5.0, trim=None)):
        trimmer.startService()
        assert clock.getDelayedCalls() == []
        trimmer.tick()
        trimmer.stopService()


@pytest.mark.parametrize(("value", "expected"), [(None, 10.0), ("0", 0.0), ("2.5", 2.5), ("x", 10.0), ("-1", 10.0)])
def test_interval_from_env(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: float) -> None:
    if value is None:
        monkeypatch.delenv("CONNPROXY_MALLOC_TRIM_SECONDS", raising=False)
    else:
        monkeypatch.setenv("CONNPROXY_MALLOC_TRIM_SECONDS", value)
    assert interval_from_env() == expected


def test_a_lost_relay_drops_its_transports_write_buffer() -> None:
    """A lost TCP transport's unsent bytes (a stalled reader's MiB) are not kept with the transport object."""
    from twisted.internet.error import ConnectionLost
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from connproxy.relay import Relay

    transport = StringTransport()
    transport._tempDataBuffer = [b"x" * 65536] * 3  # type: ignore[attr-defined]
    transport._tempDataLen = 3 * 65536  # type: ignore[attr-defined]
    transport.dataBuffer = b"y" * 1000  # type: ignore[attr-defined]
    transport.offset = 10  # type: ignore[attr-defined]
    relay = Relay()
    relay.makeConnection(transport)
    relay.connectionLost(Failure(ConnectionLost()))
    assert transport._tempDataBuffer == [] and transport._tempDataLen == 0  # type: ignore[attr-defined]
    assert transport.dataBuffer == b"" and transport.offset == 0  # type: ignore[attr-defined]
