#!/usr/bin/env bash
# `make wheel`: build the one wheel of the package, idempotently, into target/wheels/.
#
# The extension is built against CPython's stable ABI (PyO3's `abi3-py311`), so the single wheel
# (sparktorch-<version>-cp311-abi3-<platform>.whl) installs on every CPython >= 3.11 of that
# platform, with no Rust toolchain and no compiler on the installing machine. maturin comes from
# the dev venv (.venv) when it is set up, else from a small build venv (target/wheel-venv) that
# holds maturin only. A wheel newer than every Rust, build and Python source file is reused.
# Prints the wheel's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=target/wheels
version=$(awk -F'"' '/^version *=/ {print $2; exit}' Cargo.toml)

wheel=$(ls -t "$OUT"/sparktorch-"$version"-*abi3*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && [ -z "$(find crates Cargo.toml Cargo.lock pyproject.toml python README.md \
    -newer "$wheel" -type f ! -name '*.so' ! -name '*.pyc' 2>/dev/null | head -n1)" ]; then
  echo "$wheel"
  exit 0
fi

if [ -x .venv/bin/maturin ]; then
  maturin=.venv/bin/maturin
else
  if [ ! -x target/wheel-venv/bin/maturin ]; then
    echo "wheel: creating target/wheel-venv (maturin only)" >&2
    "$PYTHON" -m venv target/wheel-venv
    target/wheel-venv/bin/python -m pip install -q "$(grep '^maturin' requirements-dev.txt)"
  fi
  maturin=target/wheel-venv/bin/maturin
fi

echo "wheel: building (release; the first build takes several minutes)" >&2
rm -f "$OUT"/sparktorch-"$version"-*.whl
# The extension the dev set-up wrote into python/sparktorch is not part of the wheel's sources:
# maturin builds its own and puts it in the wheel.
# With the dev venv, the same interpreter and environment as scripts/setup.sh's `maturin
# develop`: PyO3's build script reruns (and the bindings recompile) whenever they differ.
if [ "$maturin" = .venv/bin/maturin ]; then
  VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" \
    "$maturin" build --release --interpreter "$PWD/.venv/bin/python" --out "$OUT" >&2
else
  "$maturin" build --release --out "$OUT" >&2
fi
wheel=$(ls -t "$OUT"/sparktorch-"$version"-*abi3*.whl 2>/dev/null | head -n1 || true)
[ -n "$wheel" ] || { echo "wheel: no abi3 wheel in $OUT (is pyo3's abi3-py311 feature on?)" >&2; exit 1; }
echo "$wheel"
