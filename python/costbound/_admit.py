"""All-or-nothing admission across several budgets: ``admit``, ``try_admit``, ``admit_blocking``.

One request often needs several budgets at once: a row, a concurrency slot, an estimate of
tokens. Taking them one after another races (two requests each get half and wait for the other
half) and leaks on error. Admission takes every part or none: when a part is denied or raises,
the parts already taken are given back before it waits, returns ``None`` or re-raises.

Waiting never holds a part. An admission that must wait *watches* its native parts: it takes no
place in their queues and is granted nothing by them, but it is woken by every change that adds
room or shortens a queue (a release, a refund, a refill, a waiter served or gone) and then tries
every part again, all or nothing: it first looks at the native parts without taking anything,
and tries to take every part only when they all fit. A rated part also sets a timer for the
moment the refill makes its amount available. Parts that cannot signal (a user-written
``BudgetGuard`` with only the protocol's two methods) are retried with capped exponential
backoff; they are tried before the native parts.

Why watch rather than queue: an admission queued in one budget's line, granted there and then
denied another budget (whose line holds an admission of the opposite order) would hand its grant
on and queue again, and two such admissions can do that for ever. Watching cannot livelock: any
retry either takes everything or gives everything back, and the first admission to retry after
all its parts are free wins. Requests waiting in a budget's own queue (``reserve``) are served
before an admission, since non-waiting attempts are denied while that queue is not empty.
"""

from __future__ import annotations

import asyncio
import functools
import math
import operator
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from costbound import _native
from costbound._protocols import BudgetGuard, TokenBudget
from costbound._reservation import TokenReservation
from costbound._waiting import _Signal, _wake

__all__ = ["Admission", "Ticket", "admit", "admit_blocking", "try_admit"]

_T = TypeVar("_T")

_FIRST_BACKOFF = 0.001
_MAX_BACKOFF = 0.05


@dataclass(frozen=True)
class _Part:
    """One budget and the amount to take from it."""

    budget: Any
    amount: int
    is_tokens: bool


def _parts(
    guards: Mapping[BudgetGuard, int] | None, tokens: Mapping[TokenBudget, int] | None
) -> list[_Part]:
    parts: list[_Part] = []
    for mapping, is_tokens, protocol, what in (
        (guards, False, BudgetGuard, "guards"),
        (tokens, True, TokenBudget, "tokens"),
    ):
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{what} must be a mapping of budget to amount, not {type(mapping)}")
        for budget, amount in mapping.items():
            if not isinstance(budget, protocol):
                raise TypeError(
                    f"{what} keys must be {protocol.__name__} objects, not {type(budget).__name__}"
                )
            if isinstance(amount, bool):
                raise TypeError(f"the amount for {budget!r} must be an int, not bool")
            try:
                index = operator.index(amount)
            except TypeError:
                raise TypeError(
                    f"the amount for {budget!r} must be an int, not {type(amount).__name__}"
                ) from None
            if index < 0:
                raise ValueError(f"the amount for {budget!r} must be >= 0, got {index}")
            parts.append(_Part(budget, index, is_tokens))
    # Parts that cannot be looked at before taking (user-written) are tried first: when one of
    # them denies, no native part has been taken, so giving back wakes no watch of this very
    # admission (which would make it retry at once, over and over).
    return sorted(parts, key=lambda part: callable(getattr(part.budget, "_fits", None)))


def _known_capacity(budget: object) -> int | None:
    """Return the capacity a budget states (native and Redis budgets do), or ``None``."""
    capacity = getattr(budget, "capacity", None)
    if isinstance(capacity, int) and not isinstance(capacity, bool):
        return capacity
    return None


def _check_fits(parts: list[_Part]) -> None:
    """Refuse at once a waiting admission with a part that can never fit (``ValueError``).

    Any budget whose ``capacity`` is known qualifies, not only the native ones: waiting for an
    amount above it (a Redis budget's, say) would poll for ever.
    """
    for part in parts:
        capacity = _known_capacity(part.budget)
        if capacity is not None and part.amount > capacity:
            raise NeverFitsError(part.budget, part.amount)


class NeverFitsError(ValueError):
    """A waiting admission's part is above its budget's capacity: it can never fit."""

    def __init__(self, budget: object, amount: int) -> None:
        super().__init__(
            f"the amount {amount} for {budget!r} is above its capacity: it can never fit, so "
            "waiting for it would never end"
        )
        self.budget = budget
        self.amount = amount


def _refund(reservation: TokenReservation) -> None:
    refund = reservation.disarm()
    if refund is not None:
        refund(reservation.estimate)


async def _await(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def run_to_completion(awaitable: Awaitable[_T]) -> _T:
    """Run a user-written budget's async method on a private event loop (threads only)."""
    return asyncio.run(_await(awaitable))


def _refuse_on_a_loop(call: str, instead: str = "async with costbound.admit(...)") -> None:
    if asyncio.events._get_running_loop() is not None:
        raise RuntimeError(
            f"{call}() was called on a thread that is running an event loop, which it would "
            f"block; use `{instead}` instead"
        )


class Ticket:
    """The parts an admission took.

    Closing it (leaving its ``with`` / ``async with`` block, or ``await ticket.close()`` /
    ``ticket.close_sync()``) releases every guard part once and refunds every token reservation
    that was not recorded. Closing twice does nothing.
    """

    __slots__ = ("_closed", "_guards", "_lock", "_reservations")

    def __init__(self, guards: dict[Any, int], reservations: dict[Any, TokenReservation]) -> None:
        self._guards = guards
        self._reservations = reservations
        self._closed = False
        self._lock = threading.Lock()

    @property
    def reservations(self) -> Mapping[TokenBudget, TokenReservation]:
        """The armed reservation taken on each token budget, to pass to ``record_usage``."""
        return self._reservations

    @property
    def guards(self) -> Mapping[BudgetGuard, int]:
        """The units taken on each guard."""
        return self._guards

    @property
    def closed(self) -> bool:
        """Whether the parts were given back."""
        return self._closed

    def _claim_close(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True

    async def close(self) -> None:
        """Releases the guard parts and refunds the unrecorded reservations, once.

        Every part goes back even if the task is cancelled meanwhile: the releases that may
        suspend (a user-written or Redis budget's) run in a task of their own, which a
        cancellation of the caller does not interrupt. A native release never suspends, and
        takes no task.
        """
        if not self._claim_close():
            return
        # Every part goes back even if one raises; the first error is raised after.
        errors: list[BaseException] = []
        pending: list[Awaitable[object]] = []
        for budget, cost in self._guards.items():
            release = _call(errors, budget.release, cost)
            if isinstance(release, _native.Awaitable):
                await _collect_async(errors, release)  # done when called: it never suspends
            elif release is not None:
                pending.append(release)
        for reservation in self._reservations.values():
            _collect(errors, _refund, reservation)
        if pending:  # last: a cancellation of the caller here leaves the rest done
            await _uninterrupted(_await_all(pending, errors))
        if errors:
            raise errors[0]

    def close_sync(self) -> None:
        """``close()`` for threads."""
        if self._closed:
            return
        if any(not callable(getattr(b, "release_sync", None)) for b in self._guards):
            # Such a guard is released by running its coroutine on a private loop, which a
            # thread that runs a loop cannot do: refuse before anything is given back.
            _refuse_on_a_loop("Ticket.close_sync")
        if not self._claim_close():
            return
        errors: list[BaseException] = []
        for budget, cost in self._guards.items():
            _collect(errors, _release_sync, budget, cost)
        for reservation in self._reservations.values():
            _collect(errors, _refund, reservation)
        if errors:
            raise errors[0]

    def _refuse_closed(self) -> None:
        if self._closed:
            raise RuntimeError("this ticket is closed: its parts were given back")

    async def __aenter__(self) -> Ticket:
        self._refuse_closed()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __enter__(self) -> Ticket:
        self._refuse_closed()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_sync()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Ticket {state}: {len(self._guards)} guard(s), "
            f"{len(self._reservations)} reservation(s)>"
        )


def _collect(errors: list[BaseException], call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except BaseException as exc:  # collected; the first is raised later
        errors.append(exc)


async def _collect_async(errors: list[BaseException], awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except BaseException as exc:  # collected; the first is raised later
        errors.append(exc)


def _call(
    errors: list[BaseException], call: Callable[[int], Awaitable[object]], cost: int
) -> Awaitable[object] | None:
    try:
        return call(cost)
    except BaseException as exc:  # collected; the first is raised later
        errors.append(exc)
        return None


async def _await_all(awaitables: list[Awaitable[object]], errors: list[BaseException]) -> None:
    for awaitable in awaitables:
        await _collect_async(errors, awaitable)


#: Releases running on their own, kept alive until they finish (a loop holds tasks weakly).
_RELEASING: set[asyncio.Task[None]] = set()


async def _uninterrupted(releases: Coroutine[Any, Any, None]) -> None:
    """Run ``releases`` to its end even if the caller is cancelled while it runs.

    A cancellation would otherwise land inside a budget's ``release`` and lose its units. The
    caller still sees its ``CancelledError`` at once; the releases finish on the loop (an error
    they raise after the caller was cancelled has no one to go to, and is dropped).
    """
    task = asyncio.ensure_future(releases)
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)
    await asyncio.shield(task)


def _release_sync(budget: BudgetGuard, cost: int) -> None:
    release_sync = getattr(budget, "release_sync", None)
    if callable(release_sync):
        release_sync(cost)
    else:
        run_to_completion(budget.release(cost))


class _Held:
    """The parts taken so far by one attempt, to keep or give back together."""

    __slots__ = ("guards", "reservations")

    def __init__(self) -> None:
        self.guards: dict[Any, int] = {}
        self.reservations: dict[Any, TokenReservation] = {}

    def add(self, part: _Part, handle: TokenReservation | bool) -> None:
        if isinstance(handle, TokenReservation):
            self.reservations[part.budget] = handle
        else:
            self.guards[part.budget] = part.amount

    def holds(self, part: _Part) -> bool:
        return part.budget in (self.reservations if part.is_tokens else self.guards)

    def ticket(self) -> Ticket:
        ticket = Ticket(self.guards, self.reservations)
        self.guards, self.reservations = {}, {}
        return ticket

    async def give_back(self) -> None:
        guards, reservations = self.guards, self.reservations
        self.guards, self.reservations = {}, {}
        await Ticket(guards, reservations).close()

    def give_back_sync(self) -> None:
        guards, reservations = self.guards, self.reservations
        self.guards, self.reservations = {}, {}
        Ticket(guards, reservations).close_sync()


async def _try_take(part: _Part) -> TokenReservation | bool | None:
    """Take the part without waiting: its handle (a reservation, or ``True``); ``None`` if not."""
    if part.is_tokens:
        reservation: TokenReservation | None = await part.budget.try_reserve_tokens(part.amount)
        return reservation
    return True if await part.budget.try_reserve(part.amount) else None


def _try_take_sync(part: _Part) -> TokenReservation | bool | None:
    budget = part.budget
    if part.is_tokens:
        method = getattr(budget, "try_reserve_tokens_sync", None)
        reservation: TokenReservation | None
        if callable(method):
            reservation = method(part.amount)
        else:
            reservation = run_to_completion(budget.try_reserve_tokens(part.amount))
        return reservation
    method = getattr(budget, "try_reserve_sync", None)
    granted = (
        method(part.amount)
        if callable(method)
        else run_to_completion(budget.try_reserve(part.amount))
    )
    return True if granted else None


async def _attempt(parts: list[_Part], held: _Held) -> _Part | None:
    """Try every part not yet held; return the first denied, or ``None`` when all are held."""
    for part in parts:
        if held.holds(part):
            continue
        handle = await _try_take(part)
        if handle is None:
            return part
        held.add(part, handle)
    return None


def _attempt_sync(parts: list[_Part], held: _Held) -> _Part | None:
    for part in parts:
        if held.holds(part):
            continue
        handle = _try_take_sync(part)
        if handle is None:
            return part
        held.add(part, handle)
    return None


class AdmissionTimeoutError(TimeoutError):
    """An admission's timeout ran out; ``budget`` and ``amount`` name the part it last lacked."""

    def __init__(self, timeout: float | None, budget: object, amount: int) -> None:
        super().__init__(f"could not admit every part within the timeout of {timeout} s")
        self.budget = budget
        self.amount = amount


def _left(
    deadline: float | None, now: float, timeout: float | None, blocker: _Part
) -> float | None:
    """Seconds left before ``deadline`` (``None``: no deadline); ``TimeoutError`` if none."""
    if deadline is None:
        return None
    if deadline - now <= 0:
        raise AdmissionTimeoutError(timeout, blocker.budget, blocker.amount)
    return deadline - now


def _watch_all(parts: list[_Part], wake: Callable[[], None]) -> list[_native.Watch]:
    """Watch every native part's budget (each once)."""
    watches: dict[int, _native.Watch] = {}
    for part in parts:
        watch = getattr(part.budget, "_watch", None)
        if callable(watch) and id(part.budget) not in watches:
            watches[id(part.budget)] = watch(wake)
    return list(watches.values())


def _sleep_for(blocker: _Part, backoff: float, left: float | None) -> tuple[float | None, float]:
    """Return how long to sleep for ``blocker`` (``None``: until woken), and the next backoff."""
    seconds_until = getattr(blocker.budget, "_seconds_until", None)
    if callable(seconds_until):
        delay: float | None = seconds_until(blocker.amount)  # a rated part's refill timer
    else:
        delay, backoff = backoff, min(backoff * 2, _MAX_BACKOFF)
    if left is not None:
        delay = left if delay is None else min(delay, left)
    return delay, backoff


def _first_unfit(parts: list[_Part]) -> _Part | None:
    """Return the first native part that would be denied now (looking only: nothing is taken)."""
    for part in parts:
        fits = getattr(part.budget, "_fits", None)
        if callable(fits) and not fits(part.amount):
            return part
    return None


async def _admit(parts: list[_Part], timeout: float | None) -> Ticket:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    held = _Held()
    signal: _Signal | None = None
    watches: list[_native.Watch] = []
    backoff = _FIRST_BACKOFF
    try:
        while True:
            # Look before taking: giving parts back wakes this admission's own watches, so an
            # attempt is made only when every native part fits (and then rarely fails).
            blocker = _first_unfit(parts)
            if blocker is None:
                blocker = await _attempt(parts, held)
                if blocker is None:
                    return held.ticket()
                await held.give_back()
            left = _left(deadline, loop.time(), timeout, blocker)
            if signal is None:
                # Watch first, then look again at once: no change after the watch goes unseen.
                signal = _Signal(loop)
                watches = _watch_all(parts, functools.partial(_wake, weakref.ref(signal)))
                continue
            delay, backoff = _sleep_for(blocker, backoff, left)
            await signal.sleep(delay)
    except BaseException:
        await held.give_back()
        raise
    finally:
        for watch in watches:
            watch.close()


class Admission(Coroutine[Any, Any, Ticket]):
    """What ``admit()`` returns: a coroutine that gives a ``Ticket``.

    ``await`` it (or hand it to ``asyncio.create_task``) for a ``Ticket``, or use it with
    ``async with``, which closes the ticket on exit (on success, error or cancellation). It is
    single-use, as a coroutine is: awaiting or entering it a second time is a ``RuntimeError``.
    """

    __slots__ = ("_coroutine", "_parts", "_ticket", "_timeout")

    def __init__(self, parts: list[_Part], timeout: float | None) -> None:
        self._parts = parts
        self._timeout = timeout
        self._ticket: Ticket | None = None
        # Made when first driven, so that an admission never used warns of nothing.
        self._coroutine: Coroutine[Any, Any, Ticket] | None = None

    def _start(self) -> Coroutine[Any, Any, Ticket]:
        """Make the admission's coroutine; ``RuntimeError`` if it was made before."""
        if self._coroutine is not None:
            raise RuntimeError(
                "this admission was already awaited or entered: an admission is single-use; "
                "call costbound.admit() for a new one"
            )
        self._coroutine = _admit(self._parts, self._timeout)
        return self._coroutine

    def _running(self) -> Coroutine[Any, Any, Ticket]:
        return self._start() if self._coroutine is None else self._coroutine

    def __await__(self) -> Generator[Any, None, Ticket]:
        return self._start().__await__()

    def send(self, value: Any) -> Any:  # noqa: ANN401 - the coroutine protocol
        """Advance the admission (the coroutine protocol, as asyncio's tasks drive it)."""
        return self._running().send(value)

    def throw(self, *error: Any) -> Any:  # noqa: ANN401 - the coroutine protocol
        """Raise into the admission (a cancelled task): it gives back what it took."""
        return self._running().throw(*error)

    def close(self) -> None:
        """Close the admission: a wait in progress gives back every part it took."""
        self._running().close()

    async def __aenter__(self) -> Ticket:
        self._ticket = await self._start()
        return self._ticket

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            await ticket.close()


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """Seconds, or ``None`` for no timeout (``inf`` too); NaN or negative is a ``ValueError``.

    ``name`` is the argument the messages name (a gate's ``wait``).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(timeout)}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int beyond every float, as the native calls refuse it
        raise ValueError(f"{name} must be a number of seconds; this one is too large") from None
    if not seconds >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, got {timeout}")
    if math.isinf(seconds):
        return None
    return seconds


def admit(
    *,
    guards: Mapping[BudgetGuard, int] | None = None,
    tokens: Mapping[TokenBudget, int] | None = None,
    timeout: float | None = None,
) -> Admission:
    """Take every part or none, waiting (up to ``timeout`` seconds) until all fit together.

    ``guards`` maps each ``BudgetGuard`` to the units to take; ``tokens`` maps each
    ``TokenBudget`` to the estimate to reserve. Use it as ``async with admit(...) as ticket``;
    ``ticket.reservations[budget]`` is the reservation to record. ``TimeoutError`` on expiry
    and cancellation leave nothing taken; ``timeout=math.inf`` is no timeout. A part above the
    ``capacity`` its budget states (native and Redis budgets do) is a ``ValueError`` at once.
    """
    parts = _parts(guards, tokens)
    timeout = check_timeout(timeout)
    _check_fits(parts)
    return Admission(parts, timeout)


async def try_admit(
    *,
    guards: Mapping[BudgetGuard, int] | None = None,
    tokens: Mapping[TokenBudget, int] | None = None,
) -> Ticket | None:
    """Take every part or none, without waiting.

    Returns a ``Ticket``, or ``None`` if a part is denied (the parts already taken are given
    back first).
    """
    parts = _parts(guards, tokens)
    held = _Held()
    try:
        if await _attempt(parts, held) is None:
            return held.ticket()
    except BaseException:
        await held.give_back()
        raise
    await held.give_back()
    return None


def take_now_sync(
    guards: Mapping[BudgetGuard, int] | None, tokens: Mapping[TokenBudget, int] | None
) -> Ticket:
    """Take every part or none without waiting, with the blocking methods.

    Nothing blocks, so any thread may call it. ``AdmissionTimeoutError`` names a denied part.
    """
    parts = _parts(guards, tokens)
    held = _Held()
    try:
        blocker = _attempt_sync(parts, held)
        if blocker is None:
            return held.ticket()
    except BaseException:
        held.give_back_sync()
        raise
    held.give_back_sync()
    raise AdmissionTimeoutError(0.0, blocker.budget, blocker.amount)


def admit_blocking(
    *,
    guards: Mapping[BudgetGuard, int] | None = None,
    tokens: Mapping[TokenBudget, int] | None = None,
    timeout: float | None = None,
) -> Ticket:
    """Take every part or none, waiting on this thread: ``admit`` for threads.

    Returns the ``Ticket`` (a context manager that closes it on exit). ``RuntimeError`` on a
    thread that runs an event loop.
    """
    parts = _parts(guards, tokens)
    timeout = check_timeout(timeout)
    _check_fits(parts)
    _refuse_on_a_loop("admit_blocking")
    deadline = None if timeout is None else time.monotonic() + timeout
    held = _Held()
    woken: threading.Event | None = None
    watches: list[_native.Watch] = []
    backoff = _FIRST_BACKOFF
    try:
        while True:
            if woken is not None:
                woken.clear()  # before looking: a change from here on still wakes the wait
            blocker = _first_unfit(parts)
            if blocker is None:
                blocker = _attempt_sync(parts, held)
                if blocker is None:
                    return held.ticket()
                held.give_back_sync()
            left = _left(deadline, time.monotonic(), timeout, blocker)
            if woken is None:
                woken = threading.Event()
                watches = _watch_all(parts, woken.set)
                continue
            delay, backoff = _sleep_for(blocker, backoff, left)
            # A thread waits at most TIMEOUT_MAX at a time (a longer one is an OverflowError):
            # a huge timeout, or a very slow refill, just loops here once in a while.
            woken.wait(None if delay is None else min(delay, threading.TIMEOUT_MAX))
    except BaseException:
        held.give_back_sync()
        raise
    finally:
        for watch in watches:
            watch.close()
