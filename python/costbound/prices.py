"""What a model call cost, in micro-dollars: from your own table, or from genai-prices.

``price_of(usage, model=..., table=...)`` prices the prompt (less its cached and cache-write
tokens), the cached, the cache-write and the completion tokens at the table's USD per million
tokens, and rounds up to the micro-dollar. Without a table it asks genai-prices (the extra
``costbound[prices]``), which works offline from its bundled data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from costbound._usage import Usage, usage_of

__all__ = ["Price", "PriceTable", "price_of"]


def _rate(value: object, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, Fraction)):
        raise TypeError(f"Price.{name} must be a number of USD, not {type(value).__name__}")
    # Checked before any conversion: Fraction raises OverflowError on an infinite Decimal, and a
    # float's or Decimal's infinity or NaN has no exact value to convert.
    if isinstance(value, Decimal):
        finite = value.is_finite()
    else:
        finite = not isinstance(value, float) or math.isfinite(value)
    if not finite or value < 0:
        raise ValueError(f"Price.{name} must be a finite number >= 0, got {value!r}")
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


@dataclass(frozen=True)
class Price:
    """USD per million tokens; cached and cache-write input cost ``input`` when not given."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input", "cache_write"):
            value = getattr(self, name)
            if value is not None:
                _rate(value, name)

    def micro_dollars(self, usage: Usage) -> int:
        """Price ``usage`` in micro-dollars, rounded up (exact decimal arithmetic)."""
        input_rate = _rate(self.input, "input")
        cached, write = self.cached_input, self.cache_write
        cached_rate = input_rate if cached is None else _rate(cached, "cached_input")
        write_rate = input_rate if write is None else _rate(write, "cache_write")
        fresh = max(usage.prompt - usage.cached - usage.cache_write, 0)
        # tokens x (USD per million tokens) is micro-dollars.
        total = (
            fresh * input_rate
            + usage.cached * cached_rate
            + usage.cache_write * write_rate
            + usage.completion * _rate(self.output, "output")
        )
        return math.ceil(total)


class PriceTable(Mapping[str, Price]):
    """Your prices by model name: ``PriceTable({"my-model": Price(input=0.15, output=0.6)})``."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        for model, price in prices.items():
            if not isinstance(model, str):
                raise TypeError(f"a model name must be a str, not {type(model).__name__}")
            if not isinstance(price, Price):
                raise TypeError(
                    f"the price of {model!r} must be a Price, not {type(price).__name__}"
                )
        self._prices = dict(prices)

    def __getitem__(self, model: str) -> Price:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({self._prices!r})"


def price_of(
    usage: object,
    *,
    model: str,
    provider: str | None = None,
    table: PriceTable | None = None,
) -> int:
    """Price a call in micro-dollars, rounded up.

    ``usage`` is a :class:`~costbound.Usage` or anything ``usage_of`` reads. With ``table`` the
    model's :class:`Price` is used; without, genai-prices (``pip install 'costbound[prices]'``).
    An unknown model is a ``ValueError`` naming it.
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, not {type(model).__name__}")
    used = usage_of(usage)
    if table is not None:
        price = table.get(model)
        if price is None:
            raise ValueError(f"the price table has no model {model!r}")
        return price.micro_dollars(used)
    return _genai_price(used, model, provider)


def _genai_price(used: Usage, model: str, provider: str | None) -> int:
    try:
        import genai_prices  # noqa: PLC0415 - optional, and only when asked
    except ImportError as error:
        raise ImportError(
            "price_of without a table needs genai-prices: pip install 'costbound[prices]'"
        ) from error
    counted = genai_prices.Usage(
        input_tokens=used.prompt,
        cache_read_tokens=used.cached,
        cache_write_tokens=used.cache_write,
        output_tokens=used.completion,
    )
    try:
        calculated = genai_prices.calc_price(counted, model, provider_id=provider)
    except LookupError as error:
        raise ValueError(f"genai-prices knows no model {model!r}: {error}") from error
    return math.ceil(Fraction(calculated.total_price) * 1_000_000)
