"""Failures around a gated call, on every gate (spec 11a; issue 12 point 15).

- A call none of whose attempts can have reached the provider (a bad keyword argument, a refused
  connection or a DNS failure on every attempt of the SDK's own retries) refunds everything; if
  any attempt may have reached it (a connection lost after sending), the estimate is charged.
- google-genai over aiohttp: an error status (429) is read from ``APIError.code`` and refunded.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import socket

import anthropic
import openai
import pytest
from costbound import AtomicBudget, AtomicTokenBudget
from costbound.integrations import anthropic as anthropic_gate
from costbound.integrations import openai as openai_gate

KINDS = ["sync", "async"]
SDKS = [openai, anthropic]
MESSAGES = [{"role": "user", "content": "x" * 400}]  # 129 input tokens
ESTIMATE = 129 + 100


def _flavour(sdk):
    return importlib.import_module(sdk.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])


def _answer(sdk, httpx):
    if sdk is openai:
        body = {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "ok"},
                }
            ],
            "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35},
        }
    else:
        body = {
            "id": "m1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 30, "output_tokens": 5},
        }
    return httpx.Response(200, json=body)


class Script:
    """A transport handler that plays one outcome per attempt: answer, fail, or refuse."""

    def __init__(self, sdk, outcomes) -> None:
        self.sdk = sdk
        self.httpx = _flavour(sdk)
        self.outcomes = list(outcomes)
        self.seen = 0  # attempts that reached the transport

    def __call__(self, request):
        outcome = self.outcomes.pop(0)
        self.seen += 1
        httpx = self.httpx
        if outcome == "refused":  # as a refused connection or a failed DNS lookup raise it
            raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)
        if outcome == "connect-timeout":
            raise httpx.ConnectTimeout("timed out connecting", request=request)
        if outcome == "lost":  # the request went out, the answer never came
            raise httpx.ReadError("connection lost", request=request)
        if outcome == "500":
            return httpx.Response(500, json={"error": {"message": "no", "type": "x"}})
        return _answer(self.sdk, httpx)


def _client(sdk, kind, handler, retries):
    httpx = _flavour(sdk)
    transport = httpx.MockTransport(handler)
    if kind == "async":
        http, cls = httpx.AsyncClient(transport=transport), sdk.AsyncClient
    else:
        http, cls = httpx.Client(transport=transport), sdk.Client
    return cls(api_key="k", max_retries=retries, http_client=http)


def _guard(sdk, client, **gate):
    return (openai_gate if sdk is openai else anthropic_gate).guard(client, **gate)


def _create(sdk, client, **extra):
    if sdk is openai:
        return client.chat.completions.create(
            model="m", messages=MESSAGES, max_completion_tokens=100, **extra
        )
    return client.messages.create(model="m", messages=MESSAGES, max_tokens=100, **extra)


async def _call(kind, sdk, client, **extra):
    if kind == "async":
        return await _create(sdk, client, **extra)
    return await asyncio.to_thread(lambda: _create(sdk, client, **extra))


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch):
    """The SDKs' retries wait 0.5 s and more between attempts: not in a test."""
    for sdk in SDKS:
        monkeypatch.setattr(sdk._base_client, "INITIAL_RETRY_DELAY", 0.0)


async def _stream_helper(kind, sdk, client, **extra):
    """Enter the SDK's streaming helper (``chat.completions.stream``, ``messages.stream``)."""
    if sdk is openai:
        helper = client.chat.completions.stream
        request = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 100, **extra}
    else:
        helper = client.messages.stream
        request = {"model": "m", "messages": MESSAGES, "max_tokens": 100, **extra}
    if kind == "async":
        async with helper(**request):
            pass
        return

    def enter():
        with helper(**request):
            pass

    await asyncio.to_thread(enter)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("how", ["create", "stream helper"])
async def test_a_bad_keyword_argument_refunds_everything(kind, sdk, how):
    script = Script(sdk, [])
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, kind, script, 2), tokens=tokens, guards={slots: 1})
    send = _call if how == "create" else _stream_helper
    with pytest.raises(TypeError, match="bogus"):
        await send(kind, sdk, client, bogus=1)
    assert script.seen == 0
    assert (tokens.available, tokens.consumed, slots.available) == (100_000, 0, 1)


# Each attempt's outcome; whether the call that failed after them was billed.
FAILURES = {
    "refused once, no retries": (["refused"], 0, False),
    "refused on every attempt": (["refused"] * 3, 2, False),
    "connect timeout on every attempt": (["connect-timeout"] * 3, 2, False),
    "answered 500, then refused": (["500", "refused"], 1, False),
    "lost after sending, then refused": (["lost", "refused", "refused"], 2, True),
    "refused, then lost after sending": (["refused", "lost"], 1, True),
    "lost on every attempt": (["lost"] * 2, 1, True),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("case", list(FAILURES))
async def test_a_call_is_charged_only_if_an_attempt_may_have_reached_the_provider(kind, sdk, case):
    outcomes, retries, charged = FAILURES[case]
    script = Script(sdk, outcomes)
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, kind, script, retries), tokens=tokens, guards={slots: 1})
    with pytest.raises(sdk.APIConnectionError):
        await _call(kind, sdk, client)
    assert script.seen == len(outcomes)  # every attempt was made
    assert tokens.consumed == (ESTIMATE if charged else 0)
    assert tokens.available == 100_000 - tokens.consumed
    assert slots.available == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_a_retried_call_that_succeeds_settles_its_usage(kind, sdk):
    script = Script(sdk, ["lost", "refused", "ok"])
    tokens = AtomicTokenBudget(100_000)
    client = _guard(sdk, _client(sdk, kind, script, 2), tokens=tokens)
    await _call(kind, sdk, client)
    assert tokens.consumed == 35


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_a_copy_with_its_own_http_client_is_observed_too(kind, sdk):
    # with_options(http_client=...) gives the copy another http client: its attempts count too.
    tokens = AtomicTokenBudget(100_000)
    client = _guard(sdk, _client(sdk, kind, Script(sdk, []), 0), tokens=tokens)
    httpx = _flavour(sdk)
    refused = Script(sdk, ["refused"] * 2)
    lost = Script(sdk, ["lost"])
    for script, charged in ((refused, 0), (lost, ESTIMATE)):
        transport = httpx.MockTransport(script)
        http = (
            httpx.AsyncClient(transport=transport)
            if kind == "async"
            else httpx.Client(transport=transport)
        )
        copy = client.with_options(http_client=http, max_retries=len(script.outcomes) - 1)
        with pytest.raises(sdk.APIConnectionError):
            await _call(kind, sdk, copy)
        assert tokens.consumed == charged


def test_the_error_alone_tells_a_single_refused_attempt():
    # Gates that do not hold the SDK client (LangChain's, LiteLLM's, pydantic-ai's capability)
    # judge from the error: an SDK connection error that ended the first and only attempt,
    # failing to connect, sent nothing; after retries the earlier attempts are unknown.
    from costbound.integrations._gate import billed

    httpx = _flavour(openai)

    def error(retry_count: str, cause: BaseException) -> BaseException:
        request = httpx.Request(
            "POST", "https://api.example/v1", headers={"x-stainless-retry-count": retry_count}
        )
        try:
            try:
                raise cause
            except type(cause) as failure:
                raise openai.APIConnectionError(request=request) from failure
        except openai.APIConnectionError as raised:
            return raised

    refused = httpx.ConnectError("refused")
    assert not billed(error("0", refused))
    assert billed(error("2", refused))
    assert billed(error("0", httpx.ReadError("lost")))


# --- google-genai ---------------------------------------------------------------------------

genai = pytest.importorskip("google.genai")
from costbound.integrations import google_genai as genai_gate  # noqa: E402

GENAI_HTTPX = importlib.import_module("httpx")
CONTENTS = "x" * 400  # 100 x 1.25 + 4 = 129
CONFIG = {"max_output_tokens": 100}


def _genai_answer():
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 5, "totalTokenCount": 35},
    }


class GenaiScript:
    def __init__(self, outcomes) -> None:
        self.outcomes = list(outcomes)
        self.seen = 0

    def __call__(self, request):
        self.seen += 1
        outcome = self.outcomes.pop(0)
        if outcome == "refused":
            raise GENAI_HTTPX.ConnectError("refused", request=request)
        if outcome == "lost":  # sent, and no answer in time (google-genai retries timeouts)
            raise GENAI_HTTPX.ReadTimeout("no answer", request=request)
        if outcome == "429":
            error = {"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}
            return GENAI_HTTPX.Response(429, json=error)
        return GENAI_HTTPX.Response(200, json=_genai_answer())


def _genai_client(handler, attempts, **gate):
    transport = GENAI_HTTPX.MockTransport(handler)
    retry = genai.types.HttpRetryOptions(
        attempts=attempts, initial_delay=0.0, max_delay=0.0, jitter=0.0
    )
    options = genai.types.HttpOptions(
        httpx_client=GENAI_HTTPX.Client(transport=transport),
        httpx_async_client=GENAI_HTTPX.AsyncClient(transport=transport),
        retry_options=retry,
    )
    return genai_gate.guard(genai.Client(api_key="k", http_options=options), **gate)


async def _generate(kind, client, **extra):
    request = {"model": "gemini-test", "contents": CONTENTS, "config": CONFIG, **extra}
    if kind == "async":
        return await client.aio.models.generate_content(**request)
    return await asyncio.to_thread(lambda: client.models.generate_content(**request))


GENAI_FAILURES = {
    "refused on every attempt": (["refused"] * 3, GENAI_HTTPX.ConnectError, False),
    "429, then refused": (["429", "refused"], GENAI_HTTPX.ConnectError, False),
    "timed out, then refused": (["lost", "refused"], GENAI_HTTPX.ConnectError, True),
    "refused, then 429": (["refused", "429"], genai.errors.APIError, False),
    "timed out, then 429": (["lost", "429"], genai.errors.APIError, True),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(GENAI_FAILURES))
async def test_google_genai_is_charged_only_if_an_attempt_may_have_reached_it(kind, case):
    outcomes, raised, charged = GENAI_FAILURES[case]
    script = GenaiScript(outcomes)
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _genai_client(script, len(outcomes), tokens=tokens, guards={slots: 1})
    with pytest.raises(raised):
        await _generate(kind, client)
    assert script.seen == len(outcomes)
    assert tokens.consumed == (ESTIMATE if charged else 0)
    assert (tokens.available, slots.available) == (100_000 - tokens.consumed, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_google_genai_bad_keyword_argument_refunds_everything(kind):
    script = GenaiScript([])
    tokens = AtomicTokenBudget(100_000)
    client = _genai_client(script, 1, tokens=tokens)
    with pytest.raises(TypeError, match="bogus"):
        await _generate(kind, client, bogus=1)
    assert script.seen == 0
    assert (tokens.available, tokens.consumed) == (100_000, 0)


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_async_google_genai_over_aiohttp_refunds_an_error_status():
    # Without an httpx client google-genai's async calls go through aiohttp, whose responses
    # have no status_code: a 429 was charged as if it had been billed.
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    seen = []

    async def handle(request):
        seen.append(request.path)
        error = {"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}
        return web.json_response(error, status=429)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
        options = genai.types.HttpOptions(
            base_url=f"http://127.0.0.1:{port}/",
            retry_options=genai.types.HttpRetryOptions(attempts=1),
        )
        client = genai_gate.guard(
            genai.Client(api_key="k", http_options=options), tokens=tokens, guards={slots: 1}
        )
        assert client._api_client._use_aiohttp()  # the path under test
        with pytest.raises(genai.errors.APIError) as raised:
            await client.aio.models.generate_content(
                model="gemini-test", contents=CONTENTS, config=CONFIG
            )
        assert raised.value.code == 429
        assert isinstance(raised.value.response, aiohttp.ClientResponse)
        assert len(seen) == 1
        assert (tokens.available, tokens.consumed, slots.available) == (100_000, 0, 1)

        # A refused connection over aiohttp (nothing listens on the port) refunds too.
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            free = closed.getsockname()[1]
        options = genai.types.HttpOptions(
            base_url=f"http://127.0.0.1:{free}/",
            retry_options=genai.types.HttpRetryOptions(attempts=1),
        )
        client = genai_gate.guard(genai.Client(api_key="k", http_options=options), tokens=tokens)
        with pytest.raises(aiohttp.ClientConnectorError):
            await client.aio.models.generate_content(
                model="gemini-test", contents=CONTENTS, config=CONFIG
            )
        assert (tokens.available, tokens.consumed) == (100_000, 0)
    finally:
        await runner.cleanup()


def test_an_aiohttp_error_status_alone_is_read_by_billed():
    # The error-only judgement (for gates that do not observe the SDK) reads aiohttp's status.
    from types import SimpleNamespace

    from costbound.integrations._gate import billed

    error = Exception("429")
    error.response = SimpleNamespace(status=429)  # type: ignore[attr-defined]
    assert not billed(error)


# --- a settlement that fails after the provider answered (point 15 d) -----------------------


class FailingRecords:
    """A user-written TokenBudget whose store fails when a call is settled.

    Reservations come from an atomic budget (``inner``); ``record_usage`` raises ``BackendError``
    as a Redis budget's does when the server went away after the call was admitted.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.inner = AtomicTokenBudget(capacity)
        self.failed = 0

    async def try_reserve_tokens(self, estimate):
        return self.inner.try_reserve_tokens_sync(estimate)

    def try_reserve_tokens_sync(self, estimate):
        return self.inner.try_reserve_tokens_sync(estimate)

    async def record_usage(self, reservation, prompt, completion):
        self.record_usage_sync(reservation, prompt, completion)

    def record_usage_sync(self, reservation, prompt, completion):
        from costbound import BackendError

        self.failed += 1
        raise BackendError("connection refused")

    async def tokens_consumed(self):
        return self.inner.consumed

    def __repr__(self) -> str:
        return "<FailingRecords>"


SETTLE_FAILED = (
    r"could not settle a .* call on <FailingRecords> \(BackendError: budget backend error"
)


async def _read_stream(kind, stream):
    if kind == "async":
        return [item async for item in stream]
    return await asyncio.to_thread(lambda: list(stream))


def _sse(sdk):
    if sdk is openai:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        events = [
            {
                **chunk,
                "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}],
            },
            {
                **chunk,
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            },
        ]
        return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    start = {
        "id": "m1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
    events = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 1},
        },
        {"type": "message_stop"},
    ]
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("mode", ["whole", "stream", "helper stream", "error status"])
async def test_a_failed_settlement_keeps_the_response_and_warns(kind, sdk, mode):
    httpx = _flavour(sdk)

    def answer(request):
        if mode == "error status":
            return httpx.Response(400, json={"error": {"message": "no", "type": "x"}})
        if json.loads(request.content).get("stream"):
            return httpx.Response(
                200, text=_sse(sdk), headers={"content-type": "text/event-stream"}
            )
        return _answer(sdk, httpx)

    tokens, slots = FailingRecords(), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, kind, answer, 0), tokens=tokens, guards={slots: 1})
    if mode == "whole":
        with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
            response = await _call(kind, sdk, client)
        assert response is not None
    elif mode == "stream":
        stream = await _call(kind, sdk, client, stream=True)
        with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
            items = await _read_stream(kind, stream)
        assert len(items) >= 2
    elif mode == "helper stream":
        await _helper_stream(kind, sdk, client)
    else:  # a refund needs no record: nothing fails, nothing is charged
        with pytest.raises(sdk.BadRequestError):
            await _call(kind, sdk, client)
    assert slots.available == 1
    # The failed record left its reservation armed: closing the pass gave its hold back.
    assert tokens.inner.available == 100_000
    assert tokens.failed == (0 if mode == "error status" else 1)


async def _helper_stream(kind, sdk, client):
    """The SDK's streaming helper read to its end: the text arrives, the warning says why."""
    request = {"model": "m", "messages": MESSAGES}
    if sdk is openai:
        request["max_completion_tokens"] = 100
        helper = client.chat.completions.stream
    else:
        request["max_tokens"] = 100
        helper = client.messages.stream

    async def read_async():
        async with helper(**request) as stream:
            return [event async for event in stream]

    def read():
        with helper(**request) as stream:
            return list(stream)

    with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
        events = await (read_async() if kind == "async" else asyncio.to_thread(read))
    assert events


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_failed_settlement_keeps_the_google_genai_response(kind, stream):
    def answer(request):
        if "alt=sse" in str(request.url):
            body = f"data: {json.dumps(_genai_answer())}\r\n\r\n"
            return GENAI_HTTPX.Response(
                200, text=body, headers={"content-type": "text/event-stream"}
            )
        return GENAI_HTTPX.Response(200, json=_genai_answer())

    tokens, slots = FailingRecords(), AtomicBudget(1)
    client = _genai_client(answer, 1, tokens=tokens, guards={slots: 1})
    request = {"model": "gemini-test", "contents": CONTENTS, "config": CONFIG}

    async def texts():
        if not stream:
            return [(await _generate(kind, client)).text]
        if kind == "async":
            chunks = await client.aio.models.generate_content_stream(**request)
            return [chunk.text async for chunk in chunks]
        chunks = client.models.generate_content_stream
        return await asyncio.to_thread(lambda: [chunk.text for chunk in chunks(**request)])

    with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
        received = await texts()
    assert received == ["ok"]
    assert (slots.available, tokens.inner.available, tokens.failed) == (1, 100_000, 1)


@pytest.mark.asyncio
async def test_a_failed_settlement_keeps_the_langchain_answer():
    pytest.importorskip("langchain")
    from costbound.integrations.langchain import BudgetCallbackHandler, BudgetMiddleware
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    usage = {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}

    def model():
        return GenericFakeChatModel(messages=iter([AIMessage(content="ok", usage_metadata=usage)]))

    messages = {"messages": [{"role": "user", "content": "hello"}]}

    async def ask(run, gate):
        if run.endswith("agent"):
            agent = create_agent(model(), middleware=[BudgetMiddleware(**gate)])
            if run == "sync agent":
                return agent.invoke(messages)["messages"][-1].content
            return (await agent.ainvoke(messages))["messages"][-1].content
        config = {"callbacks": [BudgetCallbackHandler(**gate)]}
        if run == "sync callback":
            return model().invoke("hello", config=config).content
        if run == "sync stream":
            return "".join(chunk.content for chunk in model().stream("hello", config=config))
        if run == "async stream":
            return "".join(
                [chunk.content async for chunk in model().astream("hello", config=config)]
            )
        return (await model().ainvoke("hello", config=config)).content

    runs = (
        "sync agent",
        "async agent",
        "sync callback",
        "async callback",
        "sync stream",
        "async stream",
    )
    for run in runs:
        tokens, slots = FailingRecords(), AtomicBudget(1)
        with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
            answer = await ask(run, {"tokens": tokens, "guards": {slots: 1}})
        assert answer == "ok", run
        assert (slots.available, tokens.inner.available, tokens.failed) == (1, 100_000, 1), run


@pytest.mark.asyncio
async def test_a_failed_settlement_keeps_the_pydantic_ai_answer():
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from costbound.integrations.pydantic_ai import BudgetCapability
    from pydantic_ai.messages import ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.usage import RequestUsage

    def answer(messages, info):
        return ModelResponse(
            parts=[TextPart("ok")], usage=RequestUsage(input_tokens=3, output_tokens=1)
        )

    async def stream(messages, info):
        yield "ok"

    tokens, slots = FailingRecords(), AtomicBudget(1)
    capability = BudgetCapability(tokens=tokens, guards={slots: 1})
    model = FunctionModel(answer, stream_function=stream)
    bot = pydantic_ai.Agent(model, capabilities=[capability])
    with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
        result = await bot.run("hello")
    assert result.output == "ok"
    assert (slots.available, tokens.inner.available, tokens.failed) == (1, 100_000, 1)

    async def streamed():
        async with bot.run_stream("hello") as run:
            return await run.get_output()

    with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
        assert await streamed() == "ok"
    assert (slots.available, tokens.inner.available, tokens.failed) == (1, 100_000, 2)


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:Item.* using the `ReadOnly` qualifier:UserWarning")
async def test_a_failed_settlement_keeps_the_litellm_answer():
    litellm = pytest.importorskip("litellm")
    from costbound.integrations.litellm import BudgetLogger

    litellm.logging_callback_manager._reset_all_callbacks()
    tokens, slots = FailingRecords(), AtomicBudget(1)
    logger = BudgetLogger(tokens=tokens, guards={slots: 1})
    litellm.callbacks = [logger]
    try:

        async def complete():
            response = await litellm.acompletion(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hello"}],
                mock_response="ok",
            )
            for _ in range(2_000):  # LiteLLM logs success in the background
                if not logger._passes:
                    break
                await asyncio.sleep(0.01)
            return response

        with pytest.warns(RuntimeWarning, match=SETTLE_FAILED):
            response = await complete()
        assert response.choices[0].message.content == "ok"
        assert (slots.available, tokens.inner.available, tokens.failed) == (1, 100_000, 1)
    finally:
        litellm.logging_callback_manager._reset_all_callbacks()


def test_a_failed_settlement_on_a_stopped_redis_server_warns_and_releases(redis_server):
    # A real Redis budget: admitted, then the server goes away before the call is settled.
    from costbound.integrations import Gate
    from redis_support import RedisBackend

    redis_server.start()
    backend = RedisBackend(redis_server.url, use_async=False)
    try:
        tokens, slots = backend.tokens(100_000), AtomicBudget(1)
        passed = Gate(tokens=tokens, guards={slots: 1}).enter_sync(
            model=None, prompt="hi", max_output_tokens=10
        )
        redis_server.stop()
        with pytest.warns(
            RuntimeWarning, match=r"could not settle a model call on <RedisTokenBudget"
        ):
            passed.settle_sync({"input_tokens": 3, "output_tokens": 1})
        assert passed.settled
        assert slots.available == 1
    finally:
        redis_server.start()
        backend.close_sync()


@pytest.mark.asyncio
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize(
    ("outcomes", "charged"),
    [(["refused", "refused"], False), (["lost", "refused"], True)],
    ids=["refused on every attempt", "lost, then refused"],
)
async def test_pydantic_ai_capability_tells_a_request_that_never_went_out(sdk, outcomes, charged):
    # BudgetCapability does not guard the model's SDK client, but observes its attempts.
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from costbound.integrations.pydantic_ai import BudgetCapability
    from pydantic_ai.exceptions import ModelAPIError

    script = Script(sdk, outcomes)
    client = _client(sdk, "async", script, len(outcomes) - 1)
    if sdk is openai:
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        model = OpenAIChatModel("m", provider=OpenAIProvider(openai_client=client))
    else:
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        model = AnthropicModel("m", provider=AnthropicProvider(anthropic_client=client))
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    capability = BudgetCapability(tokens=tokens, guards={slots: 1}, max_output_tokens=100)
    bot = pydantic_ai.Agent(model, capabilities=[capability])
    with pytest.raises((ModelAPIError, sdk.APIConnectionError)):
        await bot.run("hello")
    assert script.seen == len(outcomes)
    estimate = 3 + 4 + 100
    assert tokens.consumed == (estimate if charged else 0)
    assert (tokens.available, slots.available) == (100_000 - tokens.consumed, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("outcomes", "raised", "charged"),
    [
        (["429"], genai.errors.APIError, False),
        (["refused"], GENAI_HTTPX.ConnectError, False),
        (["lost", "refused"], GENAI_HTTPX.ConnectError, True),
    ],
    ids=["429", "refused", "timed out, then refused"],
)
async def test_a_google_genai_stream_sends_its_request_when_read(kind, outcomes, raised, charged):
    # generate_content_stream returns before its request goes out: the request is made when the
    # stream is first read, and its failure there is judged by its attempts, as a call's is.
    script = GenaiScript(outcomes)
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _genai_client(script, len(outcomes), tokens=tokens, guards={slots: 1})
    request = {"model": "gemini-test", "contents": CONTENTS, "config": CONFIG}

    async def read():
        if kind == "async":
            return [c async for c in await client.aio.models.generate_content_stream(**request)]
        return await asyncio.to_thread(
            lambda: list(client.models.generate_content_stream(**request))
        )

    with pytest.raises(raised):
        await read()
    assert script.seen == len(outcomes)
    assert tokens.consumed == (ESTIMATE if charged else 0)
    assert (tokens.available, slots.available) == (100_000 - tokens.consumed, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_an_openai_stream_that_fails_after_its_answer_began_is_charged(kind):
    # The request was answered (200) and billed; an error event in the stream does not undo it.
    httpx = _flavour(openai)

    def answer(request):
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        first = {
            **chunk,
            "choices": [{"index": 0, "delta": {"content": "o"}, "finish_reason": None}],
        }
        body = f"data: {json.dumps(first)}\n\n" + 'data: {"error": {"message": "overloaded"}}\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    tokens = AtomicTokenBudget(100_000)
    client = _guard(openai, _client(openai, kind, answer, 0), tokens=tokens)
    stream = await _call(kind, openai, client, stream=True)
    with pytest.raises(openai.APIError, match="overloaded"):
        await _read_stream(kind, stream)
    assert tokens.consumed == ESTIMATE
