"""The error table of spec section 2, on every constructor and method that takes an argument.

Each misuse must raise the documented exception, name the offending argument, and leave the
budget (available, debt, consumed) and the reservation (armed) exactly as they were.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, TokenReservation

MAX_U64 = 2**64 - 1
MAX_TOKEN_CAPACITY = 2**63 - 1


class Index:
    """Not an int, but offers ``__index__`` as NumPy integers do."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"Index({self.value})"


class IntSub(int):
    """A subclass of int (not bool)."""


class Opaque:
    """An arbitrary object with a stable repr (for test ids)."""

    def __repr__(self) -> str:
        return "Opaque()"


BAD_TYPES = [
    1.0,
    "1",
    None,
    True,
    False,
    Decimal(1),
    Fraction(1, 1),
    b"1",
    [1],
    Opaque(),
    np.float64(1.0),
    np.True_,
]
BAD_RANGE = [-1, 2**64, -(2**64), np.int64(-1), Index(-1), Index(2**64)]
TOKEN_CAPACITY_BAD_RANGE = [*BAD_RANGE, 2**63, np.uint64(2**63), np.uint64(MAX_U64)]
GOOD_U64 = [0, 1, MAX_U64, np.int64(5), np.uint64(MAX_U64), Index(3), Index(MAX_U64), IntSub(7)]
GOOD_TOKEN_CAPACITY = [
    0,
    1,
    MAX_TOKEN_CAPACITY,
    np.int64(5),
    np.uint64(MAX_TOKEN_CAPACITY),
    Index(3),
    IntSub(7),
]

MODES = ["sync", "async"]


async def invoke(mode: str, obj: Any, method: str, *args: Any) -> Any:
    """Call ``method`` (awaited) or its ``_sync`` twin; an error may come at call or at await."""
    if mode == "sync":
        return getattr(obj, f"{method}_sync")(*args)
    return await getattr(obj, method)(*args)


def names(message: str, argument: str) -> bool:
    return re.search(rf"\b{argument}\b", message) is not None


def check_type_error(info: pytest.ExceptionInfo[TypeError], argument: str) -> None:
    assert names(str(info.value), argument), str(info.value)


def check_range_error(info: pytest.ExceptionInfo[ValueError], argument: str, upper: int) -> None:
    message = str(info.value)
    assert names(message, argument), message
    assert str(upper) in message, message


# --- Budgets in a non-trivial state, and their full observable state -------------------------


def unit_budget() -> AtomicBudget:
    b = AtomicBudget(100)
    assert b.try_reserve_sync(30)
    return b


def unit_state(b: AtomicBudget) -> tuple[int, int, float]:
    return (b.capacity, b.available, b.utilization)


def token_budget() -> tuple[AtomicTokenBudget, TokenReservation]:
    """A budget with consumed usage and an armed reservation of 300."""
    tb = AtomicTokenBudget(1_000)
    done = tb.try_reserve_tokens_sync(100)
    tb.record_usage_sync(done, 20, 30)
    held = tb.try_reserve_tokens_sync(300)
    assert held is not None
    assert tb.available == 650
    return tb, held


def token_state(tb: AtomicTokenBudget) -> tuple[int, int, int, int, int]:
    return (tb.capacity, tb.available, tb.debt, tb.consumed, tb.tokens_consumed_sync())


# --- Capacities -----------------------------------------------------------------------------


@pytest.mark.parametrize("budget_type", [AtomicBudget, AtomicTokenBudget])
@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
def test_capacity_not_an_int_is_type_error(budget_type, bad):
    with pytest.raises(TypeError) as info:
        budget_type(bad)
    check_type_error(info, "capacity")


@pytest.mark.parametrize("bad", BAD_RANGE, ids=repr)
def test_unit_capacity_out_of_range_is_value_error(bad):
    with pytest.raises(ValueError) as info:  # noqa: PT011 (the message is checked below)
        AtomicBudget(bad)
    check_range_error(info, "capacity", MAX_U64)


@pytest.mark.parametrize("bad", TOKEN_CAPACITY_BAD_RANGE, ids=repr)
def test_token_capacity_out_of_range_is_value_error(bad):
    with pytest.raises(ValueError) as info:  # noqa: PT011
        AtomicTokenBudget(bad)
    check_range_error(info, "capacity", MAX_TOKEN_CAPACITY)


@pytest.mark.parametrize("good", GOOD_U64, ids=repr)
def test_unit_capacity_accepts_integers(good):
    b = AtomicBudget(good)
    assert b.capacity == int(good)
    assert type(b.capacity) is int
    assert b.available == int(good)


@pytest.mark.parametrize("good", GOOD_TOKEN_CAPACITY, ids=repr)
def test_token_capacity_accepts_integers(good):
    tb = AtomicTokenBudget(good)
    assert tb.capacity == int(good)
    assert type(tb.capacity) is int
    assert tb.available == int(good)
    assert (tb.debt, tb.consumed) == (0, 0)


# --- Unit costs -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["try_reserve", "release"])
@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
async def test_cost_not_an_int_is_type_error(mode, method, bad):
    b = unit_budget()
    before = unit_state(b)
    with pytest.raises(TypeError) as info:
        await invoke(mode, b, method, bad)
    check_type_error(info, "cost")
    assert unit_state(b) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["try_reserve", "release"])
@pytest.mark.parametrize("bad", BAD_RANGE, ids=repr)
async def test_cost_out_of_range_is_value_error(mode, method, bad):
    b = unit_budget()
    before = unit_state(b)
    with pytest.raises(ValueError) as info:  # noqa: PT011
        await invoke(mode, b, method, bad)
    check_range_error(info, "cost", MAX_U64)
    assert unit_state(b) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("good", GOOD_U64, ids=repr)
async def test_cost_accepts_integers(mode, good):
    b = AtomicBudget(MAX_U64)
    assert await invoke(mode, b, "try_reserve", good) is True
    assert b.available == MAX_U64 - int(good)
    assert await invoke(mode, b, "release", good) is None
    assert b.available == MAX_U64

    small = AtomicBudget(2)
    expected = int(good) <= 2
    assert await invoke(mode, small, "try_reserve", good) is expected
    assert small.available == (2 - int(good) if expected else 2)


# --- Estimates ------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
async def test_estimate_not_an_int_is_type_error(mode, bad):
    tb, held = token_budget()
    before = token_state(tb)
    with pytest.raises(TypeError) as info:
        await invoke(mode, tb, "try_reserve_tokens", bad)
    check_type_error(info, "estimate")
    assert token_state(tb) == before
    assert held.armed


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD_RANGE, ids=repr)
async def test_estimate_out_of_range_is_value_error(mode, bad):
    tb, held = token_budget()
    before = token_state(tb)
    with pytest.raises(ValueError) as info:  # noqa: PT011
        await invoke(mode, tb, "try_reserve_tokens", bad)
    check_range_error(info, "estimate", MAX_U64)
    assert token_state(tb) == before
    assert held.armed


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("good", GOOD_U64, ids=repr)
async def test_estimate_accepts_integers(mode, good):
    tb = AtomicTokenBudget(MAX_TOKEN_CAPACITY)
    r = await invoke(mode, tb, "try_reserve_tokens", good)
    if int(good) > MAX_TOKEN_CAPACITY:
        # Above the capacity: a soft denial, not an error.
        assert r is None
        assert tb.available == MAX_TOKEN_CAPACITY
        return
    assert isinstance(r, TokenReservation)
    assert r.estimate == int(good)
    assert type(r.estimate) is int
    assert r.armed
    assert tb.available == MAX_TOKEN_CAPACITY - int(good)


# --- Usage ----------------------------------------------------------------------------------


def usage_args(argument: str, value: Any) -> tuple[Any, Any]:
    return (value, 10) if argument == "prompt" else (10, value)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argument", ["prompt", "completion"])
@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
async def test_usage_not_an_int_is_type_error(mode, argument, bad):
    tb, held = token_budget()
    before = token_state(tb)
    with pytest.raises(TypeError) as info:
        await invoke(mode, tb, "record_usage", held, *usage_args(argument, bad))
    check_type_error(info, argument)
    assert token_state(tb) == before
    assert held.armed
    # The reservation is still good for a correct call.
    await invoke(mode, tb, "record_usage", held, 100, 50)
    assert not held.armed
    assert tb.consumed == 200
    assert tb.available == 800


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argument", ["prompt", "completion"])
@pytest.mark.parametrize("bad", BAD_RANGE, ids=repr)
async def test_usage_out_of_range_is_value_error(mode, argument, bad):
    tb, held = token_budget()
    before = token_state(tb)
    with pytest.raises(ValueError) as info:  # noqa: PT011
        await invoke(mode, tb, "record_usage", held, *usage_args(argument, bad))
    check_range_error(info, argument, MAX_U64)
    assert token_state(tb) == before
    assert held.armed
    await invoke(mode, tb, "record_usage", held, 100, 50)
    assert not held.armed
    assert tb.consumed == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argument", ["prompt", "completion"])
@pytest.mark.parametrize("good", GOOD_U64, ids=repr)
async def test_usage_accepts_integers(mode, argument, good):
    tb = AtomicTokenBudget(MAX_TOKEN_CAPACITY)
    r = tb.try_reserve_tokens_sync(0)
    prompt, completion = (good, 0) if argument == "prompt" else (0, good)
    assert await invoke(mode, tb, "record_usage", r, prompt, completion) is None
    assert not r.armed
    assert tb.consumed == int(good)
    assert tb.available - tb.debt == MAX_TOKEN_CAPACITY - int(good)


# --- record_usage with a reservation it cannot settle ---------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_record_usage_twice_is_value_error(mode):
    tb, held = token_budget()
    await invoke(mode, tb, "record_usage", held, 100, 100)
    before = token_state(tb)
    assert before[1:4] == (750, 0, 250)
    with pytest.raises(ValueError):  # noqa: PT011 (no message is promised)
        await invoke(mode, tb, "record_usage", held, 100, 100)
    assert token_state(tb) == before
    assert not held.armed


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_record_usage_disarmed_is_value_error(mode):
    tb, held = token_budget()
    refund = held.disarm()
    assert refund is not None
    before = token_state(tb)
    with pytest.raises(ValueError):  # noqa: PT011 (no message is promised)
        await invoke(mode, tb, "record_usage", held, 1, 1)
    assert token_state(tb) == before
    assert not held.armed
    # The refund taken by disarm() was not spent by the failed call.
    refund(300)
    assert tb.available == 950


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_record_usage_from_another_budget_is_value_error(mode):
    tb, held = token_budget()
    other = AtomicTokenBudget(1_000)
    foreign = other.try_reserve_tokens_sync(400)
    before, other_before = token_state(tb), token_state(other)
    with pytest.raises(ValueError):  # noqa: PT011 (no message is promised)
        await invoke(mode, tb, "record_usage", foreign, 100, 100)
    assert token_state(tb) == before
    assert token_state(other) == other_before
    assert foreign.armed
    assert held.armed
    # Its own budget still settles it.
    await invoke(mode, other, "record_usage", foreign, 100, 100)
    assert (other.available, other.consumed) == (800, 200)
    assert token_state(tb) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_record_usage_with_python_refund_is_value_error(mode):
    tb, held = token_budget()
    refunded: list[int] = []
    custom = TokenReservation(300, refunded.append)
    before = token_state(tb)
    with pytest.raises(ValueError):  # noqa: PT011 (no message is promised)
        await invoke(mode, tb, "record_usage", custom, 100, 100)
    assert token_state(tb) == before
    assert custom.armed
    assert held.armed
    assert refunded == []
    del custom
    assert refunded == [300]
    assert token_state(tb) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "not_a_reservation",
    [None, 5, "reservation", Opaque(), lambda n: None, AtomicTokenBudget(1)],
    ids=["None", "int", "str", "object", "callable", "budget"],
)
async def test_record_usage_with_non_reservation_is_type_error(mode, not_a_reservation):
    tb, held = token_budget()
    before = token_state(tb)
    with pytest.raises(TypeError) as info:
        await invoke(mode, tb, "record_usage", not_a_reservation, 100, 100)
    check_type_error(info, "reservation")
    assert token_state(tb) == before
    assert held.armed


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_record_usage_with_native_refund_handle_is_type_error(mode):
    tb, held = token_budget()
    handle = held.disarm()
    assert handle is not None
    before = token_state(tb)
    with pytest.raises(TypeError) as info:
        await invoke(mode, tb, "record_usage", handle, 100, 100)
    check_type_error(info, "reservation")
    assert token_state(tb) == before
    assert handle.armed


# --- TokenReservation(estimate, refund) -----------------------------------------------------


@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
def test_reservation_estimate_not_an_int_is_type_error(bad):
    refunded: list[int] = []
    with pytest.raises(TypeError) as info:
        TokenReservation(bad, refunded.append)
    check_type_error(info, "estimate")
    assert refunded == []


@pytest.mark.parametrize("bad", BAD_RANGE, ids=repr)
def test_reservation_estimate_out_of_range_is_value_error(bad):
    refunded: list[int] = []
    with pytest.raises(ValueError) as info:  # noqa: PT011
        TokenReservation(bad, refunded.append)
    check_range_error(info, "estimate", MAX_U64)
    assert refunded == []


@pytest.mark.parametrize("bad", [None, 5, "refund", Opaque(), [print]], ids=repr)
def test_reservation_refund_not_callable_is_type_error(bad):
    with pytest.raises(TypeError) as info:
        TokenReservation(5, bad)
    check_type_error(info, "refund")


@pytest.mark.parametrize("good", GOOD_U64, ids=repr)
def test_reservation_estimate_accepts_integers(good):
    refunded: list[int] = []
    r = TokenReservation(good, refunded.append)
    assert r.estimate == int(good)
    assert type(r.estimate) is int
    assert r.armed
    del r
    assert refunded == [int(good)]
    assert type(refunded[0]) is int
