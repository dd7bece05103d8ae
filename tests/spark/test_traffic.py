"""Parameter traffic options: bfloat16 payloads (``psDtype``) and bounded staleness
(``maxStaleness``), seen from a user's fit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from nets import BNConvNet, TwoLayer
from toy_data import blobs
from toy_data import vector_frame as frame
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import ParamError

pytestmark = pytest.mark.timeout(300)


def _params(fitted) -> np.ndarray:
    return torch.cat([p.detach().flatten().float() for p in fitted.getPytorchModel().state_dict().values()]).numpy()


def _accuracy(fitted, x: np.ndarray, y: np.ndarray) -> float:
    net = fitted.getPytorchModel().eval()
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize("mode,lock", [("hogwild", True), ("synchronous", False)])
def test_bfloat16_traffic_trains_a_batchnorm_cnn_like_float32(spark, mode, lock):
    # One partition, so that the only difference between the two fits is the bf16 rounding of
    # every pulled parameter and pushed gradient (the float32 fit equals plain PyTorch).
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=240)
    protos = rng.normal(0, 1, size=(4, 100)).astype(np.float32)
    x = (protos[y] + rng.normal(0, 0.6, size=(240, 100))).astype(np.float32)
    fits = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        obj = serialize_torch_obj(BNConvNet(10, classes=4), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
        fits[dtype] = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=30, miniBatch=32, partitions=1,
            mode=mode, acquireLock=lock, psDtype=dtype,
        ).fit(frame(spark, x, y, 1))
    full, half = _params(fits["float32"]), _params(fits["bfloat16"])
    assert not np.array_equal(full, half), "psDtype='bfloat16' changed nothing on the wire"
    # BatchNorm's running statistics came back too (not zeros, not the initial ones).
    bn = fits["bfloat16"].getPytorchModel().features[1]
    assert int(bn.num_batches_tracked) == 30 and float(bn.running_var.mean()) != 1.0
    assert _accuracy(fits["float32"], x, y) >= 0.9
    assert _accuracy(fits["bfloat16"], x, y) >= _accuracy(fits["float32"], x, y) - 0.05


def test_bfloat16_traffic_over_two_shards_equals_one_server(spark):
    # bfloat16 rounding is element by element: splitting the vector over shards changes nothing.
    x, y = blobs(120, seed=5)
    df = frame(spark, x, y, 2)
    params = {}
    for k in (1, 2):
        torch.manual_seed(0)
        obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
        params[k] = _params(SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=10, miniBatch=16, partitions=2,
            mode="synchronous", lostWorkerPolicy="fail", psShards=k, psDtype="bfloat16",
        ).fit(df))
    assert float(np.abs(params[1] - params[2]).max()) <= 1e-6


def test_max_staleness_zero_still_applies_every_step_once(spark, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    # A fresh store: the experiment an earlier test made active lives in another one.
    mlflow.set_experiment("sparktorch-traffic")
    try:
        x, y = blobs(300, seed=4)
        torch.manual_seed(4)
        obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
        iters, parts = 25, 3
        with mlflow.start_run() as run:
            fitted = SparkTorch(
                inputCol="features", labelCol="label", torchObj=obj, iters=iters, miniBatch=16,
                partitions=parts, mode="hogwild", acquireLock=False, maxStaleness=0,
            ).fit(frame(spark, x, y, parts))
        data = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data
    finally:
        mlflow.set_tracking_uri(previous)
    # Three lock-free workers racing: with maxStaleness=0 every applied push was computed on
    # the version it was applied to, and every worker's every step was applied exactly once.
    assert data.metrics["staleness_max"] == 0
    steps = sorted((h["worker"], h["step"]) for h in fitted.getTrainingHistory())
    assert steps == [(w, s) for w in range(parts) for s in range(iters)]
    assert _accuracy(fitted, x, y) >= 0.9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"maxStaleness": -2}, "maxStaleness"),
        ({"maxStaleness": 1, "mode": "synchronous"}, "maxStaleness"),
        ({"psDtype": "float16"}, "psDtype"),
        ({"maxStaleness": 1, "psShards": 2}, "maxStaleness"),
    ],
)
def test_bad_traffic_params_are_named_before_any_job(spark, kwargs, match):
    x, y = blobs(10)
    obj = serialize_torch_obj(TwoLayer(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    df = frame(spark, x, y, 1)
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None))
    with pytest.raises(ParamError, match=match):
        SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2, **kwargs).fit(df)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup(None)) == jobs_before
