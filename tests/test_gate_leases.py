"""A gate's Redis guards are leases; abandoned streams are charged on every backend (issue 12, 14).

Eight gated streams abandoned unread on an 8-slot ``RedisBudget``: taken as counters their
slots were gone for good (7 of 8 left after one), and their Redis token reservations were
refunded although the requests were billed. Taken as leases, the slots come back when the leases
end, and each stream is charged its estimate on the Redis token budget as on an atomic one.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import time

import openai
import pytest
from costbound import AtomicTokenBudget, BudgetExhausted
from costbound.integrations.openai import guard
from redis_support import RedisBackend

httpx = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])

CHAT = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "x" * 400}],  # 129 input tokens
    "max_completion_tokens": 100,
    "stream": True,
}
ESTIMATE = 129 + 100
SLOTS = 8


def _sse(request):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]},
        {
            **chunk,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        },
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def _client(kind):
    transport = httpx.MockTransport(_sse)
    if kind == "async":
        return openai.AsyncOpenAI(
            api_key="k", max_retries=0, http_client=httpx.AsyncClient(transport=transport)
        )
    return openai.OpenAI(api_key="k", max_retries=0, http_client=httpx.Client(transport=transport))


async def _open(kind, client):
    if kind == "async":
        return await client.chat.completions.create(**CHAT)
    return await asyncio.to_thread(lambda: client.chat.completions.create(**CHAT))


async def _abandon(kind, client, count):
    """Open ``count`` streams and drop each unread (its pass is collected)."""
    for _ in range(count):
        stream = await _open(kind, client)
        del stream
    gc.collect()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_abandoned_streams_give_their_redis_slots_back_and_are_charged(kind, redis_url):
    backend = RedisBackend(redis_url)
    try:
        slots = backend.unit(SLOTS, lease=2.0)
        tokens = backend.tokens(100_000)
        client = guard(_client(kind), tokens=tokens, guards={slots: 1})
        await _abandon(kind, client, SLOTS)
        await slots.flush()  # a dropped permit is released without blocking, then sent
        deadline = time.monotonic() + 20  # the leases would end 2 s after their grant
        while (await slots.snapshot()).available < SLOTS:
            assert time.monotonic() < deadline, "the abandoned streams' slots never came back"
            await asyncio.sleep(0.1)
        snapshot = await slots.snapshot()
        assert snapshot.available == SLOTS  # 8 of 8, not 7 or 0
        # Each came back when its pass was dropped, not when its lease ran out (which is
        # what a crashed worker's slot waits for).
        assert snapshot.reclaimed == 0

        await tokens.flush()
        assert (await tokens.snapshot()).available == 100_000 - SLOTS * ESTIMATE
        assert (await tokens.snapshot()).outstanding == 0  # every lease ended, none refunded

        # The slots serve new calls again, a stream read to its end settles its usage, and a
        # guard above what every slot can hold is a denial naming the Redis budget.
        stream = await _open(kind, client)
        if kind == "async":
            [chunk async for chunk in stream]
        else:
            await asyncio.to_thread(lambda: list(stream))
        await tokens.flush()
        assert (await tokens.snapshot()).available == 100_000 - SLOTS * ESTIMATE - 4
        assert (await slots.snapshot()).available == SLOTS
        greedy = guard(_client(kind), tokens=tokens, guards={slots: SLOTS + 1})
        with pytest.raises(BudgetExhausted) as denied:
            await _open(kind, greedy)
        assert (denied.value.budget, denied.value.amount) == (slots, SLOTS + 1)
    finally:
        await backend.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_abandoned_streams_are_charged_alike_on_atomic_and_redis_tokens(kind, redis_url):
    backend = RedisBackend(redis_url)
    try:
        stored, atomic = backend.tokens(100_000), AtomicTokenBudget(100_000)
        client = guard(_client(kind), tokens=stored)
        twin = guard(_client(kind), tokens=atomic)
        await _abandon(kind, client, 3)
        await _abandon(kind, twin, 3)
        await stored.flush()
        snapshot = await stored.snapshot()
        assert snapshot.available == atomic.available == 100_000 - 3 * ESTIMATE
        # Charged as a settlement at the estimate on both: counted in consumed, not just kept.
        assert snapshot.consumed == atomic.consumed == 3 * ESTIMATE
        assert snapshot.outstanding == 0
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_a_blocking_client_called_on_an_event_loop_takes_its_redis_lease(redis_url):
    # Blocking SDK clients are called from async code; a gate that does not wait takes its
    # budgets on any thread, and a Redis guard's lease too (reserve_blocking refuses a loop's
    # thread, since it could wait there: with timeout=0 it never does).
    backend = RedisBackend(redis_url)
    try:
        slots, tokens = backend.unit(1), backend.tokens(100_000)
        client = guard(_client("sync"), tokens=tokens, guards={slots: 1})
        stream = client.chat.completions.create(**CHAT)  # on this loop's thread
        assert (await slots.snapshot()).outstanding == 1
        assert [chunk.choices for chunk in stream][-1] == []  # read to its end: settled
        snapshot = await slots.snapshot()
        assert (snapshot.available, snapshot.outstanding) == (1, 0)
    finally:
        await backend.aclose()


class Slow(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A chat stream whose chunks come 0.1 s apart, for 1.7 s."""

    def __init__(self) -> None:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
        delta = {
            **chunk,
            "choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": None}],
        }
        usage = {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
        events = [delta] * 15 + [{**chunk, "choices": [], "usage": usage}]
        self.parts = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]

    def __iter__(self):
        for part in self.parts:
            time.sleep(0.1)
            yield part

    async def __aiter__(self):
        for part in self.parts:
            await asyncio.sleep(0.1)
            yield part


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_stream_longer_than_its_leases_keeps_them(kind, redis_url):
    # Leases of 1 s, a stream of 1.7 s: the gated stream renews its guard's permit and its token
    # reservation as it reads, so no lease ends (and no slot is handed out twice) while it runs.
    backend = RedisBackend(redis_url)
    try:
        slots, tokens = backend.unit(1, lease=1.0), backend.tokens(100_000, lease=1.0)

        def answer(request):
            headers = {"content-type": "text/event-stream"}
            return httpx.Response(200, stream=Slow(), headers=headers)

        transport = httpx.MockTransport(answer)
        if kind == "async":
            sdk = openai.AsyncOpenAI(
                api_key="k", max_retries=0, http_client=httpx.AsyncClient(transport=transport)
            )
        else:
            sdk = openai.OpenAI(
                api_key="k", max_retries=0, http_client=httpx.Client(transport=transport)
            )
        client = guard(sdk, tokens=tokens, guards={slots: 1})
        stream = await _open(kind, client)
        if kind == "async":
            chunks = [chunk async for chunk in stream]
        else:
            chunks = await asyncio.to_thread(lambda: list(stream))
        assert len(chunks) == 16
        await tokens.flush()
        slot_state, token_state = await slots.snapshot(), await tokens.snapshot()
        assert (slot_state.available, slot_state.reclaimed) == (1, 0)  # never expired
        assert (token_state.consumed, token_state.reclaimed) == (13, 0)
        assert token_state.available == 100_000 - 13
    finally:
        await backend.aclose()
