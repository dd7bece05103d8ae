"""The driver program of ``benchmarks/netns_shards.sh``: fits with ``psShards`` 1 and 2 (and
more when asked) in the three styles on the simulated cluster, measuring the training job's
aggregate push+pull throughput and the fit time.

Usage (inside the driver's network namespace, as the shell script runs it)::

    python netns_shards_fit.py spark://HOST:PORT DRIVER_HOST OUT.json [--shards 1,2] [--steps N]

Throughput = the bytes every shard received and sent (the engine's ``bytes_in`` + ``bytes_out``
counters, summed over shards) / the wall time of the training job (from its submission to its
end; task start-up included). The fit time is ``SparkTorch.fit`` end to end (shard start-up
included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors
from pyspark.sql import SparkSession

from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch import _driver

STYLES = (("synchronous", True), ("async", True), ("hogwild", False))

_measured: dict[str, Any] = {}
_orig_run_jobs = _driver._run_jobs


def _bytes(st: dict[str, Any]) -> int:
    return int(st["bytes_in"]) + int(st["bytes_out"])


def _timed_run_jobs(est: Any, plan: Any, frame: Any, label_kind: str, server: Any, *args: Any, **kw: Any) -> Any:
    """``_driver._run_jobs``, timed, with the servers' byte counters read after it; a sampler
    thread notes the time and bytes when the first update was applied (the steady phase starts
    there: task start-up, spilling and model building are before it)."""
    stop = threading.Event()
    first: list[tuple[float, int]] = []

    def sample() -> None:
        while not stop.wait(0.1):
            try:
                st = server.stats()
            except Exception:  # noqa: BLE001 - the fit reports its own errors
                return
            if int(st.get("updates", 0)) > 0:
                first.append((time.monotonic(), _bytes(st)))
                return

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.monotonic()
    sampler.start()
    try:
        out = _orig_run_jobs(est, plan, frame, label_kind, server, *args, **kw)
    finally:
        stop.set()
    t1 = time.monotonic()
    sampler.join(5)
    st = server.stats()
    _measured["train_s"] = t1 - t0
    _measured["bytes"] = _bytes(st)
    if first:
        _measured["steady_s"] = t1 - first[0][0]
        _measured["steady_bytes"] = _bytes(st) - first[0][1]
    _measured["shards"] = st.get("shards") or [{"shard": 0, "host": server.address[0], "port": server.address[1]}]
    return out


_driver._run_jobs = _timed_run_jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("master")
    ap.add_argument("driver_host")
    ap.add_argument("out")
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=1536, help="the model is Linear(width, width) then Linear(width, 4)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--encryption", default="auto", help="psEncryption (auto: TLS, every server binds a non-loopback address here)")
    args = ap.parse_args()

    spark = (
        SparkSession.builder.master(args.master)
        .appName("sparktorch-netns-shards")
        .config("spark.driver.host", args.driver_host)
        .config("spark.driver.bindAddress", args.driver_host)
        .config("spark.executor.memory", "1g")
        .config("spark.ui.enabled", "false")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.executorEnv.OMP_NUM_THREADS", "1")
        .config("spark.locality.wait", "0")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    rng = np.random.default_rng(0)
    n = 64 * args.workers
    x = rng.normal(size=(n, args.width)).astype(np.float32)
    y = rng.integers(0, 4, n)
    rows = [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]
    df = spark.sparkContext.parallelize(rows, args.workers).toDF(["features", "label"]).cache()
    df.count()
    # Wait for every executor (one per worker namespace) before measuring anything.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        execs = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1
        if execs >= args.workers:
            break
        time.sleep(1)

    num_values = args.width * args.width + args.width + 4 * args.width + 4
    shard_counts = [int(s) for s in args.shards.split(",")]
    results = []

    def fit(k: int, mode: str, lock: bool, steps: int) -> tuple[Any, float]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(), nn.Linear(args.width, 4))
        obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.01)
        est = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=steps, miniBatch=16,
            partitions=args.workers, mode=mode, acquireLock=lock, lostWorkerPolicy="fail",
            psShards=k, psEncryption=args.encryption,
        )
        _measured.clear()
        t0 = time.monotonic()
        fitted = est.fit(df)
        return fitted, time.monotonic() - t0

    # Warm-up, not measured: every Python worker the measured fits will use starts (and imports
    # torch) here, for each shard count.
    for k in shard_counts:
        fit(k, "async", True, 2)
    for k in shard_counts:
        for mode, lock in STYLES:
            fitted, fit_s = fit(k, mode, lock, args.steps)
            steps = len(fitted.getTrainingHistory())
            rec = {
                "psShards": k,
                "mode": mode,
                "acquireLock": lock,
                "steps": steps,
                "values": num_values,
                "fit_s": round(fit_s, 2),
                "train_s": round(_measured["train_s"], 2),
                "bytes": _measured["bytes"],
                "throughput_MBps": round(_measured["bytes"] / _measured["train_s"] / 1e6, 2),
                "steady_s": round(_measured.get("steady_s", float("nan")), 2),
                "steady_MBps": round(_measured.get("steady_bytes", 0) / _measured.get("steady_s", float("nan")) / 1e6, 2),
                "shards": [{"shard": s["shard"], "host": s["host"]} for s in _measured["shards"]],
            }
            print(json.dumps(rec), flush=True)
            results.append(rec)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    spark.stop()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
