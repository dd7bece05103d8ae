"""A BERT-base-sized fit on real executor JVMs: time, peak memory of every process, bytes moved.

    .venv/bin/python benchmarks/big_model.py [--dim 10500] [--iters 3] [--json out.json]

The model is ``Linear(dim, dim) -> ReLU -> Linear(dim, 10)``: 110.4M values at ``dim=10500``
(BERT-base has 110M), trained with Adam over ``psShards=2`` on ``local-cluster[2,2,MB]`` (two
executor JVMs, two task slots each: two shard tasks and two training tasks), with Spark's
default ``spark.rpc.message.maxSize`` (128 MiB) and ``spark.driver.maxResultSize`` (1 GiB), in
each style for ``--iters`` steps, then transformed (``--rows`` rows).

A sampler in this process reads the PSS (``/proc/<pid>/smaps_rollup``) of every process of the
run every ``--every`` seconds and keeps each one's peak, by role: the driver (the Python process
that calls ``fit``), the driver's JVM, each executor JVM, and each Python worker (shard hosts
and training tasks). The driver also reports its own PSS just before each ``fit`` and its peak
during it. Written: one JSON document (``--json``) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pss_peak import memory_kib, tree  # noqa: E402


def role(pid: int) -> str | None:
    """What process ``pid`` is in the run, from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "CoarseGrainedExecutorBackend" in cmd:
        return "executor-jvm"
    if "SparkSubmit" in cmd or "org.apache.spark.deploy" in cmd:
        return "driver-jvm"
    if "pyspark.daemon" in cmd or "sparktorch._daemon" in cmd or "pyspark.worker" in cmd:
        return "python-worker"
    if "big_model.py" in cmd and "--driver" in cmd:
        return "driver"
    return None


def sample(root: int, every: float, stop: threading.Event, peaks: dict[int, dict[str, Any]]) -> None:
    while not stop.is_set():
        for pid in tree(root):
            r = role(pid)
            if r is None:
                continue
            pss, _rss = memory_kib(pid)
            entry = peaks.setdefault(pid, {"role": r, "peak_pss_mib": 0.0})
            entry["peak_pss_mib"] = max(entry["peak_pss_mib"], pss / 1024)
        stop.wait(every)


def self_pss_mib() -> float:
    return memory_kib(os.getpid())[0] / 1024


def driver(args: argparse.Namespace) -> None:
    """The run itself (a process of its own): the fits and the transform."""
    import numpy as np
    import torch
    import torch.nn as nn
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession

    from sparktorch import SparkTorch, serialize_torch_obj

    spark = (
        SparkSession.builder.master(f"local-cluster[2,2,{args.executor_mb}]")
        .appName("sparktorch-big-model")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.memory", "4g")
        .config("spark.ui.enabled", "false")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.executorEnv.OMP_NUM_THREADS", "1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    y = rng.integers(0, 10, size=args.rows)
    df = spark.createDataFrame([(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)], ["features", "label"])
    df = df.repartition(2).cache()
    df.count()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(args.dim, args.dim), nn.ReLU(), nn.Linear(args.dim, 10))
    n = sum(p.numel() for p in net.parameters())
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=1e-4)
    del net
    out: dict[str, Any] = {"num_params": n, "float32_mib": n * 4 / 2**20, "fits": []}
    fitted = None
    for mode, lock in (("hogwild", False), ("hogwild", True), ("synchronous", True)):
        fitted = None
        import gc

        gc.collect()
        before = self_pss_mib()
        peak = {"v": before}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak["v"] = max(peak["v"], self_pss_mib())
                stop.wait(0.1)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        t0 = time.perf_counter()
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=args.iters, partitions=2, mode=mode,
            acquireLock=lock, psShards=2, lostWorkerPolicy="fail", miniBatch=32, verbose=0,
        ).fit(df)
        fit_s = time.perf_counter() - t0
        stop.set()
        t.join()
        stats = getattr(fitted, "_fit_stats", {}) or {}
        out["fits"].append({
            "mode": mode, "acquireLock": lock, "fit_s": round(fit_s, 2), "driver_pss_before_mib": round(before, 1),
            "driver_peak_pss_mib": round(peak["v"], 1), "driver_peak_over_before_mib": round(peak["v"] - before, 1),
            "bytes_in": stats.get("bytes_in"), "bytes_out": stats.get("bytes_out"),
            "steps": len(fitted.getTrainingHistory()),
        })
        print(f"FIT {json.dumps(out['fits'][-1])}", flush=True)
    assert fitted is not None
    t0 = time.perf_counter()
    fitted.transform(df).write.format("noop").mode("overwrite").save()
    out["transform_s"] = round(time.perf_counter() - t0, 2)
    print("RESULT " + json.dumps(out), flush=True)
    spark.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver", action="store_true", help="(internal) the run itself")
    ap.add_argument("--dim", type=int, default=10500)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--executor-mb", type=int, default=6144)
    ap.add_argument("--every", type=float, default=0.25)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.driver:
        driver(args)
        return
    cmd = [sys.executable, __file__, "--driver", "--dim", str(args.dim), "--iters", str(args.iters), "--rows", str(args.rows),
           "--executor-mb", str(args.executor_mb)]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peaks: dict[int, dict[str, Any]] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(proc.pid, args.every, stop, peaks), daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    finally:
        stop.set()
        sampler.join()
    result = next((json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "sparktorch-big-model.log"
        log_path.write_text(stdout + "\n--- stderr ---\n" + stderr)
        print(stdout[-3000:])
        print(stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"the run failed (rc {proc.returncode}); its whole output: {log_path}")
    by_role: dict[str, list[float]] = {}
    for entry in peaks.values():
        by_role.setdefault(entry["role"], []).append(round(entry["peak_pss_mib"], 1))
    result["peak_pss_mib_by_role"] = {r: sorted(v, reverse=True) for r, v in by_role.items()}
    result["command"] = " ".join(["benchmarks/big_model.py", *sys.argv[1:]])
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    # The benchmark's result, for the reader and docs/architecture.md ("Big models").
    print(text)


if __name__ == "__main__":
    main()
