"""Gate LangChain chat models: ``BudgetMiddleware`` for ``create_agent``, or a callback handler.

``create_agent(model, middleware=[BudgetMiddleware(tokens=...)])`` gates every model call of
the agent. ``model.invoke(..., config={"callbacks": [BudgetCallbackHandler(tokens=...)]})``
gates any chat model; it sets ``raise_error = True``, without which LangChain would only log
the denial and make the call anyway. Each call settles at the ``usage_metadata`` of the message
it returns; an answer from LangChain's LLM cache, and an error with a status of 400 and above,
refund everything; any other failure, or a result without usage, is charged at the estimate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain.agents.middleware import AgentMiddleware
from langchain_core.callbacks import BaseCallbackHandler

from costbound.integrations._gate import Gate, GateOptions, Pass
from costbound.integrations._streams import settle, settle_sync

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BudgetCallbackHandler", "BudgetMiddleware"]


def _model_name(model: object) -> str | None:
    for attribute in ("model_name", "model", "model_id"):
        name = getattr(model, attribute, None)
        if isinstance(name, str):
            return name
    return None


def _usage_of_messages(messages: object) -> object | None:
    """Find the usage metadata of the last message that has one."""
    if not isinstance(messages, (list, tuple)):
        messages = [messages]
    for message in reversed(messages):
        usage: object | None = getattr(message, "usage_metadata", None)
        if usage:
            return usage
    return None


def _from_cache(messages: object) -> bool:
    """Whether LangChain answered from its LLM cache (no request was made, nothing billed).

    langchain_core marks a message it takes from the cache: it adds ``"total_cost": 0`` to the
    cached usage metadata (which otherwise repeats the usage of the call that filled the cache).
    """
    if not isinstance(messages, (list, tuple)):
        messages = [messages]
    for message in messages:
        usage = getattr(message, "usage_metadata", None)
        if isinstance(usage, Mapping) and usage.get("total_cost", None) == 0:
            return True
    return False


def _settle_sync(passed: Pass, messages: object) -> None:
    """Settle at the messages' usage; refund what LangChain answered from its cache."""
    if _from_cache(messages):
        passed.refund_sync()
    else:
        settle_sync(passed, _usage_of_messages(messages))


async def _settle(passed: Pass, messages: object) -> None:
    """Do what :func:`_settle_sync` does, with the budgets' async methods."""
    if _from_cache(messages):
        await passed.refund()
    else:
        await settle(passed, _usage_of_messages(messages))


class BudgetMiddleware(AgentMiddleware[Any, Any]):
    """Agent middleware (``create_agent(..., middleware=[...])``) gating every model call.

    The arguments are a :class:`costbound.integrations.Gate`'s; the model's ``max_tokens`` is
    the output bound when it sets one.
    """

    def __init__(
        self,
        **options: Unpack[GateOptions],
    ) -> None:
        super().__init__()
        self.gate = Gate(**options)

    @staticmethod
    def _request(request: Any) -> dict[str, Any]:  # noqa: ANN401 - LangChain's ModelRequest
        prompt = list(request.messages)
        if getattr(request, "system_message", None) is not None:
            prompt.insert(0, request.system_message)
        bound = getattr(request.model, "max_tokens", None)
        return {
            "model": _model_name(request.model),
            "prompt": prompt,
            "max_output_tokens": bound if isinstance(bound, int) else None,
        }

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:  # noqa: ANN401
        """Take the budgets, call the model, settle."""
        passed = self.gate.enter_sync(**self._request(request))
        try:
            response = handler(request)
        except BaseException as error:
            passed.fail_sync(error)
            raise
        _settle_sync(passed, getattr(response, "result", response))
        return response

    async def awrap_model_call(
        self,
        request: Any,  # noqa: ANN401 - LangChain's ModelRequest
        handler: Callable[[Any], Awaitable[Any]],
    ) -> Any:  # noqa: ANN401 - LangChain's ModelResponse
        """Do what :meth:`wrap_model_call` does, for async agents."""
        passed = await self.gate.enter(**self._request(request))
        try:
            response = await handler(request)
        except BaseException as error:
            await passed.fail(error)
            raise
        await _settle(passed, getattr(response, "result", response))
        return response


class BudgetCallbackHandler(BaseCallbackHandler):
    """A callback handler gating every chat-model call it sees (``raise_error = True``).

    Its methods are synchronous, so LangChain honours ``raise_error`` for ``invoke`` and for
    ``ainvoke`` alike (for an async call it runs them on its executor, where a ``wait`` blocks
    only that thread).
    """

    raise_error = True

    def __init__(
        self,
        **options: Unpack[GateOptions],
    ) -> None:
        self.gate = Gate(**options)
        self._passes: dict[UUID, Pass] = {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[Any]],
        *,
        run_id: UUID,
        **kwargs: Any,  # noqa: ANN401 - LangChain's callback keywords
    ) -> None:
        """Take the budgets before the call (a denial stops it: ``raise_error``)."""
        params = kwargs.get("invocation_params") or {}
        metadata = kwargs.get("metadata") or {}
        model = params.get("model") or params.get("model_name") or metadata.get("ls_model_name")
        bound = params.get("max_tokens") or params.get("max_completion_tokens")
        prompt = [message for batch in messages for message in batch]
        self._passes[run_id] = self.gate.enter_sync(
            model=model, prompt=prompt, max_output_tokens=bound if isinstance(bound, int) else None
        )

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:  # noqa: ANN401
        """Settle at the usage of the message the call returned."""
        passed = self._passes.pop(run_id, None)
        if passed is None:
            return
        generations = [g for batch in getattr(response, "generations", []) for g in batch]
        _settle_sync(passed, [getattr(g, "message", None) for g in generations])

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        **kwargs: Any,  # noqa: ANN401 - LangChain's callback keywords
    ) -> None:
        """Refund after an error status; charge the estimate after any other failure."""
        passed = self._passes.pop(run_id, None)
        if passed is None:
            return
        passed.fail_sync(error)
