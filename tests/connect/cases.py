"""The fits that the Connect tests and their classic side (``classic_side.py``) share: the
same data, the same initial model, the same params, so that their results can be compared."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from toy_data import blobs

SYNC_CASES = {
    "k1": {"psShards": 1},
    "k2": {"psShards": 2, "lostWorkerPolicy": "fail"},
}
"""Synchronous fits compared across sessions (name -> extra params)."""

TORCH_CASES = {**SYNC_CASES, "k1_shuffles2": {"psShards": 1, "partitionShuffles": 2}}
"""Synchronous fits compared with single-process torch (full batch: the same steps on all rows)."""


def torch_reference(steps: int) -> np.ndarray:
    """``steps`` full-batch Adam steps of :func:`initial_model` on all rows, in one process."""
    x, y = blobs(n=96, seed=3, classes=3, dim=5)
    model = initial_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])


def rows() -> list[tuple]:
    from pyspark.ml.linalg import Vectors

    x, y = blobs(n=96, seed=3, classes=3, dim=5)
    return [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]


def frame(spark):
    """The shared data as a DataFrame of (features Vector, label double)."""
    return spark.createDataFrame(rows(), ["features", "label"])


def initial_model() -> nn.Module:
    """torch.nn layers only: saved as a spec (no pickle), so either side loads it."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def estimator(**params):
    from sparktorch import SparkTorch, serialize_torch_obj

    obj = serialize_torch_obj(initial_model(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    base = {"inputCol": "features", "labelCol": "label", "torchObj": obj, "iters": 15, "partitions": 2, "mode": "synchronous"}
    return SparkTorch(**{**base, **params})


def flat(model) -> np.ndarray:
    return np.concatenate([p.detach().reshape(-1).numpy() for p in model.getPytorchModel().parameters()])


def predictions(model, df) -> np.ndarray:
    out = model.transform(df).select("predicted").collect()
    return np.array([r["predicted"] for r in out], dtype=np.float64)
