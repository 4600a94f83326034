"""The suspended half of an async wait: what runs once a request does not fit at once.

The native ``Permit`` and ``TokenRequest`` complete ``await`` without suspending when there is
room and no queue. Otherwise they hand over to :func:`wait`, which queues a native waiter whose
grant is made by the budget itself (a release, refund, refill or clock advance on any thread
takes the units for the head of the queue, in order, and wakes it). This coroutine only sleeps
on the caller's event loop until woken, sets the timer a rate refill needs, and cleans up: a
timeout or a cancellation leaves no unit taken and no waiter behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

__all__ = ["wait"]


class _Waiter(Protocol):
    @property
    def granted(self) -> bool: ...
    def poll(self) -> float | None: ...
    def withdraw(self) -> bool: ...
    def give_back(self) -> None: ...


class _Owner(Protocol[_T_co]):
    def _enqueue(self, wake: Callable[[], None], /) -> _Waiter: ...
    def _finish(self, waiter: _Waiter, /) -> _T_co: ...
    def _reset(self) -> None: ...


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Signal:
    """A wake-up flag for one waiting task: set from any thread, awaited on its loop."""

    __slots__ = ("__weakref__", "_flag", "_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None
        self._flag = False

    def wake(self) -> None:
        """Wake the task; the budget calls it (never under its lock) from any thread."""
        # A closed loop raises RuntimeError (resolving the future schedules the task): its
        # tasks never run again. The future is still resolved first, so that the wait, if
        # another loop's task drives it later, finds its wake-up.
        with contextlib.suppress(RuntimeError):
            if asyncio.events._get_running_loop() is self._loop or self._loop.is_closed():
                self._fire()  # from inside the loop itself: no hand-over needed
            else:
                # Any other thread, or this one while the loop is stopped: a loop may run on
                # another thread than the one its wait started on, and only the thread-safe
                # call wakes its selector.
                self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._flag = True
        if self._future is not None:
            _resolve(self._future)

    async def sleep(self, delay: float | None) -> None:
        """Return once woken (at once if woken since the last sleep) or after ``delay``."""
        if self._flag:
            self._flag = False
            return
        future = self._loop.create_future()
        self._future = future
        timer = None if delay is None else self._loop.call_later(delay, _resolve, future)
        try:
            await future
        finally:
            self._future = None
            self._flag = False
            if timer is not None:
                timer.cancel()


def _wake(signal: weakref.ref[_Signal]) -> None:
    alive = signal()
    if alive is not None:
        alive.wake()


async def wait(owner: _Owner[_T], timeout: float | None) -> _T:
    """Queue ``owner``'s request and wait for its grant; return ``owner._finish(waiter)``."""
    try:
        loop = asyncio.get_running_loop()  # RuntimeError where no asyncio loop runs
        deadline = None if timeout is None or math.isinf(timeout) else loop.time() + timeout
        signal = _Signal(loop)
        # The budget's queue holds the wake-up weakly: a task dropped while it waits (its loop
        # closed without cancelling it) is not kept alive by the queue, and its clean-up below
        # then runs.
        waiter = owner._enqueue(functools.partial(_wake, weakref.ref(signal)))
    except BaseException:
        owner._reset()  # nothing was queued: the request may be awaited again
        raise
    try:
        while not waiter.granted:
            delay = waiter.poll()  # grants whatever fits; the refill timer if first in line
            if waiter.granted:
                break
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    if waiter.withdraw():  # granted at the last moment: keep it
                        break
                    raise TimeoutError(f"no room in the budget within the timeout of {timeout} s")
                delay = left if delay is None else min(delay, left)
            await signal.sleep(delay)
    except BaseException:
        # Cancelled, timed out or interrupted: leave the queue, and give back a grant that
        # raced the exception, so that nothing is taken and the next waiter is served.
        if waiter.withdraw():
            waiter.give_back()
        owner._reset()
        raise
    return owner._finish(waiter)
