"""Shared test settings: Hypothesis profiles and a check that the installed wheel is under test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import costbound
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings
from redis_support import REQUIRED as REDIS_REQUIRED
from redis_support import AtomicBackend, RedisBackend, RedisServer, find_redis_server

# LiteLLM fetches a price map over the network when imported, unless told not to: the suite runs
# offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# `make test` runs the suite against the release wheel installed in a fresh virtual environment,
# never against the source tree; it sets COSTBOUND_REQUIRE_WHEEL so that a mix-up fails loudly.
if os.environ.get("COSTBOUND_REQUIRE_WHEEL"):
    _source_tree = Path(__file__).resolve().parent.parent / "python"
    _imported = Path(costbound.__file__).resolve()
    if _source_tree in _imported.parents:
        raise RuntimeError(f"costbound imported from the source tree ({_imported}), not the wheel")

# Default: enough examples to catch a regression in a CI run of a few minutes.
# COSTBOUND_LONG=1: the long soak, opt-in.
settings.register_profile(
    "ci",
    max_examples=500,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=3_000,
    stateful_step_count=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("long" if os.environ.get("COSTBOUND_LONG") else "ci")


# --- A real redis-server for the Redis backend, and the backends the conformance suite runs on


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    executable = find_redis_server()
    if executable is None:
        if REDIS_REQUIRED:
            pytest.fail("COSTBOUND_REQUIRE_REDIS is set but redis-server is not installed")
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer(executable)
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.start()  # a fault test may have stopped it
    return redis_server.url


@pytest_asyncio.fixture(params=["atomic", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[AtomicBackend | RedisBackend]:
    """Each conformance test runs once per backend (async tests)."""
    if request.param == "atomic":
        yield AtomicBackend()
        return
    chosen = RedisBackend(request.getfixturevalue("redis_url"))
    yield chosen
    await chosen.aclose()


@pytest.fixture(params=["atomic", "redis"])
def sync_backend(request: pytest.FixtureRequest) -> Iterator[AtomicBackend | RedisBackend]:
    """Each conformance test runs once per backend (blocking tests: no asyncio client)."""
    if request.param == "atomic":
        yield AtomicBackend()
        return
    chosen = RedisBackend(request.getfixturevalue("redis_url"), use_async=False)
    yield chosen
    chosen.close_sync()
