"""What a Redis budget hands out: reservations, permits, awaitable requests and snapshots."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType
from typing import Any, TypeVar, cast

from costbound._reservation import TokenReservation
from costbound.redis._core import Core, Lease
from costbound.redis._script import UNLEASE

__all__ = ["RedisPermit", "RedisReservation", "Snapshot", "owe_or_unclaim", "owed_figure"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Snapshot:
    """A Redis budget's state as the server holds it at one moment.

    ``reserved`` is the sum of the outstanding leases (token reservations and permits from
    ``reserve``), ``outstanding`` their number, ``reclaimed`` the number of leases given back by
    expiry since the budget was created.
    """

    capacity: int
    rate: float
    available: int
    debt: int
    consumed: int
    reserved: int
    outstanding: int
    reclaimed: int

    @property
    def utilization(self) -> float:
        """``(capacity - available) / capacity`` in ``[0, 1]``; ``0.0`` when capacity is 0."""
        if self.capacity == 0:
            return 0.0
        return (self.capacity - self.available) / self.capacity


class RedisReservation(TokenReservation):
    """A token reservation on a :class:`RedisTokenBudget`: a lease with a fleet-wide id.

    Dropping it armed refunds the estimate without blocking (on the event loop it was granted
    on, or with the budget's next call, or at interpreter exit); if that refund never reaches
    the server, the lease returns the estimate when it expires. A process created by ``fork``
    never refunds the reservations it inherited.
    """

    __slots__ = ("_lease",)

    _lease: Lease

    def __new__(cls, lease: Lease) -> RedisReservation:
        """Wrap a lease the server granted (budgets make these; users never need to)."""
        reservation = cast("RedisReservation", super().__new__(cls, lease.amount, lease))
        reservation._lease = lease
        return reservation

    @property
    def lease_id(self) -> str:
        """The id under which the server holds this reservation."""
        return self._lease.id


class RedisPermit:
    """Units leased from a :class:`RedisBudget` by ``reserve``: give them back with ``release``.

    Usable with ``async with`` (and ``with`` when it came from ``reserve_blocking``). A permit
    dropped unreleased is released as a dropped reservation is refunded (without blocking); one
    whose process died comes back when its lease expires, which ``extend`` pushes out.
    """

    __slots__ = ("_core", "_lease")

    def __init__(self, core: Core, lease: Lease) -> None:
        self._core = core
        self._lease = lease

    @property
    def cost(self) -> int:
        """The units this permit holds."""
        return self._lease.amount

    @property
    def lease_id(self) -> str:
        """The id under which the server holds this permit."""
        return self._lease.id

    @property
    def released(self) -> bool:
        """Whether ``release`` gave the units back (or ``spend`` used them up)."""
        return self._lease.used

    async def _end(self, method: str, refund: int) -> None:
        lease, core = self._lease, self._core
        fresh = lease.claim()
        if not fresh and lease.owed is None:
            return  # given back already
        refund = refund if fresh else owed_figure(lease)
        try:
            await core.call(method, UNLEASE, lease.end_id, lease.member, refund)
        except BaseException:
            if fresh:
                owe_or_unclaim(core, lease, lease.end_id)
            raise

    def _end_sync(self, method: str, refund: int) -> None:
        lease, core = self._lease, self._core
        fresh = lease.claim()
        if not fresh and lease.owed is None:
            return
        refund = refund if fresh else owed_figure(lease)
        try:
            core.call_sync(method, UNLEASE, lease.end_id, lease.member, refund)
        except BaseException:
            if fresh:
                owe_or_unclaim(core, lease, lease.end_id)
            raise

    async def release(self) -> None:
        """Give the units back, once; later calls do nothing.

        On ``BackendError`` (or a cancellation) the release is kept and re-sent, with the id it
        was sent with, by the budget's next call, ``flush()`` or the exit: the permit counts as
        released. Calling ``release`` again sends it again under the same id (given back once).
        """
        await self._end("release", self._lease.amount)

    def release_sync(self) -> None:
        """Do what :meth:`release` does, with the blocking client."""
        self._end_sync("release_sync", self._lease.amount)

    async def spend(self) -> None:
        """End the lease without giving the units back: they were used up.

        For a budget that limits a rate (requests per minute), a request spends its unit:
        it comes back only by ``rate`` or ``refill``, not when the lease ends. Afterwards the
        permit counts as released and ``release`` does nothing.
        """
        await self._end("spend", 0)

    def spend_sync(self) -> None:
        """Do what :meth:`spend` does, with the blocking client."""
        self._end_sync("spend_sync", 0)

    async def __aenter__(self) -> RedisPermit:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release()

    def __enter__(self) -> RedisPermit:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release_sync()

    def __del__(self) -> None:
        # A dropped permit gives its units back as a dropped reservation does (without blocking).
        lease = self._lease
        if not lease.used:
            # At interpreter shutdown this may fail: the lease then ends by itself.
            with contextlib.suppress(Exception):
                lease(lease.amount)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<RedisPermit {self.cost} on {self._core.name!r}, {state}>"


class _Request(Coroutine[Any, Any, _T]):
    """What ``reserve`` / ``reserve_tokens`` return: awaitable, and an async context manager.

    It is a coroutine, so ``asyncio.create_task`` takes it; like one, it takes nothing until it
    is awaited (and one never awaited takes nothing, without a warning). It is single-use, as a
    native permit is (spec 11a): one ``await`` or one ``async with``; a second use, or a second
    task entering it, is a ``RuntimeError`` and takes nothing. An entry whose wait failed (a
    timeout, a cancellation) held nothing and leaves the request usable again.
    """

    __slots__ = ("_acquire", "_entered", "_exit", "_held", "_running")

    def __init__(
        self,
        acquire: Callable[[], Coroutine[Any, Any, _T]],
        leave: Callable[[_T], Awaitable[None]],
    ) -> None:
        self._acquire = acquire
        self._exit = leave
        self._held: _T | None = None
        self._running: Coroutine[Any, Any, _T] | None = None
        self._entered = False

    def _refuse_reuse(self) -> None:
        if self._entered or self._running is not None:
            raise RuntimeError(
                "this Redis request was already awaited or entered: it is single-use; "
                "call reserve() again for another"
            )

    def _coroutine(self) -> Coroutine[Any, Any, _T]:
        if self._running is None:
            self._refuse_reuse()
            self._running = self._acquire()
        return self._running

    def __await__(self) -> Generator[Any, None, _T]:
        return self._coroutine().__await__()

    def send(self, value: Any) -> Any:  # noqa: ANN401 - the coroutine protocol
        """Advance the wait (the coroutine protocol)."""
        return self._coroutine().send(value)

    def throw(self, *error: Any) -> Any:  # noqa: ANN401 - the coroutine protocol
        """Raise into the wait (the coroutine protocol)."""
        return self._coroutine().throw(*error)

    def close(self) -> None:
        """Close the wait if it started (the coroutine protocol)."""
        if self._running is not None:
            self._running.close()

    async def __aenter__(self) -> _T:
        self._refuse_reuse()
        self._entered = True  # before the first await: a second task is refused at once
        try:
            self._held = await self._acquire()
        except BaseException:
            self._entered = False  # nothing is held: the request may be used again
            raise
        return self._held

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is not None:
            await self._exit(held)


def owe_or_unclaim(core: Core, lease: Lease, call_id: str) -> bool:
    """After the call that ends ``lease`` raised: note it if it is owed, else unclaim the lease.

    An owed call (the server may have applied it) is re-sent by the library; one never sent
    (the kind of client it needs is missing) leaves the lease as it was.
    """
    owed = core.owed_call(call_id)
    if owed is None:
        lease.unclaim()
        return False
    lease.owed = owed
    return True


def owed_figure(lease: Lease) -> int:
    """Give the figure (usage, refund) that the owed call ending ``lease`` was sent with."""
    assert lease.owed is not None  # the callers checked
    figure: int = lease.owed.second  # type: ignore[assignment] # an int when owed
    return figure


def snapshot_of(reply: list[Any]) -> Snapshot:
    cap, rp, rq, bal, con, held, count, reclaimed = (int(x) for x in reply[1:9])
    return Snapshot(
        capacity=cap,
        rate=float(Fraction(rp, rq)) if rp else 0.0,
        available=max(bal, 0),
        debt=max(-bal, 0),
        consumed=con,
        reserved=held,
        outstanding=count,
        reclaimed=reclaimed,
    )
