#!/usr/bin/env bash
# The compatibility suite's extra set-up (`make test-compat`, so also `make test`), idempotently:
# the older supported PySpark lines of requirements-compat.txt, each in .venv/pyspark/<v>, which
# tests/compat puts first on PYTHONPATH. `make example` does not need them, so scripts/setup.sh
# leaves them out. Installed without dependencies (they share the venv's torch, pyarrow, ...), so
# each costs its own ~400 MB only; a line already complete is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
# Standalone use: the venv itself first (a no-op when it is ready).
[ -x "$VENV/bin/python" ] || scripts/setup.sh

grep -v '^#' requirements-compat.txt | while read -r pyspark_v py4j_v; do
  [ -n "$pyspark_v" ] || continue
  dir="$VENV/pyspark/$pyspark_v"
  if [ ! -f "$dir/.complete" ]; then
    echo "setup: installing PySpark $pyspark_v for the compatibility suite"
    rm -rf "$dir"
    "$VENV/bin/python" -m pip install -q --no-deps --target "$dir" "pyspark==$pyspark_v" "py4j==$py4j_v"
    touch "$dir/.complete"
  fi
done
