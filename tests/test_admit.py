"""Admission across budgets (spec section 8): admit, try_admit, admit_blocking and Ticket.

What a user relies on, over mixes of native budgets (``AtomicBudget``, ``AtomicTokenBudget``)
and user-written ones (plain classes implementing only the protocols of section 1):

- every part or none: a ticket holds each part, ``ticket.reservations`` are armed reservations
  that ``record_usage`` accepts; a model test (Hypothesis) of when an admission is granted;
- rollback when the second of three parts is denied or raises, for every kind of part: the first
  part is back exactly, nothing of the third is taken;
- leaving the block (or ``close()``) releases each guard once and refunds the unrecorded
  reservations, on success, error and cancellation;
- waiting (sections 7 and 8): woken at once by a native part, backoff on a user-written part,
  ``TimeoutError`` and cancellation leave nothing taken and no waiter behind;
- no deadlock between admissions taking two native budgets in opposite orders; threads;
  ``RuntimeError`` on a loop thread; ``ValueError`` above a native capacity; bad input
  (section 2).

Every wait is bounded (``WAIT``) so that a bug fails instead of hanging; setup synchronises by
polling a state (``budget.waiters``) with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from costbound import (
    AtomicBudget,
    AtomicTokenBudget,
    BudgetGuard,
    Ticket,
    TokenBudget,
    TokenReservation,
    admit,
    admit_blocking,
    try_admit,
)
from hypothesis import given
from hypothesis import strategies as st

WAIT = 30.0  # the bound on every wait: only reached when something is broken
PROMPT = 10.0  # "at once", generously: a woken admission finishes well within this
POLL = 0.001


class PartError(Exception):
    """What a failing part raises (a backend that cannot serve the call)."""


# --- Polling with a deadline (setup synchronisation only) ------------------------------------


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {WAIT} s: {what}"
        await asyncio.sleep(POLL)


def until_sync(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {WAIT} s: {what}"
        time.sleep(POLL)


# --- User-written budgets: only the protocols' methods, with their own accounting ------------


class UserGuard:
    """A user-written ``BudgetGuard``: ``try_reserve`` / ``release`` over its own counter.

    It has no ``reserve`` (it cannot signal), no ``*_sync`` methods, and does not cap releases,
    so that a double release shows in ``available``. ``fail`` makes ``try_reserve`` raise.
    """

    def __init__(self, capacity: int) -> None:
        self.available = capacity
        self.tries = 0
        self.grants = 0
        self.releases = 0
        self.fail: BaseException | None = None
        self.callers: set[asyncio.Task] = set()  # the tasks that tried it
        self._lock = threading.Lock()

    async def try_reserve(self, cost: int) -> bool:
        self.callers.add(asyncio.current_task())
        with self._lock:
            self.tries += 1
            if self.fail is not None:
                raise self.fail
            if self.available < cost:
                return False
            self.available -= cost
            self.grants += 1
            return True

    async def release(self, cost: int) -> None:
        with self._lock:
            self.releases += 1
            self.available += cost

    def take(self, cost: int) -> None:
        """Someone else takes ``cost`` units (setup)."""
        with self._lock:
            assert self.available >= cost
            self.available -= cost

    def give(self, cost: int) -> None:
        with self._lock:
            self.available += cost


class UserTokenBudget:
    """A user-written ``TokenBudget`` issuing ``TokenReservation(estimate, refund)`` itself.

    ``balance`` is signed (an overage simply makes it smaller); ``outstanding`` counts the armed
    reservations it issued; ``refunds`` counts the refund calls.
    """

    def __init__(self, capacity: int) -> None:
        self.balance = capacity
        self.consumed = 0
        self.outstanding = 0
        self.tries = 0
        self.refunds = 0
        self.fail: BaseException | None = None
        self.callers: set[asyncio.Task] = set()  # the tasks that tried it
        self._lock = threading.Lock()

    def _issue(self, estimate: int) -> TokenReservation | None:
        with self._lock:
            if self.balance < estimate:
                return None
            self.balance -= estimate
            self.outstanding += 1
        return TokenReservation(estimate, self._refund)

    def _refund(self, estimate: int) -> None:
        with self._lock:
            self.balance += estimate
            self.outstanding -= 1
            self.refunds += 1

    async def try_reserve_tokens(self, estimate: int) -> TokenReservation | None:
        self.callers.add(asyncio.current_task())
        with self._lock:
            self.tries += 1
            if self.fail is not None:
                raise self.fail
        return self._issue(estimate)

    async def record_usage(self, reservation: TokenReservation, prompt: int, completion: int):
        if reservation.disarm() is None:
            raise ValueError("reservation already reconciled")
        actual = prompt + completion
        with self._lock:
            self.consumed += actual
            self.balance += reservation.estimate - actual
            self.outstanding -= 1

    async def tokens_consumed(self) -> int:
        return self.consumed

    def take(self, estimate: int) -> TokenReservation:
        """Someone else reserves ``estimate`` (setup); keep the reservation to hold it."""
        reservation = self._issue(estimate)
        assert reservation is not None
        return reservation


# --- Native budgets with an injected fault (a native part that raises) -----------------------


class FaultyBudget(AtomicBudget):
    """An ``AtomicBudget`` whose ``try_reserve`` / ``try_reserve_sync`` raise ``fail`` if set."""

    fail: BaseException | None = None

    async def try_reserve(self, cost: int) -> bool:
        if self.fail is not None:
            raise self.fail
        return await super().try_reserve(cost)

    def try_reserve_sync(self, cost: int) -> bool:
        if self.fail is not None:
            raise self.fail
        return super().try_reserve_sync(cost)


class FaultyTokenBudget(AtomicTokenBudget):
    """An ``AtomicTokenBudget`` whose try calls raise ``fail`` if set."""

    fail: BaseException | None = None

    async def try_reserve_tokens(self, estimate: int) -> TokenReservation | None:
        if self.fail is not None:
            raise self.fail
        return await super().try_reserve_tokens(estimate)

    def try_reserve_tokens_sync(self, estimate: int) -> TokenReservation | None:
        if self.fail is not None:
            raise self.fail
        return super().try_reserve_tokens_sync(estimate)


def test_the_user_written_budgets_are_budgets():
    assert isinstance(UserGuard(1), BudgetGuard)
    assert isinstance(UserTokenBudget(1), TokenBudget)
    assert not isinstance(UserGuard(1), TokenBudget)
    assert not isinstance(UserTokenBudget(1), BudgetGuard)


# --- One part of an admission, of any kind, that can be made to deny or raise ----------------

NATIVE_GUARD, NATIVE_TOKENS, USER_GUARD, USER_TOKENS = (
    "native guard",
    "native tokens",
    "user guard",
    "user tokens",
)
KINDS = (NATIVE_GUARD, NATIVE_TOKENS, USER_GUARD, USER_TOKENS)


class Side:
    """A budget of one kind, part of an admission for ``amount``.

    Someone else holds ``outside`` units all along, so that a double release or refund shows
    (native budgets cap at their capacity). ``block()`` has someone else take the rest, so the
    part is denied; ``unblock()`` gives it back (waking native waiters).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.native = kind.startswith("native")
        self.is_tokens = kind.endswith("tokens")
        self.capacity, self.outside, self.amount = (
            (1000, 300, 400) if self.is_tokens else (10, 3, 4)
        )
        self.budget = {
            NATIVE_GUARD: FaultyBudget,
            NATIVE_TOKENS: FaultyTokenBudget,
            USER_GUARD: UserGuard,
            USER_TOKENS: UserTokenBudget,
        }[kind](self.capacity)
        self._outside = self._take(self.outside)
        self._blocking = None
        self.free = self.state()
        left = self.capacity - self.outside - self.amount
        self.taken = {
            NATIVE_GUARD: (left, 0),
            NATIVE_TOKENS: (left, 0, 0, 0),
            USER_GUARD: (left,),
            USER_TOKENS: (left, 0, 2),
        }[kind]

    def __repr__(self) -> str:
        return self.kind

    def _take(self, amount: int):
        budget = self.budget
        if self.kind == NATIVE_GUARD:
            assert budget.try_reserve_sync(amount)
            return amount
        if self.kind == NATIVE_TOKENS:
            reservation = budget.try_reserve_tokens_sync(amount)
            assert reservation is not None
            return reservation
        if self.kind == USER_GUARD:
            budget.take(amount)
            return amount
        return budget.take(amount)

    def _give(self, handle) -> None:
        if self.kind == NATIVE_GUARD:
            self.budget.release_sync(handle)
        elif self.kind == NATIVE_TOKENS:
            self.budget.record_usage_sync(handle, 0, 0)  # refunds the whole estimate
        elif self.kind == USER_GUARD:
            self.budget.give(handle)
        else:
            refund = handle.disarm()
            refund(handle.estimate)

    def block(self) -> None:
        self._blocking = self._take(self.capacity - self.outside)

    def unblock(self) -> None:
        self._give(self._blocking)
        self._blocking = None

    def state(self) -> tuple[int, ...]:
        b = self.budget
        if self.kind == NATIVE_GUARD:
            return (b.available, b.waiters)
        if self.kind == NATIVE_TOKENS:
            return (b.available, b.debt, b.consumed, b.waiters)
        if self.kind == USER_GUARD:
            return (b.available,)
        return (b.balance, b.consumed, b.outstanding)

    def waited_on(self, tries_before: int):
        """A condition: an admission is waiting for this (blocked) part."""
        if self.native:
            # A waiting admission watches its native parts (costbound._admit): no place in line.
            return lambda: self.budget._watchers == 1
        # A user-written part is retried: seen tried again at least twice since `tries_before`.
        return lambda: self.budget.tries >= tries_before + 2


def mappings(sides: list[Side]) -> dict:
    guards = {s.budget: s.amount for s in sides if not s.is_tokens}
    tokens = {s.budget: s.amount for s in sides if s.is_tokens}
    return {"guards": guards, "tokens": tokens}


def states(sides: list[Side]) -> list[tuple[int, ...]]:
    return [s.state() for s in sides]


def watchers(sides: list[Side]) -> list[int]:
    """How many admissions watch each native part (costbound._admit watches while it waits)."""
    return [s.budget._watchers for s in sides if s.native]


def check_ticket(ticket: Ticket, sides: list[Side]) -> None:
    assert isinstance(ticket, Ticket)
    assert not ticket.closed
    assert dict(ticket.guards) == {s.budget: s.amount for s in sides if not s.is_tokens}
    assert set(ticket.reservations) == {s.budget for s in sides if s.is_tokens}
    for side in sides:
        if side.is_tokens:
            reservation = ticket.reservations[side.budget]
            assert isinstance(reservation, TokenReservation)
            assert reservation.armed
            assert reservation.estimate == side.amount
    assert states(sides) == [s.taken for s in sides]


# Three parts with the second of every kind; guards are tried before tokens (the order of the
# `guards` then `tokens` mappings), so a token part is followed only by token parts.
def _layouts():
    for first in KINDS:
        for second in KINDS:
            for third in KINDS:
                categories = [k.endswith("tokens") for k in (first, second, third)]
                if categories == sorted(categories):
                    yield pytest.param((first, second, third), id=f"{first}-{second}-{third}")


LAYOUTS = list(_layouts())
FAILURES = ["denied", "raises"]


def prepare(layout, failure: str) -> tuple[list[Side], list[tuple[int, ...]]]:
    sides = [Side(kind) for kind in layout]
    second = sides[1]
    if failure == "denied":
        second.block()
    else:
        second.budget.fail = PartError(f"{second.kind} is down")
    return sides, states(sides)


def check_first_given_back(first: Side) -> None:
    """A user-written first part shows it was taken and given back (not just never taken)."""
    if first.kind == USER_GUARD:
        assert first.budget.grants >= 1
        assert first.budget.releases == first.budget.grants
    elif first.kind == USER_TOKENS:
        assert first.budget.refunds >= 1
        assert first.budget.outstanding == 1  # the outside hold only


def check_nothing_held(first: Side) -> None:
    """A user-written first part is not held: every grant (if any) was given back."""
    if first.kind == USER_GUARD:
        assert first.budget.releases == first.budget.grants
    elif first.kind == USER_TOKENS:
        assert first.budget.outstanding == 1  # the outside hold only


def check_first_given_back_but_one(first: Side) -> None:
    """As above, while another thread may be in the middle of one more attempt."""
    if first.kind == USER_GUARD:
        assert first.budget.grants >= 1
        assert first.budget.grants - first.budget.releases in (0, 1)
    elif first.kind == USER_TOKENS:
        assert first.budget.refunds >= 1
        assert first.budget.outstanding in (1, 2)  # the outside hold, and perhaps this attempt's


# --- Every part or none ----------------------------------------------------------------------


def mix():
    """Native and user-written guards and token budgets, each partly held by someone else."""
    a = AtomicBudget(10)
    assert a.try_reserve_sync(3)
    ug = UserGuard(10)
    ug.take(3)
    tb = AtomicTokenBudget(1000)
    tb_outside = tb.try_reserve_tokens_sync(300)
    utb = UserTokenBudget(1000)
    utb_outside = utb.take(300)
    return a, ug, tb, utb, [tb_outside, utb_outside]


async def _admit_with(api: str, **kwargs) -> Ticket | None:
    if api == "try_admit":
        return await try_admit(**kwargs)
    if api == "admit":
        return await asyncio.wait_for(admit(timeout=WAIT, **kwargs), WAIT)
    return await asyncio.wait_for(
        asyncio.to_thread(lambda: admit_blocking(timeout=WAIT, **kwargs)), WAIT
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("api", ["try_admit", "admit", "admit_blocking"])
async def test_ticket_holds_every_part_and_its_reservations_can_be_recorded(api):
    a, ug, tb, utb, _outside = mix()
    ticket = await _admit_with(api, guards={a: 2, ug: 4}, tokens={tb: 400, utb: 250})
    assert isinstance(ticket, Ticket)
    assert not ticket.closed
    assert dict(ticket.guards) == {a: 2, ug: 4}
    assert set(ticket.reservations) == {tb, utb}
    native_r, user_r = ticket.reservations[tb], ticket.reservations[utb]
    assert isinstance(native_r, TokenReservation)
    assert isinstance(user_r, TokenReservation)
    assert (native_r.armed, native_r.estimate, user_r.armed, user_r.estimate) == (
        True,
        400,
        True,
        250,
    )
    assert (a.available, ug.available, tb.available, utb.balance) == (5, 3, 300, 450)

    await tb.record_usage(native_r, 120, 80)
    await utb.record_usage(user_r, 100, 50)
    assert not native_r.armed
    assert not user_r.armed
    assert (tb.available, tb.consumed, await tb.tokens_consumed()) == (500, 200, 200)
    assert (utb.balance, utb.consumed, utb.outstanding) == (550, 150, 1)

    await ticket.close()
    assert ticket.closed
    # Guards back once; recorded reservations left alone (no second refund).
    assert (a.available, ug.available, ug.releases) == (7, 7, 1)
    assert (tb.available, tb.consumed, utb.balance, utb.consumed, utb.refunds) == (
        500,
        200,
        550,
        150,
        0,
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("api", ["try_admit", "admit", "admit_blocking"])
async def test_only_guards_or_only_tokens(api):
    a, ug, tb, utb, _outside = mix()
    ticket = await _admit_with(api, guards={a: 7, ug: 7})
    assert dict(ticket.guards) == {a: 7, ug: 7}
    assert dict(ticket.reservations) == {}
    await ticket.close()
    ticket = await _admit_with(api, tokens={tb: 700, utb: 700})
    assert dict(ticket.guards) == {}
    assert set(ticket.reservations) == {tb, utb}
    assert (tb.available, utb.balance) == (0, 0)
    await ticket.close()
    assert (a.available, ug.available, tb.available, utb.balance) == (7, 7, 700, 700)


class Index:
    """An integer-like amount (a NumPy integer, say): accepted through ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@pytest.mark.asyncio
async def test_amounts_with_index_are_accepted():
    a, ug, tb, _utb, _outside = mix()
    ticket = await try_admit(guards={a: Index(2), ug: Index(1)}, tokens={tb: Index(5)})
    assert dict(ticket.guards) == {a: 2, ug: 1}
    assert ticket.reservations[tb].estimate == 5
    await ticket.close()
    assert (a.available, ug.available, tb.available) == (7, 7, 700)


PART = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 6),  # capacity
    st.integers(0, 6),  # held by someone else (at most the capacity)
    st.integers(0, 7),  # the amount asked
)


@given(parts=st.lists(PART, min_size=1, max_size=5), api=st.sampled_from(["try", "admit", "block"]))
def test_every_part_or_none_against_a_model(parts, api):
    """A ticket iff every part fits (no queue anywhere); otherwise nothing at all is taken."""
    sides = []
    for kind, capacity, wanted_held, amount in parts:
        budget = {
            NATIVE_GUARD: AtomicBudget,
            NATIVE_TOKENS: AtomicTokenBudget,
            USER_GUARD: UserGuard,
            USER_TOKENS: UserTokenBudget,
        }[kind](capacity)
        held = min(wanted_held, capacity)
        keep = None
        if kind == NATIVE_GUARD:
            assert budget.try_reserve_sync(held)
        elif kind == NATIVE_TOKENS:
            keep = budget.try_reserve_tokens_sync(held)
        elif kind == USER_GUARD:
            budget.take(held)
        else:
            keep = budget.take(held)
        sides.append((kind, budget, capacity - held, amount, keep))

    guards = {b: n for k, b, _, n, _ in sides if not k.endswith("tokens")}
    tokens = {b: n for k, b, _, n, _ in sides if k.endswith("tokens")}
    fits = all(n <= free for _, _, free, n, _ in sides)
    never = any(k.startswith("native") and n > b.capacity for k, b, _, n, _ in sides)
    before = [(b.available if k != USER_TOKENS else b.balance) for k, b, *_ in sides]

    async def run_async():
        if api == "try":
            return await try_admit(guards=guards, tokens=tokens)
        return await admit(guards=guards, tokens=tokens, timeout=0)

    outcome: object
    try:
        if api == "block":
            outcome = admit_blocking(guards=guards, tokens=tokens, timeout=0)
        else:
            outcome = asyncio.run(run_async())
    except (TimeoutError, ValueError) as exc:
        outcome = exc

    after = [(b.available if k != USER_TOKENS else b.balance) for k, b, *_ in sides]
    if fits:
        assert isinstance(outcome, Ticket)
        assert dict(outcome.guards) == guards
        assert {b: r.estimate for b, r in outcome.reservations.items()} == tokens
        assert all(r.armed for r in outcome.reservations.values())
        assert after == [x - n for x, (_, _, _, n, _) in zip(before, sides, strict=True)]
        outcome.close_sync()
    elif api == "try":
        assert outcome is None
    elif never:
        assert isinstance(outcome, ValueError)
    else:
        assert isinstance(outcome, TimeoutError)
    after = [(b.available if k != USER_TOKENS else b.balance) for k, b, *_ in sides]
    assert after == before
    assert all(b.waiters == 0 for k, b, *_ in sides if k.startswith("native"))
    assert all(b.outstanding == 1 for k, b, *_ in sides if k == USER_TOKENS)  # the outside hold
    assert all(b.releases == b.grants for k, b, *_ in sides if k == USER_GUARD)


# --- Rollback when the second of three parts is denied or raises -----------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_try_admit_rolls_back_when_the_second_part_fails(layout, failure):
    sides, before = prepare(layout, failure)
    if failure == "denied":
        assert await try_admit(**mappings(sides)) is None
    else:
        with pytest.raises(PartError):
            await try_admit(**mappings(sides))
    assert states(sides) == before
    check_first_given_back(sides[0])


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_admit_rolls_back_when_the_second_part_fails(layout, failure):
    sides, before = prepare(layout, failure)
    first, second, third = sides
    if failure == "raises":
        with pytest.raises(PartError):
            await asyncio.wait_for(admit(**mappings(sides), timeout=WAIT), WAIT)
        assert states(sides) == before
        check_first_given_back(first)
        return

    task = asyncio.create_task(asyncio.wait_for(admit(**mappings(sides), timeout=WAIT), WAIT))
    await until(second.waited_on(0), f"the admission waits for the {second}")
    # Waiting, it holds nothing: the first part went back, nothing of the third was taken.
    assert [first.state(), third.state()] == [before[0], before[2]]
    if second.native:
        # It looks at native parts before taking anything: one that cannot fit is not tried.
        check_nothing_held(first)
    else:
        check_first_given_back(first)
    assert not task.done()

    second.unblock()
    ticket = await task
    check_ticket(ticket, sides)
    await ticket.close()
    assert states(sides) == [s.free for s in sides]


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_admit_blocking_rolls_back_when_the_second_part_fails(layout, failure):
    sides, before = prepare(layout, failure)
    first, second, third = sides
    if failure == "raises":
        with pytest.raises(PartError):
            admit_blocking(**mappings(sides), timeout=WAIT)
        assert states(sides) == before
        check_first_given_back(first)
        return

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(admit_blocking, **mappings(sides), timeout=WAIT)
        until_sync(second.waited_on(0), f"the admission waits for the {second}")
        if second.native:
            # Queued for the second part, the thread holds nothing.
            assert [first.state(), third.state()] == [before[0], before[2]]
            check_nothing_held(first)
        else:
            # A user-written second part is retried, so the thread may hold the first part at
            # any given moment, but never more than the one attempt's.
            check_first_given_back_but_one(first)
        assert not future.done()
        second.unblock()
        ticket = future.result(timeout=WAIT)
    check_ticket(ticket, sides)
    ticket.close_sync()
    assert states(sides) == [s.free for s in sides]


@pytest.mark.asyncio
async def test_try_admit_rolls_back_when_a_native_part_rejects_an_out_of_range_amount():
    a, ug, tb, utb, _outside = mix()
    with pytest.raises(ValueError):  # noqa: PT011 (section 2 fixes no message)
        await try_admit(guards={ug: 1, a: 1}, tokens={utb: 5, tb: 2**64})
    assert (a.available, ug.available, tb.available, utb.balance) == (7, 7, 700, 700)
    assert (ug.grants, ug.releases, utb.refunds) == (1, 1, 1)


class GatedGuard(UserGuard):
    """A user-written guard whose ``try_reserve`` waits for ``gate`` (a slow backend)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def try_reserve(self, cost: int) -> bool:
        self.entered.set()
        await self.gate.wait()
        return await super().try_reserve(cost)


@pytest.mark.asyncio
@pytest.mark.parametrize("api", ["admit", "try_admit"])
async def test_cancelled_while_trying_a_later_part_gives_back_the_parts_taken(api):
    a, ug, _tb, _utb, _outside = mix()
    gated = GatedGuard(5)
    guards = {a: 2, ug: 4, gated: 1}
    call = admit(guards=guards, timeout=WAIT) if api == "admit" else try_admit(guards=guards)
    task = asyncio.create_task(asyncio.wait_for(call, WAIT))
    await asyncio.wait_for(gated.entered.wait(), WAIT)
    # User-written parts are tried first (in the given order), native ones after them: `ug` is
    # held while `gated` is tried, and `a` is not taken yet.
    assert (a.available, ug.available) == (7, 3)
    task.cancel()
    await asyncio.wait([task], timeout=WAIT)
    assert task.cancelled()
    assert (a.available, ug.available, ug.releases, gated.available, gated.tries) == (7, 7, 1, 5, 0)
    assert a.waiters == 0


# --- Leaving the block -----------------------------------------------------------------------


def leaving_mix():
    """The mix, plus a token budget of each kind whose reservation gets recorded in the block."""
    a, ug, tb, utb, outside = mix()
    tb2 = AtomicTokenBudget(1000)
    outside.append(tb2.try_reserve_tokens_sync(300))
    utb2 = UserTokenBudget(1000)
    outside.append(utb2.take(300))
    guards = {a: 2, ug: 4}
    tokens = {tb: 400, utb: 250, tb2: 200, utb2: 200}
    return (a, ug, tb, utb, tb2, utb2), guards, tokens, outside


def check_left(budgets, ticket: Ticket) -> None:
    a, ug, tb, utb, tb2, utb2 = budgets
    assert ticket.closed
    assert (a.available, ug.available, ug.releases) == (7, 7, 1)  # each guard released once
    assert (tb.available, tb.consumed, tb.waiters) == (700, 0, 0)  # refunded once
    assert (utb.balance, utb.outstanding, utb.refunds) == (700, 1, 1)
    # Recorded: the usage stays consumed and the estimate is not refunded a second time.
    assert (tb2.available, tb2.consumed) == (1000 - 300 - 50, 50)
    assert (utb2.balance, utb2.consumed, utb2.outstanding, utb2.refunds) == (650, 50, 1, 0)
    assert not any(r.armed for r in ticket.reservations.values())


async def _record_two(ticket: Ticket, tb2, utb2) -> None:
    await tb2.record_usage(ticket.reservations[tb2], 30, 20)
    await utb2.record_usage(ticket.reservations[utb2], 30, 20)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["normally", "by an exception", "by cancellation"])
async def test_leaving_async_with_releases_guards_once_and_refunds_unrecorded(how):
    budgets, guards, tokens, _outside = leaving_mix()
    a, ug, tb, utb, tb2, utb2 = budgets
    inside = asyncio.Event()
    seen: list[Ticket] = []

    async def body():
        async with admit(guards=guards, tokens=tokens, timeout=WAIT) as ticket:
            seen.append(ticket)
            await _record_two(ticket, tb2, utb2)
            assert (a.available, ug.available, tb.available, utb.balance) == (5, 3, 300, 450)
            inside.set()
            if how == "by an exception":
                raise PartError("the model call failed")
            if how == "by cancellation":
                await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.wait_for(inside.wait(), WAIT)
    if how == "by cancellation":
        task.cancel()
    await asyncio.wait([task], timeout=WAIT)
    assert task.done()
    if how == "normally":
        task.result()
    elif how == "by an exception":
        with pytest.raises(PartError):
            task.result()
    else:
        assert task.cancelled()
    check_left(budgets, seen[0])


@pytest.mark.parametrize("how", ["normally", "by an exception"])
def test_leaving_with_admit_blocking_releases_guards_once_and_refunds_unrecorded(how):
    budgets, guards, tokens, _outside = leaving_mix()
    a, ug, tb, utb, tb2, utb2 = budgets
    seen: list[Ticket] = []

    def body():
        with admit_blocking(guards=guards, tokens=tokens, timeout=WAIT) as ticket:
            seen.append(ticket)
            tb2.record_usage_sync(ticket.reservations[tb2], 30, 20)
            asyncio.run(utb2.record_usage(ticket.reservations[utb2], 30, 20))
            assert (a.available, ug.available, tb.available, utb.balance) == (5, 3, 300, 450)
            if how == "by an exception":
                raise PartError("the model call failed")

    if how == "by an exception":
        with pytest.raises(PartError):
            body()
    else:
        body()
    check_left(budgets, seen[0])


@pytest.mark.asyncio
async def test_close_twice_releases_once():
    budgets, guards, tokens, _outside = leaving_mix()
    _a, _ug, _tb, _utb, tb2, utb2 = budgets
    ticket = await asyncio.wait_for(admit(guards=guards, tokens=tokens, timeout=WAIT), WAIT)
    assert not ticket.closed
    await _record_two(ticket, tb2, utb2)
    await ticket.close()
    assert ticket.closed
    await ticket.close()
    ticket.close_sync()
    with pytest.raises(RuntimeError, match="closed"):  # single-use: it holds nothing now
        async with ticket:
            pass
    check_left(budgets, ticket)


def test_close_sync_twice_releases_once():
    budgets, guards, tokens, _outside = leaving_mix()
    _a, _ug, _tb, _utb, tb2, utb2 = budgets
    ticket = admit_blocking(guards=guards, tokens=tokens, timeout=WAIT)
    tb2.record_usage_sync(ticket.reservations[tb2], 30, 20)
    asyncio.run(utb2.record_usage(ticket.reservations[utb2], 30, 20))
    ticket.close_sync()
    ticket.close_sync()
    assert ticket.closed
    with pytest.raises(RuntimeError, match="closed"), ticket:  # single-use: it holds nothing
        pass
    check_left(budgets, ticket)


@pytest.mark.asyncio
async def test_a_try_admit_ticket_closes_with_its_block():
    budgets, guards, tokens, _outside = leaving_mix()
    _a, _ug, _tb, _utb, tb2, utb2 = budgets
    async with await try_admit(guards=guards, tokens=tokens) as ticket:
        await _record_two(ticket, tb2, utb2)
    check_left(budgets, ticket)


# --- Waiting ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("by", ["another task", "another thread"])
@pytest.mark.parametrize("what", ["guard", "tokens"])
async def test_admit_waiting_on_a_native_part_is_woken_at_once(what, by):
    ug = UserGuard(1)
    if what == "guard":
        budget = AtomicBudget(1)
        assert budget.try_reserve_sync(1)
        parts = {"guards": {ug: 1, budget: 1}}
    else:
        budget = AtomicTokenBudget(100)
        hold = budget.try_reserve_tokens_sync(100)
        parts = {"guards": {ug: 1}, "tokens": {budget: 100}}

    async def free_from_a_task():
        if what == "guard":
            await budget.release(1)
        else:
            await budget.record_usage(hold, 0, 0)

    def free_sync():
        if what == "guard":
            budget.release_sync(1)
        else:
            budget.record_usage_sync(hold, 0, 0)

    task = asyncio.create_task(asyncio.wait_for(admit(**parts, timeout=WAIT), WAIT))
    await until(lambda: budget._watchers == 1, "the admission waits")
    assert ug.available == 1  # waits holding nothing
    tries = ug.tries
    started = time.monotonic()
    if by == "another task":
        await asyncio.create_task(free_from_a_task())
    else:
        thread = threading.Thread(target=free_sync)
        thread.start()
        thread.join(WAIT)
    ticket = await task
    assert time.monotonic() - started < PROMPT
    assert ug.tries == tries + 1  # woken by the grant, not by retrying
    assert (budget.waiters, budget._watchers, ug.available) == (0, 0, 0)
    assert budget.available == 0
    await ticket.close()
    assert (budget.available, ug.available) == ((1, 1) if what == "guard" else (100, 1))


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["guard", "tokens"])
async def test_admit_blocking_waiting_on_a_native_part_is_woken_by_an_event_loop(what):
    ug = UserGuard(1)
    if what == "guard":
        budget = AtomicBudget(1)
        assert budget.try_reserve_sync(1)
        parts = {"guards": {ug: 1, budget: 1}}
    else:
        budget = AtomicTokenBudget(100)
        hold = budget.try_reserve_tokens_sync(100)
        parts = {"guards": {ug: 1}, "tokens": {budget: 100}}

    call = asyncio.to_thread(lambda: admit_blocking(**parts, timeout=WAIT))
    blocked = asyncio.create_task(asyncio.wait_for(call, WAIT))
    await until(lambda: budget._watchers == 1, "the thread waits")
    started = time.monotonic()
    if what == "guard":
        await budget.release(1)
    else:
        await budget.record_usage(hold, 0, 0)
    ticket = await blocked
    assert time.monotonic() - started < PROMPT
    assert (budget.waiters, budget._watchers, budget.available, ug.available) == (0, 0, 0, 0)
    await ticket.close()  # a ticket from admit_blocking closes on a loop too
    assert ug.available == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [USER_GUARD, USER_TOKENS])
async def test_admit_waiting_on_a_user_written_part_succeeds_once_it_frees(kind):
    a = AtomicBudget(2)
    user = Side(kind)
    user.block()
    parts = mappings([user])
    parts["guards"] = {a: 1, **parts["guards"]}
    task = asyncio.create_task(asyncio.wait_for(admit(**parts, timeout=WAIT), WAIT))
    await until(user.waited_on(0), "the user-written part is retried")
    assert a.available == 2  # backing off holding nothing
    user.unblock()
    ticket = await task
    assert a.available == 1
    assert user.state() == user.taken
    await ticket.close()
    assert (a.available, user.state()) == (2, user.free)


@pytest.mark.parametrize("kind", [USER_GUARD, USER_TOKENS])
def test_admit_blocking_waiting_on_a_user_written_part_succeeds_once_it_frees(kind):
    a = AtomicBudget(2)
    user = Side(kind)
    user.block()
    parts = mappings([user])
    parts["guards"] = {a: 1, **parts["guards"]}
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(admit_blocking, **parts, timeout=WAIT)
        until_sync(user.waited_on(0), "the user-written part is retried")
        user.unblock()
        ticket = future.result(timeout=WAIT)
    assert (a.available, user.state()) == (1, user.taken)
    ticket.close_sync()
    assert (a.available, user.state()) == (2, user.free)


@pytest.mark.asyncio
async def test_an_admission_that_fits_is_not_held_up_by_one_waiting_for_another_budget():
    """Y needs only ``a``; X needs ``a`` and ``busy``, which stays busy. Once ``a`` frees, Y is
    admitted at once (section 8: native parts wake a waiting admit at once), X still waits."""
    a, busy = AtomicBudget(1), AtomicBudget(1)
    assert busy.try_reserve_sync(1)  # someone's long work
    x = asyncio.create_task(asyncio.wait_for(admit(guards={a: 1, busy: 1}, timeout=WAIT), WAIT))
    await until(lambda: busy._watchers == 1, "X waits for busy")
    assert a.try_reserve_sync(1)  # someone's short work
    probe = UserGuard(1)  # tried first: once given back, Y was denied `a` and waits
    y = asyncio.create_task(asyncio.wait_for(admit(guards={probe: 1, a: 1}, timeout=WAIT), WAIT))
    await until(lambda: a._watchers == 2, "Y was denied a and waits")
    assert probe.grants == probe.releases  # it holds nothing of the probe while it waits
    assert not y.done()
    a.release_sync(1)
    done, _ = await asyncio.wait([y], timeout=PROMPT)
    try:
        assert y in done, f"Y not admitted within {PROMPT} s although `a` is free"
        ticket = y.result()
        assert (a.available, probe.available, busy.available) == (0, 0, 0)
        assert not x.done()
        await ticket.close()
    finally:
        for task in (x, y):
            task.cancel()
        await asyncio.wait([x, y], timeout=WAIT)
    assert (a.available, a.waiters, busy.available, busy.waiters) == (1, 0, 0, 0)
    assert (a._watchers, busy._watchers) == (0, 0)
    assert probe.available == 1
    assert probe.grants == probe.releases


def _four_sides(blocked: str) -> list[Side]:
    sides = [Side(kind) for kind in (NATIVE_GUARD, USER_GUARD, NATIVE_TOKENS, USER_TOKENS)]
    for side in sides:
        if side.kind == blocked:
            side.block()
    return sides


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout", [0, 0.05])
@pytest.mark.parametrize("blocked", KINDS)
async def test_admit_timeout_takes_nothing(blocked, timeout):
    sides = _four_sides(blocked)
    before = states(sides)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(admit(**mappings(sides), timeout=timeout), WAIT)
    assert states(sides) == before  # includes `waiters == 0` on the native parts
    assert not any(watchers(sides))


@pytest.mark.parametrize("timeout", [0, 0.05])
@pytest.mark.parametrize("blocked", KINDS)
def test_admit_blocking_timeout_takes_nothing(blocked, timeout):
    sides = _four_sides(blocked)
    before = states(sides)
    with pytest.raises(TimeoutError):
        admit_blocking(**mappings(sides), timeout=timeout)
    assert states(sides) == before


@pytest.mark.asyncio
async def test_timeout_zero_admits_when_everything_fits():
    sides = _four_sides(blocked="none")
    ticket = await admit(**mappings(sides), timeout=0)
    check_ticket(ticket, sides)
    await ticket.close()
    assert states(sides) == [s.free for s in sides]


def test_admit_blocking_timeout_zero_admits_when_everything_fits():
    sides = _four_sides(blocked="none")
    with admit_blocking(**mappings(sides), timeout=0) as ticket:
        check_ticket(ticket, sides)
    assert states(sides) == [s.free for s in sides]


async def admitted(**kwargs) -> Ticket:
    return await admit(**kwargs)


@pytest.mark.asyncio
@pytest.mark.parametrize("blocked", KINDS)
async def test_cancelling_a_waiting_admit_leaves_nothing_taken_and_no_waiter(blocked):
    sides = _four_sides(blocked)
    side = next(s for s in sides if s.kind == blocked)
    others = [s for s in sides if s is not side]
    before = states(others)
    blocked_before = side.state()
    first = asyncio.create_task(admitted(**mappings(sides), timeout=WAIT))
    await until(side.waited_on(0), "the first admission waits")
    second = asyncio.create_task(admitted(**mappings(sides), timeout=WAIT))
    if side.native:
        await until(lambda: side.budget._watchers == 2, "the second admission waits too")
    else:
        await until(lambda: second in side.budget.callers, "the second admission tries too")
    first.cancel()
    await asyncio.wait([first], timeout=WAIT)
    assert first.cancelled()
    # Nothing taken; on a native part, only the second admission still waits.
    assert [s.state()[0] for s in others] == [b[0] for b in before]
    if side.native:
        assert (side.budget._watchers, side.budget.waiters) == (1, 0)
        assert side.state()[0] == blocked_before[0]
    else:
        assert side.state() == blocked_before
    # The next waiter is still served.
    side.unblock()
    ticket = await asyncio.wait_for(second, WAIT)
    check_ticket(ticket, sides)
    await ticket.close()
    assert states(sides) == [s.free for s in sides]


# --- No deadlock between opposite orders -----------------------------------------------------

TASKS = 200


@pytest.mark.asyncio
async def test_opposite_orders_on_two_native_budgets_all_complete():
    a, b = AtomicBudget(1), AtomicBudget(1)
    rng = random.Random(8)
    inside = 0

    async def one(index: int, work: float) -> None:
        nonlocal inside
        guards = {a: 1, b: 1} if index % 2 else {b: 1, a: 1}
        async with admit(guards=guards) as ticket:
            inside += 1
            assert inside == 1
            assert (a.available, b.available) == (0, 0)
            assert dict(ticket.guards) == guards
            await asyncio.sleep(work)
            inside -= 1

    tasks = [asyncio.create_task(one(i, rng.random() * 0.001)) for i in range(TASKS)]
    _done, pending = await asyncio.wait(tasks, timeout=PROMPT)
    for task in pending:
        task.cancel()
    await asyncio.wait(tasks, timeout=WAIT)
    # Whatever happened, the accounting is exact and no waiter is left behind.
    assert (a.available, b.available, a.waiters, b.waiters) == (1, 1, 0, 0)
    assert not pending, f"{len(pending)} of {TASKS} admissions did not complete in {PROMPT} s"
    for task in tasks:
        task.result()


@pytest.mark.asyncio
async def test_four_queued_admissions_in_opposite_orders_complete_once_both_budgets_free():
    """The minimal case of a livelock that watching (rather than queueing) prevents.

    When admissions queued in the budgets' lines, each woken admission held one budget, was
    denied the other (whose line held an admission of the opposite order), gave its grant to the
    next in that line and queued again, for ever.
    """
    a, b = AtomicBudget(1), AtomicBudget(1)
    assert a.try_reserve_sync(1)
    assert b.try_reserve_sync(1)

    async def one(guards) -> None:
        async with admit(guards=guards):
            pass

    orders = [{a: 1, b: 1}, {b: 1, a: 1}, {a: 1, b: 1}, {b: 1, a: 1}]
    tasks = [asyncio.create_task(one(guards)) for guards in orders]
    await until(lambda: (a._watchers, b._watchers) == (4, 4), "all four admissions wait")
    assert (a.waiters, b.waiters) == (0, 0)
    a.release_sync(1)
    b.release_sync(1)
    _done, pending = await asyncio.wait(tasks, timeout=3.0)
    for task in pending:
        task.cancel()
    await asyncio.wait(tasks, timeout=WAIT)
    assert (a.available, b.available, a.waiters, b.waiters) == (1, 1, 0, 0)
    assert not pending, f"{len(pending)} of 4 admissions did not complete in 3 s"


# --- Threads ---------------------------------------------------------------------------------

THREADS = 6
ROUNDS = 40


def test_admit_blocking_from_threads_keeps_exact_accounting():
    a, b = AtomicBudget(2), AtomicBudget(3)
    ug = UserGuard(2)
    tb, utb = AtomicTokenBudget(10_000), UserTokenBudget(10_000)
    lock = threading.Lock()
    holders = [0, 0]  # now, peak
    start = threading.Barrier(THREADS)

    def worker(index: int) -> tuple[int, int]:
        rng = random.Random(index)
        # Opposite orders, and the user-written guard (backoff) first or last.
        guards = {a: 1, b: 1, ug: 1} if index % 2 else {ug: 1, b: 1, a: 1}
        recorded = [0, 0]
        start.wait(WAIT)
        for _ in range(ROUNDS):
            with admit_blocking(guards=guards, tokens={tb: 3_000, utb: 3_000}, timeout=WAIT) as t:
                with lock:
                    holders[0] += 1
                    holders[1] = max(holders)
                    assert holders[0] <= 2
                    assert ug.available >= 0
                if rng.random() < 0.5:
                    used = rng.randrange(6)
                    tb.record_usage_sync(t.reservations[tb], used, 1)
                    recorded[0] += used + 1
                if rng.random() < 0.5:
                    used = rng.randrange(6)
                    asyncio.run(utb.record_usage(t.reservations[utb], used, 1))
                    recorded[1] += used + 1
                time.sleep(rng.random() * 0.0005)
                with lock:
                    holders[0] -= 1
        return recorded[0], recorded[1]

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [pool.submit(worker, i) for i in range(THREADS)]
        results = [f.result(timeout=WAIT) for f in futures]
    native_used = sum(r[0] for r in results)
    user_used = sum(r[1] for r in results)
    assert holders == [0, 2]
    assert (a.available, b.available, ug.available) == (2, 3, 2)
    assert (a.waiters, b.waiters, tb.waiters) == (0, 0, 0)
    assert ug.grants == ug.releases
    assert (tb.available, tb.debt, tb.consumed) == (10_000 - native_used, 0, native_used)
    assert (utb.balance, utb.consumed, utb.outstanding) == (10_000 - user_used, user_used, 0)


@pytest.mark.asyncio
async def test_admit_blocking_on_a_loop_thread_raises_runtime_error_at_once():
    a = AtomicBudget(1)
    assert a.try_reserve_sync(1)  # it would have to wait: it must not block this loop
    ug = UserGuard(1)
    with pytest.raises(RuntimeError):
        admit_blocking(guards={ug: 1, a: 1}, timeout=WAIT)
    assert (a.available, a.waiters, ug.available) == (0, 0, 1)
    with pytest.raises(RuntimeError):
        admit_blocking(guards={ug: 1}, timeout=0)  # even when everything fits
    assert ug.available == 1


# --- Above a native capacity -----------------------------------------------------------------


def _above(what: str):
    a, ug, tb, utb, outside = mix()
    guards = {ug: 1, a: 11 if what == "guard" else 1}
    tokens = {utb: 5, tb: 1001 if what == "tokens" else 5}
    return (a, ug, tb, utb), guards, tokens, outside


def _plain_state(budgets) -> tuple[int, ...]:
    a, ug, tb, utb = budgets
    return (a.available, a.waiters, ug.available, tb.available, tb.waiters, utb.balance)


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["guard", "tokens"])
async def test_admit_above_a_native_capacity_is_a_value_error_at_once(what):
    budgets, guards, tokens, _outside = _above(what)
    before = _plain_state(budgets)
    with pytest.raises(ValueError, match="capacity"):
        await asyncio.wait_for(admit(guards=guards, tokens=tokens), WAIT)
    assert _plain_state(budgets) == before


@pytest.mark.parametrize("what", ["guard", "tokens"])
def test_admit_blocking_above_a_native_capacity_is_a_value_error_at_once(what):
    budgets, guards, tokens, _outside = _above(what)
    before = _plain_state(budgets)
    with pytest.raises(ValueError, match="capacity"):
        admit_blocking(guards=guards, tokens=tokens, timeout=WAIT)
    assert _plain_state(budgets) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["guard", "tokens"])
async def test_try_admit_above_a_native_capacity_is_denied(what):
    budgets, guards, tokens, _outside = _above(what)
    before = _plain_state(budgets)
    assert await try_admit(guards=guards, tokens=tokens) is None
    assert _plain_state(budgets) == before


# --- Bad input (section 2) -------------------------------------------------------------------


class Budgets:
    def __init__(self) -> None:
        self.a, self.ug, self.tb, self.utb, self.outside = mix()

    def state(self) -> tuple[int, ...]:
        return (*_plain_state((self.a, self.ug, self.tb, self.utb)), self.utb.outstanding)


BAD_INPUT = [
    ("guards not a mapping", lambda p: {"guards": [(p.a, 1)], "tokens": {p.utb: 5}}, TypeError),
    (
        "tokens not a mapping",
        lambda p: {"guards": {p.ug: 1, p.a: 1}, "tokens": [(p.tb, 5)]},
        TypeError,
    ),
    ("guards a set", lambda p: {"guards": {p.a, p.ug}}, TypeError),
    ("guard key a str", lambda p: {"guards": {p.ug: 1, "rows": 1}}, TypeError),
    ("guard key an object", lambda p: {"guards": {p.ug: 1, object(): 1}}, TypeError),
    ("guard key a token budget", lambda p: {"guards": {p.ug: 1, p.tb: 1}}, TypeError),
    ("token key a guard", lambda p: {"guards": {p.ug: 1}, "tokens": {p.a: 1}}, TypeError),
    ("token key a user guard", lambda p: {"guards": {p.a: 1}, "tokens": {p.ug: 1}}, TypeError),
    ("amount bool", lambda p: {"guards": {p.ug: 1, p.a: True}}, TypeError),
    ("amount float", lambda p: {"guards": {p.ug: 1, p.a: 1.0}}, TypeError),
    ("amount str", lambda p: {"guards": {p.a: 1}, "tokens": {p.utb: 5, p.tb: "5"}}, TypeError),
    ("amount None", lambda p: {"guards": {p.a: 1, p.ug: None}}, TypeError),
    ("user amount float", lambda p: {"guards": {p.a: 1}, "tokens": {p.utb: 2.5}}, TypeError),
    ("guard amount negative", lambda p: {"guards": {p.ug: 1, p.a: -1}}, ValueError),
    ("user amount negative", lambda p: {"guards": {p.a: 1, p.ug: -1}}, ValueError),
    ("token amount negative", lambda p: {"guards": {p.a: 1}, "tokens": {p.tb: -1}}, ValueError),
]


def _run_to_the_end(api: str, kwargs: dict) -> None:
    if api == "admit_blocking":
        admit_blocking(**kwargs, timeout=0).close_sync()
        return

    async def main():
        if api == "admit":
            ticket = await admit(**kwargs, timeout=0)
        else:
            ticket = await try_admit(**kwargs)
        await ticket.close()

    asyncio.run(main())


@pytest.mark.parametrize("api", ["admit", "try_admit", "admit_blocking"])
@pytest.mark.parametrize(
    ("make", "error"), [pytest.param(make, error, id=name) for name, make, error in BAD_INPUT]
)
def test_bad_input_raises_and_changes_nothing(api, make, error):
    budgets = Budgets()
    before = budgets.state()
    with pytest.raises(error):
        _run_to_the_end(api, make(budgets))
    assert budgets.state() == before


class LookCountingBudget(AtomicBudget):
    """A native budget that counts an admission's looks at it (``_fits``, costbound._admit)."""

    def __init__(self, capacity: int, *, rate: float) -> None:
        self.looks = 0

    def _fits(self, amount: int) -> bool:
        self.looks += 1
        return super()._fits(amount)


@pytest.mark.asyncio
async def test_an_admission_behind_a_queued_waiter_on_a_rated_budget_sleeps_until_it_leaves():
    """Units are available but a ``reserve`` waiter is queued for more: the admission must not
    spin on the rate timer (which says "now"), but sleep until the waiter leaves the queue."""
    rated = LookCountingBudget(100, rate=100.0)
    assert rated.try_reserve_sync(100)
    head = asyncio.ensure_future(rated.reserve(50))  # served by its own timer, in about 0.5 s
    await until(lambda: rated.waiters == 1, "the reserve waiter is queued")
    ticket = await asyncio.wait_for(admit(guards={rated: 1}, timeout=WAIT), WAIT)
    permit = await asyncio.wait_for(head, WAIT)
    assert permit.granted
    # A look, a watch and a look again, then asleep until the served waiter leaves the queue
    # (and perhaps one more for a wake-up in between). A spinning admission looks thousands
    # of times in half a second.
    assert rated.looks <= 6, rated.looks
    assert (rated.waiters, rated._watchers) == (0, 0)
    await ticket.close()
    assert rated.available >= 1  # the admission's unit back (the head still holds 50)
