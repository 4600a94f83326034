"""One conformance suite for every backend: the atomic budgets and the Redis budgets.

Each test runs once per backend (the ``backend`` / ``sync_backend`` fixtures): the seed's own
examples (spec section 6), waiting (section 7, within one process for Redis, as section 10
says), admission across budgets (section 8) including a mix of backends, and the rate
(section 9). State is read through the backend: properties for the atomic budgets,
``snapshot()`` for Redis. The Hypothesis models of sections 4 and 5 run on both backends in
``test_model.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from costbound import (
    BudgetGuard,
    TokenBudget,
    TokenReservation,
    admit,
    admit_blocking,
    try_admit,
)

DEADLINE = 20.0  # generous: only a hang reaches it


async def until(predicate, what: str, timeout: float = DEADLINE) -> None:
    """Poll for setup synchronisation only (never for a verdict on speed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.002)


def until_sync(predicate, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.002)


# --- Section 6: the seed's own examples, on every backend ------------------------------------


@pytest.mark.asyncio
async def test_seed_unit_examples(backend):
    b = backend.unit(100)
    assert isinstance(b, BudgetGuard)
    assert await b.try_reserve(60)
    assert await b.try_reserve(40)
    assert not await b.try_reserve(1)
    await b.release(50)
    assert await b.try_reserve(50)

    b = backend.unit(10)
    await b.try_reserve(5)
    await b.release(100)
    assert (await backend.state(b)).available == 10

    b = backend.unit(100)
    await b.try_reserve(75)
    await backend.refill(b)
    assert (await backend.state(b)).available == 100

    b = backend.unit(100)
    await b.try_reserve(40)
    assert (await backend.state(b)).utilization == 0.4


@pytest.mark.asyncio
async def test_seed_token_examples(backend):
    tb = backend.tokens(1_000)
    assert isinstance(tb, TokenBudget)
    r = await tb.try_reserve_tokens(400)
    await tb.record_usage(r, 120, 80)
    assert await tb.tokens_consumed() == 200
    hold = await tb.try_reserve_tokens(800)
    assert hold is not None
    assert await tb.try_reserve_tokens(1) is None

    tb = backend.tokens(1_000)
    r = await tb.try_reserve_tokens(100)
    await tb.record_usage(r, 150, 50)
    assert (await backend.state(tb)).available == 800

    tb = backend.tokens(1_000)
    a = await tb.try_reserve_tokens(400)
    b2 = await tb.try_reserve_tokens(400)
    await tb.record_usage(a, 100, 100)
    assert (await backend.state(tb)).available == 400
    await tb.record_usage(b2, 200, 200)
    state = await backend.state(tb)
    assert (state.available, state.consumed) == (400, 600)

    tb = backend.tokens(1_000)
    r = await tb.try_reserve_tokens(400)
    del r
    await backend.settle(tb)
    state = await backend.state(tb)
    assert (state.available, state.consumed) == (1_000, 0)


def test_seed_examples_with_the_sync_twins(sync_backend):
    b = sync_backend.unit(100)
    assert b.try_reserve_sync(60)
    assert b.try_reserve_sync(40)
    assert not b.try_reserve_sync(1)
    b.release_sync(50)
    assert b.try_reserve_sync(50)
    b.release_sync(1_000)
    assert sync_backend.state_sync(b).available == 100

    tb = sync_backend.tokens(1_000)
    r = tb.try_reserve_tokens_sync(400)
    tb.record_usage_sync(r, 120, 80)
    assert tb.tokens_consumed_sync() == 200
    r = tb.try_reserve_tokens_sync(100)
    tb.record_usage_sync(r, 150, 50)
    assert sync_backend.state_sync(tb).available == 600
    r = tb.try_reserve_tokens_sync(600)
    del r  # a sync grant: the refund lands with the next call on Redis
    sync_backend.settle_sync(tb)
    state = sync_backend.state_sync(tb)
    assert (state.available, state.debt, state.consumed) == (600, 0, 400)


@pytest.mark.asyncio
async def test_debt_is_paid_first_by_refunds_and_refill(backend):
    tb = backend.tokens(1_000)
    r = await tb.try_reserve_tokens(800)
    await tb.record_usage(r, 900, 400)  # 500 over with 200 available: 300 of debt
    state = await backend.state(tb)
    assert (state.available, state.debt, state.consumed) == (0, 300, 1_300)
    assert await tb.try_reserve_tokens(0) is None, "in debt even 0 is denied"
    await backend.refill(tb)
    state = await backend.state(tb)
    assert (state.available, state.debt) == (700, 0)


@pytest.mark.asyncio
async def test_record_usage_twice_is_a_value_error_and_changes_nothing(backend):
    tb = backend.tokens(100)
    r = await tb.try_reserve_tokens(50)
    await tb.record_usage(r, 10, 10)
    before = await backend.state(tb)
    with pytest.raises(ValueError):  # noqa: PT011 - the spec fixes no message
        await tb.record_usage(r, 1, 1)
    assert await backend.state(tb) == before
    assert not r.armed
    assert r.disarm() is None


@pytest.mark.asyncio
async def test_a_reservation_of_another_budget_or_a_user_built_one_is_refused(backend):
    tb, other = backend.tokens(100), backend.tokens(100)
    foreign = await other.try_reserve_tokens(30)
    refunded: list[int] = []
    user_built = TokenReservation(5, refunded.append)
    for reservation in (foreign, user_built):
        with pytest.raises(ValueError):  # noqa: PT011 - the spec fixes no message
            await tb.record_usage(reservation, 1, 1)
        assert reservation.armed
    assert (await backend.state(tb)).available == 100
    del foreign, user_built, reservation
    await backend.settle(other)
    assert (await backend.state(other)).available == 100
    assert refunded == [5]


# --- Section 7: waiting, on every backend (within one process for Redis) ---------------------


@pytest.mark.asyncio
async def test_reserve_gives_a_permit_and_async_with_releases_it(backend):
    b = backend.unit(10)
    async with b.reserve(4) as permit:
        assert permit.cost == 4
        assert not permit.released
        assert (await backend.state(b)).available == 6
    assert permit.released
    assert (await backend.state(b)).available == 10
    permit = await b.reserve(10)
    assert (await backend.state(b)).available == 0
    await backend.release(permit)
    await backend.release(permit)  # once: later calls do nothing
    assert (await backend.state(b)).available == 10


async def _wait_then(backend, budget, request, wake):
    """Start a waiting request, check that it waits, run `wake`, and return what it got."""

    async def run():
        return await request()

    task = asyncio.create_task(run())
    await until(lambda: backend.queued(budget) == 1, "the request waits")
    assert not task.done()
    await wake()
    return await asyncio.wait_for(task, DEADLINE)


@pytest.mark.asyncio
async def test_a_waiter_is_woken_by_a_release(backend):
    b = backend.unit(5)
    assert await b.try_reserve(5)
    permit = await _wait_then(
        backend, b, lambda: b.reserve(3, timeout=DEADLINE), lambda: b.release(4)
    )
    assert permit.cost == 3
    assert (await backend.state(b)).available == 1
    await backend.release(permit)


@pytest.mark.asyncio
async def test_a_waiter_is_woken_by_a_refill(backend):
    b = backend.unit(5)
    assert await b.try_reserve(5)
    permit = await _wait_then(
        backend, b, lambda: b.reserve(5, timeout=DEADLINE), lambda: backend.refill(b)
    )
    assert (await backend.state(b)).available == 0
    await backend.release(permit)


@pytest.mark.parametrize("how", ["record_usage", "drop"])
@pytest.mark.asyncio
async def test_a_token_waiter_is_woken_by_a_settlement_or_a_refund(backend, how):
    tb = backend.tokens(1_000)
    holder = [await tb.try_reserve_tokens(900)]

    async def wake() -> None:
        if how == "record_usage":
            await tb.record_usage(holder.pop(), 100, 50)  # 750 back
        else:
            holder.clear()  # dropped armed: its 900 come back

    r = await _wait_then(backend, tb, lambda: tb.reserve_tokens(500, timeout=DEADLINE), wake)
    assert r.armed
    assert r.estimate == 500
    await tb.record_usage(r, 250, 250)
    state = await backend.state(tb)
    expected_consumed = 650 if how == "record_usage" else 500
    assert state.consumed == expected_consumed
    assert state.available == 1_000 - expected_consumed


@pytest.mark.asyncio
async def test_a_waiter_is_woken_by_the_rate(backend):
    tb = backend.tokens(100, rate=400.0)
    r = await tb.try_reserve_tokens(100)
    await tb.record_usage(r, 100, 0)  # empty now; 400/s flow back
    started = time.monotonic()
    got = await tb.reserve_tokens(60, timeout=DEADLINE)  # no release: only the rate grants it
    assert got.estimate == 60
    assert time.monotonic() - started < DEADLINE
    await tb.record_usage(got, 0, 0)


@pytest.mark.asyncio
async def test_waiters_are_served_first_come_first_served(backend):
    b = backend.unit(4)
    assert await b.try_reserve(4)
    order: list[int] = []

    async def want(i: int, cost: int) -> None:
        permit = await b.reserve(cost, timeout=DEADLINE)
        order.append(i)
        await backend.release(permit)

    tasks = []
    for i, cost in enumerate([3, 1, 4, 2]):
        tasks.append(asyncio.create_task(want(i, cost)))
        await until(lambda n=i + 1: backend.queued(b) == n, f"{i + 1} wait")
    # A try_* does not jump the queue, even for what would fit.
    await b.release(1)
    assert not await b.try_reserve(1)
    await b.release(3)
    await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    assert order == [0, 1, 2, 3]
    assert (await backend.state(b)).available == 4
    assert backend.queued(b) == 0


@pytest.mark.asyncio
async def test_timeout_takes_nothing_and_timeout_zero_tries_once(backend):
    b = backend.unit(5)
    assert await b.try_reserve(3)
    with pytest.raises(TimeoutError):
        await b.reserve(3, timeout=0.05)
    with pytest.raises(TimeoutError):
        await b.reserve(3, timeout=0)
    permit = await b.reserve(2, timeout=0)
    assert permit.cost == 2
    assert (await backend.state(b)).available == 0
    assert backend.queued(b) == 0
    tb = backend.tokens(10)
    r = await tb.reserve_tokens(10, timeout=0)
    with pytest.raises(TimeoutError):
        await tb.reserve_tokens(1, timeout=0.05)
    await tb.record_usage(r, 0, 0)
    assert (await backend.state(tb)).available == 10
    assert backend.queued(tb) == 0


@pytest.mark.asyncio
async def test_cancelling_a_waiter_leaves_no_trace_and_the_next_is_served(backend):
    b = backend.unit(3)
    assert await b.try_reserve(3)
    first = asyncio.create_task(_get(b, 2))
    await until(lambda: backend.queued(b) == 1, "the first waits")
    second = asyncio.create_task(_get(b, 1))
    await until(lambda: backend.queued(b) == 2, "the second waits")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await b.release(1)
    permit = await asyncio.wait_for(second, DEADLINE)
    assert permit.cost == 1
    state = await backend.state(b)
    assert state.available == 0
    assert backend.queued(b) == 0
    await backend.release(permit)
    await b.release(2)
    assert (await backend.state(b)).available == 3


async def _get(b, cost):
    return await b.reserve(cost, timeout=DEADLINE)


@pytest.mark.asyncio
async def test_a_cost_above_capacity_is_a_value_error_at_once(backend):
    b, tb = backend.unit(5), backend.tokens(5)
    with pytest.raises(ValueError, match="capacity"):
        await b.reserve(6, timeout=DEADLINE)
    with pytest.raises(ValueError, match="capacity"):
        await tb.reserve_tokens(6, timeout=DEADLINE)
    assert not await b.try_reserve(6)
    assert await tb.try_reserve_tokens(6) is None
    assert backend.queued(b) == backend.queued(tb) == 0


@pytest.mark.asyncio
async def test_async_with_reserve_tokens_refunds_an_armed_reservation(backend):
    tb = backend.tokens(100)
    async with tb.reserve_tokens(60) as r:
        assert r.armed
    assert (await backend.state(tb)).available == 100
    async with tb.reserve_tokens(60) as r:
        await tb.record_usage(r, 10, 10)
    state = await backend.state(tb)
    assert (state.available, state.consumed) == (80, 20)


def test_blocking_waits_are_woken_from_another_thread(sync_backend):
    b = sync_backend.unit(2)
    tb = sync_backend.tokens(100)
    assert b.try_reserve_sync(2)
    held = tb.try_reserve_tokens_sync(100)
    got = {}

    def waiter() -> None:
        with b.reserve_blocking(2, timeout=DEADLINE) as permit:
            got["permit"] = permit.cost
        got["tokens"] = tb.reserve_tokens_blocking(70, timeout=DEADLINE)

    thread = threading.Thread(target=waiter)
    thread.start()
    until_sync(lambda: sync_backend.queued(b) == 1, "the thread waits for units")
    b.release_sync(2)
    until_sync(lambda: sync_backend.queued(tb) == 1, "the thread waits for tokens")
    tb.record_usage_sync(held, 20, 10)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert got["permit"] == 2
    assert got["tokens"].estimate == 70
    tb.record_usage_sync(got.pop("tokens"), 35, 35)
    state = sync_backend.state_sync(tb)
    assert (state.available, state.consumed) == (0 + 100 - 30 - 70, 100)
    assert sync_backend.state_sync(b).available == 2


def test_blocking_timeouts_take_nothing(sync_backend):
    b = sync_backend.unit(1)
    assert b.try_reserve_sync(1)
    with pytest.raises(TimeoutError):
        b.reserve_blocking(1, timeout=0.05)
    with pytest.raises(ValueError, match="capacity"):
        b.reserve_blocking(2, timeout=DEADLINE)
    b.release_sync(1)
    assert sync_backend.state_sync(b).available == 1
    assert sync_backend.queued(b) == 0


@pytest.mark.asyncio
async def test_blocking_calls_on_a_loop_thread_raise_at_once(backend):
    b, tb = backend.unit(1), backend.tokens(1)
    with pytest.raises(RuntimeError):
        b.reserve_blocking(1)
    with pytest.raises(RuntimeError):
        tb.reserve_tokens_blocking(1)
    assert (await backend.state(b)).available == 1
    assert (await backend.state(tb)).available == 1


# --- Section 8: admission across budgets, on every backend and on a mix ----------------------


@pytest.mark.asyncio
async def test_try_admit_takes_every_part_or_none(backend):
    rows, slots, llm = backend.unit(10), backend.unit(1), backend.tokens(1_000)
    ticket = await try_admit(guards={rows: 1, slots: 1}, tokens={llm: 800})
    assert ticket is not None
    assert await try_admit(guards={rows: 1, slots: 1}, tokens={llm: 100}) is None
    # the denied attempt gave back what it had taken: only the first ticket holds anything
    assert (await backend.state(rows)).available == 9
    assert (await backend.state(llm)).available == 200
    r = ticket.reservations[llm]
    await llm.record_usage(r, 100, 100)
    await ticket.close()
    await ticket.close()  # once
    await backend.settle(llm)
    assert (await backend.state(rows)).available == 10
    assert (await backend.state(slots)).available == 1
    state = await backend.state(llm)
    assert (state.available, state.consumed) == (800, 200)


@pytest.mark.asyncio
async def test_admit_waits_for_the_missing_part_and_leaving_the_block_gives_back(backend):
    rows, slots, llm = backend.unit(10), backend.unit(1), backend.tokens(1_000)
    assert await slots.try_reserve(1)
    entered = asyncio.Event()

    async def admitted() -> None:
        async with admit(guards={rows: 2, slots: 1}, tokens={llm: 300}, timeout=DEADLINE):
            entered.set()

    task = asyncio.create_task(admitted())
    await asyncio.sleep(0.05)
    assert not entered.is_set()
    # nothing held while it waits
    assert (await backend.state(rows)).available == 10
    assert (await backend.state(llm)).available == 1_000
    await slots.release(1)
    await asyncio.wait_for(task, DEADLINE)
    assert entered.is_set()
    await backend.settle(llm)
    assert (await backend.state(rows)).available == 10
    assert (await backend.state(slots)).available == 1
    assert (await backend.state(llm)).available == 1_000


@pytest.mark.asyncio
async def test_admit_times_out_holding_nothing(backend):
    rows, llm = backend.unit(10), backend.tokens(100)
    held = await llm.try_reserve_tokens(1)
    with pytest.raises(TimeoutError):
        await admit(guards={rows: 1}, tokens={llm: 100}, timeout=0.1)
    await backend.settle(llm)
    assert (await backend.state(rows)).available == 10
    assert (await backend.state(llm)).available == 99
    await llm.record_usage(held, 0, 0)


@pytest.mark.asyncio
async def test_admission_over_a_mix_of_backends(backend, redis_url):
    from redis_support import AtomicBackend, RedisBackend

    other = RedisBackend(redis_url) if backend.name == "atomic" else AtomicBackend()
    try:
        rows, llm = backend.unit(5), other.tokens(1_000)
        slots = other.unit(1)
        ticket = await try_admit(guards={rows: 2, slots: 1}, tokens={llm: 400})
        assert ticket is not None
        assert await try_admit(guards={rows: 2, slots: 1}, tokens={llm: 400}) is None
        assert (await backend.state(rows)).available == 3
        assert (await other.state(llm)).available == 600
        await ticket.close()
        await other.settle(llm)
        assert (await backend.state(rows)).available == 5
        assert (await other.state(slots)).available == 1
        assert (await other.state(llm)).available == 1_000
    finally:
        await other.aclose()


def test_admit_blocking_on_a_thread(sync_backend):
    rows, llm = sync_backend.unit(2), sync_backend.tokens(100)
    assert rows.try_reserve_sync(2)
    done = threading.Event()

    def worker() -> None:
        with admit_blocking(guards={rows: 1}, tokens={llm: 50}, timeout=DEADLINE) as ticket:
            llm.record_usage_sync(ticket.reservations[llm], 20, 20)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.05)
    assert not done.is_set()
    rows.release_sync(1)
    thread.join(DEADLINE)
    assert done.is_set()
    assert sync_backend.state_sync(rows).available == 1
    state = sync_backend.state_sync(llm)
    assert (state.available, state.consumed) == (60, 40)
