"""The fit shared by the resume test and its killed driver: deterministic data and model."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors

from sparktorch import SparkTorch, serialize_torch_obj

ITERS = 50


class Paced(nn.Module):
    """A small classifier whose training forward pass takes at least 50 ms, so that a watcher
    can kill the driver between two checkpoints (the numerics are those of ``net``). Its
    BatchNorm makes the running statistics part of what a checkpoint must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(0.05)
        return self.net(x)


def frame(spark):
    rng = np.random.default_rng(21)
    y = rng.integers(0, 3, size=60)
    centers = rng.normal(0, 3, size=(3, 5))
    x = centers[y] + rng.normal(0, 0.5, size=(60, 5))
    rows = [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]
    return spark.sparkContext.parallelize(rows, 2).toDF(["features", "label"])


def estimator(**kwargs) -> SparkTorch:
    torch.manual_seed(21)
    obj = serialize_torch_obj(Paced(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    return SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=ITERS, mode="synchronous", **kwargs)
