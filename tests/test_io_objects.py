"""CPython's buffered I/O objects: a child forked while a thread writes gets a usable file.

Each in-process scenario holds the object's C lock in a thread that is blocked
inside the raw stream's write(), forks, and uses the object in the child: hung
without forkguard, usable (and nothing written twice) with it.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import forkguard
from forkguard import _cpython_io

from forking import run_in_child

DEADLINE = 3.0


class GateRaw(io.RawIOBase):
    """A raw stream whose write() can be made to block (with the lock above held)."""

    def __init__(self, seekable: bool = False) -> None:
        super().__init__()
        self._seekable = seekable
        self.data = bytearray()
        self.inside = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, pos: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def readinto(self, b: Any) -> int:
        n = len(b)
        b[:n] = b"r" * n
        return n

    def write(self, b: Any) -> int:
        self.inside.set()
        self.gate.wait()
        self.data += bytes(b)
        return len(b)


@pytest.fixture
def busy() -> Iterator[Callable[[Callable[[], object]], None]]:
    """busy(use): a thread blocks inside `use()` (its raw write) until the test ends."""
    started: list[tuple[threading.Thread, GateRaw]] = []

    def start(use: Callable[[], object], raw: GateRaw) -> None:
        raw.gate.clear()
        raw.inside.clear()
        thread = threading.Thread(target=use, daemon=True)
        thread.start()
        assert raw.inside.wait(5), "the writer never reached the raw stream"
        started.append((thread, raw))

    yield start  # type: ignore[misc]
    for thread, raw in started:
        raw.gate.set()
        thread.join(5)


def _writer() -> tuple[io.BufferedWriter, GateRaw]:
    raw = GateRaw()
    return io.BufferedWriter(raw, 64), raw


def _child_writes(buffered: Any, raw: GateRaw, expect: bytes) -> Callable[[], bool]:
    def check() -> bool:
        raw.gate.set()  # the child's own writes must not block
        raw.data.clear()
        buffered.write(b"child")
        buffered.flush()
        assert bytes(raw.data) == expect, bytes(raw.data)
        return True

    return check


def test_a_writer_busy_in_another_thread_hangs_the_child_without_forkguard(busy: Any) -> None:
    buffered, raw = _writer()
    busy(lambda: buffered.write(b"x" * 100), raw)
    result = run_in_child(_child_writes(buffered, raw, b"child"), deadline=DEADLINE)
    assert result.status == "hung", result


def test_a_registered_writer_busy_in_another_thread_is_usable_in_the_child(busy: Any) -> None:
    buffered, raw = _writer()
    buffered.write(b"parent's pending bytes")  # fewer than 64: stays in the buffer
    forkguard.register(buffered)
    busy(lambda: buffered.write(b"x" * 100), raw)
    # Only the child's own bytes reach the raw stream: the parent's belong to the parent.
    result = run_in_child(_child_writes(buffered, raw, b"child"), deadline=DEADLINE)
    assert result, result
    raw.gate.set()
    buffered.flush()
    assert bytes(raw.data).count(b"parent's pending bytes") == 1


@pytest.mark.parametrize("cls", [io.BufferedRandom, io.BufferedReader])
def test_registered_random_and_reader_objects_come_back_usable(busy: Any, cls: type) -> None:
    raw = GateRaw(seekable=True)
    obj = cls(raw, 64)
    forkguard.register(obj)
    if cls is io.BufferedRandom:
        busy(lambda: obj.write(b"x" * 100), raw)
    else:
        # A reader's lock is held while it reads; make readinto block instead.
        raw.readinto = lambda b: (raw.inside.set(), raw.gate.wait(), len(b))[-1]  # type: ignore[method-assign]
        busy(lambda: obj.read(10), raw)

    def check() -> bool:
        raw.gate.set()
        raw.readinto = lambda b: GateRaw.readinto(raw, b)  # type: ignore[method-assign]
        assert obj.read(3) == b"rrr"
        return True

    assert run_in_child(check, deadline=DEADLINE), "registered"


def test_a_registered_rw_pair_resets_both_halves(busy: Any) -> None:
    reader, writer = GateRaw(), GateRaw()
    pair = io.BufferedRWPair(reader, writer, 64)
    forkguard.register(pair)
    busy(lambda: pair.write(b"x" * 100), writer)

    def check() -> bool:
        writer.gate.set()
        writer.data.clear()
        pair.write(b"child")
        pair.flush()
        assert bytes(writer.data) == b"child"
        assert pair.read(2) == b"rr"
        return True

    assert run_in_child(check, deadline=DEADLINE)


def test_a_registered_text_file_drops_the_parents_pending_text(busy: Any) -> None:
    buffered, raw = _writer()
    text = io.TextIOWrapper(buffered, encoding="utf-8")
    forkguard.register(text)
    text.write("parent's line\n")  # held by the text layer, not yet in the buffer
    busy(lambda: buffered.write(b"x" * 100), raw)

    def check() -> bool:
        raw.gate.set()
        raw.data.clear()
        text.write("child's line\n")
        text.flush()
        assert bytes(raw.data) == b"child's line\n", bytes(raw.data)
        return True

    assert run_in_child(check, deadline=DEADLINE)
    raw.gate.set()
    text.flush()
    assert bytes(raw.data).count(b"parent's line") == 1


def test_the_forking_thread_inside_its_own_write_keeps_it() -> None:
    """A fork from inside the raw write (the forking thread owns the lock): the child
    finishes that write as the parent would, and the object is not re-initialised."""
    results: list[Any] = []

    class ForkingRaw(GateRaw):
        def write(self, b: Any) -> int:
            if not results:
                results.append(run_in_child(lambda: True, deadline=DEADLINE))
                results.append(run_in_child(check_inside, deadline=DEADLINE))
            return super().write(b)

    raw = ForkingRaw()
    buffered = io.BufferedWriter(raw, 64)

    def check_inside() -> bool:
        assert _cpython_io.reset_buffered(buffered) == "inside"
        return True

    reg = forkguard.register(buffered)
    buffered.write(b"y" * 100)
    reg.unregister()
    assert all(results) and len(results) == 2, results
    assert bytes(raw.data) == b"y" * 100


def test_a_closed_buffer_in_the_child_is_left_alone() -> None:
    buffered, _ = _writer()
    forkguard.register(buffered)

    def check() -> bool:
        buffered.close()
        assert _cpython_io.reset_buffered(buffered) == "closed"
        return True

    assert run_in_child(check, deadline=DEADLINE)


def test_an_unverifiable_layout_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpython_io, "_layout", lambda: "a test said so")
    buffered, _ = _writer()
    with pytest.raises(TypeError, match=r"could not verify the layout.*a test said so"):
        forkguard.register(buffered)
    assert forkguard.registrations() == []


def test_the_layout_is_verified_on_this_interpreter() -> None:
    lay = _cpython_io.layout()
    assert lay.owner % 8 == 0 and lay.owner < lay.basicsize
    # CPython declares the lock right before its owner; found, not assumed.
    assert lay.lock == lay.owner - 8
    assert lay.pending != lay.pending_count
    assert len(set(lay.ends)) == 2 and max(lay.ends) < lay.basicsize


def test_pending_text_over_an_idle_buffer_is_still_dropped() -> None:
    # The text layer holds "parent's" (not yet passed down); the buffer below is idle.
    raw = GateRaw()
    text = io.TextIOWrapper(io.BufferedWriter(raw, 64), encoding="utf-8")
    text.write("parent's")
    forkguard.register(text)

    def check() -> bool:
        text.write("child's")
        text.flush()
        assert bytes(raw.data) == b"child's", bytes(raw.data)
        return True

    assert run_in_child(check, deadline=DEADLINE)


def test_only_a_file_with_bytes_buffered_or_its_lock_held_is_reset(busy: Any) -> None:
    idle, _ = _writer()
    filled, _ = _writer()
    filled.write(b"abc")  # fewer than 64: stays in the buffer
    held, raw = _writer()
    busy(lambda: held.write(b"x" * 100), raw)
    reader = io.BufferedReader(GateRaw(), 64)
    reader.read(1)  # the rest of what the raw stream gave is read ahead

    def check() -> bool:
        resets = [_cpython_io.reset_buffered(f) for f in (idle, filled, held, reader)]
        assert resets == ["idle", "reset", "reset", "reset"], resets
        raw.gate.set()
        for f in (idle, filled, held):
            f.write(b"child")
            f.flush()
        return True

    assert run_in_child(check, deadline=DEADLINE)


def test_line_buffered_and_unbuffered_text_files_register() -> None:
    r, w = os.pipe()
    text = open(w, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    unbuffered = io.TextIOWrapper(io.FileIO(os.dup(w), "w"), write_through=True)
    try:
        assert forkguard.register(text).kind == "io.TextIOWrapper"
        assert forkguard.register(unbuffered).active
    finally:
        for reg in forkguard.registrations():
            reg.unregister()
        text.close()
        unbuffered.close()
        os.close(r)
