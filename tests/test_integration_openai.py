"""``costbound.integrations.openai.guard`` with the real OpenAI SDK, offline (spec section 11).

The SDK's clients run against an httpx ``MockTransport`` (of the flavour the SDK uses) that
serves canned JSON and server-sent events, so the SDK's own parsing runs. For the sync and the
async client, chat completions and responses: a success settles exactly the reported usage; a
stream settles at its final usage; a cut stream at the estimate; a 429 or 500 refunds
everything; a denial raises ``BudgetExhausted`` and the transport sees no request; ``wait`` lets
a gated call proceed once another call's refund makes room.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import openai
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted
from costbound.integrations.openai import guard
from costbound.prices import Price, PriceTable

httpx = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])

TABLE = PriceTable({"gpt-test": Price(input=1.0, output=4.0, cached_input=0.5)})
MESSAGES = [{"role": "user", "content": "x" * 400}]  # 100 x 1.25 + 4 = 129 input tokens
CHAT = {"model": "gpt-test", "messages": MESSAGES, "max_completion_tokens": 100}
ESTIMATE, ESTIMATE_PRICE = 129 + 100, 129 * 1 + 100 * 4  # tokens, micro-dollars
CHAT_USAGE = {
    "prompt_tokens": 300,
    "completion_tokens": 50,
    "total_tokens": 350,
    "prompt_tokens_details": {"cached_tokens": 100},
}


def chat_json(usage=CHAT_USAGE, content="ok"):
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": usage,
    }


def chat_sse(with_usage=True, done=True):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"content": "o"}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": "k"}, "finish_reason": "stop"}]},
    ]
    if with_usage:
        events.append({**chunk, "choices": [], "usage": CHAT_USAGE})
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
    return body + "data: [DONE]\n\n" if done else body


RESPONSES_USAGE = {
    "input_tokens": 300,
    "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
    "output_tokens": 50,
    "output_tokens_details": {"reasoning_tokens": 20},
    "total_tokens": 350,
}


def responses_json():
    return {
        "id": "r1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-test",
        "status": "completed",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": RESPONSES_USAGE,
    }


def responses_sse(mode):
    """A Responses stream: created, an output item with a text delta, and (unless cut) the item
    done and the response completed (or incomplete) with the usage."""
    created = {**responses_json(), "status": "in_progress", "usage": None}
    item = {"id": "i1", "type": "message", "role": "assistant", "status": "in_progress"}
    part = {"type": "output_text", "text": "", "annotations": []}
    events = [
        {"type": "response.created", "sequence_number": 0, "response": created},
        {
            "type": "response.output_item.added",
            "sequence_number": 1,
            "output_index": 0,
            "item": {**item, "content": []},
        },
        {
            "type": "response.content_part.added",
            "sequence_number": 1,
            "item_id": "i1",
            "output_index": 0,
            "content_index": 0,
            "part": part,
        },
        {
            "type": "response.output_text.delta",
            "sequence_number": 1,
            "item_id": "i1",
            "output_index": 0,
            "content_index": 0,
            "delta": "ok",
            "logprobs": [],
        },
    ]
    if mode != "sse-cut":
        done = {**item, "status": "completed", "content": [{**part, "text": "ok"}]}
        event = {"type": "response.output_item.done", "sequence_number": 3, "output_index": 0}
        events.append({**event, "item": done})
    if mode == "sse-incomplete":  # stopped at max_output_tokens: billed, with its usage
        incomplete = {**responses_json(), "status": "incomplete"}
        incomplete["incomplete_details"] = {"reason": "max_output_tokens"}
        events.append({"type": "response.incomplete", "sequence_number": 2, "response": incomplete})
    elif mode != "sse-cut":
        events.append(
            {"type": "response.completed", "sequence_number": 2, "response": responses_json()}
        )
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


class Server:
    """The transport's handler: what it answers, and the requests it saw."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.mode = "json"  # json | sse | sse-cut (ends before its usage) | sse-no-usage
        self.content = "ok"  # a chat message's content

    def __call__(self, request):
        body = json.loads(request.content or b"{}")
        self.requests.append({"path": request.url.path, **body})
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "no", "type": "x"}})
        if request.url.path.endswith("/responses"):
            if body.get("stream"):
                return httpx.Response(
                    200,
                    text=responses_sse(self.mode),
                    headers={"content-type": "text/event-stream"},
                )
            return httpx.Response(200, json=responses_json())
        if self.mode == "json":
            return httpx.Response(200, json=chat_json(content=self.content))
        text = chat_sse(with_usage=self.mode == "sse", done=self.mode != "sse-cut")
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def make(kind, server, **gate):
    transport = httpx.MockTransport(server)
    if kind == "async":
        client = openai.AsyncOpenAI(
            api_key="k", max_retries=0, http_client=httpx.AsyncClient(transport=transport)
        )
    else:
        client = openai.OpenAI(
            api_key="k", max_retries=0, http_client=httpx.Client(transport=transport)
        )
    return guard(client, **gate)


async def call(kind, method, **kwargs):
    """An async client's call awaited; a sync client's made on a thread, as sync code would."""
    if kind == "async":
        return await method(**kwargs)
    return await asyncio.to_thread(lambda: method(**kwargs))


async def consume(kind, stream, stop_after=None):
    if kind == "async":
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == stop_after:
                await stream.close()
                break
        return seen

    def read() -> int:
        seen = 0
        for _ in stream:
            seen += 1
            if seen == stop_after:
                stream.close()
                break
        return seen

    return await asyncio.to_thread(read)


KINDS = ["sync", "async"]


@pytest.fixture
def budgets():
    return AtomicTokenBudget(100_000), AtomicTokenBudget(1_000_000), AtomicBudget(4)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_chat_success_settles_the_reported_usage(kind, budgets):
    tokens, dollars, slots = budgets
    server = Server()
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    response = await call(
        kind,
        client.chat.completions.create,
        **CHAT,
    )
    assert response.choices[0].message.content == "ok"
    assert len(server.requests) == 1
    assert (tokens.consumed, tokens.available) == (350, 100_000 - 350)
    # 200 fresh x 1 + 100 cached x 0.5 + 50 x 4 = 450 micro-dollars
    assert (dollars.consumed, dollars.available) == (450, 1_000_000 - 450)
    assert slots.available == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_responses_success_settles_the_reported_usage(kind, budgets):
    tokens, dollars, _ = budgets
    server = Server()
    client = make(kind, server, tokens=tokens, dollars=dollars, prices=TABLE)
    await call(
        kind,
        client.responses.create,
        model="gpt-test",
        input="x" * 400,
        instructions="be brief",
        max_output_tokens=100,
    )
    assert server.requests[0]["path"].endswith("/responses")
    assert tokens.consumed == 350
    assert dollars.consumed == 450


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_chat_stream_settles_at_its_final_usage(kind, budgets):
    tokens, dollars, slots = budgets
    server = Server()
    server.mode = "sse"
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    stream = await call(
        kind,
        client.chat.completions.create,
        **CHAT,
        stream=True,
    )
    assert server.requests[0]["stream_options"] == {"include_usage": True}
    assert slots.available == 3  # held while the stream runs
    assert await consume(kind, stream) == 3
    assert (tokens.consumed, dollars.consumed, slots.available) == (350, 450, 4)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["closed early", "no usage", "cut"])
async def test_a_stream_without_usage_settles_at_the_estimate(kind, how, budgets):
    tokens, dollars, slots = budgets
    server = Server()
    server.mode = {"closed early": "sse", "no usage": "sse-no-usage", "cut": "sse-cut"}[how]
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    stream = await call(
        kind,
        client.chat.completions.create,
        **CHAT,
        stream=True,
    )
    await consume(kind, stream, stop_after=1 if how == "closed early" else None)
    assert (tokens.consumed, dollars.consumed) == (ESTIMATE, ESTIMATE_PRICE)
    assert slots.available == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [429, 500, 400])
async def test_an_error_status_refunds_everything(kind, status, budgets):
    tokens, dollars, slots = budgets
    server = Server()
    server.status = status
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    with pytest.raises(openai.APIStatusError):
        await call(kind, client.chat.completions.create, model="gpt-test", messages=MESSAGES)
    assert len(server.requests) == 1
    assert (tokens.available, tokens.consumed) == (100_000, 0)
    assert (dollars.available, dollars.consumed) == (1_000_000, 0)
    assert slots.available == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_denial_raises_and_sends_nothing(kind):
    tokens = AtomicTokenBudget(100)
    server = Server()
    client = make(kind, server, tokens=tokens)
    with pytest.raises(BudgetExhausted) as denied:
        await call(
            kind,
            client.chat.completions.create,
            **CHAT,
        )
    assert denied.value.budget is tokens
    assert denied.value.amount == 229
    assert server.requests == []
    assert tokens.available == 100


class HeldServer(Server):
    """Answers 500, but only once the test releases it: its call holds its budget meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.status = 500
        self.release = asyncio.Event()

    async def handle(self, request):
        await self.release.wait()
        return self(request)


@pytest.mark.asyncio
async def test_wait_lets_a_call_proceed_once_another_calls_refund_makes_room():
    tokens = AtomicTokenBudget(300)  # room for one call's estimate (229) at a time
    held, server = HeldServer(), Server()
    first_client = guard(
        openai.AsyncOpenAI(
            api_key="k",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(held.handle)),
        ),
        tokens=tokens,
    )
    second_client = make("async", server, tokens=tokens, wait=20.0)
    first = asyncio.create_task(first_client.chat.completions.create(**CHAT))
    while tokens.available == 300:  # noqa: ASYNC110 - setup: the first call took its estimate
        await asyncio.sleep(0.001)
    second = asyncio.create_task(second_client.chat.completions.create(**CHAT))
    await asyncio.sleep(0.05)
    assert not second.done()
    assert server.requests == []  # not sent while it waits
    held.release.set()  # the first call's 500 refunds its estimate: the second goes
    with pytest.raises(openai.APIStatusError):
        await first
    response = await asyncio.wait_for(second, 20.0)
    assert response.usage.total_tokens == 350
    assert len(server.requests) == 1
    assert (tokens.consumed, tokens.available, tokens.debt) == (350, 0, 50)  # over the estimate


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["sse", "sse-incomplete", "sse-cut"])
async def test_a_responses_stream_settles_at_its_completed_usage_or_its_estimate(
    kind, mode, budgets
):
    # Completed, or incomplete (stopped at max_output_tokens): both carry the usage billed. A
    # stream cut before either is charged at the estimate.
    tokens, dollars, slots = budgets
    server = Server()
    server.mode = mode
    cut = mode == "sse-cut"
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    stream = await call(
        kind,
        client.responses.create,
        model="gpt-test",
        input="x" * 400,
        max_output_tokens=100,
        stream=True,
    )
    assert slots.available == 3
    await consume(kind, stream)
    if cut:
        assert (tokens.consumed, dollars.consumed) == (ESTIMATE, ESTIMATE_PRICE)
    else:
        assert (tokens.consumed, dollars.consumed) == (350, 450)
    assert slots.available == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_lost_connection_is_charged_at_the_estimate(kind, budgets):
    # The SDK cannot tell whether a request whose connection failed went out: it may have been
    # billed, so the gate charges the estimate (and releases the guards).
    tokens, dollars, slots = budgets

    def lost(request):
        raise httpx.ReadError("connection lost", request=request)

    client = make(kind, lost, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    with pytest.raises(openai.APIConnectionError):
        await call(
            kind,
            client.chat.completions.create,
            **CHAT,
        )
    assert (tokens.consumed, dollars.consumed) == (ESTIMATE, ESTIMATE_PRICE)
    assert slots.available == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_messages_given_as_an_iterator_reach_the_api(kind, budgets):
    tokens, _, _ = budgets
    server = Server()
    client = make(kind, server, tokens=tokens)
    await call(
        kind,
        client.chat.completions.create,
        model="gpt-test",
        messages=iter(MESSAGES),
        max_completion_tokens=100,
    )
    assert server.requests[0]["messages"] == MESSAGES  # read once, for the estimate and the SDK
    assert tokens.consumed == 350


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "helper", ["chat.parse", "chat.stream", "responses.parse", "responses.stream"]
)
async def test_the_parse_and_stream_helpers_are_gated(kind, helper, budgets):
    # Structured outputs (parse) send their own request, not through create: gated as well.
    # The stream helpers send theirs through create, and settle at the stream's final usage.
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    tokens, dollars, slots = budgets
    server = Server()
    server.content = '{"text": "ok"}'
    server.mode = "sse" if helper.endswith("stream") else "json"
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    responses = {"model": "gpt-test", "input": "x" * 400, "max_output_tokens": 100}

    def run_sync():
        if helper == "chat.parse":
            reply = client.chat.completions.parse(**CHAT, response_format=Answer)
            assert reply.choices[0].message.parsed == Answer(text="ok")
        elif helper == "responses.parse":
            client.responses.parse(**responses, text_format=Answer)
        else:
            resource, arguments = (
                (client.chat.completions, CHAT)
                if helper == "chat.stream"
                else (client.responses, responses)
            )
            with resource.stream(**arguments) as stream:
                for _ in stream:
                    assert slots.available == 3  # held while it streams

    async def run_async():
        if helper == "chat.parse":
            reply = await client.chat.completions.parse(**CHAT, response_format=Answer)
            assert reply.choices[0].message.parsed == Answer(text="ok")
        elif helper == "responses.parse":
            await client.responses.parse(**responses, text_format=Answer)
        else:
            resource, arguments = (
                (client.chat.completions, CHAT)
                if helper == "chat.stream"
                else (client.responses, responses)
            )
            async with resource.stream(**arguments) as stream:
                async for _ in stream:
                    assert slots.available == 3

    if kind == "async":
        await run_async()
    else:
        await asyncio.to_thread(run_sync)
    assert len(server.requests) == 1
    assert (tokens.consumed, dollars.consumed, slots.available) == (350, 450, 4)

    # A denial sends nothing.
    assert slots.try_reserve_sync(4)
    with pytest.raises(BudgetExhausted):
        await (run_async() if kind == "async" else asyncio.to_thread(run_sync))
    assert len(server.requests) == 1
    slots.release_sync(4)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_dropped_unread_is_charged_at_the_estimate(kind, budgets):
    # The request went out when create returned; the stream was never read. Dropping it
    # charges the estimate and frees the slot, which must not leak.
    import gc

    tokens, dollars, slots = budgets
    server = Server()
    server.mode = "sse"
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    if kind == "async":
        stream = await client.chat.completions.create(**CHAT, stream=True)
    else:  # called here, not on a thread, so that the test holds the only reference to it
        stream = client.chat.completions.create(**CHAT, stream=True)
    assert (len(server.requests), slots.available) == (1, 3)
    del stream
    gc.collect()
    assert (tokens.consumed, dollars.consumed) == (ESTIMATE, ESTIMATE_PRICE)
    assert slots.available == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_raw_response_settles_the_usage_it_parses_to(kind, budgets):
    # with_raw_response (for the headers, say; LangChain calls the SDK so) goes through create:
    # the gate parses the response, which the SDK keeps for the caller's own parse(). A raw
    # stream's parse() gives the stream watched: it holds its slot while it is read, and
    # settles at the usage it reports.
    tokens, dollars, slots = budgets
    server = Server()
    client = make(kind, server, tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    raw = client.chat.completions.with_raw_response
    response = await call(kind, raw.create, **CHAT)
    assert response.headers["content-type"] == "application/json"
    assert response.parse().usage.total_tokens == 350
    assert (tokens.consumed, dollars.consumed, slots.available) == (350, 450, 4)
    server.mode = "sse"
    response = await call(kind, raw.create, **CHAT, stream=True)
    assert len(server.requests) == 2
    assert slots.available == 3  # the stream is not read yet: its slot is taken
    stream = response.parse()
    assert stream is response.parse()
    chunks = [chunk async for chunk in stream] if kind == "async" else list(stream)
    assert chunks[-1].usage.total_tokens == 350
    assert (tokens.consumed, dollars.consumed) == (700, 900)
    assert slots.available == 4
