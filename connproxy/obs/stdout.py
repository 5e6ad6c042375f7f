"""Standard output that never blocks: whole lines into a bounded buffer, written when the descriptor is writable.

A process that writes its log and audit lines synchronously to a pipe nobody reads stops dead once the pipe is
full (64 KiB on Linux): every protocol on the reactor stops, and so does the handling of SIGTERM.
:class:`NonBlockingLineWriter` never waits for the descriptor:

* A line is written at once when nothing is queued and the descriptor takes it; what does not fit (all of it
  when the descriptor would block, the rest of it after a partial write) is queued in a buffer of at most
  ``limit`` bytes (default :data:`DEFAULT_LIMIT`, 1 MiB), in order.
* A line that does not fit in the buffer any more is dropped whole (never cut) and counted (:attr:`dropped`).
  When there is room again, one notice line saying how many lines were dropped is queued before anything else
  (its text comes from :attr:`NonBlockingLineWriter.notice`, so that it can be in the log's own format).
* With a reactor (:meth:`attach`), the writer registers for writability while bytes are queued and writes them
  as the reader drains; without one, queued bytes go out with the next line or with :meth:`flush`.
* A broken descriptor (reader gone: ``EPIPE``, or any other error but "would block") drops everything from then
  on, counted the same way; nothing is raised to the caller.

How the descriptor is made non-blocking (:func:`open_nonblocking`), without changing it for other processes
where possible: a pipe or character device (a terminal) is opened again through ``/proc/self/fd/N``, which gives
this process a description of its own with ``O_NONBLOCK``; a socket is written with ``MSG_DONTWAIT``; only where
reopening fails (no ``/proc``, a pipe whose reader is gone) is ``O_NONBLOCK`` set on the shared description
itself, which every process sharing that descriptor then sees (harmless in a container whose stdout belongs to
the container runtime). A regular file never blocks in this sense and is written as it is.

The writer is thread-safe (a lock around the buffer); it never logs (it is what the log is written with).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.interfaces import IWriteDescriptor
from zope.interface import implementer

__all__ = ["DEFAULT_LIMIT", "NonBlockingLineWriter", "open_nonblocking"]

#: Default bound of the buffer, in bytes.
DEFAULT_LIMIT: Final = 1 << 20

_WOULD_BLOCK: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})

#: Writes some bytes without blocking; returns how many were taken (0 when it would block).
RawWrite = Callable[[memoryview], int]


def default_notice(count: int) -> str:
    """The drop notice when no log format provides one."""
    return f"{count} log lines dropped: standard output was not read fast enough"


def _fd_write(fd: int) -> RawWrite:
    def write(data: memoryview) -> int:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except InterruptedError:
            return 0

    return write


def open_nonblocking(fd: int) -> tuple[int, RawWrite, str]:
    """A descriptor for the same file as ``fd`` that this process can write to without blocking.

    :returns: ``(descriptor, write, how)``: the descriptor to poll for writability, a function writing some
        bytes without blocking (see :data:`RawWrite`; it raises :class:`OSError` for errors other than "would
        block"), and how it was done: ``"reopened"``, ``"socket"``, ``"shared-nonblocking"`` or ``"file"``
        (see the module docstring).
    :raises OSError: ``fd`` is not an open descriptor.
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))

        def send(data: memoryview) -> int:
            try:
                return sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return 0

        return sock.fileno(), send, "socket"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            own = os.open(f"/proc/self/fd/{fd}", flags)
        except OSError:
            own = os.dup(fd)
            os.set_blocking(own, False)
            return own, _fd_write(own), "shared-nonblocking"
        return own, _fd_write(own), "reopened"
    own = os.dup(fd)
    return own, _fd_write(own), "file"


@implementer(IWriteDescriptor)
class NonBlockingLineWriter:
    """Writes whole lines to a descriptor, never blocking; see the module docstring.

    :param fd: the descriptor to write to (``1``: standard output). It is not changed unless it can only be made
        non-blocking by setting ``O_NONBLOCK`` on it (see :func:`open_nonblocking`).
    :param limit: the most bytes kept queued.
    :param raw: for tests: ``(descriptor, write)`` to use instead of opening ``fd``.
    :raises OSError: ``fd`` is not an open descriptor.
    """

    def __init__(self, fd: int = 1, *, limit: int = DEFAULT_LIMIT, raw: tuple[int, RawWrite] | None = None) -> None:
        if raw is None:
            self._fd, self._write, self.how = open_nonblocking(fd)
        else:
            (self._fd, self._write), self.how = raw, "raw"
        self.limit = limit
        #: Formats the notice for ``count`` dropped lines (without a newline).
        self.notice: Callable[[int], str] = default_notice
        #: Lines dropped since the writer was made (the notice lines are not counted).
        self.dropped = 0
        self._unreported = 0
        self._buffer = bytearray()
        self._lock = threading.RLock()
        self._broken = False
        self._reactor: Any = None
        self._reactor_thread: int | None = None
        self._armed = False

    # ---------------------------------------------------------------- lines in

    @property
    def buffered(self) -> int:
        """Bytes queued, not yet taken by the descriptor."""
        return len(self._buffer)

    def write_line(self, line: str) -> bool:
        """Queue ``line`` and a newline and write what the descriptor takes now; never blocks, never raises.

        ``line`` is encoded as UTF-8 (characters that cannot be encoded are replaced).

        :returns: ``False`` when the line was dropped (no room, or the descriptor is broken).
        """
        data = line.encode("utf-8", "replace") + b"\n"
        with self._lock:
            if self._buffer:  # make room first if the reader caught up (without a reactor nobody else does)
                self._flush_locked()
            if not self._queue(data):
                return False
            self._flush_locked()
            return not self._broken

    def _queue(self, data: bytes) -> bool:
        if self._broken:
            self._drop(1)
            return False
        if self._unreported:
            notice = self._notice_bytes()
            if len(self._buffer) + len(notice) + len(data) > self.limit:
                self._drop(1)
                return False
            self._buffer += notice
            self._unreported = 0
        elif len(self._buffer) + len(data) > self.limit:
            self._drop(1)
            return False
        self._buffer += data
        return True

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._unreported += count

    def _notice_bytes(self) -> bytes:
        try:
            text = self.notice(self._unreported)
        except Exception:
            text = default_notice(self._unreported)
        return text.encode("utf-8", "replace") + b"\n"

    # ---------------------------------------------------------------- bytes out

    def _flush_locked(self) -> None:
        """Write queued bytes until the descriptor would block; queue the drop notice once all is out."""
        while self._buffer and not self._broken:
            try:
                with memoryview(self._buffer) as view:
                    taken = self._write(view)
            except OSError:
                self._broken = True
                self._drop(self._buffer.count(b"\n"))
                self._buffer.clear()
                break
            if taken <= 0:
                break
            del self._buffer[:taken]
            if not self._buffer and self._unreported:
                self._buffer += self._notice_bytes()
                self._unreported = 0
        self._arm(bool(self._buffer) and not self._broken)

    def flush(self, timeout: float = 0.0) -> bool:
        """Write what is queued, waiting for the descriptor at most ``timeout`` seconds in all.

        Meant for the end of the process (when the reactor no longer runs); never raises.

        :returns: whether the buffer is empty.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._flush_locked()
            while self._buffer and not self._broken:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    poller = select.poll()
                    poller.register(self._fd, select.POLLOUT)
                    poller.poll(left * 1000)
                except (OSError, ValueError):
                    break
                self._flush_locked()
            return not self._buffer

    # ---------------------------------------------------------------- reactor

    def attach(self, reactor: Any) -> None:
        """Use ``reactor`` to learn when the descriptor is writable again (call it from the reactor's thread)."""
        with self._lock:
            self._reactor = reactor
            self._reactor_thread = threading.get_ident()
            self._arm(bool(self._buffer))

    def _arm(self, wanted: bool) -> None:
        reactor = self._reactor
        if reactor is None or wanted == self._armed:
            return
        if threading.get_ident() != self._reactor_thread:
            reactor.callFromThread(self._rearm)
            return
        try:
            if wanted:
                reactor.addWriter(self)
            else:
                reactor.removeWriter(self)
        except (OSError, ValueError):  # a descriptor the reactor cannot watch: flush with the next line
            self._reactor = None
            return
        self._armed = wanted

    def _rearm(self) -> None:
        with self._lock:
            self._arm(bool(self._buffer) and not self._broken)

    def fileno(self) -> int:
        """The descriptor written to (for the reactor)."""
        return self._fd

    def doWrite(self) -> None:
        """The descriptor is writable: write what is queued (called by the reactor)."""
        with self._lock:
            self._flush_locked()

    def connectionLost(self, reason: Any) -> None:
        """The reactor gave up on the descriptor: stop watching it (lines still go out with the next line)."""
        with self._lock:
            self._armed = False
            self._reactor = None

    def logPrefix(self) -> str:
        """For the reactor's own log lines."""
        return "NonBlockingLineWriter"
