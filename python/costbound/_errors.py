"""The exceptions costbound raises for infrastructure failures."""

from __future__ import annotations

__all__ = ["BackendError", "BudgetError"]


class BudgetError(Exception):
    """Base class of the errors a budget backend raises.

    A soft denial (``False`` / ``None``) is never an error; argument mistakes raise the
    builtin ``TypeError`` / ``ValueError``.
    """


class BackendError(BudgetError):
    """The backing store could not serve the call (network, timeout, script error).

    ``str()`` always starts with ``"budget backend error: "``::

        >>> str(BackendError("connection refused"))
        'budget backend error: connection refused'
    """

    PREFIX = "budget backend error: "

    def __str__(self) -> str:
        message = super().__str__()
        return message if message.startswith(self.PREFIX) else self.PREFIX + message
