"""Gate an ``OpenAI`` or ``AsyncOpenAI`` client: ``guard(client, tokens=..., ...)``.

Every ``chat.completions.create`` and ``responses.create`` of the client (and their ``parse``
and ``stream`` helpers: structured outputs, streams with events) then takes its budgets
before the request is sent (or raises ``BudgetExhausted`` and sends nothing), and settles after
it: at the usage the response reports; everything refunded when the API answers with an error
status (it was not billed); at the estimate when the request went out but no usage came back (a
stream cut or closed early, a lost connection: it was billed). Chat streams are asked for their
usage (``stream_options={"include_usage": True}``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import openai

from costbound.integrations._attempts import observe_http
from costbound.integrations._clients import guard_copies
from costbound.integrations._gate import Gate, GateOptions
from costbound.integrations._streams import Sdk, gated_async, gated_sync

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["guard"]

_C = TypeVar("_C", openai.OpenAI, openai.AsyncOpenAI)


def guard(
    client: _C,
    **options: Unpack[GateOptions],
) -> _C:
    """Gate ``client``'s chat completions and responses; return the same client.

    ``create``, ``parse`` and ``stream`` of ``client.chat.completions`` and of
    ``client.responses`` (and of their twins in ``client.beta``) are gated, and so are those of
    the client's copies
    (``with_options``, ``copy``) and views (``with_raw_response``, ``with_streaming_response``),
    on the same budgets. The SDK's unset markers (``openai.NOT_GIVEN``, ``openai.omit``) count
    as arguments not given.
    """
    return _install(client, Gate(**options))


#: The classes of the SDK's "not given" markers (``NOT_GIVEN``, ``not_given``, ``omit``).
_UNSET = (openai.NotGiven, openai.Omit)


def _install(client: _C, gate: Gate) -> _C:
    """Gate ``client`` (a new one, or a copy of a guarded one) on ``gate``."""
    if isinstance(client, openai.AsyncOpenAI):
        wrap, stream = gated_async, openai.AsyncStream
    else:
        wrap, stream = gated_sync, openai.Stream
    sdk = Sdk(stream, _LastUsage, _usage_in, _UNSET, observed=observe_http(client))
    # ``create`` and ``parse`` each send their own request; the ``stream`` helpers send theirs
    # through ``create``, so they are gated with it. ``client.beta`` has resources of its own
    # for the same endpoints (older SDKs, and some frameworks, call them there).
    beta = getattr(client, "beta", None)
    for resource, request in (
        (client.chat.completions, _chat_request),
        (client.responses, _responses_request),
        (getattr(getattr(beta, "chat", None), "completions", None), _chat_request),
        (getattr(beta, "responses", None), _responses_request),
    ):
        if resource is None:
            continue
        for name in ("create", "parse"):
            if hasattr(resource, name):  # an older SDK may lack parse
                setattr(resource, name, wrap(gate, sdk, getattr(resource, name), request))
    _gate_posts(client, gate, sdk, wrap)
    guard_copies(client, lambda copy: _install(copy, gate))
    return client


def _gate_posts(client: Any, gate: Gate, sdk: Sdk, wrap: Callable[..., Any]) -> None:  # noqa: ANN401
    """Gate ``client.post`` to the gated endpoints.

    Some frameworks send these requests with the client's own ``post``, past its resources
    (LiteLLM does). A resource's own call does not gate twice (``_streams``: one gate a call).
    """
    post = client.post
    gated = {
        path: wrap(gate, sdk, post, _body_request(read), _body_model)
        for path, read in _ROUTES.items()
    }

    @functools.wraps(post)
    def routed(path: str, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the SDK's types
        target = gated.get(path)
        return post(path, *args, **kwargs) if target is None else target(path, *args, **kwargs)

    client.post = routed


def _body_request(
    read: Callable[[dict[str, Any]], tuple[object, int | None]],
) -> Callable[[dict[str, Any]], tuple[object, int | None]]:
    """Read a request from ``post``'s ``body`` (a copy: what the gate adds goes in it)."""

    def request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
        body = kwargs.get("body")
        if not isinstance(body, Mapping):
            return "", None
        kwargs["body"] = copied = dict(body)
        return read(copied)

    return request


def _body_model(kwargs: dict[str, Any]) -> str | None:
    body = kwargs.get("body")
    model = body.get("model") if isinstance(body, Mapping) else None
    return model if isinstance(model, str) else None


def _chat_request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
    """Read a chat request's prompt and output bound; ask a stream for its usage."""
    if kwargs.get("stream"):
        options = dict(kwargs.get("stream_options") or {})
        options["include_usage"] = True
        kwargs["stream_options"] = options
    bound = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens")
    return _listed(kwargs, "messages"), bound


def _responses_request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
    prompt: list[object] = []
    if kwargs.get("instructions"):
        prompt.append({"content": kwargs["instructions"]})
    given = kwargs.get("input", "")
    if isinstance(given, str):
        prompt.append({"content": given})
    else:
        prompt.extend(_listed(kwargs, "input"))
    return prompt, kwargs.get("max_output_tokens")


#: The endpoints gated, by the path ``client.post`` is given, and how to read their bodies.
_ROUTES = {"/chat/completions": _chat_request, "/responses": _responses_request}


def _listed(kwargs: dict[str, Any], name: str) -> list[Any]:
    """Read the request's ``name`` argument as a list, and put the list back.

    An iterator can be read only once: the SDK must get what the estimate read.
    """
    value = kwargs.get(name)
    if value is None:
        return []
    listed = value if isinstance(value, list) else list(value)
    kwargs[name] = listed
    return listed


#: The Responses stream events that end a response, each carrying the response with its usage
#: (an incomplete one stopped at ``max_output_tokens``, say, was billed all the same).
_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _usage_in(item: object) -> object | None:
    """Find the usage a response, a chat chunk or a Responses stream event carries, if any."""
    usage: object | None = getattr(item, "usage", None)
    if usage is not None:
        return usage
    if getattr(item, "type", None) in _ENDS:
        completed: object | None = getattr(getattr(item, "response", None), "usage", None)
        return completed
    return None


class _LastUsage:
    """A chat stream's usage comes in its last chunk; a Responses stream's with its end."""

    def __init__(self) -> None:
        self.usage: object | None = None

    def see(self, item: object) -> None:
        usage = _usage_in(item)
        if usage is not None:
            self.usage = usage
