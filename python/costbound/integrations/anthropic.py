"""Gate an ``Anthropic`` or ``AsyncAnthropic`` client: ``guard(client, tokens=..., ...)``.

``messages.create`` (streamed or not), ``messages.parse`` and ``messages.stream`` (and the same
three of ``beta.messages``) then take their budgets before the
request goes out (or raise ``BudgetExhausted`` and send nothing) and settle after it: at the
usage the message reports (input, cache reads and writes, output); everything refunded on an
error status; at the estimate when the stream ended before its final usage.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anthropic

from costbound.integrations._attempts import observe_http
from costbound.integrations._clients import guard_copies, without_unset
from costbound.integrations._gate import Gate, GateOptions, Pass
from costbound.integrations._streams import (
    Sdk,
    attempts_of,
    gated_async,
    gated_sync,
    settle,
    settle_sync,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["guard"]

_C = TypeVar("_C", anthropic.Anthropic, anthropic.AsyncAnthropic)


def guard(
    client: _C,
    **options: Unpack[GateOptions],
) -> _C:
    """Gate ``client``'s messages (``create``, ``parse``, ``stream``); return the same client.

    ``client.beta.messages`` is gated as well, and so are the client's copies
    (``with_options``, ``copy``) and views (``with_raw_response``, ``with_streaming_response``),
    on the same budgets. The SDK's unset markers (``anthropic.NOT_GIVEN``, ``anthropic.omit``)
    count as arguments not given.
    """
    return _install(client, Gate(**options))


#: The classes of the SDK's "not given" markers (``NOT_GIVEN``, ``not_given``, ``omit``).
_UNSET = (anthropic.NotGiven, anthropic.Omit)


def _install(client: _C, gate: Gate) -> _C:
    """Gate ``client`` (a new one, or a copy of a guarded one) on ``gate``."""
    observed = observe_http(client)
    if isinstance(client, anthropic.AsyncAnthropic):
        sdk = Sdk(anthropic.AsyncStream, _MessageUsage, _usage_in, _UNSET, observed)
        wrap, manager = gated_async, _AsyncStreamManager
    else:
        sdk = Sdk(anthropic.Stream, _MessageUsage, _usage_in, _UNSET, observed)
        wrap, manager = gated_sync, _StreamManager
    # ``create`` and ``parse`` (structured outputs) each send their own request; ``stream`` is
    # gated when its block is entered. The beta namespace has the same three.
    # (Older SDKs lack some of them: what is there is gated.)
    for messages in (client.messages, getattr(client.beta, "messages", None)):
        for name in ("create", "parse"):
            if hasattr(messages, name):
                setattr(messages, name, wrap(gate, sdk, getattr(messages, name), _request))
        if hasattr(messages, "stream"):
            messages.stream = _gated_stream(gate, sdk, messages.stream, manager)  # type: ignore[union-attr,method-assign]
    guard_copies(client, lambda copy: _install(copy, gate))
    return client


def _request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
    """Read a request's prompt (the system prompt and the messages) and ``max_tokens``."""
    prompt: list[object] = []
    system = kwargs.get("system")
    if isinstance(system, str):
        prompt.append({"content": system})
    elif system:
        prompt.append({"content": list(system)})
    messages = kwargs.get("messages") or []
    if not isinstance(messages, list):  # an iterator is read only once: keep what was read
        messages = kwargs["messages"] = list(messages)
    prompt.extend(messages)
    return prompt, kwargs.get("max_tokens")


def _usage_in(message: object) -> object | None:
    usage: object | None = getattr(message, "usage", None)
    return usage


def _fields(usage: object) -> dict[str, Any]:
    dump = getattr(usage, "model_dump", None)
    fields: dict[str, Any] = dump() if callable(dump) else dict(usage or {})  # type: ignore[call-overload]
    return fields


class _MessageUsage:
    """Gather a raw event stream's usage, complete at ``message_stop``.

    The input counts come with ``message_start``, the output's running total with each
    ``message_delta``.
    """

    def __init__(self) -> None:
        self._counts: dict[str, Any] = {}
        self.usage: object | None = None

    def see(self, event: object) -> None:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            self._counts = _fields(getattr(getattr(event, "message", None), "usage", None))
        elif kind == "message_delta":
            delta = _fields(getattr(event, "usage", None))
            self._counts.update({key: value for key, value in delta.items() if value is not None})
        elif kind == "message_stop":
            self.usage = dict(self._counts)


def _final_usage(stream: object) -> object | None:
    """Read the usage of a ``MessageStream`` that got its final message delta, else None."""
    try:
        snapshot = stream.current_message_snapshot  # type: ignore[attr-defined]
    except (AssertionError, AttributeError):  # no message started: nothing was reported
        return None
    if getattr(snapshot, "stop_reason", None) is None:
        return None  # cut before the final delta: its output count is not final
    return _usage_in(snapshot)


def _gated_stream(
    gate: Gate,
    sdk: Sdk,
    stream: Callable[..., Any],
    manager: type[_StreamManager | _AsyncStreamManager],
) -> Callable[..., Any]:
    def gated(**given: object) -> _StreamManager | _AsyncStreamManager:
        kwargs = without_unset(given, _UNSET)
        _request(kwargs)  # reads an iterator of messages into a list before the SDK keeps it
        return manager(gate, sdk, stream, kwargs)

    return gated


class _StreamManager:
    """Gate ``messages.stream(...)``: take the budgets on entering, settle on leaving.

    The request goes out when the block is entered, and the SDK's stream manager is made only
    then, once the budgets are taken (an async one prepares its request when it is made).
    """

    def __init__(
        self, gate: Gate, sdk: Sdk, stream: Callable[..., Any], kwargs: dict[str, Any]
    ) -> None:
        self._gate = gate
        self._sdk = sdk
        self._open = stream
        self._manager: Any = None
        self._kwargs = kwargs
        self._passed: Pass | None = None
        self._stream: Any = None

    def __enter__(self) -> Any:  # noqa: ANN401 - the SDK's MessageStream
        prompt, bound = _request(self._kwargs)
        passed = self._gate.enter_sync(
            model=self._kwargs.get("model"), prompt=prompt, max_output_tokens=bound
        )
        with attempts_of(self._sdk) as attempts:
            try:
                self._manager = self._open(**self._kwargs)
                self._stream = self._manager.__enter__()
            except BaseException as error:
                passed.fail_sync(error, attempts)
                raise
        self._passed = passed
        return self._stream

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._manager.__exit__(kind, value, traceback)
        finally:
            if self._passed is not None:
                settle_sync(self._passed, _final_usage(self._stream))


class _AsyncStreamManager:
    """Gate ``messages.stream(...)`` of an async client, as :class:`_StreamManager` does."""

    def __init__(
        self, gate: Gate, sdk: Sdk, stream: Callable[..., Any], kwargs: dict[str, Any]
    ) -> None:
        self._gate = gate
        self._sdk = sdk
        self._open = stream
        self._manager: Any = None
        self._kwargs = kwargs
        self._passed: Pass | None = None
        self._stream: Any = None

    async def __aenter__(self) -> Any:  # noqa: ANN401 - the SDK's AsyncMessageStream
        prompt, bound = _request(self._kwargs)
        passed = await self._gate.enter(
            model=self._kwargs.get("model"), prompt=prompt, max_output_tokens=bound
        )
        with attempts_of(self._sdk) as attempts:
            try:
                self._manager = self._open(**self._kwargs)
                self._stream = await self._manager.__aenter__()
            except BaseException as error:
                await passed.fail(error, attempts)
                raise
        self._passed = passed
        return self._stream

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self._manager.__aexit__(kind, value, traceback)
        finally:
            if self._passed is not None:
                await settle(self._passed, _final_usage(self._stream))
