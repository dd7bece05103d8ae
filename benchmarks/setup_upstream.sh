#!/usr/bin/env bash
# Prepare benchmarks/.venv-upstream: the venv of sparktorch 0.2.0 (the package we replace), beside
# ours (.venv). Idempotent: a second run with the venv already set up does nothing.
#
# By default the upstream venv gets its own sparktorch 0.2.0, dill, flask and requests, and shares
# the *same installed* torch, pyspark, numpy, pandas and pyarrow as ours through a path file
# (`_shared_with_main.pth`, appended after its own site-packages, so `import sparktorch` finds
# 0.2.0 and never ours). Same binaries on both sides, nothing downloaded twice.
# BENCH_UPSTREAM_ISOLATED=1 instead installs torch and pyspark of the same versions into it with pip
# (a full download of torch when pip's cache lacks it).
set -euo pipefail
cd "$(dirname "$0")/.."

MAIN_PY=.venv/bin/python
UP=benchmarks/.venv-upstream
STAMP="$UP/.bench-setup-v1"
PYTHON=${PYTHON:-python3}

[ -x "$MAIN_PY" ] || { echo "setup_upstream: $MAIN_PY missing (run make setup first)" >&2; exit 1; }
if [ -f "$STAMP" ] && "$UP/bin/python" -c 'import sparktorch, dill, flask, requests, torch, pyspark' 2>/dev/null; then
  exit 0
fi

if [ ! -x "$UP/bin/python" ]; then
  echo "setup_upstream: creating $UP"
  "$PYTHON" -m venv "$UP"
fi
up_site=$("$UP/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

if [ "${BENCH_UPSTREAM_ISOLATED:-0}" = "1" ]; then
  rm -f "$up_site/_shared_with_main.pth"
  tv=$("$MAIN_PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  sv=$("$MAIN_PY" -c 'import pyspark; print(pyspark.__version__)')
  nv=$("$MAIN_PY" -c 'import numpy; print(numpy.__version__)')
  echo "setup_upstream: installing torch==$tv pyspark==$sv numpy==$nv into $UP (isolated)"
  "$UP/bin/python" -m pip install -q "torch==$tv" "pyspark==$sv" "numpy==$nv"
else
  # A plain path line: the directory joins sys.path but its own .pth files (ours: the
  # sparktorch-dev.pth pointing at python/) are not processed, so our package stays invisible.
  echo "$main_site" > "$up_site/_shared_with_main.pth"
fi

echo "setup_upstream: installing sparktorch==0.2.0 dill flask requests"
"$UP/bin/python" -m pip install -q --disable-pip-version-check "sparktorch==0.2.0" dill flask requests
"$UP/bin/python" - <<'EOF'
import os, sparktorch
here = os.path.dirname(sparktorch.__file__)
assert os.path.exists(os.path.join(here, "server.py")), f"not the upstream package: {here}"
EOF
date -u +%FT%TZ > "$STAMP"
echo "setup_upstream: ready ($UP)"
