"""Refunds and releases still owed when a process exits (spec section 15).

- A worker process that drops a reservation and a permit and exits normally gives them back at
  exit (``atexit``, over a blocking connection made from its client's settings): the parent
  sees the units back at once, long before the leases (600 s) end. Every way a drop can be left
  unsent is covered: a blocking client (the refund waits for a next call that never comes), an
  asyncio client whose loop has closed, and a refund task that ``asyncio.run`` cancelled before
  it ran.
- The sends at exit take 2 seconds at most in all: a child exiting while the server is frozen
  exits before the server resumes, and says what it could not send.
- In one process, a refund task cancelled before it ran is queued again, not lost.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
import redis
import redis.asyncio
from costbound.redis import RedisBudget, RedisTokenBudget
from redis_support import unique

LEASE = 600.0  # far longer than any test: only an explicit refund brings the units back

_CHILD = """
import asyncio, sys
import redis, redis.asyncio
from costbound.redis import RedisBudget, RedisTokenBudget

url, tokens_name, units_name, mode = sys.argv[1:5]
sync = redis.Redis.from_url(url)
aclient = redis.asyncio.Redis.from_url(url)
# Each mode has one kind of client: the sends at exit make their own blocking connection from
# its settings (an asyncio client's loop is gone by then).
kw = {"lease": 600.0}
kw.update(sync_client=sync) if mode == "sync" else kw.update(client=aclient)
tokens = RedisTokenBudget(tokens_name, 1_000, **kw)
units = RedisBudget(units_name, 10, **kw)

if mode == "sync":  # the drops wait for a next call that never comes
    r = tokens.try_reserve_tokens_sync(400)
    p = units.reserve_blocking(4)
    print("held", flush=True)
    sys.stdin.readline()
    del r, p
elif mode == "loop-closed":  # dropped after asyncio.run closed the loop they were granted on
    async def grab():
        return [await tokens.try_reserve_tokens(400), await units.reserve(4)]
    held = asyncio.run(grab())
    print("held", flush=True)
    sys.stdin.readline()
    del held
elif mode == "task-cancelled":  # dropped as the loop ends: asyncio.run cancels the refund task
    async def work():
        r = await tokens.try_reserve_tokens(400)
        p = await units.reserve(4)
        print("held", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        del r, p
    asyncio.run(work())
print("exiting", flush=True)
"""


def _spawn(url: str, tokens: str, units: str, mode: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), url, tokens, units, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if line != "held\n":
        child.kill()
        raise AssertionError(f"the child failed: {line!r} {child.communicate()[1]}")
    return child


@pytest.mark.parametrize("mode", ["sync", "loop-closed", "task-cancelled"])
def test_a_worker_that_exits_gives_back_what_it_dropped_at_once(redis_url, mode):
    watch = redis.Redis.from_url(redis_url)
    try:
        tokens = RedisTokenBudget(unique("exit"), 1_000, lease=LEASE, sync_client=watch)
        units = RedisBudget(unique("exit-units"), 10, lease=LEASE, sync_client=watch)
        child = _spawn(redis_url, tokens.name, units.name, mode)
        held_tokens, held_units = tokens.snapshot_sync(), units.snapshot_sync()
        assert (held_tokens.available, held_tokens.outstanding) == (600, 1)
        assert (held_units.available, held_units.outstanding) == (6, 1)
        out, err = child.communicate("go\n", timeout=30)
        assert child.returncode == 0, err
        assert out == "exiting\n"
        assert "Traceback" not in err, err
        # Seen before the fix: (600, 1) and (6, 1), until the leases end in 10 minutes.
        snap, usnap = tokens.snapshot_sync(), units.snapshot_sync()
        assert (snap.available, snap.outstanding, snap.reclaimed) == (1_000, 0, 0)
        assert (usnap.available, usnap.outstanding, usnap.reclaimed) == (10, 0, 0)
    finally:
        watch.close()


def test_the_sends_at_exit_give_up_after_two_seconds(redis_server, redis_url):
    watch = redis.Redis.from_url(redis_url)
    try:
        tokens = RedisTokenBudget(unique("exit-stalled"), 1_000, lease=LEASE, sync_client=watch)
        units = RedisBudget(unique("exit-stalled-units"), 10, lease=LEASE, sync_client=watch)
        child = _spawn(redis_url, tokens.name, units.name, "sync")
        # Frozen for longer than the child may take to exit: an unbounded send would hang
        # until the server resumes.
        with redis_server.stalled(8.0):
            out, err = child.communicate("go\n", timeout=7.0)
        assert child.returncode == 0, err
        assert out == "exiting\n"
        assert "could not be sent at exit" in err, err
        # Nothing was sent: the leases still hold the units (they end by themselves).
        assert tokens.snapshot_sync().outstanding == 1
        assert units.snapshot_sync().outstanding == 1
    finally:
        watch.close()


@pytest.mark.asyncio
async def test_a_refund_task_cancelled_before_it_ran_is_queued_again(redis_url):
    aclient = redis.asyncio.Redis.from_url(redis_url)
    try:
        tokens = RedisTokenBudget(unique("requeued"), 1_000, client=aclient)
        r = await tokens.try_reserve_tokens(400)
        del r  # its refund is scheduled on this loop...
        await asyncio.sleep(0)  # ...the task that sends it is made...
        tasks = list(tokens._core.tasks)
        assert tasks
        for task in tasks:  # ...and cancelled before it ran (a loop shutting down does this)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await tokens.flush()
        snap = await tokens.snapshot()
        # Seen before the fix: (600, 1): the refund was lost until the lease ended.
        assert (snap.available, snap.outstanding) == (1_000, 0)
    finally:
        await aclient.aclose()


def test_a_refund_queued_on_a_thread_inside_the_outbox_does_not_deadlock(redis_url):
    # A collection may run while this thread is inside the outbox (any allocation can trigger
    # one) and drop a reservation there: its refund is queued on the same thread. Seen with a
    # plain lock: the process hung.
    code = textwrap.dedent(
        """
        import sys, redis
        from costbound import _outbox
        from costbound.redis import RedisTokenBudget
        tb = RedisTokenBudget(sys.argv[2], 100, sync_client=redis.Redis.from_url(sys.argv[1]))
        r = tb.try_reserve_tokens_sync(10)
        with _outbox._LOCK:  # as inside Outbox.take when a collection runs a finalizer
            del r
        tb.flush_sync()
        print(tb.snapshot_sync().available)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, redis_url, unique("reentrant")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "100\n"
