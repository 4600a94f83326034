"""The two protocols every budget implements, native or user-written."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from costbound._reservation import TokenReservation

__all__ = ["BudgetGuard", "TokenBudget"]


@runtime_checkable
class BudgetGuard(Protocol):
    """Unit costs known up front: reserve, then release.

    ``True`` means granted; ``False`` is a soft denial (back off, not an error).
    """

    async def try_reserve(self, cost: int) -> bool:
        """Take ``cost`` units if they are available; ``False`` otherwise."""
        ...

    async def release(self, cost: int) -> None:
        """Give ``cost`` units back."""
        ...


@runtime_checkable
class TokenBudget(Protocol):
    """An optimistic estimate, reconciled later against the provider's reported usage."""

    async def try_reserve_tokens(self, estimate: int) -> TokenReservation | None:
        """Reserve ``estimate`` tokens; ``None`` is a soft denial."""
        ...

    async def record_usage(
        self, reservation: TokenReservation, prompt: int, completion: int
    ) -> None:
        """Disarm ``reservation`` and settle it against ``prompt + completion`` tokens."""
        ...

    async def tokens_consumed(self) -> int:
        """Tokens recorded so far."""
        ...
