"""Rate refill (spec section 9, with sections 4, 5 and 7): `rate` units flow back per second.

Mostly against `costbound.testing.ManualClock`, a clock the test drives, so that every figure is
exact. After draining, advancing `t` seconds makes `floor(rate * t)` units available and never
more than capacity, for rates exact in binary; the core rounds a rate up to 2**-32 units/s, so a
rate given as a fraction (100/60) is on time. Fractions of a unit are carried however often the
budget is read or changed (no drift), which a Hypothesis model checks with exact rationals. A
token budget pays its debt before anything becomes available. Waiters, async and blocking, are
granted by `advance()` exactly when their cost has flowed, first come first served, and the
`try_*` calls do not jump them. A few tests use the real monotonic clock, with generous bounds
only, to check that a waiter only the refill can satisfy is woken by its computed timer.
Validation of `rate`, `clock` and `ManualClock.advance` closes the file.
COSTBOUND_LONG=1 runs the millisecond-step and thread tests longer.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, Permit, TokenReservation
from costbound.testing import ManualClock
from hypothesis import given
from hypothesis import strategies as st

NS = 1_000_000_000
LONG = bool(os.environ.get("COSTBOUND_LONG"))
# Simulated seconds of the millisecond-step tests.
STEP_SECONDS = 100 if LONG else 30
THREAD_STEPS = 5_000 if LONG else 500
# Setup synchronisation (waiting until a request is queued) and hang guards: not timed claims.
SETUP_TIMEOUT = 30.0
GRANT_TIMEOUT = 10.0

Budget = AtomicBudget | AtomicTokenBudget
Grant = Permit | TokenReservation

BUDGETS = pytest.mark.parametrize("cls", [AtomicBudget, AtomicTokenBudget], ids=["unit", "tokens"])


# --- Helpers: one vocabulary for both budgets ------------------------------------------------


def take(b: Budget, n: int) -> bool:
    """Takes `n` units for good (a token reservation is disarmed: held, never given back)."""
    if isinstance(b, AtomicTokenBudget):
        r = b.try_reserve_tokens_sync(n)
        if r is None:
            return False
        assert r.disarm() is not None
        return True
    return b.try_reserve_sync(n)


def try_zero(b: Budget) -> bool:
    """A `try_*` of nothing: changes nothing but goes through the grant path."""
    if isinstance(b, AtomicTokenBudget):
        return b.try_reserve_tokens_sync(0) is not None  # dropped at once: refunds 0
    return b.try_reserve_sync(0)


def take_and_give_back(b: Budget, n: int, how: int) -> bool:
    """Takes `n` and gives it straight back: a release, or a refund (recorded as unused or by
    leaving a `with` block, depending on `how`)."""
    if isinstance(b, AtomicTokenBudget):
        r = b.try_reserve_tokens_sync(n)
        if r is None:
            return False
        if how % 2:
            b.record_usage_sync(r, 0, 0)
        else:
            with r:
                pass
        assert not r.armed
        return True
    if not b.try_reserve_sync(n):
        return False
    b.release_sync(n)
    return True


def drained(cls: type[Budget], capacity: int, rate: Any, clock: ManualClock | None = None) -> Any:
    """A budget whose whole capacity has just been taken."""
    b = cls(capacity, rate=rate, clock=clock)
    assert take(b, capacity)
    if clock is not None:
        assert b.available == 0
    return b


def request(b: Budget, n: int, timeout: float | None = None) -> Awaitable[Any]:
    """The async wait: `reserve` or `reserve_tokens`."""
    if isinstance(b, AtomicTokenBudget):
        return b.reserve_tokens(n, timeout=timeout)
    return b.reserve(n, timeout=timeout)


def block(b: Budget, n: int, timeout: float | None) -> Any:
    """The blocking wait: `reserve_blocking` or `reserve_tokens_blocking`."""
    if isinstance(b, AtomicTokenBudget):
        return b.reserve_tokens_blocking(n, timeout=timeout)
    return b.reserve_blocking(n, timeout=timeout)


def check_grant(b: Budget, grant: Grant, n: int) -> None:
    if isinstance(b, AtomicTokenBudget):
        assert isinstance(grant, TokenReservation)
        assert grant.armed
        assert grant.estimate == n
    else:
        assert isinstance(grant, Permit)
        assert grant.granted
        assert not grant.released
        assert grant.cost == n


def give_back(b: Budget, grant: Grant) -> None:
    if isinstance(grant, TokenReservation):
        assert isinstance(b, AtomicTokenBudget)
        b.record_usage_sync(grant, 0, 0)
    else:
        grant.release()


def flowed(rate: Fraction, ns: int) -> int:
    """Whole units that `rate` per second makes in `ns` nanoseconds."""
    return math.floor(rate * ns / NS)


def nanos_to(balance: Fraction, target: int, rate: Fraction, short: bool) -> int | None:
    """Nanoseconds of refill that bring an exact `balance` to `target` (one less if `short`), or
    `None` when that is too far for a float of seconds to carry to the nanosecond."""
    ns = max(0, math.ceil((target - balance) * NS / rate) - short)
    return ns if ns <= 2**50 else None


async def grant_of(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Setup synchronisation on the event loop: poll until `predicate()`, with a deadline."""
    deadline = time.monotonic() + SETUP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        await asyncio.sleep(0.001)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """The same for a plain thread."""
    deadline = time.monotonic() + SETUP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.001)


async def let_the_loop_run() -> None:
    """A few turns of the loop, so that a task woken by mistake would have finished."""
    for _ in range(10):
        await asyncio.sleep(0)


class Blocked:
    """A blocking call run on its own thread; its result or exception is kept for the test."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as error:  # handed to the test
            self.error = error
        finally:
            self.done.set()

    def join(self) -> Any:
        assert self.done.wait(GRANT_TIMEOUT), "the blocking call did not return"
        self.thread.join(GRANT_TIMEOUT)
        if self.error is not None:
            raise self.error
        return self.result


# --- ManualClock ------------------------------------------------------------------------------


def test_manual_clock_starts_at_zero_and_moves_only_when_advanced():
    clock = ManualClock()
    assert clock.now == 0.0
    assert clock.now_ns == 0
    clock.advance(1.5)
    assert clock.now_ns == 1_500_000_000
    assert clock.now == 1.5
    clock.advance(2)
    assert clock.now_ns == 3_500_000_000
    clock.advance(1e-9)
    assert clock.now_ns == 3_500_000_001
    clock.advance(0)
    clock.advance(0.4e-9)  # rounded to the nanosecond: nothing
    assert clock.now_ns == 3_500_000_001
    assert "ManualClock" in repr(clock)


@pytest.mark.parametrize("seconds", [-1, -1e-9, -math.inf, math.nan])
def test_manual_clock_refuses_negative_and_nan_advances(seconds):
    clock = ManualClock()
    clock.advance(1)
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(seconds)
    assert clock.now_ns == NS


@pytest.mark.parametrize("seconds", ["1", b"1", None, True])
def test_manual_clock_advance_wants_a_number(seconds):
    clock = ManualClock()
    with pytest.raises(TypeError, match="seconds"):
        clock.advance(seconds)
    assert clock.now_ns == 0


# --- Continuous refill ------------------------------------------------------------------------

# Increments in nanoseconds, from one nanosecond to days, with odd remainders.
INCREMENTS = [1, 999, 10**6, 3 * 10**8 + 7, NS, 2 * NS + 1, 10 * NS, 60 * NS + 13, 10**11]
INCREMENTS += [10**12, 200 * 3600 * NS]


@BUDGETS
@pytest.mark.parametrize("rate", [Fraction(1500), Fraction(1, 2), Fraction(7), Fraction(3, 1024)])
def test_refill_is_floor_of_rate_times_elapsed_and_never_above_capacity(cls, rate):
    clock = ManualClock()
    clock.advance(123.456)  # a budget starts full when it is made, whatever the clock reads
    capacity = 1_000
    b = drained(cls, capacity, float(rate), clock)
    elapsed = 0
    for step in INCREMENTS:
        clock.advance(step / NS)
        elapsed += step
        expected = min(capacity, flowed(rate, elapsed))
        assert b.available == expected, elapsed
        if isinstance(b, AtomicTokenBudget):
            assert b.debt == 0
        else:
            assert b.utilization == pytest.approx((capacity - expected) / capacity)
    assert b.available == capacity, "the increments reach the cap"
    # Full for days, yet no surplus is kept beyond the cap: taking 10 leaves exactly 990.
    assert take(b, 10)
    assert b.available == capacity - 10
    unit = math.ceil(NS / rate)  # nanoseconds for one more unit
    clock.advance(unit / NS)
    assert b.available == capacity - 10 + flowed(rate, unit) == capacity - 9


def test_a_tokens_per_minute_limit_with_a_burst():
    clock = ManualClock()
    tpm = AtomicTokenBudget(90_000, rate=90_000 / 60, clock=clock)
    assert tpm.rate == 1_500.0
    burst = tpm.try_reserve_tokens_sync(90_000)  # the whole burst at once
    assert burst is not None
    assert tpm.try_reserve_tokens_sync(1) is None
    tpm.record_usage_sync(burst, 60_000, 30_000)
    clock.advance(10)
    assert tpm.available == 15_000  # the module's documented example
    clock.advance(50)
    assert tpm.available == 90_000
    assert take(tpm, 90_000)
    # A greedy client taking all there is every 100 ms gets 90k per minute, 150 at a time.
    for minute in range(3):
        granted = 0
        for _ in range(600):
            clock.advance(0.1)
            n = tpm.available
            r = tpm.try_reserve_tokens_sync(n)
            assert r is not None
            assert tpm.try_reserve_tokens_sync(1) is None
            tpm.record_usage_sync(r, n, 0)
            assert n == 150
            granted += n
        assert granted == 90_000, minute
    assert tpm.consumed == 90_000 + 3 * 90_000
    # Idle for ten minutes: the burst is back, and no more than the burst.
    clock.advance(600)
    assert tpm.available == 90_000
    assert tpm.try_reserve_tokens_sync(90_001) is None
    assert take(tpm, 90_000)


@BUDGETS
def test_a_rate_given_as_a_fraction_is_on_time(cls):
    clock = ManualClock()
    stepped = drained(cls, 100, 100 / 60, clock)
    clock.advance(59.99)
    assert stepped.available == 99
    clock.advance(0.01)
    assert stepped.available == 100, "100 after 60 s, not 99"
    at_once_clock = ManualClock()
    at_once = drained(cls, 100, 100 / 60, at_once_clock)
    at_once_clock.advance(60)
    assert at_once.available == 100
    third = ManualClock()
    b = drained(cls, 1_000, 1 / 3, third)
    for seconds, units in [(3, 1), (27, 10), (270, 100)]:
        third.advance(seconds)
        assert b.available == units


# --- No drift: fractions are carried ----------------------------------------------------------


@BUDGETS
@pytest.mark.parametrize(
    ("rate", "capacity"), [(Fraction(1, 3), 100), (Fraction(7), 1_000), (Fraction(1, 2), 100)]
)
def test_reading_and_changing_every_millisecond_loses_no_fraction(cls, rate, capacity):
    clock = ManualClock()
    busy = drained(cls, capacity, float(rate), clock)
    untouched = drained(cls, capacity, float(rate), clock)
    steps = STEP_SECONDS * 1_000
    for i in range(1, steps + 1):
        clock.advance(0.001)
        available = busy.available
        # With whole milliseconds, even the rounded-up 1/3 matches the exact fraction.
        assert available == flowed(rate, i * 1_000_000), i
        assert try_zero(busy)
        if available:
            assert take_and_give_back(busy, 1, i)
        assert busy.available == available
    assert clock.now_ns == STEP_SECONDS * NS
    assert untouched.available == busy.available == flowed(rate, STEP_SECONDS * NS)


@BUDGETS
def test_whole_units_are_taken_as_soon_as_they_have_flowed(cls):
    clock = ManualClock()
    b = drained(cls, 10, 7, clock)
    taken = 0
    for i in range(1, STEP_SECONDS * 1_000 + 1):
        clock.advance(0.001)
        while take(b, 1):
            taken += 1
        assert taken == flowed(Fraction(7), i * 1_000_000), i
        assert b.available == 0
    assert taken == 7 * STEP_SECONDS


binary_rates = st.builds(lambda k, m: Fraction(k, 2**m), st.integers(1, 2**24), st.integers(0, 32))
advances = st.one_of(st.integers(0, 1_000), st.integers(0, 10**7), st.integers(0, 10**11))
reads = st.sampled_from(["available", "try_zero", "take_and_give_back", "repr", "utilization"])
# Advance to the very nanosecond the next whole unit (or a given amount) has flowed, or one short.
to_boundary = st.tuples(st.just("advance_to"), st.integers(0, 100), st.booleans())


@given(
    cls=st.sampled_from([AtomicBudget, AtomicTokenBudget]),
    rate=binary_rates,
    capacity=st.one_of(st.integers(0, 1_000), st.integers(0, 2**40)),
    steps=st.lists(st.one_of(advances, reads, to_boundary), max_size=60),
)
def test_available_is_exactly_what_flowed_since_empty_however_it_is_read(
    cls, rate, capacity, steps
):
    clock = ManualClock()
    b = drained(cls, capacity, float(rate), clock)
    elapsed = 0
    for i, step in enumerate(steps):
        ns = step if isinstance(step, int) else None
        if isinstance(step, tuple):  # to the nanosecond the next whole unit has flowed, or short
            ns = nanos_to(rate * elapsed / NS, flowed(rate, elapsed) + 1, rate, step[2]) or 0
        if ns is not None:
            clock.advance(ns / NS)
            elapsed += ns
            assert clock.now_ns == elapsed
        elif step == "try_zero":
            assert try_zero(b)
        elif step == "take_and_give_back":
            whole = b.available >= 1
            assert take_and_give_back(b, 1, i) is whole
        elif step == "repr":
            assert f"available={min(capacity, flowed(rate, elapsed))}" in repr(b)
        elif step == "utilization" and isinstance(b, AtomicBudget):
            assert 0.0 <= b.utilization <= 1.0
        assert b.available == min(capacity, flowed(rate, elapsed))


unit_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), advances),
        st.tuples(st.just("take"), st.integers(0, 60)),
        st.tuples(st.just("release"), st.integers(0, 60)),
        st.tuples(st.just("refill")),
        to_boundary,
    ),
    max_size=50,
)


@given(rate=binary_rates, capacity=st.integers(0, 100), ops=unit_ops)
def test_unit_budget_with_a_rate_matches_an_exact_model(rate, capacity, ops):
    clock = ManualClock()
    b = AtomicBudget(capacity, rate=float(rate), clock=clock)
    balance = Fraction(capacity)  # exact, fractions included
    for step in ops:
        op, args = step[0], step[1:]
        if op == "advance_to":
            op, args = "advance", [nanos_to(balance, min(capacity, args[0]), rate, args[1]) or 0]
        if op == "advance":
            clock.advance(args[0] / NS)
            balance = min(capacity, balance + rate * args[0] / NS)
        elif op == "take":
            fits = balance >= args[0]
            assert b.try_reserve_sync(args[0]) is fits
            if fits:
                balance -= args[0]
        elif op == "release":
            b.release_sync(args[0])
            balance = min(capacity, balance + args[0])
        else:
            b.refill()
            balance = Fraction(capacity)
        assert b.available == math.floor(balance)


token_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), advances),
        st.tuples(st.just("reserve"), st.integers(0, 60)),
        st.tuples(st.just("record"), st.integers(0, 9), st.integers(0, 150), st.integers(0, 50)),
        st.tuples(st.just("refund"), st.integers(0, 9)),
        st.tuples(st.just("refill")),
        to_boundary,
    ),
    max_size=50,
)


@given(rate=binary_rates, capacity=st.integers(0, 100), ops=token_ops)
def test_token_budget_with_a_rate_matches_an_exact_model(rate, capacity, ops):
    clock = ManualClock()
    tb = AtomicTokenBudget(capacity, rate=float(rate), clock=clock)
    balance = Fraction(capacity)  # available - debt, exact
    consumed = 0
    held: list[TokenReservation] = []
    for step in ops:
        op, args = step[0], step[1:]
        if op == "advance_to":
            op, args = "advance", [nanos_to(balance, min(capacity, args[0]), rate, args[1]) or 0]
        if op == "advance":
            clock.advance(args[0] / NS)
            balance = min(capacity, balance + rate * args[0] / NS)
        elif op == "reserve":
            fits = balance >= args[0]  # in debt even 0 is denied
            r = tb.try_reserve_tokens_sync(args[0])
            assert (r is not None) is fits
            if r is not None:
                held.append(r)
                balance -= args[0]
        elif op == "record" and held:
            r = held.pop(args[0] % len(held))
            tb.record_usage_sync(r, args[1], args[2])
            consumed += args[1] + args[2]
            balance = min(capacity, balance + r.estimate - args[1] - args[2])
        elif op == "refund" and held:
            r = held.pop(args[0] % len(held))
            with r:  # leaving the block refunds the armed estimate
                pass
            balance = min(capacity, balance + r.estimate)
        elif op == "refill":
            tb.refill()
            balance = min(capacity, balance + capacity)  # debt first
        whole = math.floor(balance)
        assert (tb.available, tb.debt, tb.consumed) == (max(0, whole), max(0, -whole), consumed)


@BUDGETS
def test_threads_taking_while_the_clock_advances_get_exactly_what_flowed(cls):
    clock = ManualClock()
    b = drained(cls, 10**6, 1_000, clock)  # 2 units per 2 ms step; the cap is never reached
    stop = threading.Event()
    counts = [0] * 4

    def worker(index: int) -> None:
        while not stop.is_set():
            if take(b, 1):
                counts[index] += 1
            assert try_zero(b)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(counts))]
        for t in threads:
            t.start()
        for _ in range(THREAD_STEPS):
            clock.advance(0.002)
        stop.set()
        for t in threads:
            t.join(SETUP_TIMEOUT)
    finally:
        sys.setswitchinterval(previous)
    assert not any(t.is_alive() for t in threads)
    assert sum(counts) + b.available == 2 * THREAD_STEPS


@BUDGETS
def test_waiters_on_threads_and_loops_are_paid_exactly_by_advances_from_other_threads(cls):
    clock = ManualClock()
    # 1 unit per 0.5 ms step; the cap is never reached, so nothing that flowed is lost.
    b = drained(cls, 10**6, 2_000, clock)
    requests = 10 * THREAD_STEPS // 500
    lock = threading.Lock()
    granted: list[int] = []

    def keep(grant: Grant, cost: int) -> None:
        check_grant(b, grant, cost)
        if isinstance(grant, TokenReservation):
            assert grant.disarm() is not None  # used, never recorded: taken for good
        with lock:
            granted.append(cost)

    def blocking(seed: int) -> None:
        for i in range(requests):
            cost = 1 + (seed * 7 + i * 3) % 10
            keep(block(b, cost, 60), cost)

    async def waiting(seed: int) -> None:
        for i in range(requests):
            cost = 1 + (seed * 5 + i * 7) % 10
            keep(await request(b, cost, timeout=60), cost)

    def event_loop(seed: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(waiting(seed * 10 + task) for task in range(5)))

        asyncio.run(main())

    stop = threading.Event()

    def advancing() -> None:
        while not stop.is_set():
            clock.advance(0.000_5)
            time.sleep(0)

    workers = [Blocked(lambda seed=seed: blocking(seed)) for seed in range(4)]
    workers += [Blocked(lambda seed=seed: event_loop(seed)) for seed in range(2)]
    advancers = [Blocked(advancing) for _ in range(2)]
    try:
        for worker in workers:
            worker.join()
    finally:
        stop.set()
        for advancer in advancers:
            advancer.join()
    assert len(granted) == 14 * requests
    assert b.waiters == 0
    assert sum(granted) + b.available == clock.now_ns * 2_000 // NS


# --- Debt is paid first (token budgets), manual refill, release caps --------------------------


def test_refill_over_time_pays_the_debt_before_anything_is_available():
    clock = ManualClock()
    tb = AtomicTokenBudget(100, rate=10, clock=clock)
    r = tb.try_reserve_tokens_sync(100)
    assert r is not None
    tb.record_usage_sync(r, 120, 30)  # 50 over the estimate, nothing available: debt
    assert (tb.available, tb.debt, tb.consumed) == (0, 50, 150)
    assert tb.try_reserve_tokens_sync(0) is None, "in debt even 0 is denied"
    clock.advance(4.9)
    assert (tb.available, tb.debt) == (0, 1)
    assert tb.try_reserve_tokens_sync(0) is None
    clock.advance(0.05)
    assert (tb.available, tb.debt) == (0, 1), "half a token of debt is still a debt"
    assert tb.try_reserve_tokens_sync(0) is None
    clock.advance(0.05)
    assert (tb.available, tb.debt) == (0, 0)
    assert tb.try_reserve_tokens_sync(0) is not None
    clock.advance(1)
    assert (tb.available, tb.debt) == (10, 0)
    # An overage while the refill is under way is charged against what has flowed.
    r = tb.try_reserve_tokens_sync(10)
    assert r is not None
    tb.record_usage_sync(r, 30, 0)
    assert (tb.available, tb.debt) == (0, 20)
    clock.advance(2.5)
    assert (tb.available, tb.debt) == (5, 0)
    clock.advance(3600)
    assert (tb.available, tb.debt, tb.consumed) == (100, 0, 180)
    assert "debt=0" in repr(tb)


@pytest.mark.asyncio
async def test_a_waiter_in_debt_is_granted_once_the_debt_is_paid_and_its_estimate_flowed():
    clock = ManualClock()
    tb = AtomicTokenBudget(100, rate=10, clock=clock)
    r = tb.try_reserve_tokens_sync(100)
    assert r is not None
    tb.record_usage_sync(r, 150, 0)
    assert tb.debt == 50
    task = asyncio.create_task(grant_of(tb.reserve_tokens(20)))
    await until(lambda: tb.waiters == 1, "the request is queued")
    for seconds, available, debt in [(4.95, 0, 1), (0.05, 0, 0), (1.9, 19, 0)]:
        clock.advance(seconds)
        assert (tb.available, tb.debt, tb.waiters) == (available, debt, 1)
        await let_the_loop_run()
        assert not task.done()
    clock.advance(0.1)
    assert (tb.available, tb.debt, tb.waiters) == (0, 0, 0)
    grant = await asyncio.wait_for(task, GRANT_TIMEOUT)
    check_grant(tb, grant, 20)
    tb.record_usage_sync(grant, 5, 5)
    assert (tb.available, tb.consumed) == (10, 160)


@BUDGETS
def test_refill_by_hand_still_works_with_a_rate(cls):
    clock = ManualClock()
    b = drained(cls, 100, 10, clock)
    clock.advance(0.55)
    assert b.available == 5
    b.refill()
    assert b.available == 100
    clock.advance(10)
    assert b.available == 100
    assert take(b, 100)
    clock.advance(0.1)
    assert b.available == 1, "the flow goes on from the refill"


def test_refill_by_hand_pays_debt_first_and_keeps_the_fraction():
    clock = ManualClock()
    tb = AtomicTokenBudget(100, rate=10, clock=clock)
    r = tb.try_reserve_tokens_sync(100)
    assert r is not None
    tb.record_usage_sync(r, 100, 50)
    assert tb.debt == 50
    clock.advance(0.25)  # 2.5 paid: a balance of -47.5
    assert (tb.available, tb.debt) == (0, 48)
    tb.refill()  # + capacity: 52.5
    assert (tb.available, tb.debt) == (52, 0)
    clock.advance(0.05)
    assert tb.available == 53


def test_release_is_capped_at_capacity_with_a_rate():
    clock = ManualClock()
    b = AtomicBudget(10, rate=1, clock=clock)
    assert b.try_reserve_sync(4)
    clock.advance(2.5)
    assert b.available == 8
    b.release_sync(4)
    assert b.available == 10
    assert b.try_reserve_sync(1)
    assert b.available == 9, "no surplus kept above the cap"
    clock.advance(0.5)
    assert b.available == 9
    b.release_sync(2**64 - 1)
    assert b.available == 10
    clock.advance(3600)
    assert b.available == 10
    assert b.utilization == 0.0


def test_refunds_are_capped_at_capacity_with_a_rate():
    clock = ManualClock()
    tb = AtomicTokenBudget(10, rate=1, clock=clock)
    r = tb.try_reserve_tokens_sync(4)
    assert r is not None
    clock.advance(2.5)
    assert tb.available == 8
    with r:
        pass
    assert tb.available == 10
    r = tb.try_reserve_tokens_sync(5)
    assert r is not None
    tb.record_usage_sync(r, 0, 0)
    assert tb.available == 10
    assert take(tb, 1)
    assert tb.available == 9, "no surplus kept above the cap"


# --- Waiters woken by refill (ManualClock) ----------------------------------------------------

# Rate 2 per second, a request of 5: 2 then 4 then 4.999999998 units have flowed, then 5.
STEPS_BEFORE_FIVE = [(1, 2), (1, 4), (0.499_999_999, 4)]


@BUDGETS
@pytest.mark.asyncio
async def test_an_async_waiter_is_granted_by_advance_exactly_when_its_cost_has_flowed(cls):
    clock = ManualClock()
    b = drained(cls, 10, 2, clock)
    task = asyncio.create_task(grant_of(request(b, 5)))
    await until(lambda: b.waiters == 1, "the request is queued")
    for seconds, available in STEPS_BEFORE_FIVE:
        clock.advance(seconds)
        assert (b.available, b.waiters) == (available, 1)
        await let_the_loop_run()
        assert not task.done()
    clock.advance(1e-9)  # exactly 5 have flowed: granted in advance() itself
    assert (b.available, b.waiters) == (0, 0)
    grant = await asyncio.wait_for(task, GRANT_TIMEOUT)
    check_grant(b, grant, 5)
    give_back(b, grant)
    assert b.available == 5


@BUDGETS
def test_a_blocking_waiter_is_granted_by_advance_exactly_when_its_cost_has_flowed(cls):
    clock = ManualClock()
    b = drained(cls, 10, 2, clock)
    waiter = Blocked(lambda: block(b, 5, timeout=60))
    wait_until(lambda: b.waiters == 1, "the blocking request is queued")
    for seconds, available in STEPS_BEFORE_FIVE:
        clock.advance(seconds)
        assert (b.available, b.waiters) == (available, 1)
        assert not waiter.done.is_set()
    clock.advance(1e-9)
    assert (b.available, b.waiters) == (0, 0)
    grant = waiter.join()
    check_grant(b, grant, 5)
    give_back(b, grant)
    assert b.available == 5


@BUDGETS
@pytest.mark.asyncio
async def test_an_advance_on_another_thread_wakes_an_async_waiter(cls):
    clock = ManualClock()
    b = drained(cls, 10, 2, clock)
    task = asyncio.create_task(grant_of(request(b, 4)))
    await until(lambda: b.waiters == 1, "the request is queued")
    await asyncio.to_thread(clock.advance, 2)
    grant = await asyncio.wait_for(task, GRANT_TIMEOUT)
    check_grant(b, grant, 4)
    assert (b.available, b.waiters) == (0, 0)


@BUDGETS
@pytest.mark.asyncio
async def test_waiters_are_granted_first_come_first_served_as_the_refill_flows(cls):
    clock = ManualClock()
    b = drained(cls, 10, 1, clock)
    first = asyncio.create_task(grant_of(request(b, 6)))
    await until(lambda: b.waiters == 1, "the first request is queued")
    second = Blocked(lambda: block(b, 2, timeout=60))
    await until(lambda: b.waiters == 2, "the second (blocking) request is queued")
    third = asyncio.create_task(grant_of(request(b, 3)))
    await until(lambda: b.waiters == 3, "the third request is queued")

    clock.advance(5)
    # 5 have flowed: the second and the third would fit, but the first is first.
    assert (b.available, b.waiters) == (5, 3)
    assert not take(b, 1), "a try_* does not jump the queue, refill or not"
    assert not try_zero(b)
    assert b.available == 5
    clock.advance(1)
    assert (b.available, b.waiters) == (0, 2)
    first_grant = await asyncio.wait_for(first, GRANT_TIMEOUT)
    check_grant(b, first_grant, 6)
    clock.advance(1)
    assert (b.available, b.waiters) == (1, 2)
    assert not second.done.is_set()
    clock.advance(1)
    assert (b.available, b.waiters) == (0, 1)
    second_grant = await asyncio.to_thread(second.join)
    check_grant(b, second_grant, 2)
    clock.advance(2)
    assert (b.available, b.waiters) == (2, 1)
    await let_the_loop_run()
    assert not third.done()
    clock.advance(1)
    assert (b.available, b.waiters) == (0, 0)
    third_grant = await asyncio.wait_for(third, GRANT_TIMEOUT)
    check_grant(b, third_grant, 3)
    for grant in (first_grant, second_grant, third_grant):
        give_back(b, grant)
    assert b.available == 10


waiter_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), advances),
        st.tuples(st.just("wait"), st.integers(0, 100)),
        st.tuples(st.just("try"), st.integers(0, 20)),
        to_boundary,
    ),
    max_size=30,
)


@given(
    cls=st.sampled_from([AtomicBudget, AtomicTokenBudget]),
    rate=binary_rates,
    capacity=st.integers(1, 100),
    ops=waiter_ops,
)
def test_waiters_are_granted_in_order_exactly_when_the_refill_fits_them(cls, rate, capacity, ops):
    asyncio.run(waiters_against_the_model(cls, rate, capacity, ops))


async def waiters_against_the_model(cls, rate, capacity, ops):
    clock = ManualClock()
    b = drained(cls, capacity, float(rate), clock)
    balance = Fraction(0)
    queue: list[tuple[int, asyncio.Task[Any]]] = []  # the model's waiters, first in line first
    tasks: list[asyncio.Task[Any]] = []
    expected_done: set[asyncio.Task[Any]] = set()
    for step in ops:
        op, amount = step[0], step[1]
        if op == "advance_to":  # to when a waiter (the head, or one behind it) would just fit
            target = queue[amount % len(queue)][0] if queue else min(amount, capacity)
            op, amount = "advance", nanos_to(balance, target, rate, step[2]) or 0
        if op == "advance":
            clock.advance(amount / NS)
            balance = min(capacity, balance + rate * amount / NS)
            while queue and balance >= queue[0][0]:
                cost, task = queue.pop(0)
                balance -= cost
                expected_done.add(task)
        elif op == "wait":
            cost = min(amount, capacity)
            task = asyncio.create_task(grant_of(request(b, cost)))
            tasks.append(task)
            depth = len(queue) + 1
            await until(
                lambda task=task, depth=depth: task.done() or b.waiters == depth,
                "the request is settled",
            )
            if not queue and balance >= cost:
                balance -= cost
                expected_done.add(task)
            else:
                queue.append((cost, task))
        else:
            fits = not queue and balance >= amount
            assert take(b, amount) is fits
            if fits:
                balance -= amount
        await let_the_loop_run()
        assert b.waiters == len(queue)
        assert b.available == max(0, math.floor(balance))
        assert {task for task in tasks if task.done()} == expected_done
    for task in expected_done:
        assert task.result() is not None
    # Cancelling those still waiting leaves no trace.
    for _, task in queue:
        task.cancel()
    await asyncio.gather(*(task for _, task in queue), return_exceptions=True)
    assert b.waiters == 0
    assert b.available == max(0, math.floor(balance))


@BUDGETS
@pytest.mark.asyncio
async def test_refill_by_hand_grants_a_waiter_on_a_rate_budget(cls):
    clock = ManualClock()
    b = drained(cls, 10, 1, clock)
    task = asyncio.create_task(grant_of(request(b, 8)))
    await until(lambda: b.waiters == 1, "the request is queued")
    b.refill()
    assert (b.available, b.waiters) == (2, 0)
    check_grant(b, await asyncio.wait_for(task, GRANT_TIMEOUT), 8)


@pytest.mark.asyncio
async def test_one_advance_grants_the_waiters_of_every_budget_on_the_clock():
    clock = ManualClock()
    units = drained(AtomicBudget, 10, 1, clock)
    tokens = drained(AtomicTokenBudget, 100, 10, clock)
    no_rate = drained(AtomicBudget, 10, 0, clock)
    gone = AtomicTokenBudget(5, rate=1, clock=clock)
    del gone  # a budget dropped does not trouble the clock
    gc.collect()
    a = asyncio.create_task(grant_of(units.reserve(3)))
    b = asyncio.create_task(grant_of(tokens.reserve_tokens(30)))
    await until(lambda: units.waiters == tokens.waiters == 1, "both requests are queued")
    clock.advance(3)
    assert (units.waiters, tokens.waiters) == (0, 0)
    check_grant(units, await asyncio.wait_for(a, GRANT_TIMEOUT), 3)
    check_grant(tokens, await asyncio.wait_for(b, GRANT_TIMEOUT), 30)
    assert no_rate.available == 0, "rate 0: the clock brings nothing back"


@BUDGETS
@pytest.mark.asyncio
async def test_timeouts_run_in_real_time_and_take_nothing(cls):
    clock = ManualClock()
    b = drained(cls, 10, 1, clock)
    # The manual clock never moves here: only real time can end these waits.
    with pytest.raises(TimeoutError, match=r"timeout of 0\.05"):
        await asyncio.wait_for(grant_of(request(b, 5, timeout=0.05)), GRANT_TIMEOUT)
    assert b.waiters == 0
    with pytest.raises(TimeoutError, match=r"timeout of 0\.05"):
        await asyncio.wait_for(asyncio.to_thread(block, b, 5, 0.05), GRANT_TIMEOUT)
    assert b.waiters == 0
    clock.advance(5)
    assert b.available == 5
    assert take(b, 5)


# --- Real time: the monotonic clock and the refill timer --------------------------------------


@BUDGETS
@pytest.mark.parametrize("timeout", [None, 3600.0])
@pytest.mark.asyncio
async def test_an_async_waiter_is_woken_by_its_refill_timer(cls, timeout):
    b = drained(cls, 1_000, 1_000)
    start = time.monotonic()
    # No release, no refill, no clock to advance: only the timer computed for it can wake it.
    grant = await asyncio.wait_for(grant_of(request(b, 200, timeout=timeout)), GRANT_TIMEOUT)
    elapsed = time.monotonic() - start
    check_grant(b, grant, 200)
    assert elapsed >= 0.15, f"granted after {elapsed} s, before 200 units could flow"
    assert b.waiters == 0


@BUDGETS
@pytest.mark.parametrize("timeout", [None, 3600.0])
def test_a_blocking_waiter_is_woken_by_its_refill_timer(cls, timeout):
    b = drained(cls, 1_000, 1_000)
    start = time.monotonic()
    grant = Blocked(lambda: block(b, 200, timeout)).join()
    elapsed = time.monotonic() - start
    check_grant(b, grant, 200)
    assert elapsed >= 0.15, f"granted after {elapsed} s, before 200 units could flow"
    assert b.waiters == 0


@BUDGETS
@pytest.mark.asyncio
async def test_each_waiter_sets_its_own_timer_when_it_reaches_the_head(cls):
    b = drained(cls, 1_000, 1_000)
    start = time.monotonic()
    granted: list[str] = []

    async def waiting(cost: int) -> Any:
        grant = await request(b, cost)
        granted.append("async")
        return grant

    def blocking(cost: int) -> Any:
        grant = block(b, cost, 60)
        granted.append("blocking")
        return grant

    def queued() -> int:
        return b.waiters + len(granted)

    first = asyncio.create_task(waiting(100))
    await until(lambda: queued() == 1, "the first request is queued")
    second = Blocked(lambda: blocking(100))
    await until(lambda: queued() == 2, "the second request is queued")
    third = asyncio.create_task(waiting(100))
    await until(lambda: queued() == 3, "the third request is queued")
    grants = await asyncio.wait_for(asyncio.gather(first, third), GRANT_TIMEOUT)
    grants.append(await asyncio.to_thread(second.join))
    elapsed = time.monotonic() - start
    for grant in grants:
        check_grant(b, grant, 100)
    assert elapsed >= 0.25, f"300 units granted after {elapsed} s at 1000 per second"
    assert b.waiters == 0


@BUDGETS
@pytest.mark.parametrize("mode", ["async", "blocking"])
@pytest.mark.asyncio
async def test_the_waiter_behind_a_cancelled_head_sets_its_own_timer(cls, mode):
    b = drained(cls, 1_000, 100)
    head = asyncio.create_task(grant_of(request(b, 1_000)))  # ten seconds away
    await until(lambda: b.waiters == 1, "the head is queued")
    if mode == "async":
        behind = asyncio.create_task(grant_of(request(b, 20)))
        await until(lambda: b.waiters == 2, "the second request is queued")
    else:
        blocked = Blocked(lambda: block(b, 20, 60))
        await until(lambda: b.waiters == 2, "the second request is queued")
        behind = asyncio.ensure_future(asyncio.to_thread(blocked.join))
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head
    # Nothing else happens to the budget: only a timer set by the new head can grant it.
    check_grant(b, await asyncio.wait_for(behind, GRANT_TIMEOUT), 20)
    assert b.waiters == 0


# --- Validation and reporting -----------------------------------------------------------------


@BUDGETS
@pytest.mark.parametrize(
    "rate", [-1, -1e-300, -math.inf, math.inf, math.nan, 2**40 + 1, 2.0**41, 1e300, 10**400]
)
def test_a_rate_out_of_range_is_a_value_error(cls, rate):
    with pytest.raises(ValueError, match="rate"):
        cls(10, rate=rate)
    with pytest.raises(ValueError, match="rate"):
        cls(10, rate=rate, clock=ManualClock())


@BUDGETS
@pytest.mark.parametrize("rate", ["1", b"1", True, False, [1], object(), 1j])
def test_a_rate_that_is_not_a_number_is_a_type_error(cls, rate):
    with pytest.raises(TypeError, match="rate"):
        cls(10, rate=rate)


@BUDGETS
@pytest.mark.parametrize(
    "rate", [Fraction(1, 3), np.float32(0.5), np.float64(1.5), np.int64(7)], ids=repr
)
def test_a_rate_may_be_any_real_number(cls, rate):
    clock = ManualClock()
    b = drained(cls, 100, rate, clock)
    clock.advance(6)
    assert b.rate == float(rate)
    assert b.available == math.floor(float(rate) * 6 + 1e-9)


@pytest.mark.parametrize("seconds", [math.inf, 10**400])
def test_a_clock_cannot_be_advanced_to_infinity(seconds):
    clock = ManualClock()
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(seconds)
    assert clock.now_ns == 0


@BUDGETS
@pytest.mark.parametrize("clock", [object(), "manual", 0, ManualClock, time.monotonic])
def test_a_clock_must_be_a_manual_clock(cls, clock):
    with pytest.raises(TypeError, match="ManualClock"):
        cls(10, rate=1, clock=clock)
    with pytest.raises(TypeError, match="ManualClock"):
        cls(10, clock=clock)
    assert cls(10, rate=1, clock=None).rate == 1.0


@BUDGETS
@pytest.mark.parametrize("rate", [None, 0, 0.0, -0.0])
def test_a_rate_of_zero_or_none_means_no_refill(cls, rate):
    clock = ManualClock()
    b = drained(cls, 10, rate, clock)
    assert b.rate == 0.0
    clock.advance(3600)
    assert b.available == 0
    assert "rate" not in repr(b)
    assert cls(10).rate == 0.0


@BUDGETS
@pytest.mark.parametrize("rate", [1500, 0.5, 100 / 60, 2**-32, 2**40])
def test_the_rate_is_reported_as_given_and_shown_in_the_repr(cls, rate):
    b = cls(10, rate=rate)
    assert type(b.rate) is float
    assert b.rate == rate
    text = repr(b)
    assert text.startswith(f"{cls.__name__}(capacity=10, available=10")
    shown = re.search(r"rate=([^,)]+)", text)
    assert shown is not None, text
    assert float(shown.group(1)) == rate


@BUDGETS
def test_the_largest_rate_is_exact(cls):
    clock = ManualClock()
    b = drained(cls, 2**50, 2**40, clock)
    clock.advance(1e-9)
    assert b.available == flowed(Fraction(2**40), 1)
    clock.advance(1)
    assert b.available == flowed(Fraction(2**40), NS + 1) == 2**40 + 1_099
