"""Fifty concurrent gated calls on shared budgets (spec section 11, issue 6 item 4).

Plain ``AsyncOpenAI`` calls (through ``costbound.integrations.openai.guard``) and pydantic-ai
runs of its real OpenAI model (through ``BudgetCapability``) share one token budget, one dollar
budget and a 4-slot concurrency guard. One mock transport serves them all, each request with its
own usage, and counts the requests in flight. The transport never sees more than 4 at once, and
at the end the budgets' ``consumed`` equal the sums of what the transport reported: in tokens,
and in micro-dollars priced request by request.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import math
from fractions import Fraction

import openai
import pytest
from costbound import AtomicBudget, AtomicTokenBudget
from costbound.integrations.openai import guard
from costbound.prices import Price, PriceTable

pydantic_ai = pytest.importorskip("pydantic_ai")  # Python 3.11 and later (test.txt)
from costbound.integrations.pydantic_ai import BudgetCapability  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402

httpx = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])

PRICE = Price(input=0.15, output=0.60, cached_input=0.075)
TABLE = PriceTable({"gpt-test": PRICE})
CALLS = 50
SLOTS = 4


class Transport:
    """Answers each chat request with its own usage after a pause; counts what is in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.tokens = 0
        self.micro = 0
        self.requests = 0
        self._serial = itertools.count()

    async def __call__(self, request):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.005)
            n = next(self._serial)
            prompt, cached, completion = 200 + 7 * n, 50 if n % 3 == 0 else 0, 20 + n % 11
            self.requests += 1
            self.tokens += prompt + completion
            exact = (
                (prompt - cached) * Fraction("0.15")
                + cached * Fraction("0.075")
                + completion * Fraction("0.60")
            )
            self.micro += math.ceil(exact)
            body = {
                "id": f"c{n}",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-test",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "ok"},
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            }
            return httpx.Response(200, content=json.dumps(body).encode())
        finally:
            self.in_flight -= 1


@pytest.mark.asyncio
async def test_fifty_gated_calls_share_tokens_dollars_and_four_slots():
    tokens = AtomicTokenBudget(10_000_000)
    dollars = AtomicTokenBudget(10_000_000)  # micro-dollars
    slots = AtomicBudget(SLOTS)
    transport = Transport()
    gate = {
        "tokens": tokens,
        "dollars": dollars,
        "guards": {slots: 1},
        "wait": 60.0,
        "prices": TABLE,
        "max_output_tokens": 256,
    }

    def client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key="k",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(transport)),
        )

    sdk = guard(client(), **gate)
    model = OpenAIChatModel("gpt-test", provider=OpenAIProvider(openai_client=client()))
    agent = pydantic_ai.Agent(model, capabilities=[BudgetCapability(**gate)])

    async def plain(i: int) -> str:
        response = await sdk.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"question {i}"}]
        )
        return response.choices[0].message.content

    async def run(i: int) -> str:
        return (await agent.run(f"question {i}")).output

    results = await asyncio.gather(*(plain(i) if i % 2 else run(i) for i in range(CALLS)))
    assert results == ["ok"] * CALLS
    assert transport.requests == CALLS
    assert transport.peak <= SLOTS
    assert transport.peak > 1  # they did run concurrently
    assert (tokens.consumed, dollars.consumed) == (transport.tokens, transport.micro)
    assert tokens.available == 10_000_000 - transport.tokens
    assert dollars.available == 10_000_000 - transport.micro
    assert slots.available == SLOTS
    print(
        f"\n{CALLS} gated calls, at most {transport.peak} in flight; "
        f"{transport.tokens} tokens, {transport.micro} micro-dollars"
    )
