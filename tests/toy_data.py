"""Small data sets and DataFrames shared by the tests (importable by name, like ``nets``)."""

from __future__ import annotations

import numpy as np
from pyspark.ml.linalg import Vectors


def blobs(n: int = 64, seed: int = 0, classes: int = 3, dim: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``classes`` well-separated Gaussian blobs in ``dim`` dimensions: float32 features and
    int64 class labels, the same draws for the same seed."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    centers = rng.normal(0, 3, size=(classes, dim))
    x = centers[y] + rng.normal(0, 0.5, size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def vector_frame(spark, x: np.ndarray, y: np.ndarray, parts: int):
    """A DataFrame of (features Vector, label double), rows split into ``parts`` contiguous slices."""
    rows = [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]
    return spark.sparkContext.parallelize(rows, parts).toDF(["features", "label"])
