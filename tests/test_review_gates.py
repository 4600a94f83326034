"""Gates as a demanding user drives them (spec 11, 11a): found by a hostile review.

- A client guarded twice (a copy of an organisation's guarded client, guarded again with a
  user's budget) is gated by both gates: each charges its own budgets once. One gate is never
  entered twice for one call (``create`` calling the client's gated ``post``).
- Under the ``warnings`` filter ``"error"`` (pytest's ``filterwarnings = error``, ``-W error``)
  a settlement that warns still charges what it says (an unreadable usage at the estimate), and
  the caller still gets the provider's answer: the warning turned error goes to
  ``sys.unraisablehook`` rather than out of the call.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import sys
import warnings

import anthropic
import openai
import pytest
from costbound import AtomicBudget, AtomicTokenBudget
from costbound.integrations import anthropic as anthropic_gate
from costbound.integrations import openai as openai_gate
from costbound.prices import Price, PriceTable

KINDS = ["sync", "async"]
SDKS = [openai, anthropic]
MESSAGES = [{"role": "user", "content": "x" * 400}]  # 129 input tokens
ESTIMATE = 129 + 100


def _flavour(sdk):
    return importlib.import_module(sdk.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])


def _answer(sdk, usage):
    if sdk is openai:
        return {
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
            "usage": usage,
        }
    return {
        "id": "m1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


USAGES = {
    openai: {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35},
    anthropic: {"input_tokens": 30, "output_tokens": 5},
}
#: Counts no provider reports: ``usage_of`` refuses them, the call is charged its estimate.
IMPOSSIBLE = {
    openai: {"prompt_tokens": -1, "completion_tokens": 5, "total_tokens": 4},
    anthropic: {"input_tokens": -1, "output_tokens": 5},
}


def _client(sdk, kind, usage):
    httpx = _flavour(sdk)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=_answer(sdk, usage)))
    if kind == "async":
        http, cls = httpx.AsyncClient(transport=transport), sdk.AsyncClient
    else:
        http, cls = httpx.Client(transport=transport), sdk.Client
    return cls(api_key="k", max_retries=0, http_client=http)


def _guard(sdk, client, **gate):
    return (openai_gate if sdk is openai else anthropic_gate).guard(client, **gate)


async def _call(kind, sdk, client):
    def create():
        if sdk is openai:
            return client.chat.completions.create(
                model="m", messages=MESSAGES, max_completion_tokens=100
            )
        return client.messages.create(model="m", messages=MESSAGES, max_tokens=100)

    if kind == "async":
        return await create()
    return await asyncio.to_thread(create)


# --- a client guarded twice -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("how", ["guard of guard", "guarded copy"])
async def test_a_client_guarded_twice_is_charged_by_both_gates(kind, sdk, how):
    org, user = AtomicTokenBudget(100_000), AtomicTokenBudget(100_000)
    org_slots, user_slots = AtomicBudget(1), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, kind, USAGES[sdk]), tokens=org, guards={org_slots: 1})
    if how == "guarded copy":
        client = client.with_options(timeout=5.0)
    client = _guard(sdk, client, tokens=user, guards={user_slots: 1})
    for _ in range(2):
        await _call(kind, sdk, client)
    # Each gate charged the usage of each call once, and gave its slot back.
    assert (org.consumed, user.consumed) == (70, 70)
    assert (org.available, user.available) == (100_000 - 70, 100_000 - 70)
    assert (org_slots.available, user_slots.available) == (1, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_the_inner_gate_of_a_client_guarded_twice_still_denies(kind, sdk):
    from costbound import BudgetExhausted

    org, user = AtomicTokenBudget(100), AtomicTokenBudget(100_000)
    client = _guard(sdk, _client(sdk, kind, USAGES[sdk]), tokens=org)
    client = _guard(sdk, client, tokens=user)
    with pytest.raises(BudgetExhausted) as denied:
        await _call(kind, sdk, client)
    assert denied.value.budget is org
    assert (org.available, user.available) == (100, 100_000)  # the outer hold given back


# --- warnings turned into errors ------------------------------------------------------------


class Unraisable:
    """Collects what reaches ``sys.unraisablehook``."""

    def __init__(self) -> None:
        self.seen: list[BaseException | None] = []

    def __call__(self, unraisable) -> None:
        self.seen.append(unraisable.exc_value)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_an_unreadable_usage_under_a_warnings_error_filter(kind, sdk, monkeypatch):
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, kind, IMPOSSIBLE[sdk]), tokens=tokens, guards={slots: 1})
    hook = Unraisable()
    monkeypatch.setattr(sys, "unraisablehook", hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response = await _call(kind, sdk, client)
    assert response.usage is not None  # the caller got the provider's answer
    # Charged at its estimate, as the warning says, not refunded.
    assert tokens.consumed == ESTIMATE
    assert tokens.available == 100_000 - ESTIMATE
    assert slots.available == 1
    assert len(hook.seen) == 1
    assert isinstance(hook.seen[0], RuntimeWarning)
    assert "cannot read the usage" in str(hook.seen[0])


class FailingRecords:
    """A user-written TokenBudget whose ``record_usage`` raises (its store went away)."""

    def __init__(self) -> None:
        self.inner = AtomicTokenBudget(100_000)

    async def try_reserve_tokens(self, estimate):
        return self.inner.try_reserve_tokens_sync(estimate)

    async def record_usage(self, reservation, prompt, completion):
        raise ConnectionError("store away")

    async def tokens_consumed(self):
        return self.inner.consumed


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_a_failed_settlement_under_a_warnings_error_filter_keeps_the_answer(
    kind, sdk, monkeypatch
):
    failing, tokens, slots = FailingRecords(), AtomicTokenBudget(100_000), AtomicBudget(1)
    prices = PriceTable({"m": Price(input=1, output=1)})
    client = _guard(
        sdk,
        _client(sdk, kind, USAGES[sdk]),
        tokens=tokens,
        dollars=failing,
        guards={slots: 1},
        prices=prices,
    )
    hook = Unraisable()
    monkeypatch.setattr(sys, "unraisablehook", hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response = await _call(kind, sdk, client)
    assert response.usage is not None
    assert tokens.consumed == 35  # every other budget settled
    assert failing.inner.available == 100_000  # the failed one's hold given back
    assert slots.available == 1
    assert [type(error) for error in hook.seen] == [RuntimeWarning]
    assert "could not settle" in str(hook.seen[0])


# --- a stream read in part with next() / anext(), then dropped -------------------------------


def _sse(sdk):
    if sdk is openai:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        delta = {"index": 0, "delta": {"content": "ok"}, "finish_reason": None}
        events = [{**chunk, "choices": [delta]}] * 3
        return "".join(f"data: {json.dumps(e)}\n\n" for e in events)
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
    events = [{"type": "message_start", "message": start}, {"type": "ping"}, {"type": "ping"}]
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


def _streaming_client(sdk, kind):
    httpx = _flavour(sdk)
    headers = {"content-type": "text/event-stream"}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text=_sse(sdk), headers=headers))
    if kind == "async":
        http, cls = httpx.AsyncClient(transport=transport), sdk.AsyncClient
    else:
        http, cls = httpx.Client(transport=transport), sdk.Client
    return cls(api_key="k", max_retries=0, http_client=http)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
async def test_a_stream_read_in_part_and_dropped_is_charged_its_estimate(kind, sdk):
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _guard(sdk, _streaming_client(sdk, kind), tokens=tokens, guards={slots: 1})
    calls = 4
    for _ in range(calls):
        if sdk is openai:
            made = client.chat.completions.create(
                model="m", messages=MESSAGES, max_completion_tokens=100, stream=True
            )
        else:
            made = client.messages.create(model="m", messages=MESSAGES, max_tokens=100, stream=True)
        if kind == "async":
            stream = await made
            await anext(stream)
        else:
            stream = made
            next(stream)
        del stream, made
        gc.collect()
        await asyncio.sleep(0.01)  # an async generator is closed by a task of the loop
    # Each call went out and was billed: charged its estimate, never refunded.
    assert tokens.consumed == calls * ESTIMATE
    assert tokens.available == 100_000 - calls * ESTIMATE
    assert slots.available == 1


# --- a caller cancelled while its call is being settled ----------------------------------------


class SlowRecords:
    """A user-written TokenBudget whose store takes a while to record (a network round trip)."""

    def __init__(self) -> None:
        self.inner = AtomicTokenBudget(100_000)
        self.recording = asyncio.Event()

    async def try_reserve_tokens(self, estimate):
        return self.inner.try_reserve_tokens_sync(estimate)

    async def record_usage(self, reservation, prompt, completion):
        self.recording.set()
        await asyncio.sleep(0.05)
        self.inner.record_usage_sync(reservation, prompt, completion)

    async def tokens_consumed(self):
        return self.inner.consumed


@pytest.mark.asyncio
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_caller_cancelled_during_its_settlement_loses_no_slot_and_no_charge(sdk, cancels):
    slow, slots = SlowRecords(), AtomicBudget(1)
    client = _guard(sdk, _client(sdk, "async", USAGES[sdk]), tokens=slow, guards={slots: 1})
    call = asyncio.create_task(_call("async", sdk, client))
    await slow.recording.wait()
    for _ in range(cancels):  # a TaskGroup or a timeout may cancel more than once
        call.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(100):  # the settlement finishes on its own
        if slots.available == 1:
            break
        await asyncio.sleep(0.01)
    # The provider answered: its usage is charged, and the slot comes back.
    assert slow.inner.consumed == 35
    assert slow.inner.available == 100_000 - 35
    assert slots.available == 1


# --- a stream asked for through with_raw_response / with_streaming_response -------------------


def _full_sse(sdk):
    """A complete stream whose usage comes with its end (OpenAI: 35 tokens; Anthropic: 4)."""
    if sdk is openai:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        delta = {"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}
        events = [{**chunk, "choices": [delta]}, {**chunk, "choices": [], "usage": USAGES[sdk]}]
        return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    text = _sse(sdk)
    end = [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 1},
        },
        {"type": "message_stop"},
    ]
    return text + "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in end)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("view", ["with_raw_response", "with_streaming_response"])
async def test_a_raw_stream_holds_its_slot_and_settles_at_its_usage(kind, sdk, view):
    httpx = _flavour(sdk)
    headers = {"content-type": "text/event-stream"}
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, text=_full_sse(sdk), headers=headers)
    )
    if kind == "async":
        http, cls = httpx.AsyncClient(transport=transport), sdk.AsyncClient
    else:
        http, cls = httpx.Client(transport=transport), sdk.Client
    tokens, slots = AtomicTokenBudget(100_000), AtomicBudget(1)
    client = _guard(
        sdk, cls(api_key="k", max_retries=0, http_client=http), tokens=tokens, guards={slots: 1}
    )
    resource = client.chat.completions if sdk is openai else client.messages
    args = {"model": "m", "messages": MESSAGES, "stream": True}
    args["max_completion_tokens" if sdk is openai else "max_tokens"] = 100
    create = getattr(resource, view).create
    held = []

    async def read(stream):
        if kind == "async":
            return [item async for item in stream]
        return await asyncio.to_thread(lambda: list(stream))

    async def parsed(raw):
        stream = raw.parse()
        return await stream if asyncio.iscoroutine(stream) else stream

    if view == "with_raw_response":
        raw = await create(**args) if kind == "async" else await asyncio.to_thread(create, **args)
        stream = await parsed(raw)
        held.append(slots.available)
        items = await read(stream)
    elif kind == "async":
        async with create(**args) as raw:
            stream = await parsed(raw)
            held.append(slots.available)
            items = await read(stream)
    else:

        def whole():
            with create(**args) as raw:
                stream = raw.parse()
                held.append(slots.available)
                return list(stream)

        items = await asyncio.to_thread(whole)
    assert len(items) >= 2
    assert held == [0]  # the stream was being read: its slot was taken
    used = 35 if sdk is openai else 4
    assert (tokens.consumed, tokens.available) == (used, 100_000 - used)
    assert slots.available == 1


# --- an abandoned call on a user-written budget that delegates to a native one ---------------


class Delegating:
    """A user's TokenBudget that delegates to an atomic one (to log or scope it, say)."""

    def __init__(self) -> None:
        self.inner = AtomicTokenBudget(100_000)

    async def try_reserve_tokens(self, estimate):
        return await self.inner.try_reserve_tokens(estimate)

    def try_reserve_tokens_sync(self, estimate):
        return self.inner.try_reserve_tokens_sync(estimate)

    async def record_usage(self, reservation, prompt, completion):
        await self.inner.record_usage(reservation, prompt, completion)

    def record_usage_sync(self, reservation, prompt, completion):
        self.inner.record_usage_sync(reservation, prompt, completion)

    async def tokens_consumed(self):
        return self.inner.consumed


@pytest.mark.parametrize("sdk", SDKS, ids=lambda s: s.__name__)
def test_an_abandoned_stream_on_a_delegating_budget_is_charged_its_estimate(sdk):
    tokens = Delegating()
    client = _guard(sdk, _streaming_client(sdk, "sync"), tokens=tokens)
    if sdk is openai:
        stream = client.chat.completions.create(
            model="m", messages=MESSAGES, max_completion_tokens=100, stream=True
        )
    else:
        stream = client.messages.create(model="m", messages=MESSAGES, max_tokens=100, stream=True)
    del stream  # never read: its request went out, and was billed
    gc.collect()
    # A native refund handle gives back its whole hold whatever it is called with: the
    # abandoned call must be recorded, not refunded "nothing".
    assert (tokens.inner.consumed, tokens.inner.available) == (ESTIMATE, 100_000 - ESTIMATE)


# --- a gate's bad options are refused when the client is guarded -----------------------------


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"tokens": 5}, TypeError, "tokens"),
        ({"dollars": "x"}, TypeError, "dollars"),
        ({"guards": {AtomicBudget(1): -1}}, ValueError, "guards"),
        ({"guards": {AtomicBudget(1): 1.5}}, TypeError, "guards"),
        ({"guards": {AtomicBudget(1): True}}, TypeError, "guards"),
        ({"guards": {5: 1}}, TypeError, "guards"),
        ({"guards": [AtomicBudget(1)]}, TypeError, "guards"),
    ],
)
def test_a_gate_refuses_bad_options_at_once(options, error, names):
    with pytest.raises(error, match=names):
        openai_gate.guard(_client(openai, "sync", USAGES[openai]), **options)


def test_a_gate_takes_a_numpy_integer_cost():
    numpy = pytest.importorskip("numpy")
    slots = AtomicBudget(2)
    client = openai_gate.guard(
        _client(openai, "sync", USAGES[openai]), guards={slots: numpy.int64(2)}
    )
    client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=100)
    assert slots.available == 2
