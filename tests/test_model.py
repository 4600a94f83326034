"""Each budget against a pure-Python model of spec sections 4 and 5 (Hypothesis state machines).

After every step the real budget must equal the model exactly. For the token budget the section 5
balance equation is checked too, from the real figures and the model's list of what is held,
whenever no refill or saturation has happened since the last point where it held.

The machines run against every backend (the conformance suite): the atomic budgets, whose state
is read from their properties, and the Redis budgets on a real redis-server (section 10), whose
state is read through ``snapshot()``. The Redis backend saturates at 2**53 - 1 instead of 2**64 - 1
(Lua numbers are doubles), and the machines take the limits from the backend.
"""

from __future__ import annotations

import asyncio
import gc
import operator
from decimal import Decimal
from fractions import Fraction

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, TokenReservation
from hypothesis import Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis_support import AtomicBackend, RedisBackend

MAX_U64 = 2**64 - 1
MAX_TOKEN_CAPACITY = 2**63 - 1
DEBT_FLOOR = -(2**63)  # the balance saturates at a debt of 2**63


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


class UnitModel:
    """Section 4: take `cost` if it fits, release capped at capacity, refill to capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.available = capacity

    def try_reserve(self, cost: int) -> bool:
        if self.available >= cost:
            self.available -= cost
            return True
        return False

    def release(self, cost: int) -> None:
        self.available = min(self.capacity, self.available + cost)

    def refill(self) -> None:
        self.available = self.capacity


class TokenModel:
    """Section 5 as one signed balance (`available - debt`), `consumed`, and what is held.

    `held` maps a key to the estimate of each reservation still holding tokens: armed ones, and
    disarmed ones whose refund was taken but not called yet (disarming moves nothing).
    `anchored` says whether the balance equation is known to hold: a refill or a saturation
    breaks it, and the checker re-anchors when it holds again.
    """

    max_actual = MAX_U64  # where `actual` and `consumed` saturate
    debt_floor = DEBT_FLOOR

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.balance = capacity
        self.consumed = 0
        self.held: dict[int, int] = {}
        self.next_key = 0
        self.anchored = True

    @property
    def available(self) -> int:
        return max(self.balance, 0)

    @property
    def debt(self) -> int:
        return max(-self.balance, 0)

    def held_total(self) -> int:
        return sum(self.held.values())

    def equation_holds(self) -> bool:
        return self.balance == self.capacity - self.consumed - self.held_total()

    def _move(self, delta: int) -> None:
        balance = self.balance + delta
        if balance > self.capacity:
            balance = self.capacity
            self.anchored = False
        if balance < self.debt_floor:
            balance = self.debt_floor
            self.anchored = False
        self.balance = balance

    def try_reserve(self, estimate: int) -> int | None:
        """The key of the new reservation, or None when denied (in debt even 0 is denied)."""
        if self.balance < 0 or self.balance < estimate:
            return None
        self.balance -= estimate
        key = self.next_key
        self.next_key += 1
        self.held[key] = estimate
        return key

    def record(self, key: int, prompt: int, completion: int) -> None:
        estimate = self.held.pop(key)
        actual = min(prompt + completion, self.max_actual)
        if self.consumed + actual > self.max_actual:
            self.anchored = False
        self.consumed = min(self.consumed + actual, self.max_actual)
        self._move(estimate - actual)

    def refund(self, key: int) -> None:
        self._move(self.held.pop(key))

    def refill(self) -> None:
        self.anchored = False
        self._move(self.capacity)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


class Index:
    """Not an int but offers `__index__`, as a NumPy integer does: section 2 accepts it."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value  # type: ignore[return-value]  # Index("1") returns a str on purpose

    def __repr__(self) -> str:
        return f"Index({self.value!r})"


def as_arg(ints: st.SearchStrategy[int]) -> st.SearchStrategy[int | Index]:
    """Mostly plain ints, sometimes the same value behind `__index__`."""
    return st.tuples(ints, st.integers(0, 4)).map(lambda t: Index(t[0]) if t[1] == 4 else t[0])


def mostly(common: st.SearchStrategy[int], rare: st.SearchStrategy[int], odds: int = 4):
    """`common` about `odds` times as often as `rare` (one_of would favour its last branch)."""
    return st.sampled_from([False] * odds + [True]).flatmap(lambda pick: rare if pick else common)


NOT_INTS = st.sampled_from(
    [
        *(1.0, 0.0, 2.5, float("nan"), "1", b"1", None, True, False, 1j, [1], (1,)),
        *(Decimal(1), Fraction(1), Index("1")),  # Index("1"): an __index__ that returns no int
    ]
)
OUT_OF_RANGE = as_arg(
    st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=MAX_U64 + 1),
        st.sampled_from([-1, MAX_U64 + 1, -MAX_U64, 2**128]),
    )
)
# (the error expected, the bad argument)
BAD_INTS = st.one_of(
    NOT_INTS.map(lambda bad: (TypeError, bad)), OUT_OF_RANGE.map(lambda bad: (ValueError, bad))
)
SMALL = st.integers(0, 50)
UNIT_CAPACITIES = mostly(SMALL, st.sampled_from([MAX_U64, MAX_U64 - 1]) | st.integers(0, MAX_U64))
TOKEN_CAPACITIES = mostly(
    SMALL,
    st.sampled_from([MAX_TOKEN_CAPACITY, MAX_TOKEN_CAPACITY - 1])
    | st.integers(0, MAX_TOKEN_CAPACITY),
)
AMOUNTS = mostly(
    st.integers(0, 60),
    st.one_of(
        st.integers(MAX_U64 - 64, MAX_U64),
        st.integers(MAX_TOKEN_CAPACITY - 4, MAX_TOKEN_CAPACITY + 4),
        st.integers(0, MAX_U64),
    ),
)


def _bound_pattern(maximum: int) -> str:
    """A range error names its upper bound, written out or as a power of two."""
    power = (maximum + 1).bit_length() - 1
    return rf"({maximum}|{maximum:_}|{maximum:,}|2\s*(\*\*|\^)\s*{power})"


def raises_out_of_range(name: str, maximum: int = MAX_U64):
    return pytest.raises(ValueError, match=rf"(?s)(?=.*\b{name}\b).*{_bound_pattern(maximum)}")


def raises_not_an_int(name: str):
    return pytest.raises(TypeError, match=rf"\b{name}\b")


def raises_for(error: type[Exception], name: str, maximum: int = MAX_U64):
    """What section 2 promises for a bad argument `name`, by the kind of error expected."""
    return raises_not_an_int(name) if error is TypeError else raises_out_of_range(name, maximum)


async def _await(method, *args):
    return await method(*args)


async def _outcome(method, args, box):
    # The call happens inside the coroutine: section 2 lets an async method raise an argument
    # error when called or when awaited, and both are caught here. The outcome goes into `box`,
    # neither raised through the loop nor returned as the task's result, so that no task or
    # frame in a reference cycle keeps a reservation alive: dropping one must refund at once.
    # (A task that awaited redis-py stays in a cycle with asyncio's Timeout objects until the
    # next collection, with its result.)
    try:
        box.append((await method(*args), None))
    except Exception as error:
        box.append((None, error))


class LoopMixin:
    """One event loop and one backend per run of a machine, for the async twins."""

    make_backend = AtomicBackend

    def open_loop(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.backend = self.make_backend()

    def close_loop(self) -> None:
        self.loop.run_until_complete(self.backend.aclose())
        self.loop.close()

    def read(self, budget: object):
        """The budget's state, once the refunds of dropped reservations have landed."""
        self.loop.run_until_complete(self.backend.settle(budget))
        return self.backend.state_sync(budget)

    def call(self, target: object, use_async: bool, name: str, *args: object) -> object:
        if not use_async:
            return getattr(target, f"{name}_sync")(*args)
        box = []
        self.loop.run_until_complete(_outcome(getattr(target, name), args, box))
        result, error = box.pop()
        if error is None:
            return result
        try:
            raise error.with_traceback(None)
        finally:
            del error  # this frame is in the traceback: it must not hold the error


# ---------------------------------------------------------------------------------------------
# AtomicBudget
# ---------------------------------------------------------------------------------------------


class UnitBudgetMachine(LoopMixin, RuleBasedStateMachine):
    model_class = UnitModel

    def __init__(self) -> None:
        super().__init__()
        self.open_loop()
        self.budget: AtomicBudget | None = None
        self.model: UnitModel | None = None

    def teardown(self) -> None:
        self.close_loop()

    @initialize(capacity=as_arg(UNIT_CAPACITIES))
    def create(self, capacity):
        if operator.index(capacity) > self.backend.max_unit_capacity:
            capacity = self.backend.max_unit_capacity
        self.budget = self.backend.unit(capacity)
        self.model = self.model_class(operator.index(capacity))

    def _reserve(self, cost, use_async):
        granted = self.call(self.budget, use_async, "try_reserve", cost)
        assert type(granted) is bool
        assert granted == self.model.try_reserve(operator.index(cost))

    @rule(cost=as_arg(AMOUNTS), use_async=st.booleans())
    def reserve(self, cost, use_async):
        self._reserve(cost, use_async)

    @rule(delta=st.integers(-2, 2), use_async=st.booleans())
    def reserve_near_available(self, delta, use_async):
        self._reserve(min(max(self.model.available + delta, 0), MAX_U64), use_async)

    @rule(cost=as_arg(AMOUNTS), use_async=st.booleans())
    def release(self, cost, use_async):
        assert self.call(self.budget, use_async, "release", cost) is None
        self.model.release(operator.index(cost))

    @rule()
    def refill(self):
        assert self.backend.refill_sync(self.budget) is None
        self.model.refill()

    @rule(name=st.sampled_from(["try_reserve", "release"]), bad=BAD_INTS, use_async=st.booleans())
    def bad_cost(self, name, bad, use_async):
        error, value = bad
        before = self.read(self.budget)
        with raises_for(error, "cost"):
            self.call(self.budget, use_async, name, value)
        assert self.read(self.budget) == before

    @rule(bad=BAD_INTS, data=st.data())
    def bad_capacity(self, bad, data):
        error, value = bad
        maximum = self.backend.max_unit_capacity
        if maximum < MAX_U64 and data.draw(st.booleans()):
            error, value = ValueError, data.draw(st.integers(maximum + 1, MAX_U64))
        with raises_for(error, "capacity", maximum):
            self.backend.unit(value)

    @invariant()
    def matches_the_model(self):
        if self.budget is None:
            return
        state, model = self.read(self.budget), self.model
        assert (state.capacity, state.available) == (model.capacity, model.available)
        utilization = state.utilization
        assert type(utilization) is float
        assert 0.0 <= utilization <= 1.0
        if model.capacity == 0:
            assert utilization == 0.0
        elif model.capacity < 2**53:
            # Both operands are exact doubles, so the one correctly rounded quotient is expected.
            assert utilization == (model.capacity - model.available) / model.capacity
        else:
            expected = (model.capacity - model.available) / model.capacity
            assert utilization == pytest.approx(expected, rel=1e-15, abs=1e-15)


TestUnitBudgetMachine = UnitBudgetMachine.TestCase


# ---------------------------------------------------------------------------------------------
# AtomicTokenBudget
# ---------------------------------------------------------------------------------------------


class Held:
    """A reservation the machine holds, with what the model knows of it.

    The machine keeps the only reference to `reservation` (bundles hold this wrapper), so
    setting the attribute to None drops the reservation at once.
    """

    __slots__ = ("estimate", "key", "refund", "reservation")

    def __init__(self, key: int, estimate: int, reservation: TokenReservation) -> None:
        self.key = key
        self.estimate = estimate
        self.reservation: TokenReservation | None = reservation
        self.refund = None

    def __repr__(self) -> str:
        return f"Held(key={self.key}, estimate={self.estimate})"


class TokenBudgetMachine(LoopMixin, RuleBasedStateMachine):
    model_class = TokenModel

    held = Bundle("held")  # armed reservations
    spent = Bundle("spent")  # recorded or disarmed reservations, still referenced
    refunds = Bundle("refunds")  # refunds taken with disarm(), not called yet

    def __init__(self) -> None:
        super().__init__()
        self.open_loop()
        self.budget: AtomicTokenBudget | None = None
        self.model: TokenModel | None = None
        self.live: dict[int, Held] = {}

    def teardown(self) -> None:
        self.close_loop()

    def state(self, budget=None):
        state = self.read(self.budget if budget is None else budget)
        return (state.available, state.debt, state.consumed)

    @initialize(capacity=as_arg(TOKEN_CAPACITIES))
    def create(self, capacity):
        if operator.index(capacity) > self.backend.max_token_capacity:
            capacity = self.backend.max_token_capacity
        self.budget = self.backend.tokens(capacity)
        self.model = self.model_class(operator.index(capacity))
        self.model.max_actual = self.backend.max_actual
        self.model.debt_floor = self.backend.debt_floor

    # -- reserve ----------------------------------------------------------------------------------

    def _reserve(self, estimate, use_async):
        reservation = self.call(self.budget, use_async, "try_reserve_tokens", estimate)
        estimate = operator.index(estimate)
        key = self.model.try_reserve(estimate)
        if key is None:
            assert reservation is None
            return multiple()
        assert isinstance(reservation, TokenReservation)
        assert reservation.armed
        assert reservation.estimate == estimate
        self.live[key] = Held(key, estimate, reservation)
        return self.live[key]

    @rule(target=held, estimate=as_arg(AMOUNTS), use_async=st.booleans())
    def reserve(self, estimate, use_async):
        return self._reserve(estimate, use_async)

    @rule(target=held, estimate=st.integers(0, 20), use_async=st.booleans())
    def reserve_small(self, estimate, use_async):
        return self._reserve(estimate, use_async)

    @rule(target=held, delta=st.integers(-2, 2), use_async=st.booleans())
    def reserve_near_balance(self, delta, use_async):
        return self._reserve(min(max(self.model.balance + delta, 0), MAX_U64), use_async)

    # -- settle -----------------------------------------------------------------------------------

    def _record(self, h, prompt, completion, use_async):
        result = self.call(
            self.budget, use_async, "record_usage", h.reservation, prompt, completion
        )
        assert result is None
        assert not h.reservation.armed
        self.model.record(h.key, prompt, completion)
        del self.live[h.key]
        return h

    def _split(self, data, actual):
        """(prompt, completion) adding up to `actual`, each a valid argument."""
        prompt = data.draw(st.integers(max(0, actual - MAX_U64), min(actual, MAX_U64)))
        return prompt, actual - prompt

    @rule(
        target=spent,
        h=consumes(held),
        kind=st.sampled_from(["under", "exact", "over"]),
        data=st.data(),
        use_async=st.booleans(),
    )
    def record(self, h, kind, data, use_async):
        if kind == "under":
            actual = data.draw(st.integers(0, h.estimate), label="actual")
        elif kind == "exact":
            actual = h.estimate
        else:
            actual = h.estimate + data.draw(st.integers(1, 60), label="overage")
        return self._record(h, *self._split(data, actual), use_async)

    @rule(
        target=spent,
        h=consumes(held),
        huge=mostly(st.just(False), st.just(True), odds=8),
        data=st.data(),
        use_async=st.booleans(),
    )
    def record_into_debt(self, h, huge, data, use_async):
        if huge:  # near 2**64 each: `actual`, `consumed` and the debt saturate (2**53 on Redis)
            prompt = data.draw(st.integers(MAX_U64 - 2**20, MAX_U64), label="prompt")
            completion = data.draw(st.integers(0, MAX_U64), label="completion")
            return self._record(h, prompt, completion, use_async)
        # More over the estimate than is available: the rest of the overage becomes debt.
        overage = self.model.available + data.draw(st.integers(1, 60), label="debt")
        return self._record(h, *self._split(data, h.estimate + overage), use_async)

    @rule(h=consumes(held))
    def drop(self, h):
        del self.live[h.key]
        h.reservation = None  # the last reference: the refund runs now
        if self.backend.name == "redis":
            # On CPython 3.13, redis-py's asyncio client keeps a frame of its first connection
            # in a reference cycle, and through its chain of callers the frame that returned
            # the reservation: it is then "collected in a cycle" (spec 3), at the next
            # collection, which this makes now.
            gc.collect()
        self.model.refund(h.key)

    @rule(targets=(refunds, spent), h=consumes(held))
    def disarm(self, h):
        before = self.state()
        h.refund = h.reservation.disarm()
        assert callable(h.refund)
        assert not h.reservation.armed
        assert h.reservation.disarm() is None
        assert self.state() == before, "disarming alone moves nothing"
        del self.live[h.key]  # the model keeps its estimate held until the refund is called
        return h

    @rule(h=consumes(refunds), twice=st.booleans())
    def call_refund(self, h, twice):
        refund, h.refund = h.refund, None
        assert refund(h.estimate) is None
        self.model.refund(h.key)
        if twice:
            after = self.state()
            refund(h.estimate)
            assert self.state() == after, "a refund is single-use"

    @rule()
    def refill(self):
        assert self.backend.refill_sync(self.budget) is None
        self.model.refill()

    @rule()
    def tokens_consumed(self):
        assert self.budget.tokens_consumed_sync() == self.model.consumed
        consumed = self.loop.run_until_complete(_await(self.budget.tokens_consumed))
        assert consumed == self.model.consumed

    # -- misuse: the documented error, and nothing changes ------------------------------------

    @rule(h=spent, use_async=st.booleans())
    def record_again(self, h, use_async):
        before = self.state()
        with pytest.raises(ValueError):  # noqa: PT011 - the spec fixes no message for this case
            self.call(self.budget, use_async, "record_usage", h.reservation, 1, 2)
        assert self.state() == before
        assert not h.reservation.armed
        assert h.reservation.disarm() is None

    @rule(h=consumes(spent))
    def drop_spent(self, h):
        h.reservation = None  # recorded or disarmed: dropping it refunds nothing

    @rule(h=held, capacity=SMALL, use_async=st.booleans())
    def record_on_another_budget(self, h, capacity, use_async):
        other = self.backend.tokens(capacity)
        before = self.state()
        with pytest.raises(ValueError):  # noqa: PT011 - the spec fixes no message for this case
            self.call(other, use_async, "record_usage", h.reservation, 1, 2)
        assert h.reservation.armed
        assert self.state() == before
        assert self.state(other) == (capacity, 0, 0)

    @rule(
        kind=st.sampled_from(["another budget's", "user-built", "not a reservation"]),
        estimate=SMALL,
        use_async=st.booleans(),
    )
    def record_a_reservation_not_issued_here(self, kind, estimate, use_async):
        before = self.state()
        if kind == "not a reservation":
            with raises_not_an_int("reservation"):
                self.call(self.budget, use_async, "record_usage", estimate, 1, 2)
            assert self.state() == before
            return
        other, refunded = self.backend.tokens(50), []
        if kind == "user-built":  # a custom backend's reservation, with a Python refund
            foreign = TokenReservation(estimate, refunded.append)
        else:
            foreign = other.try_reserve_tokens_sync(estimate)
        with pytest.raises(ValueError):  # noqa: PT011 - the spec fixes no message for this case
            self.call(self.budget, use_async, "record_usage", foreign, 1, 2)
        assert foreign.armed
        assert self.state() == before
        assert refunded == []
        del foreign  # still armed: it refunds its own issuer
        assert self.state() == before
        assert self.state(other) == (50, 0, 0)
        assert refunded == ([estimate] if kind == "user-built" else [])

    @rule(
        h=held,
        which=st.sampled_from(["prompt", "completion"]),
        bad=BAD_INTS,
        use_async=st.booleans(),
    )
    def record_bad_usage(self, h, which, bad, use_async):
        error, value = bad
        usage = [value, 1] if which == "prompt" else [1, value]
        before = self.state()
        with raises_for(error, which):
            self.call(self.budget, use_async, "record_usage", h.reservation, *usage)
        assert h.reservation.armed
        assert self.state() == before

    @rule(bad=BAD_INTS, use_async=st.booleans())
    def reserve_bad_estimate(self, bad, use_async):
        error, value = bad
        before = self.state()
        with raises_for(error, "estimate"):
            self.call(self.budget, use_async, "try_reserve_tokens", value)
        assert self.state() == before

    @rule(bad=BAD_INTS, data=st.data())
    def bad_capacity(self, bad, data):
        error, value = bad
        maximum = self.backend.max_token_capacity
        if data.draw(st.booleans()):
            error, value = ValueError, data.draw(as_arg(st.integers(maximum + 1, MAX_U64)))
        with raises_for(error, "capacity", maximum):
            self.backend.tokens(value)

    # -- the check after every step ---------------------------------------------------------------

    @invariant()
    def matches_the_model(self):
        if self.budget is None:
            return
        state, model = self.read(self.budget), self.model
        assert state.capacity == model.capacity
        assert (state.available, state.debt, state.consumed) == (
            model.available,
            model.debt,
            model.consumed,
        )
        for h in self.live.values():
            assert h.reservation.armed
            assert h.reservation.estimate == h.estimate
        if model.anchored:
            # Section 5, from the real figures and the list of what is held.
            held = model.held_total()
            assert state.available - state.debt == state.capacity - state.consumed - held
        elif model.equation_holds():
            model.anchored = True


TestTokenBudgetMachine = TokenBudgetMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Guards against a vacuous model
# ---------------------------------------------------------------------------------------------


def test_unit_model_mirrors_a_fixed_sequence():
    budget, model = AtomicBudget(100), UnitModel(100)
    steps = [
        ("try_reserve", 60, True),
        ("try_reserve", 40, True),
        ("try_reserve", 1, False),
        ("release", 50, None),
        ("try_reserve", 51, False),
        ("try_reserve", 50, True),
        ("release", 30, None),
        ("release", 1_000, None),
        ("try_reserve", 75, True),
        ("refill", None, None),
        ("try_reserve", 101, False),
        ("try_reserve", 40, True),
    ]
    seen = []
    for name, cost, expected in steps:
        args = () if cost is None else (cost,)
        real = getattr(budget, name if name == "refill" else f"{name}_sync")(*args)
        mirrored = getattr(model, name)(*args)
        assert real == mirrored == expected
        assert budget.available == model.available
        seen.append(model.available)
    assert seen == [40, 0, 0, 50, 50, 0, 30, 100, 25, 100, 100, 60]
    assert budget.utilization == 0.4


def test_token_model_mirrors_a_fixed_sequence():
    budget, model = AtomicTokenBudget(1_000), TokenModel(1_000)
    held = {}

    def reserve(name, estimate):
        reservation = budget.try_reserve_tokens_sync(estimate)
        key = model.try_reserve(estimate)
        assert (reservation is None) == (key is None)
        if reservation is not None:
            held[name] = (reservation, key)
        return reservation is not None

    def record(name, prompt, completion):
        reservation, key = held.pop(name)
        budget.record_usage_sync(reservation, prompt, completion)
        model.record(key, prompt, completion)

    def drop(name):
        key = held.pop(name)[1]  # the only reference goes with the tuple
        model.refund(key)

    trace = []

    def check():
        assert (budget.available, budget.debt, budget.consumed) == (
            model.available,
            model.debt,
            model.consumed,
        )
        trace.append((model.available, model.debt, model.consumed))

    assert reserve("a", 400)
    check()
    record("a", 120, 80)  # under the estimate: 200 back
    check()
    assert reserve("b", 800)
    assert not reserve("c", 1)
    check()
    record("b", 900, 400)  # 500 over with nothing available: debt
    check()
    assert not reserve("d", 0), "in debt even 0 is denied"
    budget.refill()
    model.refill()
    check()
    assert reserve("e", 300)
    drop("e")
    check()
    refund = budget.try_reserve_tokens_sync(100).disarm()  # the reservation goes, disarmed
    key = model.try_reserve(100)
    check()  # disarmed and dropped, but the refund still holds the estimate
    refund(100)
    refund(100)  # single-use
    model.refund(key)
    check()
    assert not reserve("f", 501)
    assert reserve("f", 500)
    assert model.equation_holds() is False  # the refill moved the balance off the equation
    record("f", MAX_U64, MAX_U64)  # saturation: consumed and the debt
    check()
    assert trace == [
        (600, 0, 0),
        (800, 0, 200),
        (0, 0, 200),
        (0, 500, 1_500),
        (500, 0, 1_500),
        (500, 0, 1_500),
        (400, 0, 1_500),
        (500, 0, 1_500),
        (0, 2**63, MAX_U64),
    ]


class _SeedClampingTokenModel(TokenModel):
    """The seed's behaviour, which the spec replaced: an overage beyond `available` is lost."""

    def record(self, key: int, prompt: int, completion: int) -> None:
        super().record(key, prompt, completion)
        self.balance = max(self.balance, 0)


class _UncappedUnitModel(UnitModel):
    """A release that forgets the cap at capacity."""

    def release(self, cost: int) -> None:
        self.available += cost


_FIND_A_WRONG_MODEL = settings(
    database=None, phases=[Phase.generate], verbosity=Verbosity.quiet, print_blob=False
)


@pytest.mark.parametrize(
    ("machine", "wrong_model"),
    [(UnitBudgetMachine, _UncappedUnitModel), (TokenBudgetMachine, _SeedClampingTokenModel)],
    ids=["unit-release-uncapped", "token-overage-clamped"],
)
def test_machines_reject_a_wrong_model(machine, wrong_model):
    # The rules must reach the path a plausible mistake changes, and the invariant must see it.
    mutant = type(f"{machine.__name__}WithWrongModel", (machine,), {"model_class": wrong_model})
    with pytest.raises(AssertionError):
        run_state_machine_as_test(mutant, settings=_FIND_A_WRONG_MODEL)


# ---------------------------------------------------------------------------------------------
# The same machines on Redis (section 10): one conformance suite for every backend
# ---------------------------------------------------------------------------------------------

# Each step is a round trip to the server (and the check after it another), so the Redis runs
# take fewer examples per CI run; COSTBOUND_LONG=1 runs the long profile's count.
_REDIS_EXAMPLES = settings(max_examples=settings().max_examples // 4)


@pytest.mark.parametrize("machine", [UnitBudgetMachine, TokenBudgetMachine], ids=["unit", "token"])
def test_machine_on_redis(machine, redis_url):
    on_redis = type(
        f"{machine.__name__}OnRedis",
        (machine,),
        {"make_backend": staticmethod(lambda: RedisBackend(redis_url))},
    )
    run_state_machine_as_test(on_redis, settings=_REDIS_EXAMPLES)


@pytest.mark.parametrize(
    ("machine", "wrong_model"),
    [(UnitBudgetMachine, _UncappedUnitModel), (TokenBudgetMachine, _SeedClampingTokenModel)],
    ids=["unit-release-uncapped", "token-overage-clamped"],
)
def test_machines_on_redis_reject_a_wrong_model(machine, wrong_model, redis_url):
    mutant = type(
        f"{machine.__name__}OnRedisWithWrongModel",
        (machine,),
        {"model_class": wrong_model, "make_backend": staticmethod(lambda: RedisBackend(redis_url))},
    )
    with pytest.raises(AssertionError):
        run_state_machine_as_test(mutant, settings=_FIND_A_WRONG_MODEL)
