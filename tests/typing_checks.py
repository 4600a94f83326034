"""Checked by ``mypy --strict`` (not run): the native budgets satisfy the protocols statically."""

from __future__ import annotations

import asyncio

from costbound import (
    AtomicBudget,
    AtomicTokenBudget,
    BudgetGuard,
    Permit,
    Ticket,
    TokenBudget,
    TokenRefund,
    TokenReservation,
    admit,
    admit_blocking,
    try_admit,
)
from costbound.testing import ManualClock


async def gate(guard: BudgetGuard, tokens: TokenBudget) -> int:
    if await guard.try_reserve(1):
        await guard.release(1)
    reservation = await tokens.try_reserve_tokens(10)
    if reservation is not None:
        await tokens.record_usage(reservation, 3, 4)
    return await tokens.tokens_consumed()


async def main() -> int:
    unit: BudgetGuard = AtomicBudget(10)
    token: TokenBudget = AtomicTokenBudget(100)
    refund: TokenRefund = print
    custom = TokenReservation(5, refund)
    assert custom.disarm() is refund
    return await gate(unit, token)


async def waiting() -> int:
    rows = AtomicBudget(10, rate=1.5)
    llm = AtomicTokenBudget(1_000, rate=1_000 / 60, clock=ManualClock())
    async with rows.reserve(1, timeout=2.0) as permit:
        held: Permit = permit
        assert held.cost == 1
        assert not held.released
    permit = await rows.reserve(2)
    permit.release()
    async with llm.reserve_tokens(100) as reservation:
        await llm.record_usage(reservation, 10, 20)
    armed: TokenReservation = await llm.reserve_tokens(5, timeout=None)
    with llm.reserve_tokens_blocking(5) as blocking:
        assert blocking.armed
        assert armed.armed
    with rows.reserve_blocking(1):
        pass
    async with admit(guards={rows: 1}, tokens={llm: 10}, timeout=1.0) as ticket:
        done: Ticket = ticket
        await llm.record_usage(done.reservations[llm], 1, 1)
    maybe: Ticket | None = await try_admit(guards={rows: 1})
    if maybe is not None:
        await maybe.close()
    with admit_blocking(tokens={llm: 1}) as sync_ticket:
        assert not sync_ticket.closed
    return rows.waiters + llm.waiters


async def fleet() -> int:
    import redis
    import redis.asyncio
    from costbound.redis import RedisBudget, RedisPermit, RedisReservation, RedisTokenBudget

    aclient = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    sclient = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    rows: BudgetGuard = RedisBudget("acme:rows", 10_000, client=aclient, sync_client=sclient)
    llm = RedisTokenBudget("acme:tokens", 2_000_000, rate=2_000_000 / 60, client=aclient)
    tokens: TokenBudget = llm
    permit: RedisPermit = await RedisBudget("acme:rpm", 500, client=aclient).reserve(1)
    await permit.spend()
    reservation: RedisReservation = await llm.reserve_tokens(800, timeout=5.0)
    extended: bool = await llm.extend(reservation, 60.0)
    assert extended
    await llm.record_usage(reservation, 100, 200)
    async with admit(guards={rows: 1}, tokens={tokens: 800}, timeout=5.0) as ticket:
        assert ticket.reservations[tokens].armed
    return (await llm.snapshot()).consumed + await gate(rows, tokens)


def stacks() -> None:
    import openai
    from costbound import BudgetExhausted, Usage, estimate_tokens, usage_of, usd
    from costbound.integrations import Gate
    from costbound.integrations.openai import guard
    from costbound.prices import Price, PriceTable, price_of

    tokens, dollars = AtomicTokenBudget(2_000_000), AtomicTokenBudget(usd(5))
    table = PriceTable({"m": Price(input=0.15, output=0.6)})
    client: openai.OpenAI = guard(
        openai.OpenAI(api_key="k"), tokens=tokens, dollars=dollars, wait=1.0, prices=table
    )
    assert client.api_key == "k"
    used: Usage = usage_of({"prompt_tokens": 1, "completion_tokens": 2})
    micro: int = price_of(used, model="m", table=table)
    estimate: int = estimate_tokens("hello", max_output_tokens=10)
    passed = Gate(tokens=tokens).enter_sync(model="m", prompt="hello")
    passed.settle_sync(used)
    error = BudgetExhausted(tokens, estimate + micro)
    assert error.amount > 0


async def as_tasks() -> None:
    # Every awaitable is a coroutine to asyncio's tasks (spec 11a), and typed as one.
    rows = AtomicBudget(2)
    llm = AtomicTokenBudget(10)
    granted: asyncio.Task[bool] = asyncio.create_task(rows.try_reserve(1))
    permit: asyncio.Task[Permit] = asyncio.create_task(rows.reserve(1))
    reservation: asyncio.Task[TokenReservation] = asyncio.create_task(llm.reserve_tokens(1))
    ticket: asyncio.Task[Ticket] = asyncio.create_task(admit(guards={rows: 1}))
    await asyncio.gather(granted, permit, reservation, ticket)
