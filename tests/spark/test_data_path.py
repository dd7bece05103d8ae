"""The data path as a user sees it: shuffled passes, epochs, a fixed holdout, chunked full batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from nets import TwoLayer
from toy_data import blobs
from toy_data import vector_frame as frame
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import ParamError

pytestmark = pytest.mark.timeout(240)




def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def dataloader_training(net, x, y, batch: int, steps: int, seed: int, lr: float) -> nn.Module:
    """Plain PyTorch with a shuffled DataLoader: ``steps`` Adam steps over as many epochs as
    they take, the generator seeded as sparktorch seeds partition 0 (``seed * 1_000_003``)."""
    net = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed * 1_000_003),
    )
    done = 0
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return net


@pytest.mark.parametrize("mode", ["async", "synchronous"])
def test_minibatch_steps_are_a_shuffled_dataloaders_epochs(spark, mode):
    # 50 rows, batches of 16: passes of 16, 16, 16 and 2 rows; 11 steps cross three passes.
    torch.manual_seed(0)
    net = TwoLayer(5, 8, 3)
    x, y = blobs(50, seed=1)
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=11, miniBatch=16, seed=5, mode=mode
    ).fit(frame(spark, x, y, 1))
    ref = dataloader_training(net, x, y, batch=16, steps=11, seed=5, lr=0.02)
    assert max_param_diff(fitted.getPytorchModel(), ref) <= 1e-5


def test_epochs_derive_the_steps_from_the_data(spark):
    x, y = blobs(60, seed=2)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
    df = frame(spark, x, y, 2)  # 30 rows a partition
    mini = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, miniBatch=8, epochs=2).fit(df)
    steps = [h["step"] for h in mini.getTrainingHistory() if h["worker"] == 0]
    assert sorted(steps) == list(range(2 * 4))  # 2 passes of ceil(30 / 8) = 4 steps
    full = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, epochs=3, partitionShuffles=2).fit(df)
    # One step a pass in full batch; step ids continue over the partition shuffles.
    assert sorted({h["step"] for h in full.getTrainingHistory()}) == list(range(6))
    assert len(full.getTrainingHistory()) == 2 * 3 * 2


def test_epochs_and_iters_together_is_a_clear_error(spark):
    x, y = blobs(10)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
    with pytest.raises(ParamError, match="epochs=2 and iters=5"):
        SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=5, epochs=2).fit(frame(spark, x, y, 1))
    with pytest.raises(ParamError, match="epochs=-1"):
        SparkTorch(inputCol="features", labelCol="label", torchObj=obj, epochs=-1).fit(frame(spark, x, y, 1))


def test_the_holdout_is_the_same_rows_across_passes_and_shuffles(spark):
    # lr=0: the model never changes, so the validation loss is a function of which rows are held
    # out. It is the same number at every step of every pass and every partition shuffle.
    torch.manual_seed(3)
    x, y = blobs(120, seed=3)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.0)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=12, miniBatch=16, validationPct=0.3,
        partitions=1, partitionShuffles=3,
    ).fit(frame(spark, x, y, 1))
    val = [h["val_loss"] for h in fitted.getTrainingHistory()]
    assert len(val) == 36 and all(v is not None for v in val)
    assert max(val) - min(val) <= 1e-6, val


def test_full_batch_in_chunks_is_one_full_batch_gradient(spark):
    # A buffer of a few rows: each full-batch step accumulates its gradient over many chunks,
    # and still equals plain PyTorch's full-batch steps on the union of the partitions.
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = blobs(64, seed=4)
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.1, momentum=0.9)
    spark.conf.set("spark.sparktorch.bufferBytes", "300")  # 5 rows of 5 features + label
    try:
        fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=15, mode="synchronous").fit(
            frame(spark, x, y, 2)
        )
    finally:
        spark.conf.unset("spark.sparktorch.bufferBytes")
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    assert max_param_diff(fitted.getPytorchModel(), ref) <= 1e-5
