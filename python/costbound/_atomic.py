"""The lock-free reference budgets, backed by Rust atomics."""

from __future__ import annotations

from collections.abc import Coroutine

from costbound import _native, _waiting

__all__ = ["AtomicBudget", "AtomicTokenBudget", "Permit", "TokenRequest"]

Permit = _native.Permit
TokenRequest = _native.TokenRequest

# A native Permit or TokenRequest that must suspend hands over to this coroutine.
_native.register_wait(_waiting.wait)

# The async methods return a native awaitable that completes in one step, and ``reserve`` /
# ``reserve_tokens`` a native request that may wait; each has the whole coroutine interface
# (``send``, ``throw``, ``close``), so registered they are accepted wherever asyncio wants a
# coroutine (``asyncio.create_task``, ``ensure_future``, ``asyncio.run``, ``TaskGroup``).
Coroutine.register(_native.Awaitable)
Coroutine.register(_native.Permit)
Coroutine.register(_native.TokenRequest)


class AtomicBudget(_native.AtomicBudget):
    """A lock-free budget of unit costs (rows, requests, queue slots): a ``BudgetGuard``.

    ``capacity`` is an int in ``0..=2**64-1``. Every member is safe from any number of threads
    and event loops; the async methods complete without a turn of the event loop::

        >>> b = AtomicBudget(100)
        >>> b.try_reserve_sync(60), b.try_reserve_sync(60)
        (True, False)
        >>> b.release_sync(60); b.available
        100

    ``reserve(cost, timeout=...)`` waits for room (first come, first served) and gives a
    ``Permit``; ``reserve_blocking`` does the same for threads. ``rate=`` makes that many units
    flow back per second, up to ``capacity`` (a requests-per-second limit with a burst).
    """

    __slots__ = ()


class AtomicTokenBudget(_native.AtomicTokenBudget):
    """A lock-free token budget with debt: a ``TokenBudget``.

    Reserve an estimate, call the model, then ``record_usage`` with the provider's totals: the
    difference is refunded, or charged as an overage that becomes ``debt`` when it exceeds what
    is available. A reservation dropped unrecorded refunds its estimate. ``capacity`` is an int
    in ``0..=2**63-1``::

        >>> tb = AtomicTokenBudget(1_000)
        >>> r = tb.try_reserve_tokens_sync(400)
        >>> tb.record_usage_sync(r, 120, 80)
        >>> tb.available, tb.consumed
        (800, 200)

    ``reserve_tokens(estimate, timeout=...)`` waits for room (first come, first served) and gives
    an armed reservation; ``reserve_tokens_blocking`` does the same for threads. ``rate=`` makes
    that many tokens flow back per second, debt first, up to ``capacity``:
    ``AtomicTokenBudget(90_000, rate=90_000 / 60)`` is a 90k tokens-per-minute limit.
    """

    __slots__ = ()
