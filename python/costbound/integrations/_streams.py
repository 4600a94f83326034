"""One gated SDK call, and a provider's stream watched for its usage.

A gated call enters the gate (or raises ``BudgetExhausted`` and sends nothing), makes the call,
and settles: refunded after an error status, at the estimate after any other failure (the
request may have gone out), at the response's usage on success. A stream is
settled once when it ends, fails or is closed: at its usage if it came, else at the estimate.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from costbound.integrations._attempts import Attempts, recording
from costbound.integrations._clients import without_unset
from costbound.integrations._gate import Gate, Pass

__all__ = [
    "AsyncStream",
    "RawStream",
    "Sdk",
    "SyncStream",
    "Watcher",
    "attempts_of",
    "gated_async",
    "gated_sync",
    "settle",
]

#: Reads a request's keyword arguments: its prompt and its output bound (it may add options).
Request = Callable[[dict[str, Any]], tuple[object, "int | None"]]


class Watcher(Protocol):
    """Sees every item of a stream; ``usage`` is its complete usage, or None until then."""

    usage: object | None

    def see(self, item: object) -> None: ...


@dataclass(frozen=True)
class Sdk:
    """What a gated call needs to know of one SDK."""

    stream: type[Any]  # the class of the streams its calls return
    watcher: Callable[[], Watcher]  # watches one stream for its usage
    usage_in: Callable[[object], object | None]  # the usage of a whole response
    unset: tuple[type, ...] = ()  # the classes of its "not given" markers (openai.NotGiven, ...)
    observed: bool = False  # whether the client's HTTP attempts are observed (``_attempts``)


#: The gates this thread or task is inside a call of: a gated method that the SDK calls from
#: another (``create`` calls the client's ``post``, itself gated for frameworks that call it
#: directly) does not enter the same gate twice. Another gate is entered all the same: a client
#: guarded twice (a copy of an organisation's guarded client, guarded again with a user's
#: budget) is charged by both.
_INSIDE: ContextVar[frozenset[Gate]] = ContextVar("costbound_gates_entered", default=frozenset())


def _model_argument(kwargs: dict[str, Any]) -> str | None:
    model: str | None = kwargs.get("model")
    return model


def gated_sync(
    gate: Gate,
    sdk: Sdk,
    call: Callable[..., Any],
    request: Request,
    model_of: Callable[[dict[str, Any]], str | None] = _model_argument,
) -> Callable[..., Any]:
    """``call`` gated: the budgets first, then the call, then the settlement.

    ``request(kwargs)`` reads the prompt and the output bound, ``model_of(kwargs)`` the model.
    """

    @functools.wraps(call)
    def gated(*args: Any, **given: Any) -> Any:  # noqa: ANN401 - the SDK's own types
        if gate in _INSIDE.get():
            return call(*args, **given)
        kwargs = without_unset(given, sdk.unset)
        prompt, bound = request(kwargs)
        model = model_of(kwargs)
        passed = gate.enter_sync(model=model, prompt=prompt, max_output_tokens=bound)
        with _calling(gate, sdk) as attempts:
            try:
                response = call(*args, **kwargs)
            except BaseException as error:
                passed.fail_sync(error, attempts)
                raise
        if isinstance(response, sdk.stream):
            return SyncStream(response, passed, sdk.watcher(), attempts)
        if kwargs.get("stream") and _raw(response) is not None:
            return RawStream(
                response, sdk, lambda s: SyncStream(s, passed, sdk.watcher(), attempts)
            )
        settle_sync(passed, sdk.usage_in(_parsed(response)))
        return response

    return gated


def gated_async(
    gate: Gate,
    sdk: Sdk,
    call: Callable[..., Any],
    request: Request,
    model_of: Callable[[dict[str, Any]], str | None] = _model_argument,
) -> Callable[..., Any]:
    """Gate an async ``call`` as :func:`gated_sync` gates a blocking one."""

    @functools.wraps(call)
    async def gated(*args: Any, **given: Any) -> Any:  # noqa: ANN401 - the SDK's own types
        if gate in _INSIDE.get():
            return await call(*args, **given)
        kwargs = without_unset(given, sdk.unset)
        prompt, bound = request(kwargs)
        model = model_of(kwargs)
        passed = await gate.enter(model=model, prompt=prompt, max_output_tokens=bound)
        with _calling(gate, sdk) as attempts:
            try:
                response = await call(*args, **kwargs)
            except BaseException as error:
                await passed.fail(error, attempts)
                raise
        if isinstance(response, sdk.stream):
            return AsyncStream(response, passed, sdk.watcher(), attempts)
        if kwargs.get("stream") and _raw(response) is not None:
            return RawStream(
                response, sdk, lambda s: AsyncStream(s, passed, sdk.watcher(), attempts)
            )
        await settle(passed, sdk.usage_in(await _parsed_async(response)))
        return response

    return gated


@contextlib.contextmanager
def _calling(gate: Gate, sdk: Sdk) -> Iterator[Attempts | None]:
    """Mark the block as inside a call of ``gate``, and record its attempts (when observed)."""
    token = _INSIDE.set(_INSIDE.get() | {gate})
    try:
        with attempts_of(sdk) as attempts:
            yield attempts
    finally:
        _INSIDE.reset(token)


def attempts_of(sdk: Sdk) -> contextlib.AbstractContextManager[Attempts | None]:
    """Record a call's HTTP attempts when its SDK's are observed (else None: not known)."""
    return recording() if sdk.observed else contextlib.nullcontext()


def _raw(response: object) -> Callable[[], Any] | None:
    """Return the ``parse`` of a raw response (``with_raw_response``), or None for any other."""
    parse: Callable[[], Any] | None = getattr(response, "parse", None)
    if callable(parse) and getattr(response, "http_request", None) is not None:
        return parse
    return None


def _parsed(response: object) -> object | None:
    """Return what a raw response parses to (the SDKs keep it for the caller), else itself.

    A raw response that does not parse (None) is charged at the estimate. (A raw stream is
    not parsed here: see :class:`RawStream`.)
    """
    parse = _raw(response)
    if parse is None:
        return response
    try:
        parsed: object = parse()
    except Exception:  # the caller's own parse() will say what is wrong
        return None
    return parsed


async def _parsed_async(response: object) -> object | None:
    """Do what :func:`_parsed` does; ``parse()`` of an async client's response is awaited."""
    parsed = _parsed(response)
    if inspect.isawaitable(parsed):
        try:
            parsed = await parsed
        except Exception:  # the caller's own parse() will say what is wrong
            return None
    return parsed


class RawStream:
    """The raw response of a stream (``with_raw_response``, ``with_streaming_response``).

    Its ``parse()`` gives the SDK's stream watched (a :class:`SyncStream` or
    :class:`AsyncStream`, the same one each time), so the call holds its budgets while the
    stream is read and settles at the usage the stream reports, as a stream asked for
    directly does. A raw stream never parsed is charged its estimate when it is dropped (its
    request went out). Everything else is the SDK's raw response's.
    """

    def __init__(
        self,
        raw: Any,  # noqa: ANN401 - the SDK's raw response
        sdk: Sdk,
        watch: Callable[[Any], SyncStream | AsyncStream],
    ) -> None:
        self._raw = raw
        self._sdk = sdk
        self._watch: Callable[[Any], SyncStream | AsyncStream] | None = watch
        self._watched: SyncStream | AsyncStream | None = None

    def parse(self, **options: Any) -> Any:  # noqa: ANN401 - the SDK's types
        """Parse as the SDK does (awaitable when the SDK's is), giving its stream watched."""
        parsed = self._raw.parse(**options)
        if inspect.isawaitable(parsed):
            return self._parse_async(parsed)
        return self._watched_stream(parsed)

    async def _parse_async(self, parsed: Awaitable[Any]) -> Any:  # noqa: ANN401
        return self._watched_stream(await parsed)

    def _watched_stream(self, parsed: object) -> object:
        if not isinstance(parsed, self._sdk.stream):
            return parsed  # parsed as something else (``to=``): the SDK's own
        if self._watch is not None:  # its pass goes with the first watched stream, once
            self._watched, self._watch = self._watch(parsed), None
        return self._watched

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the raw response's attributes
        return getattr(self._raw, name)


def settle_sync(passed: Pass, usage: object | None) -> None:
    """Settle at ``usage``, or at the estimate when none arrived (the request was billed)."""
    if usage is None:
        passed.settle_at_estimate_sync()
    else:
        passed.settle_sync(usage)


async def settle(passed: Pass, usage: object | None) -> None:
    """Do what :func:`settle_sync` does, with the budgets' async methods."""
    if usage is None:
        await passed.settle_at_estimate()
    else:
        await passed.settle(usage)


class _Watched:
    """What both stream wrappers hold: the SDK's stream, its pass, watcher and attempts.

    Some streams send their request only when first read (google-genai's): each read is
    recorded with the attempts of the call that made the stream, and a read that raises is
    settled as a failed call is (:meth:`Pass.fail`). Without observed attempts a failed read
    is charged at the estimate, as a stream cut short is.

    The generator that reads the stream (kept for ``next()`` / ``anext()``) holds the parts,
    never the wrapper: a wrapper that held its generator that held the wrapper would be a cycle,
    and the collector finalises a cycle's objects in any order, so the pass's reservations
    could be refunded (dropped) before the pass charged the abandoned stream its estimate.
    """

    def __init__(
        self,
        stream: Any,  # noqa: ANN401 - the SDK's stream
        passed: Pass,
        watcher: Watcher,
        attempts: Attempts | None = None,
    ) -> None:
        self._stream = stream
        self._passed = passed
        self._watcher = watcher
        self._attempts = attempts

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the SDK stream's attributes
        return getattr(self._stream, name)


class SyncStream(_Watched):
    """The SDK's stream, watched; settled at its usage when it ends, else at the estimate."""

    _items: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return _read_sync(self._stream, self._passed, self._watcher, self._attempts)

    def __next__(self) -> Any:  # noqa: ANN401 - the SDK's items
        """``next(stream)``, as the SDK's own stream allows."""
        if self._items is None:
            self._items = iter(self)
        return next(self._items)

    def close(self) -> None:
        """Close the stream; what was not reported is charged at the estimate."""
        try:
            self._stream.close()
        finally:
            settle_sync(self._passed, self._watcher.usage)

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_Watched):
    """Watch an async stream as :class:`SyncStream` watches a blocking one."""

    _items: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return _read_async(self._stream, self._passed, self._watcher, self._attempts)

    def __anext__(self) -> Awaitable[Any]:
        """``anext(stream)``, as the SDK's own stream allows."""
        if self._items is None:
            self._items = self.__aiter__()
        return self._items.__anext__()

    async def close(self) -> None:
        """Close the stream; what was not reported is charged at the estimate."""
        try:
            # The SDKs' stream classes close with close(), an async generator with aclose().
            closing = getattr(self._stream, "close", None) or self._stream.aclose
            await closing()
        finally:
            await settle(self._passed, self._watcher.usage)

    aclose = close

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _reading(attempts: Attempts | None) -> contextlib.AbstractContextManager[object]:
    """Record the attempts a read makes (one ``next``: never across a ``yield``)."""
    return contextlib.nullcontext() if attempts is None else recording(attempts)


def _read_sync(
    stream: Any,  # noqa: ANN401 - the SDK's stream
    passed: Pass,
    watcher: Watcher,
    attempts: Attempts | None,
) -> Iterator[Any]:
    """Yield ``stream``'s items, watched; settle when it ends, fails or is closed."""
    items = iter(stream)
    try:
        while True:
            try:
                with _reading(attempts):
                    item = next(items)
            except StopIteration:
                return
            except Exception as error:
                if attempts is not None:
                    passed.fail_sync(error, attempts)
                raise
            watcher.see(item)
            passed.keep_alive_sync()
            yield item
    finally:
        settle_sync(passed, watcher.usage)


async def _read_async(
    stream: Any,  # noqa: ANN401 - the SDK's stream
    passed: Pass,
    watcher: Watcher,
    attempts: Attempts | None,
) -> AsyncIterator[Any]:
    """Do what :func:`_read_sync` does for an async stream."""
    items = aiter(stream)
    try:
        while True:
            try:
                with _reading(attempts):
                    item = await anext(items)
            except StopAsyncIteration:
                return
            except Exception as error:
                if attempts is not None:
                    await passed.fail(error, attempts)
                raise
            watcher.see(item)
            await passed.keep_alive()
            yield item
    finally:
        await settle(passed, watcher.usage)
