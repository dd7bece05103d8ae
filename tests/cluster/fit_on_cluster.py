"""Fit in every mode on a Spark standalone cluster; run by tests/cluster/test_standalone.py.

Usage: ``python fit_on_cluster.py spark://127.0.0.1:PORT OUT.json``. Executors run in the
cluster's own JVMs and Python workers, separate from this driver process. Writes one record per
mode: accuracy on the training rows, steps in the history, and the executor process ids that
trained (to prove they are not this process).
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
from nets import TwoLayer  # noqa: E402

from sparktorch import SparkTorch, serialize_torch_obj  # noqa: E402


def main(master: str, out: str) -> None:
    spark = (
        SparkSession.builder.master(master)
        .appName("sparktorch-cluster-test")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.executor.memory", "1g")
        .config("spark.cores.max", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.pyspark.python", sys.executable)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=120)
    centers = rng.normal(0, 3, size=(3, 5))
    x = (centers[y] + rng.normal(0, 0.5, size=(120, 5))).astype(np.float32)
    rows = [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]
    df = spark.sparkContext.parallelize(rows, 2).toDF(["features", "label"]).cache()
    pids = sorted(set(df.rdd.mapPartitions(lambda _: [os.getpid()]).collect()))

    results = []
    for mode, lock in (("hogwild", False), ("hogwild", True), ("synchronous", True)):
        torch.manual_seed(1)
        obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=30, mode=mode, acquireLock=lock, useBarrier=True
        ).fit(df)
        with torch.no_grad():
            acc = float((fitted.getPytorchModel()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        results.append(
            {"mode": mode, "acquireLock": lock, "accuracy": acc, "steps": len(fitted.getTrainingHistory())}
        )
    with open(out, "w") as f:
        json.dump({"driver_pid": os.getpid(), "executor_pids": pids, "fits": results}, f)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
