"""``costbound.integrations.langchain`` with real LangChain (spec section 11).

``BudgetMiddleware`` in an agent made by ``create_agent``, and ``BudgetCallbackHandler`` on a
chat model's calls, both with LangChain's fake chat model answering messages that carry usage
metadata: a success settles exactly the reported usage; an error status refunds everything; a
denial stops the call (the model is not called) and reaches the caller; ``wait`` lets a call
proceed once another's refund makes room; a named model's calls are priced on a dollar budget; a
lost connection, and a stream cut short, are charged at the estimate.
"""

from __future__ import annotations

import asyncio

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted
from costbound.integrations.langchain import BudgetCallbackHandler, BudgetMiddleware
from costbound.prices import Price, PriceTable
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

USAGE = {
    "input_tokens": 300,
    "output_tokens": 50,
    "total_tokens": 350,
    "input_token_details": {"cache_read": 100},
}


def answers(count: int = 1) -> GenericFakeChatModel:
    """A chat model whose next ``count`` answers report USAGE."""
    return GenericFakeChatModel(
        messages=iter([AIMessage(content="ok", usage_metadata=USAGE) for _ in range(count)])
    )


class StatusError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"status {status_code}")
        self.status_code = status_code


class Failing(GenericFakeChatModel):
    """A chat model that counts its calls and fails each with an error status."""

    calls: int = 0
    status: int = 500

    def _generate(self, *args, **kwargs):
        self.calls += 1
        raise StatusError(self.status)

    async def _agenerate(self, *args, **kwargs):
        self.calls += 1
        raise StatusError(self.status)


def test_middleware_settles_every_model_call_of_an_agent():
    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    agent = create_agent(answers(), middleware=[BudgetMiddleware(tokens=tokens, guards={slots: 1})])
    result = agent.invoke({"messages": [{"role": "user", "content": "hello"}]})
    assert result["messages"][-1].content == "ok"
    assert (tokens.consumed, tokens.available, slots.available) == (350, 10_000 - 350, 1)


@pytest.mark.asyncio
async def test_middleware_in_an_async_agent_and_a_denial():
    tokens = AtomicTokenBudget(10_000)
    agent = create_agent(answers(), middleware=[BudgetMiddleware(tokens=tokens)])
    await agent.ainvoke({"messages": [{"role": "user", "content": "hello"}]})
    assert tokens.consumed == 350
    small = AtomicTokenBudget(5)
    model = answers()
    denied_agent = create_agent(model, middleware=[BudgetMiddleware(tokens=small)])
    with pytest.raises(BudgetExhausted) as denied:
        await denied_agent.ainvoke({"messages": [{"role": "user", "content": "hello"}]})
    assert denied.value.budget is small
    assert next(model.messages).content == "ok"  # its one answer was never asked for
    assert small.available == 5


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [429, 500])
async def test_middleware_refunds_an_error_status(status):
    tokens = AtomicTokenBudget(10_000)
    model = Failing(messages=iter([]), status=status)
    agent = create_agent(model, middleware=[BudgetMiddleware(tokens=tokens)])
    with pytest.raises(StatusError):
        await agent.ainvoke({"messages": [{"role": "user", "content": "hello"}]})
    assert model.calls == 1
    assert (tokens.available, tokens.consumed) == (10_000, 0)


def test_the_callback_handler_settles_and_stops_a_denied_call():
    tokens = AtomicTokenBudget(10_000)
    handler = BudgetCallbackHandler(tokens=tokens)
    assert handler.raise_error
    reply = answers().invoke("hello", config={"callbacks": [handler]})
    assert reply.content == "ok"
    assert tokens.consumed == 350

    small = AtomicTokenBudget(5)
    model = answers()
    with pytest.raises(BudgetExhausted):
        model.invoke("hello", config={"callbacks": [BudgetCallbackHandler(tokens=small)]})
    assert next(model.messages).content == "ok"  # not called
    assert small.available == 5


@pytest.mark.asyncio
async def test_the_callback_handler_refunds_an_error_and_waits_for_room():
    tokens = AtomicTokenBudget(10_000)
    failing = Failing(messages=iter([]), status=429)
    with pytest.raises(StatusError):
        await failing.ainvoke("hello", config={"callbacks": [BudgetCallbackHandler(tokens=tokens)]})
    assert (tokens.available, tokens.consumed) == (10_000, 0)

    room = AtomicTokenBudget(5_000)
    held = room.try_reserve_tokens_sync(5_000)
    handler = BudgetCallbackHandler(tokens=room, wait=20.0, max_output_tokens=100)
    call = asyncio.create_task(answers().ainvoke("hello", config={"callbacks": [handler]}))
    await asyncio.sleep(0.05)
    assert not call.done()
    del held  # refunded: room for the waiting call
    reply = await asyncio.wait_for(call, 20.0)
    assert reply.content == "ok"
    assert room.consumed == 350


class Streaming(GenericFakeChatModel):
    """A chat model that streams two chunks, the last carrying the usage, as providers do."""

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        from langchain_core.messages import AIMessageChunk
        from langchain_core.outputs import ChatGenerationChunk

        yield ChatGenerationChunk(message=AIMessageChunk(content="o"))
        yield ChatGenerationChunk(message=AIMessageChunk(content="k", usage_metadata=USAGE))


@pytest.mark.parametrize("cut", [False, True], ids=["complete", "cut"])
def test_a_stream_settles_at_its_final_usage_or_the_estimate(cut):
    tokens = AtomicTokenBudget(10_000)
    handler = BudgetCallbackHandler(tokens=tokens, max_output_tokens=100)
    chunks = Streaming(messages=iter([])).stream("hello", config={"callbacks": [handler]})
    if cut:
        next(chunks)
        chunks.close()  # the consumer stops before the usage arrived
        estimate = 3 + 4 + 100  # "hello": ceil(2 x 1.25) + 4 for the message, + the output bound
        assert (tokens.consumed, tokens.available) == (estimate, 10_000 - estimate)
    else:
        assert "".join(chunk.content for chunk in chunks) == "ok"
        assert tokens.consumed == 350


class Named(GenericFakeChatModel):
    """A fake chat model with a model name, as real ones have, so its calls can be priced."""

    model_name: str = "fake-gpt"


TABLE = PriceTable({"fake-gpt": Price(input=2, output=8, cached_input=1)})
PRICE = 200 * 2 + 100 * 1 + 50 * 8  # 900 micro-dollars: USAGE less its cache, the cache, output


def named(count: int = 1) -> Named:
    return Named(messages=iter([AIMessage(content="ok", usage_metadata=USAGE)] * count))


@pytest.mark.asyncio
async def test_a_named_model_is_priced_on_the_dollar_budget():
    # The dollar budget holds the worst case: 4,096 output tokens (no bound set) at 8 µ$ each.
    tokens, dollars = AtomicTokenBudget(10_000), AtomicTokenBudget(100_000)
    gate = {"tokens": tokens, "dollars": dollars, "prices": TABLE}
    agent = create_agent(named(), middleware=[BudgetMiddleware(**gate)])
    await agent.ainvoke({"messages": [{"role": "user", "content": "hello"}]})
    assert (tokens.consumed, dollars.consumed) == (350, PRICE)

    reply = named().invoke("hello", config={"callbacks": [BudgetCallbackHandler(**gate)]})
    assert reply.content == "ok"
    assert (tokens.consumed, dollars.consumed) == (700, 2 * PRICE)
    assert (tokens.available, dollars.available) == (10_000 - 700, 100_000 - 2 * PRICE)

    unpriced = {"dollars": dollars, "prices": PriceTable({})}  # a model the table lacks
    with pytest.raises(ValueError, match="fake-gpt"):
        named().invoke("hello", config={"callbacks": [BudgetCallbackHandler(**unpriced)]})
    assert dollars.available == 100_000 - 2 * PRICE


class Disconnected(Named):
    """A chat model whose connection is lost after its request went out (no status)."""

    def _generate(self, *args, **kwargs):
        raise ConnectionResetError("connection lost")

    async def _agenerate(self, *args, **kwargs):
        raise ConnectionResetError("connection lost")


@pytest.mark.asyncio
async def test_a_lost_connection_is_charged_at_the_estimate():
    tokens, dollars, slots = AtomicTokenBudget(10_000), AtomicTokenBudget(10_000), AtomicBudget(1)
    gate = {"tokens": tokens, "dollars": dollars, "guards": {slots: 1}, "prices": TABLE}
    gate["max_output_tokens"] = 100
    estimate = 3 + 4 + 100  # "hello": ceil(2 x 1.25) + 4 for the message, + the output bound
    agent = create_agent(Disconnected(messages=iter([])), middleware=[BudgetMiddleware(**gate)])
    with pytest.raises(ConnectionResetError):
        await agent.ainvoke({"messages": [{"role": "user", "content": "hello"}]})
    assert (tokens.consumed, dollars.consumed) == (estimate, 7 * 2 + 100 * 8)
    assert slots.available == 1

    handler = BudgetCallbackHandler(**gate)
    with pytest.raises(ConnectionResetError):
        Disconnected(messages=iter([])).invoke("hello", config={"callbacks": [handler]})
    assert (tokens.consumed, dollars.consumed) == (2 * estimate, 2 * (7 * 2 + 100 * 8))
    assert slots.available == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("gate", ["callback", "middleware"])
@pytest.mark.parametrize("where", ["model cache", "global cache"])
async def test_a_cache_hit_is_refunded(kind, gate, where):
    # LangChain answers a repeated prompt from its cache without calling the provider: nothing
    # was billed, so the second call is refunded, though the cached message repeats the usage.
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache

    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    cache = InMemoryCache()
    model = answers(1)
    if where == "model cache":
        model.cache = cache
    previous = get_llm_cache()
    if where == "global cache":
        set_llm_cache(cache)
    try:
        if gate == "middleware":
            agent = create_agent(
                model, middleware=[BudgetMiddleware(tokens=tokens, guards={slots: 1})]
            )
            question = {"messages": [{"role": "user", "content": "hello"}]}

            async def ask() -> str:
                if kind == "async":
                    return (await agent.ainvoke(question))["messages"][-1].content
                return (await asyncio.to_thread(agent.invoke, question))["messages"][-1].content
        else:
            config = {"callbacks": [BudgetCallbackHandler(tokens=tokens, guards={slots: 1})]}

            async def ask() -> str:
                if kind == "async":
                    return (await model.ainvoke("hello", config=config)).content
                return (await asyncio.to_thread(model.invoke, "hello", config=config)).content

        assert await ask() == "ok"
        assert tokens.consumed == 350  # the provider's call
        assert await ask() == "ok"  # the same prompt: from the cache (the model has no answer left)
        assert (tokens.consumed, tokens.available, slots.available) == (350, 10_000 - 350, 1)
    finally:
        set_llm_cache(previous)
