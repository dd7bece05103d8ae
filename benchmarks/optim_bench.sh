#!/usr/bin/env bash
# One Adam step over 25M parameters (sequential vs parallel chunks, exclusive vs relaxed) beside
# this machine's memory bandwidth; see docs/benchmarks.md ("Optimizers").
# Usage: benchmarks/optim_bench.sh [elements] [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -q -p sparktorch-optim --example optim_bench -- "$@"
