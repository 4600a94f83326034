"""Calls a stored budget still owes its store, kept under the ids they were first sent with.

What the stored backends share (spec section 15): every state-changing call carries an id made
here, and the store applies each id once. A call whose outcome the caller never learned (it
raised, was cancelled, or timed out after it may have been sent) is not forgotten: the backend
puts it, or the rollback that undoes it, in its :class:`Outbox`, and sends it again, with the
same id, on the budget's next call, on ``flush()``, and at interpreter exit. Re-sending is safe
however often it happens, since the store answers a known id with the outcome it kept.

At a normal interpreter exit, :func:`_send_at_exit` collects garbage (so that reservations
dropped in reference cycles queue their refunds) and sends what every outbox still holds, in 2
seconds at most in all, through each backend's ``exit_sender`` (a synchronous connection made
for the purpose: an asyncio client's event loop is gone by then). Calls a sender had taken but
whose send never finished (a task on an event loop that closed) are sent again too: their ids
make that harmless. A process made by ``fork`` starts with empty outboxes (what they held is
its parent's to send) and draws ids from a fresh random prefix.
"""

from __future__ import annotations

import atexit
import base64
import collections
import functools
import gc
import itertools
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["EXIT_SECONDS", "Call", "Outbox", "next_id"]

#: The time that sending every outbox's calls at exit may take, in all.
EXIT_SECONDS: Final = 2.0


def _fresh_ids() -> Callable[[], str]:
    # 72 random bits per process and a counter: unique across a fleet, short on the wire. The
    # result is a C-level callable (partial of next over a map), so drawing an id runs no
    # Python frame on the hot path.
    prefix = base64.b32encode(os.urandom(10)).decode().rstrip("=").lower()[:14]
    ids: Iterator[str] = map(f"{prefix}.{{:x}}".format, itertools.count())
    return functools.partial(next, ids)


#: Draw a call id unique across processes and hosts (``next_id()``); redrawn after ``fork``.
next_id: Callable[[], str] = _fresh_ids()


class Call:
    """One state-changing call: an operation, the id the store applies it under, two operands.

    ``queued`` is true while it sits in an outbox or is being sent from one.
    """

    __slots__ = ("first", "id", "operation", "queued", "second")

    def __init__(self, operation: bytes, call_id: str, first: object, second: object) -> None:
        self.operation = operation
        self.id = call_id
        self.first = first
        self.second = second
        self.queued = False

    def __repr__(self) -> str:
        return f"<Call {self.operation.decode()} {self.id} {self.first!r} {self.second!r}>"


# Reentrant: a reservation collected by the garbage collector while this thread holds the lock
# (any allocation may run a collection) queues its refund here, on the same thread.
_LOCK = threading.RLock()
#: Outboxes that hold calls (strongly: a budget object may be gone while its calls are owed).
_OWING: set[Outbox] = set()


class Outbox:
    """The calls one budget object still owes its store, oldest first; safe from any thread.

    ``calls`` is read without the lock on hot paths (``if outbox.calls:``); every change takes
    it. A batch that a sender takes stays known as *in flight* until :meth:`sent` or
    :meth:`put_back` settles it, so that the exit flush can send it again if its sender died.
    """

    __slots__ = ("__weakref__", "_exit_sender", "_in_flight", "calls", "label")

    def __init__(self, label: str, exit_sender: Callable[[list[Call], float], None]) -> None:
        #: What the outbox belongs to, for messages (a budget's name).
        self.label = label
        #: ``exit_sender(calls, deadline)`` sends ``calls`` synchronously before ``deadline``
        #: (a ``time.monotonic()`` value), or raises.
        self._exit_sender = exit_sender
        self.calls: collections.deque[Call] = collections.deque()
        self._in_flight: dict[int, list[Call]] = {}

    def put(self, call: Call) -> None:
        """Queue ``call`` to be sent (again) with its id."""
        with _LOCK:
            call.queued = True
            self.calls.append(call)
            _OWING.add(self)

    def take(self, limit: int) -> list[Call]:
        """Take up to ``limit`` calls, oldest first, to send now (an empty list if none)."""
        with _LOCK:
            batch = [self.calls.popleft() for _ in range(min(limit, len(self.calls)))]
            if batch:
                self._in_flight[id(batch)] = batch
            return batch

    def sent(self, batch: list[Call]) -> None:
        """Forget ``batch``: the store applied (or had applied) every call of it."""
        if not batch:
            return
        with _LOCK:
            self._in_flight.pop(id(batch), None)
            for call in batch:
                call.queued = False
            self._settle()

    def put_back(self, batch: list[Call]) -> None:
        """Queue ``batch`` again (its send failed), ahead of the calls queued since."""
        if not batch:
            return
        with _LOCK:
            self._in_flight.pop(id(batch), None)
            self.calls.extendleft(reversed(batch))
            _OWING.add(self)

    def owed(self) -> list[Call]:
        """Every call queued or in flight (for the exit flush)."""
        with _LOCK:
            return [*self.calls, *(c for batch in self._in_flight.values() for c in batch)]

    def _settle(self) -> None:
        if not self.calls and not self._in_flight:
            _OWING.discard(self)

    def clear(self) -> None:
        """Forget every call (in a child made by ``fork``: they are its parent's)."""
        self.calls.clear()
        self._in_flight.clear()


def _send_at_exit() -> None:
    deadline = time.monotonic() + EXIT_SECONDS
    # Reservations and permits dropped in reference cycles (an asyncio task's result, a frame
    # kept by a traceback) are otherwise finalized after this runs: collect them now, so that
    # their refunds are queued and sent too.
    gc.collect()
    with _LOCK:
        owing = list(_OWING)
    for outbox in owing:
        calls = outbox.owed()
        if not calls or time.monotonic() >= deadline:
            continue
        try:
            outbox._exit_sender(calls, deadline)
        except Exception as error:  # the store is unreachable: leases end by themselves
            warnings.warn(
                f"costbound: {len(calls)} call(s) owed to {outbox.label} could not be sent at "
                f"exit ({error}); leases they would end come back when they expire",
                RuntimeWarning,
                stacklevel=1,
            )
            continue
        with _LOCK:
            outbox.clear()
            _OWING.discard(outbox)


def _after_fork_in_child() -> None:
    global _LOCK, next_id  # noqa: PLW0603 - a fork replaces the process-wide state
    _LOCK = threading.RLock()  # another thread may have held it at the fork
    next_id = _fresh_ids()
    for outbox in _OWING:
        outbox.clear()
    _OWING.clear()


atexit.register(_send_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
