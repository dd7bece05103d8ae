"""A fit and a transform on ``local-cluster`` executors whose Python comes from a packed venv
(``spark.archives``); run by tests/cluster/test_archives.py.

Usage: ``python archive_fit.py ENV_TAR_GZ OUT.json DEPS_DIR`` (``DEPS_DIR``: where the
executors find torch and the other dependencies, on their ``PYTHONPATH``). The executors run ``./env/bin/python``
(the archive, unpacked by Spark in each executor's working directory); this driver runs its
own interpreter. Writes where the executors imported sparktorch from, and the fit's result.
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

from sparktorch import SparkTorch, serialize_torch_obj


def where(_rows):  # noqa: ANN001, ANN201 - runs on an executor
    import os
    import sys

    import sparktorch

    yield (os.path.realpath(sparktorch.__file__), os.path.realpath(sys.executable), os.getcwd())


def main(archive: str, out: str, deps: str) -> None:
    spark = (
        SparkSession.builder.master("local-cluster[1,2,1024]")
        .appName("sparktorch-archives-test")
        .config("spark.archives", f"{archive}#env")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.executorEnv.OMP_NUM_THREADS", "1")
        .config("spark.executorEnv.PYTHONPATH", deps)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    seen = sorted(set(spark.sparkContext.parallelize(range(2), 2).mapPartitions(where).collect()))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=90)
    x = (rng.normal(0, 3, size=(3, 5))[y] + rng.normal(0, 0.5, size=(90, 5))).astype(np.float32)
    df = spark.createDataFrame([(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)], ["features", "label"])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=30, partitions=2, mode="synchronous").fit(df)
    preds = np.array([r[0] for r in fitted.transform(df).select(fitted.getPredictionCol()).collect()])
    with open(out, "w") as f:
        json.dump({
            "executors_imported": [list(s) for s in seen],
            "driver_imported": os.path.realpath(sys.modules["sparktorch"].__file__),
            "steps": len(fitted.getTrainingHistory()),
            "accuracy": float((preds == y).mean()),
        }, f)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
