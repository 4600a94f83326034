"""Guarded OpenAI and Anthropic clients as frameworks use them (spec 11a; issue 12 points 12, 13).

pydantic-ai passes the SDKs' "unset" markers (``openai.omit``, ``NOT_GIVEN``, ...) for every
argument it leaves out: a gate reads them as "not given". LangChain and LiteLLM call copies of a
client (``with_options``, ``copy``) and its ``with_raw_response`` / ``with_streaming_response``
views: every one of them is gated with the same budgets, and a copy whose budget is exhausted
sends nothing.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import anthropic
import openai
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted
from costbound.integrations import anthropic as anthropic_gate
from costbound.integrations import openai as openai_gate

KINDS = ["sync", "async"]
MESSAGES = [{"role": "user", "content": "x" * 400}]  # 100 x 1.25 + 4 = 129 input tokens
DEFAULT_ESTIMATE = 129 + 4096  # no output bound given: the gate's default
OPENAI_USAGE = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
ANTHROPIC_USAGE = {"input_tokens": 30, "output_tokens": 5}


def _flavour(sdk):
    return importlib.import_module(sdk.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])


def chat_json():
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": OPENAI_USAGE,
    }


def chat_sse():
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": OPENAI_USAGE},
    ]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def message_json():
    return {
        "id": "m1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }


class Api:
    """A mock transport's handler for either SDK: records every request body."""

    def __init__(self, sdk) -> None:
        self.sdk = sdk
        self.httpx = _flavour(sdk)
        self.sent: list[dict] = []

    def __call__(self, request):
        body = json.loads(request.content or b"{}")
        self.sent.append(body)
        if self.sdk is anthropic:
            return self.httpx.Response(200, json=message_json())
        if body.get("stream"):
            headers = {"content-type": "text/event-stream"}
            return self.httpx.Response(200, text=chat_sse(), headers=headers)
        return self.httpx.Response(200, json=chat_json())

    def client(self, kind):
        httpx = self.httpx
        transport = httpx.MockTransport(self)
        if self.sdk is openai:
            if kind == "async":
                http = httpx.AsyncClient(transport=transport)
                return openai.AsyncOpenAI(api_key="k", max_retries=0, http_client=http)
            return openai.OpenAI(
                api_key="k", max_retries=0, http_client=httpx.Client(transport=transport)
            )
        if kind == "async":
            http = httpx.AsyncClient(transport=transport)
            return anthropic.AsyncAnthropic(api_key="k", max_retries=0, http_client=http)
        http = httpx.Client(transport=transport)
        return anthropic.Anthropic(api_key="k", max_retries=0, http_client=http)


async def run(kind, call):
    """Run ``call()``: awaited for an async client, on a thread for a sync one."""
    if kind == "async":
        result = call()
        return await result if asyncio.iscoroutine(result) else result
    return await asyncio.to_thread(call)


# --- point 12: the SDKs' unset markers ------------------------------------------------------


OPENAI_MARKERS = [openai.NOT_GIVEN, openai.not_given, openai.omit, openai.Omit()]
ANTHROPIC_MARKERS = [anthropic.NOT_GIVEN, anthropic.not_given, anthropic.omit, anthropic.Omit()]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("marker", OPENAI_MARKERS, ids=lambda m: type(m).__name__)
async def test_openai_unset_markers_are_not_given(kind, marker):
    api = Api(openai)
    tokens = AtomicTokenBudget(100_000)
    client = openai_gate.guard(api.client(kind), tokens=tokens)
    unset = {
        "max_tokens": marker,
        "max_completion_tokens": marker,
        "stream_options": marker,
        "temperature": marker,
        "stop": marker,
    }
    response = await run(
        kind,
        lambda: client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=marker, **unset
        ),
    )
    assert response.choices[0].message.content == "ok"
    assert tokens.consumed == 35
    assert "max_tokens" not in api.sent[0]
    assert "stream" not in api.sent[0]

    # A stream whose stream_options is unset still asks for its usage.
    stream = await run(
        kind,
        lambda: client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, stream_options=marker
        ),
    )
    assert api.sent[1]["stream_options"] == {"include_usage": True}
    if kind == "async":
        [chunk async for chunk in stream]
    else:
        await asyncio.to_thread(lambda: list(stream))
    assert tokens.consumed == 70

    # Responses: max_output_tokens and instructions unset.
    api_responses = await run(
        kind,
        lambda: client.responses.create(
            model="gpt-test", input="hi", max_output_tokens=marker, instructions=marker
        ),
    )
    assert api_responses is not None
    assert tokens.available == 100_000 - tokens.consumed


@pytest.mark.asyncio
@pytest.mark.parametrize("marker", OPENAI_MARKERS, ids=lambda m: type(m).__name__)
async def test_an_unset_model_on_a_dollar_gate_is_the_missing_model_error(marker):
    # An unset model is a missing model: the gate cannot price it (ValueError), not TypeError.
    api = Api(openai)
    dollars = AtomicTokenBudget(1_000_000)
    client = openai_gate.guard(api.client("async"), dollars=dollars)
    with pytest.raises(ValueError, match="model"):
        await client.chat.completions.create(model=marker, messages=MESSAGES)
    assert api.sent == []
    assert dollars.available == 1_000_000


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("marker", ANTHROPIC_MARKERS, ids=lambda m: type(m).__name__)
async def test_anthropic_unset_markers_are_not_given(kind, marker):
    api = Api(anthropic)
    tokens = AtomicTokenBudget(100_000)
    client = anthropic_gate.guard(api.client(kind), tokens=tokens)
    message = await run(
        kind,
        lambda: client.messages.create(
            model="claude-test",
            max_tokens=100,
            messages=MESSAGES,
            system=marker,
            stream=marker,
            temperature=marker,
        ),
    )
    assert message.content[0].text == "ok"
    assert tokens.consumed == 35
    assert "system" not in api.sent[0]


class CountingApi(Api):
    """Records, at every request, the estimate the gate holds for it while it runs."""

    def __init__(self, sdk, tokens) -> None:
        super().__init__(sdk)
        self.tokens = tokens
        self.held: list[int] = []

    def __call__(self, request):
        self.held.append(100_000 - self.tokens.available - self.tokens.consumed)
        return super().__call__(request)


@pytest.mark.asyncio
async def test_pydantic_ai_openai_model_on_a_guarded_client():
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    tokens = AtomicTokenBudget(100_000)
    api = CountingApi(openai, tokens)
    client = openai_gate.guard(api.client("async"), tokens=tokens, max_output_tokens=50)
    model = OpenAIChatModel("gpt-test", provider=OpenAIProvider(openai_client=client))
    result = await pydantic_ai.Agent(model).run("hello")
    assert result.output == "ok"
    assert len(api.sent) == 1
    assert api.held == [3 + 4 + 50]  # "hello", one message, the gate's output bound
    assert (tokens.consumed, tokens.available) == (35, 100_000 - 35)

    async with pydantic_ai.Agent(model).run_stream("hello") as streamed:
        assert await streamed.get_output() == "ok"
    assert api.sent[1]["stream_options"] == {"include_usage": True}
    assert (tokens.consumed, tokens.available) == (70, 100_000 - 70)

    settings = {"max_tokens": 20}
    await pydantic_ai.Agent(model, model_settings=settings).run("hello")
    assert api.held[-1] == 3 + 4 + 20
    assert tokens.consumed == 105


@pytest.mark.asyncio
async def test_pydantic_ai_anthropic_model_on_a_guarded_client():
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    tokens = AtomicTokenBudget(100_000)
    api = CountingApi(anthropic, tokens)
    client = anthropic_gate.guard(api.client("async"), tokens=tokens)
    model = AnthropicModel("claude-test", provider=AnthropicProvider(anthropic_client=client))
    result = await pydantic_ai.Agent(model, model_settings={"max_tokens": 64}).run("hello")
    assert result.output == "ok"
    assert len(api.sent) == 1
    assert api.held == [3 + 4 + 64]
    assert (tokens.consumed, tokens.available) == (35, 100_000 - 35)


# --- point 13: copies and views of a guarded client -------------------------------------------


def _openai_calls(client):
    chat = {"model": "gpt-test", "messages": MESSAGES, "max_completion_tokens": 100}
    return {
        "with_options": lambda: client.with_options(timeout=5.0).chat.completions.create(**chat),
        "copy": lambda: client.copy(max_retries=1).chat.completions.create(**chat),
        "copy of a copy": lambda: (
            client.copy()
            .with_options(timeout=9.0)
            .responses.create(model="gpt-test", input="hi", max_output_tokens=100)
        ),
        "client raw": lambda: client.with_raw_response.chat.completions.create(**chat),
        "resource raw": lambda: client.chat.completions.with_raw_response.create(**chat),
        "copy raw": lambda: client.with_options(timeout=5.0).with_raw_response.responses.create(
            model="gpt-test", input="hi", max_output_tokens=100
        ),
        "beta chat": lambda: client.beta.chat.completions.create(**chat),
        "beta responses": lambda: client.beta.responses.create(
            model="gpt-test", input="hi", max_output_tokens=100
        ),
        "copy beta chat": lambda: client.copy().beta.chat.completions.create(**chat),
        "streaming": lambda: client.with_streaming_response.chat.completions.create(**chat),
        "copy streaming": lambda: client.copy().chat.completions.with_streaming_response.create(
            **chat
        ),
    }


def _anthropic_calls(client):
    request = {"model": "claude-test", "max_tokens": 100, "messages": MESSAGES}
    return {
        "with_options": lambda: client.with_options(timeout=5.0).messages.create(**request),
        "copy": lambda: client.copy(max_retries=1).messages.create(**request),
        "copy of a copy": lambda: (
            client.copy().with_options(timeout=9.0).messages.create(**request)
        ),
        "copy stream": lambda: client.copy().messages.stream(**request),
        "copy beta": lambda: client.with_options(timeout=5.0).beta.messages.create(**request),
        "client raw": lambda: client.with_raw_response.messages.create(**request),
        "resource raw": lambda: client.messages.with_raw_response.create(**request),
        "copy raw": lambda: client.copy().with_raw_response.messages.create(**request),
        "streaming": lambda: client.with_streaming_response.messages.create(**request),
        "copy streaming": lambda: client.copy().messages.with_streaming_response.create(**request),
    }


async def send(kind, make):
    """Send what ``make()`` gives: a call's result, a streaming response or a stream manager."""
    if kind == "async":
        made = make()
        if asyncio.iscoroutine(made):
            return await made
        async with made as entered:
            return entered

    def enter():
        made = make()
        if not hasattr(made, "__enter__"):
            return made
        with made as entered:
            return entered

    return await asyncio.to_thread(enter)


CASES = [(openai, name) for name in _openai_calls(None)] + [
    (anthropic, name) for name in _anthropic_calls(None)
]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("sdk", "how"), CASES, ids=[f"{s.__name__}-{h}" for s, h in CASES])
async def test_a_copy_or_view_of_a_guarded_client_is_gated(kind, sdk, how):
    api = Api(sdk)
    plain = api.client(kind)
    calls = _openai_calls if sdk is openai else _anthropic_calls
    # Views the SDK cached before the client was guarded are made again over the gated methods.
    for view in (plain.with_raw_response, plain.with_streaming_response):
        view.chat.completions if sdk is openai else view.messages  # noqa: B018 - cached on use
    exhausted = AtomicTokenBudget(100)  # below every estimate
    guarded = (openai_gate if sdk is openai else anthropic_gate).guard(plain, tokens=exhausted)

    with pytest.raises(BudgetExhausted) as denied:
        await send(kind, calls(guarded)[how])
    assert denied.value.budget is exhausted
    assert api.sent == []
    assert exhausted.available == 100

    # With room, the same path is charged on the same budget.
    budget = AtomicTokenBudget(100_000)
    slots = AtomicBudget(1)
    roomy = (openai_gate if sdk is openai else anthropic_gate).guard(
        api.client(kind), tokens=budget, guards={slots: 1}
    )
    await send(kind, calls(roomy)[how])
    assert len(api.sent) == 1
    assert budget.consumed > 0
    assert slots.available == 1


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.filterwarnings("ignore:Item.* using the `ReadOnly` qualifier:UserWarning")
async def test_litellm_calling_a_guarded_client_is_gated(kind):
    # LiteLLM sends chat completions with the client's own post(), past its resources: the same
    # endpoint is gated there, once (the resources' own calls are not gated twice).
    litellm = pytest.importorskip("litellm")
    api = Api(openai)
    request = {
        "model": "openai/gpt-test",
        "messages": MESSAGES,
        "api_key": "k",
        "max_retries": 0,
        "max_tokens": 100,
    }

    async def complete(client):
        request["client"] = client
        if kind == "async":
            return await litellm.acompletion(**request)
        return await asyncio.to_thread(lambda: litellm.completion(**request))

    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = openai_gate.guard(api.client(kind), tokens=tokens, guards={slots: 1})
    response = await complete(client)
    assert response.choices[0].message.content == "ok"
    assert len(api.sent) == 1
    assert (tokens.consumed, tokens.available, slots.available) == (35, 100_000 - 35, 1)

    exhausted = AtomicTokenBudget(100)
    client = openai_gate.guard(api.client(kind), tokens=exhausted)
    with pytest.raises(Exception, match="no room") as raised:  # LiteLLM wraps it in its own
        await complete(client)
    assert any(isinstance(link, BudgetExhausted) for link in _chain(raised.value))
    assert len(api.sent) == 1  # not sent
    assert exhausted.available == 100


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_resource_call_is_gated_once(kind):
    # create() sends through the client's post(), which is gated too: one estimate, one charge.
    tokens = AtomicTokenBudget(100_000)
    api = CountingApi(openai, tokens)
    client = openai_gate.guard(api.client(kind), tokens=tokens)
    chat = {"model": "gpt-test", "messages": MESSAGES, "max_completion_tokens": 100}
    await run(kind, lambda: client.chat.completions.create(**chat))
    assert api.held == [129 + 100]
    assert (tokens.consumed, tokens.available) == (35, 100_000 - 35)
