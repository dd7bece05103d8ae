"""Sharded fits on real executor JVMs; run by tests/cluster/test_local_cluster.py.

Usage: ``python on_local_cluster.py OUT_DIR``. Starts ``local-cluster[2,2,1024]`` (two executor
JVMs of two cores each) with ``spark.rpc.message.maxSize=1`` (MiB): Spark refuses any task or
RPC message over 1 MiB, as a cluster refuses one over the default 128 MiB. The model has ~1.1M
values (4.4 MB of float32), so each of its two shards' ranges (2.2 MB) is over the limit: a
shard whose initial values travelled inside its task could not start. Fits ``psShards=2`` in
every style, checks that the executors (not this process) trained, that the synchronous fit
equals the same steps in single-process torch, and that the model saves and loads with the
same predictions. Writes ``OUT_DIR/result.json``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors
from pyspark.sql import SparkSession

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparktorch import SparkTorch, SparkTorchModel, serialize_torch_obj  # noqa: E402

ROWS, DIM, CLASSES, HIDDEN = 64, 1024, 3, 1024


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, size=ROWS)
    centers = rng.normal(0, 1, size=(CLASSES, DIM))
    return (centers[y] + rng.normal(0, 0.3, size=(ROWS, DIM))).astype(np.float32), y


def network() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def torch_reference(x: np.ndarray, y: np.ndarray, steps: int) -> np.ndarray:
    model = network()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])


def executor_pids(app_id: str) -> list[int]:
    """The executor JVMs of application ``app_id`` on this machine (from /proc): only this
    run's, never another application's."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
            except OSError:
                continue
            if b"org.apache.spark.executor.CoarseGrainedExecutorBackend" in args and app_id.encode() in args:
                pids.append(int(entry))
    return sorted(pids)


def killed_executor(spark, df, out: str) -> None:
    """A sharded hogwild fit whose executor JVMs are both killed once training runs: the fit
    must fail with an EngineError naming a lost shard, in bounded time (no hang)."""
    import signal
    import threading
    import time

    from sparktorch.errors import EngineError

    obj = serialize_torch_obj(network(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=1e-3)
    est = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=100_000, partitions=2, mode="hogwild",
        psShards=2, verbose=0, ioTimeout=30.0,
    )
    killed: list[int] = []

    def kill_when_training() -> None:
        from sparktorch._shards import live_shards

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not live_shards():
            time.sleep(0.2)
        time.sleep(3.0)  # training under way
        for pid in executor_pids(spark.sparkContext.applicationId):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=kill_when_training, daemon=True).start()
    t0 = time.monotonic()
    outcome = {"error": None}
    try:
        est.fit(df)
    except EngineError as e:
        outcome["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - recorded: the test asserts the kind
        outcome["error"] = f"{type(e).__name__}: {e}"
        outcome["not_engine_error"] = True
    outcome["seconds"] = time.monotonic() - t0
    outcome["killed"] = killed
    with open(os.path.join(out, "killed.json"), "w") as f:
        json.dump(outcome, f)


def main(out: str) -> None:
    spark = (
        SparkSession.builder.master("local-cluster[2,2,1024]")
        .appName("sparktorch-local-cluster-test")
        .config("spark.rpc.message.maxSize", "1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.executorEnv.OMP_NUM_THREADS", "1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    x, y = data()
    rows = [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]
    df = spark.createDataFrame(rows, ["features", "label"]).repartition(2).cache()
    pids = sorted(set(df.rdd.mapPartitions(lambda _: [os.getpid()]).collect()))
    n_params = sum(p.numel() for p in network().parameters())
    fits = []
    for mode, lock in (("hogwild", False), ("hogwild", True), ("synchronous", True)):
        obj = serialize_torch_obj(network(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=1e-3)
        est = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=8, partitions=2, mode=mode,
            acquireLock=lock, psShards=2, lostWorkerPolicy="fail", verbose=0,
        )
        fitted = est.fit(df)
        got = np.concatenate([p.detach().reshape(-1).numpy() for p in fitted.getPytorchModel().parameters()])
        record = {"mode": mode, "acquireLock": lock, "steps": len(fitted.getTrainingHistory())}
        if mode == "synchronous":
            record["max_diff_vs_torch"] = float(np.max(np.abs(got - torch_reference(x, y, 8))))
            path = os.path.join(out, "model")
            fitted.write().overwrite().save(path)
            before = [r[0] for r in fitted.transform(df).select(fitted.getPredictionCol()).collect()]
            loaded = SparkTorchModel.load(path)
            after = [r[0] for r in loaded.transform(df).select(loaded.getPredictionCol()).collect()]
            record["same_predictions_after_load"] = before == after and len(before) == ROWS
        fits.append(record)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"driver_pid": os.getpid(), "executor_pids": pids, "num_params": n_params, "fits": fits}, f)
    killed_executor(spark, df, out)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1])
