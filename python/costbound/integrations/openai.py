"""Gate an ``OpenAI`` or ``AsyncOpenAI`` client: ``guard(client, tokens=..., ...)``.

Every ``chat.completions.create`` and ``responses.create`` of the client then takes its budgets
before the request is sent (or raises ``BudgetExhausted`` and sends nothing), and settles after
it: at the usage the response reports; everything refunded when the API answers with an error
status (it was not billed); at the estimate when the request went out but no usage came back (a
stream cut or closed early, a lost connection: it was billed). Chat streams are asked for their
usage (``stream_options={"include_usage": True}``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeVar

import openai

from costbound._protocols import BudgetGuard, TokenBudget
from costbound.integrations._gate import Estimator, Gate, Pass
from costbound.prices import PriceTable

__all__ = ["guard"]

_C = TypeVar("_C", openai.OpenAI, openai.AsyncOpenAI)


def guard(
    client: _C,
    *,
    tokens: TokenBudget | None = None,
    dollars: TokenBudget | None = None,
    guards: Mapping[BudgetGuard, int] | None = None,
    wait: float = 0.0,
    max_output_tokens: int | None = None,
    estimator: Estimator | None = None,
    prices: PriceTable | None = None,
) -> _C:
    """Gate ``client``'s chat completions and responses; return the same client."""
    gate = Gate(
        tokens=tokens,
        dollars=dollars,
        guards=guards,
        wait=wait,
        max_output_tokens=max_output_tokens,
        estimator=estimator,
        prices=prices,
    )
    wrap = _wrap_async if isinstance(client, openai.AsyncOpenAI) else _wrap_sync
    completions = client.chat.completions
    completions.create = wrap(gate, completions.create, _chat_request)  # type: ignore[method-assign]
    responses = client.responses
    responses.create = wrap(gate, responses.create, _responses_request)  # type: ignore[method-assign]
    return client


def _chat_request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
    """Read a chat request's prompt and output bound; ask a stream for its usage."""
    if kwargs.get("stream"):
        options = dict(kwargs.get("stream_options") or {})
        options["include_usage"] = True
        kwargs["stream_options"] = options
    bound = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens")
    return kwargs.get("messages", []), bound


def _responses_request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
    prompt: list[object] = []
    if kwargs.get("instructions"):
        prompt.append({"content": kwargs["instructions"]})
    given = kwargs.get("input", "")
    if isinstance(given, str):
        prompt.append({"content": given})
    else:
        prompt.extend(given)
    return prompt, kwargs.get("max_output_tokens")


def _usage_in(item: object) -> object | None:
    """Find the usage a response, a chat chunk or a Responses stream event carries, if any."""
    usage: object | None = getattr(item, "usage", None)
    if usage is not None:
        return usage
    if getattr(item, "type", None) == "response.completed":
        completed: object | None = getattr(getattr(item, "response", None), "usage", None)
        return completed
    return None


_Request = Callable[[dict[str, Any]], tuple[object, "int | None"]]


def _wrap_sync(gate: Gate, create: Callable[..., Any], request: _Request) -> Callable[..., Any]:
    @functools.wraps(create)
    def gated(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the SDK's own types
        prompt, bound = request(kwargs)
        passed = gate.enter_sync(model=kwargs.get("model"), prompt=prompt, max_output_tokens=bound)
        try:
            response = create(*args, **kwargs)
        except openai.APIStatusError:
            passed.refund_sync()  # an error status: not billed
            raise
        except BaseException:
            passed.settle_at_estimate_sync()  # it may have gone out: counted as billed
            raise
        if isinstance(response, openai.Stream):
            return _SyncStream(response, passed)
        _settle_sync(passed, _usage_in(response))
        return response

    return gated


def _wrap_async(gate: Gate, create: Callable[..., Any], request: _Request) -> Callable[..., Any]:
    @functools.wraps(create)
    async def gated(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the SDK's own types
        prompt, bound = request(kwargs)
        passed = await gate.enter(model=kwargs.get("model"), prompt=prompt, max_output_tokens=bound)
        try:
            response = await create(*args, **kwargs)
        except openai.APIStatusError:
            await passed.refund()
            raise
        except BaseException:
            await passed.settle_at_estimate()
            raise
        if isinstance(response, openai.AsyncStream):
            return _AsyncStream(response, passed)
        await _settle(passed, _usage_in(response))
        return response

    return gated


def _settle_sync(passed: Pass, usage: object | None) -> None:
    if usage is None:
        passed.settle_at_estimate_sync()
    else:
        passed.settle_sync(usage)


async def _settle(passed: Pass, usage: object | None) -> None:
    if usage is None:
        await passed.settle_at_estimate()
    else:
        await passed.settle(usage)


class _SyncStream:
    """The SDK's stream, watched for its usage; settled when it ends, fails or is closed."""

    def __init__(self, stream: openai.Stream[Any], passed: Pass) -> None:
        self._stream = stream
        self._passed = passed
        self._usage: object | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self._stream:
                usage = _usage_in(item)
                if usage is not None:
                    self._usage = usage
                yield item
        finally:
            _settle_sync(self._passed, self._usage)

    def close(self) -> None:
        """Close the stream; what was not reported is charged at the estimate."""
        try:
            self._stream.close()
        finally:
            _settle_sync(self._passed, self._usage)

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the SDK stream's attributes
        return getattr(self._stream, name)


class _AsyncStream:
    """The async twin of :class:`_SyncStream`."""

    def __init__(self, stream: openai.AsyncStream[Any], passed: Pass) -> None:
        self._stream = stream
        self._passed = passed
        self._usage: object | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for item in self._stream:
                usage = _usage_in(item)
                if usage is not None:
                    self._usage = usage
                yield item
        finally:
            await _settle(self._passed, self._usage)

    async def close(self) -> None:
        """Close the stream; what was not reported is charged at the estimate."""
        try:
            await self._stream.close()
        finally:
            await _settle(self._passed, self._usage)

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the SDK stream's attributes
        return getattr(self._stream, name)
