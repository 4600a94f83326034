"""Usage, estimates and dollars (spec section 11): ``Usage``, ``usage_of``, ``estimate_tokens``,
``usd``, ``BudgetExhausted`` and ``costbound.prices``.

``usage_of`` is checked here on plain dicts and objects of each provider's shape, with the
figures worked out by hand from each provider's convention (what its prompt count includes).
"""

from __future__ import annotations

import importlib.util
import math
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace

import costbound
import pytest
from costbound import BudgetError, BudgetExhausted, Usage, estimate_tokens, usage_of, usd
from costbound.prices import Price, PriceTable, price_of

# --- Usage --------------------------------------------------------------------------------------


def test_usage_total_and_validation():
    u = Usage(prompt=120, completion=80, cached=100, cache_write=10, reasoning=30)
    assert u.total == 200
    assert Usage().total == 0
    with pytest.raises(TypeError, match="prompt"):
        Usage(prompt=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cached"):
        Usage(cached=True)
    with pytest.raises(ValueError, match="completion"):
        Usage(completion=-1)


# --- usd ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dollars", "micro"),
    [
        (12.5, 12_500_000),
        (50, 50_000_000),
        (0.1, 100_000),  # read as the decimal 0.1, not 0.1000000000000000055...
        (0.000001, 1),
        ("19.99", 19_990_000),
        (Decimal("0.0000005"), 0),  # half to even
        (Decimal("0.0000015"), 2),
        (Fraction(1, 3), 333_333),
        (0, 0),
    ],
)
def test_usd_is_micro_dollars(dollars, micro):
    assert usd(dollars) == micro
    assert type(usd(dollars)) is int


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("twelve", ValueError),
        (True, TypeError),
        (None, TypeError),
        ([1], TypeError),
    ],
)
def test_usd_refuses_what_is_not_an_amount(bad, error):
    with pytest.raises(error, match="dollars"):
        usd(bad)


def test_a_dollar_budget_is_a_token_budget_in_micro_dollars():
    dollars = costbound.AtomicTokenBudget(usd(50))
    r = dollars.try_reserve_tokens_sync(usd(0.02))
    dollars.record_usage_sync(r, usd(0.0125), 0)
    assert dollars.consumed == 12_500
    assert dollars.available == 50_000_000 - 12_500


# --- BudgetExhausted ----------------------------------------------------------------------------


def test_budget_exhausted_says_which_budget_and_how_much():
    budget = costbound.AtomicBudget(1)
    error = BudgetExhausted(budget, 5)
    assert error.budget is budget
    assert error.amount == 5
    assert "5" in str(error)
    assert isinstance(error, Exception)
    assert not isinstance(error, BudgetError)  # the budget said no; nothing failed


# --- estimate_tokens ----------------------------------------------------------------------------


def test_a_plain_string_with_no_safety_is_exactly_tokenizer_plus_max_output():
    def words(text: str) -> int:
        return len(text.split())

    text = "the quick brown fox jumps over the lazy dog"
    assert estimate_tokens(text, max_output_tokens=512, tokenizer=words, safety=1.0) == 9 + 512
    assert estimate_tokens(text, max_output_tokens=0, tokenizer=words, safety=1.0) == 9


def test_without_a_tokenizer_a_token_is_four_characters_rounded_up():
    assert estimate_tokens("abcde", max_output_tokens=0, safety=1.0) == 2
    assert estimate_tokens("", max_output_tokens=7, safety=1.0) == 7
    # times the safety margin, rounded up: 2 x 1.25 = 2.5 -> 3
    assert estimate_tokens("abcde", max_output_tokens=0) == 3
    assert estimate_tokens("x" * 400, max_output_tokens=100) == math.ceil(100 * 1.25) + 100


def test_chat_messages_count_their_text_and_a_few_tokens_each():
    messages = [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 40}, {"type": "image_url"}]},
        SimpleNamespace(role="assistant", content="z" * 40),  # an SDK message object
        {"role": "user", "content": None},
    ]
    per_message = 4
    expected_input = math.ceil(30 * 1.25) + per_message * 4
    assert estimate_tokens(messages, max_output_tokens=256) == expected_input + 256
    # a user tokenizer sees each message's text
    seen: list[str] = []

    def tokenizer(text: str) -> int:
        seen.append(text)
        return 10

    assert estimate_tokens(messages, max_output_tokens=0, tokenizer=tokenizer, safety=1.0) == (
        40 + per_message * 4
    )
    assert seen == ["x" * 40, "y" * 40, "z" * 40, ""]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_output_tokens": -1}, ValueError, "max_output_tokens"),
        ({"max_output_tokens": 1.5}, TypeError, "max_output_tokens"),
        ({"max_output_tokens": 1, "safety": -0.5}, ValueError, "safety"),
        ({"max_output_tokens": 1, "safety": "1"}, TypeError, "safety"),
        ({"max_output_tokens": 1, "tokenizer": lambda text: -1}, ValueError, "tokenizer"),
        ({"max_output_tokens": 1, "tokenizer": lambda text: 1.5}, TypeError, "tokenizer"),
    ],
)
def test_estimate_tokens_refuses_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        estimate_tokens("hello", **kwargs)


def test_estimate_tokens_refuses_a_prompt_it_cannot_read():
    with pytest.raises(TypeError, match="prompt"):
        estimate_tokens(42, max_output_tokens=1)


# --- usage_of, one shape per provider --------------------------------------------------------

OPENAI_CHAT = {
    "prompt_tokens": 1_200,  # includes the cached 1,000
    "completion_tokens": 300,  # includes the reasoning 200
    "total_tokens": 1_500,
    "prompt_tokens_details": {"cached_tokens": 1_000, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 200, "audio_tokens": 0},
}
OPENAI_RESPONSES = {
    "input_tokens": 1_200,
    "input_tokens_details": {"cached_tokens": 1_000},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 200},
    "total_tokens": 1_500,
}
ANTHROPIC = {
    "input_tokens": 50,  # excludes the cache reads and writes
    "cache_read_input_tokens": 1_000,
    "cache_creation_input_tokens": 150,
    "output_tokens": 300,
}
GEMINI = {
    "prompt_token_count": 1_200,  # includes the cached content
    "cached_content_token_count": 1_000,
    "candidates_token_count": 100,  # excludes the thoughts
    "thoughts_token_count": 200,
    "tool_use_prompt_token_count": 20,
    "total_token_count": 1_520,
}
LANGCHAIN = {
    "input_tokens": 1_200,
    "output_tokens": 300,
    "total_tokens": 1_500,
    "input_token_details": {"cache_read": 1_000, "cache_creation": 150},
    "output_token_details": {"reasoning": 200},
}
PYDANTIC_AI = {
    "input_tokens": 1_200,
    "cache_read_tokens": 1_000,
    "cache_write_tokens": 150,
    "output_tokens": 300,
    "details": {"reasoning_tokens": 200},
}
LITELLM_FROM_ANTHROPIC = {  # LiteLLM's OpenAI-shaped Usage, with Anthropic's cache counts
    "prompt_tokens": 1_200,
    "completion_tokens": 300,
    "total_tokens": 1_500,
    "prompt_tokens_details": None,
    "cache_read_input_tokens": 1_000,
    "cache_creation_input_tokens": 150,
}

SHAPES = {
    "openai-chat": (OPENAI_CHAT, Usage(1_200, 300, cached=1_000, reasoning=200)),
    "openai-responses": (OPENAI_RESPONSES, Usage(1_200, 300, cached=1_000, reasoning=200)),
    "anthropic": (ANTHROPIC, Usage(1_200, 300, cached=1_000, cache_write=150)),
    "gemini": (GEMINI, Usage(1_220, 300, cached=1_000, reasoning=200)),
    "langchain": (LANGCHAIN, Usage(1_200, 300, cached=1_000, cache_write=150, reasoning=200)),
    "pydantic-ai": (PYDANTIC_AI, Usage(1_200, 300, cached=1_000, cache_write=150, reasoning=200)),
    "litellm": (LITELLM_FROM_ANTHROPIC, Usage(1_200, 300, cached=1_000, cache_write=150)),
}


def _as_object(value):
    """The same shape as attributes, as an SDK's pydantic model gives them."""
    if isinstance(value, dict):
        return SimpleNamespace(**{key: _as_object(inner) for key, inner in value.items()})
    return value


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("form", ["dict", "object", "response dict", "response object"])
def test_usage_of_reads_each_provider(shape, form):
    usage, expected = SHAPES[shape]
    if form == "object":
        usage = _as_object(usage)
    elif form == "response dict":
        key = "usage_metadata" if shape in {"gemini", "langchain"} else "usage"
        usage = {"id": "r1", key: usage}
    elif form == "response object":
        key = "usage_metadata" if shape in {"gemini", "langchain"} else "usage"
        usage = SimpleNamespace(id="r1", content="hi", **{key: _as_object(usage)})
    assert usage_of(usage) == expected


def test_usage_of_calls_a_usage_method_and_passes_a_usage_through():
    result = SimpleNamespace(usage=lambda: _as_object(PYDANTIC_AI))  # pydantic-ai's older API
    assert usage_of(result).cache_write == 150
    u = Usage(1, 2)
    assert usage_of(u) is u


def test_missing_details_count_as_zero():
    assert usage_of({"prompt_tokens": 5, "completion_tokens": 7}) == Usage(5, 7)
    assert usage_of({"input_tokens": 5, "output_tokens": 7}) == Usage(5, 7)
    assert usage_of({"prompt_token_count": 5, "candidates_token_count": None}) == Usage(5, 0)


@pytest.mark.parametrize("unknown", [{"tokens": 5}, "usage", 42, SimpleNamespace(usage=None)])
def test_usage_of_names_what_it_cannot_read(unknown):
    with pytest.raises(TypeError, match=type(unknown).__name__):
        usage_of(unknown)


def test_usage_of_refuses_negative_counts():
    with pytest.raises(ValueError, match="prompt_tokens"):
        usage_of({"prompt_tokens": -1, "completion_tokens": 0})


# --- price_of -----------------------------------------------------------------------------------

TABLE = PriceTable(
    {
        "my-model": Price(input=0.15, output=0.60, cached_input=0.075),
        "writer": Price(input=3, output=15, cached_input=0.3, cache_write=3.75),
    }
)


def test_price_of_from_a_table_by_hand():
    # 200 fresh input x 0.15 + 1,000 cached x 0.075 + 300 output x 0.60 (USD per million):
    # 30 + 75 + 180 = 285 micro-dollars.
    assert price_of(OPENAI_CHAT, model="my-model", table=TABLE) == 285
    # Anthropic's shape: 50 fresh x 3 + 1,000 read x 0.3 + 150 written x 3.75 + 300 x 15
    # = 150 + 300 + 562.5 + 4,500 = 5,512.5 -> rounded up: 5,513.
    assert price_of(ANTHROPIC, model="writer", table=TABLE) == 5_513
    # no cached price: cached input costs the input price
    assert price_of(Usage(10, 0, cached=10), model="x", table=PriceTable({"x": Price(1, 2)})) == 10
    assert price_of(Usage(), model="my-model", table=TABLE) == 0


def test_price_of_an_unknown_model_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="nope"):
        price_of(OPENAI_CHAT, model="nope", table=TABLE)


def test_prices_refuse_bad_figures():
    with pytest.raises(ValueError, match="input"):
        Price(input=-1, output=1)
    with pytest.raises(TypeError, match="output"):
        Price(input=1, output="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Price"):
        PriceTable({"m": (1, 2)})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "figure",
    [math.inf, -math.inf, math.nan, Decimal("Infinity"), Decimal("-Infinity"), Decimal("NaN")],
    ids=repr,
)
@pytest.mark.parametrize("field", ["input", "output", "cached_input", "cache_write"])
def test_an_infinite_or_nan_price_is_a_value_error_naming_the_field(figure, field):
    # Issue 12 point 11: these raised OverflowError, or a ValueError about Fraction literals.
    figures = {"input": 1, "output": 1, field: figure}
    with pytest.raises(ValueError, match=rf"Price\.{field} must be a finite number >= 0"):
        Price(**figures)


def test_a_huge_but_finite_decimal_price_is_exact():
    # Decimal("1e400") is finite: no float conversion may overflow on the way.
    price = Price(input=Decimal("1e400"), output=0)  # type: ignore[arg-type]
    assert price.micro_dollars(Usage(prompt=1, completion=0)) == 10**400


def test_price_of_from_genai_prices():
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100}
    usage["prompt_tokens_details"] = {"cached_tokens": 200}  # type: ignore[assignment]
    if importlib.util.find_spec("genai_prices") is None:
        # genai-prices needs Python 3.11 or later: the extra is not installed here.
        with pytest.raises(ImportError, match="costbound\\[prices\\]"):
            price_of(usage, model="gpt-4o-mini", provider="openai")
        return
    # gpt-4o-mini: 0.15 input, 0.075 cached input, 0.60 output USD per million tokens:
    # 800 x 0.15 + 200 x 0.075 + 100 x 0.60 = 120 + 15 + 60 = 195 micro-dollars.
    assert price_of(usage, model="gpt-4o-mini", provider="openai") == 195
    with pytest.raises(ValueError, match="no-such-model"):
        price_of(usage, model="no-such-model", provider="openai")


# --- usage_of on the installed SDKs' own types ------------------------------------------------
# openai and anthropic install on every supported Python; google-genai and pydantic-ai need 3.11.

SDK_MODULES = {
    "openai": (3, 10),
    "anthropic": (3, 10),
    "google.genai": (3, 11),
    "pydantic_ai": (3, 11),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_the_sdks_are_installed_where_they_support_this_python():
    import sys

    expected = {m for m, since in SDK_MODULES.items() if sys.version_info[:2] >= since}
    assert {m for m in SDK_MODULES if _installed(m)} >= expected


def _openai_cases():
    from openai.types.chat import ChatCompletion
    from openai.types.completion_usage import CompletionUsage
    from openai.types.responses import ResponseUsage

    chat = CompletionUsage(
        prompt_tokens=1_200,
        completion_tokens=300,
        total_tokens=1_500,
        prompt_tokens_details={"cached_tokens": 1_000, "cache_write_tokens": 50},
        completion_tokens_details={"reasoning_tokens": 200},
    )
    completion = ChatCompletion.model_validate(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hi"},
                }
            ],
            "usage": chat.model_dump(),
        }
    )
    responses = ResponseUsage(
        input_tokens=1_200,
        input_tokens_details={"cached_tokens": 1_000, "cache_write_tokens": 50},
        output_tokens=300,
        output_tokens_details={"reasoning_tokens": 200},
        total_tokens=1_500,
    )
    expected = Usage(1_200, 300, cached=1_000, cache_write=50, reasoning=200)
    return [(chat, expected), (completion, expected), (responses, expected)]


def _anthropic_cases():
    from anthropic.types import Message
    from anthropic.types import Usage as AnthropicUsage

    usage = AnthropicUsage(
        input_tokens=50,
        cache_read_input_tokens=1_000,
        cache_creation_input_tokens=150,
        output_tokens=300,
        output_tokens_details={"thinking_tokens": 200},
    )
    message = Message.model_validate(
        {
            "id": "m1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 50, "output_tokens": 300, "cache_read_input_tokens": 1_000},
        }
    )
    return [
        (usage, Usage(1_200, 300, cached=1_000, cache_write=150, reasoning=200)),
        (message, Usage(1_050, 300, cached=1_000)),
    ]


def _genai_cases():
    from google.genai import types

    metadata = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=1_200,
        cached_content_token_count=1_000,
        candidates_token_count=100,
        thoughts_token_count=200,
        tool_use_prompt_token_count=20,
        total_token_count=1_520,
    )
    expected = Usage(1_220, 300, cached=1_000, reasoning=200)
    return [
        (metadata, expected),
        (types.GenerateContentResponse(usage_metadata=metadata), expected),
    ]


def _pydantic_ai_cases():
    from pydantic_ai.usage import RequestUsage, RunUsage

    counts = {
        "input_tokens": 1_200,
        "cache_read_tokens": 1_000,
        "cache_write_tokens": 150,
        "output_tokens": 300,
        "output_reasoning_tokens": 200,
    }
    expected = Usage(1_200, 300, cached=1_000, cache_write=150, reasoning=200)
    return [(RequestUsage(**counts), expected), (RunUsage(requests=2, **counts), expected)]


def _langchain_cases():
    from langchain_core.messages import AIMessage

    metadata = {
        "input_tokens": 1_200,
        "output_tokens": 300,
        "total_tokens": 1_500,
        "input_token_details": {"cache_read": 1_000, "cache_creation": 150},
        "output_token_details": {"reasoning": 200},
    }
    message = AIMessage(content="hi", usage_metadata=metadata)
    expected = Usage(1_200, 300, cached=1_000, cache_write=150, reasoning=200)
    return [(message, expected), (message.usage_metadata, expected)]


def _litellm_cases():
    import warnings

    with warnings.catch_warnings():  # LiteLLM's types trip a pydantic warning on import
        warnings.simplefilter("ignore", UserWarning)
        from litellm.types.utils import Usage as LiteLLMUsage

    # LiteLLM's OpenAI-shaped Usage after proxying Anthropic: prompt_tokens includes the cache.
    usage = LiteLLMUsage(
        prompt_tokens=1_200,
        completion_tokens=300,
        total_tokens=1_500,
        prompt_tokens_details={"cached_tokens": 1_000},
        completion_tokens_details={"reasoning_tokens": 200},
        cache_creation_input_tokens=150,
        cache_read_input_tokens=1_000,
    )
    return [(usage, Usage(1_200, 300, cached=1_000, cache_write=150, reasoning=200))]


SDK_CASES = {
    "litellm": _litellm_cases,
    "langchain_core": _langchain_cases,
    "openai": _openai_cases,
    "anthropic": _anthropic_cases,
    "google.genai": _genai_cases,
    "pydantic_ai": _pydantic_ai_cases,
}


@pytest.mark.parametrize(
    "module", [m for m in SDK_CASES if _installed(m)], ids=[m for m in SDK_CASES if _installed(m)]
)
def test_usage_of_reads_the_sdk_types(module):
    for usage, expected in SDK_CASES[module]():
        assert usage_of(usage) == expected, type(usage).__name__


def test_importing_costbound_imports_no_sdk():
    import subprocess
    import sys

    code = (
        "import sys, costbound, costbound.prices; "
        "print(sorted(m for m in ('openai', 'anthropic', 'google.genai', 'pydantic_ai', "
        "'langchain_core', 'litellm', 'genai_prices', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


INTEGRATIONS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google_genai": "google.genai",
    "pydantic_ai": "pydantic_ai.capabilities",
    "langchain": "langchain.agents.middleware, langchain_core.callbacks",
    "litellm": "litellm.integrations.custom_logger",
}


@pytest.mark.parametrize("name", sorted(INTEGRATIONS))
def test_each_integration_imports_only_its_own_sdk(name):
    # Importing costbound.integrations.<name> loads nothing beyond what importing its SDK
    # (the parts it uses) loads by itself, and costbound's own modules.
    import importlib.util
    import subprocess
    import sys

    sdk = INTEGRATIONS[name]
    try:
        found = importlib.util.find_spec(sdk.split(",")[0].strip()) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if not found:
        pytest.skip(f"{sdk} is not installed on this Python")  # pydantic-ai on 3.10
    code = (
        "import os, sys; os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'; "
        "import costbound, costbound.prices; "
        f"import {sdk}; before = set(sys.modules); "
        f"import costbound.integrations.{name}; "
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith('costbound')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
