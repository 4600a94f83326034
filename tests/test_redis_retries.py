"""Redis calls under redis-py's own retries, timeouts and cancellation (spec section 15).

- redis-py retries: an ordinary ``redis.Redis(host, port)`` (and ``redis.asyncio.Redis``) in
  redis-py 8 retries a command 10 times on a timeout or a dropped connection (exponential
  backoff with jitter, 10 ms to 1 s). Given a ``socket_timeout`` shorter than a stall of the
  server (SIGSTOP, then SIGCONT), every state-changing call reaches the server more than once:
  each is applied once (its id), for ``try_reserve``, ``release``, ``refill``, leases,
  settlements, refunds and extensions, sync and async.
- Timed out (a client without retries): the outcome is unknown; the take is rolled back by its
  id, a release / refill / settlement re-sent with its id, on the next call or ``flush``.
- Cancelled (asyncio): against a stalled server, after the command was sent; and against a live
  one at every await point of ``try_reserve``, ``release``, ``try_reserve_tokens`` and
  ``record_usage``. Each time the final account is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from costbound import BackendError
from costbound.redis import RedisBudget, RedisTokenBudget
from redis_support import RedisServer, unique

STALL = 0.5  # seconds the server is frozen
TIMEOUT = 0.1  # the clients' socket timeout: shorter than the stall, so redis-py retries


def _retrying(server: RedisServer) -> redis.Redis:
    """A client as users make them: redis-py's defaults (which retry) and a socket timeout."""
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=TIMEOUT)
    assert client.get_retry() is not None and client.get_retry().get_retries() > 0  # noqa: PT018
    return client


def _aretrying(server: RedisServer) -> redis.asyncio.Redis:
    client = redis.asyncio.Redis(host="127.0.0.1", port=server.port, socket_timeout=TIMEOUT)
    assert client.get_retry() is not None and client.get_retry().get_retries() > 0  # noqa: PT018
    return client


def _commands(client: redis.Redis) -> int:
    """Script calls the server has run so far (EVALSHA and EVAL)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


@pytest.fixture
def watch(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    yield client
    client.close()


def _state(budget: Any, watch: redis.Redis) -> tuple[int, int, int, int]:
    """(available, debt, consumed, outstanding) as the server holds them, read by another object."""
    cls = type(budget)
    snap = cls(budget.name, budget.capacity, sync_client=watch).snapshot_sync()
    return snap.available, snap.debt, snap.consumed, snap.outstanding


# ---------------------------------------------------------------------------------------------
# redis-py's own retries against a stalled server
# ---------------------------------------------------------------------------------------------


def test_retried_calls_are_applied_once_sync(redis_server, watch):
    client = _retrying(redis_server)
    try:
        units = RedisBudget(unique("retried"), 20, sync_client=client)
        tokens = RedisTokenBudget(unique("retried-tokens"), 100, sync_client=client)
        assert units.try_reserve_sync(10)
        over = tokens.try_reserve_tokens_sync(100)
        tokens.record_usage_sync(over, 300, 50)  # debt 250: a refill applied twice would show
        assert _state(tokens, watch) == (0, 250, 350, 0)

        def stalled(call: Callable[[], Any]) -> Any:
            before = _commands(watch)
            with redis_server.stalled(STALL):
                result = call()
            assert _commands(watch) - before >= 2, "redis-py did not send the call again"
            return result

        # Seen before the fix: True with 6 units gone; 2 released gave back 4; a refill ran twice.
        assert stalled(lambda: units.try_reserve_sync(3))
        assert _state(units, watch)[0] == 7
        stalled(lambda: units.release_sync(2))
        assert _state(units, watch)[0] == 9
        stalled(tokens.refill_sync)
        assert _state(tokens, watch) == (0, 150, 350, 0)
        stalled(tokens.refill_sync)
        assert _state(tokens, watch) == (0, 50, 350, 0)

        # Leases: a grant, an extension, a settlement, a refund, a permit and its release.
        tokens.refill_sync()
        assert _state(tokens, watch) == (50, 0, 350, 0)
        r = stalled(lambda: tokens.try_reserve_tokens_sync(30))
        assert r is not None
        assert _state(tokens, watch) == (20, 0, 350, 1)
        assert stalled(lambda: tokens.extend_sync(r, 60))
        stalled(lambda: tokens.record_usage_sync(r, 5, 5))
        assert _state(tokens, watch) == (40, 0, 360, 0)
        permit = stalled(lambda: units.reserve_blocking(4, timeout=30))
        assert _state(units, watch)[0::3] == (5, 1)
        stalled(permit.release_sync)
        assert _state(units, watch)[0::3] == (9, 0)
        dropped = tokens.try_reserve_tokens_sync(40)
        del dropped  # its refund goes with the next call, retried by redis-py
        stalled(tokens.flush_sync)
        assert _state(tokens, watch) == (40, 0, 360, 0)
    finally:
        client.close()


@pytest.mark.asyncio
async def test_retried_calls_are_applied_once_async(redis_server, watch):
    aclient = _aretrying(redis_server)
    try:
        units = RedisBudget(unique("aretried"), 20, client=aclient)
        tokens = RedisTokenBudget(unique("aretried-tokens"), 100, client=aclient)
        assert await units.try_reserve(10)
        over = await tokens.try_reserve_tokens(100)
        await tokens.record_usage(over, 300, 50)

        async def stalled(call: Callable[[], Awaitable[Any]]) -> Any:
            before = _commands(watch)
            with redis_server.stalled(STALL):
                result = await call()
            assert _commands(watch) - before >= 2, "redis-py did not send the call again"
            return result

        assert await stalled(lambda: units.try_reserve(3))
        assert _state(units, watch)[0] == 7
        await stalled(lambda: units.release(2))
        assert _state(units, watch)[0] == 9
        await stalled(tokens.refill)
        assert _state(tokens, watch) == (0, 150, 350, 0)
        await tokens.refill()
        await tokens.refill()
        r = await stalled(lambda: tokens.try_reserve_tokens(30))
        assert r is not None
        assert _state(tokens, watch) == (20, 0, 350, 1)
        assert await stalled(lambda: tokens.extend(r, 60))
        await stalled(lambda: tokens.record_usage(r, 5, 5))
        assert _state(tokens, watch) == (40, 0, 360, 0)
        permit = await stalled(lambda: units.reserve(4, timeout=30))
        assert _state(units, watch)[0::3] == (5, 1)
        await stalled(permit.release)
        assert _state(units, watch)[0::3] == (9, 0)
    finally:
        await aclient.aclose()


# ---------------------------------------------------------------------------------------------
# Timed out without retries: rolled back or re-sent by id
# ---------------------------------------------------------------------------------------------


def test_calls_that_timed_out_are_rolled_back_or_resent_by_id_sync(redis_server, redis_url, watch):
    # from_url makes a client that does not retry: the timeout reaches the caller.
    client = redis.Redis.from_url(redis_url, socket_timeout=TIMEOUT)
    try:
        units = RedisBudget(unique("timed-out"), 20, sync_client=client)
        tokens = RedisTokenBudget(unique("timed-out-tokens"), 100, sync_client=client)
        assert units.try_reserve_sync(10)
        r = tokens.try_reserve_tokens_sync(60)

        def timed_out(call: Callable[[], Any], budget: Any) -> None:
            # A connection is open beforehand, so the command is sent: the server runs it once
            # it resumes, after the client gave up on it.
            budget.snapshot_sync()
            with redis_server.stalled(STALL), pytest.raises(BackendError):
                call()

        timed_out(lambda: units.try_reserve_sync(3), units)
        timed_out(lambda: units.release_sync(5), units)
        timed_out(lambda: tokens.try_reserve_tokens_sync(10), tokens)
        timed_out(lambda: tokens.record_usage_sync(r, 20, 20), tokens)
        assert not r.armed  # the library owns the settlement now
        # Each call after the first carried the calls owed before it: the account is exact.
        assert _state(units, watch)[0] == 15
        assert _state(tokens, watch) == (60, 0, 40, 0)
        units.flush_sync()  # re-sent or rolled back by id: nothing changes twice
        tokens.flush_sync()
        assert _state(units, watch)[0] == 15
        assert _state(tokens, watch) == (60, 0, 40, 0)
    finally:
        client.close()


def test_a_rollback_that_overtakes_its_call_voids_it(redis_url, watch):
    units = RedisBudget(unique("overtaken"), 10, sync_client=watch)
    core = units._core
    # The rollback of a take arrives first (the take is still on its way, in another
    # connection's buffer): it leaves a tombstone; the take, arriving later, is refused.
    core.call_sync("test", b"void", "late-take", 4)
    assert core.call_sync("test", b"take", "late-take", 4)[0] == 0
    assert _state(units, watch)[0] == 10
    core.call_sync("test", b"void", "late-take", 4)  # a repeated rollback does nothing more
    assert core.call_sync("test", b"take", "other-take", 4)[0] == 1
    core.call_sync("test", b"void", "other-take", 4)  # undone once...
    core.call_sync("test", b"void", "other-take", 4)  # ...and only once
    assert core.call_sync("test", b"take", "other-take", 4)[0] == 0  # a late copy is refused
    assert _state(units, watch)[0] == 10


# ---------------------------------------------------------------------------------------------
# Cancellation
# ---------------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def aclient(redis_url: str) -> Any:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _cancel_once_sent(call: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(call)
    await asyncio.sleep(0.05)  # the command is written to the socket; no reply can come
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_calls_cancelled_after_sending_to_a_stalled_server_leave_an_exact_account(
    redis_server, aclient, watch
):
    units = RedisBudget(unique("cancelled"), 20, client=aclient)
    tokens = RedisTokenBudget(unique("cancelled-tokens"), 100, client=aclient)
    assert await units.try_reserve(10)
    r = await tokens.try_reserve_tokens(60)
    with redis_server.stalled(STALL):
        await _cancel_once_sent(units.try_reserve(3))
        await _cancel_once_sent(units.release(5))
        await _cancel_once_sent(tokens.try_reserve_tokens(10))
        await _cancel_once_sent(tokens.record_usage(r, 20, 20))
        await _cancel_once_sent(tokens.reserve_tokens(30, timeout=30))
    await units.flush()
    await tokens.flush()
    # Seen before the fix: (12, ...) and (30, 0, 40, 2): the units taken by the cancelled take
    # and grants were lost.
    assert _state(units, watch)[0] == 15
    assert _state(tokens, watch) == (60, 0, 40, 0)


STEPS = 40  # more loop turns than any of these calls takes on a loopback server


async def _cancel_at_every_step(
    make: Callable[[], Awaitable[Any]],
    check: Callable[[int, Any], Awaitable[None]],
    seen: set[str],
) -> None:
    """Cancel ``make()`` after 0, 1, 2, ... loop turns, and check the account after each.

    Cancelled at 0 turns, the coroutine never starts: the call is not made at all. At some
    turns redis-py itself lets the command finish despite the cancellation (the call returns).
    ``seen`` collects what happened: "cancelled" (after it started) and "finished".
    """
    for steps in range(STEPS):
        task = asyncio.ensure_future(make())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        cancelled = isinstance(outcome, asyncio.CancelledError)
        assert cancelled or not isinstance(outcome, BaseException), outcome
        await check(steps, outcome)
        seen.add("cancelled" if cancelled and steps else "finished" if not cancelled else "")
    assert "finished" in seen, seen


@pytest.mark.asyncio
async def test_cancellation_at_every_await_point_leaves_an_exact_account(aclient, watch):
    units = RedisBudget(unique("every-step"), 20, client=aclient)
    tokens = RedisTokenBudget(unique("every-step-tokens"), 1_000, client=aclient)
    seen: set[str] = set()

    async def took(steps: int, outcome: Any) -> None:
        await units.flush()
        expected = 17 if outcome is True else 20  # taken and reported, or nothing taken
        assert _state(units, watch)[0] == expected, (steps, outcome)
        if outcome is True:
            await units.release(3)

    await _cancel_at_every_step(lambda: units.try_reserve(3), took, seen)

    assert await units.try_reserve(10)

    async def released(steps: int, outcome: Any) -> None:
        await units.flush()
        if steps == 0:  # never started: nothing to give back
            assert _state(units, watch)[0] == 10
            return
        assert _state(units, watch)[0] == 12, (steps, outcome)  # given back once, either way
        assert await units.try_reserve(2)

    await _cancel_at_every_step(lambda: units.release(2), released, seen)

    async def leased(steps: int, outcome: Any) -> None:
        await tokens.flush()
        held = 0 if isinstance(outcome, BaseException) else 1
        assert _state(tokens, watch)[0::3] == (1_000 - 50 * held, held), (steps, outcome)
        if held:
            await tokens.record_usage(outcome, 0, 0)

    await _cancel_at_every_step(lambda: tokens.try_reserve_tokens(50), leased, seen)

    held: list[Any] = []
    consumed = [0]

    async def record() -> None:
        held.append(await tokens.try_reserve_tokens(100))
        await asyncio.sleep(0)  # the cancellation may land here, before record_usage starts
        await tokens.record_usage(held[-1], 4, 3)

    async def recorded(steps: int, outcome: Any) -> None:
        await tokens.flush()
        if held and held[-1].armed:  # never recorded (visible to the caller): it drops it
            held.pop()
            await tokens.flush()
        elif held:
            held.pop()
            consumed[0] += 7  # recorded once, whether the caller heard so or not
        assert _state(tokens, watch) == (1_000 - consumed[0], 0, consumed[0], 0), steps

    await _cancel_at_every_step(record, recorded, seen)
    # Cancellations landed after a call had started (not only before, or swallowed by redis-py).
    assert "cancelled" in seen, seen
