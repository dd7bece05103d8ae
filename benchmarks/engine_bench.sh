#!/usr/bin/env bash
# The engine's hot path against raw loopback TCP measured in the same run (docs/benchmarks.md,
# "Parameter server: hot path"). Each case alternates, per repetition, the raw baselines (hot and
# model-sized stream, push+pull and full-duplex exchanges) and the server's push+pull in float32
# and bfloat16; every line also gives the CPU busy. Medians and ratios are printed last. Results
# go to benchmarks/results/engine/<case>.txt.
# Usage: benchmarks/engine_bench.sh [reps] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
secs=${2:-3}
cargo build --release -q -p sparktorch-cli
bin=target/release/sparktorch-ps
out=benchmarks/results/engine
mkdir -p "$out"
run() {
  local name=$1; shift
  echo "== $name (load average: $(cut -d' ' -f1-3 /proc/loadavg))" | tee "$out/$name.txt"
  SPARKTORCH_LOG=warn "$bin" bench --params 25000000 --ops push_pull --loopback \
    --reps "$reps" --seconds "$secs" "$@" | tee -a "$out/$name.txt"
}
# float32 and bfloat16 in every repetition (one server each): the bf16/f32 ratios are paired.
run async-1client --clients 1 --mode async --dtype both
run async-4clients --clients 4 --mode async --dtype both
run hogwild-4clients --clients 4 --mode hogwild --dtype both
