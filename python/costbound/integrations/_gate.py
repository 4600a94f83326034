"""``Gate`` and ``Pass``: what every integration does around one model request.

``Gate.enter`` estimates the request, takes every budget it needs at once (as ``admit`` does)
within ``wait`` seconds, and gives a :class:`Pass`; or it raises ``BudgetExhausted`` naming the
budget that denied, and the request must not be sent. The pass is then settled exactly once:

- ``settle(usage)`` after a success: the reported usage on ``tokens``, its price on ``dollars``;
- ``refund()`` after an error response (status 400 and above: the provider did not bill it);
- ``settle_at_estimate()`` when the request was sent but its usage never arrived (a stream cut
  or abandoned, a connection lost after sending): it was billed, so the estimate is charged.

Each of them releases the guards. The ``_sync`` twins do the same with the budgets' blocking
methods. A pass dropped unsettled is charged at the estimate on every budget
(:meth:`Pass.abandon`). Stored guards (Redis, SQLite) are taken as leases, so that a call that
never gives its guard back (abandoned, crashed) loses it only until its lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypedDict

from costbound._admit import (
    AdmissionTimeoutError,
    NeverFitsError,
    admit,
    admit_blocking,
    check_timeout,
    run_to_completion,
    take_now_sync,
)
from costbound._native import NativeRefund
from costbound._protocols import BudgetGuard, TokenBudget
from costbound._reservation import TokenReservation
from costbound._usage import BudgetExhausted, Usage, estimate_tokens, usage_of
from costbound.integrations._attempts import Attempts, chain, connect_failure
from costbound.integrations._leases import (
    LOCK_FREE,
    Leased,
    Renewal,
    leased,
    lends_leases,
    underlying,
)
from costbound.prices import PriceTable, price_of

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "Estimator", "Gate", "GateOptions", "Pass"]

#: The output bound of a request that sets none, when the gate sets none either.
DEFAULT_MAX_OUTPUT_TOKENS = 4096

Estimator = Callable[[object, int], int]
"""``estimator(prompt, max_output_tokens)``: the tokens a request may use, output included."""


class GateOptions(TypedDict, total=False):
    """The keyword arguments of every gate: a :class:`Gate`'s."""

    tokens: TokenBudget | None
    dollars: TokenBudget | None
    guards: Mapping[BudgetGuard, int] | None
    wait: float
    max_output_tokens: int | None
    estimator: Estimator | None
    prices: PriceTable | None


def _check_guards(guards: object) -> None:
    """Refuse ``guards=`` unless it maps each ``BudgetGuard`` to an int cost >= 0."""
    if guards is None:
        return
    if not isinstance(guards, Mapping):
        raise TypeError(
            f"guards must map each BudgetGuard to its cost, not {type(guards).__name__}"
        )
    for guard, cost in guards.items():
        if not isinstance(guard, BudgetGuard):
            raise TypeError(f"guards keys must be BudgetGuard objects, not {type(guard).__name__}")
        if isinstance(cost, bool) or not hasattr(type(cost), "__index__"):
            raise TypeError(f"guards cost of {guard!r} must be an int, not {type(cost).__name__}")
        if operator.index(cost) < 0:
            raise ValueError(f"guards cost of {guard!r} must be >= 0, got {cost}")


class Gate:
    """The budgets one kind of model request needs, and how to estimate it.

    ``tokens`` is a ``TokenBudget`` of tokens, ``dollars`` one of micro-dollars (the request's
    model is priced from ``prices``, or genai-prices when left out), ``guards`` maps each
    ``BudgetGuard`` to its cost (a concurrency slot, a requests-per-minute budget). ``wait`` is
    how long a request may wait for room (0: not at all; ``inf``: with no timeout).
    ``max_output_tokens`` bounds a request that sets no bound of its own.
    """

    def __init__(
        self,
        *,
        tokens: TokenBudget | None = None,
        dollars: TokenBudget | None = None,
        guards: Mapping[BudgetGuard, int] | None = None,
        wait: float = 0.0,
        max_output_tokens: int | None = None,
        estimator: Estimator | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        if tokens is None and dollars is None and not guards:
            raise ValueError("a gate needs tokens=, dollars= or guards=")
        for name, budget in (("tokens", tokens), ("dollars", dollars)):
            if budget is not None and not isinstance(budget, TokenBudget):
                raise TypeError(f"{name} must be a TokenBudget, not {type(budget).__name__}")
        _check_guards(guards)
        if wait is None:
            raise TypeError("wait must be a number of seconds (math.inf to wait without end)")
        # Infinity (or a wait too long for any clock) is no timeout at all: admission's None.
        checked_wait = check_timeout(wait, "wait")
        if max_output_tokens is not None:
            estimate_tokens("", max_output_tokens=max_output_tokens)  # checks it
        if prices is not None and not isinstance(prices, PriceTable):
            raise TypeError(f"prices must be a PriceTable, not {type(prices).__name__}")
        self.tokens = tokens
        self.dollars = dollars
        self.guards = dict(guards or {})
        # The stored guards, taken as leases (worked out once: a gate's guards are fixed).
        self._lending = frozenset(guard for guard in self.guards if lends_leases(guard))
        self.wait: float | None = checked_wait
        self.max_output_tokens = max_output_tokens
        self.estimator = estimator
        self.prices = prices

    def _plan(
        self, model: str | None, prompt: object, max_output_tokens: int | None
    ) -> tuple[dict[Any, int], int]:
        """Work out the token parts to take (budget -> amount) and the token estimate."""
        bound = max_output_tokens
        if bound is None:
            bound = self.max_output_tokens
        if bound is None:
            bound = DEFAULT_MAX_OUTPUT_TOKENS
        if self.estimator is not None:
            total = self.estimator(prompt, bound)
            if isinstance(total, bool) or not isinstance(total, int) or total < 0:
                raise ValueError(f"the estimator must return an int >= 0, got {total!r}")
        else:
            total = estimate_tokens(prompt, max_output_tokens=bound)
        parts: dict[Any, int] = {}
        if self.tokens is not None:
            parts[self.tokens] = total
        if self.dollars is not None:
            if model is None:
                raise ValueError("a gate with dollars= needs the request's model to price it")
            worst = Usage(prompt=max(total - bound, 0), completion=min(bound, total))
            parts[self.dollars] = price_of(worst, model=model, table=self.prices)
        return parts, total

    async def enter(
        self, *, model: str | None, prompt: object, max_output_tokens: int | None = None
    ) -> Pass:
        """Take every budget the request needs, or raise ``BudgetExhausted``."""
        parts, total = self._plan(model, prompt, max_output_tokens)
        try:
            ticket = await admit(
                guards=leased(self.guards, self._lending), tokens=parts, timeout=self.wait
            )
        except (AdmissionTimeoutError, NeverFitsError) as denied:
            raise BudgetExhausted(underlying(denied.budget), denied.amount) from None
        return Pass(self, ticket.reservations, ticket, model, total)

    def enter_sync(
        self, *, model: str | None, prompt: object, max_output_tokens: int | None = None
    ) -> Pass:
        """Do what :meth:`enter` does, on a thread (with the budgets' blocking methods)."""
        parts, total = self._plan(model, prompt, max_output_tokens)
        guards = leased(self.guards, self._lending)
        try:
            if self.wait == 0:  # nothing to wait for: fine on any thread, even a loop's
                ticket = take_now_sync(guards, parts)
            else:
                ticket = admit_blocking(guards=guards, tokens=parts, timeout=self.wait)
        except (AdmissionTimeoutError, NeverFitsError) as denied:
            raise BudgetExhausted(underlying(denied.budget), denied.amount) from None
        return Pass(self, ticket.reservations, ticket, model, total)


#: The SDKs' errors for a request that got no answer: OpenAI's and Anthropic's. LiteLLM's own
#: errors subclass them with a made-up ``status_code`` (500, 408), or wrap them as a made-up
#: "500 Internal Server Error" whose ``__context__`` is the SDK's error.
_UNANSWERED = frozenset({"APIConnectionError", "APITimeoutError"})


def billed(error: BaseException) -> bool:
    """Whether a request that failed with ``error`` was billed, judged from the error alone.

    Not when the provider answered with an error status (400 and above: the SDKs' errors carry
    it as ``status_code``, or on their ``response``, as ``status`` for aiohttp's); anything else
    (a lost connection, a timeout, a cancellation) may have gone out, and counts as billed. An
    error caused by an SDK's connection or timeout error counts as billed whatever status it
    claims, unless that SDK error says it ended the first and only attempt, which failed while
    connecting (nothing was sent).
    """
    for link in chain(error):
        if any(cls.__name__ in _UNANSWERED for cls in type(link).__mro__):
            return not _only_attempt_unsent(link)
    status = getattr(error, "status_code", None)
    response = getattr(error, "response", None)
    if status is None:
        status = getattr(response, "status_code", None)
    if status is None:
        status = getattr(response, "status", None)
    return not (isinstance(status, int) and status >= 400)


def _only_attempt_unsent(error: BaseException) -> bool:
    """Whether an OpenAI or Anthropic connection error ended a single attempt that sent nothing.

    Their requests say which attempt they were (``x-stainless-retry-count``); the earlier
    attempts of a retried call are not known from the error, and may have reached the provider.
    """
    headers = getattr(getattr(error, "request", None), "headers", None)
    first = headers is not None and headers.get("x-stainless-retry-count") == "0"
    cause = error.__cause__
    return first and cause is not None and connect_failure(cause)


def _billed(error: BaseException, attempts: Attempts | None) -> bool:
    verdict = None if attempts is None else attempts.billed(error)
    return billed(error) if verdict is None else verdict


#: (budget, reservation, prompt, completion): one ``record_usage`` of a settlement.
_Charge = tuple[Any, TokenReservation, int, int]


def _planned(
    charges: Callable[[], list[_Charge]], failures: list[tuple[object, Exception]]
) -> list[_Charge]:
    """Work out the charges to record; none (the failure kept) if that raised."""
    try:
        return charges()
    except Exception as error:  # reported with the others: the ticket is still closed
        failures.append(("its usage", error))
        return []


async def _kept(
    failures: list[tuple[object, Exception]],
    budget: object,
    step: Callable[..., Awaitable[object]],
    *args: object,
) -> None:
    """Run one step of a settlement; keep its failure (reported later) rather than raise.

    An async method may raise when it is called as well as when it is awaited.
    """
    try:
        await step(*args)
    except Exception as error:  # the caller keeps the provider's answer
        failures.append((budget, error))


def _kept_sync(
    failures: list[tuple[object, Exception]],
    budget: object,
    step: Callable[..., object],
    *args: object,
) -> None:
    """Do what :func:`_kept` does for a blocking step."""
    try:
        step(*args)
    except Exception as error:
        failures.append((budget, error))


def _record_usage_sync(
    budget: Any,  # noqa: ANN401 - any TokenBudget
    reservation: TokenReservation,
    prompt: int,
    completion: int,
) -> None:
    """Call ``record_usage_sync``, or run ``record_usage`` on a private loop.

    A user-written budget may have only the protocol's async methods (admission does the same).
    """
    method = getattr(budget, "record_usage_sync", None)
    if callable(method):
        method(reservation, prompt, completion)
    else:
        run_to_completion(budget.record_usage(reservation, prompt, completion))


def _charge_now(
    budget: Any,  # noqa: ANN401 - any TokenBudget
    reservation: TokenReservation,
    prompt: int,
    completion: int,
) -> None:
    """Charge an abandoned pass's reservation without waiting (:meth:`Pass.abandon`)."""
    if type(budget) in LOCK_FREE:
        budget.record_usage_sync(reservation, prompt, completion)
        return
    settle_nowait = getattr(budget, "record_usage_nowait", None)
    if callable(settle_nowait):  # a stored budget: queued, sent without blocking
        settle_nowait(reservation, prompt, completion)
        return
    refund = reservation.disarm()
    if refund is None:
        return
    record = getattr(budget, "record_usage_sync", None)
    if isinstance(refund, NativeRefund) and callable(record):
        # Rebuilt around its handle, the reservation is still the native budget's own. If
        # recording raises, the rebuilt one is dropped: its hold goes back, as before.
        record(TokenReservation(reservation.estimate, refund), prompt, completion)
    else:
        refund(0)


#: Settlements under way, each in a task of its own (:meth:`Pass._record`): a task the loop
#: holds only weakly would be collected before it ends once its caller was cancelled.
_SETTLING: set[asyncio.Future[None]] = set()


class _Unraisable:
    """Carries an error to ``sys.unraisablehook``: CPython reports what a finaliser raises."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __del__(self) -> None:
        raise self.error


def _warn(message: str) -> None:
    """Warn of a settlement (``RuntimeWarning``), without ever raising out of it.

    Under a filter that turns warnings into errors (``-W error``, pytest's
    ``filterwarnings = error``) the warning is reported as unraisable instead, as a failing
    refund of a dropped reservation is: raised out of a gated call, it would cost the caller
    the answer the provider billed, after the budgets were settled.
    """
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=5)
    except Warning as error:
        _Unraisable(error)  # dropped at once: its finaliser reports the error


def _charges(
    gate: Gate, reservations: Mapping[Any, TokenReservation], model: str | None, usage: Usage | None
) -> list[_Charge]:
    """(budget, reservation, prompt, completion) to record: usage, or the estimates."""
    charges: list[_Charge] = []
    if gate.tokens is not None:
        r = reservations[gate.tokens]
        used = (usage.prompt, usage.completion) if usage is not None else (r.estimate, 0)
        charges.append((gate.tokens, r, *used))
    if gate.dollars is not None:
        r = reservations[gate.dollars]
        if usage is not None:  # the model was checked when the pass was made
            price = price_of(usage, model=str(model), table=gate.prices)
        else:
            price = r.estimate
        charges.append((gate.dollars, r, price, 0))
    return charges


def _abandon(
    gate: Gate,
    reservations: Mapping[Any, TokenReservation],
    model: str | None,
    guards: Mapping[Any, int],
) -> None:
    """Settle a pass no one else will, from the garbage collector: at the estimate.

    Its request went out (a stream never read, say), and was billed, on every budget alike.
    Nothing here may wait on a network or a lock (the collected thread may hold it):

    - costbound's atomic budgets are lock-free: the estimate is recorded on them and their
      guard units released;
    - a stored token budget that can settle without blocking (``record_usage_nowait``: a
      Redis budget queues it, sent on its loop, with its next call or at exit) is charged
      its estimate as a settlement;
    - a user-written token budget whose reservations are a native budget's (it
      delegates to one) is recorded on with its ``record_usage_sync``: a native refund
      handle gives back its whole hold whatever it is called with, so it cannot charge;
    - any other token budget's reservation is charged its estimate by being refunded
      nothing (its refund called with 0);
    - a stored guard's permit is let go: its lease ends by itself (:class:`Leased`).
    """
    for budget, reservation, prompt, completion in _charges(gate, reservations, model, None):
        with contextlib.suppress(Exception):
            _charge_now(budget, reservation, prompt, completion)
    for guard, cost in guards.items():
        if isinstance(guard, Leased):
            guard.drop()
        elif type(guard) in LOCK_FREE:
            with contextlib.suppress(Exception):
                guard.release_sync(cost)


class Pass:
    """One admitted request. Settle it once: ``settle``, ``refund`` or ``settle_at_estimate``."""

    __slots__ = (
        "__weakref__",
        "_gate",
        "_renewal",
        "_reservations",
        "_ticket",
        "_unsettled",
        "estimate",
        "model",
    )

    def __init__(
        self,
        gate: Gate,
        reservations: Mapping[Any, TokenReservation],
        ticket: Any,  # noqa: ANN401 - a costbound Ticket
        model: str | None,
        estimate: int,
    ) -> None:
        self._gate = gate
        self._reservations = reservations
        self._ticket = ticket
        self.model = model
        self.estimate = estimate
        self._renewal = Renewal.of(ticket.guards, reservations)
        # Settled exactly once: by whoever detaches this first (a settlement), or, when the pass
        # dies unsettled, by the collector calling it. A weakref callback, not ``__del__``: the
        # collector runs it before it finalises anything of a reference cycle the pass may be
        # in, and it holds the reservations, so none of them is finalised (refunding itself)
        # before the pass has charged it.
        self._unsettled = weakref.finalize(self, _abandon, gate, reservations, model, ticket.guards)
        self._unsettled.atexit = False

    def keep_alive_sync(self) -> None:
        """Renew the call's stored leases when half the shortest has passed (streams call it)."""
        renewal = self._renewal
        if renewal is not None and self._unsettled.alive and renewal.due():
            renewal.renew_sync()

    async def keep_alive(self) -> None:
        """Do what :meth:`keep_alive_sync` does, with the budgets' async methods."""
        renewal = self._renewal
        if renewal is not None and self._unsettled.alive and renewal.due():
            await renewal.renew()

    @property
    def settled(self) -> bool:
        """Whether the pass was settled (or refunded)."""
        return not self._unsettled.alive

    def _claim(self) -> bool:
        """Take the settlement; ``False`` if it was taken already (exactly one caller wins)."""
        return self._unsettled.detach() is not None

    def _charges(self, usage: Usage | None) -> list[_Charge]:
        """(budget, reservation, prompt, completion) to record: usage, or the estimates."""
        return _charges(self._gate, self._reservations, self.model, usage)

    def _read(self, usage: object, notes: list[str]) -> Usage | None:
        """``usage_of(usage)``; None (and a note to warn of) when costbound cannot read it.

        The note is warned of once the settlement is done (:meth:`_report`): a warning that a
        filter turns into an error must not stop the charge it announces.
        """
        try:
            return usage_of(usage)
        except (TypeError, ValueError) as error:  # not a usage, or impossible counts
            notes.append(
                f"costbound cannot read the usage of this {self.model or 'model'} response "
                f"({error}); it is charged at its estimate"
            )
            return None

    async def settle(self, usage: object) -> None:
        """Charge what the provider reported (``usage_of(usage)``), release the guards.

        A usage ``usage_of`` cannot read is charged at the estimate, with a ``RuntimeWarning``:
        the call succeeded, and was billed. Settling never raises an ``Exception``: the provider
        answered, and the caller must get its answer. A budget that fails to record (a
        ``BackendError``, a user-written budget's own error) is reported with a
        ``RuntimeWarning``; every other budget is still settled and every guard released.
        """
        if self._claim():
            notes: list[str] = []
            await self._record(lambda: self._charges(self._read(usage, notes)), notes)

    async def settle_at_estimate(self) -> None:
        """Charge the estimates (sent, but no usage arrived), release the guards."""
        if self._claim():
            await self._record(lambda: self._charges(None))

    async def refund(self) -> None:
        """Give everything back (the provider answered with an error), release the guards."""
        if self._claim():
            await self._record(list)

    async def fail(self, error: BaseException, attempts: Attempts | None = None) -> None:
        """Settle a request that raised ``error``: refunded if not billed, else at the estimate.

        ``attempts`` (the SDK's HTTP attempts, when they were observed) tell whether any of them
        may have reached the provider; without them the error alone decides (:func:`billed`).
        """
        if _billed(error, attempts):
            await self.settle_at_estimate()
        else:
            await self.refund()

    async def _record(
        self, charges: Callable[[], list[_Charge]], notes: list[str] | None = None
    ) -> None:
        """Record each charge, then close the ticket (refunds the rest, releases the guards).

        ``notes`` (filled while the charges are worked out) are warned of afterwards. The
        settlement runs in a task of its own, shielded: a caller cancelled while it awaits a
        budget (a TaskGroup, a timeout) is cancelled at once, and the settlement still ends
        (the usage charged, every guard released) instead of stopping half-way with its
        guards held for good.
        """
        settling = asyncio.ensure_future(self._record_now(charges, notes))
        _SETTLING.add(settling)
        settling.add_done_callback(_SETTLING.discard)
        await asyncio.shield(settling)

    async def _record_now(
        self, charges: Callable[[], list[_Charge]], notes: list[str] | None
    ) -> None:
        failures: list[tuple[object, Exception]] = []
        for budget, reservation, prompt, completion in _planned(charges, failures):
            await _kept(failures, budget, budget.record_usage, reservation, prompt, completion)
        await _kept(failures, "its guards", self._ticket.close)
        self._report(failures, notes)

    def settle_sync(self, usage: object) -> None:
        """Do what :meth:`settle` does, with the budgets' blocking methods."""
        if self._claim():
            notes: list[str] = []
            self._record_sync(lambda: self._charges(self._read(usage, notes)), notes)

    def settle_at_estimate_sync(self) -> None:
        """Do what :meth:`settle_at_estimate` does, with the budgets' blocking methods."""
        if self._claim():
            self._record_sync(lambda: self._charges(None))

    def refund_sync(self) -> None:
        """Do what :meth:`refund` does, with the budgets' blocking methods."""
        if self._claim():
            self._record_sync(list)

    def fail_sync(self, error: BaseException, attempts: Attempts | None = None) -> None:
        """Do what :meth:`fail` does, with the budgets' blocking methods."""
        if _billed(error, attempts):
            self.settle_at_estimate_sync()
        else:
            self.refund_sync()

    def _record_sync(
        self, charges: Callable[[], list[_Charge]], notes: list[str] | None = None
    ) -> None:
        failures: list[tuple[object, Exception]] = []
        for budget, reservation, prompt, completion in _planned(charges, failures):
            _kept_sync(
                failures, budget, _record_usage_sync, budget, reservation, prompt, completion
            )
        _kept_sync(failures, "its guards", self._ticket.close_sync)
        self._report(failures, notes)

    def _report(
        self, failures: list[tuple[object, Exception]], notes: list[str] | None = None
    ) -> None:
        """Warn of ``notes`` and of each budget the settlement failed on; raise nothing.

        The budgets are settled by now, and the caller must get the provider's answer: see
        :func:`_warn` for a warning that a filter turns into an error.
        """
        for note in notes or ():
            _warn(note)
        for budget, error in failures:
            where = budget if isinstance(budget, str) else repr(budget)
            _warn(
                f"costbound could not settle a {self.model or 'model'} call on {where} "
                f"({type(error).__name__}: {error}); the caller gets the response all the same. "
                "A Redis budget re-sends a failed settlement with its next call or flush()"
            )

    def abandon(self) -> None:
        """Settle the pass at its estimate now, as the collector does when it is dropped unsettled.

        See :func:`_abandon`; nothing happens if the pass was settled already.
        """
        self._unsettled()

    def __repr__(self) -> str:
        state = "open" if self._unsettled.alive else "settled"
        return f"<Pass {self.model or ''} estimate={self.estimate} {state}>".replace("  ", " ")
