"""Waiting and permits (spec section 7, on the budgets of sections 4 and 5).

Both native budgets, async and blocking: `AtomicBudget.reserve` / `reserve_blocking` (a `Permit`)
and `AtomicTokenBudget.reserve_tokens` / `reserve_tokens_blocking` (an armed `TokenReservation`).
Covered: an uncontended request is granted at once; permits release once and on every exit of a
`with` / `async with` block, and token requests refund an armed reservation on exit; waiters are
woken by every source (release, refill, refund, record_usage) from any thread or event loop;
first come, first served, so a large waiter is not starved and `try_*` never jumps the queue;
timeouts raise the builtin `TimeoutError` leaving nothing behind; cancellation storms and
cancellations racing a grant lose no unit; waiters on two event loops and on plain threads share
one budget exactly; a cost above capacity, a blocking call on an event loop and bad arguments
raise at once. Rate refill and `ManualClock` are tested elsewhere.

Every wait in this file is bounded (DEADLINE), so a bug fails instead of hanging; setup is
synchronised on `budget.waiters`, never on sleeps. COSTBOUND_LONG=1 runs ten times the storm,
the cancellation races and the rounds of the threads-and-loops test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, Permit, TokenReservation

SCALE = 10 if os.environ.get("COSTBOUND_LONG") else 1
DEADLINE = 30.0  # bound on every wait of the tests themselves: a bug fails, it does not hang
EXPIRES = 0.05  # a timeout that is meant to expire
HEAD_TIMEOUT = 0.5  # a head of the queue that times out while a second waiter queues behind it

Budget = Any  # AtomicBudget | AtomicTokenBudget
Box = list  # a one-element list holding a grant, so that popping it drops the last reference


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate` on the event loop until it holds (setup synchronisation, bounded)."""
    deadline = time.monotonic() + DEADLINE
    spins = 0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {DEADLINE} s: {what}")
        spins += 1
        await asyncio.sleep(0 if spins < 100 else 0.001)


def until_sync(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate` on a thread until it holds (setup synchronisation, bounded)."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {DEADLINE} s: {what}")
        time.sleep(0.0005)


def in_thread(fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    """Run `fn` on a new daemon thread; its result or exception lands in the returned future."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed over to the test
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


async def outcome(future: Awaitable[Any] | concurrent.futures.Future[Any]) -> Any:
    """Await a task, an asyncio future or a thread's future, bounded by DEADLINE.

    Running out of DEADLINE is an AssertionError, never a TimeoutError that a test expecting
    the library's TimeoutError would take for the real thing.
    """
    if isinstance(future, concurrent.futures.Future):
        future = asyncio.wrap_future(future)
    future = asyncio.ensure_future(future)
    done, _ = await asyncio.wait([future], timeout=DEADLINE)
    if not done:
        future.cancel()
        raise AssertionError(f"not done within {DEADLINE} s")
    return future.result()


async def boxed(request: Awaitable[Any]) -> Box:
    return [await request]


async def awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@dataclass(frozen=True)
class Kind:
    """One native budget kind, seen through the few operations the tests share."""

    name: str
    make: Callable[[int], Budget]
    free_ways: tuple[str, ...]

    @property
    def units(self) -> bool:
        return self.name == "units"

    def request(self, budget: Budget, cost: int, timeout: float | None = None) -> Any:
        if self.units:
            return budget.reserve(cost, timeout=timeout)
        return budget.reserve_tokens(cost, timeout=timeout)

    def blocking(self, budget: Budget, cost: int, timeout: float | None = DEADLINE) -> Any:
        if self.units:
            return budget.reserve_blocking(cost, timeout=timeout)
        return budget.reserve_tokens_blocking(cost, timeout=timeout)

    def start(
        self, mode: str, budget: Budget, cost: int, timeout: float | None = None
    ) -> asyncio.Future[Box]:
        """A waiter for `cost`, as a task on this loop or as a blocking call on a new thread."""
        if mode == "async":
            return asyncio.ensure_future(boxed(self.request(budget, cost, timeout)))
        limit = DEADLINE if timeout is None else timeout
        return asyncio.wrap_future(in_thread(lambda: [self.blocking(budget, cost, limit)]))

    def take(self, budget: Budget, cost: int) -> Box:
        """Take `cost` without waiting; it must be granted."""
        if self.units:
            assert budget.try_reserve_sync(cost)
            return [cost]
        reservation = budget.try_reserve_tokens_sync(cost)
        assert reservation is not None
        return [reservation]

    def try_sync(self, budget: Budget, cost: int) -> Box | None:
        if self.units:
            return [cost] if budget.try_reserve_sync(cost) else None
        reservation = budget.try_reserve_tokens_sync(cost)
        return None if reservation is None else [reservation]

    async def try_async(self, budget: Budget, cost: int) -> Box | None:
        if self.units:
            return [cost] if await budget.try_reserve(cost) else None
        reservation = await budget.try_reserve_tokens(cost)
        return None if reservation is None else [reservation]

    @staticmethod
    def size(grant: Any) -> int:
        if isinstance(grant, int):
            return grant
        if isinstance(grant, Permit):
            return grant.cost
        return grant.estimate

    def free(self, budget: Budget, box: Box, way: str | None = None) -> int:
        """Give back the grant in `box` (emptying it) in one of `free_ways`; returns its size."""
        grant = box.pop()
        size = self.size(grant)
        way = way or self.free_ways[0]
        if isinstance(grant, int) or way == "release_sync":
            budget.release_sync(size)
        elif way == "permit":
            grant.release()
        elif way == "refund":
            refund = grant.disarm()
            assert refund is not None
            refund(size)
        elif way == "record":
            budget.record_usage_sync(grant, 0, 0)  # actual 0 < estimate: all of it comes back
        else:
            assert way == "drop"
            del grant  # the last reference: the armed reservation refunds its estimate
        return size


UNITS = Kind("units", AtomicBudget, ("permit", "release_sync"))
TOKENS = Kind("tokens", AtomicTokenBudget, ("refund", "drop", "record"))
KINDS = [pytest.param(UNITS, id="units"), pytest.param(TOKENS, id="tokens")]
MODES = ["async", "blocking"]


# ---------------------------------------------------------------------------------------------
# Uncontended requests and permits
# ---------------------------------------------------------------------------------------------


def step_once(awaitable: Awaitable[Any]) -> Any:
    """Run `await awaitable` for one step; it must complete without suspending."""
    coroutine = awaited(awaitable)
    with pytest.raises(StopIteration) as stop:
        coroutine.send(None)
    return stop.value.value


@pytest.mark.asyncio
async def test_uncontended_reserve_is_granted_at_once() -> None:
    b = AtomicBudget(10)
    permit = b.reserve(4)
    assert isinstance(permit, Permit)
    assert (permit.cost, permit.granted, permit.released) == (4, False, False)
    assert b.available == 10  # nothing is taken before the permit is awaited
    assert step_once(permit) is permit
    assert (permit.granted, permit.released, b.available, b.waiters) == (True, False, 6, 0)
    assert await b.reserve(6, timeout=0) is not None
    assert b.available == 0


@pytest.mark.asyncio
async def test_uncontended_reserve_tokens_is_granted_at_once() -> None:
    tb = AtomicTokenBudget(100)
    request = tb.reserve_tokens(40)
    assert tb.available == 100
    reservation = step_once(request)
    assert isinstance(reservation, TokenReservation)
    assert (reservation.estimate, reservation.armed) == (40, True)
    assert (tb.available, tb.waiters, tb.consumed) == (60, 0, 0)
    await tb.record_usage(reservation, 10, 5)
    assert (tb.available, tb.consumed) == (85, 15)


def test_uncontended_blocking_requests_are_granted_at_once() -> None:
    b = AtomicBudget(10)
    permit = b.reserve_blocking(7, timeout=0)
    assert (permit.cost, permit.granted, permit.released, b.available) == (7, True, False, 3)
    tb = AtomicTokenBudget(100)
    reservation = tb.reserve_tokens_blocking(100, timeout=0)
    assert isinstance(reservation, TokenReservation)
    assert (reservation.estimate, reservation.armed, tb.available) == (100, True, 0)


@pytest.mark.asyncio
async def test_permit_releases_once_then_does_nothing() -> None:
    b = AtomicBudget(10)
    permit = await b.reserve(4)
    permit.release()
    assert (permit.released, b.available) == (True, 10)
    assert b.try_reserve_sync(10)
    permit.release()  # a second release gives nothing back: the 10 units belong to someone else
    permit.release()
    assert (permit.released, b.available) == (True, 0)


def test_blocking_permit_releases_once_then_does_nothing() -> None:
    b = AtomicBudget(10)
    permit = b.reserve_blocking(4, timeout=DEADLINE)
    permit.release()
    assert b.try_reserve_sync(10)
    permit.release()
    assert (permit.released, b.available) == (True, 0)


@pytest.mark.asyncio
async def test_awaiting_a_granted_permit_again_returns_it_and_takes_nothing() -> None:
    b = AtomicBudget(10)
    permit = b.reserve(4)
    assert await permit is permit
    assert await permit is permit
    assert step_once(permit) is permit
    assert b.available == 6
    permit.release()
    assert b.available == 10


@pytest.mark.asyncio
async def test_awaiting_a_granted_token_request_again_takes_nothing() -> None:
    tb = AtomicTokenBudget(100)
    request = tb.reserve_tokens(30)
    reservation = await request
    assert await request is reservation
    assert tb.available == 70


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_second_await_of_a_waiting_request_is_refused(kind: Kind) -> None:
    b = kind.make(5)
    holder = kind.take(b, 5)
    request = kind.request(b, 3)
    first = asyncio.ensure_future(boxed(request))
    await until(lambda: b.waiters == 1, "the first await is queued")
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(awaited(request), DEADLINE)
    assert (b.waiters, b.available, first.done()) == (1, 0, False)
    kind.free(b, holder)
    box = await outcome(first)
    assert (kind.size(box[0]), b.available, b.waiters) == (3, 2, 0)
    kind.free(b, box)
    assert b.available == 5


# --- `async with` / `with` on permits --------------------------------------------------------


@pytest.mark.asyncio
async def test_async_with_permit_releases_on_normal_exit() -> None:
    b = AtomicBudget(10)
    async with b.reserve(4, timeout=DEADLINE) as permit:
        assert isinstance(permit, Permit)
        assert (permit.granted, permit.released, b.available) == (True, False, 6)
    assert (permit.released, b.available) == (True, 10)


@pytest.mark.asyncio
async def test_async_with_permit_releases_on_exception() -> None:
    b = AtomicBudget(10)
    seen = []

    async def fail() -> None:
        async with b.reserve(4, timeout=DEADLINE):
            seen.append(b.available)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await fail()
    assert (seen, b.available) == ([6], 10)


@pytest.mark.asyncio
async def test_async_with_permit_releases_on_cancellation() -> None:
    b = AtomicBudget(10)
    inside = asyncio.Event()

    async def hold() -> None:
        async with b.reserve(4, timeout=DEADLINE):
            inside.set()
            await asyncio.sleep(DEADLINE)

    task = asyncio.ensure_future(hold())
    await asyncio.wait_for(inside.wait(), DEADLINE)
    assert b.available == 6
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
async def test_async_with_permit_released_inside_is_not_released_again() -> None:
    b = AtomicBudget(10)
    async with b.reserve(4, timeout=DEADLINE) as permit:
        permit.release()
        assert b.try_reserve_sync(10)
    assert b.available == 0  # the exit did not give the 4 units back a second time


@pytest.mark.asyncio
async def test_async_with_a_waiting_permit_enters_once_granted() -> None:
    b = AtomicBudget(10)
    assert b.try_reserve_sync(8)
    entered = []

    async def use() -> None:
        async with b.reserve(5, timeout=DEADLINE) as permit:
            entered.append(b.available)
            assert permit.granted

    task = asyncio.ensure_future(use())
    await until(lambda: b.waiters == 1, "the permit waits")
    assert entered == []
    b.release_sync(8)
    await outcome(task)
    assert (entered, b.available, b.waiters) == ([5], 10, 0)


def test_with_blocking_permit_releases_on_exit_and_on_exception() -> None:
    b = AtomicBudget(10)
    with b.reserve_blocking(4, timeout=DEADLINE) as permit:
        assert (permit.granted, b.available) == (True, 6)
    assert (permit.released, b.available) == (True, 10)
    seen = []

    def fail() -> None:
        with b.reserve_blocking(10, timeout=DEADLINE):
            seen.append(b.available)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail()
    assert (seen, b.available) == ([0], 10)
    with b.reserve_blocking(4, timeout=DEADLINE) as permit:
        permit.release()
        assert b.try_reserve_sync(10)
    assert b.available == 0


# --- `async with` / `with` on token requests -------------------------------------------------


@pytest.mark.asyncio
async def test_async_with_token_request_refunds_an_armed_reservation() -> None:
    tb = AtomicTokenBudget(1_000)
    async with tb.reserve_tokens(800, timeout=DEADLINE) as reservation:
        assert isinstance(reservation, TokenReservation)
        assert (reservation.estimate, reservation.armed, tb.available) == (800, True, 200)
    assert (reservation.armed, tb.available, tb.consumed) == (False, 1_000, 0)
    with pytest.raises(KeyError):
        async with tb.reserve_tokens(800, timeout=DEADLINE) as reservation:
            raise KeyError("boom")
    assert (reservation.armed, tb.available) == (False, 1_000)


@pytest.mark.asyncio
async def test_async_with_token_request_keeps_a_recorded_reservation() -> None:
    tb = AtomicTokenBudget(1_000)
    async with tb.reserve_tokens(800, timeout=DEADLINE) as reservation:
        await tb.record_usage(reservation, 120, 80)
        assert tb.available == 800
    assert (tb.available, tb.consumed) == (800, 200)  # exit refunded nothing more
    async with tb.reserve_tokens(300, timeout=DEADLINE) as reservation:
        refund = reservation.disarm()  # the user took the refund: exit must not refund
    assert tb.available == 500
    assert refund is not None
    refund(300)
    assert tb.available == 800


@pytest.mark.asyncio
async def test_async_with_token_request_refunds_on_cancellation() -> None:
    tb = AtomicTokenBudget(1_000)
    inside = asyncio.Event()
    kept = []  # a reference kept here: the exit refunds it, not a drop

    async def hold() -> None:
        async with tb.reserve_tokens(600, timeout=DEADLINE) as reservation:
            kept.append(reservation)
            inside.set()
            await asyncio.sleep(DEADLINE)

    task = asyncio.ensure_future(hold())
    await asyncio.wait_for(inside.wait(), DEADLINE)
    assert tb.available == 400
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)
    assert (tb.available, tb.waiters, tb.consumed, kept[0].armed) == (1_000, 0, 0, False)


def test_with_blocking_token_reservation_refunds_if_armed() -> None:
    tb = AtomicTokenBudget(1_000)
    with tb.reserve_tokens_blocking(300, timeout=DEADLINE) as reservation:
        assert (reservation.armed, tb.available) == (True, 700)
    assert (reservation.armed, tb.available) == (False, 1_000)
    with pytest.raises(KeyError), tb.reserve_tokens_blocking(300, timeout=DEADLINE) as reservation:
        raise KeyError("boom")
    assert (reservation.armed, tb.available) == (False, 1_000)
    with tb.reserve_tokens_blocking(300, timeout=DEADLINE) as reservation:
        tb.record_usage_sync(reservation, 50, 50)
    assert (tb.available, tb.consumed) == (900, 100)


# ---------------------------------------------------------------------------------------------
# Wake-up sources
# ---------------------------------------------------------------------------------------------

CAPACITY = 10
WANTED = 4
ACTUAL = 5  # record_usage(holder, 3, 2): actual 5 < estimate 10, so 5 tokens come back


async def on_other_loop(make_coroutine: Callable[[], Any]) -> None:
    """Run a coroutine on a fresh event loop in another thread."""
    await asyncio.to_thread(lambda: asyncio.run(make_coroutine()))


def drop(held: list[Any]) -> None:
    held.pop()  # the last reference of an armed reservation: dropping it refunds


async def refund(held: list[Any]) -> None:
    refund_ = held[0].disarm()
    assert refund_ is not None
    refund_(held[0].estimate)


# name -> (what frees the holder, given (budget, held)), available after the waiter's grant
UNIT_SOURCES: dict[str, tuple[Callable[[Any, list[Any]], Awaitable[None]], int]] = {
    "await release": (lambda b, held: b.release(CAPACITY), CAPACITY - WANTED),
    "release_sync": (lambda b, held: awaited_none(b.release_sync(CAPACITY)), CAPACITY - WANTED),
    "permit.release": (lambda b, held: awaited_none(held[0].release()), CAPACITY - WANTED),
    "refill": (lambda b, held: awaited_none(b.refill()), CAPACITY - WANTED),
    "release_sync on another thread": (
        lambda b, held: asyncio.to_thread(b.release_sync, CAPACITY),
        CAPACITY - WANTED,
    ),
    "permit.release on another thread": (
        lambda b, held: asyncio.to_thread(held[0].release),
        CAPACITY - WANTED,
    ),
    "release on another event loop": (
        lambda b, held: on_other_loop(lambda: awaited(b.release(CAPACITY))),
        CAPACITY - WANTED,
    ),
}
TOKEN_SOURCES: dict[str, tuple[Callable[[Any, list[Any]], Awaitable[None]], int]] = {
    "drop an armed reservation": (lambda tb, held: awaited_none(drop(held)), CAPACITY - WANTED),
    "disarm then refund": (lambda tb, held: refund(held), CAPACITY - WANTED),
    "await record_usage": (
        lambda tb, held: tb.record_usage(held[0], 3, 2),
        CAPACITY - ACTUAL - WANTED,
    ),
    "record_usage_sync": (
        lambda tb, held: awaited_none(tb.record_usage_sync(held[0], 3, 2)),
        CAPACITY - ACTUAL - WANTED,
    ),
    "refill": (lambda tb, held: awaited_none(tb.refill()), CAPACITY - WANTED),
    "drop on another thread": (lambda tb, held: asyncio.to_thread(drop, held), CAPACITY - WANTED),
    "refund on another thread": (
        lambda tb, held: asyncio.to_thread(lambda: asyncio.run(refund(held))),
        CAPACITY - WANTED,
    ),
    "record_usage_sync on another thread": (
        lambda tb, held: asyncio.to_thread(tb.record_usage_sync, held[0], 3, 2),
        CAPACITY - ACTUAL - WANTED,
    ),
    "record_usage on another event loop": (
        lambda tb, held: on_other_loop(lambda: awaited(tb.record_usage(held[0], 3, 2))),
        CAPACITY - ACTUAL - WANTED,
    ),
}


async def awaited_none(_: None) -> None:
    """An awaitable for a source that acts when called."""


SOURCE_CASES = [
    pytest.param(kind, name, id=f"{kind.name}-{name.replace(' ', '-')}")
    for kind, sources in ((UNITS, UNIT_SOURCES), (TOKENS, TOKEN_SOURCES))
    for name in sources
]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kind", "source"), SOURCE_CASES)
async def test_a_waiter_is_woken_by(kind: Kind, source: str, mode: str) -> None:
    wake, expected = (UNIT_SOURCES if kind.units else TOKEN_SOURCES)[source]
    b = kind.make(CAPACITY)
    # The holder is itself a waited-for grant: a Permit or an armed reservation, alone in `held`.
    held = (await boxed(kind.request(b, CAPACITY, timeout=0))) if mode == "async" else []
    if not held:
        held = await asyncio.to_thread(lambda: [kind.blocking(b, CAPACITY, 0)])
    waiter = kind.start(mode, b, WANTED)
    await until(lambda: b.waiters == 1, "the waiter is queued")
    assert not waiter.done()
    await wake(b, held)
    box = await outcome(waiter)
    assert kind.size(box[0]) == WANTED
    assert (b.available, b.waiters) == (expected, 0)
    # Give everything back: the accounting ends exact.
    kind.free(b, box)
    if held and kind.units:
        held.pop().release()  # a no-op if the source already released it; capped after refill
    elif held:
        kind.free(b, held, "refund" if held[0].armed else "drop")
    consumed = 0 if kind.units else b.consumed
    assert consumed == (ACTUAL if "record" in source else 0)
    assert (b.available, b.waiters) == (CAPACITY - consumed, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_token_waiters_wait_while_in_debt_and_debt_is_paid_first(mode: str) -> None:
    tb = AtomicTokenBudget(100)
    held = [tb.try_reserve_tokens_sync(30)]
    overrun = tb.try_reserve_tokens_sync(10)
    assert overrun is not None
    tb.record_usage_sync(overrun, 120, 0)  # 110 over the estimate, 60 available: 50 of debt
    assert (tb.available, tb.debt) == (0, 50)
    zero = TOKENS.start(mode, tb, 0)
    await until(lambda: tb.waiters == 1, "the estimate of 0 waits: in debt nothing fits")
    ten = TOKENS.start(mode, tb, 10)
    await until(lambda: tb.waiters == 2, "both are queued")
    drop(held)  # refunds 30, which pays debt only: nothing becomes available
    await until(lambda: tb.debt == 20, "the refund paid debt")
    assert (tb.available, tb.waiters, zero.done(), ten.done()) == (0, 2, False, False)
    tb.refill()  # pays the last 20 of debt, then 80 are available: both are served
    boxes = [await outcome(zero), await outcome(ten)]
    assert [TOKENS.size(box[0]) for box in boxes] == [0, 10]
    assert (tb.available, tb.debt, tb.waiters, tb.consumed) == (70, 0, 0, 120)
    for box in boxes:
        TOKENS.free(tb, box)
    assert tb.available == 80


# ---------------------------------------------------------------------------------------------
# First come, first served
# ---------------------------------------------------------------------------------------------


@dataclass
class Queued:
    """A waiter of a FIFO model: its cost and the future that gives its grant (a box)."""

    cost: int
    future: asyncio.Future[Box]


async def serve_in_order(
    kind: Kind,
    budget: Budget,
    waiting: list[Queued],
    to_free: list[Box],
    rng: random.Random,
) -> int:
    """Give back grants one at a time and check the waiters are served exactly as FIFO says.

    `waiting` are the live waiters in arrival order, `to_free` the grants held now. After each
    give-back the model grants the head of the queue while it fits; the test waits until exactly
    those waiters are served and checks `available` and `waiters`. Grants are given back oldest
    first, each in a random one of `kind.free_ways`. Returns the number of steps.
    """
    queued = deque(waiting)
    held = deque(to_free)
    available = budget.available
    steps = 0
    while queued or held:
        assert held, f"{len(queued)} waiters left but nothing to give back: the model is stuck"
        way = rng.choice(kind.free_ways)
        available = min(budget.capacity, available + kind.free(budget, held.popleft(), way))
        steps += 1
        served = []
        while queued and queued[0].cost <= available:
            served.append(queued.popleft())
            available -= served[-1].cost
        await until(
            lambda served=served: (
                all(w.future.done() for w in served) and budget.waiters == len(queued)
            ),
            f"step {steps}: {len(served)} waiters served, {len(queued)} left",
        )
        assert budget.available == available, f"step {steps}"
        assert not any(w.future.done() for w in queued), f"step {steps}: served out of order"
        for w in served:
            box = w.future.result()
            assert kind.size(box[0]) == w.cost
            held.append(box)
    assert (budget.available, budget.waiters) == (budget.capacity, 0)
    return steps


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_waiters_are_served_in_arrival_order_async_and_blocking_mixed(kind: Kind) -> None:
    b = kind.make(10)
    holder = [kind.take(b, 1) for _ in range(10)]
    costs = [3, 1, 4, 1, 5, 9, 0, 2, 6, 5, 3, 10, 0, 1, 2, 8]
    waiting = []
    for index, cost in enumerate(costs):
        mode = MODES[index % 2]
        waiting.append(Queued(cost, kind.start(mode, b, cost)))
        await until(lambda: b.waiters == len(waiting), f"waiter {index} is queued")
    await serve_in_order(kind, b, waiting, holder, random.Random(7))


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_large_head_blocks_smaller_waiters_behind_it(kind: Kind) -> None:
    b = kind.make(10)
    holder = kind.take(b, 10)
    large = kind.start("async", b, 8)
    await until(lambda: b.waiters == 1, "the large waiter is queued")
    small = kind.start("blocking", b, 1)
    await until(lambda: b.waiters == 2, "the small waiter is queued")
    kind.free(b, holder)
    box = await outcome(large)
    assert kind.size(box[0]) == 8
    other = await outcome(small)
    assert (b.available, b.waiters) == (1, 0)
    holder = kind.take(b, 1)
    # Now only 0 are left: a small waiter behind a large one waits although 1 unit would free up.
    large = kind.start("blocking", b, 9)
    await until(lambda: b.waiters == 1, "the second large waiter is queued")
    small = kind.start("async", b, 1)
    await until(lambda: b.waiters == 2, "the second small waiter is queued")
    kind.free(b, other)  # 1 available: it would fit the small waiter, but the large one is first
    await until(lambda: b.available == 1, "the unit is back")
    assert (b.waiters, large.done(), small.done()) == (2, False, False)
    kind.free(b, box)  # 9 available: the large waiter takes them, the small one still waits
    box = await outcome(large)
    await until(lambda: b.waiters == 1, "the large waiter left the queue")
    assert (b.available, small.done()) == (0, False)
    kind.free(b, holder)
    other = await outcome(small)
    kind.free(b, box)
    kind.free(b, other)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
async def test_try_calls_do_not_jump_a_queue_of_waiters(kind: Kind, mode: str) -> None:
    b = kind.make(10)
    holder = kind.take(b, 8)
    waiter = kind.start(mode, b, 5)
    await until(lambda: b.waiters == 1, "the waiter is queued")
    # 2 units are available, but a waiter is queued: every non-waiting call is denied.
    assert kind.try_sync(b, 1) is None
    assert await kind.try_async(b, 1) is None
    assert kind.try_sync(b, 0) is None
    for other_mode in MODES:
        with pytest.raises(TimeoutError):
            await outcome(kind.start(other_mode, b, 1, timeout=0))
    assert (b.available, b.waiters, waiter.done()) == (2, 1, False)
    kind.free(b, holder)
    box = await outcome(waiter)
    assert (b.available, b.waiters) == (5, 0)
    # No queue any more: the same calls are granted.
    grants = [kind.try_sync(b, 1), await kind.try_async(b, 1), kind.try_sync(b, 0)]
    assert all(grant is not None for grant in grants)
    assert b.available == 3
    for grant in [*grants, box]:
        assert grant is not None
        kind.free(b, grant)
    assert b.available == 10


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_large_waiter_is_not_starved_by_a_stream_of_small_tasks(kind: Kind) -> None:
    """Budget 10; six tasks keep taking 1 and giving it back; one task waits for all 10.

    Without first come, first served the small tasks always hold some units and the large one
    never fits. Each task logs its request right before awaiting it, in the same step as the
    request queues, so the log order is the queue order.
    """
    b = kind.make(10)
    log: list[tuple[str, object]] = []
    grants = 0
    stop = False

    async def small(name: int) -> None:
        nonlocal grants
        while not stop:
            log.append(("ask", name))
            box = await boxed(kind.request(b, 1, timeout=DEADLINE))
            log.append(("got", name))
            grants += 1
            await asyncio.sleep(0)
            kind.free(b, box, "permit" if kind.units else "drop")
            # Ask again at once: without a queue the small tasks would always hold some units.

    async def large() -> None:
        log.append(("ask", "large"))
        box = await boxed(kind.request(b, 10, timeout=DEADLINE))
        log.append(("got", "large"))
        assert b.available == 0
        for _ in range(20):  # hold for a while: the small tasks must keep waiting
            await asyncio.sleep(0)
        log.append(("free", "large"))
        kind.free(b, box)

    smalls = [asyncio.ensure_future(small(name)) for name in range(6)]
    await until(lambda: grants >= 300, "the stream of small tasks is flowing")
    await outcome(asyncio.ensure_future(large()))
    served_after = grants
    await until(lambda: grants >= served_after + 300, "the stream flows again")
    stop = True
    await outcome(asyncio.gather(*smalls))
    assert (b.available, b.waiters) == (10, 0)

    ask_large, got_large = log.index(("ask", "large")), log.index(("got", "large"))
    free_large = log.index(("free", "large"))
    assert not any(event == "got" for event, _ in log[got_large + 1 : free_large])
    pending_ask: dict[object, int] = {}
    queued_behind = 0
    for position, (event, name) in enumerate(log):
        if event == "ask":
            pending_ask[name] = position
        elif event == "got" and name != "large":
            asked = pending_ask.pop(name)
            if asked > ask_large:
                # Queued after the large waiter: served only once the large one was.
                assert position > got_large, f"small task {name} jumped the large waiter"
                queued_behind += asked < got_large
    assert queued_behind >= 1, "no small request was ever queued behind the large one"


@pytest.mark.asyncio
@pytest.mark.parametrize("large_mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_large_waiter_is_not_starved_by_small_threads_and_tasks(
    kind: Kind, large_mode: str
) -> None:
    """Small requests from three threads and three tasks cycle; a large waiter gets served."""
    b = kind.make(10)
    stop = threading.Event()
    counts = [0] * 6

    def small_thread(index: int) -> None:
        while not stop.is_set():
            box = [kind.blocking(b, 1, DEADLINE)]
            counts[index] += 1
            kind.free(b, box, "release_sync" if kind.units else "drop")

    async def small_task(index: int) -> None:
        while not stop.is_set():
            box = await boxed(kind.request(b, 1, timeout=DEADLINE))
            counts[index] += 1
            await asyncio.sleep(0)
            kind.free(b, box, "permit" if kind.units else "record")

    threads = [in_thread(lambda index=index: small_thread(index)) for index in range(3)]
    tasks = [asyncio.ensure_future(small_task(index)) for index in range(3, 6)]
    await until(lambda: min(counts) >= 20, "every small worker is flowing")
    box = await outcome(kind.start(large_mode, b, 10))
    assert kind.size(box[0]) == 10
    assert b.available == 0
    kind.free(b, box)
    before = sum(counts)
    await until(lambda: sum(counts) >= before + 100, "the small workers flow again")
    stop.set()
    for future in [*threads, *tasks]:
        await outcome(future)
    assert (b.available, b.waiters) == (10, 0)
    if not kind.units:
        assert b.consumed == 0


# ---------------------------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_raises_the_builtin_timeout_error_and_takes_nothing(
    kind: Kind, mode: str
) -> None:
    b = kind.make(10)
    holder = kind.take(b, 7)
    with pytest.raises(TimeoutError) as raised:
        await outcome(kind.start(mode, b, 5, timeout=EXPIRES))
    assert raised.type is TimeoutError  # the builtin (asyncio.TimeoutError is the same class)
    # 3 were available throughout: none of them were taken, and no waiter is left behind.
    assert (b.available, b.waiters) == (3, 0)
    extra = kind.try_sync(b, 3)
    assert extra is not None
    kind.free(b, extra)
    kind.free(b, holder)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_async_with_request_times_out_without_entering(kind: Kind) -> None:
    b = kind.make(10)
    holder = kind.take(b, 7)
    entered = False

    async def use() -> None:
        nonlocal entered
        async with kind.request(b, 5, timeout=EXPIRES):
            entered = True

    with pytest.raises(TimeoutError):
        await outcome(use())
    assert (entered, b.available, b.waiters) == (False, 3, 0)
    kind.free(b, holder)
    assert b.available == 10


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_zero_tries_once(kind: Kind, mode: str) -> None:
    b = kind.make(10)
    box = await outcome(kind.start(mode, b, 6, timeout=0))  # fits: granted
    assert (kind.size(box[0]), b.available) == (6, 4)
    with pytest.raises(TimeoutError):  # does not fit: refused at once, nothing taken
        await outcome(kind.start(mode, b, 5, timeout=0))
    assert (b.available, b.waiters) == (4, 0)
    rest = await outcome(kind.start(mode, b, 4, timeout=0))
    assert b.available == 0
    kind.free(b, box)
    kind.free(b, rest)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
async def test_next_waiter_is_served_when_the_head_times_out(kind: Kind, mode: str) -> None:
    """The head waits for 8 with a timeout, a second waits for 2 behind it; 2 are available.

    FIFO holds the second back while the head waits; the head's timeout must wake it.
    """
    b = kind.make(10)
    holder = kind.take(b, 8)
    head = kind.start(mode, b, 8, timeout=HEAD_TIMEOUT)
    if mode == "blocking":
        await until(lambda: b.waiters == 1 or head.done(), "the head is queued")
    second = kind.start(mode, b, 2)
    await until(lambda: b.waiters == 2 or head.done(), "both are queued")
    assert not head.done(), "the head timed out before the second waiter queued: a slow machine"
    assert (b.available, second.done()) == (2, False)
    with pytest.raises(TimeoutError):
        await outcome(head)
    box = await outcome(second)
    assert kind.size(box[0]) == 2
    assert (b.available, b.waiters) == (0, 0)
    kind.free(b, box)
    kind.free(b, holder)
    assert b.available == 10


# ---------------------------------------------------------------------------------------------
# Cancellation
# ---------------------------------------------------------------------------------------------

STORM_TASKS = 1_000 * SCALE
STORM_CAPACITY = 64
STORM_COSTS = [1, 1, 1, 2, 2, 3, 5, 8, 13, 21, 34, 64]
STORM_SEED = 20_240_607


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_cancellation_storm_loses_nothing(kind: Kind) -> None:
    """1,000 tasks wait on one budget; a random half is cancelled; the rest is served exactly."""
    rng = random.Random(STORM_SEED)
    b = kind.make(STORM_CAPACITY)
    holder = [kind.take(b, 1) for _ in range(STORM_CAPACITY)]
    requests = [kind.request(b, rng.choice(STORM_COSTS)) for _ in range(STORM_TASKS)]
    costs = [request.cost if kind.units else request.estimate for request in requests]
    tasks = [asyncio.ensure_future(boxed(request)) for request in requests]
    await until(lambda: b.waiters == STORM_TASKS, "every task is queued")

    cancelled = set(rng.sample(range(STORM_TASKS), STORM_TASKS // 2))
    for index in rng.sample(sorted(cancelled), len(cancelled)):
        tasks[index].cancel()
    done, _ = await asyncio.wait([tasks[index] for index in cancelled], timeout=DEADLINE)
    assert len(done) == len(cancelled)
    assert all(tasks[index].cancelled() for index in cancelled)
    assert (b.waiters, b.available) == (STORM_TASKS - len(cancelled), 0)
    if kind.units:  # a cancelled permit holds nothing
        assert not any(requests[index].granted for index in cancelled)
    del requests  # a token request keeps its reservation: only the boxes may hold one

    survivors = [
        Queued(costs[index], tasks[index]) for index in range(STORM_TASKS) if index not in cancelled
    ]
    steps = await serve_in_order(kind, b, survivors, holder, rng)
    assert steps == STORM_CAPACITY + len(survivors)
    assert (b.available, b.waiters) == (STORM_CAPACITY, 0)
    if not kind.units:
        assert (b.consumed, b.debt) == (0, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_cancelling_the_head_wakes_the_next_waiter(kind: Kind) -> None:
    b = kind.make(10)
    holder = kind.take(b, 8)
    head = kind.start("async", b, 8)
    second = kind.start("async", b, 2)
    await until(lambda: b.waiters == 2, "both are queued")
    assert not second.done()
    head.cancel()
    box = await outcome(second)  # 2 were available all along: the head no longer blocks them
    with pytest.raises(asyncio.CancelledError):
        await outcome(head)
    assert (kind.size(box[0]), b.available, b.waiters) == (2, 0, 0)
    kind.free(b, box)
    kind.free(b, holder)
    assert b.available == 10


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_after_the_granting_release_gives_the_units_back(kind: Kind) -> None:
    """The release grants the head (units taken for it), the task is cancelled before it resumes.

    The grant must come back: `available` as if it had never been made, the next waiter served.
    """
    b = kind.make(10)
    holder = kind.take(b, 4)
    rest = kind.take(b, 6)
    first = kind.start("async", b, 6)
    second = kind.start("async", b, 6)
    await until(lambda: b.waiters == 2, "both are queued")
    kind.free(b, rest)  # grants the head at once; the head's task has not run yet
    assert (b.available, b.waiters, first.done()) == (0, 1, False)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome(first)
    box = await outcome(second)  # served with the 6 units the cancelled head gave back
    assert (kind.size(box[0]), b.available, b.waiters) == (6, 0, 0)
    kind.free(b, box)
    kind.free(b, holder)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_after_grant_inside_async_with_enters_nothing(kind: Kind) -> None:
    b = kind.make(10)
    holder = kind.take(b, 10)
    entered = False

    async def use() -> None:
        nonlocal entered
        async with kind.request(b, 7, timeout=DEADLINE):
            entered = True

    task = asyncio.ensure_future(use())
    await until(lambda: b.waiters == 1, "queued")
    kind.free(b, holder)
    assert (b.available, b.waiters) == (3, 0)  # granted, not yet resumed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome(task)
    assert (entered, b.available, b.waiters) == (False, 10, 0)


RACE_ROUNDS = 150 * SCALE


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_racing_a_release_from_another_thread(kind: Kind) -> None:
    """Another thread gives back the units and at once asks the loop to cancel the head waiter.

    Whether the cancellation or the grant wins, nothing is lost: a cancelled head has given its
    grant back to the next waiter, a served one holds exactly its cost.
    """
    loop = asyncio.get_running_loop()
    b = kind.make(4)
    outcomes = {"cancelled": 0, "served": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as releaser:
        for round_ in range(RACE_ROUNDS):
            holder = kind.take(b, 4)
            head = kind.start("async", b, 4)
            second = kind.start("async", b, 4)
            await until(lambda: b.waiters == 2, f"round {round_}: both are queued")

            def release_then_cancel(holder: Box = holder, head: asyncio.Future[Box] = head) -> None:
                kind.free(b, holder)
                loop.call_soon_threadsafe(head.cancel)

            await asyncio.wait_for(loop.run_in_executor(releaser, release_then_cancel), DEADLINE)
            await asyncio.wait([head], timeout=DEADLINE)
            if head.cancelled():
                outcomes["cancelled"] += 1
                box = await outcome(second)
            else:
                outcomes["served"] += 1
                box = head.result()
                assert (b.available, b.waiters, second.done()) == (0, 1, False)
                kind.free(b, box)
                box = await outcome(second)
            assert (kind.size(box[0]), b.available, b.waiters) == (4, 0, 0)
            kind.free(b, box)
            assert (b.available, b.waiters) == (4, 0)
    assert sum(outcomes.values()) == RACE_ROUNDS


# ---------------------------------------------------------------------------------------------
# Threads and event loops together
# ---------------------------------------------------------------------------------------------

LOOP_TASKS = 6
LOOP_ROUNDS = 40 * SCALE
BLOCKING_THREADS = 3
BLOCKING_ROUNDS = 80 * SCALE
RELEASERS = 2
SHARED_CAPACITY = 8
SHARED_COSTS = [1, 1, 2, 3, 5, 8]


@pytest.mark.parametrize("kind", KINDS)
def test_two_event_loops_and_blocking_threads_wait_on_one_budget(kind: Kind) -> None:
    """Waiters on two event loops (two threads) and blocking waiters on three more threads share
    one budget; every grant is handed to releaser threads, which give it back. Everyone is
    served, no more than the capacity is ever held, and the accounting ends exact."""
    b = kind.make(SHARED_CAPACITY)
    to_release: queue.Queue[Box | None] = queue.Queue()
    lock = threading.Lock()
    held = 0
    grants = 0
    errors: list[str] = []
    start = threading.Barrier(2 + BLOCKING_THREADS + RELEASERS)

    def granted(box: Box) -> None:
        nonlocal held, grants
        with lock:
            held += kind.size(box[0])
            grants += 1
            if held > SHARED_CAPACITY:
                errors.append(f"{held} units held at once")
        to_release.put(box)

    def releaser(seed: int) -> None:
        nonlocal held
        rng = random.Random(seed)
        start.wait(DEADLINE)
        while (box := to_release.get(timeout=DEADLINE)) is not None:
            with lock:
                held -= kind.size(box[0])  # counted before the units go back
            kind.free(b, box, rng.choice(kind.free_ways))

    def event_loop(seed: int) -> None:
        async def task(rng: random.Random) -> None:
            for _ in range(LOOP_ROUNDS):
                granted(await boxed(kind.request(b, rng.choice(SHARED_COSTS), timeout=DEADLINE)))
                if rng.random() < 0.3:
                    await asyncio.sleep(0)

        async def main() -> None:
            rng = random.Random(seed)
            tasks = [task(random.Random(rng.random())) for _ in range(LOOP_TASKS)]
            await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)

        start.wait(DEADLINE)
        asyncio.run(main())

    def blocking(seed: int) -> None:
        rng = random.Random(seed)
        start.wait(DEADLINE)
        for _ in range(BLOCKING_ROUNDS):
            granted([kind.blocking(b, rng.choice(SHARED_COSTS), DEADLINE)])

    releasers = [in_thread(lambda seed=seed: releaser(seed)) for seed in range(RELEASERS)]
    waiters = [in_thread(lambda seed=seed: event_loop(seed)) for seed in (100, 200)]
    waiters += [in_thread(lambda seed=seed: blocking(seed)) for seed in range(BLOCKING_THREADS)]
    for future in waiters:
        future.result(DEADLINE)
    for _ in releasers:
        to_release.put(None)
    for future in releasers:
        future.result(DEADLINE)

    assert errors == []
    assert grants == 2 * LOOP_TASKS * LOOP_ROUNDS + BLOCKING_THREADS * BLOCKING_ROUNDS
    assert (held, b.available, b.waiters) == (0, SHARED_CAPACITY, 0)
    if not kind.units:
        assert (b.consumed, b.debt) == (0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_blocking_and_async_waiters_wake_each_other_across_threads(kind: Kind) -> None:
    """A blocking waiter is woken by an asyncio task on another thread, and the other way."""
    b = kind.make(5)
    holding = threading.Event()

    async def hold_then_give_back() -> None:
        box = await boxed(kind.request(b, 5, timeout=DEADLINE))
        holding.set()
        await until(lambda: b.waiters == 1, "the blocking waiter is queued")
        kind.free(b, box, kind.free_ways[-1])

    loop_thread = in_thread(lambda: asyncio.run(hold_then_give_back()))
    assert holding.wait(DEADLINE)
    box = [kind.blocking(b, 3, DEADLINE)]  # woken by the task on the other thread's loop
    loop_thread.result(DEADLINE)
    assert (b.available, b.waiters) == (2, 0)

    waiter = in_thread(lambda: asyncio.run(boxed(kind.request(b, 4, timeout=DEADLINE))))
    until_sync(lambda: b.waiters == 1, "the async waiter on the other thread is queued")
    assert not waiter.done()
    kind.free(b, box, kind.free_ways[-1])  # from this plain thread
    other = waiter.result(DEADLINE)
    assert (kind.size(other[0]), b.available, b.waiters) == (4, 1, 0)
    kind.free(b, other)
    assert b.available == 5


# ---------------------------------------------------------------------------------------------
# Errors: raised at once, state unchanged
# ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_cost_above_capacity_raises_value_error_at_once(kind: Kind) -> None:
    b = kind.make(10)
    holder = kind.take(b, 10)  # a request that was accepted would wait: it must not get that far
    with pytest.raises(ValueError, match="capacity"):
        await asyncio.wait_for(awaited(kind.request(b, 11)), 5)
    with pytest.raises(ValueError, match="capacity"):
        await asyncio.wait_for(awaited(kind.request(b, 11, timeout=DEADLINE)), 5)
    with pytest.raises(ValueError, match="capacity"):
        await outcome(in_thread(lambda: kind.blocking(b, 11, 5)))
    with pytest.raises(ValueError, match="capacity"):
        await outcome(in_thread(lambda: kind.blocking(b, 11, None)))
    assert (b.available, b.waiters) == (0, 0)
    kind.free(b, holder)
    # The non-waiting calls just deny it.
    assert kind.try_sync(b, 11) is None
    assert await kind.try_async(b, 11) is None
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_blocking_call_on_a_running_event_loop_raises_runtime_error(kind: Kind) -> None:
    b = kind.make(10)
    with pytest.raises(RuntimeError):
        kind.blocking(b, 1, None)  # would fit: refused anyway, on this thread it could block
    holder = kind.take(b, 10)
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        kind.blocking(b, 1, 5)  # would wait: refused at once rather than deadlocking the loop
    assert time.monotonic() - started < 5
    assert (b.available, b.waiters) == (0, 0)
    kind.free(b, holder)
    assert b.available == 10


def test_blocking_call_on_another_threads_event_loop_raises_runtime_error() -> None:
    b = AtomicBudget(10)
    tb = AtomicTokenBudget(10)

    def refused(call: Callable[[], object]) -> bool:
        try:
            call()
        except RuntimeError:
            return True
        return False

    async def on_loop() -> list[bool]:
        calls = (lambda: b.reserve_blocking(1, timeout=5), lambda: tb.reserve_tokens_blocking(1))
        return [refused(call) for call in calls]

    assert in_thread(lambda: asyncio.run(on_loop())).result(DEADLINE) == [True, True]
    assert (b.available, tb.available) == (10, 10)


BAD_COSTS = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(2**64, ValueError, id="too-large"),
    pytest.param(1.0, TypeError, id="float"),
    pytest.param(float("nan"), TypeError, id="nan"),
    pytest.param("1", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(None, TypeError, id="none"),
]
BAD_TIMEOUTS = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(-0.001, ValueError, id="negative-float"),
    pytest.param(-math.inf, ValueError, id="minus-inf"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param("1", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(False, TypeError, id="false"),
    pytest.param(1j, TypeError, id="complex"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("bad", "error"), BAD_COSTS)
@pytest.mark.parametrize("kind", KINDS)
async def test_bad_cost_is_refused_by_the_async_request(kind: Kind, bad: Any, error: type) -> None:
    b = kind.make(10)  # room for anything valid: a bad argument that slipped through is granted
    with pytest.raises(error):
        await asyncio.wait_for(awaited(kind.request(b, bad)), 5)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.parametrize(("bad", "error"), BAD_COSTS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_cost_is_refused_by_the_blocking_request(kind: Kind, bad: Any, error: type) -> None:
    b = kind.make(10)
    with pytest.raises(error):
        kind.blocking(b, bad, 5)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize(("bad", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("kind", KINDS)
async def test_bad_timeout_is_refused_by_the_async_request(
    kind: Kind, bad: Any, error: type
) -> None:
    b = kind.make(10)
    with pytest.raises(error, match="timeout"):
        await asyncio.wait_for(awaited(kind.request(b, 1, timeout=bad)), 5)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.parametrize(("bad", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_timeout_is_refused_by_the_blocking_request(kind: Kind, bad: Any, error: type) -> None:
    b = kind.make(10)
    with pytest.raises(error, match="timeout"):
        kind.blocking(b, 1, bad)
    assert (b.available, b.waiters) == (10, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_an_infinite_or_integer_timeout_is_accepted(kind: Kind) -> None:
    b = kind.make(10)
    for timeout in (math.inf, 5, 0):
        box = await boxed(kind.request(b, 3, timeout=timeout))
        other = await asyncio.to_thread(lambda timeout=timeout: [kind.blocking(b, 3, timeout)])
        assert b.available == 4
        kind.free(b, box)
        kind.free(b, other)
    assert b.available == 10
