"""``costbound.integrations.anthropic.guard`` with the real Anthropic SDK, offline (spec 11).

The SDK's clients run against a ``MockTransport`` (of the httpx flavour the SDK uses) serving
canned JSON and server-sent events, so the SDK's own parsing runs. Anthropic's ``input_tokens``
leaves out cache reads and writes: the settlement adds them. For the sync and the async client,
``messages.create`` (plain and streamed) and ``messages.stream``: a success settles exactly the
reported usage; a stream at its final usage; a stream cut before its final delta at the
estimate; a 429 or 500 refunds everything; a denial raises ``BudgetExhausted`` and the
transport sees no request; a connection lost before the response or in the middle of a stream
is charged at the estimate.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import anthropic
import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted
from costbound.integrations.anthropic import guard
from costbound.prices import Price, PriceTable

httpx = importlib.import_module(
    anthropic.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
)

TABLE = PriceTable({"claude-test": Price(input=1, output=4, cached_input=0.5, cache_write=2)})
MESSAGES = [{"role": "user", "content": "x" * 400}]  # 100 x 1.25 + 4 = 129 input tokens
ESTIMATE = 129 + 100  # max_tokens=100
ESTIMATE_PRICE = 129 * 1 + 100 * 4
USAGE = {
    "input_tokens": 50,
    "cache_read_input_tokens": 1_000,
    "cache_creation_input_tokens": 150,
    "output_tokens": 300,
}
TOTAL = 50 + 1_000 + 150 + 300
PRICE = 50 * 1 + 1_000 * 0.5 + 150 * 2 + 300 * 4  # 2,050 micro-dollars


def message_json(text="ok"):
    return {
        "id": "m1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": USAGE,
    }


def message_sse(cut=False):
    start = {**message_json(), "content": [], "stop_reason": None}
    start["usage"] = {**USAGE, "output_tokens": 1}
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "ok"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    if not cut:
        events += [
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 300},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


class Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that loses its connection after ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self):
        yield self.data
        raise httpx.ReadError("connection lost")

    async def __aiter__(self):
        yield self.data
        raise httpx.ReadError("connection lost")


class Server:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.cut = False
        self.lost: str | None = None  # "before" the response, or "during" a stream
        self.text = "ok"  # the text of a message answered whole

    def __call__(self, request):
        body = json.loads(request.content or b"{}")
        self.requests.append(body)
        if self.lost == "before":
            raise httpx.ReadError("connection lost", request=request)
        if self.lost == "during":
            data = message_sse(cut=True).encode()
            headers = {"content-type": "text/event-stream"}
            return httpx.Response(200, stream=Broken(data), headers=headers)
        if self.status != 200:
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "no"}}
            return httpx.Response(self.status, json=error)
        if body.get("stream"):
            return httpx.Response(
                200, text=message_sse(self.cut), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, json=message_json(self.text))


def make(kind, server, **gate):
    transport = httpx.MockTransport(server)
    if kind == "async":
        client = anthropic.AsyncAnthropic(
            api_key="k", max_retries=0, http_client=httpx.AsyncClient(transport=transport)
        )
    else:
        client = anthropic.Anthropic(
            api_key="k", max_retries=0, http_client=httpx.Client(transport=transport)
        )
    return guard(client, **gate)


@pytest.fixture
def budgets():
    return AtomicTokenBudget(100_000), AtomicTokenBudget(1_000_000), AtomicBudget(4)


def gate_for(budgets):
    tokens, dollars, slots = budgets
    return {"tokens": tokens, "dollars": dollars, "guards": {slots: 1}, "prices": TABLE}


REQUEST = {"model": "claude-test", "max_tokens": 100, "messages": MESSAGES}
KINDS = ["sync", "async"]


async def create(kind, client, **extra):
    if kind == "async":
        return await client.messages.create(**REQUEST, **extra)
    return await asyncio.to_thread(lambda: client.messages.create(**REQUEST, **extra))


async def drain(kind, stream):
    if kind == "async":
        return [event.type async for event in stream]
    return await asyncio.to_thread(lambda: [event.type for event in stream])


async def open_stream(kind, client):
    if kind == "async":
        async with client.messages.stream(**REQUEST):
            pass
    else:

        def enter():
            with client.messages.stream(**REQUEST):
                pass

        await asyncio.to_thread(enter)


def check(budgets, consumed, price, slots_free=4):
    tokens, dollars, slots = budgets
    assert (tokens.consumed, tokens.available) == (consumed, 100_000 - consumed)
    assert (dollars.consumed, dollars.available) == (price, 1_000_000 - price)
    assert slots.available == slots_free


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_message_settles_its_usage_with_the_cache_counts_added(kind, budgets):
    server = Server()
    client = make(kind, server, **gate_for(budgets))
    message = await create(kind, client)
    assert message.content[0].text == "ok"
    assert len(server.requests) == 1
    check(budgets, TOTAL, PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cut", [False, True], ids=["complete", "cut"])
async def test_a_streamed_create_settles_at_its_final_usage_or_its_estimate(kind, cut, budgets):
    server = Server()
    server.cut = cut
    client = make(kind, server, **gate_for(budgets))
    stream = await create(kind, client, stream=True)
    tokens, dollars, slots = budgets
    assert (tokens.available, dollars.available, slots.available) == (  # held while it streams
        100_000 - ESTIMATE,
        1_000_000 - ESTIMATE_PRICE,
        3,
    )
    seen = await drain(kind, stream)
    assert ("message_stop" in seen) is not cut
    if cut:
        check(budgets, ESTIMATE, ESTIMATE_PRICE)
    else:
        check(budgets, TOTAL, PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cut", [False, True], ids=["complete", "cut"])
async def test_messages_stream_settles_when_its_block_ends(kind, cut, budgets):
    server = Server()
    server.cut = cut
    client = make(kind, server, **gate_for(budgets))
    if kind == "async":
        async with client.messages.stream(**REQUEST) as stream:
            text = [chunk async for chunk in stream.text_stream]
    else:

        def read():
            with client.messages.stream(**REQUEST) as stream:
                return list(stream.text_stream)

        text = await asyncio.to_thread(read)
    assert "".join(text) == "ok"
    assert len(server.requests) == 1
    if cut:
        check(budgets, ESTIMATE, ESTIMATE_PRICE)
    else:
        check(budgets, TOTAL, PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [429, 500, 529])
async def test_an_error_status_refunds_everything(kind, status, budgets):
    server = Server()
    server.status = status
    client = make(kind, server, **gate_for(budgets))
    with pytest.raises(anthropic.APIStatusError):
        await create(kind, client)
    with pytest.raises(anthropic.APIStatusError):
        await open_stream(kind, client)
    assert len(server.requests) == 2
    check(budgets, 0, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_lost_connection_is_charged_at_the_estimate(kind, budgets):
    # Whether a request whose connection failed reached the model cannot be known: it may have
    # been billed, so the gate charges the estimate (and releases the guards).
    server = Server()
    server.lost = "before"
    client = make(kind, server, **gate_for(budgets))
    with pytest.raises(anthropic.APIConnectionError):
        await create(kind, client)
    assert len(server.requests) == 1
    check(budgets, ESTIMATE, ESTIMATE_PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["create", "stream"])
async def test_a_stream_whose_connection_drops_is_charged_at_the_estimate(kind, how, budgets):
    # The connection drops after the first events, which carry a partial usage: the request
    # was billed for more than that, so the estimate is charged, once.
    server = Server()
    server.lost = "during"
    client = make(kind, server, **gate_for(budgets))

    async def read_all():
        if how == "create":
            await drain(kind, await create(kind, client, stream=True))
        elif kind == "async":
            async with client.messages.stream(**REQUEST) as stream:
                await stream.get_final_message()
        else:

            def read():
                with client.messages.stream(**REQUEST) as stream:
                    stream.get_final_message()

            await asyncio.to_thread(read)

    with pytest.raises(httpx.ReadError):
        await read_all()
    assert len(server.requests) == 1
    check(budgets, ESTIMATE, ESTIMATE_PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_denial_raises_and_sends_nothing(kind, budgets):
    tokens, dollars, slots = budgets
    assert slots.try_reserve_sync(4)
    server = Server()
    client = make(kind, server, **gate_for(budgets))
    with pytest.raises(BudgetExhausted) as denied:
        await create(kind, client)
    assert denied.value.budget is slots
    assert server.requests == []
    assert (tokens.available, dollars.available) == (100_000, 1_000_000)


@pytest.mark.asyncio
async def test_wait_lets_a_call_proceed_once_room_appears():
    tokens = AtomicTokenBudget(ESTIMATE)
    server = Server()
    client = make("async", server, tokens=tokens, wait=20.0)
    held = tokens.try_reserve_tokens_sync(ESTIMATE)  # another call's estimate
    call = asyncio.create_task(client.messages.create(**REQUEST))
    await asyncio.sleep(0.05)
    assert not call.done()
    assert server.requests == []  # not sent while it waits
    del held  # refunded: room for the waiting call
    await asyncio.wait_for(call, 20.0)
    assert len(server.requests) == 1
    assert tokens.consumed == TOTAL


@pytest.mark.asyncio
async def test_messages_given_as_an_iterator_reach_the_api(budgets):
    server = Server()
    client = make("async", server, **gate_for(budgets))
    request = {**REQUEST, "messages": iter(MESSAGES)}
    async with client.messages.stream(**request) as stream:
        await stream.get_final_message()
    await client.messages.create(**{**REQUEST, "messages": iter(MESSAGES)})
    assert [sent["messages"] for sent in server.requests] == [MESSAGES, MESSAGES]
    check(budgets, 2 * TOTAL, 2 * PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("helper", ["parse", "beta.create", "beta.parse", "beta.stream"])
async def test_parse_and_the_beta_messages_are_gated(kind, helper, budgets):
    # Structured outputs (parse) send their own request, not through create; the beta
    # namespace has its own create, parse and stream. Each is gated and settled.
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    server = Server()
    server.text = '{"text": "ok"}'
    client = make(kind, server, **gate_for(budgets))
    messages = client.beta.messages if helper.startswith("beta.") else client.messages

    def run_sync():
        if helper.endswith("parse"):
            reply = messages.parse(**REQUEST, output_format=Answer)
            assert reply.parsed_output == Answer(text="ok")
        elif helper == "beta.create":
            messages.create(**REQUEST)
        else:
            with messages.stream(**REQUEST) as stream:
                stream.until_done()

    async def run_async():
        if helper.endswith("parse"):
            reply = await messages.parse(**REQUEST, output_format=Answer)
            assert reply.parsed_output == Answer(text="ok")
        elif helper == "beta.create":
            await messages.create(**REQUEST)
        else:
            async with messages.stream(**REQUEST) as stream:
                await stream.until_done()

    await (run_async() if kind == "async" else asyncio.to_thread(run_sync))
    assert len(server.requests) == 1
    check(budgets, TOTAL, PRICE)

    slots = budgets[2]
    assert slots.try_reserve_sync(4)  # a denial sends nothing
    with pytest.raises(BudgetExhausted):
        await (run_async() if kind == "async" else asyncio.to_thread(run_sync))
    assert len(server.requests) == 1
    check(budgets, TOTAL, PRICE, slots_free=0)  # nothing more was taken
    slots.release_sync(4)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_raw_response_settles_the_usage_it_parses_to(kind, budgets):
    # with_raw_response goes through create: the gate parses the response (the SDK keeps it for
    # the caller's own parse()) and settles its usage.
    server = Server()
    client = make(kind, server, **gate_for(budgets))
    raw = client.messages.with_raw_response
    if kind == "async":
        response = await raw.create(**REQUEST)
        message = await response.parse()
    else:
        response = await asyncio.to_thread(lambda: raw.create(**REQUEST))
        message = response.parse()
    assert message.usage.output_tokens == 300
    assert len(server.requests) == 1
    check(budgets, TOTAL, PRICE)
