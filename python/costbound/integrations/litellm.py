"""Gate LiteLLM calls: ``litellm.callbacks = [BudgetLogger(tokens=...)]``.

LiteLLM swallows exceptions in most of its hooks; ``async_pre_call_deployment_hook`` is the one
that can stop a call, so the budgets are taken there (a denial raises ``BudgetExhausted`` out of
``acompletion`` and no request is made). The call settles in ``async_log_success_event`` at the
response's usage, or in ``async_log_failure_event``: refunded after an error status, at the
estimate after any other failure. Calls are matched by ``kwargs["litellm_call_id"]``.

LiteLLM runs no hook that can stop a synchronous ``completion()``, so only ``acompletion`` is
gated. A call that reaches the provider without passing the gate (a synchronous one, say) is
not charged either; the logger warns of it (``RuntimeWarning``) rather than let it pass unseen.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from costbound.integrations._gate import Gate, GateOptions, Pass
from costbound.integrations._streams import settle

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BudgetLogger"]


class BudgetLogger(CustomLogger):
    """A LiteLLM callback that gates every async completion on costbound budgets.

    The arguments are a :class:`costbound.integrations.Gate`'s.
    """

    def __init__(
        self,
        **options: Unpack[GateOptions],
    ) -> None:
        super().__init__()
        self.gate = Gate(**options)
        self._passes: dict[str, Pass] = {}

    async def async_pre_call_deployment_hook(
        self,
        kwargs: dict[str, Any],
        call_type: object,
    ) -> dict[str, Any] | None:
        """Take the budgets before the request (a denial stops the call)."""
        bound = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens")
        passed = await self.gate.enter(
            model=kwargs.get("model"),
            prompt=kwargs.get("messages") or kwargs.get("input") or "",
            max_output_tokens=bound if isinstance(bound, int) else None,
        )
        call_id = str(kwargs.get("litellm_call_id"))
        self._passes[call_id] = passed
        # A stream its consumer stops early gets no success or failure event; its logging record
        # then dies with it, and the call is charged at the estimate.
        record = kwargs.get("litellm_logging_obj")
        if record is not None:
            with contextlib.suppress(TypeError):  # not weakly referenceable: no such stand-in
                weakref.finalize(record, self._abandoned, call_id)
        return None

    def log_pre_api_call(
        self,
        model: object,
        messages: object,
        kwargs: dict[str, Any],
    ) -> None:
        """Warn of a call about to be sent that the gate never saw (LiteLLM cannot stop it)."""
        if str(kwargs.get("litellm_call_id")) not in self._passes:
            warnings.warn(
                f"costbound's BudgetLogger did not gate this LiteLLM call to {model!r}: LiteLLM "
                "runs no hook that can stop a synchronous completion(), so it is neither gated "
                "nor charged; use acompletion()",
                RuntimeWarning,
                stacklevel=2,
            )

    def _abandoned(self, call_id: str) -> None:
        """Charge the estimate of a call whose record went without an event settling it."""
        passed = self._passes.pop(call_id, None)
        if passed is not None:
            passed.abandon()  # this runs in the garbage collector

    def _pass(self, kwargs: Mapping[str, Any]) -> Pass | None:
        return self._passes.pop(str(kwargs.get("litellm_call_id")), None)

    async def async_log_success_event(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,  # noqa: ANN401 - LiteLLM's response
        start_time: object,
        end_time: object,
    ) -> None:
        """Settle at the response's usage (at the estimate when it reports none)."""
        passed = self._pass(kwargs)
        if passed is not None:
            await settle(passed, getattr(response_obj, "usage", None))

    async def async_log_failure_event(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,  # noqa: ANN401 - LiteLLM's response
        start_time: object,
        end_time: object,
    ) -> None:
        """Refund after an error status; charge the estimate after any other failure."""
        passed = self._pass(kwargs)
        if passed is None:
            return
        await passed.fail(kwargs.get("exception") or Exception("no exception given"))
