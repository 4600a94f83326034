"""Guards a gate takes as leases: stored budgets (Redis, SQLite) whose ``reserve`` gives a lease.

A stored guard's ``try_reserve`` / ``release`` are plain counters without identity: units a call
took that way and never gave back (a stream abandoned unread, a worker that crashed) are gone
for good, so a concurrency slot of 8 becomes 7. Its ``reserve`` gives a permit instead, a lease
that comes back when it ends even if its holder never releases it. A gate takes such a guard
through a :class:`Leased` part, one per admission: to ``admit`` it is a guard like any other,
whose ``try_reserve`` takes a permit without waiting (``reserve(cost, timeout=0)``) and whose
``release`` releases that permit.

costbound's own atomic budgets are not leased: their counters are lock-free, so a dropped pass
gives their units back from the garbage collector itself (:meth:`Pass.abandon`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from costbound._admit import NeverFitsError
from costbound._atomic import AtomicBudget, AtomicTokenBudget
from costbound._protocols import BudgetGuard

__all__ = ["LOCK_FREE", "Leased", "Renewal", "leased", "lends_leases", "underlying"]

#: costbound's own atomic budgets: their blocking methods never block, so the garbage
#: collector may call them (:meth:`Pass.abandon`).
LOCK_FREE = (AtomicBudget, AtomicTokenBudget)


def lends_leases(guard: object) -> bool:
    """Whether ``guard`` lends its units as leases (``reserve`` and ``reserve_blocking``).

    costbound's atomic budgets (and subclasses of them) count, and are taken as counters.
    """
    if isinstance(guard, LOCK_FREE):
        return False
    return callable(getattr(guard, "reserve", None)) and callable(
        getattr(guard, "reserve_blocking", None)
    )


def leased(guards: Mapping[BudgetGuard, int], lending: frozenset[object]) -> Mapping[Any, int]:
    """Give one admission's guards, each of ``lending`` wrapped in a new :class:`Leased`."""
    if not lending:
        return guards
    return {(Leased(guard) if guard in lending else guard): cost for guard, cost in guards.items()}


def underlying(part: object) -> object:
    """Give the budget a part of an admission stands for (a :class:`Leased` part's guard)."""
    return part.guard if isinstance(part, Leased) else part


class Leased:
    """One lease on a stored guard, as a part of one admission.

    ``try_reserve`` takes a permit if ``cost`` fits now; ``release`` releases it. A pass dropped
    unsettled lets its permit go (:meth:`drop`): the lease ends by itself.
    """

    __slots__ = ("guard", "permit")

    def __init__(self, guard: Any) -> None:  # noqa: ANN401 - a stored BudgetGuard
        self.guard = guard
        self.permit: Any = None

    async def try_reserve(self, cost: int) -> bool:
        """Lease ``cost`` now, or ``False`` (a ``NeverFitsError`` above the capacity)."""
        try:
            self.permit = await self.guard.reserve(cost, timeout=0)
        except TimeoutError:
            return False
        except ValueError:  # above the stored capacity: waiting would never end
            raise NeverFitsError(self.guard, cost) from None
        return True

    def try_reserve_sync(self, cost: int) -> bool:
        """Do what :meth:`try_reserve` does, with the blocking client."""
        try:
            self.permit = _reserve_now_sync(self.guard, cost)
        except TimeoutError:
            return False
        except ValueError:
            raise NeverFitsError(self.guard, cost) from None
        return True

    async def release(self, cost: int) -> None:
        """Release the permit (``cost`` is the permit's own)."""
        permit, self.permit = self.permit, None
        if permit is not None:
            await permit.release()

    def release_sync(self, cost: int) -> None:
        """Do what :meth:`release` does, with the blocking client."""
        permit, self.permit = self.permit, None
        if permit is not None:
            permit.release_sync()

    def drop(self) -> None:
        """Let the permit go without a network call (the garbage collector may be running).

        The lease comes back when it ends, or sooner if the backend releases a dropped permit.
        """
        self.permit = None

    def __repr__(self) -> str:
        return repr(self.guard)


def _reserve_now_sync(guard: Any, cost: int) -> Any:  # noqa: ANN401 - a stored guard's permit
    """``reserve_blocking(cost, timeout=0)``, even on a thread that runs an event loop.

    A gate that does not wait takes its budgets on any thread (a blocking SDK client called
    from async code). ``reserve_blocking`` refuses a thread that runs a loop, since it could
    wait there; with ``timeout=0`` it never waits, so it runs on a worker thread instead, and
    this thread is blocked no longer than a ``try_reserve_sync`` would block it.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return guard.reserve_blocking(cost, timeout=0)
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        return worker.submit(guard.reserve_blocking, cost, timeout=0).result()


class Renewal:
    """Keeps the leases of a long call alive: its stored guards' permits and token reservations.

    A lease ends ``lease`` seconds after its grant; a stream read for longer would lose its
    concurrency slot while it still runs (and its token hold). A gated stream calls
    :meth:`due` with every item it reads, and renews (``extend``) every lease at half the
    shortest lease. A renewal that fails is not the caller's concern: the call goes on, and its
    lease may end.
    """

    __slots__ = ("_due", "_every", "_held")

    def __init__(self, held: list[tuple[Any, Any, float]]) -> None:
        self._held = held  # (budget, permit or reservation, lease seconds)
        self._every = min(lease for _, _, lease in held) / 2
        self._due = time.monotonic() + self._every

    @classmethod
    def of(cls, guards: Mapping[Any, int], reservations: Mapping[Any, Any]) -> Renewal | None:
        """Give the renewal of an admission's stored leases; None when it holds none."""
        held: list[tuple[Any, Any, float]] = [
            (part.guard, part.permit, part.guard.lease)
            for part in guards
            if isinstance(part, Leased) and part.permit is not None
        ]
        for budget, reservation in reservations.items():
            lease = getattr(budget, "lease", None)
            extends = callable(getattr(budget, "extend_sync", None))
            if not isinstance(budget, LOCK_FREE) and extends and isinstance(lease, (int, float)):
                held.append((budget, reservation, float(lease)))
        return cls(held) if held else None

    def due(self) -> bool:
        """Whether the leases should be renewed now."""
        return time.monotonic() >= self._due

    def renew_sync(self) -> None:
        """Extend every lease by its full length, with the blocking clients."""
        self._due = time.monotonic() + self._every
        for budget, held, lease in self._held:
            with contextlib.suppress(Exception):  # settled meanwhile, or the server is away
                budget.extend_sync(held, lease)

    async def renew(self) -> None:
        """Do what :meth:`renew_sync` does, with the async clients."""
        self._due = time.monotonic() + self._every
        for budget, held, lease in self._held:
            with contextlib.suppress(Exception):
                await budget.extend(held, lease)
