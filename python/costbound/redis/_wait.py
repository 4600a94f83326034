"""Waiting for room on a Redis budget: a first-come-first-served line per process.

Waiters are woken by messages that releases and refunds publish on the budget's channel
(pub/sub), with a slow poll as fallback and a timer for rate refill.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol, TypeVar

from costbound._waiting import _Signal

#: A waiter that hears nothing (a lost message, a refill by the clock) looks again this often.
POLL_SECONDS: Final = 0.5


class Denied:
    """A denial: when the rate will make the amount fit (seconds, or None), and the capacity."""

    __slots__ = ("capacity", "wait")

    def __init__(self, wait: float | None, capacity: int) -> None:
        self.wait = wait
        self.capacity = capacity


class Grant(Protocol):
    """What a granted attempt returns (a lease): its amount, and called with it, given back."""

    @property
    def amount(self) -> int: ...

    def __call__(self, refund: int, /) -> None: ...


_G = TypeVar("_G", bound=Grant)


class Waiting:
    """The line of one budget's waiters in this process, and their subscriptions.

    A mixin of the budget's core, which provides ``name``, ``client``, ``sync_client`` and
    ``channel``.
    """

    name: str
    client: Any
    sync_client: Any
    channel: str

    def __init__(self) -> None:
        self.listening: set[asyncio.Task[None]] = set()  # subscriptions of waiting tasks
        self.queue: collections.deque[Callable[[], None]] = collections.deque()
        self.lock = threading.Lock()
        self.listeners: dict[object, _Listener] = {}

    def forget_waiters(self) -> None:
        """In a forked child: forget the parent's waiters and subscriptions."""
        self.listening = set()
        self.queue.clear()
        self.lock = threading.Lock()
        self.listeners = {}

    def queued(self) -> bool:
        """Whether a waiter of this process is queued (``try_*`` then denies at once)."""
        return bool(self.queue)

    def _join(self, wake: Callable[[], None]) -> None:
        with self.lock:
            self.queue.append(wake)

    def _leave(self, wake: Callable[[], None]) -> None:
        with self.lock:
            with contextlib.suppress(ValueError):
                self.queue.remove(wake)
            head = self.queue[0] if self.queue else None
        if head is not None:
            head()

    def _is_head(self, wake: Callable[[], None]) -> bool:
        queue = self.queue
        return bool(queue) and queue[0] is wake

    def wake_head(self) -> None:
        """Room may have appeared (a message on the channel): the first waiter looks again."""
        queue = self.queue
        if queue:
            with contextlib.suppress(IndexError):
                queue[0]()

    def _delay(
        self, verdict: Denied | None, wanted: int, left: float | None, timeout: float | None
    ) -> float | None:
        """Give how long a waiter sleeps, and raise TimeoutError past the deadline.

        The head of the line sleeps until the rate makes its amount fit, a poll at most.
        """
        delay = None
        if verdict is not None:
            check_fits(verdict, wanted)
            delay = POLL_SECONDS if verdict.wait is None else min(verdict.wait, POLL_SECONDS)
        if left is not None:
            if left <= 0:
                raise TimeoutError(f"no room in {self.name!r} within the timeout of {timeout} s")
            delay = left if delay is None else min(delay, left)
        return delay

    async def wait(
        self,
        attempt: Callable[[], Coroutine[Any, Any, _G | Denied]],
        wanted: int,
        timeout: float | None,
    ) -> _G:
        """Queue (first come, first served in this process) until ``attempt`` is granted."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        signal = _Signal(loop)
        wake = signal.wake
        self._join(wake)
        listener = None if timeout == 0 else _Listener.join_async(self, loop)
        try:
            if listener is not None:
                await listener.ready()
            while True:
                verdict: Denied | None = None
                if self._is_head(wake):
                    got = await shielded(attempt)
                    if not isinstance(got, Denied):
                        return got
                    verdict = got
                left = None if deadline is None else deadline - loop.time()
                await signal.sleep(self._delay(verdict, wanted, left, timeout))
        finally:
            self._leave(wake)
            if listener is not None:
                listener.leave()

    def wait_blocking(
        self,
        attempt: Callable[[], _G | Denied],
        wanted: int,
        timeout: float | None,
    ) -> _G:
        """Wait as :meth:`wait` does, on a thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        event = threading.Event()
        wake = event.set
        self._join(wake)
        listener = None if timeout == 0 else _Listener.join_thread(self)
        try:
            if listener is not None:
                listener.ready_blocking()
            while True:
                verdict: Denied | None = None
                if self._is_head(wake):
                    got = attempt()
                    if not isinstance(got, Denied):
                        return got
                    verdict = got
                left = None if deadline is None else deadline - time.monotonic()
                event.wait(self._delay(verdict, wanted, left, timeout))
                event.clear()
        finally:
            self._leave(wake)
            if listener is not None:
                listener.leave()


def check_fits(verdict: Denied, wanted: int) -> None:
    """Raise a waiting call's ValueError when ``wanted`` is above the stored capacity."""
    if wanted > verdict.capacity:
        raise ValueError(
            f"cost {wanted} is above the budget's capacity {verdict.capacity}: it can never fit"
        )


async def shielded(attempt: Callable[[], Coroutine[Any, Any, _G | Denied]]) -> _G | Denied:
    """Run ``attempt`` so that a cancellation cannot lose a grant it raced: it is given back."""
    task = asyncio.get_running_loop().create_task(attempt())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_give_back)
        raise


def _give_back(task: asyncio.Task[Any]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    verdict = task.result()
    if not isinstance(verdict, Denied):
        verdict(verdict.amount)


class _Listener:
    """One subscription to a budget's channel, shared by the waiters of one loop or of threads.

    Releases, refunds, settlements, refills and reclaims publish on the channel while someone
    waits; the listener wakes the first waiter, which then tries again. It unsubscribes once no
    waiter is left.
    """

    def __init__(self, core: Waiting, key: object) -> None:
        self._core = core
        self._key = key
        self._users = 0
        self._subscribed = threading.Event()
        self._future: asyncio.Future[None] | None = None
        self._stopped = False

    @classmethod
    def join_async(cls, core: Waiting, loop: asyncio.AbstractEventLoop) -> _Listener:
        with core.lock:
            found = core.listeners.get(loop)
            fresh = found is None or found._stopped
            listener = cls(core, loop) if fresh or found is None else found
            if fresh:
                core.listeners[loop] = listener
                listener._future = loop.create_future()
            listener._users += 1
        if fresh:
            task = loop.create_task(listener._run_async())
            core.listening.add(task)
            task.add_done_callback(core.listening.discard)
        return listener

    @classmethod
    def join_thread(cls, core: Waiting) -> _Listener:
        with core.lock:
            listener = core.listeners.get("thread")
            if listener is None or listener._stopped:
                listener = cls(core, "thread")
                core.listeners["thread"] = listener
                threading.Thread(target=listener._run_thread, daemon=True).start()
            listener._users += 1
        return listener

    def leave(self) -> None:
        with self._core.lock:
            self._users -= 1

    def _done(self) -> bool:
        with self._core.lock:
            if self._users <= 0:
                self._stopped = True
                if self._core.listeners.get(self._key) is self:
                    del self._core.listeners[self._key]
                return True
            return False

    def _ready(self) -> None:
        self._subscribed.set()
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def ready(self) -> None:
        """Wait until subscribed (so that no message is missed), at most a poll interval."""
        if self._future is None or self._future.done():
            return
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._future), POLL_SECONDS)

    def ready_blocking(self) -> None:
        self._subscribed.wait(POLL_SECONDS)

    def _heard(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return
        if message["type"] == "subscribe":
            self._ready()
        elif message["type"] == "message":
            self._core.wake_head()

    async def _run_async(self) -> None:
        pubsub = None
        try:
            pubsub = self._core.client.pubsub()
            await pubsub.subscribe(self._core.channel)
            while not self._done():
                self._heard(await pubsub.get_message(timeout=0.2))
        except Exception:
            # No messages then: the waiters poll (and see a failure of the server themselves).
            self._stopped = True
        finally:
            self._ready()
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _run_thread(self) -> None:
        pubsub = None
        try:
            pubsub = self._core.sync_client.pubsub()
            pubsub.subscribe(self._core.channel)
            while not self._done():
                self._heard(pubsub.get_message(timeout=0.2))
        except Exception:
            self._stopped = True
        finally:
            self._ready()
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()
