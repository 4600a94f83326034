"""Waiting, cancelling and admitting against a pure-Python model (spec sections 4, 5, 7 and 8).

One `AtomicBudget` and one `AtomicTokenBudget` (with debt) are driven through one event loop that
the machine owns. Besides the non-waiting calls of `test_model.py` it starts tasks that wait
(`reserve`, `reserve_tokens`, `admit`), cancels them, releases what they got and closes tickets.
After every rule the loop settles: every woken task runs before the next rule.

The model keeps a FIFO queue of waiting calls per budget and grants from the head while the head
fits (strict FIFO: a head that does not fit blocks those behind it); `try_*` is denied while the
queue is not empty. It also keeps the loop's ready queue, because a woken `admit` acts on the
budgets when it runs: it holds the part it waited for while it tries the others (guards, then
tokens), and when one is denied it gives everything back and waits in that part's queue (section
8, as `costbound._admit` documents it). Woken tasks run in the order they were woken, each in one
go (the budgets' calls complete without a turn of the loop). A cancelled task is a task that
will run its cancellation: until it runs it is still queued and may still be granted, and then
it gives the grant back. After every step the budgets, their `waiters`, the set of tasks still
waiting and the set of tasks holding a grant must equal the model's; the section 5 balance
equation and the conservation of units are checked from the real figures while no refill or
over-release has broken them; a cancelled or timed-out task holds nothing.

The tests at the end prove the machine can fail: models that serve waiters last come first
served, let `try_*` jump the queue, skip a head that does not fit, forget to wake the next
waiter when one is cancelled, or keep a part while an admission waits must all be rejected.
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, TokenReservation, admit, try_admit
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

WAITING, HOLDING, CANCELLED, TIMED_OUT, DONE = (
    "waiting",
    "holding",
    "cancelled",
    "timed out",
    "done",
)
UNIT, TOKEN, ADMIT = "unit", "token", "admit"


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Waiter:
    """The model's view of one waiting call (a task), or of a ticket from `try_admit`.

    `held` maps a side's name to what the call holds there (units, or the key of a token
    reservation). `queued_on` is the side whose queue it is in; `grant` is a grant made while it
    was queued, which it takes when it runs; `scheduled` says it is in the loop's ready queue.
    """

    __slots__ = (
        "cancel",
        "cost",
        "estimate",
        "grant",
        "held",
        "ident",
        "kind",
        "queued_on",
        "scheduled",
        "state",
    )

    def __init__(self, ident: int, kind: str, cost: int = 0, estimate: int = 0) -> None:
        self.ident = ident
        self.kind = kind
        self.cost = cost
        self.estimate = estimate
        self.state = WAITING
        self.held: dict[str, int] = {}
        self.queued_on: Side | None = None
        self.grant: tuple[Side, int] | None = None
        self.cancel = False
        self.scheduled = False

    def amount_on(self, side: Side) -> int:
        return self.cost if side.name == UNIT else self.estimate

    def __repr__(self) -> str:
        return f"Waiter({self.ident}, {self.kind}, cost={self.cost}, estimate={self.estimate})"


class Side:
    """One budget of the model and its FIFO queue."""

    name = ""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queue: list[Waiter] = []

    def fits(self, amount: int) -> bool:
        raise NotImplementedError

    def take(self, amount: int) -> int:
        """Take `amount`; return the handle that gives it back."""
        raise NotImplementedError

    def put_back(self, handle: int) -> None:
        raise NotImplementedError


class UnitSide(Side):
    """Section 4; the handle of a grant is its cost."""

    name = UNIT

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.available = capacity

    def fits(self, amount: int) -> bool:
        return self.available >= amount

    def take(self, amount: int) -> int:
        self.available -= amount
        return amount

    def put_back(self, handle: int) -> None:
        self.available = min(self.capacity, self.available + handle)


class TokenSide(Side):
    """Section 5 as one signed balance (`available - debt`); the handle of a grant is a key."""

    name = TOKEN

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.balance = capacity
        self.consumed = 0
        self.held: dict[int, int] = {}  # key -> estimate, for every armed reservation
        self.next_key = 0
        self.anchored = True  # the balance equation is known to hold (no refill or cap since)

    @property
    def available(self) -> int:
        return max(self.balance, 0)

    @property
    def debt(self) -> int:
        return max(-self.balance, 0)

    def equation_holds(self) -> bool:
        return self.balance == self.capacity - self.consumed - sum(self.held.values())

    def fits(self, amount: int) -> bool:
        return self.balance >= amount  # in debt even 0 does not fit

    def take(self, amount: int) -> int:
        self.balance -= amount
        key = self.next_key
        self.next_key += 1
        self.held[key] = amount
        return key

    def _move(self, delta: int) -> None:
        self.balance += delta
        if self.balance > self.capacity:
            self.balance = self.capacity
            self.anchored = False

    def put_back(self, handle: int) -> None:
        self._move(self.held.pop(handle))

    def record(self, key: int, actual: int) -> None:
        estimate = self.held.pop(key)
        self.consumed += actual
        self._move(estimate - actual)

    def refill(self) -> None:
        self.anchored = False
        self._move(self.capacity)


class WaitingModel:
    """Both budgets, their queues, the waiting calls, and the event loop's ready queue.

    The loop runs woken tasks first come, first served: a grant appends the task it wakes, and a
    cancellation appends the task it interrupts unless that task is already due to run. A task
    runs in one go (the budgets' calls complete without a turn of the loop) until it holds what
    it asked for or queues again.
    """

    def __init__(self, unit_capacity: int, token_capacity: int) -> None:
        self.unit = UnitSide(unit_capacity)
        self.tokens = TokenSide(token_capacity)
        self.ready: deque[Waiter] = deque()
        self.waiters: list[Waiter] = []
        self.loose = 0  # units taken with try_reserve and not released yet
        self.unit_anchored = True  # the units add up (no refill or over-release since)

    # -- the policy; the wrong models change one of these --------------------------------------

    def try_is_blocked(self, side: Side) -> bool:
        """A non-waiting call is denied while a waiter is queued (section 7)."""
        return bool(side.queue)

    def next_to_serve(self, side: Side) -> int:
        """The index of the waiter a grant goes to: the head, whether it fits or not."""
        return 0

    def withdraw(self, side: Side, waiter: Waiter) -> None:
        """A cancelled waiter leaves the queue, and the next one is still woken (section 7)."""
        side.queue.remove(waiter)
        self.serve(side)

    def give_back_before_waiting(self, waiter: Waiter) -> None:
        """An admission gives back what it took before it waits again (section 8)."""
        self.give_back(waiter.held)
        waiter.held = {}

    # -- the queues -------------------------------------------------------------------------------

    def try_take(self, side: Side, amount: int) -> int | None:
        if self.try_is_blocked(side) or not side.fits(amount):
            return None
        return side.take(amount)

    def serve(self, side: Side) -> None:
        """Grant from the queue while the waiter served next fits, and wake each one granted."""
        while side.queue:
            index = self.next_to_serve(side)
            waiter = side.queue[index]
            amount = waiter.amount_on(side)
            if not side.fits(amount):
                return
            del side.queue[index]
            waiter.queued_on = None
            waiter.grant = (side, side.take(amount))
            self.wake(waiter)

    def wake(self, waiter: Waiter) -> None:
        if not waiter.scheduled:
            waiter.scheduled = True
            self.ready.append(waiter)

    def put_back(self, side: Side, handle: int) -> None:
        side.put_back(handle)
        self.serve(side)

    def give_back(self, held: dict[str, int]) -> None:
        # A ticket releases its guards first, then refunds its reservations.
        if UNIT in held:
            self.put_back(self.unit, held[UNIT])
        if TOKEN in held:
            self.put_back(self.tokens, held[TOKEN])

    def enqueue(self, waiter: Waiter, side: Side) -> int | None:
        """Wait for `side`: granted at once when nobody is queued and it fits, else queued."""
        amount = waiter.amount_on(side)
        if not side.queue and side.fits(amount):
            return side.take(amount)
        side.queue.append(waiter)
        waiter.queued_on = side
        return None

    # -- the calls that wait ----------------------------------------------------------------------

    def start(self, waiter: Waiter, timeout_zero: bool) -> None:
        """The first step of a new task; the loop was quiet, so it runs first."""
        self.waiters.append(waiter)
        if waiter.kind == ADMIT:
            if timeout_zero:
                held = self.try_admit(waiter.cost, waiter.estimate)
                waiter.held = held or {}
                waiter.state = TIMED_OUT if held is None else HOLDING
            else:
                self.admit_attempt(waiter)
            return
        side = self.unit if waiter.kind == UNIT else self.tokens
        if not side.queue and side.fits(waiter.amount_on(side)):
            waiter.held[side.name] = side.take(waiter.amount_on(side))
            waiter.state = HOLDING
        elif timeout_zero:
            waiter.state = TIMED_OUT  # queued and withdrawn in the same step: no trace
        else:
            self.enqueue(waiter, side)

    def admit_attempt(self, waiter: Waiter) -> None:
        """Try every part not held yet; on a denial give back and wait in that part's queue."""
        while True:
            for side in (self.unit, self.tokens):
                if side.name in waiter.held:
                    continue
                handle = self.try_take(side, waiter.amount_on(side))
                if handle is None:
                    break
                waiter.held[side.name] = handle
            else:
                waiter.state = HOLDING
                return
            self.give_back_before_waiting(waiter)
            handle = self.enqueue(waiter, side)
            if handle is None:
                return
            waiter.held[side.name] = handle

    def cancel(self, waiter: Waiter) -> None:
        assert waiter.state == WAITING
        waiter.cancel = True
        self.wake(waiter)  # a task already due to run gets its cancellation when it runs

    def run(self) -> None:
        """Let the loop settle: run every woken task, in order, including those woken meanwhile."""
        while self.ready:
            waiter = self.ready.popleft()
            waiter.scheduled = False
            self.step(waiter)

    def step(self, waiter: Waiter) -> None:
        grant, waiter.grant = waiter.grant, None
        if waiter.cancel:
            if waiter.queued_on is not None:
                side, waiter.queued_on = waiter.queued_on, None
                self.withdraw(side, waiter)
            elif grant is not None:  # granted before the cancellation ran: given back
                self.put_back(*grant)
            self.give_back(waiter.held)
            waiter.held = {}
            waiter.state = CANCELLED
            return
        assert grant is not None, "a task runs when it is granted or cancelled"
        side, handle = grant
        waiter.held[side.name] = handle
        if waiter.kind == ADMIT:
            self.admit_attempt(waiter)
        else:
            waiter.state = HOLDING

    def finish(self, waiter: Waiter) -> None:
        """What a holding call holds goes back (a permit released, a ticket closed)."""
        assert waiter.state == HOLDING
        waiter.state = DONE
        held, waiter.held = waiter.held, {}
        self.give_back(held)

    # -- the calls that do not wait ---------------------------------------------------------------

    def try_reserve(self, cost: int) -> bool:
        if self.try_take(self.unit, cost) is None:
            return False
        self.loose += cost
        return True

    def release(self, cost: int) -> None:
        if cost > self.loose:
            self.unit_anchored = False
        self.loose = max(self.loose - cost, 0)
        self.put_back(self.unit, cost)

    def refill_units(self) -> None:
        self.unit_anchored = False
        self.unit.available = self.unit.capacity
        self.serve(self.unit)

    def try_reserve_tokens(self, estimate: int) -> int | None:
        return self.try_take(self.tokens, estimate)

    def record(self, key: int, actual: int) -> None:
        self.tokens.record(key, actual)
        self.serve(self.tokens)

    def refund(self, key: int) -> None:
        self.put_back(self.tokens, key)

    def refill_tokens(self) -> None:
        self.tokens.refill()
        self.serve(self.tokens)

    def try_admit(self, cost: int, estimate: int) -> dict[str, int] | None:
        held: dict[str, int] = {}
        for side, amount in ((self.unit, cost), (self.tokens, estimate)):
            handle = self.try_take(side, amount)
            if handle is None:
                self.give_back(held)
                return None
            held[side.name] = handle
        return held

    def units_held(self) -> int:
        held = sum(w.held.get(UNIT, 0) for w in self.waiters if w.state == HOLDING)
        return self.loose + held


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


class Call:
    """A waiting call the machine made (or a ticket from `try_admit`) and what it got."""

    __slots__ = ("model", "permit", "reservation", "task", "ticket", "timed_out")

    def __init__(self, model: Waiter) -> None:
        self.model = model
        self.task: asyncio.Task[None] | None = None
        self.permit = None
        self.reservation: TokenReservation | None = None
        self.ticket = None
        self.timed_out = False

    def holds(self) -> bool:
        if self.model.kind == UNIT:
            return self.permit is not None and not self.permit.released
        if self.model.kind == TOKEN:
            return self.reservation is not None and self.reservation.armed
        return self.ticket is not None and not self.ticket.closed

    def holds_nothing(self) -> bool:
        return self.permit is None and self.reservation is None and self.ticket is None

    def __repr__(self) -> str:
        return repr(self.model)


class Reserved:
    """A reservation from `try_reserve_tokens`; the machine keeps the only reference."""

    __slots__ = ("estimate", "key", "reservation")

    def __init__(self, key: int, estimate: int, reservation: TokenReservation) -> None:
        self.key = key
        self.estimate = estimate
        self.reservation: TokenReservation | None = reservation

    def __repr__(self) -> str:
        return f"Reserved(key={self.key}, estimate={self.estimate})"


# The calls are made inside these coroutines, whose tasks return nothing: the only reference to
# what they got is the Call's, so dropping it there refunds at once.


async def _wait_for_permit(call: Call, budget: AtomicBudget, timeout: float | None) -> None:
    try:
        call.permit = await budget.reserve(call.model.cost, timeout=timeout)
    except TimeoutError:
        call.timed_out = True


async def _wait_for_tokens(call: Call, budget: AtomicTokenBudget, timeout: float | None) -> None:
    try:
        call.reservation = await budget.reserve_tokens(call.model.estimate, timeout=timeout)
    except TimeoutError:
        call.timed_out = True


async def _wait_for_admission(
    call: Call, units: AtomicBudget, tokens: AtomicTokenBudget, timeout: float | None
) -> None:
    parts = {"guards": {units: call.model.cost}, "tokens": {tokens: call.model.estimate}}
    try:
        call.ticket = await admit(**parts, timeout=timeout)
    except TimeoutError:
        call.timed_out = True


TIMEOUTS = st.sampled_from([None, None, None, 0])  # 0: try once, never suspend


class WaitingMachine(RuleBasedStateMachine):
    model_class = WaitingModel

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.units: AtomicBudget | None = None
        self.tokens: AtomicTokenBudget | None = None
        self.model: WaitingModel | None = None
        self.calls: list[Call] = []
        self.reserved: list[Reserved] = []
        self.next_ident = 0

    def teardown(self) -> None:
        pending = [c.task for c in self.calls if c.task is not None and not c.task.done()]
        for task in pending:
            task.cancel()
        if pending:
            gathered = asyncio.gather(*pending, return_exceptions=True)
            self.loop.run_until_complete(gathered)
        self.loop.close()

    # -- running a step ---------------------------------------------------------------------------

    def act(self, *steps):
        """Run the async steps in order on the loop, then let it settle; the last one's result.

        Settling turns the loop until every woken task has run: each turn runs what was ready,
        and a woken task runs in one turn, so a few turns per live task are more than enough.
        """
        turns = 8 + 4 * sum(1 for c in self.calls if c.task is not None and not c.task.done())

        async def go():
            result = None
            for step in steps:
                result = await step()
            for _ in range(turns):
                await asyncio.sleep(0)
            return result

        return self.loop.run_until_complete(go())

    def new_call(self, kind: str, cost: int = 0, estimate: int = 0) -> Call:
        call = Call(Waiter(self.next_ident, kind, cost, estimate))
        self.next_ident += 1
        self.calls.append(call)
        return call

    def calls_in(self, state: str, *kinds: str) -> list[Call]:
        return [c for c in self.calls if c.model.state == state and c.model.kind in kinds]

    def waiting(self) -> list[Call]:
        return self.calls_in(WAITING, UNIT, TOKEN, ADMIT)

    def reservation_owners(self) -> list[Reserved | Call]:
        return [*self.reserved, *self.calls_in(HOLDING, TOKEN)]

    @staticmethod
    def key_of(owner: Reserved | Call) -> int:
        return owner.key if isinstance(owner, Reserved) else owner.model.held[TOKEN]

    def forget(self, owner: Reserved | Call) -> None:
        """The reservation was recorded or dropped: the owner lets go of it."""
        owner.reservation = None
        if isinstance(owner, Reserved):
            self.reserved.remove(owner)
        else:
            owner.model.state = DONE
            owner.model.held = {}

    @initialize(unit_capacity=st.integers(0, 12), token_capacity=st.integers(0, 40))
    def create(self, unit_capacity, token_capacity):
        self.units = AtomicBudget(unit_capacity)
        self.tokens = AtomicTokenBudget(token_capacity)
        self.model = self.model_class(unit_capacity, token_capacity)

    # -- the unit budget --------------------------------------------------------------------------

    @rule(data=st.data(), use_async=st.booleans())
    def try_reserve(self, data, use_async):
        cost = data.draw(st.integers(0, self.units.capacity + 1), label="cost")

        async def call():
            if use_async:
                return await self.units.try_reserve(cost)
            return self.units.try_reserve_sync(cost)

        granted = self.act(call)
        assert type(granted) is bool
        assert granted == self.model.try_reserve(cost)
        self.model.run()

    def release_op(self, cost, use_async):
        async def call():
            if use_async:
                await self.units.release(cost)
            else:
                self.units.release_sync(cost)

        return call, lambda: self.model.release(cost)

    @rule(data=st.data(), use_async=st.booleans())
    def release(self, data, use_async):
        # Mostly units taken with try_reserve; one more now and then (capped at capacity).
        cost = data.draw(st.integers(0, self.model.loose + 1), label="cost")
        call, mirror = self.release_op(cost, use_async)
        self.act(call)
        mirror()
        self.model.run()

    def refill_units_op(self):
        async def call():
            assert self.units.refill() is None

        return call, self.model.refill_units

    @rule()
    def refill_units(self):
        call, mirror = self.refill_units_op()
        self.act(call)
        mirror()
        self.model.run()

    @rule(data=st.data(), timeout=TIMEOUTS)
    def start_reserve(self, data, timeout):
        call = self.new_call(UNIT, cost=data.draw(st.integers(0, self.units.capacity), "cost"))

        async def start():
            call.task = asyncio.create_task(_wait_for_permit(call, self.units, timeout))

        self.act(start)
        self.model.start(call.model, timeout == 0)
        self.model.run()

    def release_permit_op(self, call, twice=False):
        async def release():
            assert call.permit.release() is None
            assert call.permit.released
            if twice:
                call.permit.release()  # later calls do nothing

        return release, lambda: self.model.finish(call.model)

    @precondition(lambda self: self.model and self.calls_in(HOLDING, UNIT))
    @rule(data=st.data(), twice=st.booleans())
    def release_permit(self, data, twice):
        call = data.draw(st.sampled_from(self.calls_in(HOLDING, UNIT)), label="call")
        release, mirror = self.release_permit_op(call, twice)
        self.act(release)
        mirror()
        self.model.run()

    # -- the token budget -------------------------------------------------------------------------

    @rule(data=st.data(), use_async=st.booleans())
    def try_reserve_tokens(self, data, use_async):
        estimate = data.draw(st.integers(0, self.tokens.capacity + 1), label="estimate")

        async def call():
            if use_async:
                return await self.tokens.try_reserve_tokens(estimate)
            return self.tokens.try_reserve_tokens_sync(estimate)

        reservation = self.act(call)
        key = self.model.try_reserve_tokens(estimate)
        self.model.run()
        if key is None:
            assert reservation is None
            return
        assert isinstance(reservation, TokenReservation)
        assert reservation.armed
        assert reservation.estimate == estimate
        self.reserved.append(Reserved(key, estimate, reservation))

    @precondition(lambda self: self.model and self.reservation_owners())
    @rule(
        data=st.data(),
        kind=st.sampled_from(["under", "exact", "over", "into debt"]),
        use_async=st.booleans(),
    )
    def record_usage(self, data, kind, use_async):
        owner = data.draw(st.sampled_from(self.reservation_owners()), label="reservation")
        estimate = owner.reservation.estimate
        if kind == "under":
            actual = data.draw(st.integers(0, estimate), label="actual")
        elif kind == "exact":
            actual = estimate
        elif kind == "over":
            actual = estimate + data.draw(st.integers(1, 10), label="overage")
        else:  # more over the estimate than is available: the rest becomes debt
            actual = estimate + self.model.tokens.available + data.draw(st.integers(1, 10))
        prompt = data.draw(st.integers(0, actual), label="prompt")

        async def record():
            reservation = owner.reservation
            if use_async:
                await self.tokens.record_usage(reservation, prompt, actual - prompt)
            else:
                self.tokens.record_usage_sync(reservation, prompt, actual - prompt)
            assert not reservation.armed

        self.act(record)
        self.model.record(self.key_of(owner), actual)
        self.forget(owner)
        self.model.run()

    def drop_op(self, owner):
        key = self.key_of(owner)

        async def drop():
            self.forget(owner)  # the last reference: the refund runs now

        return drop, lambda: self.model.refund(key)

    @precondition(lambda self: self.model and self.reservation_owners())
    @rule(data=st.data())
    def drop_reservation(self, data):
        owner = data.draw(st.sampled_from(self.reservation_owners()), label="reservation")
        drop, mirror = self.drop_op(owner)
        self.act(drop)
        mirror()
        self.model.run()

    def refill_tokens_op(self):
        async def call():
            assert self.tokens.refill() is None

        return call, self.model.refill_tokens

    @rule()
    def refill_tokens(self):
        call, mirror = self.refill_tokens_op()
        self.act(call)
        mirror()
        self.model.run()

    @rule(data=st.data(), timeout=TIMEOUTS)
    def start_reserve_tokens(self, data, timeout):
        estimate = data.draw(st.integers(0, self.tokens.capacity), label="estimate")
        call = self.new_call(TOKEN, estimate=estimate)

        async def start():
            call.task = asyncio.create_task(_wait_for_tokens(call, self.tokens, timeout))

        self.act(start)
        self.model.start(call.model, timeout == 0)
        self.model.run()

    # -- admission --------------------------------------------------------------------------------

    @rule(data=st.data())
    def try_admit(self, data):
        cost = data.draw(st.integers(0, self.units.capacity + 1), label="cost")
        estimate = data.draw(st.integers(0, self.tokens.capacity + 1), label="estimate")

        async def attempt():
            return await try_admit(guards={self.units: cost}, tokens={self.tokens: estimate})

        ticket = self.act(attempt)
        held = self.model.try_admit(cost, estimate)
        self.model.run()
        if held is None:
            assert ticket is None
            return
        assert ticket is not None
        call = self.new_call(ADMIT, cost, estimate)
        call.ticket = ticket
        del ticket
        call.model.held = held
        call.model.state = HOLDING
        self.model.waiters.append(call.model)

    @rule(data=st.data(), timeout=TIMEOUTS)
    def start_admit(self, data, timeout):
        cost = data.draw(st.integers(0, self.units.capacity), label="cost")
        estimate = data.draw(st.integers(0, self.tokens.capacity), label="estimate")
        call = self.new_call(ADMIT, cost, estimate)

        async def start():
            waiting = _wait_for_admission(call, self.units, self.tokens, timeout)
            call.task = asyncio.create_task(waiting)

        self.act(start)
        self.model.start(call.model, timeout == 0)
        self.model.run()

    def close_op(self, call, record_first=None, use_async=True):
        async def close():
            ticket = call.ticket
            if record_first is not None:
                reservation = ticket.reservations[self.tokens]
                await self.tokens.record_usage(reservation, record_first, 0)
                del reservation
            if use_async:
                await ticket.close()
            else:
                ticket.close_sync()
            assert ticket.closed
            ticket.close_sync()  # closing twice does nothing

        def mirror():
            if record_first is not None:
                key = call.model.held.pop(TOKEN)
                self.model.record(key, record_first)
            self.model.finish(call.model)

        return close, mirror

    @precondition(lambda self: self.model and self.calls_in(HOLDING, ADMIT))
    @rule(data=st.data(), record=st.booleans(), use_async=st.booleans())
    def close_ticket(self, data, record, use_async):
        call = data.draw(st.sampled_from(self.calls_in(HOLDING, ADMIT)), label="ticket")
        actual = data.draw(st.integers(0, call.model.estimate + 5), "actual") if record else None
        close, mirror = self.close_op(call, actual, use_async)
        self.act(close)
        mirror()
        self.model.run()

    # -- cancelling -------------------------------------------------------------------------------

    @precondition(lambda self: self.model and self.waiting())
    @rule(data=st.data())
    def cancel(self, data):
        call = data.draw(st.sampled_from(self.waiting()), label="call")

        async def cancel():
            assert call.task.cancel()

        self.act(cancel)
        self.model.cancel(call.model)
        self.model.run()

    @precondition(lambda self: self.model and self.waiting())
    @rule(data=st.data(), cancel_first=st.booleans())
    def cancel_racing_a_grant(self, data, cancel_first):
        """Cancel a waiting task and give something back in the same turn of the loop.

        Given back first, the task may be granted before its cancellation runs: it must give the
        grant back. Cancelled first, it is still queued until its cancellation runs, and may be
        granted meanwhile: the same.
        """
        heads = self.model.unit.queue[:1] + self.model.tokens.queue[:1]
        choices = [c for c in self.waiting() if c.model in heads] or self.waiting()
        call = data.draw(st.sampled_from(choices), label="call")
        ops = {"refill units": self.refill_units_op(), "refill tokens": self.refill_tokens_op()}
        if self.model.loose:
            ops["release"] = self.release_op(self.model.loose, use_async=False)
        if self.calls_in(HOLDING, UNIT):
            ops["release a permit"] = self.release_permit_op(self.calls_in(HOLDING, UNIT)[0])
        if self.reservation_owners():
            ops["drop a reservation"] = self.drop_op(self.reservation_owners()[0])
        if self.calls_in(HOLDING, ADMIT):
            ops["close a ticket"] = self.close_op(self.calls_in(HOLDING, ADMIT)[0])
        op, mirror = ops[data.draw(st.sampled_from(sorted(ops)), label="give back")]

        async def cancel():
            assert call.task.cancel()

        if cancel_first:
            self.act(cancel, op)
            self.model.cancel(call.model)
            mirror()
        else:
            self.act(op, cancel)
            mirror()
            self.model.cancel(call.model)
        self.model.run()

    # -- misuse -----------------------------------------------------------------------------------

    @rule(extra=st.integers(1, 3))
    def wait_for_more_than_capacity(self, extra):
        before = (self.units.available, self.units.waiters, self.tokens.available)
        units, tokens = self.units, self.tokens
        with pytest.raises(ValueError):  # noqa: PT011 - the spec fixes no message
            units.reserve(units.capacity + extra)
        with pytest.raises(ValueError):  # noqa: PT011
            tokens.reserve_tokens(tokens.capacity + extra)
        with pytest.raises(ValueError):  # noqa: PT011
            admit(guards={units: units.capacity + extra}, tokens={tokens: 0})
        assert (self.units.available, self.units.waiters, self.tokens.available) == before

    # -- the checks after every step --------------------------------------------------------------

    @invariant()
    def budgets_match_the_model(self):
        if self.model is None:
            return
        units, tokens, model = self.units, self.tokens, self.model
        assert (units.available, units.waiters) == (model.unit.available, len(model.unit.queue))
        assert (tokens.available, tokens.debt, tokens.consumed, tokens.waiters) == (
            model.tokens.available,
            model.tokens.debt,
            model.tokens.consumed,
            len(model.tokens.queue),
        )

    @invariant()
    def calls_match_the_model(self):
        if self.model is None:
            return
        assert not self.model.ready
        waiting = {c.model.ident for c in self.calls if c.task is not None and not c.task.done()}
        assert waiting == {c.model.ident for c in self.waiting()}, "the tasks still waiting"
        granted = {c.model.ident for c in self.calls if c.holds()}
        holding = {c.model.ident for c in self.calls if c.model.state == HOLDING}
        assert granted == holding, "the tasks holding a grant"
        for call in self.calls:
            self.check_call(call)

    def check_call(self, call):
        state, task, model = call.model.state, call.task, call.model
        if task is not None and task.done() and not task.cancelled():
            assert task.exception() is None
        if state == WAITING:
            assert call.holds_nothing()
        elif state in (CANCELLED, TIMED_OUT):
            assert call.holds_nothing(), f"a {state} task holds nothing"
            assert task.cancelled() == (state == CANCELLED)
            assert call.timed_out == (state == TIMED_OUT)
        elif state == HOLDING:
            if model.kind == UNIT:
                assert call.permit.granted
                assert call.permit.cost == model.cost
            elif model.kind == TOKEN:
                assert call.reservation.estimate == model.estimate
            else:
                assert dict(call.ticket.guards) == {self.units: model.cost}
                (reservation,) = call.ticket.reservations.values()
                assert call.ticket.reservations.keys() == {self.tokens}
                assert reservation.armed
                assert reservation.estimate == model.estimate
        elif model.kind == UNIT:
            assert call.permit.released
        elif model.kind == ADMIT:
            assert call.ticket.closed

    @invariant()
    def reservations_are_armed(self):
        for owner in self.reserved:
            assert owner.reservation.armed
            assert owner.reservation.estimate == owner.estimate

    @invariant()
    def nothing_is_lost(self):
        if self.model is None:
            return
        model, units, tokens = self.model, self.units, self.tokens
        # Units: what is available plus what the machine and its tasks hold is the capacity.
        if model.unit_anchored:
            assert units.available + model.units_held() == units.capacity
        elif model.unit.available + model.units_held() == model.unit.capacity:
            model.unit_anchored = True
        # Section 5, from the real figures and the model's list of what is held.
        if model.tokens.anchored:
            held = sum(model.tokens.held.values())
            assert tokens.available - tokens.debt == tokens.capacity - tokens.consumed - held
        elif model.tokens.equation_holds():
            model.tokens.anchored = True


TestWaitingMachine = WaitingMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Guards against a vacuous machine
# ---------------------------------------------------------------------------------------------


class _LastComeFirstServedModel(WaitingModel):
    """Serves the newest waiter first."""

    def next_to_serve(self, side: Side) -> int:
        return len(side.queue) - 1


class _QueueJumpingModel(WaitingModel):
    """Lets `try_*` take what fits even while waiters are queued."""

    def try_is_blocked(self, side: Side) -> bool:
        return False


class _SkipTheBlockedHeadModel(WaitingModel):
    """Serves the first waiter that fits, past a head that does not (not strict FIFO)."""

    def next_to_serve(self, side: Side) -> int:
        fitting = (i for i, w in enumerate(side.queue) if side.fits(w.amount_on(side)))
        return next(fitting, 0)


class _CancelWakesNobodyModel(WaitingModel):
    """A cancelled waiter leaves the queue, but the one behind it is not served."""

    def withdraw(self, side: Side, waiter: Waiter) -> None:
        side.queue.remove(waiter)


class _AdmitHoldsWhileWaitingModel(WaitingModel):
    """An admission keeps the part it got while it waits for another."""

    def give_back_before_waiting(self, waiter: Waiter) -> None:
        pass


_FIND_A_WRONG_MODEL = settings(
    max_examples=1_000,
    stateful_step_count=50,
    database=None,
    phases=[Phase.generate],
    verbosity=Verbosity.quiet,
    print_blob=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize(
    "wrong_model",
    [
        _LastComeFirstServedModel,
        _QueueJumpingModel,
        _SkipTheBlockedHeadModel,
        _CancelWakesNobodyModel,
        _AdmitHoldsWhileWaitingModel,
    ],
    ids=["lifo", "try-jumps-the-queue", "skip-blocked-head", "cancel-wakes-nobody", "admit-holds"],
)
def test_machine_rejects_a_wrong_model(wrong_model):
    # The rules must reach the path a plausible mistake changes, and the checks must see it.
    mutant = type(f"WaitingMachineWith{wrong_model.__name__}", (WaitingMachine,), {})
    mutant.model_class = wrong_model
    with pytest.raises(AssertionError):
        run_state_machine_as_test(mutant, settings=_FIND_A_WRONG_MODEL)
