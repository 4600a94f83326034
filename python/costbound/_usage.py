"""What a model call used, in one convention; estimates before the call; dollars as integers.

``usage_of`` reads the usage objects of the common LLM SDKs (and plain dicts of the same shape)
without importing any SDK: it recognises each by its fields. Everything is included, as the
providers bill it: ``prompt`` counts cached and cache-write tokens, ``completion`` counts
reasoning tokens.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction

__all__ = ["BudgetExhausted", "Usage", "estimate_tokens", "usage_of", "usd"]

#: Tokens added per chat message for its role and framing (OpenAI documents 3 to 4).
PER_MESSAGE = 4


@dataclass(frozen=True)
class Usage:
    """The tokens one model call used, everything included.

    ``prompt`` includes ``cached`` (read from a prompt cache) and ``cache_write`` (written to
    one); ``completion`` includes ``reasoning``. ``total`` is ``prompt + completion``: what a
    token budget's ``record_usage`` charges.
    """

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt", "completion", "cached", "cache_write", "reasoning"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Usage.{name} must be an int, not {type(value).__name__}")
            if value < 0:
                raise ValueError(f"Usage.{name} must be >= 0, got {value}")

    @property
    def total(self) -> int:
        """``prompt + completion``."""
        return self.prompt + self.completion


class BudgetExhausted(Exception):  # noqa: N818 - the name the contract gives it
    """A gate could not have its budgets within its ``wait``: the request was not sent.

    ``budget`` is the budget that denied, ``amount`` what was asked of it. It is not a
    ``BudgetError``: nothing failed, the budget said no.
    """

    def __init__(self, budget: object, amount: int, message: str | None = None) -> None:
        self.budget = budget
        self.amount = amount
        super().__init__(message or f"no room for {amount} in {budget!r}")


def usd(dollars: float | Decimal | Fraction | str) -> int:
    """Dollars as micro-dollars, the unit of a dollar budget: ``usd(12.5) == 12_500_000``.

    A float is read as its shortest decimal form (``usd(0.1) == 100_000``); the result is
    rounded to the nearest micro-dollar.
    """
    if isinstance(dollars, bool) or not isinstance(dollars, (int, float, Decimal, Fraction, str)):
        raise TypeError(f"dollars must be a number, not {type(dollars).__name__}")
    try:
        exact = (
            Decimal(dollars.numerator) / Decimal(dollars.denominator)
            if isinstance(dollars, Fraction)
            else Decimal(repr(dollars) if isinstance(dollars, float) else dollars)
        )
    except InvalidOperation:
        raise ValueError(f"dollars must be a number, got {dollars!r}") from None
    if not exact.is_finite() or exact < 0:
        raise ValueError(f"dollars must be a finite amount >= 0, got {dollars!r}")
    return int((exact * 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


def _count(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def _text_of(content: object) -> str:
    """Gather the text of a message's content: a string, or a list of parts that carry text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return _text_of(content.get("text", content.get("content")))
    if isinstance(content, (list, tuple)):
        return "\n".join(filter(None, (_text_of(part) for part in content)))
    for attribute in ("text", "content", "parts"):
        inner = getattr(content, attribute, None)
        if inner is not None and inner is not content:
            return _text_of(inner)
    return ""


def estimate_tokens(
    prompt: object,
    *,
    max_output_tokens: int,
    tokenizer: Callable[[str], int] | None = None,
    safety: float = 1.25,
) -> int:
    """Estimate the tokens a call will use, to size its reservation.

    ``prompt`` is a string or a list of chat messages (dicts, or SDK message objects with a
    ``content``). The input is ``tokenizer(text)`` (without one, ``ceil(len(text) / 4)``) times
    ``safety``, rounded up, plus a few tokens per message; ``max_output_tokens`` is added, the
    only hard bound on the output. ``record_usage`` then makes the account exact.
    """
    max_output = _count(max_output_tokens, "max_output_tokens")
    if isinstance(safety, bool) or not isinstance(safety, (int, float)):
        raise TypeError(f"safety must be a number, not {type(safety).__name__}")
    if not math.isfinite(safety) or safety < 0:
        raise ValueError(f"safety must be a finite number >= 0, got {safety}")
    if isinstance(prompt, str):
        texts, framing = [prompt], 0
    elif isinstance(prompt, (list, tuple)):
        texts = [
            _text_of(message.get("content") if isinstance(message, Mapping) else message)
            for message in prompt
        ]
        framing = PER_MESSAGE * len(texts)
    else:
        raise TypeError(
            f"prompt must be a str or a list of chat messages, not {type(prompt).__name__}"
        )
    count = tokenizer if tokenizer is not None else _quarter_length
    counted = sum(_count(count(text), "tokenizer(text)") for text in texts)
    return math.ceil(Fraction(counted) * Fraction(safety)) + framing + max_output


def _quarter_length(text: str) -> int:
    return -(-len(text) // 4)


# --- usage_of ----------------------------------------------------------------------------------


def _get(source: object, name: str) -> object:
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _int(source: object, name: str) -> int:
    value = _get(source, name)
    if value is None:
        return 0
    return _count(value, name)


def _has(source: object, *names: str) -> bool:
    if isinstance(source, Mapping):
        return all(name in source for name in names)
    return all(hasattr(source, name) for name in names)


def _from_usage(usage: object) -> Usage | None:  # noqa: PLR0911 - one return per provider
    """Read one provider's usage object (or dict), or None if its shape is not known."""
    # google-genai usage metadata: candidates exclude thoughts; tool-use prompts are input.
    if _has(usage, "prompt_token_count") or _has(usage, "candidates_token_count"):
        thoughts = _int(usage, "thoughts_token_count")
        return Usage(
            prompt=_int(usage, "prompt_token_count") + _int(usage, "tool_use_prompt_token_count"),
            completion=_int(usage, "candidates_token_count") + thoughts,
            cached=_int(usage, "cached_content_token_count"),
            reasoning=thoughts,
        )
    # OpenAI chat CompletionUsage, and LiteLLM's Usage (the same fields, with Anthropic's
    # cache counts beside them when it proxied Anthropic; LiteLLM includes them in prompt).
    if _has(usage, "prompt_tokens", "completion_tokens"):
        prompt_details = _get(usage, "prompt_tokens_details")
        completion_details = _get(usage, "completion_tokens_details")
        cached = written = 0
        if prompt_details is not None:
            cached = _int(prompt_details, "cached_tokens")
            written = _int(prompt_details, "cache_write_tokens")
        return Usage(
            prompt=_int(usage, "prompt_tokens"),
            completion=_int(usage, "completion_tokens"),
            cached=cached or _int(usage, "cache_read_input_tokens"),
            cache_write=written or _int(usage, "cache_creation_input_tokens"),
            reasoning=(
                _int(completion_details, "reasoning_tokens")
                if completion_details is not None
                else 0
            ),
        )
    if not _has(usage, "input_tokens", "output_tokens"):
        return None
    # Anthropic Usage: input_tokens excludes cache reads and writes, so they are added. (It has
    # output_tokens_details too, so it is told from OpenAI's Responses by its cache fields.)
    if _has(usage, "cache_read_input_tokens") or _has(usage, "cache_creation_input_tokens"):
        return _anthropic(usage)
    # LangChain UsageMetadata: input includes cache reads and writes.
    if _has(usage, "input_token_details") or _has(usage, "output_token_details"):
        inputs = _get(usage, "input_token_details") or {}
        outputs = _get(usage, "output_token_details") or {}
        return Usage(
            prompt=_int(usage, "input_tokens"),
            completion=_int(usage, "output_tokens"),
            cached=_int(inputs, "cache_read"),
            cache_write=_int(inputs, "cache_creation"),
            reasoning=_int(outputs, "reasoning"),
        )
    # OpenAI Responses ResponseUsage: input includes cached, output includes reasoning.
    if _has(usage, "input_tokens_details") or _has(usage, "output_tokens_details"):
        inputs = _get(usage, "input_tokens_details")
        outputs = _get(usage, "output_tokens_details")
        return Usage(
            prompt=_int(usage, "input_tokens"),
            completion=_int(usage, "output_tokens"),
            cached=_int(inputs, "cached_tokens") if inputs is not None else 0,
            cache_write=_int(inputs, "cache_write_tokens") if inputs is not None else 0,
            reasoning=_int(outputs, "reasoning_tokens") if outputs is not None else 0,
        )
    # pydantic-ai RequestUsage / RunUsage: input includes cache reads and writes, output the
    # reasoning.
    if _has(usage, "cache_read_tokens") or _has(usage, "cache_write_tokens"):
        details = _get(usage, "details") or {}
        return Usage(
            prompt=_int(usage, "input_tokens"),
            completion=_int(usage, "output_tokens"),
            cached=_int(usage, "cache_read_tokens"),
            cache_write=_int(usage, "cache_write_tokens"),
            reasoning=_int(usage, "output_reasoning_tokens") or _int(details, "reasoning_tokens"),
        )
    return _anthropic(usage)  # input and output only: every convention agrees


def _anthropic(usage: object) -> Usage:
    read = _int(usage, "cache_read_input_tokens")
    write = _int(usage, "cache_creation_input_tokens")
    details = _get(usage, "output_tokens_details")
    return Usage(
        prompt=_int(usage, "input_tokens") + read + write,
        completion=_int(usage, "output_tokens"),  # includes the thinking tokens
        cached=read,
        cache_write=write,
        reasoning=_int(details, "thinking_tokens") if details is not None else 0,
    )


def usage_of(source: object) -> Usage:
    """Read what a model call used from a response, its usage object, or a plain dict.

    Knows OpenAI chat and Responses usage, Anthropic ``Usage``, google-genai usage metadata,
    LiteLLM ``Usage``, pydantic-ai ``RequestUsage`` / ``RunUsage`` and LangChain
    ``UsageMetadata``, and a response or dict that carries one (``usage``,
    ``usage_metadata``). Anything else is a ``TypeError`` naming its type.
    """
    if isinstance(source, Usage):
        return source
    found = _from_usage(source)
    if found is not None:
        return found
    for attribute in ("usage", "usage_metadata"):
        inner = _get(source, attribute)
        if callable(inner) and not isinstance(source, Mapping):
            inner = inner()  # pydantic-ai's run results have a usage() method
        if inner is not None and inner is not source:
            found = _from_usage(inner)
            if found is not None:
                return found
    raise TypeError(f"usage_of cannot read the usage of a {type(source).__name__}")
