"""Contention: real threads and an event loop on one budget at once; the accounting stays exact.

Spec section 5: "a grant is never given twice and a unit is never lost, under any interleaving".
Every worker checks what it can check without a global lock while it runs, and the end state is
compared exactly with what the workers did. COSTBOUND_LONG=1 runs ten times the operations.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import sys
import threading
import types
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import pytest
from costbound import AtomicBudget, AtomicTokenBudget

SCALE = 10 if os.environ.get("COSTBOUND_LONG") else 1
THREADS = 8
ASYNC_TASKS = 32
MIN_OPERATIONS = 100_000 * SCALE
THREAD_STEPS = 10_000 * SCALE
TASK_STEPS = 800 * SCALE
# Waiting at the start line only guards against a hang if a worker dies before it: not timed.
START_TIMEOUT = 600


@pytest.fixture(autouse=True)
def fine_grained_thread_switches():
    # The default switch interval (5 ms) lets a thread run thousands of calls alone; hand the
    # interpreter over far more often so that the workers' calls interleave closely.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


@types.coroutine
def let_other_tasks_run():
    """Suspend once so the loop runs its other tasks (`asyncio.sleep(0)` without a clock)."""
    yield


def run_workers(thread_worker, loop_main, *, start: threading.Barrier):
    """THREADS threads running `thread_worker(index)` and one thread running an event loop.

    Returns the results of the threads followed by the list `loop_main()` returns. All start
    together at `start`, which has THREADS + 1 parties.
    """

    def event_loop_thread():
        start.wait(START_TIMEOUT)
        return asyncio.run(loop_main())

    with ThreadPoolExecutor(max_workers=THREADS + 1) as pool:
        threads = [pool.submit(thread_worker, index) for index in range(THREADS)]
        loop = pool.submit(event_loop_thread)
        results = [future.result() for future in threads]
        return results + loop.result()


# ---------------------------------------------------------------------------------------------
# AtomicBudget
# ---------------------------------------------------------------------------------------------

UNIT_CAPACITY = 64
MAX_COST = 16
MAX_HELD = 6  # one worker alone can ask for more than the capacity


class Summable:
    """Per-worker counters that add up field by field (the workers' totals)."""

    def __add__(self, other):
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class UnitStats(Summable):
    operations: int = 0
    grants: int = 0
    denials: int = 0
    granted_units: int = 0
    released_units: int = 0


class CountedHolds:
    """The units all workers hold, counted after each grant and before each release.

    Every counted unit is really held, so while the lock is held (the count cannot change) the
    budget's `available` plus the count can never exceed the capacity.
    """

    def __init__(self, budget: AtomicBudget) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self.units = 0
        self.peak = 0

    def granted(self, cost: int) -> None:
        with self._lock:
            self.units += cost
            self.peak = max(self.peak, self.units)
            assert self.units <= UNIT_CAPACITY, f"{self.units} units held at once"
            available = self._budget.available
            assert available + self.units <= UNIT_CAPACITY, (available, self.units)

    def releasing(self, cost: int) -> None:
        with self._lock:
            assert self.units >= cost
            self.units -= cost


def next_unit_step(rng: random.Random, held: list[int]) -> tuple[str, int]:
    """("release", a cost taken out of `held`) or ("reserve", a new cost)."""
    if held and (len(held) >= MAX_HELD or rng.random() < 0.4):
        return "release", held.pop(rng.randrange(len(held)))
    return "reserve", rng.randint(0, MAX_COST)


def unit_granted(budget: AtomicBudget, counted: CountedHolds, held: list[int], cost: int):
    counted.granted(cost)
    held.append(cost)
    # Without a lock: this worker's own holds are certainly taken, so at most the rest shows.
    assert budget.available + sum(held) <= UNIT_CAPACITY


def unit_thread(budget: AtomicBudget, counted: CountedHolds, start: threading.Barrier, seed: int):
    rng, held, stats = random.Random(seed), [], UnitStats()
    start.wait(START_TIMEOUT)
    for _ in range(THREAD_STEPS):
        action, cost = next_unit_step(rng, held)
        stats.operations += 1
        if action == "release":
            counted.releasing(cost)
            budget.release_sync(cost)
            stats.released_units += cost
        elif budget.try_reserve_sync(cost):
            unit_granted(budget, counted, held, cost)
            stats.grants += 1
            stats.granted_units += cost
        else:
            stats.denials += 1
    for cost in held:
        counted.releasing(cost)
        budget.release_sync(cost)
        stats.operations += 1
        stats.released_units += cost
    return stats


async def unit_task(budget: AtomicBudget, counted: CountedHolds, seed: int) -> UnitStats:
    rng, held, stats = random.Random(seed), [], UnitStats()
    for _ in range(TASK_STEPS):
        action, cost = next_unit_step(rng, held)
        stats.operations += 1
        if action == "release":
            counted.releasing(cost)
            await budget.release(cost)
            stats.released_units += cost
        elif await budget.try_reserve(cost):
            unit_granted(budget, counted, held, cost)
            stats.grants += 1
            stats.granted_units += cost
        else:
            stats.denials += 1
        await let_other_tasks_run()  # hold across a suspension, as real tasks do
    for cost in held:
        counted.releasing(cost)
        await budget.release(cost)
        stats.operations += 1
        stats.released_units += cost
    return stats


def test_unit_budget_never_grants_beyond_capacity_under_threads_and_a_loop():
    budget = AtomicBudget(UNIT_CAPACITY)
    counted = CountedHolds(budget)
    start = threading.Barrier(THREADS + 1)

    async def loop_main():
        tasks = (unit_task(budget, counted, 1_000 + i) for i in range(ASYNC_TASKS))
        return list(await asyncio.gather(*tasks))

    per_worker = run_workers(
        lambda i: unit_thread(budget, counted, start, i), loop_main, start=start
    )
    assert len(per_worker) == THREADS + ASYNC_TASKS
    total = sum(per_worker, UnitStats())

    assert total.operations >= THREADS * THREAD_STEPS + ASYNC_TASKS * TASK_STEPS
    assert total.operations >= MIN_OPERATIONS
    # Everything granted was given back, and nothing else: the budget is exactly full again.
    assert total.granted_units == total.released_units
    assert counted.units == 0
    assert budget.available == UNIT_CAPACITY
    assert budget.utilization == 0.0
    # The capacity was really contended: some asks were denied, and holds came near the top.
    assert total.grants > 0
    assert total.denials > 0
    assert counted.peak > UNIT_CAPACITY // 2


# ---------------------------------------------------------------------------------------------
# AtomicTokenBudget
# ---------------------------------------------------------------------------------------------

# For most of the run the estimates all workers hold exceed what recorded usage leaves of the
# capacity: asks are denied, the balance runs near zero, and a reply that overshoots by more
# than is available pushes it into debt until refunds pay it back. The capacity grows with the
# run so that usage never eats it all.
TOKEN_CAPACITY = 800_000 + 200_000 * SCALE
MAX_HELD_RESERVATIONS = 3


@dataclass
class TokenStats(Summable):
    operations: int = 0
    grants: int = 0
    denials: int = 0
    records: int = 0
    drops: int = 0
    disarms: int = 0
    recorded_tokens: int = 0


def token_estimate(rng: random.Random) -> int:
    # Mostly a generous ceiling, as max_tokens is; sometimes a tight guess that replies overshoot.
    return rng.randint(1_000, 60_000) if rng.random() < 0.7 else rng.randint(0, 10)


def token_usage(rng: random.Random, estimate: int, available: int) -> tuple[int, int]:
    """(prompt, completion): under a generous estimate, at or over a tight one; and now and
    then, when little is left, further over than what is available: debt."""
    if available < 500 and rng.random() < 0.05:
        actual = estimate + available + rng.randint(1, 100)
    elif estimate > 10:
        actual = rng.randint(0, 8)
    else:
        actual = estimate + rng.randint(0, 8)
    prompt = rng.randint(0, actual)
    return prompt, actual - prompt


def next_token_step(rng: random.Random, held: int) -> tuple[str, int]:
    """("reserve", 0) or a way to settle the held reservation at the returned index."""
    if held and (held >= MAX_HELD_RESERVATIONS or rng.random() < 0.5):
        action = rng.choices(("record", "drop", "disarm"), weights=(6, 2, 2))[0]
        return action, rng.randrange(held)
    return "reserve", 0


def token_granted(budget: AtomicTokenBudget, held: list, consumed_before: int) -> None:
    # Without a lock: with no refill, balance == capacity - consumed - (all estimates held), and
    # consumed only grows, so what is available never exceeds what this worker's holds leave.
    mine = sum(r.estimate for r in held)
    assert budget.available <= max(TOKEN_CAPACITY - consumed_before - mine, 0)


def settle(held: list, action: str, index: int, stats: TokenStats) -> None:
    """Settle without recording: drop, or disarm and call the refund (threads and tasks alike)."""
    stats.operations += 1
    if action == "drop":
        del held[index]  # the only reference: the estimate is refunded here
        stats.drops += 1
    else:  # disarm, then call the refund it hands over
        reservation = held.pop(index)
        estimate = reservation.estimate
        refund = reservation.disarm()
        del reservation
        assert refund is not None
        refund(estimate)
        stats.disarms += 1


def token_thread(budget: AtomicTokenBudget, start: threading.Barrier, seed: int) -> TokenStats:
    rng, held, stats = random.Random(seed), [], TokenStats()
    start.wait(START_TIMEOUT)
    for _ in range(THREAD_STEPS):
        action, index = next_token_step(rng, len(held))
        if action == "reserve":
            consumed_before = budget.consumed
            reservation = budget.try_reserve_tokens_sync(token_estimate(rng))
            stats.operations += 1
            if reservation is None:
                stats.denials += 1
                continue
            held.append(reservation)
            del reservation
            token_granted(budget, held, consumed_before)
            stats.grants += 1
        elif action == "record":
            reservation = held.pop(index)
            prompt, completion = token_usage(rng, reservation.estimate, budget.available)
            budget.record_usage_sync(reservation, prompt, completion)
            del reservation
            stats.operations += 1
            stats.records += 1
            stats.recorded_tokens += prompt + completion
        else:
            settle(held, action, index, stats)
    while held:
        settle(held, "drop", len(held) - 1, stats)
    return stats


async def token_task(budget: AtomicTokenBudget, seed: int) -> TokenStats:
    rng, held, stats = random.Random(seed), [], TokenStats()
    for _ in range(TASK_STEPS):
        action, index = next_token_step(rng, len(held))
        if action == "reserve":
            consumed_before = await budget.tokens_consumed()
            reservation = await budget.try_reserve_tokens(token_estimate(rng))
            stats.operations += 1
            if reservation is None:
                stats.denials += 1
            else:
                held.append(reservation)
                del reservation
                token_granted(budget, held, consumed_before)
                stats.grants += 1
        elif action == "record":
            reservation = held.pop(index)
            prompt, completion = token_usage(rng, reservation.estimate, budget.available)
            await budget.record_usage(reservation, prompt, completion)
            del reservation
            stats.operations += 1
            stats.records += 1
            stats.recorded_tokens += prompt + completion
        else:
            settle(held, action, index, stats)
        await let_other_tasks_run()  # hold across a suspension, as a task awaiting a model does
    while held:
        settle(held, "drop", len(held) - 1, stats)
    return stats


def test_token_budget_accounting_is_exact_under_threads_and_a_loop():
    budget = AtomicTokenBudget(TOKEN_CAPACITY)
    start = threading.Barrier(THREADS + 1)

    async def loop_main():
        return list(
            await asyncio.gather(*(token_task(budget, 1_000 + i) for i in range(ASYNC_TASKS)))
        )

    per_worker = run_workers(lambda i: token_thread(budget, start, i), loop_main, start=start)
    assert len(per_worker) == THREADS + ASYNC_TASKS
    total = sum(per_worker, TokenStats())

    assert total.operations >= THREADS * THREAD_STEPS + ASYNC_TASKS * TASK_STEPS
    assert total.operations >= MIN_OPERATIONS
    assert total.grants == total.records + total.drops + total.disarms
    assert min(total.records, total.drops, total.disarms, total.denials) > 0
    # Every recorded token is counted once; every estimate came back or was settled, once.
    assert budget.consumed == total.recorded_tokens
    assert budget.tokens_consumed_sync() == total.recorded_tokens
    assert budget.available - budget.debt == TOKEN_CAPACITY - budget.consumed


# ---------------------------------------------------------------------------------------------
# One reservation, two threads: record against drop and disarm
# ---------------------------------------------------------------------------------------------

PRODUCERS = 2
CONSUMER_PAIRS = 4
PER_PRODUCER = 17_000 * SCALE
RACE_CAPACITY = 10**12  # never denies here: the race is over each reservation, not the capacity


def produce(budget, pairs, start, seed):
    """Reserve, and hand each reservation to both consumers of one pair."""
    rng = random.Random(seed)
    start.wait(START_TIMEOUT)
    try:
        for n in range(PER_PRODUCER):
            reservation = budget.try_reserve_tokens_sync(rng.randint(0, 1_000))
            assert reservation is not None
            for consumer_queue in pairs[rng.randrange(CONSUMER_PAIRS)]:
                consumer_queue.put(((seed, n), reservation))
            del reservation
    finally:  # the consumers stop after one end mark from each producer, even if this failed
        for pair in pairs:
            for consumer_queue in pair:
                consumer_queue.put(None)
    return PER_PRODUCER


def consume(budget, consumer_queue, start, seed):
    """Record, disarm or drop each reservation received; say which calls won."""
    rng = random.Random(seed)
    outcomes, recorded_tokens, finished = [], 0, 0
    start.wait(START_TIMEOUT)
    while finished < PRODUCERS:
        item = consumer_queue.get()
        if item is None:
            finished += 1
            continue
        key, reservation = item
        del item
        action = rng.choice(("record", "disarm", "drop"))
        if action == "record":
            prompt, completion = rng.randint(0, 1_500), rng.randint(0, 1_500)
            try:
                budget.record_usage_sync(reservation, prompt, completion)
            except ValueError:
                won = False
            else:
                won = True
                recorded_tokens += prompt + completion
        elif action == "disarm":
            estimate = reservation.estimate
            refund = reservation.disarm()
            won = refund is not None
            if refund is not None:
                refund(estimate)
        else:
            won = None  # dropping only lets go: whoever lets go last refunds, if it is armed
        del reservation
        outcomes.append((key, action, won))
    return outcomes, recorded_tokens


def test_record_races_drop_and_disarm_of_the_same_reservations():
    budget = AtomicTokenBudget(RACE_CAPACITY)
    pairs = [(queue.SimpleQueue(), queue.SimpleQueue()) for _ in range(CONSUMER_PAIRS)]
    consumers = [q for pair in pairs for q in pair]
    start = threading.Barrier(PRODUCERS + len(consumers))
    with ThreadPoolExecutor(max_workers=PRODUCERS + len(consumers)) as pool:
        taken = [pool.submit(consume, budget, q, start, 100 + i) for i, q in enumerate(consumers)]
        made = [pool.submit(produce, budget, pairs, start, seed) for seed in range(PRODUCERS)]
        reserved = sum(future.result() for future in made)
        results = [future.result() for future in taken]

    by_reservation = defaultdict(list)
    for outcomes, _ in results:
        for key, action, won in outcomes:
            by_reservation[key].append((action, won))
    operations = reserved + sum(len(outcomes) for outcomes, _ in results)
    assert operations == 3 * PRODUCERS * PER_PRODUCER
    assert operations >= MIN_OPERATIONS
    assert len(by_reservation) == reserved

    lost = defaultdict(int)
    for key, seen in by_reservation.items():
        assert len(seen) == 2, key
        active = [won for action, won in seen if action != "drop"]
        if active:
            # Exactly one claim wins. Whoever recorded or disarmed while the other only let go
            # held it armed, so it won.
            assert active.count(True) == 1, (key, seen)
        for action, won in seen:
            lost[action] += won is False
    # Both ways of losing were seen: a record after the other's record or disarm (ValueError),
    # and a disarm after the other's record or disarm (None).
    assert lost["record"] > 0
    assert lost["disarm"] > 0

    # Each estimate was settled exactly once: by a record, a called refund or the last drop.
    recorded_tokens = sum(tokens for _, tokens in results)
    assert budget.consumed == recorded_tokens
    assert budget.debt == 0
    assert budget.available == RACE_CAPACITY - recorded_tokens
