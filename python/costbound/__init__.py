"""costbound: lock-free budget gates for LLM agents (unit costs, tokens, dollars)."""

from costbound._admit import Admission, Ticket, admit, admit_blocking, try_admit
from costbound._atomic import AtomicBudget, AtomicTokenBudget, Permit, TokenRequest
from costbound._errors import BackendError, BudgetError
from costbound._protocols import BudgetGuard, TokenBudget
from costbound._reservation import TokenRefund, TokenReservation
from costbound._usage import BudgetExhausted, Usage, estimate_tokens, usage_of, usd

__all__ = [
    "Admission",
    "AtomicBudget",
    "AtomicTokenBudget",
    "BackendError",
    "BudgetError",
    "BudgetExhausted",
    "BudgetGuard",
    "Permit",
    "Ticket",
    "TokenBudget",
    "TokenRefund",
    "TokenRequest",
    "TokenReservation",
    "Usage",
    "admit",
    "admit_blocking",
    "estimate_tokens",
    "try_admit",
    "usage_of",
    "usd",
]
