"""A real ``redis-server`` for the tests, and one interface over the atomic and Redis budgets.

The server runs on a free loopback port with no persistence (``--save '' --appendonly no``),
started by the session fixture in ``conftest.py`` and stopped at the end. ``make test`` installs
it from Debian's packages and sets ``COSTBOUND_REQUIRE_REDIS=1``, so that a missing server fails
the run instead of skipping the Redis half of the suite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from costbound import AtomicBudget, AtomicTokenBudget

REQUIRED = bool(os.environ.get("COSTBOUND_REQUIRE_REDIS"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on a loopback port; ``stop()`` and ``start()`` for faults."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="costbound-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        if self.process is not None:
            return
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)

    @contextlib.contextmanager
    def stalled(self, seconds: float) -> Iterator[None]:
        """Freeze the server (SIGSTOP) for ``seconds`` from now, then let it go on (SIGCONT).

        The block runs while it is frozen (and may outlast the stall): commands sent meanwhile
        wait in the socket buffers and run once it resumes, as after a GC pause or a slow disk.
        Leaving the block always resumes it.
        """
        process = self.process
        assert process is not None, "the server is not running"
        process.send_signal(signal.SIGSTOP)
        resume = threading.Timer(seconds, process.send_signal, (signal.SIGCONT,))
        resume.start()
        try:
            yield
        finally:
            resume.join()
            process.send_signal(signal.SIGCONT)

    def send_owed(self) -> None:
        """Send what budgets still owe (permits and reservations the tests dropped unsettled).

        The library sends them at interpreter exit; by then this server is gone, and each
        would be reported as not sent. Sent now, while it runs, they are not.
        """
        if self.process is None:
            return
        from costbound import _outbox

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # those owed to another (closed) server
            _outbox._send_at_exit()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self.send_owed()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def unique(prefix: str = "test") -> str:
    """A budget name no other test uses."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# One interface over the backends (the conformance suite reads state through it)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    capacity: int
    available: int
    debt: int
    consumed: int
    utilization: float

    @property
    def balance(self) -> int:
        return self.available - self.debt


class AtomicBackend:
    """The lock-free budgets; state read from their properties."""

    name = "atomic"
    max_unit_capacity = 2**64 - 1
    max_token_capacity = 2**63 - 1
    max_actual = 2**64 - 1  # where `actual` and `consumed` saturate
    debt_floor = -(2**63)  # where the balance saturates

    def unit(self, capacity: int, **options: Any) -> Any:
        return AtomicBudget(capacity, **options)

    def tokens(self, capacity: int, **options: Any) -> Any:
        return AtomicTokenBudget(capacity, **options)

    def state_sync(self, budget: Any) -> State:
        debt = getattr(budget, "debt", 0)
        consumed = getattr(budget, "consumed", 0)
        utilization = getattr(budget, "utilization", None)
        if utilization is None:  # the token budget has none; the Redis snapshot computes it so
            utilization = (
                (budget.capacity - budget.available) / budget.capacity if budget.capacity else 0.0
            )
        return State(budget.capacity, budget.available, debt, consumed, utilization)

    async def state(self, budget: Any) -> State:
        return self.state_sync(budget)

    async def settle(self, budget: Any) -> None:
        """Let refunds of dropped reservations land (the atomic ones land at once)."""

    def settle_sync(self, budget: Any) -> None:
        """The same for the blocking side."""

    def refill_sync(self, budget: Any) -> None:
        budget.refill()

    async def refill(self, budget: Any) -> None:
        budget.refill()

    def queued(self, budget: Any) -> int:
        """How many requests of this process wait in the budget's queue."""
        return int(budget.waiters)

    async def release(self, permit: Any) -> None:
        """Give a permit back (the atomic one's ``release()`` is synchronous)."""
        permit.release()

    async def aclose(self) -> None:
        """Nothing to close."""


class RedisBackend:
    """The Redis budgets on the test server, each under a fresh name; state from snapshot()."""

    name = "redis"
    max_unit_capacity = 2**53 - 1
    max_token_capacity = 2**53 - 1
    max_actual = 2**53 - 1
    debt_floor = -(2**53 - 1)

    def __init__(self, url: str, *, use_async: bool = True) -> None:
        import redis
        import redis.asyncio

        self.url = url
        self.sync_client = redis.Redis.from_url(url)
        self.client = redis.asyncio.Redis.from_url(url) if use_async else None

    def unit(self, capacity: int, **options: Any) -> Any:
        from costbound.redis import RedisBudget

        options.setdefault("client", self.client)
        options.setdefault("sync_client", self.sync_client)
        return RedisBudget(options.pop("name", None) or unique("unit"), capacity, **options)

    def tokens(self, capacity: int, **options: Any) -> Any:
        from costbound.redis import RedisTokenBudget

        options.setdefault("client", self.client)
        options.setdefault("sync_client", self.sync_client)
        return RedisTokenBudget(options.pop("name", None) or unique("tokens"), capacity, **options)

    def state_sync(self, budget: Any) -> State:
        return _state(budget.snapshot_sync())

    async def state(self, budget: Any) -> State:
        return _state(await budget.snapshot())

    async def settle(self, budget: Any) -> None:
        await budget.flush()

    def settle_sync(self, budget: Any) -> None:
        budget.flush_sync()

    def refill_sync(self, budget: Any) -> None:
        budget.refill_sync()

    async def refill(self, budget: Any) -> None:
        await budget.refill()

    def queued(self, budget: Any) -> int:
        """How many requests of this process wait in the budget object's queue."""
        return len(budget._core.queue)

    async def release(self, permit: Any) -> None:
        """Give a permit back (a network call on Redis)."""
        await permit.release()

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        self.sync_client.close()

    def close_sync(self) -> None:
        self.sync_client.close()


def _state(snap: Any) -> State:
    return State(snap.capacity, snap.available, snap.debt, snap.consumed, snap.utilization)
