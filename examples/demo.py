"""A simulated fleet of LLM calls gated by costbound, with the accounting checked at the end.

Asyncio tasks and worker threads share one token budget and one concurrency-slot budget. Each
call takes a slot, reserves an estimate, "calls the model", and records the usage the provider
"reports": usually less than the estimate, sometimes more (an overage), and some calls are
cancelled or fail midway, so their reservations are dropped and refund themselves.

Run it with ``make demo`` (or ``python examples/demo.py`` once costbound is installed).
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from dataclasses import dataclass, field

from costbound import AtomicBudget, AtomicTokenBudget, TokenReservation

TOKENS = 1_200_000  # the fleet's token budget
SLOTS = 12  # concurrent model calls allowed
CALL_TIMEOUT = 0.0035  # seconds; slower async calls are cancelled by asyncio.wait_for
ASYNC_CALLS = 900
THREADS = 4
CALLS_PER_THREAD = 150


@dataclass
class Accounting:
    """What the fleet itself saw, to compare against what the budgets say."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    granted: int = 0
    denied_slot: int = 0
    denied_tokens: int = 0
    estimated: int = 0
    actual: int = 0
    overages: int = 0
    cancelled: int = 0
    refunded: int = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


tokens = AtomicTokenBudget(TOKENS)
slots = AtomicBudget(SLOTS)
seen = Accounting()


def plan_call(rng: random.Random) -> tuple[int, int, float]:
    """An estimate, the usage the provider will report, and how long the call takes."""
    estimate = rng.randint(500, 4_000)
    if rng.random() < 0.2:
        actual = int(estimate * rng.uniform(1.05, 1.8))  # an overage
    else:
        actual = int(estimate * rng.uniform(0.3, 1.0))
    return estimate, actual, rng.uniform(0.0005, 0.004)


class CallAbandonedError(Exception):
    """A threaded call abandoned midway (a client disconnect)."""


def settle(reservation: TokenReservation, actual: int) -> None:
    """Record the provider's usage; the split into prompt and completion is arbitrary."""
    prompt = actual * 2 // 3
    tokens.record_usage_sync(reservation, prompt, actual - prompt)
    seen.add(actual=actual, overages=int(actual > reservation.estimate))


async def async_call(rng: random.Random) -> None:
    estimate, actual, duration = plan_call(rng)
    if not await slots.try_reserve(1):
        seen.add(denied_slot=1)
        return
    try:
        reservation = await tokens.try_reserve_tokens(estimate)
        if reservation is None:
            seen.add(denied_tokens=1)
            return
        seen.add(granted=1, estimated=estimate)
        try:
            await asyncio.wait_for(asyncio.sleep(duration), CALL_TIMEOUT)  # the model call
        except TimeoutError:
            # Cancelled: the reservation is never recorded; it refunds itself when dropped.
            seen.add(cancelled=1, refunded=estimate)
            return
        settle(reservation, actual)
    finally:
        await slots.release(1)


async def async_fleet(seed: int) -> None:
    rng = random.Random(seed)
    tasks = []
    for _ in range(ASYNC_CALLS):
        tasks.append(asyncio.create_task(async_call(rng)))
        await asyncio.sleep(0.0002 if rng.random() < 0.5 else 0)
    await asyncio.gather(*tasks)


def thread_worker(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CALLS_PER_THREAD):
        estimate, actual, duration = plan_call(rng)
        if not slots.try_reserve_sync(1):
            seen.add(denied_slot=1)
            time.sleep(0.001)
            continue
        try:
            reservation = tokens.try_reserve_tokens_sync(estimate)
            if reservation is None:
                seen.add(denied_tokens=1)
                continue
            seen.add(granted=1, estimated=estimate)
            time.sleep(duration)  # the model call
            if rng.random() < 0.08:
                seen.add(cancelled=1, refunded=estimate)
                raise CallAbandonedError  # the reservation is dropped unrecorded: it refunds
            settle(reservation, actual)
        except CallAbandonedError:
            pass
        finally:
            slots.release_sync(1)


def main() -> int:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 2026
    started = time.perf_counter()
    workers = [threading.Thread(target=thread_worker, args=(seed + i,)) for i in range(THREADS)]
    for worker in workers:
        worker.start()
    asyncio.run(async_fleet(seed))
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started

    calls = ASYNC_CALLS + THREADS * CALLS_PER_THREAD
    rows = [
        ("calls attempted", f"{calls:,} ({ASYNC_CALLS:,} asyncio tasks, {THREADS} threads)"),
        ("granted", f"{seen.granted:,}"),
        ("denied: no free slot", f"{seen.denied_slot:,}"),
        ("denied: tokens exhausted", f"{seen.denied_tokens:,}"),
        ("cancelled midway (refunded)", f"{seen.cancelled:,} calls, {seen.refunded:,} tokens"),
        ("estimated (granted calls)", f"{seen.estimated:,} tokens"),
        ("actual (recorded)", f"{seen.actual:,} tokens, {seen.overages:,} overages"),
        ("budget consumed", f"{tokens.consumed:,} of {tokens.capacity:,} tokens"),
        ("budget available / debt", f"{tokens.available:,} / {tokens.debt:,}"),
        ("slots available", f"{slots.available} of {slots.capacity}"),
        ("elapsed", f"{elapsed:.2f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    print("costbound demo: a simulated fleet of LLM calls\n")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")

    # Nothing is held now, so the balance equation of the token budget reads:
    #   available - debt == capacity - consumed
    checks = {
        "consumed equals the usage the fleet recorded": tokens.consumed == seen.actual,
        "available - debt == capacity - consumed": (
            tokens.available - tokens.debt == tokens.capacity - tokens.consumed
        ),
        "every slot was given back": slots.available == slots.capacity,
        "every attempt was granted or denied": (
            seen.granted + seen.denied_slot + seen.denied_tokens == calls
        ),
    }
    print()
    for claim, holds in checks.items():
        print(f"  [{'ok' if holds else 'FAILED'}] {claim}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
