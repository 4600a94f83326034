"""Gates for LLM stacks: reserve before every model request, settle after it.

Each integration module imports only its own SDK; importing this package imports none. They
share :class:`costbound.integrations.Gate`, which holds the budgets a request needs (tokens,
micro-dollars, guards such as a concurrency slot) and settles each request once: at the
provider's reported usage on success, nothing on an error response (it was not billed), and at
its estimate when usage never arrived (a cut stream: it was billed).
"""

from costbound.integrations._gate import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    Estimator,
    Gate,
    GateOptions,
    Pass,
)

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "Estimator", "Gate", "GateOptions", "Pass"]
