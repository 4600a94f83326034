"""Gate every model request of a pydantic-ai agent with a ``BudgetCapability``.

``Agent(model, capabilities=[BudgetCapability(tokens=..., ...)])``.

pydantic-ai's own usage limits count one run at a time, so concurrent runs overspend together;
a ``BudgetCapability`` takes the shared budgets before each model request of ``run``,
``run_sync`` and ``run_stream`` (or raises ``BudgetExhausted``, which reaches the caller, and the
request is not made) and settles at the request's reported usage; an error status from the
provider refunds everything; any other failure, and a response whose final usage never
arrived, is charged at the estimate.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pydantic_ai.capabilities import AbstractCapability

from costbound.integrations._attempts import observe_client, recording
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
        # The model's SDK client (OpenAI, Anthropic, google-genai) is observed, to tell whether a
        # failed request can have reached the provider; other models' errors speak for
        # themselves (ModelHTTPError carries the provider's status_code).
        client = getattr(request_context.model, "client", None)
        observed = client is not None and observe_client(client)
        with recording() if observed else contextlib.nullcontext() as attempts:
            try:
                response = await handler(request_context)
            except BaseException as error:
                # pydantic-ai may send a streamed request from another task, where no attempt is
                # recorded here: only attempts that were seen tell anything.
                await passed.fail(
                    error, attempts if attempts is not None and attempts.made else None
                )
                raise
        if _finished(response):
            await passed.settle(response.usage)
        else:
            # The request was billed but its final usage never arrived (a stream cut short, or
            # one that reported none): it is charged at the estimate.
            await passed.settle_at_estimate()
        return response


#: Models that run in the process (pydantic-ai's ``FunctionModel`` and ``TestModel``): they
#: count their usage themselves and set no finish reason.
_LOCAL_PROVIDERS = frozenset({None, "function", "test"})


def _finished(response: Any) -> bool:  # noqa: ANN401 - pydantic-ai's ModelResponse
    """Whether ``response`` carries its request's final usage.

    It does not when pydantic-ai reports the usage unmeasured or zero (a stream whose provider
    never sent its usage), when the stream stopped before its end (``state`` ``"incomplete"`` or
    ``"interrupted"``), or when a provider's response has no finish reason: a provider's stream
    that ends early without an error (Anthropic's with no ``message_delta``, say) keeps the
    partial usage of its first event, and only its missing finish reason tells it apart.
    """
    usage = response.usage
    if getattr(usage, "unmeasured_requests", 0) or not (
        getattr(usage, "input_tokens", 0) or getattr(usage, "output_tokens", 0)
    ):
        return False
    if getattr(response, "state", "complete") in ("incomplete", "interrupted"):
        return False
    return response.finish_reason is not None or response.provider_name in _LOCAL_PROVIDERS
