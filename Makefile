# The README's commands. Each target sets itself up first (scripts/setup.sh is idempotent).
.PHONY: setup example test test-rust test-python lint bench clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@scripts/setup.sh

## Run the main example: the seed program on local Spark with the bundled MNIST data, once per
## training style (lock-free hogwild, async with locking = the seed's default, synchronous).
example: setup
	$(PY) examples/simple_dnn.py --mode hogwild --acquire-lock false --out examples/out/simple_dnn_hogwild
	$(PY) examples/simple_dnn.py --mode hogwild --acquire-lock true --out examples/out/simple_dnn
	$(PY) examples/simple_dnn.py --mode synchronous --out examples/out/simple_dnn_synchronous

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
