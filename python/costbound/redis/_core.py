"""What both Redis budgets share: script calls under call ids, leases, and the calls still owed.

Every operation is one EVALSHA of the script in :mod:`costbound.redis._script` (EVAL when the
server does not have it cached, which caches it again). The client never computes a balance: it
sends the operation and reads the verdict, so any number of processes share one budget.

Every call that changes state carries an id (``costbound._outbox.next_id()``, or one derived
from a lease's id) and the server applies each id once, so redis-py's own retries, and the
library's re-sends, never apply a call twice. When a call raises or is cancelled, its outcome is
unknown; it is then made certain later, with the same id, from this object's
:class:`~costbound._outbox.Outbox`:

- a take (``try_reserve``) or a lease grant is *rolled back* (``void``): undone if the server
  applied it, voided in advance if it has not arrived yet;
- a release, refill, settlement or refund is *re-sent*.

The outbox rides along with the budget's next call (up to 64 calls in the same script call), is
sent by ``flush()``, is sent at once on the event loop after a cancellation or a drop, and at
interpreter exit (:mod:`costbound._outbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import operator
import os
import time
import weakref
from fractions import Fraction
from typing import Any, Final, NoReturn

from costbound._errors import BackendError
from costbound._outbox import Call, Outbox
from costbound.redis._script import (
    GIVE,
    KEEP_SECONDS,
    LEASE,
    MISMATCH,
    MISSING,
    REFILL,
    SCRIPT,
    SETTLE,
    SHA,
    SNAPSHOT,
    TAKE,
    UNLEASE,
    VOID,
)
from costbound.redis._wait import Denied, Waiting

try:
    from redis.exceptions import NoScriptError, RedisClusterException, RedisError
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("costbound.redis needs redis-py: pip install 'costbound[redis]'") from error

#: Lua numbers are doubles; every amount a script sees stays at or below this, so it is exact.
MAX_AMOUNT: Final = 2**53 - 1
_U64: Final = 2**64 - 1
#: The rate is stored as the fraction rp/rq units per second with rq * (rp + 1) below this, so
#: that the script's refill never multiplies past 2**53.
_RATE_LIMIT: Final = 2**33
#: The longest lease or extension, so that an expiry stays exact in the script.
_LONGEST: Final = 1e9
#: Queued calls carried by one script call (the rest go with the next).
_BATCH: Final = 64

# Redis unreachable, timing out or failing a script; an interrupted connection may surface as
# an OSError or asyncio's own TimeoutError (not the builtin on Python 3.10), and a cluster that
# cannot be reached as a RedisClusterException (which is not a RedisError).
_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# What makes certain a call whose outcome is unknown: re-sending it, or rolling it back.
_RESENT: Final = frozenset({GIVE, REFILL, SETTLE, UNLEASE})
_ROLLED_BACK: Final = frozenset({TAKE, LEASE})

# The configuration argument of the script (main.lua).
_CHECK, _STORE, _CREATE, _NONE = b"check", b"store", b"create", b""
_WAITING: Final = (b"waiting",)
_NOTHING: Final[list[Call]] = []  # no queued calls (never changed)


def amount(value: object, name: str, maximum: int = _U64) -> int:
    """``value`` as an int in ``0..=maximum``; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not 0 <= number <= maximum:
        raise ValueError(f"{name} must be in 0..={maximum}, got {number}")
    return number


def seconds(
    value: object, name: str, *, allow_none: bool = False, finite: bool = False
) -> float | None:
    """Check a number of seconds ``>= 0`` (or ``None`` when allowed) and return it.

    A ``finite`` duration (a lease) must be at most 10**9 s, so that its expiry stays exact in
    the script; otherwise infinity means no limit (``None``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0 or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")
    if finite and value > _LONGEST:
        raise ValueError(f"{name} must be at most {_LONGEST:g} seconds, got {value}")
    if math.isinf(value):
        return None
    return float(value)


def lease_micros(value: object) -> int:
    """Give the lease duration in whole microseconds (the server's unit); at least one."""
    lease = seconds(value, "lease", finite=True)
    micros = round((lease or 0.0) * 1e6)
    if micros < 1:
        # A lease that rounds to 0 would expire as it is granted: the budget would stop limiting.
        raise ValueError(f"lease must be at least 1e-06 seconds (one microsecond), got {value}")
    return micros


def rate_fraction(rate: object) -> Fraction:
    """Give the stored form of ``rate``: a fraction p/q with q * (p + 1) < 2**33.

    Every rate that is a ratio of small integers (``100 / 60``, ``2_000_000 / 60``) is kept
    exactly; others are rounded to the nearest such fraction. A rate above 0 that would be
    stored as 0 is a ValueError: the budget would silently never refill.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float, Fraction)):
        raise TypeError(f"rate must be a number of units per second, not {type(rate).__name__}")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"rate must be a finite number >= 0, got {rate}")
    if rate >= _RATE_LIMIT - 1:
        raise ValueError(f"rate must be below {_RATE_LIMIT - 1} units per second, got {rate}")
    exact = Fraction(rate)
    bound = _RATE_LIMIT // (math.ceil(exact) + 1)
    while True:
        near = exact.limit_denominator(max(bound, 1))
        if near.denominator * (near.numerator + 1) < _RATE_LIMIT:
            break
        bound //= 2
    if exact and not near:
        smallest = Fraction(1, _RATE_LIMIT // 2)
        raise ValueError(
            f"rate must be 0 or at least {float(smallest):.3g} units per second (a Redis budget "
            f"stores it as a fraction p/q with q < 2**33), got {rate}"
        )
    return near


class Lease:
    """A leased amount on the server: the refund of a Redis reservation, and a permit's grant.

    Called with an amount (the estimate when its reservation is dropped), it gives that much
    back once, without blocking: on the event loop it was granted on, or with the budget's next
    call, or at exit. In a process forked after the grant it does nothing (the parent owns the
    lease).
    """

    __slots__ = (
        "__weakref__",
        "_budget",
        "_loop",
        "_pid",
        "_used",
        "amount",
        "id",
        "member",
        "name",
        "owed",
    )

    def __init__(
        self,
        budget: Core,
        lease_id: str,
        leased: int,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        # A strong reference: a weak one is cleared before a reference cycle that holds the
        # reservation is collected, and its refund would be lost. The budget's core holds no
        # lease, so this makes no cycle; it keeps the client a refund needs.
        self._budget = budget
        self.name = budget.name
        self.id = lease_id
        self.amount = leased
        self.member = f"{lease_id}|{leased}"  # how the server holds it: id and amount
        self._loop = loop
        self._pid = os.getpid()
        self._used = False
        #: The settlement or release of this lease that raised and is owed by the outbox.
        self.owed: Call | None = None

    @property
    def used(self) -> bool:
        """Whether the lease was given back, recorded or handed to a refund."""
        return self._used

    @property
    def settle_id(self) -> str:
        """The id of this lease's settlement: one per lease, so it is charged once."""
        return self.id + ":settle"

    @property
    def end_id(self) -> str:
        """The id of this lease's refund or release."""
        return self.id + ":end"

    def claim(self) -> bool:
        """Mark the lease as settled; ``False`` if it already was."""
        if self._used:
            return False
        self._used = True
        return True

    def unclaim(self) -> None:
        """Undo :meth:`claim` when the call that settles the lease was never sent."""
        self._used = False

    def __call__(self, refund: int) -> None:
        refund = amount(refund, "amount", self.amount)
        if not self.claim() or self._pid != os.getpid():
            return
        self._budget.unlease_later(self, refund, self._loop)

    def settle_later(self, used: int) -> bool:
        """Charge the lease ``used`` once, without blocking, as a refund is sent.

        ``False`` (nothing queued) if it was already settled, or was granted to the parent of
        this forked process.
        """
        if self._pid != os.getpid() or not self.claim():
            return False
        self.owed = Call(SETTLE, self.settle_id, self.member, used)
        self._budget.send_later(self.owed, self._loop)
        return True

    def __repr__(self) -> str:
        return f"<Lease {self.id} of {self.amount}{' (settled)' if self._used else ''}>"


_LIVE: weakref.WeakSet[Core] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for core in list(_LIVE):
        core.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Core(Waiting):
    """One Redis budget as seen by this process: keys, clients, configuration, owed calls."""

    def __init__(
        self,
        owner: str,
        *,
        name: object,
        kind: str,
        capacity: int,
        rate: Fraction,
        lease_micros: int,
        client: object,
        sync_client: object,
        reconfigure: bool,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not name or "{" in name or "}" in name:
            raise ValueError(f"name must be a non-empty str without braces, got {name!r}")
        if client is None and sync_client is None:
            raise TypeError(f"{owner} needs client= (asyncio) or sync_client= (blocking), or both")
        super().__init__()
        self.owner = owner
        self.name = name
        tag = "{" + name + "}"
        self.keys: Final = (tag, tag + ":leases", tag + ":calls", tag + ":calls:prior")
        self.channel = tag + ":room"
        # The number of keys and the keys, encoded once (redis-py passes bytes through).
        self.head: Final = (len(self.keys), *(key.encode() for key in self.keys))
        self.capacity = capacity
        self.rate = rate
        self.lease_micros = str(lease_micros).encode()
        # How long the server keeps call outcomes: at least the lease, 10 minutes at least.
        self.keep = str(max(lease_micros, KEEP_SECONDS * 1_000_000)).encode()
        self.client: Any = client
        self.sync_client: Any = sync_client
        self.conf: tuple[bytes, ...] = tuple(
            str(x).encode() for x in (kind, capacity, rate.numerator, rate.denominator)
        )
        self.config_mode = _STORE if reconfigure else _CHECK
        self.outbox = Outbox(f"the Redis budget {name!r}", self.send_at_exit)
        self.tasks: set[asyncio.Task[None]] = set()  # sends of owed calls on their way
        _LIVE.add(self)

    def after_fork(self) -> None:
        """In a forked child: forget the parent's sends, waiters and subscriptions."""
        self.tasks = set()
        self.forget_waiters()

    # -- one script call ----------------------------------------------------------------------

    def _argv(  # noqa: PLR0917 - the script's arguments, in its order
        self,
        operation: bytes,
        call_id: object,
        first: object,
        second: object,
        waiting: bool,
        queued: list[Call],
        config_mode: bytes,
    ) -> tuple[object, ...]:
        """Give the script's KEYS and ARGV (args.lua): the call, then the sections it needs."""
        argv = (*self.head, operation, call_id, first, second)
        if waiting:
            argv += _WAITING
        if config_mode:
            argv += (b"config", config_mode, *self.conf, self.keep)
        if queued:
            owed: list[object] = [b"queued", len(queued)]
            for call in queued:
                owed += (call.operation, call.id, call.first, call.second)
            argv += tuple(owed)
        return argv

    def _unknown(
        self, queued: list[Call], operation: bytes, call_id: str, first: object, second: object
    ) -> None:
        """Owe what makes certain the outcome of a call that raised or was cancelled."""
        self.outbox.put_back(queued)
        if operation in _RESENT:
            self.outbox.put(Call(operation, call_id, first, second))
        elif operation in _ROLLED_BACK:
            self.outbox.put(Call(VOID, call_id, first, b""))

    def _verdict(self, reply: object, queued: list[Call]) -> list[Any]:
        if type(reply) is not list or not reply:
            self.outbox.put_back(queued)
            raise BackendError(f"unexpected reply from the budget script: {reply!r}")
        if reply[0] == MISMATCH:
            self.outbox.put_back(queued)
            raise ValueError(self._mismatch(*(_text(x) for x in reply[1:5])))
        self.outbox.sent(queued)
        self.config_mode = _NONE
        return reply

    def _mismatch(self, kind: str, cap: str, rp: str, rq: str) -> str:
        stored = f"budget {self.name!r} is stored as {_describe(kind, cap, rp, rq)}"
        if kind != _text(self.conf[0]):
            return (
                f"{stored}; a {self.owner} cannot share its name, and reconfigure=True cannot "
                "change a budget's kind: use another name (or delete the budget's keys)"
            )
        mine = _describe(*(_text(x) for x in self.conf))
        return (
            f"{stored}; this object has {mine}; pass reconfigure=True to store this object's values"
        )

    def _failed(self, method: str, error: BaseException) -> BackendError:
        return BackendError(f"{method} on {self.name!r}: {type(error).__name__}: {error}")

    async def call(
        self,
        method: str,
        operation: bytes,
        call_id: str = "",
        first: object = b"",
        second: object = b"",
        *,
        waiting: bool = False,
    ) -> list[Any]:
        """Run ``operation`` on the server with the asyncio client, with the owed calls first.

        The configuration goes with the first call only (to check or store it), and again when
        the server answers that the budget does not exist (a restarted server, deleted keys).
        On a failure or a cancellation, the call is owed (re-sent or rolled back, by its id).
        """
        client = self.client
        if client is None:
            self.need("client", "an asyncio client (redis.asyncio.Redis)", method)
        outbox = self.outbox
        queued = outbox.take(_BATCH) if outbox.calls else _NOTHING
        try:
            argv = self._argv(operation, call_id, first, second, waiting, queued, self.config_mode)
            reply = await _eval(client, argv)
            if reply[0] == MISSING:
                argv = self._argv(operation, call_id, first, second, waiting, queued, _CREATE)
                reply = await _eval(client, argv)
        except _FAILURES as error:
            self._unknown(queued, operation, call_id, first, second)
            raise self._failed(method, error) from error
        except BaseException as error:
            self._unknown(queued, operation, call_id, first, second)
            if isinstance(error, asyncio.CancelledError) and operation is not SNAPSHOT:
                self.kick(asyncio.get_running_loop())  # the rollback or re-send goes now
            raise
        return self._verdict(reply, queued)

    def call_sync(
        self,
        method: str,
        operation: bytes,
        call_id: str = "",
        first: object = b"",
        second: object = b"",
        *,
        waiting: bool = False,
    ) -> list[Any]:
        """Run ``operation`` on the server with the blocking client (as :meth:`call` does)."""
        client = self.sync_client
        if client is None:
            self.need("sync_client", "a blocking client (redis.Redis)", method)
        outbox = self.outbox
        queued = outbox.take(_BATCH) if outbox.calls else _NOTHING
        try:
            argv = self._argv(operation, call_id, first, second, waiting, queued, self.config_mode)
            reply = _eval_sync(client, argv)
            if reply[0] == MISSING:
                argv = self._argv(operation, call_id, first, second, waiting, queued, _CREATE)
                reply = _eval_sync(client, argv)
        except _NotBlockingError:
            outbox.put_back(queued)  # nothing was sent
            raise TypeError(
                f"{self.owner}.{method} needs sync_client= to be a blocking client (redis.Redis)"
            ) from None
        except _FAILURES as error:
            self._unknown(queued, operation, call_id, first, second)
            raise self._failed(method, error) from error
        except BaseException:
            self._unknown(queued, operation, call_id, first, second)
            raise
        return self._verdict(reply, queued)

    def need(self, which: str, what: str, method: str) -> NoReturn:
        """Raise the TypeError of a method whose kind of client was not given."""
        raise TypeError(f"{self.owner}.{method} needs {which}= ({what}); none was given")

    def owed_call(self, call_id: str) -> Call | None:
        """Give the call ``call_id`` if the outbox owes it, else ``None``."""
        return next((call for call in self.outbox.owed() if call.id == call_id), None)

    # -- reading replies ----------------------------------------------------------------------

    def denied(self, reply: list[Any], wanted: int) -> Denied:
        """Read a denial: when the rate makes ``wanted`` fit, and the stored capacity."""
        micros = int(reply[1])
        return Denied(None if micros < 0 else micros / 1e6, int(reply[2]))

    def lease(self, lease_id: str, leased: int, loop: asyncio.AbstractEventLoop | None) -> Lease:
        """Wrap the lease the server just granted."""
        return Lease(self, lease_id, leased, loop)

    # -- calls owed, sent without blocking ----------------------------------------------------

    def unlease_later(
        self, lease: Lease, refund: int, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        """Give a lease back without blocking: on its loop if it runs, else with the next call."""
        self.send_later(Call(UNLEASE, lease.end_id, lease.member, refund), loop)

    def send_later(self, call: Call, loop: asyncio.AbstractEventLoop | None) -> None:
        """Queue ``call`` without blocking: sent on ``loop`` if it runs, else with the next call."""
        self.outbox.put(call)
        if loop is not None:
            self.kick(loop)

    def kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send the owed calls soon on ``loop`` (from any thread), if it still runs."""
        if self.client is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._start_sending)

    def _start_sending(self) -> None:
        task = asyncio.get_running_loop().create_task(self._send_owed())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send_owed(self) -> None:
        # Nobody awaits this task, and a drop must never raise: a failure leaves the calls in
        # the outbox (for the next call, flush() or the exit).
        with contextlib.suppress(Exception, asyncio.CancelledError):
            while self.outbox.calls:
                await self.call("refund", SNAPSHOT)

    async def flush(self) -> None:
        """Wait for the sends started on this loop, then send every call still owed."""
        await asyncio.sleep(0)  # sends handed over from other threads start their tasks
        loop = asyncio.get_running_loop()
        mine = [task for task in self.tasks if task.get_loop() is loop]
        if mine:
            await asyncio.gather(*mine)
        while self.outbox.calls:
            await self.call("flush", SNAPSHOT)

    def flush_sync(self) -> None:
        """Send every call still owed now, with the blocking client."""
        while self.outbox.calls:
            self.call_sync("flush_sync", SNAPSHOT)

    def send_at_exit(self, calls: list[Call], deadline: float) -> None:
        """Send ``calls`` over a new blocking connection before ``deadline`` (at exit)."""
        from costbound.redis._connect import blocking_twin  # noqa: PLC0415 - only at exit

        left = deadline - time.monotonic()
        user = self.sync_client if self.sync_client is not None else self.client
        client = blocking_twin(user, left)
        try:
            for start in range(0, len(calls), _BATCH):
                if time.monotonic() >= deadline:
                    raise TimeoutError("out of time")
                batch = calls[start : start + _BATCH]
                argv = self._argv(SNAPSHOT, "", b"", b"", False, batch, _CREATE)
                reply = _eval_sync(client, argv)
                if reply[0] == MISMATCH:
                    raise ValueError(self._mismatch(*(_text(x) for x in reply[1:5])))
        finally:
            client.close()


async def _eval(client: Any, argv: tuple[object, ...]) -> Any:  # noqa: ANN401 - a reply
    try:
        return await client.execute_command("EVALSHA", SHA, *argv)
    except NoScriptError:  # a restarted server, or SCRIPT FLUSH: EVAL caches it again
        return await client.execute_command("EVAL", SCRIPT, *argv)


def _eval_sync(client: Any, argv: tuple[object, ...]) -> Any:  # noqa: ANN401 - a reply
    try:
        reply = client.execute_command("EVALSHA", SHA, *argv)
    except NoScriptError:
        reply = client.execute_command("EVAL", SCRIPT, *argv)
    if hasattr(reply, "__await__"):  # an asyncio client given as the blocking one
        reply.close()
        raise _NotBlockingError
    return reply


class _NotBlockingError(Exception):
    """The blocking client returned an awaitable."""


def _describe(kind: str, cap: str, rp: str, rq: str) -> str:
    what = "a unit budget" if kind == "u" else "a token budget"
    rate = Fraction(int(rp), int(rq))
    return f"{what} of capacity {cap} and rate {float(rate):g}/s"
