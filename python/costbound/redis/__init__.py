"""Budgets that many processes share through Redis: ``RedisBudget`` and ``RedisTokenBudget``.

Install with ``pip install 'costbound[redis]'``. Every object that names the same budget on the
same server is the same budget::

    import redis, redis.asyncio
    from costbound.redis import RedisBudget, RedisTokenBudget

    aclient = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    sclient = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    rows = RedisBudget("acme:rows", capacity=10_000, client=aclient, sync_client=sclient)
    llm = RedisTokenBudget("acme:tokens", capacity=2_000_000, rate=2_000_000 / 60,
                           lease=120.0, client=aclient)

Each operation is one Lua script call (EVALSHA, EVAL when the script is not cached) that reads
Redis's own clock, on keys that share the hash tag ``{name}`` (one cluster slot). ``client``
(asyncio) serves the async methods and ``sync_client`` the ``_sync`` ones.

Token reservations, and the permits that ``reserve()`` gives, are *leases*: each expires
``lease`` seconds after its grant unless ``extend`` pushes it out, and every call on the budget
first reclaims up to 16 expired leases, giving each amount back exactly once. A worker that dies
holding reservations therefore loses nothing for the others. ``try_reserve`` / ``release`` stay
symmetric counters without identity, as in the seed: units a crashed holder took that way come
back only by ``refill`` or ``rate``.

Every call that changes state carries an id made by the client, and the server applies each id
once, keeping its outcome for at least ``max(lease, KEEP_SECONDS)`` seconds: redis-py's own
retries (an ordinary ``redis.Redis(host, port)`` retries a command after a timeout) never take
or give twice. A call that raised ``BackendError`` or was cancelled is made certain by the
library: a ``try_reserve`` or a grant is rolled back by its id, and a ``release``, ``refill``,
``record_usage`` or refund is re-sent with its id on the budget's next call, on ``flush()``,
and at interpreter exit (bounded to 2 seconds in all), as are the refunds of dropped
reservations and the releases of dropped permits. Do not repeat such a call yourself (a
repeated ``release`` gives twice).

Amounts and capacities are exact up to ``2**53 - 1`` (Lua's numbers are doubles); a capacity
above that is a ValueError, and sums saturate there. The rate is stored as a fraction p/q per
second with ``q * (p + 1) < 2**33``: a ratio of small integers such as ``100 / 60`` is exact.
"""

from __future__ import annotations

import asyncio
import contextlib

from costbound import _outbox
from costbound._admit import _refuse_on_a_loop
from costbound._errors import BackendError
from costbound._reservation import TokenReservation
from costbound.redis._core import (
    MAX_AMOUNT,
    Core,
    Lease,
    amount,
    lease_micros,
    rate_fraction,
    seconds,
)
from costbound.redis._held import (
    RedisPermit,
    RedisReservation,
    Snapshot,
    _Request,
    owe_or_unclaim,
    owed_figure,
    snapshot_of,
)
from costbound.redis._script import (
    EXTEND,
    GIVE,
    KEEP_SECONDS,
    LEASE,
    REFILL,
    SETTLE,
    SNAPSHOT,
    TAKE,
    UNLEASE,
)
from costbound.redis._wait import Denied, check_fits, shielded

__all__ = [
    "KEEP_SECONDS",
    "MAX_AMOUNT",
    "RedisBudget",
    "RedisPermit",
    "RedisReservation",
    "RedisTokenBudget",
    "Snapshot",
]


class _RedisBase:
    """What both Redis budgets have: configuration, refill, snapshot, extend and leases."""

    _KIND = ""
    _MAX_CAPACITY = MAX_AMOUNT

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        rate: float = 0.0,
        lease: float = 120.0,
        client: object = None,
        sync_client: object = None,
        reconfigure: bool = False,
    ) -> None:
        owner = type(self).__name__
        capacity = amount(capacity, "capacity", self._MAX_CAPACITY)
        fraction = rate_fraction(rate)
        micros = lease_micros(lease)
        self._core = Core(
            owner,
            name=name,
            kind=self._KIND,
            capacity=capacity,
            rate=fraction,
            lease_micros=micros,
            client=client,
            sync_client=sync_client,
            reconfigure=bool(reconfigure),
        )
        self._lease_seconds = micros / 1e6

    @property
    def name(self) -> str:
        """The budget's name; its keys are ``{name}``, ``{name}:leases``, ... (one hash tag)."""
        return self._core.name

    @property
    def capacity(self) -> int:
        """The capacity this object was made with (``snapshot()`` gives the stored one)."""
        return self._core.capacity

    @property
    def rate(self) -> float:
        """Units per second that flow back, as this object stores it (a fraction p/q)."""
        return float(self._core.rate)

    @property
    def lease(self) -> float:
        """Seconds a lease lasts after its grant unless extended."""
        return self._lease_seconds

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key this budget touches (all in one cluster slot)."""
        return self._core.keys

    async def refill(self) -> None:
        """Add ``capacity`` to the balance, capped at ``capacity`` (debt is paid first).

        On ``BackendError`` the refill is kept and re-sent with its id (next call, ``flush()``,
        exit): do not call it again for the same refill.
        """
        await self._core.call("refill", REFILL, _outbox.next_id())

    def refill_sync(self) -> None:
        """Do what :meth:`refill` does, with the blocking client."""
        self._core.call_sync("refill_sync", REFILL, _outbox.next_id())

    async def snapshot(self) -> Snapshot:
        """Read the budget's state as the server holds it now."""
        return snapshot_of(await self._core.call("snapshot", SNAPSHOT))

    def snapshot_sync(self) -> Snapshot:
        """Do what :meth:`snapshot` does, with the blocking client."""
        return snapshot_of(self._core.call_sync("snapshot_sync", SNAPSHOT))

    async def flush(self) -> None:
        """Send now every call this object still owes the server, each with its first id.

        That is: refunds of dropped reservations and releases of dropped permits, releases,
        refills and settlements that raised ``BackendError``, and rollbacks of grants whose
        caller was cancelled or timed out. They otherwise go with the budget's next call, in
        the background on the event loop, and at interpreter exit. Raises ``BackendError``
        (keeping them) when the server cannot be reached.
        """
        await self._core.flush()

    def flush_sync(self) -> None:
        """Do what :meth:`flush` does, with the blocking client."""
        self._core.flush_sync()

    def _held_lease(self, held: object, method: str) -> Lease:
        lease = getattr(held, "_lease", None)
        if not isinstance(lease, Lease) or lease.name != self._core.name:
            raise ValueError(f"{method}: {held!r} was not issued by the budget {self.name!r}")
        return lease

    def _extend_args(self, held: object, duration: object, method: str) -> tuple[str, str, int]:
        extra = seconds(duration, "seconds", finite=True)
        lease = self._held_lease(held, method)
        if lease.used:
            raise ValueError(f"{method}: the lease {lease.id} was already settled")
        return _outbox.next_id(), lease.member, round((extra or 0.0) * 1e6)

    async def extend(self, held: RedisReservation | RedisPermit, seconds: float) -> bool:
        """Make the lease of ``held`` expire ``seconds`` from now (server time).

        ``False`` when the lease had already expired and was reclaimed: its amount is back in
        the budget, and a later ``record_usage`` charges the actual usage once.
        """
        reply = await self._core.call("extend", EXTEND, *self._extend_args(held, seconds, "extend"))
        return bool(reply[0] == 1)

    def extend_sync(self, held: RedisReservation | RedisPermit, seconds: float) -> bool:
        """Do what :meth:`extend` does, with the blocking client."""
        args = self._extend_args(held, seconds, "extend_sync")
        return bool(self._core.call_sync("extend_sync", EXTEND, *args)[0] == 1)

    async def _try_lease(self, method: str, wanted: int, waiting: bool) -> Lease | Denied:
        core = self._core
        lease = core.lease(_outbox.next_id(), wanted, asyncio.get_running_loop())
        reply = await core.call(method, LEASE, lease.id, wanted, core.lease_micros, waiting=waiting)
        return lease if reply[0] == 1 else core.denied(reply, wanted)

    def _try_lease_sync(self, method: str, wanted: int, waiting: bool) -> Lease | Denied:
        core = self._core
        lease = core.lease(_outbox.next_id(), wanted, None)
        reply = core.call_sync(method, LEASE, lease.id, wanted, core.lease_micros, waiting=waiting)
        return lease if reply[0] == 1 else core.denied(reply, wanted)

    async def _acquire(self, method: str, wanted: int, timeout: float | None) -> Lease:
        core = self._core
        if wanted > MAX_AMOUNT:
            raise ValueError(f"{wanted} is above every Redis budget's capacity: it can never fit")
        if not core.queued():
            # Shielded: a cancellation that races the grant gives it back at once.
            verdict = await shielded(lambda: self._try_lease(method, wanted, False))
            if isinstance(verdict, Lease):
                return verdict
            check_fits(verdict, wanted)
            if timeout == 0:
                raise TimeoutError(f"no room in {core.name!r} (timeout=0)")

        async def attempt() -> Lease | Denied:
            return await self._try_lease(method, wanted, True)

        return await core.wait(attempt, wanted, timeout)

    def _acquire_sync(self, method: str, wanted: int, timeout: float | None) -> Lease:
        waiting = method.removesuffix("_blocking")
        _refuse_on_a_loop(f"{type(self).__name__}.{method}", f"await budget.{waiting}(...)")
        core = self._core
        if wanted > MAX_AMOUNT:
            raise ValueError(f"{wanted} is above every Redis budget's capacity: it can never fit")
        if not core.queued():
            verdict = self._try_lease_sync(method, wanted, False)
            if isinstance(verdict, Lease):
                return verdict
            check_fits(verdict, wanted)
            if timeout == 0:
                raise TimeoutError(f"no room in {core.name!r} (timeout=0)")
        return core.wait_blocking(
            lambda: self._try_lease_sync(method, wanted, True), wanted, timeout
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} capacity={self.capacity} rate={self.rate:g} "
            f"lease={self.lease:g}>"
        )


class RedisBudget(_RedisBase):
    """A ``BudgetGuard`` of unit costs (rows, requests, slots) shared through Redis.

    ``try_reserve`` / ``release`` are symmetric counters, as on ``AtomicBudget``. ``reserve``
    waits for room and gives a :class:`RedisPermit`, a lease that comes back by itself if its
    holder dies.
    """

    _KIND = "u"

    async def try_reserve(self, cost: int) -> bool:
        """Take ``cost`` if it fits and no waiter of this process is queued; else ``False``.

        Cancelled, or failed with ``BackendError``, after it may have been sent: the take is
        rolled back by its id (undone if the server applied it, refused if it arrives later).
        """
        cost = amount(cost, "cost")
        core = self._core
        if cost > MAX_AMOUNT or core.queue:
            return False
        return bool((await core.call("try_reserve", TAKE, _outbox.next_id(), cost))[0] == 1)

    def try_reserve_sync(self, cost: int) -> bool:
        """Do what :meth:`try_reserve` does, with the blocking client."""
        cost = amount(cost, "cost")
        core = self._core
        if cost > MAX_AMOUNT or core.queue:
            return False
        return bool(core.call_sync("try_reserve_sync", TAKE, _outbox.next_id(), cost)[0] == 1)

    async def release(self, cost: int) -> None:
        """Give ``cost`` back; the balance never exceeds the capacity.

        On ``BackendError`` (or a cancellation) the release is kept and re-sent with its id by
        the budget's next call, ``flush()`` or the exit: do not call ``release`` again for it,
        or the units are given back twice. (A task cancelled before it ever ran never called
        it: asyncio runs none of a coroutine that is cancelled before its first step.)
        """
        cost = min(amount(cost, "cost"), MAX_AMOUNT)
        await self._core.call("release", GIVE, _outbox.next_id(), cost)

    def release_sync(self, cost: int) -> None:
        """Do what :meth:`release` does, with the blocking client."""
        cost = min(amount(cost, "cost"), MAX_AMOUNT)
        self._core.call_sync("release_sync", GIVE, _outbox.next_id(), cost)

    def reserve(self, cost: int, *, timeout: float | None = None) -> _Request[RedisPermit]:
        """Wait until ``cost`` fits, then lease it: await it, or ``async with`` it."""
        cost = amount(cost, "cost")
        limit = seconds(timeout, "timeout", allow_none=True)

        async def acquire() -> RedisPermit:
            return RedisPermit(self._core, await self._acquire("reserve", cost, limit))

        return _Request(acquire, RedisPermit.release)

    def reserve_blocking(self, cost: int, *, timeout: float | None = None) -> RedisPermit:
        """Wait as :meth:`reserve` does, on a thread: a permit usable with ``with``."""
        cost = amount(cost, "cost")
        limit = seconds(timeout, "timeout", allow_none=True)
        return RedisPermit(self._core, self._acquire_sync("reserve_blocking", cost, limit))


class RedisTokenBudget(_RedisBase):
    """A ``TokenBudget`` with debt, shared through Redis; reservations are leases.

    ``record_usage`` is charged once per reservation: its call id is the reservation's, and the
    server keeps it for ``max(lease, KEEP_SECONDS)`` seconds. A ``record_usage`` that raised
    ``BackendError`` is re-sent by the library (the next call, ``flush()``, the exit); calling it
    again only sends what is owed. A ``record_usage`` that arrives after the lease was
    reclaimed charges the actual usage once.
    """

    _KIND = "t"

    async def try_reserve_tokens(self, estimate: int) -> RedisReservation | None:
        """Lease ``estimate`` if ``available - debt >= estimate`` and nobody here waits."""
        estimate = amount(estimate, "estimate")
        if estimate > MAX_AMOUNT or self._core.queue:
            return None
        verdict = await self._try_lease("try_reserve_tokens", estimate, False)
        return RedisReservation(verdict) if isinstance(verdict, Lease) else None

    def try_reserve_tokens_sync(self, estimate: int) -> RedisReservation | None:
        """Do what :meth:`try_reserve_tokens` does, with the blocking client."""
        estimate = amount(estimate, "estimate")
        if estimate > MAX_AMOUNT or self._core.queue:
            return None
        verdict = self._try_lease_sync("try_reserve_tokens_sync", estimate, False)
        return RedisReservation(verdict) if isinstance(verdict, Lease) else None

    def _settle_args(
        self, reservation: object, prompt: object, completion: object, method: str
    ) -> tuple[Lease, int]:
        """Give the lease and the usage to settle (if owed: the figure first sent)."""
        used = amount(prompt, "prompt") + amount(completion, "completion")
        if not isinstance(reservation, TokenReservation):
            raise TypeError(
                f"reservation must be a TokenReservation, not {type(reservation).__name__}"
            )
        lease = self._held_lease(reservation, method)
        if lease.owed is not None:
            return lease, owed_figure(lease)
        if lease.used or not reservation.armed:
            raise ValueError(f"{method}: the reservation was already reconciled or disarmed")
        return lease, min(used, MAX_AMOUNT)

    async def record_usage(
        self, reservation: TokenReservation, prompt: int, completion: int
    ) -> None:
        """Settle ``reservation`` at ``prompt + completion``: refund the rest or charge the overage.

        On ``BackendError`` (or a cancellation) the settlement is kept and re-sent, with its
        id, by the budget's next call, ``flush()`` or the exit, and the reservation is disarmed:
        you need not call it again. A repeat, on any object of the budget, sends the same
        settlement again (its first figures, under its id): it is charged once.
        """
        core = self._core
        lease, used = self._settle_args(reservation, prompt, completion, "record_usage")
        fresh = lease.claim()
        try:
            await core.call("record_usage", SETTLE, lease.settle_id, lease.member, used)
        except BaseException:
            if fresh and owe_or_unclaim(core, lease, lease.settle_id):
                reservation.disarm()
            raise
        reservation.disarm()

    def record_usage_sync(
        self, reservation: TokenReservation, prompt: int, completion: int
    ) -> None:
        """Do what :meth:`record_usage` does, with the blocking client."""
        core = self._core
        lease, used = self._settle_args(reservation, prompt, completion, "record_usage_sync")
        fresh = lease.claim()
        try:
            core.call_sync("record_usage_sync", SETTLE, lease.settle_id, lease.member, used)
        except BaseException:
            if fresh and owe_or_unclaim(core, lease, lease.settle_id):
                reservation.disarm()
            raise
        reservation.disarm()

    def record_usage_nowait(
        self, reservation: TokenReservation, prompt: int, completion: int
    ) -> None:
        """Settle ``reservation`` as :meth:`record_usage` does, without waiting on the network.

        For code that may neither block nor await (a finaliser, a gate settling a stream
        abandoned unread): the settlement is queued under its id and sent as a dropped
        reservation's refund is, on the event loop that granted it, with the budget's next call,
        on ``flush()`` or at exit. The reservation is disarmed at once.
        """
        lease, used = self._settle_args(reservation, prompt, completion, "record_usage_nowait")
        if lease.owed is None and lease.settle_later(used):
            reservation.disarm()

    async def tokens_consumed(self) -> int:
        """Prompt + completion tokens recorded since the budget was created."""
        return (await self.snapshot()).consumed

    def tokens_consumed_sync(self) -> int:
        """Do what :meth:`tokens_consumed` does, with the blocking client."""
        return self.snapshot_sync().consumed

    def reserve_tokens(
        self, estimate: int, *, timeout: float | None = None
    ) -> _Request[RedisReservation]:
        """Wait until ``estimate`` fits, then lease it: await it, or ``async with`` it."""
        estimate = amount(estimate, "estimate")
        limit = seconds(timeout, "timeout", allow_none=True)

        async def acquire() -> RedisReservation:
            return RedisReservation(await self._acquire("reserve_tokens", estimate, limit))

        return _Request(acquire, self._refund_now)

    def reserve_tokens_blocking(
        self, estimate: int, *, timeout: float | None = None
    ) -> RedisReservation:
        """Wait as :meth:`reserve_tokens` does, on a thread (``with`` refunds an armed one)."""
        estimate = amount(estimate, "estimate")
        limit = seconds(timeout, "timeout", allow_none=True)
        return RedisReservation(self._acquire_sync("reserve_tokens_blocking", estimate, limit))

    async def _refund_now(self, reservation: RedisReservation) -> None:
        """Leaving ``async with``: an armed reservation is refunded before the block ends."""
        lease = reservation._lease
        if reservation.disarm() is None or not lease.claim():
            return
        # A failure leaves the refund owed (sent with the next call, flush() or the exit).
        with contextlib.suppress(BackendError):
            await self._core.call(
                "reserve_tokens", UNLEASE, lease.end_id, lease.member, lease.amount
            )
