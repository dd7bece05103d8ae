"""SparkTorch.fit on real local Spark, against plain single-process PyTorch as the reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors

from nets import AutoEncoder, TwoLayer
from toy_data import blobs
from sparktorch import SparkTorch, serialize_torch_obj, serialize_torch_obj_lazy
from sparktorch.errors import DataError, ParamError

pytestmark = pytest.mark.timeout(240)

N_IN, N_CLASSES = 5, 3



def frame(spark, x: np.ndarray, y: np.ndarray | None, parts: int, label_type=float):
    """A DataFrame of (features Vector, label) with rows split into `parts` contiguous slices."""
    if y is None:
        rows = [(Vectors.dense(r.tolist()),) for r in x]
        return spark.sparkContext.parallelize(rows, parts).toDF(["features"])
    rows = [(Vectors.dense(r.tolist()), label_type(v)) for r, v in zip(x, y)]
    return spark.sparkContext.parallelize(rows, parts).toDF(["features", "label"])


def torch_reference(model, criterion, opt_cls, opt_kwargs, x, target, iters):
    """Plain PyTorch: the same steps, full batch, in one process."""
    model = copy.deepcopy(model)
    opt = opt_cls(model.parameters(), **opt_kwargs)
    for _ in range(iters):
        opt.zero_grad()
        out = model(torch.from_numpy(x))
        loss = criterion(out, target)
        loss.backward()
        opt.step()
    return model


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize(
    "mode,lock",
    [("hogwild", False), ("hogwild", True), ("async", True), ("synchronous", True)],
)
def test_one_worker_equals_plain_pytorch(spark, mode, lock):
    torch.manual_seed(1)
    net = TwoLayer(N_IN, 8, N_CLASSES)
    x, y = blobs(48)
    crit = nn.CrossEntropyLoss()
    obj = serialize_torch_obj(net, crit, torch.optim.Adam, lr=0.01)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=15, mode=mode, acquireLock=lock
    ).fit(frame(spark, x, y, 1))
    ref = torch_reference(net, crit, torch.optim.Adam, {"lr": 0.01}, x, torch.from_numpy(y), 15)
    model = fitted.getPytorchModel()
    assert max_param_diff(model, ref) <= 1e-5
    # The server's optimizer state continues in plain PyTorch.
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(fitted.getOptimizerStateDict(model))
    assert int(opt.state_dict()["state"][0]["step"]) == 15


def test_synchronous_four_partitions_equals_full_batch(spark):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(N_IN, 6), nn.Tanh(), nn.Linear(6, N_CLASSES))
    x, y = blobs(64, seed=3)
    crit = nn.CrossEntropyLoss()
    obj = serialize_torch_obj(net, crit, torch.optim.SGD, lr=0.1, momentum=0.9)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=20, mode="synchronous"
    ).fit(frame(spark, x, y, 4))
    ref = torch_reference(net, crit, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, x, torch.from_numpy(y), 20)
    assert max_param_diff(fitted.getPytorchModel(), ref) <= 1e-5
    history = fitted.getTrainingHistory()
    assert {h["worker"] for h in history} == {0, 1, 2, 3}
    assert len(history) == 4 * 20


def test_lazy_object_with_model_parameters_learns(spark):
    x, y = blobs(96, seed=4)
    obj = serialize_torch_obj_lazy(
        TwoLayer, nn.CrossEntropyLoss, torch.optim.Adam, optimizer_params={"lr": 0.05},
        model_parameters={"n_in": N_IN, "hidden": 16, "n_out": N_CLASSES},
    )
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=40, partitions=2).fit(
        frame(spark, x, y, 2)
    )
    model = fitted.getPytorchModel()
    assert isinstance(model, TwoLayer) and model.fc1.out_features == 16
    assert accuracy(model, x, y) >= 0.9


@pytest.mark.parametrize("label_type", [int, float])
def test_cross_entropy_with_integer_and_double_labels(spark, label_type):
    torch.manual_seed(5)
    x, y = blobs(60, seed=5)
    obj = serialize_torch_obj(TwoLayer(N_IN, 8, N_CLASSES), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=40).fit(
        frame(spark, x, y, 2, label_type)
    )
    assert accuracy(fitted.getPytorchModel(), x, y) >= 0.9
    preds = fitted.transform(frame(spark, x, y, 2, label_type)).select("predicted").toPandas()["predicted"].to_numpy()
    assert (preds == y).mean() >= 0.9


def test_regression_with_mse(spark):
    torch.manual_seed(6)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, N_IN)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0], dtype=np.float32)
    y = x @ w + 0.5
    obj = serialize_torch_obj(nn.Linear(N_IN, 1), nn.MSELoss(), torch.optim.SGD, lr=0.1)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=150, mode="synchronous").fit(
        frame(spark, x, y, 2)
    )
    lin = fitted.getPytorchModel()
    np.testing.assert_allclose(lin.weight.detach().numpy().ravel(), w, atol=1e-2)
    np.testing.assert_allclose(float(lin.bias.detach()), 0.5, atol=1e-2)


def test_autoencoder_without_label(spark):
    torch.manual_seed(7)
    rng = np.random.default_rng(7)
    z = rng.normal(size=(64, 2)).astype(np.float32)
    x = (z @ rng.normal(size=(2, N_IN))).astype(np.float32)
    net = AutoEncoder(N_IN, 2)
    with torch.no_grad():
        before = float(nn.functional.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(x)))
    obj = serialize_torch_obj(net, nn.MSELoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", torchObj=obj, iters=100).fit(frame(spark, x, None, 2))
    with torch.no_grad():
        m = fitted.getPytorchModel()
        after = float(nn.functional.mse_loss(m(torch.from_numpy(x)), torch.from_numpy(x)))
    assert after < before / 4


def test_minibatch_and_validation_history(spark):
    torch.manual_seed(8)
    x, y = blobs(120, seed=8)
    obj = serialize_torch_obj(TwoLayer(N_IN, 8, N_CLASSES), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=30, miniBatch=10, validationPct=0.25
    ).fit(frame(spark, x, y, 2))
    history = fitted.getTrainingHistory()
    assert len(history) == 2 * 30
    assert all(h["val_loss"] is not None for h in history)
    assert accuracy(fitted.getPytorchModel(), x, y) >= 0.85


def test_early_stopping_stops_early(spark):
    torch.manual_seed(9)
    x, y = blobs(40, seed=9)
    # lr=0 never improves the loss: patience runs out after a few evaluations.
    obj = serialize_torch_obj(TwoLayer(N_IN, 8, N_CLASSES), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.0)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=500, earlyStopPatience=3, mode="synchronous"
    ).fit(frame(spark, x, y, 2))
    steps = len(fitted.getTrainingHistory())
    assert 0 < steps <= 2 * 10


def test_partition_shuffles_train_again(spark):
    torch.manual_seed(10)
    x, y = blobs(60, seed=10)
    obj = serialize_torch_obj(TwoLayer(N_IN, 8, N_CLASSES), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=5, partitions=2, partitionShuffles=3
    ).fit(frame(spark, x, y, 2))
    history = fitted.getTrainingHistory()
    assert len(history) == 2 * 5 * 3
    assert max(h["step"] for h in history) == 14


@pytest.mark.parametrize("mode", ["async", "synchronous"])
def test_empty_partition_is_legal(spark, mode):
    torch.manual_seed(11)
    x, y = blobs(30, seed=11)
    df = frame(spark, x, y, 3)
    # Rows only in partitions 0 and 2; partition 1 is empty.
    df = df.rdd.mapPartitionsWithIndex(lambda i, it: [] if i == 1 else it).toDF(df.schema)
    obj = serialize_torch_obj(TwoLayer(N_IN, 8, N_CLASSES), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=10, mode=mode).fit(df)
    assert {h["worker"] for h in fitted.getTrainingHistory()} == {0, 2}


def test_more_partitions_than_slots_with_barrier_is_a_clear_error(spark):
    x, y = blobs(40)
    obj = serialize_torch_obj(TwoLayer(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    est = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2, partitions=16, useBarrier=True)
    with pytest.raises(ParamError, match="partitions"):
        est.fit(frame(spark, x, y, 2))


def test_barrier_mode_trains(spark):
    x, y = blobs(40, seed=12)
    obj = serialize_torch_obj(TwoLayer(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=5, partitions=2, useBarrier=True).fit(
        frame(spark, x, y, 2)
    )
    assert len(fitted.getTrainingHistory()) == 10


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"iters": -1}, "iters"),
        ({"mode": "bogus"}, "mode"),
        ({"validationPct": 1.5}, "validationPct"),
        ({"partitionShuffles": 0}, "partitionShuffles"),
        ({"device": "tpu"}, "device"),
        ({"compileMode": "fastest"}, "compileMode"),
        ({"torchObj": ""}, "torchObj"),
    ],
)
def test_bad_params_are_named_before_any_job(spark, kwargs, param):
    x, y = blobs(10)
    obj = serialize_torch_obj(TwoLayer(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    args = {"inputCol": "features", "labelCol": "label", "torchObj": obj, "iters": 2, **kwargs}
    df = frame(spark, x, y, 1)
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None))
    with pytest.raises(ParamError, match=param):
        SparkTorch(**args).fit(df)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup(None)) == jobs_before


def test_missing_columns_and_wrong_types(spark):
    x, y = blobs(10)
    obj = serialize_torch_obj(TwoLayer(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    df = frame(spark, x, y, 1)
    with pytest.raises(DataError, match="nope"):
        SparkTorch(inputCol="nope", labelCol="label", torchObj=obj).fit(df)
    with pytest.raises(DataError, match="labelCol"):
        SparkTorch(inputCol="features", labelCol="missing", torchObj=obj).fit(df)
    with pytest.raises(DataError, match="string"):
        SparkTorch(inputCol="features", labelCol="s", torchObj=obj).fit(df.selectExpr("features", "'a' as s"))
    with pytest.raises(DataError, match="inputCol"):
        SparkTorch(inputCol="label", labelCol="label", torchObj=obj).fit(df)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compile_mode_really_compiles(spark):
    from nets import CompileProbe

    x, y = blobs(40, seed=13)
    torch.manual_seed(13)
    probe = CompileProbe(N_IN, N_CLASSES)
    before = probe.fc.weight.detach().clone()
    obj = serialize_torch_obj(probe, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    df = frame(spark, x, y, 1)
    eager = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=3).fit(df)
    compiled = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=3, compileMode="default").fit(df)
    # The probe learns only when torch.compile traced it.
    assert torch.equal(eager.getPytorchModel().fc.weight.detach(), before)
    assert not torch.equal(compiled.getPytorchModel().fc.weight.detach(), before)


def test_an_explicit_port_in_use_is_a_clear_error(spark):
    import socket

    x, y = blobs(10)
    obj = serialize_torch_obj(TwoLayer(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ParamError, match=f"port={port}"):
            SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2, port=port).fit(frame(spark, x, y, 1))
