"""A fit inside ``mlflow.start_run()`` logs to a real local MLflow file store."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.feature import VectorAssembler

from nets import TwoLayer
from sparktorch import SparkTorch, serialize_torch_obj

# No usage telemetry from the tests (MLflow 3 reads these when it is imported).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.timeout(300)

ITERS, PARTS = 6, 2


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A local file store (MLflow 3 keeps it behind an opt-in), no telemetry; restored after."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    mlflow.set_experiment("sparktorch-test")
    yield mlflow.tracking.MlflowClient()
    mlflow.set_tracking_uri(previous)


def _data(spark):
    """Features from a VectorAssembler (as in the seed program: the feature size is known)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    rows = [(*map(float, r), float(v)) for r, v in zip(x, y)]
    df = spark.sparkContext.parallelize(rows, PARTS).toDF(["a", "b", "c", "d", "e", "label"])
    return VectorAssembler(inputCols=["a", "b", "c", "d", "e"], outputCol="features").transform(df)


def _estimator(**kw):
    torch.manual_seed(0)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    return SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=ITERS, validationPct=0.25, **kw)


def test_fit_in_a_run_logs_params_per_step_metrics_and_the_model(spark, store):
    df = _data(spark)
    with mlflow.start_run() as run:
        fitted = _estimator().fit(df)
    data = store.get_run(run.info.run_id).data
    assert len(data.params) >= 3
    assert data.params["iters"] == str(ITERS)
    assert data.params["optimizer"] == "Adam"
    assert float(data.params["optimizer.lr"]) == pytest.approx(0.01)
    assert "torchObj" not in data.params
    losses = store.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(ITERS * PARTS))
    expected = [r["loss"] for r in fitted.getTrainingHistory()]
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(expected)
    assert len(store.get_metric_history(run.info.run_id, "val_loss")) == ITERS * PARTS
    assert "staleness_mean" in data.metrics and "staleness_max" in data.metrics
    # The fitted network, as an MLflow PyTorch model that gives the same outputs.
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.allclose(logged(x), fitted.getPytorchModel()(x), atol=1e-6)


def test_mlflow_logging_param_turns_it_off(spark, store):
    df = _data(spark)
    with mlflow.start_run() as run:
        _estimator(mlflowLogging=False).fit(df)
    data = store.get_run(run.info.run_id).data
    assert data.params == {} and data.metrics == {}


def test_no_active_run_logs_nothing(spark, store):
    _estimator().fit(_data(spark))
    assert mlflow.active_run() is None
    runs = store.search_runs([mlflow.get_experiment_by_name("sparktorch-test").experiment_id])
    assert runs == []
