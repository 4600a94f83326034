# costbound: the two commands a fresh machine needs.
#   make demo   build the release wheel into a virtual environment and run the fleet simulation
#   make test   everything CI checks: Rust tests, loom models, lints, types, stubs, pytest on the wheel
#
# Prerequisites: a Rust toolchain (cargo) and CPython >= 3.10 with venv. Everything else is
# installed here, pinned, into $(VENV).

PYTHON ?= python3
VENV ?= .venv
# `release` for users (fat LTO); CI may pass CARGO_PROFILE=ci (thin LTO) to build faster.
CARGO_PROFILE ?= release
WHEELS := dist/wheels-$(notdir $(VENV))

PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: demo test venv wheel redis-server lint-rust test-rust loom lint-python types test-python clean \
	bench bench-smoke bench-env

demo: wheel
	$(PY) examples/demo.py

test: lint-rust test-rust loom wheel lint-python types test-python

venv: $(VENV)/.ready

$(VENV)/.ready: requirements/dev.txt requirements/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

# The release wheel, installed (not editable) so that the tests exercise what users install.
wheel: venv
	rm -rf $(WHEELS)
	$(BIN)/maturin build --profile $(CARGO_PROFILE) --interpreter $(PY) --out $(WHEELS)
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/costbound-*.whl

lint-rust:
	cargo fmt --check
	cargo clippy --all-targets --all-features -- -D warnings

test-rust:
	cargo test

# Model checks of the compare-and-swap paths; a separate target dir keeps --cfg loom builds apart.
loom:
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_models

lint-python: venv
	$(BIN)/ruff check python tests examples
	$(BIN)/ruff format --check python tests examples

# mypy on the package source; stubtest on the installed wheel's native module and its stub.
types: wheel
	$(BIN)/mypy --strict python/costbound tests/typing_checks.py
	cd $(VENV) && bin/python -m mypy.stubtest costbound._native

# The Redis tests run against a real redis-server from Debian's packages; the test session starts
# its own on a free loopback port with no persistence and stops it at the end.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
redis-server:
	command -v redis-server >/dev/null || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends redis-server; }

test-python: wheel redis-server
	COSTBOUND_REQUIRE_WHEEL=1 COSTBOUND_REQUIRE_REDIS=1 $(PY) -m pytest

# Benchmarks. The peers go into $(VENV); token-throttle needs Python 3.12, so when pyenv has one
# it gets its own environment with its own costbound wheel, and compare.py measures it (with
# costbound's token rows beside it) in a child process.
PY312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12))
BENCH312 := .venv-bench312
BENCH_ARGS := $(if $(PY312),--py312 $(BENCH312)/bin/python)

bench-env: wheel
	$(PY) -m pip install --quiet -r benches/requirements.txt
ifneq ($(PY312),)
	[ -x $(BENCH312)/bin/python ] || $(PY312) -m venv $(BENCH312)
	$(BENCH312)/bin/python -m pip install --quiet -r benches/peers_312.txt
	rm -rf dist/wheels-bench312
	$(BIN)/maturin build --profile $(CARGO_PROFILE) --interpreter $(BENCH312)/bin/python --out dist/wheels-bench312
	$(BENCH312)/bin/python -m pip install --quiet --force-reinstall --no-deps dist/wheels-bench312/costbound-*.whl
endif

# The full run whose table and chart README shows (a few minutes).
bench: bench-env
	cargo bench --bench core
	$(PY) benches/compare.py $(BENCH_ARGS) --json benches/results/compare.json --png benches/results/compare.png

# CI: both benchmarks, briefly, so they never rot; nothing is asserted about speed.
bench-smoke: bench-env
	COSTBOUND_BENCH_SMOKE=1 cargo bench --bench core
	$(PY) benches/compare.py --smoke $(BENCH_ARGS)

clean:
	rm -rf target dist $(VENV) .venv-* .hypothesis benches/out .mypy_cache .ruff_cache .pytest_cache
