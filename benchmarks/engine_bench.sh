#!/usr/bin/env bash
# The engine's hot path against raw loopback TCP measured in the same run (docs/benchmarks.md,
# "Parameter server: hot path"). Each case alternates, per repetition, the raw baselines and the
# server's push+pull; medians and ratios are printed last. Results go to
# benchmarks/results/engine/<case>.txt.
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
run async-1client-f32 --clients 1 --mode async
run async-1client-bf16 --clients 1 --mode async --dtype bfloat16
run async-4clients-f32 --clients 4 --mode async
run hogwild-4clients-f32 --clients 4 --mode hogwild
run async-4clients-bf16 --clients 4 --mode async --dtype bfloat16
