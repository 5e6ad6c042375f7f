"""The tunnel settings both roles build from their configuration's ``tunnel`` block (defaults live in
:mod:`connproxy.wire.session`, once), and the capabilities both announce in HELLO (spec section 3.1)."""

from __future__ import annotations

from typing import Any, Final

from connproxy.tunnel.connection import TunnelTimers
from connproxy.wire.session import Settings

#: Capabilities this implementation announces in HELLO (``docs/tunnel-protocol.md``, "Capabilities").
CAPABILITIES: Final = ("half-close", "early-data")


def settings_from(config: Any) -> tuple[Settings, TunnelTimers]:
    """Session settings and timers from ``config.tunnel`` (a :class:`connproxy.config.TunnelTuning`).

    :raises ValueError: the tuning is out of the protocol's ranges (the configuration loader refuses that first).
    """
    t = config.tunnel
    settings = Settings(
        stream_window=t.stream_window_bytes,
        connection_window=t.connection_window_bytes,
        max_frame=t.max_frame_bytes,
        max_streams=t.max_streams,
    )
    timers = TunnelTimers(
        ping_interval=t.ping_interval_seconds,
        dead_after=t.dead_after_seconds,
        open_timeout=t.open_timeout_seconds,
        handshake_timeout=t.open_timeout_seconds,
        stall_timeout=t.stall_timeout_seconds,
    )
    return settings, timers
