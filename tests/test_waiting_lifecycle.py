"""Waits that end without their owner's help: an abandoned task, a signal, a closed loop.

Spec section 7: "Cancelling a waiting task leaves no trace: no unit taken, no waiter left
behind, the next waiter still woken." These are the ways a wait can end that are not a normal
cancellation: the task's loop is closed without cancelling it (the queue must not keep it alive,
or it would block everyone behind it), and a blocking wait on the main thread interrupted by a
signal handler that raises (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading

import pytest
from costbound import AtomicBudget, AtomicTokenBudget


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0.01))


def test_a_task_dropped_with_its_closed_loop_leaves_the_queue() -> None:
    budget = AtomicBudget(2)
    assert budget.try_reserve_sync(2)
    loop = asyncio.new_event_loop()

    async def wait_for_unit() -> None:
        await budget.reserve(1)

    task = loop.create_task(wait_for_unit())
    _settle(loop)
    assert budget.waiters == 1
    loop.close()  # the task is never cancelled: only the garbage collector can end it
    del task
    # asyncio logs "Task was destroyed but it is pending!" through its logger; that is the point.
    gc.collect()
    assert budget.waiters == 0, "the abandoned waiter must not block the queue"
    # Nothing was taken for it: a release now serves the next request, not a dead task.
    budget.release_sync(1)
    assert budget.available == 1
    assert budget.reserve_blocking(1, timeout=0).granted


def test_a_token_waiter_dropped_with_its_closed_loop_takes_nothing() -> None:
    budget = AtomicTokenBudget(100)
    held = budget.try_reserve_tokens_sync(100)
    loop = asyncio.new_event_loop()

    async def wait_for_tokens() -> None:
        await budget.reserve_tokens(60)

    task = loop.create_task(wait_for_tokens())
    _settle(loop)
    assert budget.waiters == 1
    loop.close()
    del task
    gc.collect()
    assert budget.waiters == 0
    del held
    assert (budget.available, budget.debt, budget.consumed) == (100, 0, 0)


@pytest.mark.skipif(sys.platform == "win32", reason="setitimer is POSIX")
def test_a_blocking_wait_on_the_main_thread_is_interrupted_by_a_signal() -> None:
    assert threading.current_thread() is threading.main_thread()
    budget = AtomicBudget(1)
    assert budget.try_reserve_sync(1)

    class HandlerError(Exception):
        pass

    def raise_interrupted(signum: int, frame: object) -> None:
        raise HandlerError

    previous = signal.signal(signal.SIGALRM, raise_interrupted)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(HandlerError):
            budget.reserve_blocking(1, timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert (budget.available, budget.waiters) == (0, 0)
    budget.release_sync(1)
    assert budget.reserve_blocking(1, timeout=0).granted


@pytest.mark.skipif(sys.platform == "win32", reason="setitimer is POSIX")
def test_a_token_wait_interrupted_by_a_signal_takes_nothing() -> None:
    budget = AtomicTokenBudget(10)
    held = budget.try_reserve_tokens_sync(10)

    def raise_keyboard_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, raise_keyboard_interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(KeyboardInterrupt):
            budget.reserve_tokens_blocking(5, timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert budget.waiters == 0
    del held
    assert budget.available == 10
