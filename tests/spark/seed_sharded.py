"""The seed program (DESIGN.md) with ``mode='synchronous'`` and ``psShards`` 1 and 2, in local
mode; run by ``test_shards.py::test_the_seed_program_with_two_shards_equals_one_server`` in its
own process (it needs 2 shard slots + 4 training slots: ``local[6]``).

Usage: ``python seed_sharded.py CSV_DIR ITERS OUT.npz``. Writes the fitted network's parameters
of each fit (``k1_*``, ``k2_*``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from prepare_mnist import prepare  # noqa: E402


def main(csv_dir: str, iters: int, out: str) -> None:
    train_csv, _ = prepare(Path(csv_dir))
    import torch
    import torch.nn as nn
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.pipeline import Pipeline
    from pyspark.sql import SparkSession

    from sparktorch import SparkTorch, serialize_torch_obj

    spark = (
        SparkSession.builder.appName("examples").master("local[6]")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    df = spark.read.option("inferSchema", "true").csv(str(train_csv)).coalesce(4).cache()
    params = {}
    for k in (1, 2):
        torch.manual_seed(0)
        network = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                nn.Linear(256, 10), nn.Softmax(dim=1))
        torch_obj = serialize_torch_obj(model=network, criterion=nn.CrossEntropyLoss(),
                                        optimizer=torch.optim.Adam, lr=0.0001)
        vector_assembler = VectorAssembler(inputCols=df.columns[1:785], outputCol="features")
        spark_model = SparkTorch(inputCol="features", labelCol="_c0", predictionCol="predictions",
                                 torchObj=torch_obj, iters=iters, partitions=4, verbose=1, useBarrier=True,
                                 mode="synchronous", lostWorkerPolicy="fail", psShards=k)
        p = Pipeline(stages=[vector_assembler, spark_model]).fit(df)
        net = p.stages[-1].getPytorchModel()
        for name, value in net.state_dict().items():
            params[f"k{k}_{name}"] = value.detach().numpy()
    np.savez(out, **params)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
