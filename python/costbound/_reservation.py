"""``TokenReservation``: an estimate held against a token budget until it is reconciled."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from costbound import _native

__all__ = ["TokenRefund", "TokenReservation"]

TokenRefund: TypeAlias = Callable[[int], None]
"""Called once with the estimate when an armed reservation is dropped."""


class TokenReservation(_native.Reservation):
    """An estimate reserved on a ``TokenBudget``, to be reconciled with ``record_usage``.

    Dropping an armed reservation (its last reference gone, or collected in a cycle) is
    cancellation: ``refund(estimate)`` is called exactly once. Native budgets hand out a refund
    that runs in Rust and holds the budget weakly; custom backends pass any callable::

        >>> refunded = []
        >>> r = TokenReservation(400, refunded.append)
        >>> (r.estimate, r.armed)
        (400, True)
        >>> del r
        >>> refunded
        [400]

    ``disarm()`` takes the refund away (returning it, or ``None`` if it was already taken), so
    that dropping the reservation refunds nothing.

    On a native budget the refund ``disarm()`` returns is a handle that gives back the whole
    estimate it holds, once, whatever amount it is called with (an ``int >= 0``; a bad amount
    raises and gives nothing back yet). A reservation built around such a handle shares its
    single claim: recording, disarming or dropping either one settles both, exactly once::

        >>> from costbound import AtomicTokenBudget
        >>> tb = AtomicTokenBudget(1_000)
        >>> handle = tb.try_reserve_tokens_sync(400).disarm()
        >>> again = TokenReservation(500, handle)
        >>> del again
        >>> (tb.available, handle.armed)
        (1000, False)
    """

    __slots__ = ()

    # The refund runs natively: no Python frame on the drop path, exactly once, and a refund
    # that raises is reported by the interpreter as unraisable.
    __del__ = _native.Reservation.__del__


_native.register_reservation_type(TokenReservation)
