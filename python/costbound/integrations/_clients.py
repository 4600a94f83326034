"""What every guarded SDK client shares: unset markers, and copies that stay guarded.

The SDKs mark an argument left out with their own sentinels (``openai.NOT_GIVEN``,
``openai.omit``, ``anthropic.NOT_GIVEN``, ...), and frameworks pass them for every argument they
leave out (pydantic-ai does on every call). A gate drops them before it reads a request: the
SDK's own default for each of these arguments is that very marker, so a request without them is
the same request.

Frameworks also call copies of a client (``with_options(timeout=...)``, ``copy()``: LangChain,
LiteLLM) and its ``with_raw_response`` / ``with_streaming_response`` views. A copy is a new client
with new resources: it is guarded with the same gate as it is made. The views read the client's
resources when they are first used, so they reach the gated methods; any view the SDK cached
before the client was guarded is dropped, to be made again over the gated resources.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["guard_copies", "without_unset"]

_C = TypeVar("_C")

#: The views the Stainless SDKs (OpenAI, Anthropic) cache on a client on first use.
_CACHED_VIEWS = ("with_raw_response", "with_streaming_response")


def without_unset(kwargs: dict[str, Any], unset: tuple[type, ...]) -> dict[str, Any]:
    """``kwargs`` without the arguments whose value is an instance of one of ``unset``."""
    if not unset:
        return kwargs
    return {name: value for name, value in kwargs.items() if not isinstance(value, unset)}


def guard_copies(client: Any, install: Callable[[Any], Any]) -> None:  # noqa: ANN401 - any SDK client
    """Make ``client.copy`` and ``client.with_options`` give copies passed through ``install``.

    ``install(copy)`` gates the copy with the same gate (and guards its own copies in turn).
    """
    copy: Callable[..., Any] | None = getattr(client, "copy", None)
    if copy is None:  # not a Stainless client: nothing to copy it with
        return

    @functools.wraps(copy)
    def guarded_copy(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the SDK's client
        return install(copy(*args, **kwargs))

    client.copy = guarded_copy
    client.with_options = guarded_copy
    for view in _CACHED_VIEWS:
        vars(client).pop(view, None)
