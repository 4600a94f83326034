"""``costbound.integrations.pydantic_ai.BudgetCapability`` with real pydantic-ai agents (spec 11).

pydantic-ai's ``FunctionModel`` answers with a chosen usage, so the capability's settlement is
checked against known figures: every model request of ``run``, ``run_sync`` and ``run_stream``
settles its reported usage; an error status refunds everything; a denial raises
``BudgetExhausted`` out of the run and the model is not called; ``wait`` lets a run proceed once
another's refund makes room; concurrent runs share one budget without overspending it.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted

pytest.importorskip("pydantic_ai")  # pydantic-ai needs Python 3.11 (test.txt installs it there)
from costbound.integrations.pydantic_ai import BudgetCapability
from costbound.prices import Price, PriceTable
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelAPIError, ModelHTTPError
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

anthropic = pytest.importorskip("anthropic")
from pydantic_ai.models.anthropic import AnthropicModel  # noqa: E402
from pydantic_ai.providers.anthropic import AnthropicProvider  # noqa: E402

TABLE = PriceTable({"fake": Price(input=1, output=4, cached_input=0.5)})
USAGE = RequestUsage(input_tokens=300, output_tokens=50, cache_read_tokens=100)
PRICE = 200 * 1 + 100 * 0.5 + 50 * 4  # 450 micro-dollars


class Calls:
    """A FunctionModel's function: answers with USAGE, or raises, and counts its calls."""

    def __init__(self, error: Exception | None = None) -> None:
        self.count = 0
        self.error = error

    def __call__(self, messages, info: AgentInfo) -> ModelResponse:
        self.count += 1
        if self.error is not None:
            raise self.error
        return ModelResponse(parts=[TextPart("ok")], usage=USAGE, model_name="fake")


def agent(calls, **gate) -> Agent:
    model = FunctionModel(calls, model_name="fake")
    return Agent(model, capabilities=[BudgetCapability(**gate)])


def test_run_sync_settles_the_reported_usage():
    tokens, dollars, slots = AtomicTokenBudget(10_000), AtomicTokenBudget(10_000), AtomicBudget(1)
    calls = Calls()
    bot = agent(calls, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    # run_sync runs on the thread's current loop (it makes one if there is none, and keeps it):
    # give it one that the test closes.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        result = bot.run_sync("hello", model_settings={"max_tokens": 100})
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert result.output == "ok"
    assert calls.count == 1
    assert (tokens.consumed, tokens.available) == (350, 10_000 - 350)
    assert (dollars.consumed, dollars.available) == (PRICE, 10_000 - PRICE)
    assert slots.available == 1


@pytest.mark.asyncio
async def test_every_request_of_a_run_with_a_tool_is_settled():
    tokens = AtomicTokenBudget(10_000)
    turns = 0

    def model(messages, info: AgentInfo) -> ModelResponse:
        nonlocal turns
        turns += 1
        if turns == 1:
            return ModelResponse(parts=[ToolCallPart("lookup", {})], usage=USAGE)
        return ModelResponse(parts=[TextPart("done")], usage=USAGE)

    bot = Agent(FunctionModel(model), capabilities=[BudgetCapability(tokens=tokens)])

    @bot.tool_plain
    def lookup() -> str:
        return "42"

    result = await bot.run("hello")
    assert result.output == "done"
    assert turns == 2
    assert tokens.consumed == 2 * 350 == result.usage.input_tokens + result.usage.output_tokens


@pytest.mark.asyncio
async def test_run_stream_settles_the_streamed_usage():
    tokens = AtomicTokenBudget(10_000)

    async def stream(messages, info: AgentInfo):
        yield "o"
        yield "k"

    bot = Agent(
        FunctionModel(stream_function=stream), capabilities=[BudgetCapability(tokens=tokens)]
    )
    async with bot.run_stream("hello") as result:
        text = await result.get_output()
    assert text == "ok"
    usage = result.usage
    assert tokens.consumed == usage.input_tokens + usage.output_tokens > 0
    assert tokens.available == 10_000 - tokens.consumed


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [429, 500])
async def test_an_error_status_refunds_everything(status):
    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    calls = Calls(ModelHTTPError(status_code=status, model_name="fake"))
    with pytest.raises(ModelHTTPError):
        await agent(calls, tokens=tokens, guards={slots: 1}).run("hello")
    assert calls.count == 1
    assert (tokens.available, tokens.consumed, slots.available) == (10_000, 0, 1)


@pytest.mark.asyncio
async def test_a_denial_reaches_the_caller_and_the_model_is_not_called():
    tokens = AtomicTokenBudget(10)
    calls = Calls()
    with pytest.raises(BudgetExhausted) as denied:
        await agent(calls, tokens=tokens).run("hello")
    assert denied.value.budget is tokens
    assert calls.count == 0
    assert tokens.available == 10


@pytest.mark.asyncio
async def test_concurrent_runs_share_the_budget_and_wait_for_room():
    tokens = AtomicTokenBudget(700)  # two requests' estimates at a time (each 2 + 4 + 300 = 306)
    in_flight = peak = 0

    async def model(messages, info: AgentInfo) -> ModelResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return ModelResponse(
            parts=[TextPart("ok")], usage=RequestUsage(input_tokens=5, output_tokens=5)
        )

    bot = Agent(
        FunctionModel(model),
        capabilities=[BudgetCapability(tokens=tokens, wait=30.0, max_output_tokens=300)],
    )
    results = await asyncio.gather(*(bot.run("hi") for _ in range(10)))
    assert [r.output for r in results] == ["ok"] * 10
    assert peak == 2
    assert (tokens.consumed, tokens.available) == (100, 600)


@pytest.mark.asyncio
async def test_with_test_model_the_run_usage_is_what_was_charged():
    from pydantic_ai.models.test import TestModel

    tokens = AtomicTokenBudget(100_000)
    bot = Agent(TestModel(custom_output_text="ok"), capabilities=[BudgetCapability(tokens=tokens)])
    result = await bot.run("hello")
    usage = result.usage
    assert usage.requests >= 1
    assert tokens.consumed == usage.input_tokens + usage.output_tokens > 0


ANTHROPIC_MESSAGE = {
    "id": "m1",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 20, "cache_read_input_tokens": 1_000, "output_tokens": 5},
}


def anthropic_events(upto=None):
    """The server-sent events of ANTHROPIC_MESSAGE, or their first ``upto``."""
    start = {**ANTHROPIC_MESSAGE, "content": [], "stop_reason": None}
    start["usage"] = {**ANTHROPIC_MESSAGE["usage"], "output_tokens": 1}
    events = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "o"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "k"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ][:upto]
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


class AnthropicApi:
    """Anthropic's messages API over a mock transport: whole, cut short, or dropped mid-stream."""

    def __init__(self, mode: str = "whole") -> None:
        self.sent: list[dict] = []
        self.mode = mode
        self.httpx = importlib.import_module(
            anthropic.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
        )

    def __call__(self, request):
        httpx = self.httpx
        body = json.loads(request.content)
        self.sent.append(body)
        if not body.get("stream"):
            return httpx.Response(200, json=ANTHROPIC_MESSAGE)
        sse = {"content-type": "text/event-stream"}
        if self.mode == "whole":
            return httpx.Response(200, content=anthropic_events(), headers=sse)
        if self.mode == "ends-early":  # the body ends cleanly after the first text
            return httpx.Response(200, content=anthropic_events(upto=3), headers=sse)

        class Dropped(httpx.AsyncByteStream):
            async def __aiter__(self):
                yield anthropic_events(upto=3)
                raise httpx.ReadError("connection lost")

        return httpx.Response(200, stream=Dropped(), headers=sse)

    def model(self):
        client = anthropic.AsyncAnthropic(
            api_key="k",
            max_retries=0,
            http_client=self.httpx.AsyncClient(transport=self.httpx.MockTransport(self)),
        )
        provider = AnthropicProvider(anthropic_client=client)
        return AnthropicModel("claude-haiku-4-5", provider=provider)


@pytest.mark.asyncio
async def test_with_the_real_anthropic_model_over_a_mocked_client():
    # pydantic-ai's own AnthropicModel parses the Anthropic SDK's response, whose input_tokens
    # leave out the cache: the capability settles pydantic-ai's all-included count.
    api = AnthropicApi()
    tokens = AtomicTokenBudget(100_000)
    bot = Agent(api.model(), capabilities=[BudgetCapability(tokens=tokens)])
    result = await bot.run("hello")
    assert result.output == "ok"
    assert len(api.sent) == 1
    assert tokens.consumed == 20 + 1_000 + 5

    small = AtomicTokenBudget(10)
    denied_bot = Agent(api.model(), capabilities=[BudgetCapability(tokens=small)])
    with pytest.raises(BudgetExhausted):
        await denied_bot.run("hello")
    assert len(api.sent) == 1  # the denied request was not sent


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["whole", "ends-early", "dropped"])
async def test_run_stream_of_the_real_anthropic_model(mode):
    # A whole stream settles at its final usage. One that ends early keeps the partial usage of
    # its first event (1,021 tokens here) and no finish reason; one whose connection drops
    # raises out of the run. Both were billed for more than they reported: the estimate.
    api = AnthropicApi(mode)
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    gate = BudgetCapability(tokens=tokens, guards={slots: 1}, max_output_tokens=100)
    bot = Agent(api.model(), capabilities=[gate])
    if mode == "dropped":
        with pytest.raises(ModelAPIError):
            async with bot.run_stream("hello") as result:
                await result.get_output()
    else:
        async with bot.run_stream("hello") as result:
            assert await result.get_output() == ("ok" if mode == "whole" else "o")
    assert len(api.sent) == 1
    estimate = 3 + 4 + 100  # "hello": ceil(2 x 1.25), 4 for the message, the output bound
    assert tokens.consumed == (20 + 1_000 + 5 if mode == "whole" else estimate)
    assert (tokens.available, slots.available) == (100_000 - tokens.consumed, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("with_usage", [True, False], ids=["usage", "no-usage"])
async def test_a_stream_of_the_real_openai_model_settles_its_usage_or_the_estimate(with_usage):
    # pydantic-ai's own OpenAIChatModel over a mocked client: a stream whose last chunk carries
    # the usage settles at it; one that never reports usage (pydantic-ai counts it unmeasured)
    # was billed all the same, and is charged at the estimate.
    import importlib
    import json

    import openai
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    httpx = importlib.import_module(
        openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
    )
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "o"}}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": "k"}, "finish_reason": "stop"}]},
    ]
    if with_usage:
        usage = {"prompt_tokens": 300, "completion_tokens": 50, "total_tokens": 350}
        events.append({**chunk, "choices": [], "usage": usage})
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"

    def api(request):
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    client = openai.AsyncOpenAI(
        api_key="k",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(api)),
    )
    model = OpenAIChatModel("gpt-test", provider=OpenAIProvider(openai_client=client))
    tokens = AtomicTokenBudget(10_000)
    bot = Agent(model, capabilities=[BudgetCapability(tokens=tokens, max_output_tokens=100)])
    async with bot.run_stream("hello") as result:
        assert await result.get_output() == "ok"
    estimate = 3 + 4 + 100  # "hello": ceil(2 x 1.25), 4 for the message, the output bound
    assert tokens.consumed == (350 if with_usage else estimate)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [429, 500])
async def test_an_error_status_from_the_real_openai_model_refunds_everything(status):
    # pydantic-ai turns the SDK's error into a ModelHTTPError with the provider's status.
    import openai
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    httpx = importlib.import_module(
        openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
    )
    sent = []

    def api(request):
        sent.append(request)
        return httpx.Response(status, json={"error": {"message": "no", "type": "server"}})

    client = openai.AsyncOpenAI(
        api_key="k",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(api)),
    )
    model = OpenAIChatModel("gpt-test", provider=OpenAIProvider(openai_client=client))
    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    bot = Agent(model, capabilities=[BudgetCapability(tokens=tokens, guards={slots: 1})])
    with pytest.raises(ModelHTTPError) as raised:
        await bot.run("hello")
    assert raised.value.status_code == status
    assert len(sent) == 1
    assert (tokens.available, tokens.consumed, slots.available) == (10_000, 0, 1)
