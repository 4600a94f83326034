"""``costbound.integrations.Gate``: what every LLM-stack gate does around one request (spec 11).

A gate takes every budget a request needs at once (tokens, micro-dollars, guards) within its
``wait``, or raises ``BudgetExhausted`` naming the budget that denied, with nothing held. A pass
is then settled once: at the reported usage (tokens, and its price in micro-dollars), refunded
(an error response), or at its estimate (sent, usage never arrived); the guards are released in
every case. Run on the atomic budgets and the Redis budgets alike.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from costbound import BudgetExhausted, Usage, estimate_tokens
from costbound.integrations import DEFAULT_MAX_OUTPUT_TOKENS, Gate
from costbound.prices import Price, PriceTable

TABLE = PriceTable({"m": Price(input=1.0, output=4.0, cached_input=0.5)})  # USD per M tokens
PROMPT = [{"role": "user", "content": "x" * 400}]  # 100 tokens x 1.25 + 4 = 129 input
INPUT = 129


def _budgets(backend):
    return (
        backend.tokens(100_000),
        backend.tokens(1_000_000),  # micro-dollars
        backend.unit(2),  # a concurrency slot
    )


@pytest.mark.asyncio
async def test_a_pass_settles_at_the_reported_usage_and_releases_the_guards(backend):
    tokens, dollars, slots = _budgets(backend)
    gate = Gate(tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    passed = await gate.enter(model="m", prompt=PROMPT, max_output_tokens=100)
    assert passed.estimate == INPUT + 100
    assert (await backend.state(tokens)).available == 100_000 - (INPUT + 100)
    # the worst case priced: 129 input x 1 + 100 output x 4 = 529 micro-dollars
    assert (await backend.state(dollars)).available == 1_000_000 - 529
    assert (await backend.state(slots)).available == 1
    await passed.settle({"prompt_tokens": 300, "completion_tokens": 50})
    await passed.settle({"prompt_tokens": 1, "completion_tokens": 1})  # once
    await backend.settle(tokens)
    await backend.settle(dollars)
    state = await backend.state(tokens)
    assert (state.available, state.consumed) == (100_000 - 350, 350)
    state = await backend.state(dollars)
    assert (state.available, state.consumed) == (1_000_000 - 500, 500)  # 300 + 50 x 4
    assert (await backend.state(slots)).available == 2


@pytest.mark.asyncio
async def test_an_error_response_refunds_everything(backend):
    tokens, dollars, slots = _budgets(backend)
    gate = Gate(tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    passed = await gate.enter(model="m", prompt=PROMPT, max_output_tokens=100)
    await passed.refund()
    await backend.settle(tokens)
    await backend.settle(dollars)
    for budget, capacity in ((tokens, 100_000), (dollars, 1_000_000), (slots, 2)):
        state = await backend.state(budget)
        assert (state.available, state.consumed) == (capacity, 0)


@pytest.mark.asyncio
async def test_usage_that_never_arrived_is_charged_at_the_estimate(backend):
    tokens, dollars, slots = _budgets(backend)
    gate = Gate(tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    passed = await gate.enter(model="m", prompt=PROMPT, max_output_tokens=100)
    await passed.settle_at_estimate()
    assert (await backend.state(tokens)).consumed == INPUT + 100
    assert (await backend.state(dollars)).consumed == 529
    assert (await backend.state(slots)).available == 2


@pytest.mark.asyncio
async def test_a_usage_that_cannot_be_read_is_charged_at_the_estimate_with_a_warning(backend):
    # A success whose usage costbound cannot read (a new SDK shape, say) was billed all the
    # same: it is charged at the estimate, and the warning names what could not be read.
    tokens, dollars, slots = _budgets(backend)
    gate = Gate(tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    passed = await gate.enter(model="m", prompt=PROMPT, max_output_tokens=100)
    with pytest.warns(RuntimeWarning, match="cannot read the usage of this m response.*object"):
        await passed.settle(object())
    assert passed.settled
    assert (await backend.state(tokens)).consumed == INPUT + 100
    assert (await backend.state(dollars)).consumed == 529
    assert (await backend.state(slots)).available == 2


@pytest.mark.asyncio
async def test_a_denial_names_the_budget_and_holds_nothing(backend):
    tokens, dollars, slots = _budgets(backend)
    assert await slots.try_reserve(2)
    gate = Gate(tokens=tokens, dollars=dollars, guards={slots: 1}, prices=TABLE)
    with pytest.raises(BudgetExhausted) as denied:
        await gate.enter(model="m", prompt=PROMPT, max_output_tokens=100)
    assert denied.value.budget is slots
    assert denied.value.amount == 1
    await backend.settle(tokens)
    assert (await backend.state(tokens)).available == 100_000
    assert (await backend.state(dollars)).available == 1_000_000

    small = backend.tokens(50)
    with pytest.raises(BudgetExhausted) as denied:
        await Gate(tokens=small).enter(model=None, prompt=PROMPT, max_output_tokens=100)
    assert denied.value.budget is small
    assert denied.value.amount == INPUT + 100


@pytest.mark.asyncio
async def test_wait_lets_a_request_proceed_once_another_refund_makes_room(backend):
    tokens = backend.tokens(400)
    gate = Gate(tokens=tokens, wait=20.0)
    first = await gate.enter(model=None, prompt="x" * 400, max_output_tokens=100)  # 225
    entered = asyncio.Event()

    async def second() -> None:
        passed = await gate.enter(model=None, prompt="x" * 400, max_output_tokens=100)
        entered.set()
        await passed.settle({"input_tokens": 10, "output_tokens": 10})

    task = asyncio.create_task(second())
    await asyncio.sleep(0.05)
    assert not entered.is_set()
    await first.refund()
    await asyncio.wait_for(task, 20.0)
    await backend.settle(tokens)
    state = await backend.state(tokens)
    assert (state.available, state.consumed) == (380, 20)


def test_the_blocking_twins(sync_backend):
    tokens = sync_backend.tokens(10_000)
    slots = sync_backend.unit(1)
    gate = Gate(tokens=tokens, guards={slots: 1}, wait=20.0)
    passed = gate.enter_sync(model=None, prompt="hello", max_output_tokens=10)
    done = threading.Event()

    def other() -> None:
        second = gate.enter_sync(model=None, prompt="hello", max_output_tokens=10)
        second.refund_sync()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert not done.wait(0.05)  # the slot is taken
    passed.settle_sync(Usage(prompt=3, completion=4))
    thread.join(20.0)
    assert done.is_set()
    sync_backend.settle_sync(tokens)
    state = sync_backend.state_sync(tokens)
    assert (state.available, state.consumed) == (10_000 - 7, 7)
    assert sync_backend.state_sync(slots).available == 1
    third = gate.enter_sync(model=None, prompt="hello", max_output_tokens=10)
    third.settle_at_estimate_sync()
    assert sync_backend.state_sync(tokens).consumed == 7 + third.estimate


def test_estimates_follow_the_request_the_gate_and_the_estimator():
    from costbound import AtomicTokenBudget

    tokens = AtomicTokenBudget(1_000_000)

    def enter(gate: Gate, **request: object) -> int:
        passed = gate.enter_sync(model=None, prompt="x" * 40, **request)
        passed.refund_sync()
        return passed.estimate

    assert enter(Gate(tokens=tokens)) == estimate_tokens(
        "x" * 40, max_output_tokens=DEFAULT_MAX_OUTPUT_TOKENS
    )
    assert enter(Gate(tokens=tokens, max_output_tokens=64)) == 13 + 64
    assert enter(Gate(tokens=tokens, max_output_tokens=64), max_output_tokens=8) == 13 + 8
    seen = []

    def estimator(prompt: object, bound: int) -> int:
        seen.append((prompt, bound))
        return 1_000

    assert enter(Gate(tokens=tokens, estimator=estimator), max_output_tokens=5) == 1_000
    assert seen == [("x" * 40, 5)]
    assert tokens.available == 1_000_000


def test_gate_arguments_are_checked():
    from costbound import AtomicTokenBudget

    with pytest.raises(ValueError, match="tokens="):
        Gate()
    tokens = AtomicTokenBudget(10)
    with pytest.raises(ValueError, match="wait"):
        Gate(tokens=tokens, wait=-1)
    with pytest.raises(TypeError, match="wait"):
        Gate(tokens=tokens, wait="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_output_tokens"):
        Gate(tokens=tokens, max_output_tokens=-1)
    with pytest.raises(TypeError, match="prices"):
        Gate(tokens=tokens, prices={"m": Price(1, 1)})  # type: ignore[arg-type]
    dollars = AtomicTokenBudget(10)
    with pytest.raises(ValueError, match="model"):
        Gate(dollars=dollars, prices=TABLE).enter_sync(model=None, prompt="x")
    with pytest.raises(ValueError, match="unknown-model"):
        Gate(dollars=dollars, prices=TABLE).enter_sync(model="unknown-model", prompt="x")
    assert dollars.available == 10  # nothing taken by a request that could not be priced


def test_which_failures_count_as_billed():
    # The SDKs' own error types: an answered error status was not billed; an unanswered request
    # (lost connection, timeout) may have been, whatever status LiteLLM makes up for it.
    import importlib

    import litellm
    import openai
    from costbound.integrations._gate import billed

    httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])

    request = httpx.Request("POST", "https://api.example/v1")
    answered = openai.RateLimitError(
        "slow down", response=httpx.Response(429, request=request), body=None
    )
    assert not billed(answered)
    assert not billed(
        openai.InternalServerError("no", response=httpx.Response(500, request=request), body=None)
    )
    assert billed(openai.APIConnectionError(request=request))
    assert billed(openai.APITimeoutError(request=request))
    assert billed(litellm.APIConnectionError("lost", llm_provider="openai", model="m"))
    assert billed(litellm.Timeout("slow", model="m", llm_provider="openai"))
    assert billed(ConnectionResetError("lost"))
    assert billed(asyncio.CancelledError())

    # LiteLLM's made-up "500" for a connection the SDK lost: its context is the SDK's error.
    def wrap_lost_connection():
        try:
            raise openai.APIConnectionError(request=request)
        except openai.APIConnectionError:
            raise litellm.InternalServerError("lost", llm_provider="openai", model="m")  # noqa: B904

    with pytest.raises(litellm.InternalServerError) as wrapped:
        wrap_lost_connection()
    assert wrapped.value.status_code == 500
    assert billed(wrapped.value)


def test_a_pass_dropped_unsettled_is_charged_at_the_estimate(sync_backend):
    # A stream never read, say: its request went out and was billed. Dropping its pass charges
    # the estimate on every backend alike (issue 12 point 14: a Redis reservation was refunded)
    # and frees the atomic guards' units: a concurrency slot must not leak. The collector must
    # not wait on a network or a lock: a Redis reservation is charged by ending its lease with
    # nothing refunded, sent with the budget's next call.
    import gc

    from costbound import AtomicBudget

    tokens = sync_backend.tokens(10_000)
    slots = AtomicBudget(1)  # a process's own concurrency slot, beside budgets of either kind
    gate = Gate(tokens=tokens, guards={slots: 1})
    passed = gate.enter_sync(model=None, prompt="hello", max_output_tokens=10)
    estimate = passed.estimate
    assert slots.available == 0
    del passed
    gc.collect()
    assert slots.available == 1
    sync_backend.settle_sync(tokens)
    assert sync_backend.state_sync(tokens).available == 10_000 - estimate
    if sync_backend.name == "atomic":
        assert sync_backend.state_sync(tokens).consumed == estimate
    again = gate.enter_sync(model=None, prompt="hello", max_output_tokens=10)
    again.refund_sync()
    del again  # settled already: dropping it charges nothing more
    gc.collect()
    sync_backend.settle_sync(tokens)
    assert sync_backend.state_sync(tokens).available == 10_000 - estimate
    assert slots.available == 1


def test_passes_dropped_in_a_reference_cycle_are_charged_at_the_estimate(sync_backend):
    # A pass caught in a reference cycle (a stream the SDK keeps in one, a traceback's frames:
    # a Redis script's first NOSCRIPT did it) is collected together with its reservations, in
    # no set order: a reservation's own drop refunded it before the pass could charge it.
    import gc

    tokens = sync_backend.tokens(10_000)
    gate = Gate(tokens=tokens)
    cycle: list[object] = []
    cycle.append(cycle)
    estimates = 0
    for _ in range(8):
        passed = gate.enter_sync(model=None, prompt="hello", max_output_tokens=10)
        estimates += passed.estimate
        cycle.append(passed)
    del passed, cycle
    gc.collect()
    sync_backend.settle_sync(tokens)
    assert sync_backend.state_sync(tokens).available == 10_000 - estimates
    assert sync_backend.state_sync(tokens).consumed == estimates


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("wait", [float("inf"), 1e300, 2**64])
def test_wait_inf_means_no_timeout(kind, wait):
    # Issue 12 point 11: wait=inf (or a wait too long for any clock) passed validation, then
    # raised OverflowError when the request had to wait. It waits until room is made.
    from costbound import AtomicTokenBudget

    tokens = AtomicTokenBudget(300)
    gate = Gate(tokens=tokens, wait=wait)
    first = gate.enter_sync(model=None, prompt="x" * 400, max_output_tokens=100)  # 225
    entered = threading.Event()

    def second() -> None:
        if kind == "sync":
            passed = gate.enter_sync(model=None, prompt="x" * 400, max_output_tokens=100)
        else:
            passed = asyncio.run(gate.enter(model=None, prompt="x" * 400, max_output_tokens=100))
        entered.set()
        passed.refund_sync()

    thread = threading.Thread(target=second)
    thread.start()
    assert not entered.wait(0.1)  # it waits
    first.refund_sync()
    thread.join(20.0)
    assert entered.is_set()
    assert tokens.available == 300
    with pytest.raises(ValueError, match="wait"):
        Gate(tokens=tokens, wait=float("nan"))


def test_a_wait_beyond_every_float_or_none_is_refused_naming_wait():
    from costbound import AtomicTokenBudget

    tokens = AtomicTokenBudget(300)
    with pytest.raises(ValueError, match="wait"):
        Gate(tokens=tokens, wait=10**400)
    with pytest.raises(TypeError, match="wait"):
        Gate(tokens=tokens, wait=None)  # type: ignore[arg-type]


def test_a_usage_with_impossible_counts_is_charged_at_the_estimate_with_a_warning():
    # A provider (or a proxy) reporting a negative count: the usage cannot be read, the call
    # was billed all the same, and the caller must keep the answer (no ValueError out of it).
    from costbound import AtomicTokenBudget

    tokens = AtomicTokenBudget(10_000)
    passed = Gate(tokens=tokens).enter_sync(model=None, prompt="hello", max_output_tokens=10)
    with pytest.warns(RuntimeWarning, match="cannot read the usage"):
        passed.settle_sync({"prompt_tokens": -1, "completion_tokens": 5})
    assert tokens.consumed == passed.estimate
