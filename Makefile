# The README's commands. Each target sets itself up first (scripts/setup.sh is idempotent).
.PHONY: setup setup-compat wheel test-wheel example test test-rust test-python test-connect test-compat lint bench bench-connect bench-data bench-engine bench-peer clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@scripts/setup.sh

## The older PySpark lines of the compatibility suite (.venv/pyspark/<v>): `make test` needs them,
## `make example` does not.
setup-compat: setup
	@scripts/setup_compat.sh

## The one wheel (abi3: every CPython >= 3.11 of this platform; no Rust needed to install it),
## into target/wheels/.
wheel:
	@scripts/wheel.sh

## Run the main example: the seed program on local Spark with the bundled MNIST data, once per
## training style (lock-free hogwild, async with locking = the seed's default, synchronous).
example: setup
	$(PY) examples/simple_dnn.py --mode hogwild --acquire-lock false --out examples/out/simple_dnn_hogwild
	$(PY) examples/simple_dnn.py --mode hogwild --acquire-lock true --out examples/out/simple_dnn
	$(PY) examples/simple_dnn.py --mode synchronous --out examples/out/simple_dnn_synchronous

## Run every test: Rust (fmt, clippy -D warnings, nextest), Python (pytest on local Spark, with
## the venv's PySpark), the Spark Connect suite, the compatibility suite on each older
## supported PySpark line, then the wheel installed without Rust.
test: setup test-rust test-python test-connect test-compat test-wheel

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust: lint
	cargo nextest run --workspace --no-fail-fast

test-python: setup
	$(PY) -m pytest -q -ra

## The Spark Connect suite: a local Connect server started by the tests themselves, in a pytest
## process of its own (a process holding a classic session cannot start one).
test-connect: setup
	SPARKTORCH_CONNECT_TESTS=1 $(PY) -m pytest -q -ra -p no:cacheprovider tests/connect

## The wheel installed into a fresh venv whose PATH has no cargo or rustc: `sparktorch-ps --help`
## and a seed fit on local Spark from it (scripts/wheel_smoke.sh; ~3 minutes).
test-wheel: setup
	scripts/wheel_smoke.sh

COMPAT_PYSPARK := $(shell awk '!/^\#/ && NF {print $$1}' requirements-compat.txt)

test-compat: setup-compat
	@for v in $(COMPAT_PYSPARK); do \
	  echo "== compatibility suite on PySpark $$v"; \
	  SPARKTORCH_EXPECT_PYSPARK=$$v PYTHONPATH="$(CURDIR)/.venv/pyspark/$$v" \
	    $(PY) -m pytest -q -ra -p no:cacheprovider tests/compat || exit 1; \
	done

## Benchmarks (see docs/benchmarks.md).
bench: setup
	$(PY) benchmarks/run_all.py

## The seed fit on Spark Connect beside classic (docs/benchmarks.md, "Spark Connect"; ~10 minutes):
## cold fit, time to the first step, warm fit, each side in its own process, alternating.
bench-connect: setup
	$(PY) benchmarks/connect_fit.py --reps 2

## A training task's memory for a partition 1x and 8x the size, and ingestion throughput against
## Spark's no-op mapInArrow (docs/benchmarks.md, "Data path"; a few minutes).
bench-data: setup
	$(PY) benchmarks/data_memory.py --full-batch --reps 5 --json benchmarks/results/data/data_memory.json

## Beside Spark's own TorchDistributor (docs/benchmarks.md, "Versus Spark's TorchDistributor";
## ~20 minutes on 2 cores): the seed program and a 5M-value MLP, TorchDistributor (DDP over gloo,
## local_mode=False) against our three styles and plain torch, each in a fresh process, alternating;
## then a rank that crashes at step 5. Results: benchmarks/results/peer/.
bench-peer: setup
	$(PY) benchmarks/vs_torch_distributor.py --reps 2 --big-reps 1

## The engine's push+pull against raw loopback TCP in the same run: 25M parameters, 1 and 4
## clients, float32 and bfloat16 (docs/benchmarks.md, "Parameter server: hot path"; ~5 minutes).
bench-engine:
	benchmarks/engine_bench.sh 5 3

clean:
	cargo clean
	rm -rf $(VENV) python/sparktorch/_native*.so
