"""A queue whose consumer stays in the parent: children's items travel to it.

A ``QueueListener``, or any "queue + consumer thread" pair, lives in the process
that started it.  In a forked child the queue is a copy that no thread reads, so
whatever the child puts there is lost (with the queue's lock repaired, silently).
Forwarding makes every ``put()`` in a forked child travel to the parent's queue,
where the parent's consumer takes it like any other item:

- The trip is a Unix datagram socket pair made in the parent, non-inheritable, so
  only forked children (and their own forked children) have its sending end.  A
  put in a child pickles the item and sends it before returning: once ``put()``
  returned, the item is in the parent's socket buffer and survives the child's
  ``os._exit``, ``sys.exit`` or SIGTERM.  Items larger than one datagram are sent
  in pieces, numbered per process and message, and put together in the parent.
- A reader thread in the parent receives and puts each item on the real queue.
- Items the parent had queued but not consumed at the fork are the parent's: the
  child's copy of the queue starts empty (``_init`` again, as ``Queue`` does).

``forward(queue)`` does this for any queue; ``register(listener)`` for a
``logging.handlers.QueueListener`` (also resetting its handlers' streams, which
the child's ``logging.shutdown()`` flushes).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import queue
import socket
import struct
import threading
import weakref

from forkguard._targets import PyKind, QueueKind

TYPE_CHECKING = False  # typing is not imported at run time (docs/design.md, "Import")
if TYPE_CHECKING:
    from typing import Any, Final

_CHUNK: Final = 32 * 1024  # below every Unix datagram limit seen (SO_SNDBUF ~208 KiB)
_HEADER: Final = struct.Struct("=iQ?")  # sender pid, message number, more pieces follow
_STOP: Final = b""  # a zero-length datagram: the reader's signal to leave
_DRAIN_TIMEOUT: Final = 10.0  # seconds unregister() and listener.stop() wait for the reader
_SYNC_PID: Final = 0  # no process has pid 0: a drain() marker from the parent itself


class _Channel:
    """The socket pair, the parent's reader thread, and the child's put()."""

    def __init__(self, q: queue.Queue[Any], name: str) -> None:
        self.queue = q
        self.name = name
        self.received = 0
        self.owner = os.getpid()
        self._recv, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._numbers = itertools.count()
        self._syncs: dict[int, threading.Event] = {}
        self._reader = threading.Thread(
            target=self._read, name=f"forkguard forward {name}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        pieces: dict[tuple[int, int], list[bytes]] = {}
        put = self.queue.put
        try:
            while (data := self._recv.recv(_HEADER.size + _CHUNK)) != _STOP:
                pid, number, more = _HEADER.unpack_from(data)
                if pid == _SYNC_PID:  # everything sent before it has been put
                    self._synced(number)
                    continue
                parts = pieces.setdefault((pid, number), [])
                parts.append(data[_HEADER.size :])
                if more:
                    continue
                del pieces[pid, number]
                try:
                    item = pickle.loads(b"".join(parts))
                except Exception:  # what a child sent, its parent cannot rebuild: skip
                    continue
                self.received += 1
                put(item)
        except OSError:
            pass  # closed under it
        finally:
            self._recv.close()
            self._send.close()

    def _synced(self, number: int) -> None:
        event = self._syncs.pop(number, None)
        if event is not None:
            event.set()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until what children sent so far is on the queue (the socket keeps
        one order for every sender).  False if `timeout` passed first."""
        if os.getpid() != self.owner:
            return True  # a child has nothing to take in
        event = threading.Event()
        number = next(self._numbers)
        self._syncs[number] = event
        try:
            self._send.send(_HEADER.pack(_SYNC_PID, number, False))
        except OSError:
            return True  # stopped: nothing more will come in
        return event.wait(timeout)

    def stop(self) -> None:
        """Let the reader go (it closes the sockets); never waits for it.  Only the
        parent's reader: in a child this would stop the parent's."""
        if os.getpid() != self.owner:
            return
        with contextlib.suppress(OSError):
            self._send.send(_STOP)

    def in_child(self) -> None:
        q = self.queue
        q._init(q.maxsize)  # the parent's items stay the parent's
        q.unfinished_tasks = 0
        q.put = self.put  # type: ignore[method-assign]
        q.put_nowait = self.put  # type: ignore[method-assign]
        self._recv.close()  # only the parent reads

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue.put in a forked child: the item goes to the parent's queue."""
        try:
            payload = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"in a forked child, items put on {self.name} go to the parent and must "
                f"pickle; {type(item).__qualname__} does not ({exc})"
            ) from exc
        pid, number = os.getpid(), next(self._numbers)
        last = (len(payload) - 1) // _CHUNK
        for i in range(last + 1):
            piece = payload[i * _CHUNK : (i + 1) * _CHUNK]
            self._send.send(_HEADER.pack(pid, number, i < last) + piece)


def _check_queue(q: object, what: str) -> None:
    if not isinstance(q, queue.Queue):
        raise TypeError(
            f"{what} a queue.Queue (or subclass), not {type(q).__qualname__}; a "
            f"multiprocessing queue already carries children's items to the parent"
        )


class Forwarding:
    """What ``forward()`` returns: ``unregister()`` it, or leave its ``with`` block.

    ``received`` counts the items that arrived from children."""

    def __init__(self, q: queue.Queue[Any], name: str | None) -> None:
        import forkguard

        _check_queue(q, "forward() takes")
        self.name = name or f"queue at {id(q):#x}"
        # The queue's mutex is reset in the child.  A registration of the queue made
        # elsewhere is shared (register() returns it) and is not ended here.
        theirs = {id(r) for r in forkguard.registrations()}
        mine = forkguard.register(q)
        self._channel = _Channel(q, self.name)
        self._regs = [] if id(mine) in theirs else [mine]
        self._regs.append(
            forkguard.at_fork(after_in_child=self._channel.in_child, name=f"forward {self.name}")
        )
        self._active = True

    @property
    def received(self) -> int:
        return self._channel.received

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every item children have sent so far is on the queue; call it
        before stopping the consumer.  False if `timeout` passed first."""
        return self._channel.drain(timeout)

    def unregister(self) -> bool:
        """Stop forwarding: children forked from now on keep their own copy."""
        if not self._active or os.getpid() != self._channel.owner:
            return False
        self._active = False
        for reg in self._regs:
            reg.unregister()
        self._channel.drain(_DRAIN_TIMEOUT)
        self._channel.stop()
        return True

    def __enter__(self) -> Forwarding:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unregister()

    def __repr__(self) -> str:
        state = "active" if self._active else "ended"
        return f"<forkguard.Forwarding {self.name!r}: {self.received} received, {state}>"


def forward(q: queue.Queue[Any], *, name: str | None = None) -> Forwarding:
    return Forwarding(q, name)


# --------------------------------------------------------------------------
# logging.handlers.QueueListener: register(listener).

_channels: dict[int, _Channel] = {}  # by id(listener), while registered
_QUEUE: Final = QueueKind("queue.Queue")


class ListenerKind(PyKind):
    """A QueueListener: its queue forwarded, queue and handlers' streams reset."""

    not_holdable = "a listener has no lock of its own; its queue is forwarded instead"

    def __init__(self, label: str) -> None:
        self.label = label

    def check(self, obj: Any) -> None:
        _check_queue(obj.queue, f"cannot register this {self.label}: forkguard forwards")
        for stream in self._streams(obj):
            stream_kind = _stream_kind(stream)
            if stream_kind is not None:
                stream_kind.check(stream)

    @staticmethod
    def _streams(obj: Any) -> list[Any]:
        # The child's logging.shutdown() flushes every handler it has, these too.
        found = (getattr(handler, "stream", None) for handler in obj.handlers)
        return [s for s in found if s is not None]

    def holdable(self, obj: Any) -> bool:
        return False

    def on_register(self, obj: Any) -> None:
        # Under the registry's lock: nothing here may register or wait.
        channel = _channels[id(obj)] = _Channel(obj.queue, f"{self.label} at {id(obj):#x}")
        # listener.stop() takes in what children sent before it stops the thread.
        stop = obj.stop

        def drain_then_stop() -> None:
            channel.drain(_DRAIN_TIMEOUT)
            stop()

        obj.stop = drain_then_stop
        # A collected listener's reader goes too (not at exit: nothing to stop then).
        weakref.finalize(obj, _stop, id(obj)).atexit = False

    def on_end(self, obj: Any) -> None:
        obj.__dict__.pop("stop", None)  # its own stop() again
        _stop(id(obj))

    def reset(self, obj: Any, value: int | None) -> None:
        _QUEUE.reset(obj.queue, None)
        for stream in self._streams(obj):
            stream_kind = _stream_kind(stream)
            if stream_kind is not None:
                stream_kind.reset(stream, None)
        channel = _channels.get(id(obj))
        if channel is not None:
            channel.in_child()

    release_child = reset


def _stop(key: int) -> None:
    channel = _channels.pop(key, None)
    if channel is not None:
        channel.stop()


def _stream_kind(stream: object) -> PyKind | None:
    from forkguard import _cpython_io

    try:
        return _cpython_io.kind_for(stream)
    except TypeError:
        return None  # a raw or foreign stream: no lock forkguard knows
