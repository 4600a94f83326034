"""Failures around a gated call, on every gate (spec 11a; issue 12 point 15).

- A call none of whose attempts can have reached the provider (a bad keyword argument, a refused
  connection or a DNS failure on every attempt of the SDK's own retries) refunds everything; if
  any attempt may have reached it (a connection lost after sending), the estimate is charged.
- google-genai over aiohttp: an error status (429) is read from ``APIError.code`` and refunded.
"""

from __future__ import annotations

import asyncio
import importlib
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


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_a_bad_keyword_argument_refunds_everything(kind, sdk):
    script = Script(sdk, [])
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, kind, script, 2), tokens=tokens, guards={slots: 1})
    with pytest.raises(TypeError, match="bogus"):
        await _call(kind, sdk, client, bogus=1)
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
