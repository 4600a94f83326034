"""Gate a google-genai ``Client``: ``guard(client, tokens=..., ...)``.

``client.models.generate_content`` and ``generate_content_stream``, and the same two of
``client.aio.models``, then take their budgets before the request is sent (or raise
``BudgetExhausted`` and send nothing) and settle after it: at the response's
``usage_metadata`` (thoughts and tool-use prompt tokens included); everything refunded when the
API answers with an error status; at the estimate when the request went out but no final usage
came back (a stream that ended before a candidate's finish reason, a lost connection). The
output bound is the request's ``config.max_output_tokens``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from google import genai

from costbound.integrations._attempts import observe_genai
from costbound.integrations._gate import Gate, GateOptions
from costbound.integrations._streams import Sdk, gated_async, gated_sync

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["guard"]


def guard(
    client: genai.Client,
    **options: Unpack[GateOptions],
) -> genai.Client:
    """Gate ``client``'s content generation, blocking and async; return the same client."""
    gate = Gate(**options)
    # Each attempt of the SDK's retries is observed, to tell whether a failed call may have
    # reached the API.
    observed = observe_genai(client, _status)
    blocking = Sdk(types.GeneratorType, _StreamUsage, _usage_in, observed=observed)
    asynchronous = Sdk(types.AsyncGeneratorType, _StreamUsage, _usage_in, observed=observed)
    models, aio_models = client.models, client.aio.models
    for name in ("generate_content", "generate_content_stream"):
        setattr(models, name, gated_sync(gate, blocking, getattr(models, name), _request))
        setattr(
            aio_models, name, gated_async(gate, asynchronous, getattr(aio_models, name), _request)
        )
    return client


def _status(error: BaseException) -> int | None:
    """Read the HTTP status of an answered error: ``APIError.code``.

    Its ``response`` may be aiohttp's, which has no ``status_code``.
    """
    code = getattr(error, "code", None) if isinstance(error, genai.errors.APIError) else None
    return code if isinstance(code, int) else None


def _request(kwargs: dict[str, Any]) -> tuple[object, int | None]:
    """Read a request's prompt (system instruction and contents) and ``max_output_tokens``."""
    config = kwargs.get("config")
    if isinstance(config, Mapping):
        system, bound = config.get("system_instruction"), config.get("max_output_tokens")
    else:
        system = getattr(config, "system_instruction", None)
        bound = getattr(config, "max_output_tokens", None)
    contents = kwargs.get("contents")
    if isinstance(contents, Iterator):  # read only once: the SDK gets what the estimate read
        contents = kwargs["contents"] = list(contents)
    if contents is None:
        items: list[object] = []
    elif isinstance(contents, (list, tuple)):
        items = list(contents)
    else:
        items = [contents]  # one string, dict, Content or Part
    prompt = [_message(item) for item in ([system] if system is not None else []) + items]
    return prompt, bound if isinstance(bound, int) else None


def _message(item: object) -> object:
    """One piece of the prompt as a message whose ``content`` the estimate reads."""
    if isinstance(item, Mapping):  # {"role": ..., "parts": [{"text": ...}]}
        return {"content": item.get("parts", item.get("text"))}
    return {"content": item}  # a string, a Content, a Part, or a list of them


def _usage_in(response: object) -> object | None:
    usage: object | None = getattr(response, "usage_metadata", None)
    return usage


class _StreamUsage:
    """A stream's usage: the last ``usage_metadata`` seen, once a candidate has finished.

    Every chunk carries the running counts; they are final only with a finish reason.
    """

    def __init__(self) -> None:
        self.usage: object | None = None
        self._last: object | None = None
        self._finished = False

    def see(self, chunk: object) -> None:
        for candidate in getattr(chunk, "candidates", None) or ():
            if getattr(candidate, "finish_reason", None) is not None:
                self._finished = True
        metadata = _usage_in(chunk)
        if metadata is not None:
            self._last = metadata
        if self._finished:
            self.usage = self._last
