# -*- test-case-name: tests.unit.test_memory -*-
"""Give freed heap memory back to the operating system (glibc ``malloc_trim``), periodically.

Stream payloads are Python ``bytes`` of up to a frame (64 KiB) or a socket read; they are allocated with
``malloc`` below glibc's mmap threshold, i.e. from the heap. After a wave of stalled streams frees hundreds of
MiB of them, the heap is fragmented: glibc only returns memory at the top of the heap by itself, so the process
keeps its peak RSS although the memory is free (``bench/waves.py`` shows the ratchet, ``docs/reliability.md``
the numbers). ``malloc_trim(0)`` releases every free page of the heap (``madvise(MADV_DONTNEED)``); it is
called every ``interval`` seconds, and only when RSS is at least ``min_rss_mib`` (an idle process is left
alone). One call takes milliseconds for a heap of a few hundred MiB.

On a C library without ``malloc_trim`` (musl, macOS) :class:`MemoryTrimmer` does nothing.
The environment variable ``CONNPROXY_MALLOC_TRIM_SECONDS`` overrides the interval (``0`` turns it off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds between two trims (unless ``CONNPROXY_MALLOC_TRIM_SECONDS`` says otherwise).
DEFAULT_INTERVAL = 10.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Any = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def rss_mib() -> float:
    """This process's resident set size in MiB (``-1`` where ``/proc`` is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return -1.0


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """The trim interval: ``CONNPROXY_MALLOC_TRIM_SECONDS`` if set to a number >= 0, else ``default``."""
    raw = os.environ.get("CONNPROXY_MALLOC_TRIM_SECONDS")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        return default
    return value if value >= 0 else default


class MemoryTrimmer(Service):
    """Calls ``malloc_trim(0)`` every ``interval`` seconds while RSS is at least ``min_rss_mib``.

    :param clock: the injected reactor time.
    :param interval: seconds between trims; ``0`` turns the trimmer off.
    :param trim: the trim function (tests inject one; default glibc's, or nothing).
    :param rss: reads the current RSS in MiB (tests inject one).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = DEFAULT_INTERVAL,
        *,
        min_rss_mib: float = 0.0,
        trim: Callable[[int], int] | None | str = "glibc",
        rss: Callable[[], float] = rss_mib,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.min_rss_mib = min_rss_mib
        self.trim: Callable[[int], int] | None = _load_malloc_trim() if trim == "glibc" else trim  # type: ignore[assignment]
        self.rss = rss
        self.trims = 0
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        """Start the periodic trim (if there is a ``malloc_trim`` and an interval)."""
        super().startService()
        if self.trim is None or self.interval <= 0:
            return
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        """Stop the periodic trim."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def tick(self) -> None:
        """Trim once if RSS is at least ``min_rss_mib``; log what it gave back when that is much."""
        if self.trim is None:
            return
        before = self.rss()
        if before < self.min_rss_mib:
            return
        self.trim(0)
        self.trims += 1
        after = self.rss()
        if before - after >= 16:
            self.log.info("returned {freed:.0f} MiB of freed heap to the system (RSS {before:.0f} -> {after:.0f} MiB)",
                          freed=before - after, before=before, after=after)
