"""Flow control a stalled stream cannot starve (spec 3.4): small initial stream windows that grow only while the
reader keeps up, session credit returned on receipt within a buffer budget, growth within a window budget."""

from __future__ import annotations

from connproxy.wire.session import Settings

from .wire_helpers import SessionPair, ready_pair

KIB = 1024
MIB = 1024 * KIB
TUNED = Settings(stream_window=1 * MIB, connection_window=4 * MIB, max_frame=65536, initial_stream_window=64 * KIB)


def pair(settings: Settings = TUNED) -> SessionPair:
    return ready_pair(settings, settings)


def push(p: SessionPair, stream_id: int, total: int, *, read: bool) -> int:
    """The dialer sends up to ``total`` bytes as credit allows; the listener reads (acknowledges) them or not.
    Returns how many were sent."""
    sent = 0
    for _ in range(10000):
        n = p.dialer.send_data(stream_id, b"z" * min(65536, total - sent))
        sent += n
        _, events = p.shuttle()
        if read:
            for ev in events:
                data = getattr(ev, "data", None)
                if data:
                    p.listener.acknowledge(stream_id, len(data))
            p.shuttle()
        if sent >= total or (n == 0 and not read):
            break
    return sent


def test_a_stalled_stream_holds_its_initial_window_and_no_session_credit() -> None:
    p = pair()
    stalled = p.open()
    assert push(p, stalled, 10 * MIB, read=False) == 64 * KIB  # the initial window, no more
    windows = p.listener.stream_windows(stalled)
    assert windows is not None and windows[1].limit == 64 * KIB  # a reader that never reads never grows
    # Its session credit went back on receipt: the session window is not held by it.
    assert p.listener.session_credit_held() == 0
    assert p.dialer.connection_send.credit + p.listener.connection_receive.pending == TUNED.connection_window


def test_a_reader_that_keeps_up_grows_its_window_to_the_stream_window() -> None:
    p = pair()
    fast = p.open()
    assert push(p, fast, 8 * MIB, read=True) == 8 * MIB
    windows = p.listener.stream_windows(fast)
    assert windows is not None and windows[1].limit == TUNED.stream_window
    assert p.dialer.send_window(fast) <= TUNED.stream_window


def test_many_stalled_streams_leave_the_session_window_to_the_others() -> None:
    """16 stalled streams used to take a 4 MiB session window with 256 KiB stream windows (head-of-line
    blocking); now they hold only their own windows and a fresh stream transfers in full."""
    settings = Settings(stream_window=256 * KIB, connection_window=4 * MIB, max_frame=65536,
                        initial_stream_window=256 * KIB)
    p = pair(settings)
    for _ in range(16):
        push(p, p.open(), 10 * MIB, read=False)
    assert p.listener.unconsumed() == 16 * 256 * KIB
    fresh = p.open()
    assert push(p, fresh, 2 * MIB, read=True) == 2 * MIB


def test_past_the_buffer_budget_session_credit_waits_for_the_reader() -> None:
    settings = Settings(stream_window=256 * KIB, connection_window=1 * MIB, max_frame=65536)
    p = pair(settings)
    streams = [p.open() for _ in range(4)]
    for stream_id in streams:
        push(p, stream_id, 256 * KIB, read=False)
    # Half the session window (the default budget) is buffered with credit returned; the rest is withheld.
    assert p.listener.unconsumed() == 1 * MIB
    assert p.listener.session_credit_held() == 1 * MIB - settings.buffer_budget
    for stream_id in streams:
        p.listener.acknowledge(stream_id, 256 * KIB)
    assert p.listener.session_credit_held() == 0


def test_window_growth_stays_within_the_session_budget() -> None:
    settings = Settings(stream_window=2 * MIB, connection_window=2 * MIB, max_frame=65536,
                        initial_stream_window=64 * KIB)
    p = pair(settings)
    streams = [p.open() for _ in range(4)]
    for stream_id in streams:
        push(p, stream_id, 4 * MIB, read=True)
    limits = []
    for stream_id in streams:
        windows = p.listener.stream_windows(stream_id)
        assert windows is not None
        limits.append(windows[1].limit)
    assert sum(limits) <= settings.connection_window
    assert max(limits) > 64 * KIB  # they did grow
