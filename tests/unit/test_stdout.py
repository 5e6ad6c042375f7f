"""The non-blocking line writer: never blocks on a full pipe, bounded buffer, whole lines, counted drops."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from connproxy.obs.stdout import NonBlockingLineWriter, open_nonblocking

LINE = "x" * 999  # 1000 bytes with its newline


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd: int) -> bytes:
    """Everything the pipe holds now (without waiting)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def fill(writer: NonBlockingLineWriter, limit: int = 10_000) -> int:
    """Write lines until the descriptor stops taking them; returns how many were written."""
    for count in range(1, limit):
        assert writer.write_line(f"{count:05d}" + LINE[5:])
        if writer.buffered:
            return count
    raise AssertionError("the pipe never filled")


class FakeReactor:
    def __init__(self) -> None:
        self.writers: set[Any] = set()
        self.from_threads: list[Callable[[], object]] = []

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        self.from_threads.append(lambda: f(*args))


def test_lines_go_out_at_once_while_the_pipe_takes_them(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = NonBlockingLineWriter(write_end)
    assert writer.write_line("one") and writer.write_line("twö")
    assert read_all(read_end) == "one\ntwö\n".encode()
    assert writer.buffered == 0 and writer.dropped == 0


def test_the_original_descriptor_stays_blocking(pipe: tuple[int, int]) -> None:
    _read_end, write_end = pipe
    own, _write, how = open_nonblocking(write_end)
    try:
        assert how == "reopened" and own != write_end
        assert os.get_blocking(write_end) and not os.get_blocking(own)
    finally:
        os.close(own)


def test_a_full_pipe_never_blocks_and_the_buffer_is_bounded(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = NonBlockingLineWriter(write_end, limit=20_000)
    reactor = FakeReactor()
    writer.attach(reactor)
    written = fill(writer)
    assert reactor.writers == {writer}  # waits for writability through the reactor
    queued = 1
    started = time.monotonic()
    while writer.write_line(f"{written + queued:05d}" + LINE[5:]):
        queued += 1
        assert queued < 100
    for _ in range(50):
        assert not writer.write_line("dropped")
    assert time.monotonic() - started < 5
    assert writer.buffered <= 20_000 and writer.dropped == 51
    # The reader catches up: queued lines come out whole and in order, then one notice, then new lines.
    out = bytearray()
    while reactor.writers:
        out += read_all(read_end)
        writer.doWrite()
    assert writer.write_line("after")
    out += read_all(read_end)
    lines = bytes(out).decode().split("\n")
    assert lines[-1] == ""
    numbered = lines[: written + queued - 1]
    assert [int(line[:5]) for line in numbered] == list(range(1, written + queued))
    assert all(len(line) == 999 for line in numbered)
    assert lines[-3:-1] == ["51 log lines dropped: standard output was not read fast enough", "after"]
    assert writer.buffered == 0 and reactor.writers == set()


def test_the_notice_uses_the_given_format_and_comes_before_the_next_line(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = NonBlockingLineWriter(write_end, limit=3000)
    writer.notice = lambda count: f"NOTICE {count}"
    fill(writer)
    while writer.write_line(LINE):
        pass
    assert writer.dropped == 1
    read_all(read_end)
    assert writer.write_line("next")  # no reactor: queued bytes go out with the next line
    assert writer.flush(5.0)
    assert read_all(read_end).decode().endswith(LINE + "\nNOTICE 1\nnext\n")


def test_a_reader_gone_drops_and_counts_without_raising(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = NonBlockingLineWriter(write_end)
    os.close(read_end)
    assert not writer.write_line("lost")
    assert not writer.write_line("lost too")
    assert writer.dropped == 2 and writer.buffered == 0


def test_flush_waits_at_most_its_timeout(pipe: tuple[int, int]) -> None:
    _read_end, write_end = pipe
    writer = NonBlockingLineWriter(write_end)
    fill(writer)
    started = time.monotonic()
    assert not writer.flush(0.2)
    assert 0.1 < time.monotonic() - started < 5


def test_lines_from_another_thread_arm_the_reactor_from_its_thread(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = NonBlockingLineWriter(write_end, limit=1 << 20)
    reactor = FakeReactor()
    writer.attach(reactor)
    worker = threading.Thread(target=fill, args=(writer,))
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    assert reactor.writers == set() and len(reactor.from_threads) == 1
    reactor.from_threads.pop()()
    assert reactor.writers == {writer}
    while reactor.writers:
        read_all(read_end)
        writer.doWrite()
    assert writer.buffered == 0


def test_a_regular_file_is_written_as_it_is(tmp_path: Any) -> None:
    path = tmp_path / "out.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        writer = NonBlockingLineWriter(fd)
        assert writer.how == "file"
        assert writer.write_line("a") and writer.write_line("b")
    finally:
        os.close(fd)
    assert path.read_text() == "a\nb\n"


def test_a_socket_is_written_with_msg_dontwait() -> None:
    import socket

    ours, theirs = socket.socketpair()
    try:
        writer = NonBlockingLineWriter(ours.fileno())
        assert writer.how == "socket" and ours.getblocking()
        written = fill(writer)
        assert written > 1 and ours.getblocking()
        theirs.setblocking(False)
        received = bytearray()
        while writer.buffered:
            try:
                received += theirs.recv(1 << 16)
            except BlockingIOError:
                pass
            writer.doWrite()
        while True:
            try:
                received += theirs.recv(1 << 16)
            except BlockingIOError:
                break
        assert received.count(b"\n") == written
    finally:
        ours.close()
        theirs.close()


def test_without_proc_the_shared_description_is_made_non_blocking(pipe: tuple[int, int],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _read_end, write_end = pipe
    real_open = os.open

    def no_proc(path: str, *args: Any) -> int:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", no_proc)
    own, _write, how = open_nonblocking(write_end)
    try:
        assert how == "shared-nonblocking" and not os.get_blocking(write_end)  # documented side effect
    finally:
        os.close(own)
