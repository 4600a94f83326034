"""The Redis backend's own behaviour (spec section 10, with sections 2, 4, 5, 7 and 9).

Against the real ``redis-server`` of the session (fixture ``redis_url``): protocols, construction
and argument errors, a missing kind of client, one budget shared by many objects, attaching and
``reconfigure``, leases (expiry on server time, ``extend``, lazy bounded reclaim), idempotent
``record_usage``, refunds of dropped reservations that never block, context managers, debt and
saturation, the rate on server time, and waiters woken through pub/sub by another process.

Not here: fleets of processes, SIGKILL, fork, server restarts, SCRIPT FLUSH and cluster slots
(tests of the fleet), the seed's examples, the model and the waiting conformance suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import costbound
import numpy as np
import pytest
import pytest_asyncio
import redis
import redis.asyncio
import redis.exceptions
from costbound import AtomicTokenBudget, BackendError, TokenReservation
from costbound.redis import (
    KEEP_SECONDS,
    MAX_AMOUNT,
    RedisBudget,
    RedisPermit,
    RedisReservation,
    RedisTokenBudget,
    Snapshot,
)
from costbound.redis import _wait as redis_wait
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_support import unique

MAX_U64 = 2**64 - 1
BAD_TYPES = [1.0, "1", None, True, [1]]
BAD_VALUES = [-1, 2**64, 2**70]


# --- Clients and helpers ----------------------------------------------------------------------


@pytest_asyncio.fixture
async def aclient(redis_url: str) -> Any:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def sclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def is_script_call(args: tuple[Any, ...]) -> bool:
    """Whether ``execute_command(*args)`` runs a script (EVALSHA or EVAL)."""
    if not args:
        return False
    command = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    return command.upper() in {"EVALSHA", "EVAL"}


class CountingAsync:
    """An asyncio client that counts script calls when they are made and when they return."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.replies = 0

    def _counted(self, method: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
        self.calls += 1  # counted on the spot, before any I/O

        async def run() -> Any:
            reply = await method(*args, **kwargs)
            self.replies += 1
            return reply

        return run()

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if is_script_call(args):
            return self._counted(self.inner.execute_command, args, kwargs)
        return self.inner.execute_command(*args, **kwargs)

    def evalsha(self, *args: Any) -> Any:
        return self._counted(self.inner.evalsha, args, {})

    def eval(self, *args: Any) -> Any:
        return self._counted(self.inner.eval, args, {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountingSync:
    """A blocking client that counts script calls when they are made and when they return."""

    def __init__(self, inner: redis.Redis) -> None:
        self.inner = inner
        self.calls = 0
        self.replies = 0

    def _counted(self, method: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
        self.calls += 1
        reply = method(*args, **kwargs)
        self.replies += 1
        return reply

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if is_script_call(args):
            return self._counted(self.inner.execute_command, args, kwargs)
        return self.inner.execute_command(*args, **kwargs)

    def evalsha(self, *args: Any) -> Any:
        return self._counted(self.inner.evalsha, args, {})

    def eval(self, *args: Any) -> Any:
        return self._counted(self.inner.eval, args, {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class LosesReplies:
    """An asyncio client whose next ``lose`` script replies are lost after the server ran them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lose = 0

    async def _maybe_lost(self, reply: Any) -> Any:
        if self.lose:
            self.lose -= 1
            raise redis.exceptions.ConnectionError("the connection dropped before the reply")
        return reply

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        reply = await self.inner.execute_command(*args, **kwargs)
        return await self._maybe_lost(reply) if is_script_call(args) else reply

    async def evalsha(self, *args: Any) -> Any:
        return await self._maybe_lost(await self.inner.evalsha(*args))

    async def eval(self, *args: Any) -> Any:
        return await self._maybe_lost(await self.inner.eval(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def refused() -> Any:
    """``pytest.raises(ValueError)`` for the misuse whose message section 2 does not fix."""
    return pytest.raises(ValueError)  # noqa: PT011 - the spec fixes no message


def server_micros(client: redis.Redis) -> int:
    """Redis's clock (the one every lease and the rate run on), in microseconds."""
    sec, usec = client.time()
    return int(sec) * 1_000_000 + int(usec)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll_until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


async def apoll_until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def no_unraisable() -> Any:
    """Collect what ``sys.unraisablehook`` sees (a refund that raised in ``__del__``)."""

    class Hook:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def __enter__(self) -> Hook:
            self.old = sys.unraisablehook
            sys.unraisablehook = lambda info: self.seen.append((info.exc_type, info.exc_value))
            return self

        def __exit__(self, *exc: object) -> None:
            sys.unraisablehook = self.old

    return Hook()


# --- Protocols --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_budgets_satisfy_the_protocols(aclient, sclient):
    name = unique("proto")
    b = RedisBudget(unique("proto"), 10, client=aclient)
    tb = RedisTokenBudget(name, 10, client=aclient, sync_client=sclient)
    assert isinstance(b, costbound.BudgetGuard)
    assert isinstance(tb, costbound.TokenBudget)
    assert issubclass(RedisReservation, costbound.TokenReservation)
    r = await tb.try_reserve_tokens(4)
    assert isinstance(r, RedisReservation)
    assert isinstance(r, TokenReservation)
    assert r.estimate == 4
    assert r.armed
    assert isinstance(r.lease_id, str)
    assert r.lease_id
    permit = await b.reserve(3)
    assert isinstance(permit, RedisPermit)
    assert permit.cost == 3
    assert not permit.released
    assert permit.lease_id != r.lease_id
    await permit.release()
    await tb.record_usage(r, 1, 1)
    snap = await tb.snapshot()
    assert isinstance(snap, Snapshot)
    assert (snap.capacity, snap.available, snap.consumed) == (10, 8, 2)


# --- Construction errors ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RedisBudget, RedisTokenBudget])
def test_construction_errors(cls, sclient):
    with pytest.raises(TypeError, match="name"):
        cls(123, 10, sync_client=sclient)
    with pytest.raises(TypeError, match="name"):
        cls(b"bytes", 10, sync_client=sclient)
    for bad_name in ["", "a{b", "a}b", "{tag}"]:
        with pytest.raises(ValueError, match="name"):
            cls(bad_name, 10, sync_client=sclient)

    for bad in BAD_TYPES:
        with pytest.raises(TypeError, match="capacity"):
            cls(unique(), bad, sync_client=sclient)
    for bad in [-1, MAX_AMOUNT + 1, 2**63 - 1, MAX_U64, 2**64]:
        with pytest.raises(ValueError, match="capacity") as info:
            cls(unique(), bad, sync_client=sclient)
        message = str(info.value)
        assert str(MAX_AMOUNT) in message or "2**53" in message, message

    for bad_rate in [-1.0, -1, math.nan, math.inf, -math.inf, 2**33, 1e12, 1e300]:
        with pytest.raises(ValueError, match="rate"):
            cls(unique(), 10, rate=bad_rate, sync_client=sclient)
    # A rate so small that its stored fraction would be 0: the budget would never refill.
    # Seen before the fix: accepted, and stored as rate 0.
    for tiny_rate in [1e-10, 1e-12, 5e-324]:
        with pytest.raises(ValueError, match="rate must be 0 or at least"):
            cls(unique(), 10, rate=tiny_rate, sync_client=sclient)
    for bad_rate in ["1", None, [1.0], 1j]:
        with pytest.raises(TypeError, match="rate"):
            cls(unique(), 10, rate=bad_rate, sync_client=sclient)

    for bad_lease in [0, 0.0, -1.0, math.nan]:
        with pytest.raises(ValueError, match="lease"):
            cls(unique(), 10, lease=bad_lease, sync_client=sclient)
    # A lease that rounds to 0 microseconds would expire as it is granted: the budget would
    # stop limiting. Seen before the fix: accepted, and every grant came straight back.
    for tiny_lease in [1e-7, 4.9e-7, 5e-324]:
        with pytest.raises(ValueError, match="lease must be at least"):
            cls(unique(), 10, lease=tiny_lease, sync_client=sclient)

    with pytest.raises(TypeError, match="client"):
        cls(unique(), 10)
    with pytest.raises(TypeError, match="client"):
        cls(unique(), 10, client=None, sync_client=None)


@pytest.mark.parametrize("cls", [RedisBudget, RedisTokenBudget])
def test_construction_accepts_the_edges(cls, sclient):
    top = cls(unique("top"), MAX_AMOUNT, sync_client=sclient)
    assert top.snapshot_sync().capacity == MAX_AMOUNT
    assert top.snapshot_sync().available == MAX_AMOUNT
    zero = cls(unique("zero"), np.int64(0), sync_client=sclient)
    assert zero.capacity == 0
    assert zero.snapshot_sync().utilization == 0.0
    assert cls(unique("slow"), 5, rate=1e-9, sync_client=sclient).snapshot_sync().rate == 1e-9
    assert cls(unique("short"), 5, lease=1e-6, sync_client=sclient).lease == 1e-6
    rated = cls(
        unique("rated"), np.uint32(5), rate=np.float64(2.5), lease=0.001, sync_client=sclient
    )
    assert rated.capacity == 5
    assert rated.rate == 2.5
    assert rated.lease == 0.001
    assert rated.snapshot_sync().rate == 2.5
    assert rated.keys
    assert all(key.startswith("{" + rated.name + "}") for key in rated.keys)  # one hash tag


# --- A method whose kind of client is missing -----------------------------------------------


@pytest.mark.asyncio
async def test_a_missing_kind_of_client_is_a_type_error_naming_it(aclient, sclient):
    unit_name, token_name = unique("nocli"), unique("nocli")
    full_unit = RedisBudget(unit_name, 10, client=aclient, sync_client=sclient)
    full_tokens = RedisTokenBudget(token_name, 100, client=aclient, sync_client=sclient)
    permit = await full_unit.reserve(2)
    r = await full_tokens.try_reserve_tokens(30)
    unit_before = await full_unit.snapshot()
    tokens_before = await full_tokens.snapshot()

    async_only_unit = RedisBudget(unit_name, 10, client=aclient)
    async_only_tokens = RedisTokenBudget(token_name, 100, client=aclient)
    sync_calls: list[Callable[[], object]] = [
        lambda: async_only_unit.try_reserve_sync(1),
        lambda: async_only_unit.release_sync(1),
        async_only_unit.refill_sync,
        async_only_unit.snapshot_sync,
        lambda: async_only_unit.extend_sync(permit, 10),
        lambda: async_only_tokens.try_reserve_tokens_sync(1),
        lambda: async_only_tokens.record_usage_sync(r, 1, 1),
        async_only_tokens.tokens_consumed_sync,
        async_only_tokens.refill_sync,
        async_only_tokens.snapshot_sync,
        lambda: async_only_tokens.extend_sync(r, 10),
    ]
    for call in sync_calls:
        with pytest.raises(TypeError, match="sync_client="):
            call()
    # The blocking waits refuse a thread running an event loop, so call them from a thread.
    for call in [
        lambda: async_only_unit.reserve_blocking(1),
        lambda: async_only_tokens.reserve_tokens_blocking(1),
    ]:
        with pytest.raises(TypeError, match="sync_client="):
            await asyncio.to_thread(call)

    sync_only_unit = RedisBudget(unit_name, 10, sync_client=sclient)
    sync_only_tokens = RedisTokenBudget(token_name, 100, sync_client=sclient)
    async_calls: list[Callable[[], Any]] = [
        lambda: sync_only_unit.try_reserve(1),
        lambda: sync_only_unit.release(1),
        lambda: sync_only_unit.reserve(1),
        sync_only_unit.refill,
        sync_only_unit.snapshot,
        lambda: sync_only_unit.extend(permit, 10),
        lambda: sync_only_tokens.try_reserve_tokens(1),
        lambda: sync_only_tokens.record_usage(r, 1, 1),
        sync_only_tokens.tokens_consumed,
        lambda: sync_only_tokens.reserve_tokens(1),
        sync_only_tokens.refill,
        sync_only_tokens.snapshot,
        lambda: sync_only_tokens.extend(r, 10),
    ]
    for call in async_calls:
        with pytest.raises(TypeError) as info:
            await call()
        assert "client=" in str(info.value)
        assert "sync_client=" not in str(info.value), str(info.value)

    # Nothing changed, and the reservation and permit are still live.
    assert r.armed
    assert not permit.released
    assert await full_unit.snapshot() == unit_before
    assert await full_tokens.snapshot() == tokens_before
    await full_tokens.record_usage(r, 10, 0)
    await permit.release()
    assert (await full_tokens.snapshot()).available == 90
    assert (await full_unit.snapshot()).available == 10


@pytest.mark.asyncio
async def test_an_asyncio_client_given_as_sync_client_is_a_type_error(aclient, sclient):
    name = unique("wrongkind")
    wrong = RedisTokenBudget(name, 100, client=aclient, sync_client=aclient)
    with pytest.raises(TypeError) as info:
        wrong.try_reserve_tokens_sync(5)
    message = str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del info  # the traceback holds whatever the call left behind
        gc.collect()
    assert "sync_client=" in message, message
    assert [str(w.message) for w in caught] == []  # e.g. no coroutine left un-awaited
    right = RedisTokenBudget(name, 100, sync_client=sclient)
    assert right.snapshot_sync().outstanding == 0


# --- Argument errors on every method ----------------------------------------------------------


def _unit_sync_calls(b: RedisBudget) -> list[tuple[str, Callable[[object], object]]]:
    return [
        ("cost", b.try_reserve_sync),
        ("cost", b.release_sync),
        ("cost", lambda x: b.reserve_blocking(x, timeout=0)),
    ]


def _token_sync_calls(
    tb: RedisTokenBudget, r: RedisReservation
) -> list[tuple[str, Callable[[object], object]]]:
    return [
        ("estimate", tb.try_reserve_tokens_sync),
        ("estimate", lambda x: tb.reserve_tokens_blocking(x, timeout=0)),
        ("prompt", lambda x: tb.record_usage_sync(r, x, 1)),
        ("completion", lambda x: tb.record_usage_sync(r, 1, x)),
    ]


def test_argument_errors_on_every_blocking_method_change_nothing(sclient):
    b = RedisBudget(unique("args"), 100, sync_client=sclient)
    tb = RedisTokenBudget(unique("args"), 1_000, sync_client=sclient)
    assert b.try_reserve_sync(30)
    r = tb.try_reserve_tokens_sync(400)
    assert r is not None
    unit_before, tokens_before = b.snapshot_sync(), tb.snapshot_sync()

    calls = _unit_sync_calls(b) + _token_sync_calls(tb, r)
    for argument, call in calls:
        for bad in BAD_TYPES:
            with pytest.raises(TypeError, match=argument):
                call(bad)
        for bad in BAD_VALUES:
            with pytest.raises(ValueError, match=argument) as info:
                call(bad)
            assert str(MAX_U64) in str(info.value) or "2**64" in str(info.value)
    for bad_seconds, error in [(-1.0, ValueError), (math.nan, ValueError), ("1", TypeError)]:
        with pytest.raises(error, match="seconds"):
            tb.extend_sync(r, bad_seconds)
        with pytest.raises(error, match="timeout"):
            b.reserve_blocking(1, timeout=bad_seconds)
        with pytest.raises(error, match="timeout"):
            tb.reserve_tokens_blocking(1, timeout=bad_seconds)

    assert r.armed
    assert b.snapshot_sync() == unit_before
    assert tb.snapshot_sync() == tokens_before

    # The top of the range is accepted: too big to fit, so denied, and nothing changes.
    assert b.try_reserve_sync(MAX_U64) is False
    assert b.try_reserve_sync(MAX_AMOUNT + 1) is False
    assert tb.try_reserve_tokens_sync(MAX_U64) is None
    assert tb.try_reserve_tokens_sync(MAX_AMOUNT + 1) is None
    assert b.snapshot_sync() == unit_before
    assert tb.snapshot_sync() == tokens_before
    b.release_sync(MAX_U64)  # capped at the capacity
    assert b.snapshot_sync().available == 100

    # NumPy integers are integers.
    assert b.try_reserve_sync(np.int64(7))
    b.release_sync(np.uint8(2))
    assert b.snapshot_sync().available == 95
    r2 = tb.try_reserve_tokens_sync(np.uint64(100))
    assert r2 is not None
    assert r2.estimate == 100
    tb.record_usage_sync(r2, np.int32(30), np.uint64(12))
    tb.record_usage_sync(r, np.int64(0), np.int16(0))
    assert tb.snapshot_sync().available == 1_000 - 42
    assert tb.tokens_consumed_sync() == 42
    with b.reserve_blocking(np.int64(5), timeout=np.float64(1.0)) as permit:
        assert permit.cost == 5
    with tb.reserve_tokens_blocking(np.int64(5)) as r3:
        assert r3.estimate == 5
        assert tb.extend_sync(r3, np.float64(10.0)) is True


@pytest.mark.asyncio
async def test_argument_errors_on_every_async_method_change_nothing(aclient):
    b = RedisBudget(unique("args"), 100, client=aclient)
    tb = RedisTokenBudget(unique("args"), 1_000, client=aclient)
    assert await b.try_reserve(30)
    r = await tb.try_reserve_tokens(400)
    assert r is not None
    unit_before, tokens_before = await b.snapshot(), await tb.snapshot()

    async def call_reserve(x: object) -> object:
        return await b.reserve(x, timeout=0)  # type: ignore[arg-type]

    async def call_reserve_tokens(x: object) -> object:
        return await tb.reserve_tokens(x, timeout=0)  # type: ignore[arg-type]

    calls: list[tuple[str, Callable[[object], Any]]] = [
        ("cost", b.try_reserve),
        ("cost", b.release),
        ("cost", call_reserve),
        ("estimate", tb.try_reserve_tokens),
        ("estimate", call_reserve_tokens),
        ("prompt", lambda x: tb.record_usage(r, x, 1)),
        ("completion", lambda x: tb.record_usage(r, 1, x)),
    ]
    for argument, call in calls:
        for bad in BAD_TYPES:
            with pytest.raises(TypeError, match=argument):
                await call(bad)
        for bad in BAD_VALUES:
            with pytest.raises(ValueError, match=argument):
                await call(bad)
    for bad_seconds, error in [(-1.0, ValueError), (math.nan, ValueError), ("1", TypeError)]:
        with pytest.raises(error, match="seconds"):
            await tb.extend(r, bad_seconds)
        with pytest.raises(error, match="timeout"):
            await b.reserve(1, timeout=bad_seconds)
        with pytest.raises(error, match="timeout"):
            await tb.reserve_tokens(1, timeout=bad_seconds)

    assert r.armed
    assert await b.snapshot() == unit_before
    assert await tb.snapshot() == tokens_before
    assert await b.try_reserve(MAX_U64) is False
    assert await tb.try_reserve_tokens(MAX_U64) is None
    with pytest.raises(ValueError, match="never fit"):
        await tb.reserve_tokens(MAX_U64)
    assert await b.snapshot() == unit_before
    assert await tb.snapshot() == tokens_before

    assert await b.try_reserve(np.int64(70))
    await b.release(np.uint16(10))
    assert (await b.snapshot()).available == 10
    await tb.record_usage(r, np.int64(100), np.uint64(20))
    assert await tb.tokens_consumed() == 120
    async with tb.reserve_tokens(np.int64(500), timeout=np.float64(1.0)) as r2:
        assert r2.estimate == 500


@pytest.mark.asyncio
async def test_recording_twice_is_a_value_error_and_changes_nothing(aclient, sclient):
    tb = RedisTokenBudget(unique("twice"), 1_000, client=aclient, sync_client=sclient)
    r = await tb.try_reserve_tokens(300)
    await tb.record_usage(r, 100, 0)
    before = await tb.snapshot()
    with refused():
        await tb.record_usage(r, 100, 0)
    with refused():
        tb.record_usage_sync(r, 5, 5)
    disarmed = await tb.try_reserve_tokens(50)
    assert disarmed.disarm() is not None
    mid = await tb.snapshot()
    with refused():
        await tb.record_usage(disarmed, 1, 1)
    assert await tb.snapshot() == mid
    assert before.consumed == mid.consumed == 100


# --- One budget, many objects -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_objects_of_one_name_share_state_and_each_others_reservations(redis_url, sclient):
    name = unique("shared")
    first_client = redis.asyncio.Redis.from_url(redis_url)
    second_client = redis.asyncio.Redis.from_url(redis_url)
    second_sync = redis.Redis.from_url(redis_url)
    try:
        a = RedisTokenBudget(name, 1_000, client=first_client, sync_client=sclient)
        b = RedisTokenBudget(name, 1_000, client=second_client, sync_client=second_sync)
        r = await a.try_reserve_tokens(400)
        seen = await b.snapshot()
        assert (seen.available, seen.reserved, seen.outstanding) == (600, 400, 1)
        await b.record_usage(r, 100, 50)  # a reservation of a, recorded on b
        assert not r.armed
        assert await a.tokens_consumed() == 150
        assert b.tokens_consumed_sync() == 150
        assert (await a.snapshot()).available == 850

        r2 = b.try_reserve_tokens_sync(200)
        assert (await a.snapshot()).available == 650
        a.record_usage_sync(r2, 10, 0)
        assert (await b.snapshot()).available == 840
        assert await b.tokens_consumed() == 160
        with refused():
            await b.record_usage(r2, 10, 0)  # recorded already, on the other object

        r3 = await a.try_reserve_tokens(40)
        assert await b.extend(r3, 60.0) is True
        await a.refill()  # one balance: a refill on a is seen by b (back to the capacity)
        seen = await b.snapshot()
        assert (seen.available, seen.reserved, seen.outstanding) == (1_000, 40, 1)

        units = RedisBudget(unique("shared"), 10, client=first_client)
        twin = RedisBudget(units.name, 10, client=second_client, sync_client=second_sync)
        assert await units.try_reserve(6)
        assert not await twin.try_reserve(5)
        await twin.release(6)
        assert await twin.try_reserve(10)
        assert not await units.try_reserve(1)
        await units.release(10)
        permit = await units.reserve(3)
        assert twin.extend_sync(permit, 30.0) is True
        assert (await twin.snapshot()).outstanding == 1
        await permit.release()
        assert (await twin.snapshot()).available == 10
        await a.record_usage(r3, 0, 0)
    finally:
        await first_client.aclose()
        await second_client.aclose()
        second_sync.close()


@pytest.mark.asyncio
async def test_foreign_reservations_are_refused_and_change_nothing(aclient, sclient):
    tb = RedisTokenBudget(unique("own"), 1_000, client=aclient, sync_client=sclient)
    other = RedisTokenBudget(unique("other"), 1_000, client=aclient, sync_client=sclient)
    units = RedisBudget(unique("units"), 10, client=aclient, sync_client=sclient)
    other_units = RedisBudget(unique("units"), 10, client=aclient, sync_client=sclient)
    mine = await tb.try_reserve_tokens(100)
    foreign = await other.try_reserve_tokens(100)
    permit = await units.reserve(4)
    refunded: list[int] = []
    user_built = TokenReservation(50, refunded.append)
    atomic = AtomicTokenBudget(1_000)
    native = await atomic.try_reserve_tokens(70)
    before, other_before = await tb.snapshot(), await other.snapshot()

    for stranger in [foreign, user_built, native]:
        with refused():
            await tb.record_usage(stranger, 1, 1)
        with refused():
            tb.record_usage_sync(stranger, 1, 1)
        with refused():
            await tb.extend(stranger, 10.0)
        with refused():
            tb.extend_sync(stranger, 10.0)
        assert stranger.armed
    with refused():
        await other_units.extend(permit, 10.0)
    with refused():
        await tb.extend(permit, 10.0)  # a permit of another budget
    with refused():
        await units.extend(mine, 10.0)  # a reservation of another budget
    for not_a_reservation in [object(), None, 5, "r", permit]:
        with pytest.raises(TypeError):
            await tb.record_usage(not_a_reservation, 1, 1)
        with pytest.raises(TypeError):
            tb.record_usage_sync(not_a_reservation, 1, 1)

    assert await tb.snapshot() == before
    assert await other.snapshot() == other_before
    assert mine.armed
    assert not permit.released
    assert atomic.available == 930
    del user_built, native, stranger
    assert refunded == [50]
    assert atomic.available == 1_000
    await tb.record_usage(mine, 10, 10)
    await other.record_usage(foreign, 0, 0)
    await permit.release()
    assert (await tb.snapshot()).available == 980


# --- Attach and reconfigure -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_attaching_with_other_values_raises_on_the_first_call(aclient, sclient):
    name = unique("attach")
    first = RedisTokenBudget(name, 1_000, client=aclient, sync_client=sclient)
    r = await first.try_reserve_tokens(300)
    before = await first.snapshot()

    def tokens(capacity: int, rate: float = 0.0) -> RedisTokenBudget:
        return RedisTokenBudget(name, capacity, rate=rate, client=aclient, sync_client=sclient)

    mismatched: list[tuple[Any, Callable[[Any], Any]]] = [
        (tokens(999), lambda x: x.try_reserve_tokens(1)),
        (tokens(1_001), lambda x: x.snapshot()),
        (tokens(1_000, rate=1.0), lambda x: x.refill()),
        (tokens(1_000, rate=100 / 60), lambda x: x.extend(r, 5.0)),
        (RedisBudget(name, 1_000, client=aclient, sync_client=sclient), lambda x: x.try_reserve(1)),
        (RedisBudget(name, 1_000, client=aclient, sync_client=sclient), lambda x: x.release(10)),
    ]
    for other, call in mismatched:
        with pytest.raises(ValueError, match="reconfigure"):
            await call(other)
        with pytest.raises(ValueError, match="reconfigure"):
            other.snapshot_sync()  # and on every later call: it never attached
        assert await first.snapshot() == before
    record_elsewhere = tokens(500)
    with pytest.raises(ValueError, match="reconfigure"):
        await record_elsewhere.record_usage(r, 10, 10)
    assert r.armed
    assert await first.snapshot() == before

    # The same values attach (a rate is compared as the stored fraction).
    same = tokens(1_000)
    assert await same.snapshot() == before
    rated = RedisTokenBudget(unique("attach"), 10, rate=100 / 60, sync_client=sclient)
    assert rated.snapshot_sync().rate == 100 / 60
    rated_twin = RedisTokenBudget(rated.name, 10, rate=5 / 3, sync_client=sclient)
    assert rated_twin.snapshot_sync().capacity == 10
    with pytest.raises(ValueError, match="reconfigure"):
        RedisTokenBudget(rated.name, 10, rate=1.67, sync_client=sclient).snapshot_sync()
    with pytest.raises(ValueError, match="reconfigure"):
        RedisBudget(rated.name, 10, rate=100 / 60, sync_client=sclient).snapshot_sync()
    await same.record_usage(r, 0, 0)


@pytest.mark.parametrize("first", [RedisBudget, RedisTokenBudget])
def test_a_unit_and_a_token_budget_cannot_share_a_name(first, sclient):
    name = unique("clash")
    stored = first(name, 100, sync_client=sclient)
    assert stored.snapshot_sync().available == 100
    other = RedisTokenBudget if first is RedisBudget else RedisBudget
    for reconfigure in (False, True):
        clash = other(name, 100, sync_client=sclient, reconfigure=reconfigure)
        with pytest.raises(ValueError, match="stored as") as info:
            clash.snapshot_sync()
        message = str(info.value)
        # Seen before the fix: "...; pass reconfigure=True to store this object's values",
        # which fails the same way.
        assert "pass reconfigure=True" not in message, message
        assert "reconfigure=True cannot change a budget's kind" in message, message
        assert "another name" in message, message
    assert stored.snapshot_sync().available == 100


@pytest.mark.asyncio
async def test_reconfigure_moves_the_balance_and_earlier_objects_follow(aclient, sclient):
    name = unique("reconf")
    old = RedisTokenBudget(name, 100, client=aclient, sync_client=sclient)
    r = await old.try_reserve_tokens(30)  # old has attached: balance 70

    up = RedisTokenBudget(name, 250, client=aclient, reconfigure=True)
    snap = await up.snapshot()
    assert (snap.capacity, snap.available, snap.debt, snap.reserved) == (250, 220, 0, 30)
    assert old.capacity == 100  # the object's own figure; the stored one is in the snapshot
    assert (await old.snapshot()).capacity == 250
    big = await old.try_reserve_tokens(220)  # above old's own capacity: grants follow the store
    assert big is not None
    assert await old.try_reserve_tokens(1) is None

    down = RedisTokenBudget(name, 40, sync_client=sclient, reconfigure=True)
    snap = down.snapshot_sync()  # balance 0 + (40 - 250): into debt
    assert (snap.capacity, snap.available, snap.debt, snap.reserved) == (40, 0, 210, 250)
    assert await old.try_reserve_tokens(0) is None  # in debt even 0 is denied
    await old.record_usage(r, 0, 0)  # refund 30 pays debt
    assert (await old.snapshot()).debt == 180
    await old.refill()  # old refills by the stored capacity, 40
    snap = await old.snapshot()
    assert (snap.available, snap.debt) == (0, 140)
    await old.record_usage(big, 0, 0)  # refund 220: pays the debt, capped at 40
    snap = await old.snapshot()
    assert (snap.capacity, snap.available, snap.debt, snap.consumed) == (40, 40, 0, 0)
    assert await old.try_reserve_tokens(41) is None
    with pytest.raises(ValueError, match="capacity"):
        await old.reserve_tokens(41)  # a waiting call checks the stored capacity
    r40 = await old.try_reserve_tokens(40)
    assert r40 is not None

    rated = RedisTokenBudget(name, 40, rate=7.0, client=aclient, reconfigure=True)
    assert (await rated.snapshot()).rate == 7.0
    assert (await old.snapshot()).rate == 7.0
    assert old.rate == 0.0
    # A later object with the old values no longer attaches.
    with pytest.raises(ValueError, match="reconfigure"):
        await RedisTokenBudget(name, 100, client=aclient).snapshot()
    await old.record_usage(r40, 0, 0)


def test_reconfigure_a_unit_budget_up_and_down(sclient):
    name = unique("reconf")
    old = RedisBudget(name, 10, sync_client=sclient)
    assert old.try_reserve_sync(4)
    up = RedisBudget(name, 20, sync_client=sclient, reconfigure=True)
    assert up.snapshot_sync().available == 16
    assert old.try_reserve_sync(16)  # 20 out now
    assert not old.try_reserve_sync(1)
    down = RedisBudget(name, 5, sync_client=sclient, reconfigure=True)
    assert down.snapshot_sync().capacity == 5
    assert down.snapshot_sync().available == 0
    old.release_sync(14)  # 20 out, capacity 5: still 1 over
    assert not old.try_reserve_sync(1)
    old.release_sync(6)
    assert old.snapshot_sync().available == 5
    assert not old.try_reserve_sync(6)
    assert old.try_reserve_sync(5)
    # reconfigure=True with the stored values changes nothing.
    same = RedisBudget(name, 5, sync_client=sclient, reconfigure=True)
    assert same.snapshot_sync().available == 0


# --- Leases -----------------------------------------------------------------------------------


def watch_expiry(budget: Any, client: redis.Redis, earliest: int, latest: int) -> None:
    """Snapshot ``budget`` (one lease) until it is reclaimed, each snapshot between two reads
    of the server clock: none wholly before ``earliest`` may see it reclaimed, none wholly after
    ``latest`` may see it outstanding."""
    while True:
        before = server_micros(client)
        snap = budget.snapshot_sync()
        after = server_micros(client)
        gone = (snap.outstanding, snap.reclaimed) == (0, 1)
        if after < earliest:
            assert not gone, f"reclaimed {earliest - after} us before its lease ran out"
            assert snap.outstanding == 1
        if before > latest:
            assert gone, f"still held {before - latest} us after its lease ran out"
        if gone:
            return
        time.sleep(0.01)


def test_a_lease_expires_lease_seconds_after_its_grant_and_extend_moves_it(sclient):
    # Pushed out: a lease of 1 s extended by 30 s right after its grant outlives its second.
    for _ in range(5):  # setup: the extend must reach the server before the lease runs out
        pushed = RedisTokenBudget(unique("lease"), 100, lease=1.0, sync_client=sclient)
        pushed_units = RedisBudget(unique("lease"), 10, lease=1.0, sync_client=sclient)
        r_pushed = pushed.try_reserve_tokens_sync(10)
        p_pushed = pushed_units.reserve_blocking(3)
        if pushed.extend_sync(r_pushed, 30.0) and pushed_units.extend_sync(p_pushed, 30.0):
            pushed_at = server_micros(sclient)
            break
    else:
        pytest.fail("could not extend a 1 s lease within its second, five times")

    # Expiry on server time, `lease` seconds after the grant: a reservation and a permit.
    tb = RedisTokenBudget(unique("lease"), 100, lease=0.6, sync_client=sclient)
    b = RedisBudget(unique("lease"), 10, lease=0.6, sync_client=sclient)
    t0 = server_micros(sclient)
    r = tb.try_reserve_tokens_sync(10)
    t1 = server_micros(sclient)
    permit = b.reserve_blocking(3)
    t2 = server_micros(sclient)
    # Shortened: extend sets "seconds from now", also below what is left.
    shortened = RedisTokenBudget(unique("lease"), 100, lease=600.0, sync_client=sclient)
    r_short = shortened.try_reserve_tokens_sync(10)
    assert shortened.snapshot_sync().outstanding == 1
    e0 = server_micros(sclient)
    assert shortened.extend_sync(r_short, 0.5) is True
    e1 = server_micros(sclient)

    watch_expiry(tb, sclient, t0 + 600_000, t1 + 600_000)
    watch_expiry(b, sclient, t1 + 600_000, t2 + 600_000)
    watch_expiry(shortened, sclient, e0 + 500_000, e1 + 500_000)
    assert tb.snapshot_sync().available == 100
    poll_until(lambda: server_micros(sclient) > pushed_at + 1_000_000, "a second passed")
    for budget in (pushed, pushed_units):
        snap = budget.snapshot_sync()
        assert (snap.outstanding, snap.reclaimed) == (1, 0)
    assert pushed.extend_sync(r_pushed, 30.0) is True

    # A reclaimed lease cannot be extended; its permit's release gives nothing back twice.
    assert b.extend_sync(permit, 10.0) is False
    assert tb.extend_sync(r, 10.0) is False
    assert b.try_reserve_sync(10)
    permit.release_sync()
    assert permit.released
    assert b.snapshot_sync().available == 0
    with refused():
        b.extend_sync(permit, 10.0)  # released
    p_pushed.release_sync()
    with refused():
        pushed_units.extend_sync(p_pushed, 10.0)  # released
    pushed.record_usage_sync(r_pushed, 1, 2)
    with refused():
        pushed.extend_sync(r_pushed, 10.0)  # recorded
    with refused():
        pushed.extend_sync(r_pushed, 0.0)
    tb.record_usage_sync(r, 1, 2)  # recorded after its reclaim: charged once
    snap = tb.snapshot_sync()
    assert (snap.available, snap.consumed) == (97, 3)


def test_reclaim_is_lazy_bounded_and_gives_each_estimate_back_once(sclient):
    capacity, lease_micros = 1_000, 2_000_000
    for _ in range(5):  # setup: no lease may run out while the 41 are granted
        tb = RedisTokenBudget(unique("reclaim"), capacity, lease=2.0, sync_client=sclient)
        t0 = server_micros(sclient)
        reservations = [tb.try_reserve_tokens_sync(estimate) for estimate in range(1, 41)]
        kept = tb.try_reserve_tokens_sync(100)
        extended = tb.extend_sync(kept, 600.0)
        t1 = server_micros(sclient)
        if extended and t1 - t0 < lease_micros:
            break
    else:
        pytest.fail("could not grant 41 leases within the 2 s of one, five times")
    assert all(r is not None for r in reservations)
    poll_until(lambda: server_micros(sclient) > t1 + lease_micros, "all 40 leases expired")

    reclaimed_before = 0
    for expected_reclaimed, expected_outstanding in [(16, 25), (32, 9), (40, 1), (40, 1)]:
        snap = tb.snapshot_sync()  # each call reclaims at most 16, and only calls reclaim
        assert snap.reclaimed == expected_reclaimed
        assert snap.outstanding == expected_outstanding
        assert snap.reclaimed >= reclaimed_before
        reclaimed_before = snap.reclaimed
        assert snap.available + snap.reserved == capacity
        assert snap.debt == 0
    assert snap.reserved == 100
    assert snap.available == 900

    # A record_usage after the reclaim charges the actual usage, once.
    late = reservations.pop(0)
    tb.record_usage_sync(late, 7, 3)
    snap = tb.snapshot_sync()
    assert (snap.available, snap.consumed, snap.reclaimed) == (890, 10, 40)
    assert tb.extend_sync(reservations[0], 5.0) is False
    assert tb.extend_sync(kept, 600.0) is True
    # Dropping the reclaimed ones gives nothing back a second time.
    del reservations, late
    gc.collect()
    tb.flush_sync()
    snap = tb.snapshot_sync()
    assert (snap.available, snap.reserved, snap.outstanding) == (890, 100, 1)
    tb.record_usage_sync(kept, 50, 0)
    assert tb.snapshot_sync().available == 940


@pytest.mark.asyncio
async def test_an_unreleased_permit_comes_back_when_its_lease_expires(aclient, sclient):
    b = RedisBudget(unique("permitlease"), 10, lease=0.3, client=aclient)
    other = RedisBudget(b.name, 10, sync_client=sclient)
    permit = await b.reserve(4)
    await apoll_until(
        lambda: other.snapshot_sync().outstanding == 0, "the permit's lease was reclaimed"
    )
    snap = await b.snapshot()
    assert (snap.available, snap.reclaimed) == (10, 1)
    assert await b.extend(permit, 5.0) is False
    assert await b.try_reserve(7)
    await permit.release()
    await permit.release()
    assert (await b.snapshot()).available == 3


# --- Idempotent record_usage ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_record_whose_reply_was_lost_is_charged_once_when_retried(aclient, sclient):
    lossy = LosesReplies(aclient)
    name = unique("lost")
    tb = RedisTokenBudget(name, 1_000, client=lossy)
    other = RedisTokenBudget(name, 1_000, client=aclient, sync_client=sclient)
    r = await tb.try_reserve_tokens(400)
    gave_up = await tb.try_reserve_tokens(100)

    lossy.lose = 1
    with pytest.raises(BackendError) as info:
        await tb.record_usage(r, 100, 50)
    assert str(info.value).startswith("budget backend error: ")
    assert not r.armed  # the library owns the settlement now: it re-sends it
    snap = await other.snapshot()  # ... and the server did record it
    assert (snap.available, snap.consumed, snap.outstanding) == (750, 150, 1)

    await tb.flush()  # the re-send: deduplicated by the reservation's id
    snap = await other.snapshot()
    assert (snap.available, snap.consumed) == (750, 150)
    await tb.record_usage(r, 100, 50)  # a caller's repeat is sent again, and charged once
    await other.record_usage(r, 100, 50)
    assert (await other.snapshot()).consumed == 150

    # Repeated on another object of the same budget, with a different figure: still once, at
    # the figure first sent.
    lossy.lose = 1
    with pytest.raises(BackendError):
        await tb.record_usage(gave_up, 20, 0)
    assert not gave_up.armed
    other.record_usage_sync(gave_up, 999, 999)
    snap = await other.snapshot()
    assert (snap.available, snap.consumed, snap.outstanding) == (830, 170, 0)
    await tb.flush()
    assert await other.snapshot() == snap

    # Dropping it after a lost reply refunds nothing a second time.
    third = await tb.try_reserve_tokens(300)
    lossy.lose = 1
    with pytest.raises(BackendError):
        await tb.record_usage(third, 0, 0)
    del third
    await tb.flush()
    snap = await other.snapshot()
    assert (snap.available, snap.consumed, snap.outstanding) == (830, 170, 0)


def test_a_record_that_never_reached_the_server_is_sent_again_by_the_library(sclient):
    name = unique("unreached")
    good = RedisTokenBudget(name, 1_000, sync_client=sclient)
    dead = redis.Redis(
        host="127.0.0.1",
        port=closed_port(),
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        bad = RedisTokenBudget(name, 1_000, sync_client=dead)
        r = good.try_reserve_tokens_sync(400)
        with pytest.raises(BackendError) as info:
            bad.record_usage_sync(r, 10, 5)
        assert str(info.value).startswith("budget backend error: ")
        assert not r.armed  # owed by `bad`: it re-sends it
        snap = good.snapshot_sync()
        assert (snap.available, snap.consumed, snap.outstanding) == (600, 0, 1)
        with pytest.raises(BackendError):
            bad.record_usage_sync(r, 10, 5)  # failing again changes nothing either
        with pytest.raises(BackendError):
            bad.flush_sync()
        good.record_usage_sync(r, 10, 5)  # a repeat through a working object settles it
        snap = good.snapshot_sync()
        assert (snap.available, snap.consumed, snap.outstanding) == (985, 15, 0)
        bad._core.sync_client = sclient  # `bad` reaches the server again: its re-sends are
        bad.flush_sync()  # answered from the kept outcome, nothing twice
        assert good.snapshot_sync() == snap
    finally:
        dead.close()


# --- Drops never block ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_dropped_on_a_loop_the_refund_is_scheduled_not_sent_on_the_spot(aclient, sclient):
    counting = CountingAsync(aclient)
    tb = RedisTokenBudget(unique("drop"), 100, client=counting)
    observer = RedisTokenBudget(tb.name, 100, sync_client=sclient)

    r = await tb.try_reserve_tokens(40)
    calls = counting.calls
    del r
    assert counting.calls == calls  # no script call was even started by the drop
    assert observer.snapshot_sync().available == 60
    await tb.flush()
    assert counting.calls == calls + 1
    snap = observer.snapshot_sync()
    assert (snap.available, snap.outstanding, snap.reclaimed) == (100, 0, 0)

    # Without flush(): the loop sends it by itself, soon.
    r = await tb.try_reserve_tokens(70)
    del r
    await apoll_until(
        lambda: observer.snapshot_sync().available == 100, "the scheduled refund landed"
    )
    assert observer.snapshot_sync().reclaimed == 0

    # Dropped by a plain function called from a coroutine.
    def forget(reservation: RedisReservation) -> None:
        del reservation

    forget(await tb.try_reserve_tokens(10))
    await tb.flush()
    snap = observer.snapshot_sync()
    assert (snap.available, snap.outstanding) == (100, 0)


class Holder:
    """An object in a reference cycle, holding a reservation."""


@pytest.mark.asyncio
async def test_a_reservation_collected_in_a_cycle_is_refunded(aclient, sclient):
    tb = RedisTokenBudget(unique("cycle"), 100, client=aclient, sync_client=sclient)
    observer = RedisTokenBudget(tb.name, 100, sync_client=sclient)
    on_loop, blocking = Holder(), Holder()
    on_loop.me, blocking.me = on_loop, blocking  # type: ignore[attr-defined]
    on_loop.r = await tb.try_reserve_tokens(20)  # type: ignore[attr-defined]
    blocking.r = tb.try_reserve_tokens_sync(30)  # type: ignore[attr-defined]
    assert observer.snapshot_sync().available == 50
    del on_loop, blocking
    gc.collect()
    await tb.flush()
    snap = observer.snapshot_sync()
    assert (snap.available, snap.outstanding, snap.reclaimed) == (100, 0, 0)


def test_dropped_after_a_blocking_grant_it_goes_with_the_next_call(sclient):
    counting = CountingSync(sclient)
    tb = RedisTokenBudget(unique("dropsync"), 100, sync_client=counting)
    observer = RedisTokenBudget(tb.name, 100, sync_client=sclient)

    r = tb.try_reserve_tokens_sync(40)
    calls = counting.calls
    del r
    assert counting.calls == calls  # nothing sent by the drop itself
    assert observer.snapshot_sync().available == 60
    # The next call of this object carries it, whatever it is: here a grant that needs it.
    whole = tb.try_reserve_tokens_sync(100)
    assert whole is not None
    assert counting.calls == calls + 1
    snap = observer.snapshot_sync()
    assert (snap.available, snap.outstanding) == (0, 1)
    tb.record_usage_sync(whole, 0, 0)

    r = tb.try_reserve_tokens_sync(25)
    del r
    assert observer.snapshot_sync().available == 75
    tb.flush_sync()
    assert observer.snapshot_sync().available == 100
    calls = counting.calls
    tb.flush_sync()  # nothing pending: nothing sent
    assert counting.calls == calls


@pytest.mark.asyncio
async def test_a_blocking_grant_dropped_on_a_loop_goes_with_the_next_async_call(aclient, sclient):
    counting = CountingSync(sclient)
    tb = RedisTokenBudget(unique("dropmix"), 100, client=aclient, sync_client=counting)
    observer = RedisTokenBudget(tb.name, 100, sync_client=sclient)
    r = tb.try_reserve_tokens_sync(40)
    calls = counting.calls
    del r
    await asyncio.sleep(0)
    assert counting.calls == calls
    assert observer.snapshot_sync().available == 60
    assert (await tb.snapshot()).available == 100  # the next call, an async one, carried it


@pytest.mark.asyncio
async def test_a_reservation_outliving_its_budget_object_still_comes_back(aclient, sclient):
    # The one granted on the loop is refunded there (its lease keeps what the refund needs: the
    # client), and that call carries the refund of the one granted by a _sync call, pending
    # since its drop: both come back at once, and no lease has to expire.
    name = unique("orphan")
    observer = RedisTokenBudget(name, 100, sync_client=sclient)
    tb = RedisTokenBudget(name, 100, lease=120.0, client=aclient, sync_client=sclient)
    on_loop = await tb.try_reserve_tokens(30)
    blocking = tb.try_reserve_tokens_sync(20)
    alive = weakref.ref(tb)
    del tb
    gc.collect()
    assert alive() is None
    with no_unraisable() as hook:
        del on_loop, blocking
        gc.collect()
        await asyncio.sleep(0)
    assert hook.seen == []
    await apoll_until(
        lambda: observer.snapshot_sync().outstanding == 0, "the orphans' refunds landed"
    )
    snap = observer.snapshot_sync()
    assert (snap.available, snap.reclaimed) == (100, 0)


# --- Context managers and permits ------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_with_reserve_tokens_refunds_an_armed_reservation_on_exit(aclient, sclient):
    tb = RedisTokenBudget(unique("ctx"), 1_000, client=aclient)
    observer = RedisTokenBudget(tb.name, 1_000, sync_client=sclient)
    async with tb.reserve_tokens(400) as r:
        assert r.armed
        assert observer.snapshot_sync().available == 600
    assert not r.armed
    snap = observer.snapshot_sync()  # right after the block: no flush needed
    assert (snap.available, snap.outstanding) == (1_000, 0)

    async with tb.reserve_tokens(300, timeout=5.0) as r:
        await tb.record_usage(r, 100, 20)
    snap = observer.snapshot_sync()
    assert (snap.available, snap.consumed) == (880, 120)

    with pytest.raises(RuntimeError, match="boom"):
        async with tb.reserve_tokens(500):
            raise RuntimeError("boom")
    assert observer.snapshot_sync().available == 880


@pytest.mark.asyncio
async def test_async_with_reserve_releases_and_release_gives_back_once(aclient, sclient):
    b = RedisBudget(unique("ctx"), 10, client=aclient, sync_client=sclient)
    observer = RedisBudget(b.name, 10, sync_client=sclient)
    async with b.reserve(6) as permit:
        assert not permit.released
        assert observer.snapshot_sync().available == 4
    assert permit.released
    assert observer.snapshot_sync().available == 10
    with pytest.raises(RuntimeError, match="boom"):
        async with b.reserve(6, timeout=5.0):
            raise RuntimeError("boom")
    assert observer.snapshot_sync().available == 10

    permit = await b.reserve(4)
    assert await b.try_reserve(6)
    await permit.release()
    await permit.release()
    permit.release_sync()
    assert permit.released
    snap = observer.snapshot_sync()
    assert (snap.available, snap.outstanding) == (4, 0)
    async with b.reserve(4) as inner:
        await inner.release()  # released inside the block: leaving does not release again
    assert observer.snapshot_sync().available == 4


def test_with_reserve_blocking_releases_and_reserve_tokens_blocking_refunds(sclient):
    b = RedisBudget(unique("ctx"), 10, sync_client=sclient)
    observer = RedisBudget(b.name, 10, sync_client=sclient)
    with b.reserve_blocking(7) as permit:
        assert observer.snapshot_sync().available == 3
    assert permit.released
    assert observer.snapshot_sync().available == 10
    with pytest.raises(RuntimeError, match="boom"), b.reserve_blocking(7, timeout=5.0):
        raise RuntimeError("boom")
    assert observer.snapshot_sync().available == 10

    tb = RedisTokenBudget(unique("ctx"), 100, sync_client=sclient)
    token_observer = RedisTokenBudget(tb.name, 100, sync_client=sclient)
    with tb.reserve_tokens_blocking(40) as r:
        assert token_observer.snapshot_sync().available == 60
    assert not r.armed
    tb.flush_sync()  # a blocking grant's refund goes with this object's next call at the latest
    assert token_observer.snapshot_sync().available == 100
    with tb.reserve_tokens_blocking(40) as r:
        tb.record_usage_sync(r, 5, 5)
    tb.flush_sync()
    assert token_observer.snapshot_sync().available == 90


# --- Debt and saturation ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_overage_becomes_debt_that_refunds_and_refills_pay_first(aclient):
    tb = RedisTokenBudget(unique("debt"), 100, client=aclient)
    first = await tb.try_reserve_tokens(30)
    second = await tb.try_reserve_tokens(30)
    await tb.record_usage(first, 100, 50)  # 40 + 30 - 150
    snap = await tb.snapshot()
    assert (snap.available, snap.debt, snap.consumed) == (0, 80, 150)
    assert await tb.try_reserve_tokens(0) is None
    del second  # the refund of 30 pays debt
    await tb.flush()
    snap = await tb.snapshot()
    assert (snap.available, snap.debt) == (0, 50)
    await tb.refill()
    snap = await tb.snapshot()
    assert (snap.available, snap.debt) == (50, 0)
    await tb.refill()
    assert (await tb.snapshot()).available == 100
    assert await tb.tokens_consumed() == 150


def test_consumed_and_debt_saturate_at_max_amount(sclient):
    tb = RedisTokenBudget(unique("saturate"), 10, sync_client=sclient)
    first = tb.try_reserve_tokens_sync(5)
    second = tb.try_reserve_tokens_sync(5)
    tb.record_usage_sync(first, MAX_U64, MAX_U64)
    snap = tb.snapshot_sync()
    assert (snap.consumed, snap.debt, snap.available) == (MAX_AMOUNT, MAX_AMOUNT - 5, 0)
    tb.record_usage_sync(second, MAX_U64, 0)
    snap = tb.snapshot_sync()
    assert (snap.consumed, snap.debt, snap.available) == (MAX_AMOUNT, MAX_AMOUNT, 0)
    tb.refill_sync()
    snap = tb.snapshot_sync()
    assert (snap.consumed, snap.debt) == (MAX_AMOUNT, MAX_AMOUNT - 10)
    assert tb.tokens_consumed_sync() == MAX_AMOUNT

    huge = RedisTokenBudget(unique("saturate"), MAX_AMOUNT, sync_client=sclient)
    whole = huge.try_reserve_tokens_sync(MAX_AMOUNT)
    assert whole is not None
    assert huge.try_reserve_tokens_sync(1) is None
    huge.record_usage_sync(whole, MAX_AMOUNT - 1, 0)
    snap = huge.snapshot_sync()
    assert (snap.available, snap.consumed, snap.debt) == (1, MAX_AMOUNT - 1, 0)
    one = huge.try_reserve_tokens_sync(1)
    huge.record_usage_sync(one, 2, 0)  # consumed saturates, the overage of 1 is debt
    snap = huge.snapshot_sync()
    assert (snap.available, snap.consumed, snap.debt) == (0, MAX_AMOUNT, 1)


# --- Rate on server time ---------------------------------------------------------------------


def test_rate_refills_by_server_time(sclient):
    rate = 1_000
    tb = RedisTokenBudget(unique("rate"), 10_000, rate=float(rate), sync_client=sclient)
    t0 = server_micros(sclient)
    hold = tb.try_reserve_tokens_sync(10_000)  # drained at a server moment in [t0, t1]
    t1 = server_micros(sclient)
    assert hold is not None
    poll_until(lambda: server_micros(sclient) >= t1 + 300_000, "0.3 s of server time passed")
    t2 = server_micros(sclient)
    snap = tb.snapshot_sync()  # read at a server moment in [t2, t3]
    t3 = server_micros(sclient)
    low = min(10_000, (t2 - t1) * rate // 1_000_000)
    high = min(10_000, -(-(t3 - t0) * rate // 1_000_000))
    assert low <= snap.available <= high, (low, snap.available, high)
    assert snap.available >= 300
    assert snap.debt == 0
    tb.record_usage_sync(hold, 0, 0)
    assert tb.snapshot_sync().available == 10_000  # never above the capacity


def test_the_rate_is_stored_as_an_exact_fraction(sclient):
    for rate, exact in [(100 / 60, Fraction(100, 60)), (2_000_000 / 60, Fraction(2_000_000, 60))]:
        tb = RedisTokenBudget(unique("fraction"), 2_000_000, rate=rate, sync_client=sclient)
        snap = tb.snapshot_sync()
        assert Fraction(snap.rate).limit_denominator(1000) == exact
        assert snap.rate == rate
        assert tb.rate == rate
        assert Fraction(snap.rate).limit_denominator(1000) == Fraction(tb.rate).limit_denominator(
            1000
        )
        # A second process's object with the same float attaches.
        assert RedisTokenBudget(tb.name, 2_000_000, rate=rate, sync_client=sclient).snapshot_sync()
        b = RedisBudget(unique("fraction"), 10, rate=rate, sync_client=sclient)
        assert Fraction(b.snapshot_sync().rate).limit_denominator(1000) == exact


@pytest.mark.asyncio
async def test_a_waiter_on_a_rated_budget_is_granted_by_the_rate_alone(aclient, monkeypatch):
    # No release comes, and the fallback poll is made longer than the deadlines below: only
    # the timer set from the rate wakes the waiters in time.
    monkeypatch.setattr(redis_wait, "POLL_SECONDS", 120.0)
    tb = RedisTokenBudget(unique("ratewait"), 1_000, rate=1_000.0, client=aclient)
    b = RedisBudget(unique("ratewait"), 100, rate=200.0, client=aclient)
    hold = await tb.try_reserve_tokens(1_000)
    assert await b.try_reserve(100)
    r = await asyncio.wait_for(tb.reserve_tokens(300), 30.0)
    permit = await asyncio.wait_for(b.reserve(50), 30.0)
    assert r.estimate == 300
    assert permit.cost == 50
    assert (await tb.snapshot()).outstanding == 2
    await tb.record_usage(hold, 0, 0)
    await tb.record_usage(r, 0, 0)
    await permit.release()


# --- Waiting woken through pub/sub by another process -----------------------------------------

CHILD = r"""
import sys
import redis
from costbound.redis import RedisBudget, RedisTokenBudget

url, name, action, capacity = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = redis.Redis.from_url(url)
if action in ("refund", "record", "refill"):
    budget = RedisTokenBudget(name, capacity, sync_client=client)
    held = budget.try_reserve_tokens_sync(capacity)
else:
    budget = RedisBudget(name, capacity, sync_client=client)
    held = budget.reserve_blocking(capacity, timeout=0)
assert held is not None
print("ready", flush=True)
sys.stdin.readline()
if action == "refund":
    del held
    budget.flush_sync()
elif action == "record":
    budget.record_usage_sync(held, 1, 0)
elif action == "refill":
    budget.refill_sync()
    held.disarm()
else:
    held.release_sync()
print("done", flush=True)
client.close()
"""


@pytest.mark.parametrize("action", ["refund", "record", "refill", "release"])
@pytest.mark.asyncio
async def test_a_waiter_is_woken_by_another_process_through_pub_sub(
    action, redis_url, aclient, monkeypatch
):
    # The fallback poll is made far longer than the deadline below (and the waiter has no
    # timeout of its own): a grant in time can only come from the message that the other
    # process's call publishes.
    monkeypatch.setattr(redis_wait, "POLL_SECONDS", 120.0)
    capacity = 100
    name = unique("wake")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, redis_url, name, action, str(capacity),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 60.0) == b"ready\n"
        counting = CountingAsync(aclient)
        if action == "release":
            budget: Any = RedisBudget(name, capacity, client=counting)
            waiting = asyncio.ensure_future(budget.reserve(60))
        else:
            budget = RedisTokenBudget(name, capacity, client=counting)
            waiting = asyncio.ensure_future(budget.reserve_tokens(60))
        # Setup: the waiter was denied twice (its first try, then once subscribed) and sleeps.
        await apoll_until(lambda: counting.replies >= 2, "the waiter was denied twice")
        await asyncio.sleep(0.05)
        assert not waiting.done()
        denied = counting.replies
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        granted = await asyncio.wait_for(waiting, 30.0)
        assert counting.replies - denied <= 2  # woken at once: at most one more denial
        assert await asyncio.wait_for(child.stdout.readline(), 30.0) == b"done\n"
        snap = await budget.snapshot()
        assert snap.outstanding >= 1
        if action == "release":
            assert granted.cost == 60
            await granted.release()
        else:
            assert granted.estimate == 60
            await budget.record_usage(granted, 0, 0)
    finally:
        if child.returncode is None:
            child.stdin.close()
        assert await asyncio.wait_for(child.wait(), 30.0) == 0


def test_a_blocking_waiter_is_woken_by_another_process_through_pub_sub(
    redis_url, sclient, monkeypatch
):
    monkeypatch.setattr(redis_wait, "POLL_SECONDS", 120.0)  # as above: only a message wakes it
    capacity = 100
    name = unique("wake")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, redis_url, name, "release", str(capacity)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"ready\n"
        counting = CountingSync(sclient)
        budget = RedisBudget(name, capacity, sync_client=counting)
        result: list[object] = []

        def wait() -> None:
            try:
                result.append(budget.reserve_blocking(60))
            except BaseException as error:  # reported by the assertion below
                result.append(error)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        poll_until(lambda: counting.replies >= 2, "the blocking waiter was denied twice")
        time.sleep(0.05)
        assert not result
        denied = counting.replies
        child.stdin.write(b"go\n")
        child.stdin.flush()
        thread.join(30.0)
        assert not thread.is_alive()
        assert len(result) == 1
        assert isinstance(result[0], RedisPermit), result
        assert counting.replies - denied <= 2
        assert child.stdout.readline() == b"done\n"
        result[0].release_sync()
        assert budget.snapshot_sync().available == capacity
    finally:
        child.stdin.close()
        assert child.wait(30.0) == 0
        child.stdout.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["tokens", "units"])
async def test_a_reserve_cancelled_while_its_grant_is_in_flight_leaves_no_lease(
    aclient, sclient, kind
):
    # The grant's reply is awaited under a shield: a cancellation that races it gives the grant
    # back at once instead of leaving it to its lease (120 s here). The cancellation lands at
    # every point from "not started" to "reply read", by the number of loop turns before it.
    # (A client made with host and port retries, which moves where the cancellation lands.)
    address = aclient.connection_pool.connection_kwargs
    retrying = redis.asyncio.Redis(host=address["host"], port=address["port"])
    try:
        await _cancel_while_granting(retrying, sclient, kind)
        await _cancel_while_granting(aclient, sclient, kind)
    finally:
        await retrying.aclose()


async def _cancel_while_granting(aclient, sclient, kind):
    for steps in range(16):
        if kind == "tokens":
            budget = RedisTokenBudget(unique("race"), 100, client=aclient, sync_client=sclient)
            request = budget.reserve_tokens(40)
        else:
            budget = RedisBudget(unique("race"), 5, client=aclient, sync_client=sclient)
            request = budget.reserve(2)
        await budget.snapshot()  # attached: the request is one script call
        task = asyncio.ensure_future(request)
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            held = await task  # the grant won the race: give it back the usual way
            if isinstance(held, RedisPermit):
                await held.release()
            else:
                await budget.record_usage(held, 0, 0)
        await apoll_until(
            lambda b=budget: b.snapshot_sync().outstanding == 0,
            f"no lease left after a cancellation {steps} loop turns in",
            timeout=10.0,
        )
        assert budget.snapshot_sync().available == budget.capacity


def _age_call_outcomes(client: redis.Redis, budget: Any) -> None:
    """Make the budget's current generation of call outcomes due (as if its time had passed)."""
    client.eval(
        """
        local v = {cmsgpack.unpack(redis.call('GET', KEYS[1]))}
        v[14] = 1  -- calls_since: long ago
        redis.call('SET', KEYS[1], cmsgpack.pack(unpack(v)))
        """,
        1,
        budget.keys[0],
    )


def _stored_field(client: redis.Redis, budget: Any, position: int) -> Any:
    return client.eval(
        "return ({cmsgpack.unpack(redis.call('GET', KEYS[1]))})[tonumber(ARGV[1])]",
        1,
        budget.keys[0],
        position,
    )


def test_call_outcomes_are_kept_at_least_max_lease_and_ten_minutes(sclient):
    # Every state-changing call's outcome is kept under its id (to answer a retried or re-sent
    # call) for max(lease, KEEP_SECONDS) at least: in two generations that last that long each.
    # Time passing is simulated by ageing the current generation on the server.
    tb = RedisTokenBudget(unique("outcomes"), 1_000, sync_client=sclient)
    first = tb.try_reserve_tokens_sync(1)
    tb.record_usage_sync(first, 1, 0)
    for _ in range(34):  # a lease and a settlement each: 70 ids
        tb.record_usage_sync(tb.try_reserve_tokens_sync(1), 1, 0)
    _, _, calls, prior = tb.keys
    assert sclient.hlen(calls) == 70
    assert set(sclient.hvals(calls)) == {b"leased", b"done"}
    assert _stored_field(sclient, tb, 15) == KEEP_SECONDS * 1_000_000  # the lease is shorter
    long = RedisTokenBudget(tb.name, 1_000, lease=3_600.0, sync_client=sclient)
    long.refill_sync()
    assert _stored_field(sclient, tb, 15) == 3_600 * 1_000_000  # a longer lease keeps longer

    def settle_first_again() -> None:
        lease = first._lease
        tb._core.call_sync("test", b"settle", lease.settle_id, lease.member, 1)

    _age_call_outcomes(sclient, tb)
    tb.refill_sync()  # due: the current generation becomes the prior one
    assert (sclient.hlen(prior), sclient.hlen(calls)) == (71, 1)
    settle_first_again()  # still known: answered, not charged again
    assert tb.snapshot_sync().consumed == 35

    _age_call_outcomes(sclient, tb)
    tb.refill_sync()  # the prior generation is dropped
    assert (sclient.hlen(prior), sclient.hlen(calls)) == (1, 1)
    settle_first_again()  # forgotten after its time: a re-send this late would count again
    snap = tb.snapshot_sync()
    assert (snap.available, snap.consumed, snap.outstanding) == (999, 36, 0)
