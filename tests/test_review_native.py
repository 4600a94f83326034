"""What a second, hostile review of the native awaitables and of ``admit`` found (issue 12).

* A ``Permit`` or ``TokenRequest`` whose suspended wait fails before it starts waiting (awaited
  where no asyncio loop runs, or sent a value as its first step) stays usable: it is not left
  "being awaited" for ever.
* ``admit_blocking`` with a finite but huge timeout waits (it raised ``OverflowError`` from the
  thread wait), and a timeout too large for a float is a ``ValueError``, as for the native calls.
* Parts an admission gives back (a denied attempt, a cancelled wait, a ticket's close) are given
  back in full even when the task is cancelled while a user-written budget's ``release`` is
  still running: before, the units of that release were lost for good.
* ``throw()`` with something that is not an exception is a ``TypeError`` that changes nothing.
* A wake-up for a task whose loop was closed is skipped silently on the loop's own thread too.
* Entering a request whose wait is in progress is refused without using up its single entry.

Whatever could hang or print at exit runs in a child process.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
import warnings
from typing import Any

import costbound
import pytest
from costbound import AtomicBudget, AtomicTokenBudget

WAIT = 5.0


# --- a wait that fails to start leaves its request usable --------------------------------------


def _blocked_request(kind: str) -> tuple[Any, Any, Any]:
    """A request that must wait, and what frees its room (`free()`)."""
    if kind == "permit":
        units = AtomicBudget(1)
        assert units.try_reserve_sync(1)
        return units, units.reserve(1), lambda: units.release_sync(1)
    tokens = AtomicTokenBudget(10)
    held = [tokens.try_reserve_tokens_sync(10)]
    return tokens, tokens.reserve_tokens(4), held.clear  # dropping the reservation refunds it


async def _await(request: Any) -> Any:
    return await asyncio.wait_for(request, WAIT)


@pytest.mark.parametrize("kind", ["permit", "token request"])
def test_a_request_awaited_where_no_loop_runs_can_be_awaited_later(kind: str) -> None:
    budget, request, free = _blocked_request(kind)

    async def user() -> Any:
        return await request

    driver = user()  # driven by hand, as a framework other than asyncio would
    with pytest.raises(RuntimeError, match="no running event loop"):
        driver.send(None)
    assert budget.waiters == 0
    free()
    granted = asyncio.run(_await(request))  # was: "this request is already being awaited"
    assert granted is not None
    del granted
    gc.collect()
    assert budget.waiters == 0


@pytest.mark.parametrize("kind", ["permit", "token request"])
def test_a_value_sent_as_the_first_step_is_refused_and_changes_nothing(kind: str) -> None:
    budget, request, free = _blocked_request(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="non-None"):
            request.send(5)
        gc.collect()
    assert [str(w.message) for w in caught] == []  # no "coroutine 'wait' was never awaited"
    assert budget.waiters == 0
    free()
    assert asyncio.run(_await(request)) is not None


# --- admission timeouts --------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [1e300, sys.float_info.max, 2.0**64])
def test_admit_blocking_with_a_huge_timeout_waits(timeout: float) -> None:
    units = AtomicBudget(1)
    assert units.try_reserve_sync(1)
    freer = threading.Timer(0.05, units.release_sync, (1,))
    freer.start()
    try:
        with costbound.admit_blocking(guards={units: 1}, timeout=timeout) as ticket:
            assert ticket.guards == {units: 1}
    finally:
        freer.join()
    assert units.available == 1


def test_a_timeout_too_large_for_a_float_is_a_value_error() -> None:
    units = AtomicBudget(1)
    with pytest.raises(ValueError, match="timeout"):
        costbound.admit(guards={units: 1}, timeout=10**400)
    with pytest.raises(ValueError, match="timeout"):
        costbound.admit_blocking(guards={units: 1}, timeout=10**400)
    with pytest.raises(ValueError, match="timeout"):
        units.reserve(1, timeout=10**400)
    assert units.available == 1


# --- giving back survives a cancellation ---------------------------------------------------------


class RemoteGuard:
    """A user-written BudgetGuard whose calls each take a round trip (a database, say)."""

    def __init__(self, available: int) -> None:
        self.available = available
        self.in_release = asyncio.Event()

    async def try_reserve(self, cost: int) -> bool:
        await asyncio.sleep(0)
        if cost <= self.available:
            self.available -= cost
            return True
        return False

    async def release(self, cost: int) -> None:
        self.in_release.set()
        await asyncio.sleep(0.02)
        self.available += cost


async def _cancel_while_giving_back(start: Any, remote: RemoteGuard) -> None:
    task = asyncio.ensure_future(start())
    await asyncio.wait_for(remote.in_release.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the release, left to finish, ends within its round trip
        if remote.available == 5:
            break
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_an_admission_cancelled_while_giving_back_a_denied_attempt_loses_nothing() -> None:
    remote, never = RemoteGuard(5), RemoteGuard(0)  # the second denies: the first is given back
    await _cancel_while_giving_back(
        lambda: costbound.admit(guards={remote: 2, never: 1}, timeout=WAIT), remote
    )
    assert remote.available == 5  # was 3: the interrupted release was lost


@pytest.mark.asyncio
async def test_try_admit_cancelled_while_giving_back_loses_nothing() -> None:
    remote, never = RemoteGuard(5), RemoteGuard(0)
    await _cancel_while_giving_back(
        lambda: costbound.try_admit(guards={remote: 2, never: 1}), remote
    )
    assert remote.available == 5


@pytest.mark.asyncio
async def test_a_ticket_closed_by_a_cancelled_task_gives_every_part_back() -> None:
    remote, units = RemoteGuard(5), AtomicBudget(3)

    async def hold_then_close() -> None:
        async with costbound.admit(guards={remote: 2, units: 3}, timeout=WAIT):
            pass  # the exit closes the ticket: its release of `remote` is interrupted

    await _cancel_while_giving_back(hold_then_close, remote)
    assert remote.available == 5
    assert units.available == 3


# --- throw() with something that is not an exception ------------------------------------------


@pytest.mark.parametrize("bad", [42, "boom", int, None])
def test_throwing_a_non_exception_is_a_type_error_that_changes_nothing(bad: object) -> None:
    units = AtomicBudget(2)
    call = units.try_reserve(1)
    permit = units.reserve(1)
    for awaitable in (call, permit):
        with pytest.raises(TypeError, match="BaseException"):
            awaitable.throw(bad)

    async def both() -> tuple[bool, Any]:
        return await call, await permit

    granted, held = asyncio.run(both())  # was: "cannot reuse an already awaited budget call"
    assert granted is True
    assert held.granted
    assert units.available == 0


# --- a wake-up for a task whose loop is closed --------------------------------------------------


def test_a_release_on_the_thread_of_a_closed_loop_with_a_waiter_reports_nothing() -> None:
    # The task is still referenced (so its wait is still queued) when its loop is closed; a
    # release on that same thread wakes it. Before, the wake-up raised "Event loop is closed",
    # printed as an ignored exception; from another thread it was already silent.
    code = """
        import asyncio, costbound
        units = costbound.AtomicBudget(1)
        assert units.try_reserve_sync(1)
        loop = asyncio.new_event_loop()
        task = loop.create_task(units.reserve(1))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert units.waiters == 1
        loop.close()
        units.release_sync(1)
        print("released", flush=True)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["released"]
    assert "Event loop is closed" not in done.stderr
    assert "Exception ignored" not in done.stderr


# --- entering a request whose wait is in progress -------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["permit", "token request"])
async def test_entering_a_request_being_awaited_is_refused_and_leaves_it_usable(kind: str) -> None:
    budget, request, free = _blocked_request(kind)
    task = asyncio.ensure_future(request)  # its owner waits for it in a task
    await asyncio.sleep(0)  # the task's first step queues the wait
    assert budget.waiters == 1
    with pytest.raises(RuntimeError, match="already being awaited"):
        async with request:
            pytest.fail("entered a request whose wait is in progress")
    free()
    await asyncio.wait_for(task, WAIT)
    async with request:  # was: "this permit was already used"
        pass
    assert budget.waiters == 0
    if kind == "permit":
        assert request.released


# --- a loop that moves to another thread while a task waits -------------------------------------


def test_a_wait_is_woken_when_its_loop_runs_on_another_thread_than_it_started_on() -> None:
    # The wait starts while the loop runs on the main thread; the loop then runs on a worker
    # thread, and the release comes from the main thread. The wake-up must go through the
    # loop's thread-safe path (before, it resolved the future from the main thread directly,
    # the loop's selector was never woken, and the task hung).
    code = """
        import asyncio, threading, time, costbound
        units = costbound.AtomicBudget(1)
        assert units.try_reserve_sync(1)
        loop = asyncio.new_event_loop()
        task = loop.create_task(units.reserve(1))
        loop.run_until_complete(asyncio.sleep(0.01))  # the wait starts on this thread
        assert units.waiters == 1
        worker = threading.Thread(target=loop.run_until_complete, args=(task,))
        worker.start()
        time.sleep(0.1)  # the loop now sleeps in its selector, on the worker thread
        units.release_sync(1)
        worker.join(5)
        print("woken" if not worker.is_alive() else "hung", flush=True)
        if not worker.is_alive():
            task.result().release()
            loop.close()
            print(units.available, units.waiters)
        else:
            import os
            os._exit(0)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["woken", "1", "0"]


# --- one request handed to two tasks ---------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["permit", "token request"])
async def test_a_second_task_driving_a_waiting_request_is_refused(kind: str) -> None:
    # As `await request` from a second coroutine is. Before, the second task shared the first
    # one's wait: both got the grant, and cancelling the second ended the wait under the
    # first, which then waited for ever.
    budget, request, free = _blocked_request(kind)
    owner = asyncio.ensure_future(request)
    await asyncio.sleep(0)
    assert budget.waiters == 1
    second = asyncio.ensure_future(request)
    with pytest.raises(RuntimeError, match="already being awaited"):
        await asyncio.wait_for(second, WAIT)
    assert budget.waiters == 1  # the owner's wait goes on
    free()
    granted = await asyncio.wait_for(owner, WAIT)
    assert granted is not None
    assert budget.waiters == 0
