"""Helpers for testing code that uses costbound budgets.

``ManualClock`` drives the rate refill of budgets made with ``clock=``: time moves only when the
test calls ``advance(seconds)``, which also wakes the waiters the refill now fits::

    >>> from costbound import AtomicTokenBudget
    >>> from costbound.testing import ManualClock
    >>> clock = ManualClock()
    >>> tpm = AtomicTokenBudget(90_000, rate=90_000 / 60, clock=clock)
    >>> r = tpm.try_reserve_tokens_sync(90_000)
    >>> tpm.record_usage_sync(r, 60_000, 30_000)
    >>> clock.advance(10)
    >>> tpm.available
    15000

Timeouts stay in real time; only the refill reads the manual clock.
"""

from costbound._native import ManualClock

__all__ = ["ManualClock"]
