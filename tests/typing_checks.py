"""Checked by ``mypy --strict`` (not run): the native budgets satisfy the protocols statically."""

from __future__ import annotations

from costbound import (
    AtomicBudget,
    AtomicTokenBudget,
    BudgetGuard,
    TokenBudget,
    TokenRefund,
    TokenReservation,
)


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
