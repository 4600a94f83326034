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

.PHONY: demo test venv wheel lint-rust test-rust loom lint-python types test-python clean

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

test-python: wheel
	COSTBOUND_REQUIRE_WHEEL=1 $(PY) -m pytest

clean:
	rm -rf target dist $(VENV) .venv-* .hypothesis .mypy_cache .ruff_cache .pytest_cache
