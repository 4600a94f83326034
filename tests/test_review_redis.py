"""A Redis ``reserve`` / ``reserve_tokens`` request is single-use, as a native one is (spec 11a).

Found in review: the request object took a new hold on every ``async with``, so entering it
again after its exit, awaiting it and then entering it, or two tasks entering it at once, took
two holds from one request (the second entry overwrote the first's hold, which then stayed out
until its lease ended). Each later use is a ``RuntimeError`` now, and nothing more is taken.
"""

from __future__ import annotations

import asyncio

import pytest
from redis_support import RedisBackend


def _requests(backend: RedisBackend):
    slots = backend.unit(2, lease=60.0)
    tokens = backend.tokens(1_000, lease=60.0)
    return [
        ("permit", slots, lambda: slots.reserve(1, timeout=1.0)),
        ("token request", tokens, lambda: tokens.reserve_tokens(500, timeout=1.0)),
    ]


async def _held(budget) -> int:
    snapshot = await budget.snapshot()
    return snapshot.capacity - snapshot.available


@pytest.mark.asyncio
async def test_a_redis_request_is_entered_once(redis_url):
    backend = RedisBackend(redis_url)
    try:
        for _kind, budget, make in _requests(backend):
            request = make()
            async with request:
                pass
            assert await _held(budget) == 0
            with pytest.raises(RuntimeError, match="single-use"):
                async with request:
                    pass
            await budget.flush()
            assert await _held(budget) == 0
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_a_redis_request_awaited_then_entered_is_refused(redis_url):
    backend = RedisBackend(redis_url)
    try:
        for kind, budget, make in _requests(backend):
            request = make()
            held = await request
            with pytest.raises(RuntimeError, match="single-use"):
                async with request:
                    pass
            unit = 1 if kind == "permit" else 500
            assert await _held(budget) == unit  # one hold, not two
            if kind == "permit":
                await held.release()
            else:
                await budget.record_usage(held, 0, 0)
            assert await _held(budget) == 0
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_two_tasks_entering_one_redis_request_take_one_hold(redis_url):
    backend = RedisBackend(redis_url)
    try:
        for kind, budget, make in _requests(backend):
            request = make()
            inside = asyncio.Event()

            async def enter(request=request, inside=inside) -> None:
                async with request:
                    inside.set()
                    await asyncio.sleep(0.05)

            results = await asyncio.gather(enter(), enter(), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 1, kind
            assert isinstance(errors[0], RuntimeError)
            await budget.flush()
            assert await _held(budget) == 0  # the one hold came back; none left to its lease
    finally:
        await backend.aclose()
