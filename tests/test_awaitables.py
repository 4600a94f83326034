"""The async methods' awaitables: a grant is made on the first step, as a coroutine's would be.

`try_reserve` and `try_reserve_tokens` check their argument when called and take units only when
awaited, so an awaitable that is never awaited, closed, or whose task is cancelled before it
starts takes nothing. `release` and `record_usage` act when called, so they are never lost.
"""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import types

import pytest
from costbound import AtomicBudget, AtomicTokenBudget


@pytest.mark.asyncio
async def test_create_task_accepts_the_awaitables() -> None:
    b = AtomicBudget(3)
    tb = AtomicTokenBudget(100)
    assert await asyncio.create_task(b.try_reserve(2)) is True
    assert await asyncio.create_task(b.try_reserve(2)) is False
    r = await asyncio.create_task(tb.try_reserve_tokens(40))
    assert r is not None
    assert r.estimate == 40
    await asyncio.create_task(tb.record_usage(r, 10, 5))
    assert await asyncio.create_task(tb.tokens_consumed()) == 15
    await asyncio.create_task(b.release(2))
    assert b.available == 3
    assert isinstance(b.try_reserve(1), collections.abc.Coroutine)


@pytest.mark.asyncio
async def test_task_cancelled_before_it_starts_takes_nothing() -> None:
    b = AtomicBudget(3)
    tb = AtomicTokenBudget(100)
    tasks = [asyncio.create_task(b.try_reserve(1)), asyncio.create_task(tb.try_reserve_tokens(9))]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (b.available, tb.available) == (3, 100)


def test_an_awaitable_never_awaited_takes_nothing() -> None:
    b = AtomicBudget(3)
    tb = AtomicTokenBudget(100)
    pending = [b.try_reserve(3), tb.try_reserve_tokens(100)]
    assert (b.available, tb.available) == (3, 100)
    del pending
    gc.collect()
    assert (b.available, tb.available) == (3, 100)


@pytest.mark.asyncio
async def test_closed_awaitable_takes_nothing_and_cannot_be_awaited() -> None:
    b = AtomicBudget(3)
    pending = b.try_reserve(1)
    pending.close()
    with pytest.raises(RuntimeError, match="already awaited"):
        await pending
    assert b.available == 3


@pytest.mark.asyncio
async def test_an_awaited_grant_cannot_be_awaited_again() -> None:
    b = AtomicBudget(3)
    tb = AtomicTokenBudget(100)
    pending = b.try_reserve(1)
    assert await pending is True
    with pytest.raises(RuntimeError, match="already awaited"):
        await pending
    tokens = tb.try_reserve_tokens(10)
    r = await tokens
    with pytest.raises(RuntimeError, match="already awaited"):
        await tokens
    assert (b.available, tb.available) == (2, 90)
    del r


def test_release_and_record_act_when_called() -> None:
    b = AtomicBudget(3)
    tb = AtomicTokenBudget(100)
    assert b.try_reserve_sync(3)
    b.release(3)  # not awaited: a release is never lost
    assert b.available == 3
    r = tb.try_reserve_tokens_sync(50)
    tb.record_usage(r, 20, 10)
    assert (tb.available, tb.consumed, r.armed) == (70, 30, False)


@pytest.mark.asyncio
async def test_completed_awaitables_can_be_awaited_repeatedly() -> None:
    b = AtomicBudget(3)
    done = b.release(0)
    assert [await done, await done] == [None, None]


def test_thrown_exception_propagates_and_the_grant_is_never_made() -> None:
    b = AtomicBudget(3)
    pending = b.try_reserve(1)
    with pytest.raises(KeyError):
        pending.throw(KeyError("stop"))
    with pytest.raises(ValueError, match="bad"):
        b.try_reserve(1).throw(ValueError, "bad")
    with pytest.raises(RuntimeError, match="already awaited"):
        pending.send(None)
    assert b.available == 3


def test_generator_based_coroutines_can_yield_from_them() -> None:
    b = AtomicBudget(3)

    @types.coroutine
    def legacy() -> collections.abc.Generator[object, None, bool]:
        return (yield from b.try_reserve(2).__await__())

    async def main() -> bool:
        return await legacy()

    assert asyncio.run(main()) is True
    assert b.available == 1
    with pytest.raises(StopIteration) as stopped:
        legacy().send(None)  # driven by hand: it finishes in its first step
    assert stopped.value.value is False
    assert b.available == 1


def test_argument_errors_are_raised_when_called() -> None:
    b = AtomicBudget(3)
    tb = AtomicTokenBudget(100)
    with pytest.raises(TypeError, match="cost"):
        b.try_reserve(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimate"):
        tb.try_reserve_tokens(-1)
