"""``costbound.integrations.litellm.BudgetLogger`` with real LiteLLM, offline (spec section 11).

``acompletion(mock_response=...)`` runs LiteLLM's whole call path without a network: its hooks
and its logging. A success settles exactly the usage LiteLLM reports; an error status (a mocked
``RateLimitError``) refunds everything; a denial raises ``BudgetExhausted`` out of
``acompletion`` before any response exists; ``wait`` lets a call proceed once room appears.
LiteLLM logs successes and failures in the background, so the tests wait for the settlement to
land (with a deadline) before checking it.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from costbound import AtomicBudget, AtomicTokenBudget, BudgetExhausted

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price map fetched
import litellm
from costbound.integrations.litellm import BudgetLogger

MESSAGES = [{"role": "user", "content": "hello"}]

# LiteLLM's own types trip pydantic's warning about ReadOnly TypedDict items: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Item.* using the `ReadOnly` qualifier:UserWarning")


@pytest.fixture
def logger_of():
    """Install a BudgetLogger as LiteLLM's only callback for one test.

    LiteLLM copies ``litellm.callbacks`` into its own success and failure lists on first use,
    so those are reset too, at each install and after: each logger hears its own calls only.
    """
    litellm.logging_callback_manager._reset_all_callbacks()

    def install(**gate):
        litellm.logging_callback_manager._reset_all_callbacks()  # the last one installed, too
        logger = BudgetLogger(**gate)
        litellm.callbacks = [logger]
        return logger

    yield install
    litellm.logging_callback_manager._reset_all_callbacks()


async def settled(logger, what: str) -> None:
    """Wait (setup only, with a deadline) until LiteLLM's background logging settled every pass."""
    deadline = time.monotonic() + 20
    while logger._passes:
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled: {what}")
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_success_settles_the_reported_usage(logger_of):
    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    logger = logger_of(tokens=tokens, guards={slots: 1})
    response = await litellm.acompletion(
        model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=100
    )
    await settled(logger, "the success")
    assert response.choices[0].message.content == "ok"
    total = response.usage.total_tokens
    assert total > 0
    assert (tokens.consumed, tokens.available, slots.available) == (total, 10_000 - total, 1)


@pytest.mark.asyncio
async def test_an_error_status_refunds_everything(logger_of):
    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    logger = logger_of(tokens=tokens, guards={slots: 1})
    with pytest.raises(litellm.RateLimitError):
        await litellm.acompletion(
            model="gpt-4o-mini", messages=MESSAGES, mock_response="litellm.RateLimitError"
        )
    await settled(logger, "the failure")
    assert (tokens.available, tokens.consumed, slots.available) == (10_000, 0, 1)


@pytest.mark.asyncio
async def test_a_denial_raises_before_any_response(logger_of):
    small = AtomicTokenBudget(5)
    logger = logger_of(tokens=small)
    with pytest.raises(BudgetExhausted) as denied:
        await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert denied.value.budget is small
    assert logger._passes == {}
    assert (small.available, small.consumed) == (5, 0)


@pytest.mark.asyncio
async def test_wait_lets_a_call_proceed_once_room_appears(logger_of):
    tokens = AtomicTokenBudget(500)
    logger = logger_of(tokens=tokens, wait=20.0, max_output_tokens=100)
    held = tokens.try_reserve_tokens_sync(500)
    call = asyncio.create_task(
        litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    )
    await asyncio.sleep(0.05)
    assert not call.done()
    del held  # refunded: room for the waiting call
    response = await asyncio.wait_for(call, 20.0)
    await settled(logger, "the waiting call")
    assert tokens.consumed == response.usage.total_tokens


@pytest.mark.asyncio
async def test_a_stream_settles_at_its_usage_or_when_abandoned_at_the_estimate(logger_of):
    import gc

    tokens = AtomicTokenBudget(10_000)
    logger = logger_of(tokens=tokens, max_output_tokens=100)
    stream = await litellm.acompletion(
        model="gpt-4o-mini",
        messages=MESSAGES,
        mock_response="ok then more",
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        usage = getattr(chunk, "usage", None) or usage
    await settled(logger, "the whole stream")
    assert usage is not None
    assert tokens.consumed == usage.total_tokens

    cut = AtomicTokenBudget(10_000)
    logger = logger_of(tokens=cut, max_output_tokens=100)
    stream = await litellm.acompletion(
        model="gpt-4o-mini", messages=MESSAGES, mock_response="ok then more words", stream=True
    )
    async for _ in stream:
        break  # the consumer stops early and drops the stream
    del stream
    deadline = time.monotonic() + 20
    while logger._passes and time.monotonic() < deadline:
        gc.collect()  # the stream's record is freed with it (it sits in a reference cycle)
        await asyncio.sleep(0.01)
    assert cut.consumed == 3 + 4 + 100  # the estimate: "hello", one message, the output bound
    assert cut.available == 10_000 - cut.consumed


@pytest.mark.asyncio
async def test_dollars_are_charged_at_the_price_of_the_reported_usage(logger_of):
    import math
    from fractions import Fraction

    from costbound.prices import Price, PriceTable

    dollars = AtomicTokenBudget(1_000_000)  # micro-dollars
    table = PriceTable({"gpt-4o-mini": Price(input=0.15, output=0.60)})
    logger = logger_of(dollars=dollars, prices=table, max_output_tokens=100)
    response = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    await settled(logger, "the success")
    usage = response.usage
    expected = math.ceil(
        usage.prompt_tokens * Fraction("0.15") + usage.completion_tokens * Fraction("0.60")
    )
    assert (dollars.consumed, dollars.available) == (expected, 1_000_000 - expected)


def openai_client(api):
    """An AsyncOpenAI client over a mock transport, for LiteLLM's ``client=``."""
    import importlib

    import openai

    httpx = importlib.import_module(
        openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
    )
    transport = httpx.MockTransport(lambda request: api(httpx, request))
    return openai.AsyncOpenAI(
        api_key="k", max_retries=0, http_client=httpx.AsyncClient(transport=transport)
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", ["lost", "refused", 429, 500, 200, "denied"])
async def test_through_the_openai_sdk_a_lost_connection_is_charged_at_the_estimate(
    logger_of, answer
):
    # LiteLLM turns the SDK's lost connection into an InternalServerError with a made-up status
    # of 500, caused by the SDK's APIConnectionError: the gate knows it for an unanswered
    # request, which may have been billed, so the estimate is charged. A real 429 or 500 answer
    # refunds; a real 200 settles its usage; a denial sends nothing. A refused connection on the
    # SDK's first and only attempt sent nothing: refunded (issue 12 point 15).
    tokens, slots = AtomicTokenBudget(10_000), AtomicBudget(1)
    logger = logger_of(tokens=tokens, guards={slots: 1}, max_output_tokens=100)
    sent = []

    def api(httpx, request):
        sent.append(request)
        if answer == "lost":
            raise httpx.ReadError("connection lost", request=request)
        if answer == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        if answer in (429, 500):
            return httpx.Response(answer, json={"error": {"message": "no", "type": "server"}})
        usage = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini"}
        return httpx.Response(200, json={**body, "choices": [choice], "usage": usage})

    client = openai_client(api)
    if answer == "denied":
        assert slots.try_reserve_sync(1)  # another call holds the one slot
    # LiteLLM sets the client's retries itself (2 unless told): one request, here.
    call = litellm.acompletion(
        model="openai/gpt-4o-mini", messages=MESSAGES, client=client, api_key="k", max_retries=0
    )
    if answer in ("lost", "refused"):
        with pytest.raises(litellm.InternalServerError) as raised:
            await call
        assert raised.value.status_code == 500
    elif answer == 429:
        with pytest.raises(litellm.RateLimitError):
            await call
    elif answer == 500:
        with pytest.raises(litellm.InternalServerError):
            await call
    elif answer == "denied":
        with pytest.raises(BudgetExhausted) as denied:
            await call
        assert denied.value.budget is slots
        slots.release_sync(1)
    else:
        await call
    await settled(logger, f"the call answered {answer}")
    assert len(sent) == (0 if answer == "denied" else 1)
    expected = {"lost": 3 + 4 + 100, "refused": 0, 429: 0, 500: 0, 200: 35, "denied": 0}[answer]
    assert (tokens.consumed, tokens.available, slots.available) == (
        expected,
        10_000 - expected,
        1,
    )


@pytest.mark.asyncio
async def test_a_synchronous_completion_is_not_gated_and_says_so(logger_of):
    # LiteLLM has no hook that can stop a synchronous completion(): the logger warns instead of
    # letting it through unseen, and charges nothing. An acompletion() is gated without a word.
    import warnings

    tokens = AtomicTokenBudget(10_000)
    logger = logger_of(tokens=tokens)
    with pytest.warns(RuntimeWarning, match="did not gate this LiteLLM call"):
        response = await asyncio.to_thread(
            litellm.completion, model="gpt-4o-mini", messages=MESSAGES, mock_response="ok"
        )
    assert response.choices[0].message.content == "ok"
    assert (tokens.available, tokens.consumed) == (10_000, 0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
        await settled(logger, "the async call")
    assert not [w for w in caught if "did not gate" in str(w.message)]
    assert tokens.consumed > 0
