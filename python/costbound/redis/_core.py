"""What both Redis budgets share: script calls, leases, refunds on drop, and waiting.

Every operation is one EVALSHA of :mod:`costbound.redis._script` (EVAL when the server does not
have it cached, which also caches it again). The client never computes a balance: it sends the
operation and reads the verdict, so any number of processes share one budget.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from fractions import Fraction
from typing import Any, Final, NoReturn, TypeVar

from costbound._errors import BackendError
from costbound._waiting import _Signal
from costbound.redis._script import (
    CONF,
    PENDING,
    SCRIPT,
    SHA,
    SNAP,
    STORE,
    UNLEASE,
    VERIFY,
    WAITING,
)

try:
    from redis.exceptions import NoScriptError, RedisError
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("costbound.redis needs redis-py: pip install 'costbound[redis]'") from error

_T = TypeVar("_T")

#: Lua numbers are doubles; every amount a script sees stays at or below this, so it is exact.
MAX_AMOUNT: Final = 2**53 - 1
_U64: Final = 2**64 - 1
#: The rate is stored as the fraction rp/rq units per second with rq * (rp + 1) below this, so
#: that the script's refill never multiplies past 2**53.
_RATE_LIMIT: Final = 2**33
#: A waiter that hears nothing (a lost message, a refill by the clock) looks again this often.
POLL_SECONDS: Final = 0.5

# Redis unreachable, timing out or failing a script; an interrupted connection may surface as
# an OSError or asyncio's own TimeoutError (not the builtin on Python 3.10).
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


def amount(value: object, name: str, maximum: int = _U64) -> int:
    """``value`` as an int in ``0..=maximum``; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not 0 <= number <= maximum:
        raise ValueError(f"{name} must be in 0..={maximum}, got {number}")
    return number


def seconds(
    value: object, name: str, *, allow_none: bool = False, finite: bool = False
) -> float | None:
    """Check a number of seconds ``>= 0`` (or ``None`` when allowed) and return it.

    A ``finite`` duration (a lease) must be at most 10**9 s, so that its expiry stays exact in
    the script; otherwise infinity means no limit (``None``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0 or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")
    if finite and value > _LONGEST:
        raise ValueError(f"{name} must be at most {_LONGEST:g} seconds, got {value}")
    if math.isinf(value):
        return None
    return float(value)


_LONGEST: Final = 1e9


def rate_fraction(rate: object) -> Fraction:
    """Give the stored form of ``rate``: a fraction p/q with q * (p + 1) < 2**33.

    Every rate that is a ratio of small integers (``100 / 60``, ``2_000_000 / 60``) is kept
    exactly; others are rounded to the nearest such fraction.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float, Fraction)):
        raise TypeError(f"rate must be a number of units per second, not {type(rate).__name__}")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"rate must be a finite number >= 0, got {rate}")
    if rate >= _RATE_LIMIT - 1:
        raise ValueError(f"rate must be below {_RATE_LIMIT - 1} units per second, got {rate}")
    exact = Fraction(rate)
    bound = _RATE_LIMIT // (math.ceil(exact) + 1)
    while True:
        near = exact.limit_denominator(max(bound, 1))
        if near.denominator * (near.numerator + 1) < _RATE_LIMIT:
            return near
        bound //= 2


class Lease:
    """A leased amount on the server: the refund of a Redis reservation, and a permit's grant.

    Called with an amount (the estimate when its reservation is dropped), it gives that much
    back once, without blocking: on the event loop it was granted on, or with the budget's next
    call. In a process forked after the grant it does nothing (the parent owns the lease).
    """

    __slots__ = (
        "__weakref__",
        "_budget",
        "_loop",
        "_pid",
        "_used",
        "amount",
        "id",
        "member",
        "name",
    )

    def __init__(
        self,
        budget: Core,
        lease_id: str,
        leased: int,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        # A strong reference: a weak one is cleared before a reference cycle that holds the
        # reservation is collected, and its refund would be lost. The budget's core holds no
        # lease, so this makes no cycle; it keeps the client a refund needs.
        self._budget = budget
        self.name = budget.name
        self.id = lease_id
        self.amount = leased
        self.member = f"{lease_id}|{leased}"  # how the server holds it: id and amount
        self._loop = loop
        self._pid = _PID
        self._used = False

    @property
    def used(self) -> bool:
        """Whether the lease was given back, recorded or handed to a refund."""
        return self._used

    def claim(self) -> bool:
        """Mark the lease as settled; ``False`` if it already was."""
        if self._used:
            return False
        self._used = True
        return True

    def unclaim(self) -> None:
        """Undo :meth:`claim` after the call that settles the lease failed."""
        self._used = False

    def __call__(self, refund: int) -> None:
        refund = amount(refund, "amount", self.amount)
        if not self.claim() or self._pid != _PID:
            return
        self._budget.unlease_later(self.member, refund, self._loop)

    def __repr__(self) -> str:
        return f"<Lease {self.id} of {self.amount}{' (settled)' if self._used else ''}>"


_PREFIX = ""
_PID = 0
_COUNTER = itertools.count()
_LIVE: weakref.WeakSet[Core] = weakref.WeakSet()


def _reseed() -> None:
    """Draw a fresh id prefix per process: a forked child must not repeat its parent's ids."""
    global _PREFIX, _PID, _COUNTER  # noqa: PLW0603
    _PREFIX = os.urandom(8).hex() + ":"
    _PID = os.getpid()
    _COUNTER = itertools.count()
    for core in list(_LIVE):
        core.after_fork()


_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """Make a lease id unique across the fleet: a random per-process prefix and a counter."""
    return f"{_PREFIX}{next(_COUNTER):x}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Denied:
    """A denial: when the rate will make the amount fit (seconds, or None), and the capacity."""

    __slots__ = ("capacity", "wait")

    def __init__(self, wait: float | None, capacity: int) -> None:
        self.wait = wait
        self.capacity = capacity


class Core:
    """One Redis budget as seen by this process: its keys, clients, configuration and waiters."""

    def __init__(
        self,
        owner: str,
        *,
        name: object,
        kind: str,
        capacity: int,
        rate: Fraction,
        lease: float,
        client: object,
        sync_client: object,
        reconfigure: bool,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not name or "{" in name or "}" in name:
            raise ValueError(f"name must be a non-empty str without braces, got {name!r}")
        if client is None and sync_client is None:
            raise TypeError(f"{owner} needs client= (asyncio) or sync_client= (blocking), or both")
        self.owner = owner
        self.name = name
        tag = "{" + name + "}"
        self.keys: Final = (tag, tag + ":leases", tag + ":done")
        self.channel: Final = tag + ":room"
        # The number of keys and the keys, encoded once (redis-py passes bytes through).
        self.head: Final = (3, *(key.encode() for key in self.keys))
        self.capacity = capacity
        self.rate = rate
        self.lease_micros = str(round(lease * 1e6)).encode()
        self.client: Any = client
        self.sync_client: Any = sync_client
        self.conf: tuple[str, ...] = (
            kind,
            str(capacity),
            str(rate.numerator),
            str(rate.denominator),
        )
        self.mode = 2 if reconfigure else 1
        self.pending: collections.deque[tuple[str, int]] = collections.deque()
        self.tasks: set[asyncio.Task[None]] = set()  # refunds on their way
        self.listening: set[asyncio.Task[None]] = set()  # subscriptions of waiting tasks
        self.queue: collections.deque[Callable[[], None]] = collections.deque()
        self.lock = threading.Lock()
        self.listeners: dict[object, _Listener] = {}
        _LIVE.add(self)

    def after_fork(self) -> None:
        """In a forked child: forget the parent's refunds, tasks, waiters and subscriptions."""
        self.pending.clear()
        self.tasks = set()
        self.listening = set()
        self.queue.clear()
        self.lock = threading.Lock()
        self.listeners = {}

    # -- one script call ----------------------------------------------------------------------

    def _pending(self) -> list[object]:
        refunds: list[object] = []
        while self.pending:
            try:
                member, refund = self.pending.popleft()
            except IndexError:
                break
            refunds += (member, refund)
        return refunds

    def _argv(
        self, op: int, args: tuple[object, ...], waiting: bool, refunds: list[object], conf: bool
    ) -> tuple[object, ...]:
        flags = (WAITING if waiting else 0) + PENDING * (len(refunds) // 2)
        if not conf:
            return (*self.head, op + 16 * flags, *refunds, *args)
        flags |= CONF | (STORE if self.mode == 2 else VERIFY if self.mode == 1 else 0)
        return (*self.head, op + 16 * flags, *self.conf, *refunds, *args)

    def _failed(self, method: str, refunds: list[object], error: BaseException | None) -> None:
        for i in range(0, len(refunds), 2):
            self.pending.append((str(refunds[i]), int(refunds[i + 1])))  # type: ignore[call-overload]
        if error is not None:
            message = f"{method} on {self.name!r}: {type(error).__name__}: {error}"
            raise BackendError(message) from error

    def _verdict(self, reply: object) -> list[Any]:
        if type(reply) is not list:
            raise BackendError(f"unexpected reply from the budget script: {reply!r}")
        if reply[0] == -1:
            kind, cap, rp, rq = (_text(x) for x in reply[1:5])
            mine = self.conf
            raise ValueError(
                f"budget {self.name!r} is stored as {_describe(kind, cap, rp, rq)}; this object "
                f"has {_describe(*mine)}; pass reconfigure=True to store this object's values"
            )
        self.mode = 0
        return reply

    async def call(self, method: str, op: int, *args: object, waiting: bool = False) -> list[Any]:
        """Run ``op`` on the server with the asyncio client.

        The configuration goes with the first call only (to check or store it), and again when
        the server answers that the budget does not exist (a restarted server, deleted keys).
        """
        client = self.client
        if client is None:
            self.need("client", "an asyncio client (redis.asyncio.Redis)", method)
        refunds = self._pending() if self.pending else []
        try:
            reply = await _eval(client, self._argv(op, args, waiting, refunds, self.mode != 0))
            if reply[0] == 3:
                reply = await _eval(client, self._argv(op, args, waiting, refunds, True))
        except _FAILURES as error:
            self._failed(method, refunds, error)
        except BaseException:
            self._failed(method, refunds, None)
            raise
        return self._verdict(reply)

    def call_sync(self, method: str, op: int, *args: object, waiting: bool = False) -> list[Any]:
        """Run ``op`` on the server with the blocking client (as :meth:`call` does)."""
        client = self.sync_client
        if client is None:
            self.need("sync_client", "a blocking client (redis.Redis)", method)
        refunds = self._pending() if self.pending else []
        try:
            reply = _eval_sync(client, self._argv(op, args, waiting, refunds, self.mode != 0))
            if reply[0] == 3:
                reply = _eval_sync(client, self._argv(op, args, waiting, refunds, True))
        except _FAILURES as error:
            self._failed(method, refunds, error)
        except _NotBlockingError:
            self._failed(method, refunds, None)
            raise TypeError(
                f"{self.owner}.{method} needs sync_client= to be a blocking client (redis.Redis)"
            ) from None
        except BaseException:
            self._failed(method, refunds, None)
            raise
        return self._verdict(reply)

    def need(self, which: str, what: str, method: str) -> NoReturn:
        """Raise the TypeError of a method whose kind of client was not given."""
        raise TypeError(f"{self.owner}.{method} needs {which}= ({what}); none was given")

    # -- reading replies ----------------------------------------------------------------------

    def denied(self, reply: list[Any], wanted: int) -> Denied:
        """Read a denial; a waiting call raises ValueError when ``wanted`` can never fit."""
        micros = int(reply[1])
        return Denied(None if micros < 0 else micros / 1e6, int(reply[2]))

    def lease(self, lease_id: str, leased: int, loop: asyncio.AbstractEventLoop | None) -> Lease:
        """Wrap the lease the server just granted."""
        return Lease(self, lease_id, leased, loop)

    # -- refunds that must not block ----------------------------------------------------------

    def unlease_later(
        self, member: str, refund: int, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        """Give a lease back without blocking: on its loop if it runs, else with the next call."""
        if loop is not None and self.client is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._spawn_unlease, member, refund)
                return
        self.pending.append((member, refund))

    def _spawn_unlease(self, member: str, refund: int) -> None:
        task = asyncio.get_running_loop().create_task(self._unlease(member, refund))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _unlease(self, member: str, refund: int) -> None:
        try:
            await self.call("refund", UNLEASE, member, refund)
        except (Exception, asyncio.CancelledError):
            # Sent with the next call instead (or, if there is none, the lease expires). The
            # task ends quietly: nobody awaits it, and a refund must never raise into a drop.
            self.pending.append((member, refund))

    async def flush(self) -> None:
        """Wait for the refunds scheduled on this loop, and send those still pending."""
        await asyncio.sleep(0)  # refunds handed over from other threads start their tasks
        loop = asyncio.get_running_loop()
        mine = [task for task in self.tasks if task.get_loop() is loop]
        if mine:
            await asyncio.gather(*mine)
        if self.pending:
            await self.call("flush", SNAP)

    def flush_sync(self) -> None:
        """Send the pending refunds now."""
        if self.pending:
            self.call_sync("flush_sync", SNAP)

    # -- waiting ------------------------------------------------------------------------------

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
        attempt: Callable[[], Coroutine[Any, Any, Lease | Denied]],
        wanted: int,
        timeout: float | None,
    ) -> Lease:
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
                    if isinstance(got, Lease):
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
        attempt: Callable[[], Lease | Denied],
        wanted: int,
        timeout: float | None,
    ) -> Lease:
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
                    if isinstance(got, Lease):
                        return got
                    verdict = got
                left = None if deadline is None else deadline - time.monotonic()
                event.wait(self._delay(verdict, wanted, left, timeout))
                event.clear()
        finally:
            self._leave(wake)
            if listener is not None:
                listener.leave()


async def _eval(client: Any, argv: tuple[object, ...]) -> Any:  # noqa: ANN401 - a reply
    try:
        return await client.execute_command("EVALSHA", SHA, *argv)
    except NoScriptError:  # a restarted server, or SCRIPT FLUSH: EVAL caches it again
        return await client.execute_command("EVAL", SCRIPT, *argv)


def _eval_sync(client: Any, argv: tuple[object, ...]) -> Any:  # noqa: ANN401 - a reply
    try:
        reply = client.execute_command("EVALSHA", SHA, *argv)
    except NoScriptError:
        reply = client.execute_command("EVAL", SCRIPT, *argv)
    if hasattr(reply, "__await__"):  # an asyncio client given as the blocking one
        reply.close()
        raise _NotBlockingError
    return reply


class _NotBlockingError(Exception):
    """The blocking client returned an awaitable."""


def _describe(kind: str, cap: str, rp: str, rq: str) -> str:
    what = "a unit budget" if kind == "u" else "a token budget"
    rate = Fraction(int(rp), int(rq))
    return f"{what} of capacity {cap} and rate {float(rate):g}/s"


def check_fits(verdict: Denied, wanted: int) -> None:
    """Raise a waiting call's ValueError when ``wanted`` is above the stored capacity."""
    if wanted > verdict.capacity:
        raise ValueError(
            f"cost {wanted} is above the budget's capacity {verdict.capacity}: it can never fit"
        )


async def shielded(attempt: Callable[[], Coroutine[Any, Any, Lease | Denied]]) -> Lease | Denied:
    """Run ``attempt`` so that a cancellation cannot lose a grant it raced: it is given back."""
    task = asyncio.get_running_loop().create_task(attempt())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_give_back)
        raise


def _give_back(task: asyncio.Task[Lease | Denied]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    verdict = task.result()
    if isinstance(verdict, Lease):
        verdict(verdict.amount)


class _Listener:
    """One subscription to a budget's channel, shared by the waiters of one loop or of threads.

    Releases, refunds, settlements, refills and reclaims publish on the channel while someone
    waits; the listener wakes the first waiter, which then tries again. It unsubscribes once no
    waiter is left.
    """

    def __init__(self, core: Core, key: object) -> None:
        self._core = core
        self._key = key
        self._users = 0
        self._subscribed = threading.Event()
        self._future: asyncio.Future[None] | None = None
        self._stopped = False

    @classmethod
    def join_async(cls, core: Core, loop: asyncio.AbstractEventLoop) -> _Listener:
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
    def join_thread(cls, core: Core) -> _Listener:
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
