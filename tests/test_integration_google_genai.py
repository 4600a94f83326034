"""``costbound.integrations.google_genai.guard`` with the real google-genai SDK, offline.

The SDK's client runs over an httpx ``MockTransport`` serving canned JSON and server-sent
events, so the SDK's own parsing runs. Gemini's ``candidatesTokenCount`` leaves out thoughts: the
settlement adds them. For ``client.models`` and ``client.aio.models``, ``generate_content`` and
``generate_content_stream``: a success settles exactly the reported usage; a stream at its final
usage; a stream that ends before a finish reason, and a lost connection, at the estimate; a 429
or 500 refunds everything; a denial raises ``BudgetExhausted`` and the transport sees no
request; ``wait`` lets a call proceed once another call's refund makes room.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted, estimate_tokens
from costbound.prices import Price, PriceTable

genai = pytest.importorskip("google.genai")  # Python 3.11 and later (test.txt)
import httpx  # noqa: E402  (the SDK's own dependency)
from costbound.integrations.google_genai import guard  # noqa: E402

TABLE = PriceTable({"gemini-test": Price(input=1, output=4, cached_input=0.5)})
CONTENTS = "x" * 400  # 100 x 1.25 + 4 = 129 input tokens
CONFIG = {"max_output_tokens": 100}
ESTIMATE, ESTIMATE_PRICE = 129 + 100, 129 * 1 + 100 * 4
USAGE = {
    "promptTokenCount": 300,
    "cachedContentTokenCount": 100,
    "candidatesTokenCount": 40,
    "thoughtsTokenCount": 10,
    "totalTokenCount": 350,
}
TOTAL = 350  # 300 prompt (the cache included) + 40 candidates + 10 thoughts
PRICE = 200 * 1 + 100 * 0.5 + 50 * 4  # 450 micro-dollars
KINDS = ["sync", "async"]


def answer(text: str, finished: bool = True, usage: dict | None = None) -> dict:
    candidate: dict = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finished:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": usage or USAGE, "modelVersion": "x"}


class Server:
    """The transport's handler: what it answers, and the requests it saw."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answer: object = 200  # a status, "lost", or "ends-early" for streams

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content or b"{}"))
        if self.answer == "lost":
            raise httpx.ReadError("connection lost", request=request)
        if self.answer in (429, 500):
            error = {"error": {"code": self.answer, "message": "no", "status": "UNAVAILABLE"}}
            return httpx.Response(self.answer, json=error)
        if "alt=sse" not in str(request.url):
            return httpx.Response(200, json=answer("ok"))
        running = {"promptTokenCount": 300, "cachedContentTokenCount": 100, "totalTokenCount": 300}
        chunks = [answer("o", finished=False, usage=running)]
        if self.answer != "ends-early":
            chunks.append(answer("k"))
        body = "".join(f"data: {json.dumps(chunk)}\r\n\r\n" for chunk in chunks)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def make(server: Server, **gate: object) -> genai.Client:
    transport = httpx.MockTransport(server)
    options = genai.types.HttpOptions(
        httpx_client=httpx.Client(transport=transport),
        httpx_async_client=httpx.AsyncClient(transport=transport),
    )
    return guard(genai.Client(api_key="k", http_options=options), **gate)


@pytest.fixture
def budgets():
    return AtomicTokenBudget(100_000), AtomicTokenBudget(1_000_000), AtomicBudget(4)


def gate_for(budgets) -> dict:
    tokens, dollars, slots = budgets
    return {"tokens": tokens, "dollars": dollars, "guards": {slots: 1}, "prices": TABLE}


def check(budgets, consumed: int, price: int, slots_free: int = 4) -> None:
    tokens, dollars, slots = budgets
    assert (tokens.consumed, tokens.available) == (consumed, 100_000 - consumed)
    assert (dollars.consumed, dollars.available) == (price, 1_000_000 - price)
    assert slots.available == slots_free


async def generate(kind: str, client: genai.Client):
    request = {"model": "gemini-test", "contents": CONTENTS, "config": CONFIG}
    if kind == "async":
        return await client.aio.models.generate_content(**request)
    return await asyncio.to_thread(lambda: client.models.generate_content(**request))


async def stream_text(kind: str, client: genai.Client, budgets) -> str:
    """Stream a reply; the slot is held while it streams."""
    request = {"model": "gemini-test", "contents": CONTENTS, "config": CONFIG}
    slots = budgets[2]
    if kind == "async":
        text = ""
        async for chunk in await client.aio.models.generate_content_stream(**request):
            assert slots.available == 3
            text += chunk.text
        return text

    def read() -> str:
        text = ""
        for chunk in client.models.generate_content_stream(**request):
            assert slots.available == 3
            text += chunk.text
        return text

    return await asyncio.to_thread(read)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_success_settles_the_reported_usage_with_thoughts_added(kind, budgets):
    server = Server()
    response = await generate(kind, make(server, **gate_for(budgets)))
    assert response.text == "ok"
    assert len(server.requests) == 1
    check(budgets, TOTAL, PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("answer", [200, "ends-early"], ids=["whole", "ends-early"])
async def test_a_stream_settles_at_its_final_usage_or_its_estimate(kind, answer, budgets):
    # Every chunk carries running counts; they are final only once a candidate finishes.
    server = Server()
    server.answer = answer
    text = await stream_text(kind, make(server, **gate_for(budgets)), budgets)
    assert text == ("ok" if answer == 200 else "o")
    assert len(server.requests) == 1
    if answer == 200:
        check(budgets, TOTAL, PRICE)
    else:
        check(budgets, ESTIMATE, ESTIMATE_PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_read_with_next_and_closed_early_is_charged_at_the_estimate(kind, budgets):
    server = Server()
    client = make(server, **gate_for(budgets))
    request = {"model": "gemini-test", "contents": CONTENTS, "config": CONFIG}
    if kind == "async":
        stream = await client.aio.models.generate_content_stream(**request)
        assert (await anext(stream)).text == "o"
        await stream.aclose()
    else:

        def read() -> None:
            stream = client.models.generate_content_stream(**request)
            assert next(stream).text == "o"
            stream.close()

        await asyncio.to_thread(read)
    check(budgets, ESTIMATE, ESTIMATE_PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [429, 500])
async def test_an_error_status_refunds_everything(kind, status, budgets):
    server = Server()
    server.answer = status
    with pytest.raises(genai.errors.APIError) as raised:
        await generate(kind, make(server, **gate_for(budgets)))
    assert raised.value.code == status
    assert len(server.requests) == 1
    check(budgets, 0, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_lost_connection_is_charged_at_the_estimate(kind, budgets):
    server = Server()
    server.answer = "lost"
    with pytest.raises(httpx.ReadError):
        await generate(kind, make(server, **gate_for(budgets)))
    assert len(server.requests) == 1
    check(budgets, ESTIMATE, ESTIMATE_PRICE)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_denial_raises_and_sends_nothing(kind, budgets):
    slots = budgets[2]
    assert slots.try_reserve_sync(4)
    server = Server()
    client = make(server, **gate_for(budgets))
    with pytest.raises(BudgetExhausted) as denied:
        await generate(kind, client)
    assert denied.value.budget is slots
    with pytest.raises(BudgetExhausted):
        await stream_text(kind, client, budgets)
    assert server.requests == []
    check(budgets, 0, 0, slots_free=0)


@pytest.mark.asyncio
async def test_wait_lets_a_call_proceed_once_room_appears():
    tokens = AtomicTokenBudget(ESTIMATE)
    server = Server()
    client = make(server, tokens=tokens, wait=20.0)
    held = tokens.try_reserve_tokens_sync(ESTIMATE)  # another call's estimate
    call = asyncio.create_task(generate("async", client))
    await asyncio.sleep(0.05)
    assert not call.done()
    assert server.requests == []  # not sent while it waits
    del held  # refunded: room for the waiting call
    await asyncio.wait_for(call, 20.0)
    assert len(server.requests) == 1
    assert tokens.consumed == TOTAL


def test_contents_of_every_shape_are_estimated():
    # A string, a dict with parts, a Content, and an iterator (read once, and sent as read).
    from costbound.integrations.google_genai import _request

    types = genai.types
    content = types.Content(role="user", parts=[types.Part(text="x" * 40)])
    config = types.GenerateContentConfig(system_instruction="y" * 40, max_output_tokens=7)
    for contents in (
        "x" * 40,
        {"role": "user", "parts": [{"text": "x" * 40}]},
        content,
        [content],
        iter([content]),
    ):
        kwargs = {"contents": contents, "config": config}
        prompt, bound = _request(kwargs)
        assert bound == 7
        # 80 characters: 20 tokens x 1.25 = 25, 4 for each of the two messages, 7 of output
        assert estimate_tokens(prompt, max_output_tokens=bound) == 25 + 8 + 7
    assert kwargs["contents"] == [content]  # the iterator was replaced by what was read
