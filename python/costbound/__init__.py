"""costbound: lock-free budget gates for LLM agents (unit costs, tokens, dollars)."""

from costbound._atomic import AtomicBudget, AtomicTokenBudget
from costbound._errors import BackendError, BudgetError
from costbound._protocols import BudgetGuard, TokenBudget
from costbound._reservation import TokenRefund, TokenReservation

__all__ = [
    "AtomicBudget",
    "AtomicTokenBudget",
    "BackendError",
    "BudgetError",
    "BudgetGuard",
    "TokenBudget",
    "TokenRefund",
    "TokenReservation",
]
