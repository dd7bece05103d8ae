"""The Spark Connect case of the compatibility suite, in a process of its own (a process holding
a classic session cannot start a local Connect server): on this PySpark line's local Connect
server, a synchronous fit over two in-stage shards equals single-process torch, a hogwild fit
trains, the model transforms, and it saves and loads back with the same predictions.

    python tests/compat/connect_case.py DIR      # prints "CONNECT OK <pyspark version>"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "connect")]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyspark  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

import cases  # noqa: E402
from sparktorch import SparkTorchModel  # noqa: E402


def main(out: str) -> None:
    spark = SparkSession.builder.remote("local[2]").config("spark.sql.shuffle.partitions", "2").getOrCreate()
    try:
        assert spark.__class__.__module__.startswith("pyspark.sql.connect"), type(spark)
        df = cases.frame(spark)
        model = cases.estimator(psShards=2, lostWorkerPolicy="fail").fit(df)
        got, want = cases.flat(model), cases.torch_reference(15)
        diff = float(np.max(np.abs(got - want)))
        assert diff <= 1e-5, f"synchronous fit on Connect differs from torch by {diff}"
        hog = cases.estimator(mode="hogwild", acquireLock=False).fit(df)
        assert len(hog.getTrainingHistory()) > 0
        before = [r[0] for r in model.transform(df).select(model.getPredictionCol()).collect()]
        assert len(before) == 96
        model.write().overwrite().save(out)
        loaded = SparkTorchModel.load(out)
        after = [r[0] for r in loaded.transform(df).select(loaded.getPredictionCol()).collect()]
        assert after == before
    finally:
        spark.stop()
    print(f"CONNECT OK {pyspark.__version__}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
