"""The seed's own examples (spec section 6), protocols, reprs, errors, debt and saturation."""

from __future__ import annotations

import asyncio
import weakref

import pytest
from costbound import (
    AtomicBudget,
    AtomicTokenBudget,
    BackendError,
    BudgetError,
    BudgetGuard,
    TokenBudget,
    TokenReservation,
)

MAX_U64 = 2**64 - 1
MAX_TOKEN_CAPACITY = 2**63 - 1
DEBT_CAP = 2**63


def balance(tb: AtomicTokenBudget) -> int:
    """``available - debt``: the signed balance of a token budget."""
    return tb.available - tb.debt


# --- Section 6, exactly as written, awaited --------------------------------------------------


@pytest.mark.asyncio
async def test_seed_unit_reserve_and_release_async():
    b = AtomicBudget(100)
    assert await b.try_reserve(60) and await b.try_reserve(40)  # noqa: PT018 (as written in the spec)
    assert not await b.try_reserve(1)
    await b.release(50)
    assert await b.try_reserve(50)


@pytest.mark.asyncio
async def test_seed_unit_release_capped_refill_utilization_async():
    b = AtomicBudget(10)
    await b.try_reserve(5)
    await b.release(100)
    assert b.available == 10
    b = AtomicBudget(100)
    await b.try_reserve(75)
    b.refill()
    assert b.available == 100
    b = AtomicBudget(100)
    await b.try_reserve(40)
    assert b.utilization == 0.4


@pytest.mark.asyncio
async def test_seed_token_consumed_and_denial_async():
    tb = AtomicTokenBudget(1_000)
    r = await tb.try_reserve_tokens(400)
    await tb.record_usage(r, 120, 80)
    assert await tb.tokens_consumed() == 200
    hold = await tb.try_reserve_tokens(800)
    assert await tb.try_reserve_tokens(1) is None
    assert hold is not None


@pytest.mark.asyncio
async def test_seed_token_overage_charged_async():
    tb = AtomicTokenBudget(1_000)
    r = await tb.try_reserve_tokens(100)
    await tb.record_usage(r, 150, 50)
    assert tb.available == 800


@pytest.mark.asyncio
async def test_seed_token_two_reservations_async():
    tb = AtomicTokenBudget(1_000)
    a = await tb.try_reserve_tokens(400)
    b2 = await tb.try_reserve_tokens(400)
    await tb.record_usage(a, 100, 100)
    assert tb.available == 400
    await tb.record_usage(b2, 200, 200)
    assert tb.available == 400 and tb.consumed == 600  # noqa: PT018 (as written in the spec)


@pytest.mark.asyncio
async def test_seed_token_drop_refunds_async():
    tb = AtomicTokenBudget(1_000)
    r = await tb.try_reserve_tokens(400)
    del r
    assert tb.available == 1_000 and tb.consumed == 0  # noqa: PT018 (as written in the spec)


# --- Section 6 through the _sync twins ------------------------------------------------------


def test_seed_unit_reserve_and_release_sync():
    b = AtomicBudget(100)
    assert b.try_reserve_sync(60) and b.try_reserve_sync(40)  # noqa: PT018 (as written in the spec)
    assert not b.try_reserve_sync(1)
    b.release_sync(50)
    assert b.try_reserve_sync(50)


def test_seed_unit_release_capped_refill_utilization_sync():
    b = AtomicBudget(10)
    b.try_reserve_sync(5)
    b.release_sync(100)
    assert b.available == 10
    b = AtomicBudget(100)
    b.try_reserve_sync(75)
    b.refill()
    assert b.available == 100
    b = AtomicBudget(100)
    b.try_reserve_sync(40)
    assert b.utilization == 0.4


def test_seed_token_consumed_and_denial_sync():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(400)
    tb.record_usage_sync(r, 120, 80)
    assert tb.tokens_consumed_sync() == 200
    hold = tb.try_reserve_tokens_sync(800)
    assert tb.try_reserve_tokens_sync(1) is None
    assert hold is not None


def test_seed_token_overage_charged_sync():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(100)
    tb.record_usage_sync(r, 150, 50)
    assert tb.available == 800


def test_seed_token_two_reservations_sync():
    tb = AtomicTokenBudget(1_000)
    a = tb.try_reserve_tokens_sync(400)
    b2 = tb.try_reserve_tokens_sync(400)
    tb.record_usage_sync(a, 100, 100)
    assert tb.available == 400
    tb.record_usage_sync(b2, 200, 200)
    assert tb.available == 400 and tb.consumed == 600  # noqa: PT018 (as written in the spec)


def test_seed_token_drop_refunds_sync():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(400)
    del r
    assert tb.available == 1_000 and tb.consumed == 0  # noqa: PT018 (as written in the spec)


# --- Protocols ------------------------------------------------------------------------------


def test_native_budgets_satisfy_their_protocols():
    assert isinstance(AtomicBudget(1), BudgetGuard)
    assert isinstance(AtomicTokenBudget(1), TokenBudget)


def test_native_budgets_do_not_satisfy_the_other_protocol():
    assert not isinstance(AtomicBudget(1), TokenBudget)
    assert not isinstance(AtomicTokenBudget(1), BudgetGuard)


class UserGuard:
    """A user-written BudgetGuard: a plain counter."""

    def __init__(self, capacity: int) -> None:
        self.available = capacity

    async def try_reserve(self, cost: int) -> bool:
        if cost > self.available:
            return False
        self.available -= cost
        return True

    async def release(self, cost: int) -> None:
        self.available += cost


class UserTokenBudget:
    """A user-written TokenBudget that builds its reservations with a Python refund."""

    def __init__(self, capacity: int) -> None:
        self.available = capacity
        self.consumed = 0

    def _refund(self, amount: int) -> None:
        self.available += amount

    async def try_reserve_tokens(self, estimate: int) -> TokenReservation | None:
        if estimate > self.available:
            return None
        self.available -= estimate
        return TokenReservation(estimate, self._refund)

    async def record_usage(self, reservation: TokenReservation, prompt: int, completion: int):
        refund = reservation.disarm()
        if refund is None:
            raise ValueError("already reconciled")
        self.consumed += prompt + completion
        self.available += reservation.estimate - (prompt + completion)

    async def tokens_consumed(self) -> int:
        return self.consumed


class NotABudget:
    async def try_reserve_tokens(self, estimate: int) -> None:
        return None


@pytest.mark.asyncio
async def test_user_written_budgets_satisfy_the_runtime_protocols():
    guard = UserGuard(10)
    tokens = UserTokenBudget(100)
    assert isinstance(guard, BudgetGuard)
    assert isinstance(tokens, TokenBudget)
    assert not isinstance(NotABudget(), TokenBudget)
    assert not isinstance(NotABudget(), BudgetGuard)
    # And they work as the protocol describes, with the public TokenReservation.
    assert await guard.try_reserve(10)
    assert not await guard.try_reserve(1)
    r = await tokens.try_reserve_tokens(60)
    assert isinstance(r, TokenReservation)
    assert r.armed
    await tokens.record_usage(r, 10, 20)
    assert not r.armed
    assert await tokens.tokens_consumed() == 30
    assert tokens.available == 70
    dropped = await tokens.try_reserve_tokens(50)
    assert tokens.available == 20
    del dropped
    assert tokens.available == 70


# --- Reprs ----------------------------------------------------------------------------------


def test_unit_budget_repr_is_informative():
    b = AtomicBudget(123)
    assert b.try_reserve_sync(23)
    text = repr(b)
    assert "AtomicBudget" in text
    assert "123" in text
    assert "100" in text


def test_token_budget_repr_is_informative():
    tb = AtomicTokenBudget(1_234)
    r = tb.try_reserve_tokens_sync(100)
    tb.record_usage_sync(r, 300, 7)
    # available 1234 - 307 = 927, consumed 307
    text = repr(tb)
    assert "AtomicTokenBudget" in text
    assert "1234" in text
    assert "927" in text
    assert "307" in text
    r = tb.try_reserve_tokens_sync(0)
    tb.record_usage_sync(r, 2_000, 0)
    # overage 2000 > 927 available: debt 1073
    assert "1073" in repr(tb)


def test_reservation_repr_is_informative():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(456)
    assert "TokenReservation" in repr(r)
    assert "456" in repr(r)
    custom = TokenReservation(789, lambda n: None)
    assert "TokenReservation" in repr(custom)
    assert "789" in repr(custom)


# --- Errors ---------------------------------------------------------------------------------


def test_error_hierarchy():
    assert issubclass(BackendError, BudgetError)
    assert issubclass(BudgetError, Exception)
    assert isinstance(BackendError("x"), BudgetError)
    with pytest.raises(BudgetError):
        raise BackendError("connection refused")


def test_backend_error_message_prefix():
    assert str(BackendError("x")).startswith("budget backend error: ")
    assert "x" in str(BackendError("x"))
    assert str(BackendError("connection refused")).startswith("budget backend error: ")


# --- Under asyncio helpers ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_methods_under_gather():
    b = AtomicBudget(100)
    results = await asyncio.gather(b.try_reserve(40), b.try_reserve(40), b.try_reserve(40))
    assert sorted(results) == [False, True, True]
    assert b.available == 20
    assert await asyncio.gather(b.release(40), b.release(40)) == [None, None]
    assert b.available == 100

    tb = AtomicTokenBudget(1_000)
    reservations = await asyncio.gather(*(tb.try_reserve_tokens(300) for _ in range(4)))
    granted = [r for r in reservations if r is not None]
    assert len(granted) == 3
    assert tb.available == 100
    await asyncio.gather(*(tb.record_usage(r, 50, 50) for r in granted))
    assert await asyncio.gather(tb.tokens_consumed()) == [300]
    assert tb.available == 700


@pytest.mark.asyncio
async def test_async_methods_under_wait_for():
    b = AtomicBudget(10)
    assert await asyncio.wait_for(b.try_reserve(7), timeout=5)
    assert not await asyncio.wait_for(b.try_reserve(7), timeout=5)
    assert await asyncio.wait_for(b.release(7), timeout=5) is None
    assert b.available == 10

    tb = AtomicTokenBudget(100)
    r = await asyncio.wait_for(tb.try_reserve_tokens(60), timeout=5)
    assert isinstance(r, TokenReservation)
    assert await asyncio.wait_for(tb.try_reserve_tokens(60), timeout=5) is None
    await asyncio.wait_for(tb.record_usage(r, 5, 5), timeout=5)
    assert await asyncio.wait_for(tb.tokens_consumed(), timeout=5) == 10
    assert tb.available == 90


@pytest.mark.asyncio
async def test_async_methods_under_ensure_future():
    b = AtomicBudget(10)
    fut = asyncio.ensure_future(b.try_reserve(4))
    assert await fut is True
    assert fut.result() is True
    assert b.available == 6
    assert await asyncio.ensure_future(b.release(4)) is None
    assert b.available == 10

    tb = AtomicTokenBudget(100)
    r = await asyncio.ensure_future(tb.try_reserve_tokens(30))
    assert isinstance(r, TokenReservation)
    assert tb.available == 70
    await asyncio.ensure_future(tb.record_usage(r, 10, 0))
    assert await asyncio.ensure_future(tb.tokens_consumed()) == 10
    assert tb.available == 90


# --- Utilization, debt, refill, saturation --------------------------------------------------


def test_utilization_of_zero_capacity_is_zero():
    b = AtomicBudget(0)
    assert b.utilization == 0.0
    assert isinstance(b.utilization, float)
    assert not b.try_reserve_sync(1)
    assert b.utilization == 0.0


def test_utilization_spans_zero_to_one():
    b = AtomicBudget(8)
    assert b.utilization == 0.0
    assert b.try_reserve_sync(2)
    assert b.utilization == 0.25
    assert b.try_reserve_sync(6)
    assert b.utilization == 1.0


def test_overage_beyond_available_becomes_debt():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(100)
    tb.record_usage_sync(r, 1_000, 500)
    assert tb.consumed == 1_500
    assert tb.available == 0
    assert tb.debt == 500
    assert balance(tb) == tb.capacity - tb.consumed


def test_in_debt_even_zero_estimate_is_denied():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(0)
    tb.record_usage_sync(r, 1_001, 0)
    assert tb.debt == 1
    assert tb.try_reserve_tokens_sync(0) is None
    assert tb.try_reserve_tokens_sync(1) is None
    assert (tb.available, tb.debt, tb.consumed) == (0, 1, 1_001)


@pytest.mark.asyncio
async def test_in_debt_even_zero_estimate_is_denied_async():
    tb = AtomicTokenBudget(10)
    r = await tb.try_reserve_tokens(10)
    await tb.record_usage(r, 11, 0)
    assert tb.debt == 1
    assert await tb.try_reserve_tokens(0) is None
    assert (tb.available, tb.debt, tb.consumed) == (0, 1, 11)


def test_refunds_pay_debt_first():
    tb = AtomicTokenBudget(1_000)
    held = tb.try_reserve_tokens_sync(300)
    under = tb.try_reserve_tokens_sync(200)
    over = tb.try_reserve_tokens_sync(100)
    assert tb.available == 400
    # An overage of 1_400 against 400 available: 1_000 of debt.
    tb.record_usage_sync(over, 1_000, 500)
    assert (tb.available, tb.debt) == (0, 1_000)
    # Dropping a reservation refunds its estimate to the debt, not to `available`.
    del held
    assert (tb.available, tb.debt) == (0, 700)
    # Recording under the estimate refunds the difference to the debt too.
    tb.record_usage_sync(under, 50, 0)
    assert (tb.available, tb.debt) == (0, 550)
    assert balance(tb) == tb.capacity - tb.consumed
    assert tb.try_reserve_tokens_sync(0) is None


def test_refill_pays_debt_first():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(0)
    tb.record_usage_sync(r, 2_500, 0)
    assert (tb.available, tb.debt) == (0, 1_500)
    tb.refill()
    assert (tb.available, tb.debt) == (0, 500)
    assert tb.try_reserve_tokens_sync(0) is None
    tb.refill()
    assert (tb.available, tb.debt) == (500, 0)
    tb.refill()
    assert (tb.available, tb.debt) == (1_000, 0)
    assert tb.consumed == 2_500


def test_refill_caps_at_capacity():
    tb = AtomicTokenBudget(100)
    tb.refill()
    assert tb.available == 100
    r = tb.try_reserve_tokens_sync(40)
    tb.refill()
    assert tb.available == 100
    del r
    assert tb.available == 100


def test_consumed_and_debt_saturate():
    tb = AtomicTokenBudget(10)
    first = tb.try_reserve_tokens_sync(0)
    second = tb.try_reserve_tokens_sync(0)
    third = tb.try_reserve_tokens_sync(0)
    tb.record_usage_sync(first, 2**63, 0)
    assert tb.consumed == 2**63
    assert tb.debt == 2**63 - 10
    # prompt + completion above 2**64-1 saturates rather than wrapping or raising.
    tb.record_usage_sync(second, MAX_U64, MAX_U64)
    assert tb.consumed == MAX_U64
    assert tb.debt == DEBT_CAP
    assert tb.available == 0
    tb.record_usage_sync(third, 1, 1)
    assert tb.consumed == MAX_U64
    assert tb.debt == DEBT_CAP
    assert tb.tokens_consumed_sync() == MAX_U64
    # A saturated debt is still paid by refills.
    tb.refill()
    assert tb.debt == DEBT_CAP - 10
    assert tb.available == 0


def test_debt_saturates_at_largest_capacity():
    tb = AtomicTokenBudget(MAX_TOKEN_CAPACITY)
    r = tb.try_reserve_tokens_sync(MAX_TOKEN_CAPACITY)
    assert tb.available == 0
    tb.record_usage_sync(r, MAX_U64, MAX_U64)
    assert tb.consumed == MAX_U64
    assert tb.debt == DEBT_CAP
    tb.refill()
    assert tb.debt == 1
    tb.refill()
    assert (tb.available, tb.debt) == (MAX_TOKEN_CAPACITY - 1, 0)


def test_unit_budget_extremes():
    b = AtomicBudget(MAX_U64)
    assert b.try_reserve_sync(MAX_U64)
    assert b.available == 0
    assert b.utilization == 1.0
    assert not b.try_reserve_sync(1)
    b.release_sync(MAX_U64)
    b.release_sync(MAX_U64)
    assert b.available == MAX_U64
    assert b.capacity == MAX_U64


@pytest.mark.asyncio
async def test_tokens_consumed_matches_consumed_property():
    tb = AtomicTokenBudget(1_000)
    for prompt, completion in [(1, 2), (30, 40), (0, 0)]:
        r = await tb.try_reserve_tokens(100)
        await tb.record_usage(r, prompt, completion)
        assert await tb.tokens_consumed() == tb.consumed == tb.tokens_consumed_sync()
    assert tb.consumed == 73


def test_budgets_can_be_weakly_referenced():
    budgets = [AtomicBudget(1), AtomicTokenBudget(1)]
    refs = [weakref.ref(b) for b in budgets]
    assert [r() for r in refs] == budgets
    del budgets
    assert [r() for r in refs] == [None, None]
