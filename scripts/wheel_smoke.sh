#!/usr/bin/env bash
# `make test-wheel`: the wheel, installed where no Rust toolchain can be found, works.
#
#   1. builds the wheel (scripts/wheel.sh; reused when up to date);
#   2. creates a fresh venv in a temporary directory and, with PATH cut to that venv's bin,
#      /usr/bin and /bin (checked: no `cargo`, no `rustc`), runs `pip install <wheel>`: pip
#      resolves the package's dependencies (pyspark, numpy, pyarrow, pandas, ...) from the pip
#      cache or the index, and installs nothing that needs compiling;
#   3. runs `sparktorch-ps --help` and fits the seed network (784-256-256-10, Adam) on the
#      bundled MNIST rows on local Spark, synchronous mode, a few rounds, then transforms: all
#      from that venv, outside the checkout, and checks the package and its extension were the
#      wheel's (not the checkout's).
#
# torch is the exception to "pip resolves everything": a CUDA build of torch is gigabytes, so the
# fresh venv sees the dev venv's torch and what torch requires (nothing else) through a .pth file
# naming a directory of links to them, with their metadata, so that pip counts them as installed.
# SMOKE_KEEP=1 keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
t0=$(date +%s)

DEV=.venv
[ -x "$DEV/bin/python" ] || scripts/setup.sh
wheel=$ROOT/$(scripts/wheel.sh | tail -n1)
base_python=$("$DEV/bin/python" -c 'import sys; print(sys._base_executable)')
echo "wheel-smoke: $wheel"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sparktorch-wheel-smoke.XXXXXX")
[ "${SMOKE_KEEP:-0}" = 1 ] || trap 'rm -rf "$tmp"' EXIT
"$base_python" -m venv "$tmp/venv"
site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir "$tmp/torch"
"$DEV/bin/python" scripts/_torch_closure.py torch | while read -r p; do ln -s "$p" "$tmp/torch/"; done
echo "$tmp/torch" > "$site/_wheel_smoke_torch.pth"

# From here on: no Rust toolchain, nothing of the checkout on the path.
export PATH="$tmp/venv/bin:/usr/bin:/bin"
unset PYTHONPATH VIRTUAL_ENV CARGO_HOME RUSTUP_HOME
if command -v cargo >/dev/null || command -v rustc >/dev/null; then
  echo "wheel-smoke: cargo or rustc is still on PATH=$PATH" >&2
  exit 1
fi
cd "$tmp"
echo "wheel-smoke: pip install $(basename "$wheel") (PATH=$PATH)"
python -m pip install -q "$wheel"

out=$(sparktorch-ps --help)
for sub in serve bench inspect; do
  grep -q "$sub" <<<"$out" || { echo "wheel-smoke: 'sparktorch-ps --help' does not list $sub:" >&2; echo "$out" >&2; exit 1; }
done
echo "wheel-smoke: sparktorch-ps --help lists serve, bench, inspect"

[ -f "$ROOT/examples/data/mnist_train.csv" ] || python "$ROOT/examples/prepare_mnist.py"
OMP_NUM_THREADS=1 SMOKE_ROOT="$ROOT" SMOKE_VENV="$tmp/venv" timeout 300 python - <<'PY'
"""The seed fit from the wheel: synchronous, 2 workers, a few rounds; then a transform."""
import os
import sys

import sparktorch
from sparktorch import _native

venv, root = os.environ["SMOKE_VENV"], os.environ["SMOKE_ROOT"]
assert sparktorch.__file__.startswith(venv), f"sparktorch came from {sparktorch.__file__}, not the wheel"
assert _native.__file__.endswith("_native.abi3.so") and _native.__file__.startswith(venv), _native.__file__

os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
import torch
import torch.nn as nn
from pyspark.ml.feature import VectorAssembler
from pyspark.sql import SparkSession

from sparktorch import SparkTorch, serialize_torch_obj

spark = (SparkSession.builder.master("local[2]").appName("wheel-smoke")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
df = spark.read.option("inferSchema", "true").csv(f"{root}/examples/data/mnist_train.csv").limit(1000).cache()
torch.manual_seed(0)
network = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10), nn.Softmax(dim=1))
obj = serialize_torch_obj(model=network, criterion=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, lr=0.001)
features = VectorAssembler(inputCols=df.columns[1:785], outputCol="features").transform(df)
est = SparkTorch(inputCol="features", labelCol="_c0", predictionCol="predictions", torchObj=obj,
                 iters=5, partitions=2, mode="synchronous", verbose=0)
model = est.fit(features)
rows = model.transform(features).select("_c0", "predictions").collect()
assert len(rows) == 1000, len(rows)
assert all(0 <= r.predictions <= 9 for r in rows)
accuracy = sum(r._c0 == r.predictions for r in rows) / len(rows)
print(f"wheel-smoke: fit (synchronous, 2 workers, 5 rounds) and transform from the wheel: "
      f"training accuracy {accuracy:.3f}; sparktorch {sparktorch.__version__} from {os.path.dirname(sparktorch.__file__)}")
spark.stop()
PY
echo "wheel-smoke: ok in $(( $(date +%s) - t0 )) s"
