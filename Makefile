# The README's commands. Each target sets itself up first (scripts/setup.sh is idempotent).
.PHONY: setup example test test-rust test-python lint bench clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@scripts/setup.sh

## Run the main example: the seed program on local Spark with the bundled MNIST data.
example: setup
	$(PY) examples/simple_dnn.py

## Run every test: Rust (fmt, clippy -D warnings, nextest) and Python (pytest on local Spark).
test: setup test-rust test-python

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust: lint
	cargo nextest run --workspace --no-fail-fast

test-python: setup
	$(PY) -m pytest -q -ra

## Benchmarks (see docs/benchmarks.md).
bench: setup
	$(PY) benchmarks/run_all.py

clean:
	cargo clean
	rm -rf $(VENV) python/sparktorch/_native*.so
