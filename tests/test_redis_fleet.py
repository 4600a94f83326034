"""One Redis budget shared by a fleet of real processes (spec section 10, with sections 5 and 7).

- A fleet of 4 worker processes (this file run as a script) works on ONE ``RedisTokenBudget``
  and ONE ``RedisBudget``: grants (try and waiting, async and sync), ``record_usage`` under,
  at and over the estimate (overage into debt), drops of armed reservations (granted on the
  event loop and by ``_sync`` calls), disarm + the refund called by hand, counters and permits.
  Once every worker has flushed and exited, the server's account is exact: ``consumed`` is the
  sum of what the workers recorded, nothing is reserved, nothing was reclaimed by expiry, and
  section 5's balance equation holds (no refills, no rate).
- A worker SIGKILLed while holding leases loses nothing for the others: its estimates stay held
  until the leases end, then one call reclaims them, exactly once; units it took with
  ``try_reserve`` (symmetric counters, no identity) do not come back.
- A ``record_usage`` that arrives after its lease was reclaimed charges the actual usage once.
- A child created by ``fork`` never refunds the reservations it inherited.

``COSTBOUND_LONG=1`` scales the fleet up.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from typing import Any

import pytest
import redis
import redis.asyncio
from costbound.redis import RedisBudget, RedisPermit, RedisReservation, RedisTokenBudget
from redis_support import unique

LONG = bool(os.environ.get("COSTBOUND_LONG"))
WORKERS = 4
OPS_PER_WORKER = 20_000 if LONG else 5_000
# Sized so that the fleet's recorded usage overtakes the capacity some way into the run: before
# that, waits, denials and transient debt while reservations crowd the budget; after it, debt.
TOKEN_CAPACITY = OPS_PER_WORKER * WORKERS * 200
UNIT_CAPACITY = 12
HELD_AT_MOST = 12


# ---------------------------------------------------------------------------------------------
# The worker processes (this file, run as a script)
# ---------------------------------------------------------------------------------------------


def _server_micros(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def _barrier(client: redis.Redis, key: str, parties: int) -> None:
    """Start together (setup synchronisation only): count in, then wait for the others."""
    client.incr(key)
    deadline = time.monotonic() + 60
    while int(client.get(key) or 0) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError("the other workers did not start")
        time.sleep(0.005)


async def _fleet_worker(spec: dict[str, Any]) -> dict[str, int]:
    rng = random.Random(spec["seed"])
    sclient = redis.Redis.from_url(spec["url"])
    aclient = redis.asyncio.Redis.from_url(spec["url"])
    tokens = RedisTokenBudget(
        spec["tokens"], spec["token_capacity"], client=aclient, sync_client=sclient
    )
    units = RedisBudget(spec["units"], spec["unit_capacity"], client=aclient, sync_client=sclient)
    stats: collections.Counter[str] = collections.Counter()
    held: list[tuple[RedisReservation, str]] = []  # (reservation, "async" | "sync")
    taken: list[int] = []  # units taken with try_reserve, given back with release
    permits: list[RedisPermit] = []
    _barrier(sclient, spec["barrier"], spec["parties"])

    def estimate() -> int:  # small ones and zeros too: the last tokens are taken, and overrun
        draw = rng.random()
        if draw < 0.05:
            return 0
        return rng.randint(1, 50) if draw < 0.2 else rng.randint(50, 2_000)

    def usage(r: RedisReservation) -> tuple[int, int]:
        kind = rng.choices(("under", "exact", "over"), (5, 2, 3))[0]
        est = r.estimate
        if kind == "under":
            actual = rng.randint(0, max(est - 1, 0))
        elif kind == "exact":
            actual = est
        else:
            actual = est + rng.randint(1, 2 * est + 1)
        stats[f"record_{kind}"] += 1
        stats["recorded"] += actual
        prompt = rng.randint(0, actual)
        return prompt, actual - prompt

    async def grant(sync: bool) -> None:
        est = estimate()
        r = tokens.try_reserve_tokens_sync(est) if sync else await tokens.try_reserve_tokens(est)
        if r is None:
            stats["denied"] += 1
        else:
            held.append((r, "sync" if sync else "async"))

    async def wait_for_grant(sync: bool) -> None:
        est, timeout = estimate(), rng.choice((0, 0.05))
        try:
            if sync:  # the blocking twin, on a thread (never on the loop's thread)
                r = await asyncio.to_thread(tokens.reserve_tokens_blocking, est, timeout=timeout)
            else:
                r = await tokens.reserve_tokens(est, timeout=timeout)
        except TimeoutError:
            stats["timed_out"] += 1
        else:
            held.append((r, "sync" if sync else "async"))

    async def grant_in_block() -> None:
        try:
            async with tokens.reserve_tokens(estimate(), timeout=0.05) as r:
                if rng.random() < 0.5:
                    await tokens.record_usage(r, *usage(r))
                else:
                    stats["left_armed_in_block"] += 1  # refunded on leaving the block
        except TimeoutError:
            stats["timed_out"] += 1

    async def record(sync: bool) -> None:
        r, _ = held.pop(rng.randrange(len(held)))
        prompt, completion = usage(r)
        if sync:
            tokens.record_usage_sync(r, prompt, completion)
        else:
            await tokens.record_usage(r, prompt, completion)
        assert not r.armed

    def drop() -> None:
        r, how = held.pop(rng.randrange(len(held)))
        stats[f"dropped_{how}"] += 1
        del r  # the last reference: the refund goes on the loop, or with the next call

    def disarm() -> None:
        r, _ = held.pop(rng.randrange(len(held)))
        refund = r.disarm()
        assert refund is not None
        assert not r.armed
        refund(r.estimate)
        stats["disarmed_and_refunded"] += 1

    async def look(sync: bool) -> None:
        snap = tokens.snapshot_sync() if sync else await tokens.snapshot()
        stats["snapshots"] += 1
        if snap.debt > 0:
            stats["debt_seen"] += 1

    async def unit_take(sync: bool) -> None:
        cost = rng.randint(1, 4)
        if rng.random() < 0.7:
            ok = units.try_reserve_sync(cost) if sync else await units.try_reserve(cost)
            if ok:
                taken.append(cost)
            else:
                stats["unit_denied"] += 1
            return
        try:
            if sync:
                permit = await asyncio.to_thread(units.reserve_blocking, cost, timeout=0.05)
            else:
                permit = await units.reserve(cost, timeout=0.05)
        except TimeoutError:
            stats["unit_timed_out"] += 1
        else:
            permits.append(permit)

    async def unit_give(sync: bool) -> None:
        if taken and (not permits or rng.random() < 0.5):
            cost = taken.pop(rng.randrange(len(taken)))
            if sync:
                units.release_sync(cost)
            else:
                await units.release(cost)
        elif permits:
            permit = permits.pop(rng.randrange(len(permits)))
            if sync:
                permit.release_sync()
            else:
                await permit.release()
            assert permit.released

    async def unit_op(sync: bool) -> None:
        if len(taken) + len(permits) < 6 and rng.random() < 0.5:
            await unit_take(sync)
        else:
            await unit_give(sync)
        stats["unit_ops"] += 1

    actions = ("grant", "wait", "block", "record", "drop", "disarm", "look", "unit")
    weights = (30, 3, 3, 30, 10, 5, 5, 12)

    async def run(count: int) -> None:
        for _ in range(count):
            action = rng.choices(actions, weights)[0]
            if action in ("grant", "wait", "block") and len(held) >= HELD_AT_MOST:
                action = "record"
            if action in ("record", "drop", "disarm") and not held:
                action = "grant"
            sync = rng.random() < 0.5
            if action == "grant":
                await grant(sync)
            elif action == "wait":
                await wait_for_grant(sync)
            elif action == "block":
                await grant_in_block()
            elif action == "record":
                await record(sync)
            elif action == "drop":
                drop()
            elif action == "disarm":
                disarm()
            elif action == "look":
                await look(sync)
            else:
                await unit_op(sync)
            stats["ops"] += 1
            await asyncio.sleep(0)

    # Two tasks share the objects (and the reservations) on one loop.
    share = spec["ops"] // 2
    await asyncio.gather(run(share), run(spec["ops"] - share))

    # Settle what is left: record half, drop the rest; give back every unit; then flush.
    while held:
        if len(held) % 2:
            await record(rng.random() < 0.5)
        else:
            drop()
    for cost in taken:
        await units.release(cost)
    for permit in permits:
        permit.release_sync()
    gc.collect()
    await tokens.flush()
    tokens.flush_sync()
    await units.flush()
    units.flush_sync()
    await aclient.aclose()
    sclient.close()
    return dict(stats)


async def _holding_worker(spec: dict[str, Any]) -> None:
    """Take leases and counters, report them, then wait to be killed."""
    sclient = redis.Redis.from_url(spec["url"])
    aclient = redis.asyncio.Redis.from_url(spec["url"])
    lease = spec["lease"]
    tokens = RedisTokenBudget(
        spec["tokens"], spec["token_capacity"], lease=lease, client=aclient, sync_client=sclient
    )
    units = RedisBudget(
        spec["units"], spec["unit_capacity"], lease=lease, client=aclient, sync_client=sclient
    )
    granted_after = _server_micros(sclient)  # no lease ends before this + `lease`
    held: list[Any] = [tokens.try_reserve_tokens_sync(est) for est in spec["sync_estimates"]]
    held += [await tokens.reserve_tokens(est, timeout=5) for est in spec["async_estimates"]]
    held.append(await units.reserve(spec["permit_costs"][0], timeout=5))
    held.append(await asyncio.to_thread(units.reserve_blocking, spec["permit_costs"][1], timeout=5))
    assert await units.try_reserve(spec["counter_cost"])
    assert all(h is not None for h in held)
    report = {
        "granted_after": granted_after,
        "granted_by": _server_micros(sclient),  # every lease ends at most `lease` after this
        "lease_ids": [h.lease_id for h in held],
    }
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # blocks until killed


def _worker_main(mode: str, spec: dict[str, Any]) -> None:
    if mode == "fleet":
        print(json.dumps(asyncio.run(_fleet_worker(spec))), flush=True)
    else:
        asyncio.run(_holding_worker(spec))


def _spawn(mode: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, mode, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sclient(redis_url: str) -> Any:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _wait_past(client: redis.Redis, micros: int) -> None:
    """Wait until the server's clock is past ``micros`` (lease ends are in server time)."""
    deadline = time.monotonic() + 30
    while (now := _server_micros(client)) <= micros:
        assert time.monotonic() < deadline, "the server's clock did not advance"
        time.sleep(min((micros - now) / 1e6 + 0.01, 0.5))


def test_fleet_of_processes_keeps_an_exact_account(redis_url, sclient):
    token_name, unit_name, barrier = unique("fleet-tokens"), unique("fleet-units"), unique("go")
    base = {
        "url": redis_url,
        "tokens": token_name,
        "units": unit_name,
        "token_capacity": TOKEN_CAPACITY,
        "unit_capacity": UNIT_CAPACITY,
        "barrier": barrier,
        "parties": WORKERS,
        "ops": OPS_PER_WORKER,
    }
    started = time.monotonic()
    workers = [_spawn("fleet", {**base, "seed": seed}) for seed in range(WORKERS)]
    reports, errors = [], []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
            errors.append(err)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        sclient.delete(barrier)
    elapsed = time.monotonic() - started

    total = collections.Counter[str]()
    for report in reports:
        total.update(report)
    tokens = RedisTokenBudget(token_name, TOKEN_CAPACITY, sync_client=sclient)
    units = RedisBudget(unit_name, UNIT_CAPACITY, sync_client=sclient)
    snap = tokens.snapshot_sync()
    print(
        f"\nfleet: {WORKERS} processes, {total['ops']} ops ({[r['ops'] for r in reports]}), "
        f"consumed {snap.consumed} of capacity {TOKEN_CAPACITY}, debt {snap.debt}, "
        f"{elapsed:.1f} s; {dict(sorted(total.items()))}"
    )

    assert all(report["ops"] >= OPS_PER_WORKER for report in reports)
    assert snap.consumed == total["recorded"]
    assert snap.outstanding == 0
    assert snap.reserved == 0
    assert snap.reclaimed == 0  # every reservation came back by record, refund or drop
    assert snap.available - snap.debt == TOKEN_CAPACITY - snap.consumed
    assert (snap.capacity, snap.rate) == (TOKEN_CAPACITY, 0.0)
    assert tokens.tokens_consumed_sync() == total["recorded"]
    # The workload did what it is meant to test.
    assert total["denied"] > 0
    assert total["timed_out"] > 0
    assert total["debt_seen"] > 0
    for kind in ("record_under", "record_exact", "record_over", "dropped_async", "dropped_sync"):
        assert total[kind] > 0, kind
    assert total["disarmed_and_refunded"] > 0
    # The unit budget used alongside: every counter and permit given back.
    usnap = units.snapshot_sync()
    assert (usnap.available, usnap.debt, usnap.consumed) == (UNIT_CAPACITY, 0, 0)
    assert (usnap.outstanding, usnap.reserved, usnap.reclaimed) == (0, 0, 0)
    assert total["unit_denied"] > 0
    # Nothing unraisable (a refund on drop), no stray warning or traceback in any worker.
    assert errors == [""] * WORKERS, "\n".join(errors)


def test_sigkilled_worker_loses_nothing_for_the_others(redis_url, sclient):
    token_name, unit_name = unique("killed-tokens"), unique("killed-units")
    token_capacity, unit_capacity, lease = 10_000, 50, 2.0
    sync_estimates, async_estimates = [100, 200, 300], [400, 500]
    permit_costs, counter_cost = [7, 4], 3
    # The test's own holds, on long leases: they must survive the reclaim.
    tokens = RedisTokenBudget(token_name, token_capacity, sync_client=sclient)
    units = RedisBudget(unit_name, unit_capacity, sync_client=sclient)
    mine = tokens.try_reserve_tokens_sync(1_000)
    my_permit = units.reserve_blocking(10)
    assert mine is not None

    worker = _spawn(
        "hold",
        {
            "url": redis_url,
            "tokens": token_name,
            "units": unit_name,
            "token_capacity": token_capacity,
            "unit_capacity": unit_capacity,
            "lease": lease,
            "sync_estimates": sync_estimates,
            "async_estimates": async_estimates,
            "permit_costs": permit_costs,
            "counter_cost": counter_cost,
        },
    )
    try:
        line = worker.stdout.readline()
        assert line, worker.stderr.read()
        report = json.loads(line)
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stdin.close()
        worker.stdout.close()
        worker.stderr.close()
    their_tokens = sum(sync_estimates) + sum(async_estimates)
    assert len(report["lease_ids"]) == 7

    # Before the leases end (2 s after the grants) the dead worker's estimates are still held.
    snap = tokens.snapshot_sync()
    assert _server_micros(sclient) < report["granted_after"] + lease * 1e6, "too slow to observe"
    assert (snap.outstanding, snap.reserved, snap.reclaimed) == (6, their_tokens + 1_000, 0)
    assert snap.available == token_capacity - their_tokens - 1_000
    usnap = units.snapshot_sync()
    assert (usnap.outstanding, usnap.reserved, usnap.reclaimed) == (3, 21, 0)
    assert usnap.available == unit_capacity - 21 - counter_cost

    # After them, one call reclaims every lease of the worker, once; ours stay.
    _wait_past(sclient, report["granted_by"] + round(lease * 1e6))
    snap = tokens.snapshot_sync()
    print(
        f"\nSIGKILL: reclaimed {snap.reclaimed} token leases ({their_tokens} tokens) "
        f"and {units.snapshot_sync().reclaimed} permits"
    )
    assert (snap.outstanding, snap.reserved, snap.reclaimed) == (1, 1_000, 5)
    assert snap.available - snap.debt == token_capacity - snap.consumed - 1_000
    assert snap.consumed == 0
    usnap = units.snapshot_sync()
    assert (usnap.outstanding, usnap.reserved, usnap.reclaimed) == (1, 10, 2)
    # try_reserve's units are a counter without identity: they do not come back.
    assert usnap.available == unit_capacity - 10 - counter_cost

    # Further calls give nothing back again.
    for _ in range(3):
        assert tokens.snapshot_sync() == snap
        assert units.snapshot_sync() == usnap
    assert tokens.extend_sync(mine, 60)  # our lease is still there
    tokens.record_usage_sync(mine, 600, 100)
    my_permit.release_sync()
    snap = tokens.snapshot_sync()
    assert (snap.outstanding, snap.reserved, snap.reclaimed, snap.consumed) == (0, 0, 5, 700)
    assert snap.available == token_capacity - 700
    usnap = units.snapshot_sync()
    assert (usnap.outstanding, usnap.reserved, usnap.reclaimed) == (0, 0, 2)
    assert usnap.available == unit_capacity - counter_cost
    units.refill_sync()  # only a refill brings the counter's units back
    assert units.snapshot_sync().available == unit_capacity


def test_record_after_reclaim_charges_the_actual_once_sync(sclient):
    capacity = 5_000
    tokens = RedisTokenBudget(unique("late"), capacity, lease=0.3, sync_client=sclient)
    r = tokens.try_reserve_tokens_sync(800)
    granted_by = _server_micros(sclient)
    other = RedisTokenBudget(tokens.name, capacity, lease=60, sync_client=sclient)
    kept = other.try_reserve_tokens_sync(500)  # a long lease: not reclaimed
    assert r is not None and kept is not None  # noqa: PT018
    _wait_past(sclient, granted_by + 300_000)

    snap = other.snapshot_sync()  # one call: reclaims the expired lease
    assert (snap.reclaimed, snap.outstanding, snap.reserved) == (1, 1, 500)
    assert snap.available == capacity - 500
    assert r.armed  # the client does not know yet
    assert not tokens.extend_sync(r, 10)  # False: the lease was reclaimed

    tokens.record_usage_sync(r, 150, 50)
    assert not r.armed
    snap = other.snapshot_sync()
    assert (snap.consumed, snap.available, snap.reclaimed) == (200, capacity - 500 - 200, 1)
    with pytest.raises(ValueError, match="already reconciled"):
        tokens.record_usage_sync(r, 150, 50)
    with pytest.raises(ValueError, match="already reconciled"):
        other.record_usage_sync(r, 150, 50)
    del r
    tokens.flush_sync()
    assert other.snapshot_sync() == snap  # charged once, nothing refunded by the drop

    other.record_usage_sync(kept, 0, 0)
    snap = other.snapshot_sync()
    assert (snap.consumed, snap.available, snap.outstanding) == (200, capacity - 200, 0)


@pytest.mark.asyncio
async def test_record_after_reclaim_charges_the_actual_once_async(redis_url):
    capacity = 5_000
    aclient = redis.asyncio.Redis.from_url(redis_url)
    try:
        tokens = RedisTokenBudget(unique("late"), capacity, lease=0.3, client=aclient)
        r = await tokens.reserve_tokens(800, timeout=5)
        seconds, micros = await aclient.time()
        granted_by = int(seconds) * 1_000_000 + int(micros)
        while True:  # wait for the server's clock to pass the lease's end
            seconds, micros = await aclient.time()
            if int(seconds) * 1_000_000 + int(micros) > granted_by + 300_000:
                break
            await asyncio.sleep(0.05)
        snap = await tokens.snapshot()
        assert (snap.reclaimed, snap.outstanding, snap.available) == (1, 0, capacity)
        assert not await tokens.extend(r, 10)

        await tokens.record_usage(r, 700, 600)  # over the estimate: charged in full
        snap = await tokens.snapshot()
        assert (snap.consumed, snap.available, snap.debt) == (1_300, capacity - 1_300, 0)
        with pytest.raises(ValueError, match="already reconciled"):
            await tokens.record_usage(r, 700, 600)
        del r
        await tokens.flush()
        assert await tokens.snapshot() == snap
    finally:
        await aclient.aclose()


@pytest.mark.asyncio
async def test_forked_child_never_refunds_inherited_reservations(redis_url, sclient):
    capacity = 10_000
    aclient = redis.asyncio.Redis.from_url(redis_url)
    try:
        tokens = RedisTokenBudget(unique("fork"), capacity, client=aclient, sync_client=sclient)
        watcher = RedisTokenBudget(tokens.name, capacity, sync_client=sclient)  # reads state
        kept = [tokens.try_reserve_tokens_sync(100), await tokens.try_reserve_tokens(200)]
        kept.append(await tokens.reserve_tokens(300, timeout=5))
        assert all(r is not None for r in kept)
        dropped_sync = tokens.try_reserve_tokens_sync(400)
        dropped_async = await tokens.try_reserve_tokens(500)
        assert dropped_sync is not None and dropped_async is not None  # noqa: PT018
        # Dropped in the parent just before the fork: the refunds are not sent yet (one waits
        # for the object's next call, the other for the loop to run it).
        del dropped_sync, dropped_async
        before = watcher.snapshot_sync()
        assert (before.outstanding, before.reserved) == (5, 1_500)

        with warnings.catch_warnings():
            # Python 3.12+ warns when a process that runs threads forks; the child does little.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: drop everything it inherited, make calls, leave
            code = 3
            try:
                kept.clear()  # the last references: dropped armed, in the child
                tokens.flush_sync()
                inherited = tokens.snapshot_sync()  # a call that would carry pending refunds
                own = tokens.try_reserve_tokens_sync(50)  # the child's own: refunded by it
                del own
                tokens.flush_sync()
                after = tokens.snapshot_sync()
                code = 0 if (inherited.outstanding, after.outstanding) == (5, 5) else 2
            finally:
                os._exit(code)
        # Blocking on purpose: the parent's loop must not run (and send the parent's own
        # refund) while the child looks at the budget.
        _, status = os.waitpid(pid, 0)  # noqa: ASYNC222
        assert os.waitstatus_to_exitcode(status) == 0

        assert watcher.snapshot_sync() == before  # the child gave nothing back

        # The parent's own refunds land, and it settles the rest normally.
        await tokens.flush()
        snap = watcher.snapshot_sync()
        assert (snap.outstanding, snap.reserved, snap.available) == (3, 600, capacity - 600)
        await tokens.record_usage(kept.pop(0), 50, 50)
        tokens.record_usage_sync(kept.pop(0), 150, 150)
        kept.clear()
        await tokens.flush()
        snap = watcher.snapshot_sync()
        assert (snap.outstanding, snap.reserved, snap.consumed) == (0, 0, 400)
        assert snap.available == capacity - 400
    finally:
        await aclient.aclose()


if __name__ == "__main__":
    _worker_main(sys.argv[1], json.loads(sys.argv[2]))
