"""The seed program's fit on Spark Connect beside the same fit on a classic session.

    .venv/bin/python benchmarks/connect_fit.py [--reps 2] [--out benchmarks/results/connect]

One measurement is one fresh process (one session) per side, the sides alternating, so both see
the same machine state within a repetition:

- ``classic``: ``SparkSession.builder.master("local[4]")``, the default placement (the parameter
  server on the driver);
- ``classic+tasks``: the same classic session with ``psPlacement='tasks'`` (the servers inside
  the training stage, as on Connect): the cost of the placement alone;
- ``connect``: ``SparkSession.builder.remote("local[4]")``, a local Spark Connect server with
  Spark's defaults (the parameter server inside the training stage);
- ``connect+daemon``: the same server started with ``spark.python.daemon.module=
  sparktorch._daemon``, the setting ``docs/architecture.md`` asks an operator to put in a
  Connect server's configuration (a Connect client cannot set it; a classic fit sets it itself
  in local mode).

Each process runs three synchronous fits of the seed program (``examples/simple_dnn.py``'s
network, Adam lr 1e-4, ``partitions=4``, 8,000 MNIST rows through ``VectorAssembler``, the
DataFrame not cached) and scores each on the 2,000 held-out rows:

1. ``cold``: 50 steps, the session's first fit (Python workers start, torch is imported);
2. ``first_step``: 1 step, warm: the time to a fit's first step, as a whole fit whose only step
   is the first (everything before the first step, one step, and the return);
3. ``warm``: 50 steps, warm.

Printed: a Markdown table of medians and the Connect/classic ratios (``docs/benchmarks.md``,
"Spark Connect"); raw records in ``<out>/connect_fit.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, OUR_PY, TEST_CSV, TRAIN_CSV, accuracy, load_csv, seed_network, setup_logging

log = logging.getLogger("bench.connect")

SIDES = ("classic", "classic+tasks", "connect", "connect+daemon")
FITS = (("cold", 50), ("first_step", 1), ("warm", 50))


def _worker_parent(batches: Any) -> Any:
    """Task body: the command line of the process this Python worker was forked from."""
    import pyarrow as pa

    for _ in batches:
        pass
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
        parent = fh.read().replace(b"\0", b" ").decode()
    yield pa.RecordBatch.from_pydict({"parent": [parent]})


def one_side(side: str) -> list[dict[str, Any]]:
    """Run the three fits in one session of ``side``; one record each."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import torch
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.pipeline import Pipeline
    from pyspark.sql import SparkSession
    from torch import nn

    from sparktorch import SparkTorch, serialize_torch_obj

    x_test, y_test = load_csv(TEST_CSV)
    t0 = time.perf_counter()
    if side.startswith("classic"):
        spark = SparkSession.builder.master("local[4]").config("spark.ui.enabled", "false").getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
    else:
        builder = SparkSession.builder.remote("local[4]").config("spark.ui.enabled", "false")
        if side == "connect+daemon":
            builder = builder.config("spark.python.daemon.module", "sparktorch._daemon")
        spark = builder.getOrCreate()
    session_s = time.perf_counter() - t0
    records = []
    try:
        for name, iters in FITS:
            torch.manual_seed(0)
            obj = serialize_torch_obj(model=seed_network(), criterion=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, lr=1e-4)
            df = spark.read.option("inferSchema", "true").csv(str(TRAIN_CSV)).coalesce(4)
            stages = [
                VectorAssembler(inputCols=df.columns[1:785], outputCol="features"),
                SparkTorch(
                    inputCol="features", labelCol="_c0", predictionCol="predictions", torchObj=obj, iters=iters,
                    partitions=4, verbose=0, useBarrier=True, mode="synchronous",
                    psPlacement="tasks" if side == "classic+tasks" else "auto",
                ),
            ]
            t = time.perf_counter()
            fitted = Pipeline(stages=stages).fit(df)
            fit_s = time.perf_counter() - t
            net = fitted.stages[-1].getPytorchModel()
            records.append({
                "side": side, "fit": name, "iters": iters, "fit_s": round(fit_s, 3), "session_s": round(session_s, 3),
                "accuracy": accuracy(net, x_test, y_test),
            })
            log.info("%s %s: %.2fs", side, name, fit_s)
        parent = spark.range(1, numPartitions=1).mapInArrow(_worker_parent, "parent string").collect()[0]["parent"]
        for r in records:
            r["daemon"] = "sparktorch._daemon" if "sparktorch._daemon" in parent else parent.split(" -m ")[-1].split()[0]
    finally:
        spark.stop()
    return records


def _median(records: list[dict[str, Any]], side: str, fit: str, key: str = "fit_s") -> float | None:
    values = [r[key] for r in records if r["side"] == side and r["fit"] == fit]
    return statistics.median(values) if values else None


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: medians per side and fit, and each Connect side's ratio to classic."""
    others = [s for s in SIDES[1:] if any(r["side"] == s for r in records)]
    lines = [
        "| fit | classic (s) | " + " | ".join(f"{s} (s) | {s} / classic" for s in others) + " | held-out accuracy (classic, connect) |",
        "|---|---|" + "---|---|" * len(others) + "---|",
    ]
    for fit, iters in FITS:
        base = _median(records, "classic", fit)
        cells = [f"{fit} ({iters} step{'s' if iters > 1 else ''})", f"{base:.2f}" if base else "n/a"]
        for side in others:
            v = _median(records, side, fit)
            cells += [f"{v:.2f}" if v else "n/a", f"**{v / base:.2f}x**" if v and base else "n/a"]
        acc_c, acc_r = _median(records, "classic", fit, "accuracy"), _median(records, "connect", fit, "accuracy")
        cells.append(f"{acc_c:.4f}, {acc_r:.4f}" if acc_c is not None and acc_r is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    sess = [_median(records, s, "cold", "session_s") for s in SIDES]
    lines.append("")
    lines.append("Session start (s, median): " + ", ".join(f"{s} {v:.1f}" for s, v in zip(SIDES, sess) if v is not None) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=SIDES, help="(internal) run one side in this process and print its records")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "connect")
    args = ap.parse_args()
    setup_logging()
    if args.side:
        print("RECORDS " + json.dumps(one_side(args.side)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    sides = [s for s in args.sides.split(",") if s]
    records: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = sides if rep % 2 == 0 else list(reversed(sides))
        for side in order:
            log.info("rep %d: %s", rep, side)
            proc = subprocess.run(
                [str(OUR_PY), __file__, "--side", side], capture_output=True, text=True, timeout=args.timeout,
            )
            got = [line for line in proc.stdout.splitlines() if line.startswith("RECORDS ")]
            if proc.returncode != 0 or not got:
                log.error("%s failed (rc %d): %s", side, proc.returncode, proc.stderr[-3000:])
                continue
            for r in json.loads(got[-1][len("RECORDS "):]):
                records.append({**r, "rep": rep})
    with open(args.out / "connect_fit.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    # The table is this script's result, for docs/benchmarks.md.
    print(table(records))


if __name__ == "__main__":
    main()
