"""Gate every model request of a pydantic-ai agent with a ``BudgetCapability``.

``Agent(model, capabilities=[BudgetCapability(tokens=..., ...)])``.

pydantic-ai's own usage limits count one run at a time, so concurrent runs overspend together;
a ``BudgetCapability`` takes the shared budgets before each model request of ``run``,
``run_sync`` and ``run_stream`` (or raises ``BudgetExhausted``, which reaches the caller, and the
request is not made) and settles at the request's reported usage; an error status from the
provider refunds everything, any other failure is charged at the estimate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic_ai.capabilities import AbstractCapability

from costbound.integrations._gate import Gate, GateOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BudgetCapability"]


class BudgetCapability(AbstractCapability[Any]):
    """A pydantic-ai capability that gates every model request on costbound budgets.

    The arguments are a :class:`costbound.integrations.Gate`'s. The request's model is
    ``model.model_name``; its output bound is the model settings' ``max_tokens``.
    """

    def __init__(
        self,
        **options: Unpack[GateOptions],
    ) -> None:
        self.gate = Gate(**options)

    async def wrap_model_request(
        self,
        ctx: Any,  # noqa: ANN401 - pydantic-ai's RunContext
        *,
        request_context: Any,  # noqa: ANN401 - pydantic-ai's ModelRequestContext
        handler: Any,  # noqa: ANN401 - pydantic-ai's WrapModelRequestHandler
    ) -> Any:  # noqa: ANN401 - pydantic-ai's ModelResponse
        """Take the budgets, make the request, settle it."""
        settings = request_context.model_settings or {}
        passed = await self.gate.enter(
            model=request_context.model.model_name,
            prompt=request_context.messages,
            max_output_tokens=settings.get("max_tokens"),
        )
        try:
            response = await handler(request_context)
        except BaseException as error:
            await passed.fail(error)  # ModelHTTPError carries the provider's status_code
            raise
        usage = response.usage
        if getattr(usage, "unmeasured_requests", 0) or not (
            getattr(usage, "input_tokens", 0) or getattr(usage, "output_tokens", 0)
        ):
            # The provider reported no usage (a stream without its final usage chunk): the
            # request was billed, so it is charged at the estimate.
            await passed.settle_at_estimate()
        else:
            await passed.settle(usage)
        return response
