"""Refund on drop (spec section 3): an armed reservation dropped or collected refunds once."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from costbound import AtomicTokenBudget, TokenReservation
from unraisable_support import capture_unraisable, recorder


class AttributedTokenBudget(AtomicTokenBudget):
    """A user subclass with a ``__dict__``, so that it can sit in a reference cycle."""


class Holder:
    """An ordinary object with attributes, to build cycles with."""


@pytest.fixture
def no_auto_gc() -> Iterator[None]:
    """Disable automatic collection, so that only an explicit ``gc.collect()`` breaks cycles."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- Native reservations dropped by reference count ----------------------------------------


def test_dropping_armed_native_reservation_refunds_its_estimate_once():
    tb = AtomicTokenBudget(1_000)
    keep = tb.try_reserve_tokens_sync(300)
    r = tb.try_reserve_tokens_sync(200)
    assert tb.available == 500
    with capture_unraisable() as reports:
        del r
    assert tb.available == 700
    assert (tb.debt, tb.consumed) == (0, 0)
    # Only once: the 200 is now genuinely available, and nothing more appears later.
    again = tb.try_reserve_tokens_sync(700)
    assert again is not None
    assert tb.available == 0
    assert tb.try_reserve_tokens_sync(1) is None
    del again, keep
    assert tb.available == 1_000
    assert reports == []


@pytest.mark.asyncio
async def test_dropping_awaited_reservation_refunds():
    tb = AtomicTokenBudget(100)
    r = await tb.try_reserve_tokens(60)
    assert tb.available == 40
    del r
    assert tb.available == 100
    assert await tb.tokens_consumed() == 0


def test_dropping_recorded_reservation_refunds_nothing():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(400)
    tb.record_usage_sync(r, 100, 50)
    assert tb.available == 850
    del r
    assert tb.available == 850
    assert tb.consumed == 150


def test_dropping_reservation_recorded_into_debt_refunds_nothing():
    tb = AtomicTokenBudget(100)
    r = tb.try_reserve_tokens_sync(50)
    tb.record_usage_sync(r, 200, 0)
    assert (tb.available, tb.debt) == (0, 100)
    del r
    assert (tb.available, tb.debt) == (0, 100)


def test_dropping_disarmed_reservation_refunds_nothing():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(400)
    refund = r.disarm()
    assert refund is not None
    assert not r.armed
    assert r.disarm() is None
    del r
    assert tb.available == 600
    # The refund now belongs to the caller.
    refund(400)
    assert tb.available == 1_000


# --- Reference cycles -----------------------------------------------------------------------


@pytest.mark.usefixtures("no_auto_gc")
def test_reservation_in_a_list_cycle_is_refunded_by_collection_not_before():
    tb = AtomicTokenBudget(1_000)
    cycle: list[Any] = [tb.try_reserve_tokens_sync(250)]
    cycle.append(cycle)
    assert tb.available == 750
    del cycle
    assert tb.available == 750
    gc.collect()
    assert tb.available == 1_000
    gc.collect()
    assert tb.available == 1_000


@pytest.mark.usefixtures("no_auto_gc")
def test_reservation_in_an_attribute_cycle_is_refunded_by_collection_not_before():
    tb = AtomicTokenBudget(1_000)
    node = Holder()
    node.me = node
    node.reservation = tb.try_reserve_tokens_sync(400)
    alive = weakref.ref(node)
    del node
    assert alive() is not None
    assert tb.available == 600
    gc.collect()
    assert alive() is None
    assert tb.available == 1_000


@pytest.mark.usefixtures("no_auto_gc")
def test_disarmed_or_recorded_reservation_in_a_cycle_refunds_nothing():
    tb = AtomicTokenBudget(1_000)
    recorded = tb.try_reserve_tokens_sync(100)
    tb.record_usage_sync(recorded, 10, 10)
    disarmed = tb.try_reserve_tokens_sync(300)
    handle = disarmed.disarm()
    assert handle is not None
    cycle: list[Any] = [recorded, disarmed]
    cycle.append(cycle)
    del cycle, recorded, disarmed
    gc.collect()
    assert tb.available == 680
    handle(300)
    assert tb.available == 980


def closure_cycle(estimate: int, calls: list[int]) -> Callable[[int], None]:
    """A reservation whose Python refund closes over a list holding that reservation.

    Returns the refund (weakly referenceable) after every local name is gone, so that the
    only references left are those of the cycle.
    """
    box: list[TokenReservation] = []

    def refund(amount: int) -> None:
        assert len(box) == 1  # the closure reaches its own reservation
        calls.append(amount)

    box.append(TokenReservation(estimate, refund))
    return refund


@pytest.mark.usefixtures("no_auto_gc")
def test_python_refund_closure_referencing_its_own_reservation():
    calls: list[int] = []
    alive = weakref.ref(closure_cycle(7, calls))
    assert alive() is not None
    assert calls == []
    gc.collect()
    assert calls == [7]
    assert alive() is None
    gc.collect()
    assert calls == [7]


def wrapping_cycle(tb: AtomicTokenBudget, estimate: int) -> None:
    """A custom reservation wrapping a native one's refund, the wrapper reaching itself."""
    inner = tb.try_reserve_tokens_sync(estimate)
    native = inner.disarm()
    assert native is not None
    holder: list[TokenReservation] = []

    def refund(amount: int) -> None:
        assert holder
        native(amount)

    holder.append(TokenReservation(estimate, refund))


@pytest.mark.usefixtures("no_auto_gc")
def test_python_refund_delegating_to_native_refund_in_a_cycle():
    tb = AtomicTokenBudget(1_000)
    wrapping_cycle(tb, 120)
    assert tb.available == 880
    gc.collect()
    assert tb.available == 1_000


# --- Python refunds -------------------------------------------------------------------------


def test_python_refund_called_once_with_estimate_on_drop():
    calls, refund = recorder()
    r = TokenReservation(42, refund)
    assert r.armed
    del r
    assert calls == [42]


@pytest.mark.usefixtures("no_auto_gc")
def test_python_refund_called_once_with_estimate_on_collection():
    calls, refund = recorder()
    cycle: list[Any] = [TokenReservation(42, refund)]
    cycle.append(cycle)
    del cycle
    assert calls == []
    gc.collect()
    assert calls == [42]


def test_python_refund_never_called_after_disarm():
    calls, refund = recorder()
    r = TokenReservation(42, refund)
    taken = r.disarm()
    assert taken is refund
    assert not r.armed
    assert r.disarm() is None
    del r
    gc.collect()
    assert calls == []


def test_refund_that_raises_is_reported_as_unraisable():
    calls: list[int] = []

    def refund(amount: int) -> None:
        calls.append(amount)
        raise RuntimeError("refund failed")

    r = TokenReservation(9, refund)
    with capture_unraisable() as reports:
        del r  # must not propagate
        reached = True
    assert reached
    assert calls == [9]
    assert len(reports) == 1
    assert reports[0][0] is RuntimeError
    assert "refund failed" in reports[0][1]


@pytest.mark.usefixtures("no_auto_gc")
def test_refund_that_raises_during_collection_is_reported_as_unraisable():
    calls: list[int] = []

    def refund(amount: int) -> None:
        calls.append(amount)
        raise KeyError("collected")

    cycle: list[Any] = [TokenReservation(3, refund)]
    cycle.append(cycle)
    del cycle
    with capture_unraisable() as reports:
        gc.collect()  # must not propagate
    assert calls == [3]
    assert [kind for kind, _ in reports] == [KeyError]


# --- Reservations that outlive their budget -------------------------------------------------


def test_reservation_does_not_keep_its_budget_alive():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(100)
    disarmed = tb.try_reserve_tokens_sync(50)
    handle = disarmed.disarm()
    budget_ref = weakref.ref(tb)
    del tb
    gc.collect()
    assert budget_ref() is None
    with capture_unraisable() as reports:
        handle(50)  # refunds into a budget that is gone: nothing happens
        del r, disarmed, handle
        gc.collect()
    assert reports == []


def test_reservations_do_not_add_references_to_a_plain_budget():
    tb = AtomicTokenBudget(1_000)
    before = sys.getrefcount(tb)
    reservations = [tb.try_reserve_tokens_sync(10) for _ in range(10)]
    handles = [r.disarm() for r in reservations[:5]]
    assert sys.getrefcount(tb) == before
    assert all(tb not in gc.get_referents(r) for r in reservations)
    assert all(tb not in gc.get_referents(h) for h in handles)
    del reservations
    assert tb.available == 950


def test_dropping_reservation_after_budget_is_gone_does_not_crash():
    tb = AtomicTokenBudget(100)
    r = tb.try_reserve_tokens_sync(40)
    del tb
    gc.collect()
    assert r.estimate == 40
    with capture_unraisable() as reports:
        del r
        gc.collect()
    assert reports == []


def test_orphaned_reservation_is_foreign_to_a_new_budget():
    tb = AtomicTokenBudget(100)
    r = tb.try_reserve_tokens_sync(40)
    del tb
    gc.collect()
    other = AtomicTokenBudget(100)
    with pytest.raises(ValueError):  # noqa: PT011 (no message is promised)
        other.record_usage_sync(r, 1, 1)
    assert (other.available, other.debt, other.consumed) == (100, 0, 0)


@pytest.mark.usefixtures("no_auto_gc")
def test_budget_and_reservation_in_one_cycle_are_collected_together():
    tb = AttributedTokenBudget(1_000)
    node = Holder()
    node.me = node
    node.budget = tb
    node.reservation = tb.try_reserve_tokens_sync(100)
    tb.node = node  # the budget is in the cycle too
    budget_ref = weakref.ref(tb)
    del tb, node
    assert budget_ref() is not None
    assert budget_ref().available == 900
    with capture_unraisable() as reports:
        gc.collect()
    assert budget_ref() is None
    assert reports == []


# --- The native refund that disarm() hands out ----------------------------------------------


def test_native_refund_is_single_use():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(100)
    refund = r.disarm()
    assert callable(refund)
    assert tb.available == 900
    refund(100)
    assert tb.available == 1_000
    other = tb.try_reserve_tokens_sync(500)
    assert tb.available == 500
    refund(100)
    refund(1)
    assert tb.available == 500
    del other


def test_native_refund_gives_back_the_whole_hold_whatever_the_amount():
    # Spec 11a: a part given back would lose the rest for good, since the handle is single-use.
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(100)
    refund = r.disarm()
    refund(30)
    assert tb.available == 1_000
    refund(70)
    assert tb.available == 1_000


def test_native_refund_with_a_bad_amount_raises_and_gives_nothing_back_yet():
    tb = AtomicTokenBudget(1_000)
    r = tb.try_reserve_tokens_sync(100)
    refund = r.disarm()
    for bad, error in [(2**64, ValueError), (-1, ValueError)]:
        with pytest.raises(error):
            refund(bad)
        assert tb.available == 900
    with pytest.raises(TypeError):
        refund(100.0)
    with pytest.raises(TypeError):
        refund(True)
    assert tb.available == 900
    # The failed calls did not spend it; an amount above the estimate gives back the estimate.
    refund(101)
    assert tb.available == 1_000


def test_native_refund_pays_debt_first():
    tb = AtomicTokenBudget(100)
    r = tb.try_reserve_tokens_sync(60)
    over = tb.try_reserve_tokens_sync(0)
    tb.record_usage_sync(over, 90, 0)
    assert (tb.available, tb.debt) == (0, 50)
    refund = r.disarm()
    refund(60)
    assert (tb.available, tb.debt) == (10, 0)


# --- Racing threads -------------------------------------------------------------------------


@contextlib.contextmanager
def fast_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run_rounds(rounds: int, threads: int, setup, act, check) -> None:
    """Run ``act(round_state, index)`` on ``threads`` threads at once, ``rounds`` times."""
    barrier = threading.Barrier(threads + 1, timeout=60)
    state: dict[str, Any] = {}
    results: list[list[Any]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                try:
                    results[index].append(act(state["round"], index))
                except BaseException as exc:  # re-raised by the main thread
                    failures.append(exc)
                    results[index].append(None)
                barrier.wait()
        except threading.BrokenBarrierError:
            return  # the main thread gave up after a failed check

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    completed = False
    with fast_switching():
        for w in workers:
            w.start()
        try:
            for n in range(rounds):
                state["round"] = setup()
                barrier.wait()
                barrier.wait()
                if failures:
                    raise failures[0]
                check(state.pop("round"), [results[i][n] for i in range(threads)])
            completed = True
        finally:
            if not completed:
                barrier.abort()
            for w in workers:
                w.join()


ACTIONS = ["record", "disarm", "drop", "record", "disarm", "drop", "record", "disarm"]


def test_racing_record_disarm_and_drop_exactly_one_wins():
    capacity, estimate, prompt, completion = 1_000, 100, 30, 40

    def setup() -> tuple[AtomicTokenBudget, TokenReservation]:
        tb = AtomicTokenBudget(capacity)
        return tb, tb.try_reserve_tokens_sync(estimate)

    def act(round_state, index: int) -> tuple[str, Any]:
        tb, r = round_state
        action = ACTIONS[index]
        if action == "record":
            try:
                tb.record_usage_sync(r, prompt, completion)
            except ValueError:
                return ("record", None)
            return ("record", "won")
        if action == "disarm":
            return ("disarm", r.disarm())
        r.__del__()  # what dropping the last reference runs
        return ("drop", None)

    wins = {"record": 0, "disarm": 0, "drop": 0}

    def check(round_state, outcomes) -> None:
        tb, r = round_state
        recorded = [o for kind, o in outcomes if kind == "record" and o == "won"]
        refunds = [o for kind, o in outcomes if kind == "disarm" and o is not None]
        assert len(recorded) + len(refunds) <= 1
        assert not r.armed
        if recorded:
            wins["record"] += 1
            assert (tb.available, tb.consumed) == (capacity - prompt - completion, 70)
        elif refunds:
            wins["disarm"] += 1
            assert (tb.available, tb.consumed) == (capacity - estimate, 0)
            refunds[0](estimate)
            assert tb.available == capacity
        else:
            wins["drop"] += 1
            assert (tb.available, tb.consumed) == (capacity, 0)
        expected = tb.available
        del round_state, outcomes, recorded, refunds
        del r  # the real drop afterwards refunds nothing more
        assert tb.available == expected
        assert tb.debt == 0

    run_rounds(300, len(ACTIONS), setup, act, check)
    assert sum(wins.values()) == 300


def test_racing_records_on_one_reservation_charge_once():
    capacity = 10_000

    def setup() -> tuple[AtomicTokenBudget, TokenReservation]:
        tb = AtomicTokenBudget(capacity)
        return tb, tb.try_reserve_tokens_sync(500)

    def act(round_state, index: int) -> bool:
        tb, r = round_state
        try:
            tb.record_usage_sync(r, 100 + index, 0)
        except ValueError:
            return False
        return True

    def check(round_state, outcomes) -> None:
        tb, r = round_state
        assert outcomes.count(True) == 1
        winner = outcomes.index(True)
        assert tb.consumed == 100 + winner
        assert tb.available == capacity - (100 + winner)
        assert not r.armed

    run_rounds(200, 8, setup, act, check)


def test_racing_disarm_and_drop_on_python_refund_exactly_one_wins():
    calls: list[int] = []

    def setup() -> TokenReservation:
        calls.clear()
        return TokenReservation(11, calls.append)

    def act(r: TokenReservation, index: int) -> Any:
        if index % 2:
            return r.disarm()
        r.__del__()
        return None

    def check(r: TokenReservation, outcomes) -> None:
        taken = [o for o in outcomes if o is not None]
        assert len(taken) + len(calls) == 1
        if calls:
            assert calls == [11]
        assert not r.armed

    run_rounds(300, 8, setup, act, check)


# --- Interpreter shutdown -------------------------------------------------------------------


SHUTDOWN_SCRIPT = textwrap.dedent(
    """
    import gc
    import threading

    import costbound
    from costbound import AtomicBudget, AtomicTokenBudget, TokenReservation

    gc.disable()  # leave the cycles for the interpreter's own final collection
    sink = []
    budget = AtomicTokenBudget(1_000)
    units = AtomicBudget(100)

    # Armed reservations in module globals, native and with Python refunds.
    GLOBAL_NATIVE = budget.try_reserve_tokens_sync(10)
    GLOBAL_PYTHON = TokenReservation(5, sink.append)
    costbound.kept_by_test = budget.try_reserve_tokens_sync(1)

    # Reservations that outlive their budget.
    doomed = AtomicTokenBudget(100)
    ORPHAN = doomed.try_reserve_tokens_sync(50)
    ORPHAN_HANDLE = doomed.try_reserve_tokens_sync(20).disarm()
    del doomed
    gc.collect()

    # Cycles: a list containing itself, an object referring to itself, a closure cycle.
    cycle = [budget.try_reserve_tokens_sync(20), TokenReservation(6, sink.append)]
    cycle.append(cycle)
    del cycle

    class Node:
        pass

    node = Node()
    node.me = node
    node.reservation = budget.try_reserve_tokens_sync(30)
    node.budget = budget
    del node

    box = []
    def closure_refund(amount, box=box):
        box.append(amount)
    box.append(TokenReservation(7, closure_refund))
    del box, closure_refund

    # A Python refund that calls into native budgets.
    def release_units(amount, units=units):
        units.release_sync(amount)
    assert units.try_reserve_sync(8)
    UNITS_RESERVATION = TokenReservation(8, release_units)
    handle = budget.try_reserve_tokens_sync(40).disarm()
    WRAPPED = TokenReservation(40, handle)
    del handle

    # A budget subclass in a cycle with its own reservations.
    class MyBudget(AtomicTokenBudget):
        pass

    mine = MyBudget(100)
    mine.keep = [mine.try_reserve_tokens_sync(5), mine, TokenReservation(1, sink.append)]
    del mine

    # A daemon thread still holding an armed reservation when the interpreter exits.
    started = threading.Event()
    never = threading.Event()

    def hold():
        r = budget.try_reserve_tokens_sync(2)
        started.set()
        never.wait()
        del r

    threading.Thread(target=hold, daemon=True).start()
    started.wait()

    assert budget.available == 1_000 - 10 - 1 - 20 - 30 - 40 - 2
    print("ready")
    """
)


@pytest.mark.parametrize("flags", [[], ["-X", "dev"]], ids=["plain", "dev-mode"])
def test_interpreter_shutdown_with_armed_reservations(flags, tmp_path):
    completed = subprocess.run(
        [sys.executable, *flags, "-c", SHUTDOWN_SCRIPT],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert completed.stderr == ""
    assert completed.returncode == 0
    assert completed.stdout == "ready\n"
