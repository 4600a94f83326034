"""Reservations under faults: no lock held across Python, native refund handles that never lose a
hold, the base ``Reservation`` refunding on drop, and integer arguments read as Python reads them.

Anything that could hang or abort runs in a child process with a timeout.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, TokenReservation, _native
from unraisable_support import capture_unraisable, recorder


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; a hang becomes a failed test, not a stuck suite."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the child process hung (killed after {timeout} s): {expired.stdout!r}")


# --- Point 1: no lock is held while a settlement wakes waiters through Python ----------------

# A settlement wakes an `admit_blocking` watcher, whose wake-up is Python code (an Event.set)
# that may hand the GIL to another thread. That thread touches the same reservation (records it,
# reads `armed`, disarms it, drops it): if the first thread held a lock on the reservation while
# waking, the second would block on it holding the GIL, and the process would hang.
RACING_RECORDS = """
    import sys, threading
    import costbound
    from costbound import AtomicTokenBudget, TokenReservation

    sys.setswitchinterval(1e-6)
    wins = {"record": 0, "disarm": 0, "drop": 0}
    for _ in range(ROUNDS):
        tb = AtomicTokenBudget(1_000)
        r = tb.try_reserve_tokens_sync(1_000)
        wrapped = TokenReservation(400, r.disarm())
        admitted = []
        waiting = threading.Thread(
            target=lambda: admitted.append(costbound.admit_blocking(tokens={tb: 500}, timeout=60))
        )
        waiting.start()
        while tb._watchers == 0:
            pass
        start = threading.Barrier(5)
        outcomes = []

        def record():
            start.wait()
            try:
                tb.record_usage_sync(wrapped, 10, 10)
            except ValueError as exc:
                assert "already reconciled" in str(exc), exc
                outcomes.append(None)
            else:
                outcomes.append("record")

        def disarm():
            start.wait()
            handle = wrapped.disarm()
            outcomes.append(None if handle is None else ("disarm", handle))

        def drop():
            start.wait()
            armed = wrapped.armed
            wrapped.__del__()  # what dropping the last reference runs
            outcomes.append(("drop", armed))

        def look():
            start.wait()
            for _ in range(200):
                wrapped.armed

        threads = [threading.Thread(target=f) for f in (record, record, disarm, drop, look)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if "record" in outcomes:
            wins["record"] += 1
        for o in outcomes:
            if isinstance(o, tuple) and o[0] == "disarm":
                wins["disarm"] += 1
                o[1](0)  # the taken handle gives its whole hold back
        winners = [
            o for o in outcomes if o == "record" or (isinstance(o, tuple) and o[0] == "disarm")
        ]
        assert len(winners) <= 1, outcomes
        if not winners:
            wins["drop"] += 1
        assert not wrapped.armed
        # Whoever won, the admission of 500 was woken and granted; nothing is lost or doubled.
        waiting.join()
        (ticket,) = admitted
        ticket.close_sync()
        if winners == ["record"]:
            assert (tb.available, tb.consumed) == (980, 20), (tb.available, tb.consumed)
        else:
            assert (tb.available, tb.consumed) == (1_000, 0), (tb.available, tb.consumed)
    print(sum(wins.values()), "rounds; every round had at most one winner")
"""


def test_racing_settlements_of_a_wrapped_native_refund_never_hang_with_a_waiter():
    rounds = 600
    completed = run_child(RACING_RECORDS.replace("ROUNDS", str(rounds)), timeout=120)
    assert completed.stderr == ""
    assert completed.returncode == 0
    assert completed.stdout == f"{rounds} rounds; every round had at most one winner\n"


def test_wrapped_native_refund_is_armed_until_its_hold_is_spent():
    tb = AtomicTokenBudget(1_000)
    handle = tb.try_reserve_tokens_sync(400).disarm()
    wrapped = TokenReservation(400, handle)
    assert wrapped.armed
    assert handle.armed
    handle(400)  # the handle and the reservation share one claim
    assert not wrapped.armed
    with pytest.raises(ValueError, match="already reconciled"):
        tb.record_usage_sync(wrapped, 1, 1)
    assert (tb.available, tb.consumed) == (1_000, 0)


def test_wrapped_native_refund_disarmed_hands_over_the_hold_once():
    tb = AtomicTokenBudget(1_000)
    wrapped = TokenReservation(400, tb.try_reserve_tokens_sync(400).disarm())
    taken = wrapped.disarm()
    assert taken is not None
    assert wrapped.disarm() is None
    assert not wrapped.armed
    del wrapped
    assert tb.available == 600, "a disarmed reservation refunds nothing when dropped"
    taken(400)
    assert tb.available == 1_000


# --- Point 3: a native refund handle gives back its whole hold, once -------------------------


def test_dropping_a_reservation_larger_than_its_native_handle_refunds_the_whole_hold():
    tb = AtomicTokenBudget(1_000)
    handle = tb.try_reserve_tokens_sync(400).disarm()
    assert tb.available == 600
    wrapped = TokenReservation(500, handle)
    del handle
    with capture_unraisable() as reports:
        del wrapped
    assert reports == []
    assert (tb.available, tb.consumed) == (1_000, 0)


def test_dropping_a_reservation_larger_than_its_native_handle_in_a_cycle_refunds_it():
    tb = AtomicTokenBudget(1_000)
    box: list[Any] = [TokenReservation(500, tb.try_reserve_tokens_sync(400).disarm())]
    box.append(box)
    del box
    with capture_unraisable() as reports:
        gc.collect()
    assert reports == []
    assert tb.available == 1_000


@pytest.mark.parametrize("amount", [0, 100, 400, 401, 2**64 - 1, np.uint64(7)])
def test_native_handle_gives_back_its_whole_hold_whatever_the_amount(amount):
    tb = AtomicTokenBudget(1_000)
    handle = tb.try_reserve_tokens_sync(400).disarm()
    handle(amount)
    assert (tb.available, handle.armed) == (1_000, False)
    handle(400)  # spent: later calls give nothing
    assert tb.available == 1_000
    assert tb.try_reserve_tokens_sync(1_000) is not None


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), ("x", TypeError), (True, TypeError)],
)
def test_native_handle_called_with_a_bad_amount_raises_and_keeps_its_hold(bad, error):
    tb = AtomicTokenBudget(1_000)
    handle = tb.try_reserve_tokens_sync(400).disarm()
    with pytest.raises(error, match="amount"):
        handle(bad)
    assert (tb.available, handle.armed) == (600, True)
    handle(400)
    assert tb.available == 1_000


def test_wrapped_native_refund_with_a_bad_amount_is_still_refunded_on_drop():
    tb = AtomicTokenBudget(1_000)
    handle = tb.try_reserve_tokens_sync(400).disarm()
    wrapped = TokenReservation(400, handle)
    with pytest.raises(ValueError, match="amount"):
        handle(-1)
    del handle
    assert wrapped.armed
    del wrapped
    assert tb.available == 1_000


def test_recording_a_reservation_larger_than_its_native_handle_settles_the_hold():
    tb = AtomicTokenBudget(1_000)
    wrapped = TokenReservation(500, tb.try_reserve_tokens_sync(400).disarm())
    tb.record_usage_sync(wrapped, 100, 50)
    assert (tb.available, tb.consumed, wrapped.armed) == (850, 150, False)
    del wrapped
    assert tb.available == 850


# --- Point 7b: the base `_native.Reservation` refunds on drop ---------------------------------


def test_base_reservation_dropped_calls_its_python_refund_once():
    calls, refund = recorder()
    r = _native.Reservation(9, refund)
    assert r.armed
    del r
    assert calls == [9]


def test_base_reservation_in_a_cycle_calls_its_python_refund_once_when_collected():
    calls, refund = recorder()
    box: list[Any] = []

    def cyclic_refund(amount: int, box: list[Any] = box) -> None:
        refund(amount)

    box.append(_native.Reservation(4, cyclic_refund))
    del box, cyclic_refund
    gc.collect()
    assert calls == [4]


class PlainSubclass(_native.Reservation):
    """A Python subclass without ``__del__``: it inherits the base's finaliser."""


def test_subclass_without_del_in_a_cycle_calls_its_python_refund_once():
    calls, refund = recorder()
    box: list[Any] = []

    def cyclic_refund(amount: int, box: list[Any] = box) -> None:
        refund(amount)

    box.append(PlainSubclass(6, cyclic_refund))
    del box, cyclic_refund
    gc.collect()
    assert calls == [6]
    PlainSubclass(2, refund)  # dropped at once, by its reference count
    assert calls == [6, 2]


def test_base_reservation_disarmed_or_native_refunds_nothing_more():
    calls, refund = recorder()
    r = _native.Reservation(9, refund)
    assert r.disarm() is refund
    del r
    assert calls == []
    tb = AtomicTokenBudget(100)
    r = _native.Reservation(30, tb.try_reserve_tokens_sync(30).disarm())
    assert tb.available == 70
    del r
    assert tb.available == 100


def test_base_reservation_refund_that_raises_is_reported_as_unraisable():
    def refund(amount: int) -> None:
        raise RuntimeError(f"refund of {amount} failed")

    r = _native.Reservation(3, refund)
    with capture_unraisable() as reports:
        del r
    assert reports == [(RuntimeError, "refund of 3 failed")]


BASE_RESERVATIONS_AT_EXIT = """
    import gc
    from costbound import AtomicTokenBudget, _native

    def loud(amount):
        print("refund", amount, flush=True)

    def broken(amount):
        raise RuntimeError("refund failed at exit")

    budget = AtomicTokenBudget(100)
    KEPT = _native.Reservation(5, loud)
    BROKEN = _native.Reservation(6, broken)
    NATIVE = _native.Reservation(7, budget.try_reserve_tokens_sync(7).disarm())
    gc.disable()  # leave the cycle for the interpreter's own final collection
    box = []
    box.append(_native.Reservation(8, lambda amount, box=box, loud=loud: loud(amount)))
    del box
    print("ready", flush=True)
"""


@pytest.mark.parametrize("flags", [[], ["-X", "dev"]], ids=["plain", "dev-mode"])
def test_base_reservations_with_python_refunds_at_interpreter_exit_do_not_crash(flags):
    completed = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(BASE_RESERVATIONS_AT_EXIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    # Each Python refund runs once: the globals' as the module is cleared, the cycle's in the
    # final collection (its finaliser runs before the collector clears the lambda it calls).
    assert lines[0] == "ready"
    assert sorted(lines[1:]) == ["refund 5", "refund 8"]
    assert "RuntimeError: refund failed at exit" in completed.stderr
    assert "Fatal Python error" not in completed.stderr
    assert "panicked" not in completed.stderr


# --- Point 7c: `__index__` is looked up on the type, as Python does --------------------------


class IndexOnInstance:
    """Not an integer: an ``__index__`` set on the instance is not Python's ``__index__``."""

    def __init__(self) -> None:
        self.__index__ = lambda: 5


class IndexOnClass:
    """An integer type: ``__index__`` on the class."""

    def __index__(self) -> int:
        return 5


class IndexOnInstanceOverClass(IndexOnClass):
    """The instance attribute is ignored and the class's ``__index__`` used."""

    def __init__(self) -> None:
        self.__index__ = lambda: 999


class IndexReturnsFloat:
    def __index__(self) -> float:
        return 5.0  # noqa: PLE0305 (the misbehaviour under test)


class IndexRaises:
    def __index__(self) -> int:
        raise KeyError("from __index__")


def call_a_native_refund(amount: Any) -> None:
    AtomicTokenBudget(10).try_reserve_tokens_sync(1).disarm()(amount)


INTEGER_ARGUMENTS: list[tuple[str, Callable[[Any], object]]] = [
    ("capacity", AtomicBudget),
    ("cost", lambda v: AtomicBudget(10).try_reserve_sync(v)),
    ("estimate", lambda v: AtomicTokenBudget(10).try_reserve_tokens_sync(v)),
    ("estimate", lambda v: TokenReservation(v, lambda amount: None)),
    ("amount", call_a_native_refund),
]


@pytest.mark.parametrize(("name", "call"), INTEGER_ARGUMENTS)
def test_index_set_on_the_instance_is_not_an_integer(name, call):
    with pytest.raises(TypeError, match=name):
        call(IndexOnInstance())


@pytest.mark.parametrize(("name", "call"), INTEGER_ARGUMENTS)
def test_index_on_the_class_is_an_integer(name, call):
    call(IndexOnClass())
    call(np.int64(5))


def test_index_on_the_class_wins_over_an_instance_attribute():
    assert AtomicBudget(IndexOnInstanceOverClass()).capacity == 5
    assert AtomicBudget(np.uint8(5)).capacity == 5


def test_index_returning_a_non_integer_is_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="capacity"):
        AtomicBudget(IndexReturnsFloat())


def test_index_that_raises_propagates_its_own_error():
    with pytest.raises(KeyError, match="from __index__"):
        AtomicBudget(IndexRaises())
