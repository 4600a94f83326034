"""Gates for LLM stacks: reserve before every model request, settle after it.

Each integration module imports only its own SDK; importing this package imports none. They
share :class:`costbound.integrations.Gate`, which holds the budgets a request needs (tokens,
micro-dollars, guards such as a concurrency slot) and settles each request once: at the
provider's reported usage on success; nothing on an error response (it was not billed), nor
when none of its attempts can have reached the provider (a bad argument, a refused
connection); and at its estimate when usage never arrived (a cut or abandoned stream, a
connection lost after sending: it was billed). A settlement that fails after the provider
answered warns (``RuntimeWarning``) and never costs the caller the answer. Stored guards
(Redis) are taken as leases, so a call that never gives its slot back loses it only until the
lease ends.
"""

from costbound.integrations._gate import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    Estimator,
    Gate,
    GateOptions,
    Pass,
)

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "Estimator", "Gate", "GateOptions", "Pass"]
