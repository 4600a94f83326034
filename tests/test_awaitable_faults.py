"""Faults at the edges of the native awaitables (issue 12, points 2, 4, 5, 6, 7 and 11).

* Interpreter shutdown with waiters queued: a wake-up that can no longer reach Python is skipped,
  and no panic crosses a C entry point (it would abort the process with exit code 134).
* Subinterpreters are refused at import with a clear ``ImportError``.
* A ``Permit`` (and a ``TokenRequest``, an ``Admission``, a ``Ticket``) is single-use.
* Every awaitable the library returns is a coroutine for asyncio (``create_task`` and kin).
* The private hand-over between the native waits and ``costbound._waiting`` refuses a waiter
  that is not the caller's own.
* ``admit`` refuses at once a part above a known capacity, and ``timeout=inf`` means no timeout.

Whatever could abort or hang runs in a child process, whose exit code and output are asserted.
"""

from __future__ import annotations

import asyncio
import gc
import math
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import costbound
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, Permit, Ticket, TokenReservation


def _run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- point 2: no abort at exit -------------------------------------------------------------


_WAITER_AT_EXIT = """
    import asyncio
    import costbound

    units = costbound.AtomicBudget(1)
    tokens = costbound.AtomicTokenBudget(10)
    assert units.try_reserve_sync(1)
    held = tokens.try_reserve_tokens_sync(10)
    loop = asyncio.new_event_loop()  # never closed: its tasks are still queued at exit


    async def wait_for_unit():
        await units.reserve(1)


    async def wait_for_tokens():
        await tokens.reserve_tokens(5)


    tasks = [loop.create_task(wait_for_unit()), loop.create_task(wait_for_tokens())]
    loop.run_until_complete(asyncio.sleep(0.01))
    assert (units.waiters, tokens.waiters) == (1, 1)


    class GiveBackAtExit:
        # Runs during interpreter shutdown, when the queued waiters can no longer be woken.
        def __del__(self):
            units.release_sync(1)
            global held
            held = None  # the native refund wakes the token waiter
            print("gave back", flush=True)


    finalizer = GiveBackAtExit()
    print("exiting", flush=True)
"""


def test_a_release_during_shutdown_with_waiters_queued_does_not_abort() -> None:
    done = _run_child(_WAITER_AT_EXIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["exiting", "gave", "back"]
    assert "panic" not in done.stderr


def test_a_wake_up_from_a_refill_during_shutdown_does_not_abort() -> None:
    done = _run_child(
        _WAITER_AT_EXIT.replace("units.release_sync(1)", "units.refill(); tokens.refill()")
    )
    assert done.returncode == 0, done.stderr
    assert "panic" not in done.stderr


# --- point 4: subinterpreters ----------------------------------------------------------------


def test_importing_in_a_subinterpreter_is_a_clear_import_error(tmp_path: Path) -> None:
    out = tmp_path / "outcome.txt"
    done = _run_child(
        f"""
        import costbound  # the main interpreter has it: the subinterpreter must not share it
        try:
            import _interpreters as interpreters  # 3.13 and later
            interp = interpreters.create("legacy")
        except ImportError:
            import _xxsubinterpreters as interpreters  # 3.10 to 3.12
            try:
                interp = interpreters.create(isolated=False)  # 3.12
            except TypeError:
                interp = interpreters.create()  # 3.10, 3.11: always a legacy one
        interpreters.run_string(interp, '''
        try:
            import costbound
        except ImportError as exc:
            outcome = "ImportError: " + str(exc)
        else:
            outcome = "imported"
        with open({str(out)!r}, "w") as f:
            f.write(outcome)
        ''')
        interpreters.destroy(interp)
        print("main interpreter still fine:", costbound.AtomicBudget(3).try_reserve_sync(2))
        """
    )
    assert done.returncode == 0, done.stderr
    assert "main interpreter still fine: True" in done.stdout
    outcome = out.read_text()
    assert outcome.startswith("ImportError: ")
    assert "costbound" in outcome
    assert "subinterpreter" in outcome
    assert "main interpreter" in outcome


# --- point 5: single-use permits and requests ------------------------------------------------


@pytest.mark.asyncio
async def test_a_released_permit_cannot_be_entered_again() -> None:
    budget = AtomicBudget(1)
    permit = await budget.reserve(1)
    async with permit:
        assert budget.available == 0
    assert permit.released
    inside = 0

    async def reuse() -> None:
        nonlocal inside
        async with permit:
            inside += 1
            await asyncio.sleep(0.01)

    outcomes = await asyncio.gather(*(reuse() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    assert "single-use" in str(outcomes[0])
    assert inside == 0
    with pytest.raises(RuntimeError, match="single-use"):
        await permit
    with pytest.raises(RuntimeError, match="single-use"), permit:
        pass
    assert (budget.available, budget.waiters) == (1, 0)


@pytest.mark.asyncio
async def test_a_permit_is_entered_once() -> None:
    budget = AtomicBudget(1)
    permit = await budget.reserve(1)
    async with permit:
        with pytest.raises(RuntimeError, match="single-use"):
            async with permit:
                pass
        assert budget.available == 0  # the failed entry released nothing
    assert budget.available == 1


def test_a_blocking_permit_is_entered_once() -> None:
    budget = AtomicBudget(1)
    blocking = budget.reserve_blocking(1)
    with blocking:
        with pytest.raises(RuntimeError, match="single-use"), blocking:
            pass
        assert budget.available == 0
    assert budget.available == 1


@pytest.mark.asyncio
async def test_a_permit_whose_wait_timed_out_may_wait_again() -> None:
    budget = AtomicBudget(1)
    assert budget.try_reserve_sync(1)
    permit = budget.reserve(1, timeout=0.01)
    with pytest.raises(TimeoutError):
        async with permit:
            pass
    budget.release_sync(1)
    async with permit:  # it never held anything: it is not used up
        assert budget.available == 0
    assert budget.available == 1


@pytest.mark.asyncio
async def test_a_used_token_request_cannot_be_entered_again() -> None:
    budget = AtomicTokenBudget(100)
    request = budget.reserve_tokens(60)
    async with request as reservation:
        assert reservation.armed
        with pytest.raises(RuntimeError, match="single-use"):
            async with request:
                pass
        assert budget.available == 40
    assert budget.available == 100
    for _ in range(3):
        with pytest.raises(RuntimeError, match="single-use"):
            async with request:
                pass
    with pytest.raises(RuntimeError, match="single-use"):
        await request
    assert budget.available == 100


@pytest.mark.asyncio
async def test_an_admission_and_a_ticket_are_single_use() -> None:
    budget = AtomicBudget(1)
    admission = costbound.admit(guards={budget: 1})
    async with admission as ticket:
        assert budget.available == 0
    assert ticket.closed
    assert budget.available == 1
    with pytest.raises(RuntimeError):
        async with admission:
            pass
    with pytest.raises(RuntimeError):
        await admission
    with pytest.raises(RuntimeError, match="closed"):
        async with ticket:
            pass
    with pytest.raises(RuntimeError, match="closed"), ticket:
        pass
    assert budget.available == 1


@pytest.mark.asyncio
async def test_two_tasks_entering_one_admission_cannot_leak_a_ticket() -> None:
    budget = AtomicBudget(2)
    admission = costbound.admit(guards={budget: 1})
    entered = 0

    async def enter() -> None:
        nonlocal entered
        async with admission:
            entered += 1
            await asyncio.sleep(0.01)

    outcomes = await asyncio.gather(enter(), enter(), return_exceptions=True)
    assert entered == 1
    assert sum(isinstance(o, RuntimeError) for o in outcomes) == 1
    assert budget.available == 2


# --- point 6: every awaitable is a coroutine for asyncio -------------------------------------


def _awaitables(units: AtomicBudget, tokens: AtomicTokenBudget) -> dict[str, Callable[[], Any]]:
    reservation = tokens.try_reserve_tokens_sync(1)
    assert reservation is not None
    return {
        "try_reserve": lambda: units.try_reserve(1),
        "release": lambda: units.release(0),
        "reserve": lambda: units.reserve(1),
        "try_reserve_tokens": lambda: tokens.try_reserve_tokens(5),
        "reserve_tokens": lambda: tokens.reserve_tokens(5),
        "record_usage": lambda: tokens.record_usage(reservation, 1, 0),
        "tokens_consumed": tokens.tokens_consumed,
        "admit": lambda: costbound.admit(guards={units: 1}, tokens={tokens: 5}),
        "try_admit": lambda: costbound.try_admit(guards={units: 1}, tokens={tokens: 5}),
        "ticket.close": lambda: Ticket({}, {}).close(),
    }


def _settle(result: object) -> None:
    if isinstance(result, Permit):
        result.release()
    elif isinstance(result, Ticket):
        result.close_sync()
    elif isinstance(result, TokenReservation):
        with result:  # refunded on exit (a task may still hold the object)
            pass


async def _via(runner: str, make: Callable[[], Awaitable[object]]) -> object:
    if runner == "create_task":
        return await asyncio.create_task(make())  # type: ignore[arg-type]
    if runner == "ensure_future":
        return await asyncio.ensure_future(make())
    if runner == "wait_for":
        return await asyncio.wait_for(make(), timeout=5)
    async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
        task = group.create_task(make())
    return task.result()


_RUNNERS = ["create_task", "ensure_future", "wait_for"] + (
    ["task_group"] if hasattr(asyncio, "TaskGroup") else []
)


@pytest.mark.parametrize("runner", _RUNNERS)
@pytest.mark.asyncio
async def test_every_awaitable_runs_as_a_task(runner: str) -> None:
    units = AtomicBudget(1)
    tokens = AtomicTokenBudget(100)
    for name, make in _awaitables(units, tokens).items():
        result = await _via(runner, make)
        expected = {"try_reserve": True, "release": None, "record_usage": None}
        if name in expected:
            assert result is expected[name], name
        elif name == "tokens_consumed":
            assert result == 1
        elif name in ("reserve", "reserve_tokens", "try_reserve_tokens"):
            assert isinstance(result, (Permit, TokenReservation)), (name, result)
        elif name in ("admit", "try_admit"):
            assert isinstance(result, Ticket), (name, result)
        if name == "try_reserve":
            units.release_sync(1)
        _settle(result)
        del result
        assert (units.available, units.waiters, tokens.waiters) == (1, 0, 0), name
    assert tokens.available == 99  # the one recorded token


def test_every_awaitable_runs_with_asyncio_run() -> None:
    units = AtomicBudget(1)
    tokens = AtomicTokenBudget(100)
    for name, make in _awaitables(units, tokens).items():
        result = asyncio.run(make())
        if name == "try_reserve":
            assert result is True
            units.release_sync(1)
        _settle(result)
        del result
    assert (units.available, tokens.available) == (1, 99)


@pytest.mark.asyncio
async def test_a_permit_task_waits_then_the_permit_is_entered() -> None:
    budget = AtomicBudget(1)
    assert budget.try_reserve_sync(1)
    task = asyncio.create_task(budget.reserve(1))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert (task.done(), budget.waiters) == (False, 1)
    budget.release_sync(1)
    permit = await task
    assert isinstance(permit, Permit)
    assert permit.granted
    assert budget.available == 0
    async with permit:
        assert budget.available == 0
    assert permit.released
    assert budget.available == 1


@pytest.mark.asyncio
async def test_a_token_request_task_waits_for_its_reservation() -> None:
    budget = AtomicTokenBudget(100)
    held = budget.try_reserve_tokens_sync(100)
    task = asyncio.create_task(budget.reserve_tokens(40))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert budget.waiters == 1
    del held
    reservation = await task
    assert isinstance(reservation, TokenReservation)
    assert reservation.armed
    assert budget.available == 60
    with reservation:  # refunded on exit
        pass
    assert budget.available == 100


@pytest.mark.parametrize("kind", ["reserve", "reserve_tokens", "admit"])
@pytest.mark.asyncio
async def test_a_cancelled_waiting_task_leaves_no_trace(kind: str) -> None:
    units = AtomicBudget(1)
    tokens = AtomicTokenBudget(10)
    assert units.try_reserve_sync(1)
    held = tokens.try_reserve_tokens_sync(10)
    make: dict[str, Callable[[], Any]] = {
        "reserve": lambda: units.reserve(1),
        "reserve_tokens": lambda: tokens.reserve_tokens(10),
        "admit": lambda: costbound.admit(guards={units: 1}, tokens={tokens: 10}),
    }
    task = asyncio.create_task(make[kind]())
    await asyncio.sleep(0.01)
    assert units.waiters + tokens.waiters + units._watchers + tokens._watchers >= 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (units.waiters, tokens.waiters, units._watchers, tokens._watchers) == (0, 0, 0, 0)
    units.release_sync(1)
    del held
    assert (units.available, tokens.available) == (1, 10)
    # The next waiter is served as usual.
    async with units.reserve(1), tokens.reserve_tokens(10):
        assert (units.available, tokens.available) == (0, 0)


@pytest.mark.parametrize("kind", ["reserve", "reserve_tokens"])
def test_a_request_task_dropped_with_its_closed_loop_leaves_the_queue(kind: str) -> None:
    # The request holds the wait it hands its steps to, which holds the request: only the
    # garbage collector can end that cycle, and it must (or the queue would block for ever).
    units = AtomicBudget(1)
    tokens = AtomicTokenBudget(10)
    assert units.try_reserve_sync(1)
    held = tokens.try_reserve_tokens_sync(10)
    loop = asyncio.new_event_loop()
    request = units.reserve(1) if kind == "reserve" else tokens.reserve_tokens(10)
    task = loop.create_task(request)  # type: ignore[arg-type]
    loop.run_until_complete(asyncio.sleep(0.01))
    assert units.waiters + tokens.waiters == 1
    loop.close()  # the task is never cancelled
    del task, request
    gc.collect()
    assert (units.waiters, tokens.waiters) == (0, 0)
    units.release_sync(1)
    del held
    assert (units.available, tokens.available) == (1, 10)


@pytest.mark.parametrize("kind", ["reserve", "reserve_tokens", "admit"])
@pytest.mark.asyncio
async def test_a_task_cancelled_before_its_first_step_takes_nothing(kind: str) -> None:
    units = AtomicBudget(1)
    tokens = AtomicTokenBudget(10)
    make: dict[str, Callable[[], Any]] = {
        "reserve": lambda: units.reserve(1),
        "reserve_tokens": lambda: tokens.reserve_tokens(10),
        "admit": lambda: costbound.admit(guards={units: 1}, tokens={tokens: 10}),
    }
    task = asyncio.create_task(make[kind]())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (units.available, tokens.available, units.waiters, tokens.waiters) == (1, 10, 0, 0)


def test_the_coroutine_protocol_by_hand() -> None:
    budget = AtomicBudget(1)
    permit = budget.reserve(1)
    with pytest.raises(StopIteration) as stopped:
        permit.send(None)  # room now: it finishes in its first step
    assert stopped.value.value is permit
    assert permit.granted
    with pytest.raises(KeyError):
        budget.reserve(1).throw(KeyError("never started"))
    budget.reserve(1).close()
    assert (budget.available, budget.waiters) == (0, 0)
    permit.release()


# --- point 7: the private hand-over refuses another request's waiter ------------------------


def _granted_waiter(request: Any, make_room: Callable[[], object]) -> tuple[Any, Any]:
    """Start ``request``'s wait by hand (as ``costbound._waiting.wait`` does) and have it
    granted: its waiter, and the unstarted wait to close."""
    suspended = request.__await__()  # no room: the request is now being awaited
    waiter = request._enqueue(lambda: None)
    make_room()
    assert waiter.granted
    return waiter, suspended


def test_finish_refuses_another_budgets_waiter() -> None:
    mine, other = AtomicBudget(5), AtomicBudget(5)
    assert other.try_reserve_sync(5)
    permit = mine.reserve(2)
    foreign = other.reserve(3)
    waiter, suspended = _granted_waiter(foreign, lambda: other.release_sync(5))
    assert other.available == 2
    with pytest.raises(ValueError, match="waiter"):
        permit._finish(waiter)  # type: ignore[attr-defined]
    assert not permit.granted
    assert mine.available == 5
    assert waiter.granted
    assert other.available == 2
    assert foreign._finish(waiter) is foreign  # type: ignore[attr-defined]
    assert foreign.granted
    suspended.close()
    foreign.release()
    assert other.available == 5


def test_finish_refuses_a_waiter_of_another_request_on_the_same_budget() -> None:
    tokens = AtomicTokenBudget(100)
    held = tokens.try_reserve_tokens_sync(100)
    request = tokens.reserve_tokens(10)
    foreign = tokens.reserve_tokens(70)
    waiter, suspended = _granted_waiter(foreign, lambda: held.disarm()(100))  # type: ignore[union-attr,misc]
    assert tokens.available == 30
    with pytest.raises(ValueError, match="waiter"):
        request._finish(waiter)  # type: ignore[attr-defined]
    assert tokens.available == 30
    waiter.give_back()
    suspended.close()
    assert tokens.available == 100


# --- point 11: admit's capacity check and infinite timeouts ----------------------------------


class _CappedGuard:
    """A user-written guard that knows its capacity, as the Redis budgets do."""

    capacity = 5

    def __init__(self) -> None:
        self.calls = 0

    async def try_reserve(self, cost: int) -> bool:
        self.calls += 1
        return cost <= self.capacity

    async def release(self, cost: int) -> None:
        pass


def test_admit_refuses_a_part_above_a_known_capacity_at_once() -> None:
    guard = _CappedGuard()
    with pytest.raises(ValueError, match="capacity"):
        costbound.admit(guards={guard: 6})
    with pytest.raises(ValueError, match="capacity"):
        costbound.admit_blocking(guards={guard: 6}, timeout=5)
    assert guard.calls == 0
    ticket = costbound.admit_blocking(guards={guard: 5}, timeout=5)
    ticket.close_sync()


def test_admit_refuses_a_part_above_a_redis_budgets_capacity(redis_url: str) -> None:
    redis = pytest.importorskip("redis")
    from costbound.redis import RedisBudget

    budget = RedisBudget("faults:capacity", capacity=3, sync_client=redis.Redis.from_url(redis_url))
    with pytest.raises(ValueError, match="capacity"):
        costbound.admit_blocking(guards={budget: 4}, timeout=5)


def test_an_infinite_timeout_means_no_timeout() -> None:
    budget = AtomicBudget(1)
    tokens = AtomicTokenBudget(10)
    for _ in range(2):
        assert budget.try_reserve_sync(1)
        threading.Timer(0.05, budget.release_sync, (1,)).start()
        if _ == 0:
            costbound.admit_blocking(guards={budget: 1}, timeout=math.inf).close_sync()
        else:
            budget.reserve_blocking(1, timeout=math.inf).release()
    held = tokens.try_reserve_tokens_sync(10)
    threading.Timer(0.05, lambda: held.disarm()(10)).start()  # type: ignore[union-attr,misc]
    tokens.reserve_tokens_blocking(10, timeout=math.inf).disarm()

    async def main() -> None:
        assert budget.try_reserve_sync(1)
        asyncio.get_running_loop().call_later(0.05, budget.release_sync, 1)
        async with costbound.admit(guards={budget: 1}, timeout=math.inf):
            pass
        assert budget.try_reserve_sync(1)
        asyncio.get_running_loop().call_later(0.05, budget.release_sync, 1)
        async with budget.reserve(1, timeout=math.inf):
            pass

    asyncio.run(main())
    assert budget.available == 1


@pytest.mark.parametrize("bad", [math.nan, -1.0, -math.inf])
def test_a_nan_or_negative_timeout_is_a_value_error(bad: float) -> None:
    budget = AtomicBudget(1)
    tokens = AtomicTokenBudget(10)
    calls: list[Callable[[], object]] = [
        lambda: budget.reserve(1, timeout=bad),
        lambda: budget.reserve_blocking(1, timeout=bad),
        lambda: tokens.reserve_tokens(1, timeout=bad),
        lambda: tokens.reserve_tokens_blocking(1, timeout=bad),
        lambda: costbound.admit(guards={budget: 1}, timeout=bad),
        lambda: costbound.admit_blocking(guards={budget: 1}, timeout=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="timeout"):
            call()
    assert (budget.available, tokens.available) == (1, 10)
