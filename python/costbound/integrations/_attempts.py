"""Whether a failed call can have reached the provider: its SDK's HTTP attempts, observed.

An SDK call that fails may have sent nothing (a bad keyword argument raises before any request;
a refused connection or a failed DNS lookup fails before a byte of the request goes out) or may
have reached the provider (a connection lost after sending, a timeout waiting for the answer),
and the SDK's own retries make several attempts of which the final error tells only the last.

So a guarded client's sends are observed: each attempt of the SDK's retry loop (the http
client's ``send`` for OpenAI and Anthropic, google-genai's per-attempt request) is recorded in
the :class:`Attempts` of the gated call that made it (a context variable: the attempt runs in
that call's thread or task). A failed call is then billed only if one of its attempts may have
reached the provider:

- an answer with a status below 400 did (the failure came after it: billed);
- an answer with an error status did not bill (the provider refused it);
- a failure while connecting (``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``, aiohttp's
  ``ClientConnectorError``, a refused connection, a DNS failure) sent nothing;
- any other failure (a read or write error, a read timeout, a cancellation) may have.

A call with no attempt at all sent nothing, unless its error shows a transport failure that no
attempt recorded (an http client the observation does not reach): then the error alone decides,
as for the gates whose SDK calls are not observed (:func:`costbound.integrations._gate.billed`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import socket
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

__all__ = [
    "Attempts",
    "chain",
    "connect_failure",
    "observe",
    "observe_client",
    "observe_genai",
    "observe_http",
    "recording",
    "transport_failure",
]

_MARK = "_costbound_observed"


class Attempts:
    """The HTTP attempts one gated call made, and whether one may have reached the provider."""

    __slots__ = ("made", "outer", "reached")

    def __init__(self, outer: Attempts | None) -> None:
        self.made = 0
        self.reached = False
        self.outer = outer  # a gated call around this one sees its attempts too

    def answered(self, status: int | None) -> None:
        """Record an attempt that got an answer (``status``: its HTTP status, when known)."""
        self._record(not (isinstance(status, int) and status >= 400))

    def failed(self, error: BaseException, status: int | None = None) -> None:
        """Record an attempt that raised ``error`` (``status``: an error status it carries)."""
        if isinstance(status, int) and status >= 400:
            self._record(False)  # the provider answered with an error status: not billed
        else:
            self._record(not connect_failure(error))

    def _record(self, reached: bool) -> None:
        attempts: Attempts | None = self
        while attempts is not None:
            attempts.made += 1
            attempts.reached = attempts.reached or reached
            attempts = attempts.outer

    def billed(self, error: BaseException) -> bool | None:
        """Whether the call that failed with ``error`` was billed; None when they cannot tell."""
        if self.made == 0 and transport_failure(error):
            return None  # a request went out where no attempt was observed
        return self.reached


_CURRENT: ContextVar[Attempts | None] = ContextVar("costbound_attempts", default=None)


@contextlib.contextmanager
def recording(attempts: Attempts | None = None) -> Iterator[Attempts]:
    """Record the attempts made in this block (this thread, or this task and its children).

    Into ``attempts`` when given (a stream's reads add to the attempts of the call that made
    it), else into new ones.
    """
    if attempts is None:
        attempts = Attempts(_CURRENT.get())
    token = _CURRENT.set(attempts)
    try:
        yield attempts
    finally:
        _CURRENT.reset(token)


def observe(owner: object, name: str, status: Callable[[BaseException], int | None]) -> None:
    """Wrap ``owner.name`` (one attempt: sync or async) so that gated calls record each call.

    Outside a gated call it does nothing more than the method it wraps. ``status`` reads the
    error status an SDK's error carries, if any. Wrapping twice is a no-op.
    """
    method = getattr(owner, name, None)
    if method is None or getattr(method, _MARK, False):
        return
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def observed_async(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the SDK's
            attempts = _CURRENT.get()
            if attempts is None:
                return await method(*args, **kwargs)
            try:
                answer = await method(*args, **kwargs)
            except BaseException as error:
                attempts.failed(error, status(error))
                raise
            attempts.answered(_status_of(answer))
            return answer

        wrapped: Callable[..., Any] = observed_async
    else:

        @functools.wraps(method)
        def observed(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the SDK's
            attempts = _CURRENT.get()
            if attempts is None:
                return method(*args, **kwargs)
            try:
                answer = method(*args, **kwargs)
            except BaseException as error:
                attempts.failed(error, status(error))
                raise
            attempts.answered(_status_of(answer))
            return answer

        wrapped = observed
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)


def observe_http(client: object) -> bool:
    """Observe the sends of an OpenAI or Anthropic client's http client; whether it could.

    Every attempt of their retry loops is one ``send`` of the http client they hold (``_client``,
    shared with the client's copies unless a copy is given its own).
    """
    http = getattr(client, "_client", None)
    if not callable(getattr(http, "send", None)):
        return False
    observe(http, "send", _no_status)
    return True


#: google-genai's one attempt of its retries, blocking and async (on its ``_api_client``).
_GENAI_ATTEMPTS = ("_request_once", "_async_request_once")


def observe_genai(client: object, status: Callable[[BaseException], int | None]) -> bool:
    """Observe each attempt of a google-genai client; whether it could.

    Each attempt of its retries (``HttpRetryOptions``; the one implicit retry over aiohttp
    happens inside an attempt, chained) is one call of ``_request_once`` (blocking) or
    ``_async_request_once``. ``status`` reads an answered error's status.
    """
    api = getattr(client, "_api_client", None)
    if api is None or not all(callable(getattr(api, name, None)) for name in _GENAI_ATTEMPTS):
        return False
    for name in _GENAI_ATTEMPTS:
        observe(api, name, status)
    return True


def observe_client(client: object) -> bool:
    """Observe the attempts of an SDK client of any kind this module knows; whether it could.

    For gates that meet a framework's SDK client without guarding it (pydantic-ai's models):
    observing only records, within a gated call, what the client does anyway.
    """
    return observe_http(client) or observe_genai(client, _genai_status)


def _genai_status(error: BaseException) -> int | None:
    """Read google-genai's ``APIError.code`` (by its class name: its SDK is not imported here)."""
    if not any(cls.__name__ == "APIError" for cls in type(error).__mro__):
        return None
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None


def _no_status(error: BaseException) -> None:
    """Give no status: an http client's ``send`` raises none (the SDK checks it afterwards)."""


def _status_of(answer: object) -> int | None:
    status = getattr(answer, "status_code", None)
    return status if isinstance(status, int) else None


def _connect_types() -> tuple[type[BaseException], ...]:
    """Give the errors of a connection that failed before sending, of the loaded clients."""
    found: list[type[BaseException]] = [ConnectionRefusedError, socket.gaierror]
    for flavour in ("httpx", "httpx2"):  # the http clients' modules, if loaded (never imported)
        module = sys.modules.get(flavour)
        if module is not None:
            found += [module.ConnectError, module.ConnectTimeout, module.PoolTimeout]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        found.append(aiohttp.ClientConnectorError)  # DNS, refused, TLS handshake
    return tuple(found)


def _transport_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [OSError]
    for flavour in ("httpx", "httpx2"):
        module = sys.modules.get(flavour)
        if module is not None:
            found.append(module.TransportError)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        found.append(aiohttp.ClientError)
    return tuple(found)


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and its causes (or contexts), at most 16: a chain may loop.

    As a traceback shows them: a context hidden by ``raise ... from None`` is not followed
    (``BudgetExhausted`` hides the admission timeout, a ``TimeoutError``, that it reports).
    """
    link: BaseException | None = error
    for _ in range(16):  # cut short in case the chain loops
        if link is None:
            return
        yield link
        if link.__cause__ is not None or link.__suppress_context__:
            link = link.__cause__
        else:
            link = link.__context__


def connect_failure(error: BaseException) -> bool:
    """Whether ``error`` failed while connecting, with no other transport failure in its chain.

    An SDK that retries inside one attempt (google-genai over aiohttp) chains the first failure
    to the second: both must have failed while connecting.
    """
    connect, transport = _connect_types(), _transport_types()
    if not isinstance(error, connect):
        return False
    links = chain(error)
    return all(isinstance(link, connect) or not isinstance(link, transport) for link in links)


def transport_failure(error: BaseException) -> bool:
    """Whether a transport error (an http client's, or an ``OSError``) is in ``error``'s chain."""
    transport = _transport_types()
    return any(isinstance(link, transport) for link in chain(error))
