"""Shared test settings: Hypothesis profiles and a check that the installed wheel is under test."""

from __future__ import annotations

import os
from pathlib import Path

import costbound
from hypothesis import HealthCheck, settings

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
