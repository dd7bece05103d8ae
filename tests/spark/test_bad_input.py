"""Bad input gets a clear error naming the param or column at fault; nothing hangs."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.linalg import Vectors

from nets import TwoLayer
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import DataError, ParamError, SerializationError

pytestmark = pytest.mark.timeout(240)


def _obj(lr: float = 0.05) -> str:
    torch.manual_seed(0)
    return serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=lr)


def _rows(n: int = 20, nan_rows: int = 0, label_max: int = 2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5))
    x[:nan_rows, 0] = math.nan
    y = rng.integers(0, label_max + 1, size=n)
    y[0] = label_max
    return [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]


def _fit(df, **kwargs):
    args = {"inputCol": "features", "labelCol": "label", "torchObj": _obj(), "iters": 3, **kwargs}
    return SparkTorch(**args).fit(df)


def test_nan_in_features_reports_the_row_count(spark):
    df = spark.sparkContext.parallelize(_rows(20, nan_rows=3), 1).toDF(["features", "label"])
    with pytest.raises(DataError, match=r"3 row\(s\) contain NaN"):
        _fit(df)


def test_nan_in_labels(spark):
    rows = [(f, math.nan if i < 2 else y) for i, (f, y) in enumerate(_rows(20))]
    df = spark.sparkContext.parallelize(rows, 1).toDF(["features", "label"])
    with pytest.raises(DataError, match="labelCol"):
        _fit(df)


def test_labels_out_of_range_for_cross_entropy(spark):
    df = spark.sparkContext.parallelize(_rows(20, label_max=7), 1).toDF(["features", "label"])
    with pytest.raises(DataError, match=r"labelCol.*outside \[0, 3\)"):
        _fit(df)


def test_zero_rows(spark):
    df = spark.sparkContext.parallelize(_rows(4), 2).toDF(["features", "label"]).limit(0)
    with pytest.raises(DataError, match="zero rows"):
        _fit(df)


def test_feature_size_mismatch_known_from_metadata_fails_before_the_job(spark):
    pdf = spark.createDataFrame([(1.0, 2.0, 3.0, 0.0)], ["a", "b", "c", "label"])
    df = VectorAssembler(inputCols=["a", "b", "c"], outputCol="features").transform(pdf)
    with pytest.raises(DataError, match=r"inputCol 'features'.*3 features"):
        _fit(df)


def test_feature_size_mismatch_without_metadata(spark):
    rows = [(Vectors.dense([1.0, 2.0, 3.0]), 0.0)] * 4
    df = spark.sparkContext.parallelize(rows, 1).toDF(["features", "label"])
    with pytest.raises(DataError, match="inputCol"):
        _fit(df)


def test_minibatch_larger_than_a_partition_trains_with_a_warning(spark, caplog):
    # A partition smaller than miniBatch must not fail the fit late: its steps use every row,
    # and the driver says so.
    df = spark.sparkContext.parallelize(_rows(20), 2).toDF(["features", "label"])
    with caplog.at_level(logging.WARNING, logger="sparktorch"):
        fitted = _fit(df, miniBatch=50)
    assert len(fitted.getTrainingHistory()) == 2 * 3
    warned = [r.getMessage() for r in caplog.records if "miniBatch=50" in r.getMessage()]
    assert warned and "2 partition(s)" in warned[0], caplog.text


def test_foreign_torch_obj_string(spark):
    df = spark.sparkContext.parallelize(_rows(4), 1).toDF(["features", "label"])
    with pytest.raises(SerializationError):
        _fit(df, torchObj="definitely not a sparktorch object")


def test_non_vector_features_column(spark):
    df = spark.createDataFrame([("x", 1.0)], ["features", "label"])
    with pytest.raises(DataError, match="inputCol: column 'features' has type string"):
        _fit(df)


@pytest.mark.parametrize("placement,shards", [("tasks", 1), ("driver", 2)])
def test_state_over_max_result_size_is_refused_before_any_job(spark, placement, shards):
    """A model whose values + Adam state (~6.2 MB) cannot come back under
    spark.driver.maxResultSize=1m: a ClusterError naming the setting and the size to set, and no
    Spark job has started. (A start-up setting: set here on the running context's configuration
    for the test, and removed after it.)"""
    from sparktorch.errors import ClusterError

    df = spark.sparkContext.parallelize(_rows(20), 2).toDF(["features", "label"])
    obj = serialize_torch_obj(TwoLayer(5, 60_000, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    tracker = spark.sparkContext.statusTracker()
    jconf = spark.sparkContext._jsc.sc().conf()
    jconf.set("spark.driver.maxResultSize", "1m")
    try:
        before = set(tracker.getJobIdsForGroup(None))
        need = "39m" if placement == "tasks" else "4m"  # the whole state and the history bound, or one shard's
        with pytest.raises(ClusterError, match=rf"spark\.driver\.maxResultSize=1m; set spark\.driver\.maxResultSize to at least {need}"):
            SparkTorch(
                inputCol="features", labelCol="label", torchObj=obj, iters=1, partitions=2,
                psPlacement=placement, psShards=shards,
            ).fit(df)
        assert set(tracker.getJobIdsForGroup(None)) == before
    finally:
        jconf.remove("spark.driver.maxResultSize")
