"""Buffers are trained state: a BatchNorm CNN comes back with its running statistics, in every mode.

Real data (the bundled MNIST images, 2x2-pooled to 14x14), real local Spark, and plain PyTorch
as the reference.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nets import BNConvNet
from toy_data import vector_frame as frame
from sparktorch import SparkTorch, serialize_torch_obj

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
SIDE = 14


def mnist(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` bundled MNIST images from ``offset``, pooled to 14x14, scaled to [0, 1]."""
    with gzip.open(DATA / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DATA / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    x = images[offset : offset + n].astype(np.float32).reshape(n, SIDE, 2, SIDE, 2).mean(axis=(2, 4)) / 255.0
    return x.reshape(n, SIDE * SIDE), labels[offset : offset + n].astype(np.int64)



def plain_training(net: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int, lr: float, seed: int = 0) -> nn.Module:
    """Plain PyTorch: ``steps`` Adam updates on the mini-batches of shuffled passes over the data,
    as a ``DataLoader(shuffle=True)`` deals them and sparktorch walks a partition (full batch
    when ``batch`` is None), from the same initial weights."""
    net = copy.deepcopy(net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    order: list[torch.Tensor] = []
    for _ in range(steps):
        if batch and not order:
            order = list(torch.randperm(len(xt), generator=gen).split(batch))
        idx = order.pop(0) if batch else slice(None)
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
        opt.step()
    return net


def transform_accuracy(fitted, spark, x: np.ndarray, y: np.ndarray) -> float:
    out = fitted.transform(frame(spark, x, y, 2)).select("label", "predicted").collect()
    return float(np.mean([r["predicted"] == r["label"] for r in out]))


@pytest.mark.parametrize("mode,lock", [("hogwild", False), ("async", True), ("synchronous", True)])
def test_one_worker_returns_parameters_and_buffers_of_plain_pytorch(spark, mode, lock):
    torch.manual_seed(3)
    net = BNConvNet(SIDE)
    x, y = mnist(256)
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=8, mode=mode, acquireLock=lock
    ).fit(frame(spark, x, y, 1))
    want = plain_training(net, x, y, steps=8, batch=None, lr=0.01).state_dict()
    got = fitted.getPytorchModel().state_dict()
    assert got.keys() == want.keys()
    # The buffers moved (this is not the initial state) and equal plain PyTorch's.
    assert float(want["features.1.running_var"].sub(1).abs().max()) > 1e-3
    assert int(got["features.1.num_batches_tracked"]) == int(want["features.1.num_batches_tracked"]) == 8
    for name in want:
        diff = float((got[name].double() - want[name].double()).abs().max())
        assert diff <= 1e-5, f"{name}: {diff}"


@pytest.mark.parametrize("mode,lock", [("hogwild", False), ("async", True), ("synchronous", True)])
def test_batchnorm_cnn_predicts_as_well_as_plain_pytorch(spark, mode, lock):
    torch.manual_seed(7)
    net = BNConvNet(SIDE, dropout=0.1)
    # Long enough for both to near their plateau (the comparison is then about the trained
    # state, not about how fast staleness lets async catch up), 1,000 test rows.
    x, y = mnist(2400)
    x_test, y_test = mnist(1000, offset=5000)
    iters, parts, batch = 120, 2, 64
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=3e-3)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=iters, miniBatch=batch,
        partitions=parts, mode=mode, acquireLock=lock,
    ).fit(frame(spark, x, y, parts))
    # Plain PyTorch doing as many optimizer updates from the same initial weights.
    updates = iters if mode == "synchronous" else iters * parts
    ref = plain_training(net, x, y, steps=updates, batch=batch, lr=3e-3).eval()
    with torch.no_grad():
        ref_acc = float((ref(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    acc = transform_accuracy(fitted, spark, x_test, y_test)
    assert ref_acc > 0.8
    assert acc >= ref_acc - 0.03, f"transform accuracy {acc:.3f} vs plain PyTorch {ref_acc:.3f}"
    # Each worker's forward passes count: at least one per optimizer step of the server.
    assert int(fitted.getPytorchModel().state_dict()["features.1.num_batches_tracked"]) >= iters


def test_buffers_the_model_never_changes_come_back_exactly(spark):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor([1.0 / 3.0, 1e-30, 123456789.0], dtype=torch.float64))
            self.register_buffer("big", torch.tensor([2**40 + 1], dtype=torch.int64))
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x * self.scale.float())

    torch.manual_seed(0)
    net = Scaled()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=5, partitions=2).fit(
        frame(spark, x, y, 2)
    )
    got = fitted.getPytorchModel()
    assert torch.equal(got.scale, net.scale) and got.scale.dtype == torch.float64
    assert torch.equal(got.big, net.big)
    assert not torch.equal(got.fc.weight, net.fc.weight)


def test_frozen_embedding_and_lstm_train_as_in_plain_pytorch(spark):
    from nets import FrozenEmbeddingLSTM

    torch.manual_seed(4)
    net = FrozenEmbeddingLSTM()
    rng = np.random.default_rng(4)
    x = rng.integers(0, 20, size=(48, 6)).astype(np.float32)
    y = (x[:, -1] % 3).astype(np.int64)
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=10).fit(frame(spark, x, y, 1))
    ref = copy.deepcopy(net)
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=0.02)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    got = fitted.getPytorchModel()
    assert torch.equal(got.emb.weight, net.emb.weight)  # frozen: exactly as set
    for (name, a), (_, b) in zip(got.named_parameters(), ref.named_parameters()):
        assert float((a - b).detach().abs().max()) <= 1e-5, name
    assert not torch.equal(got.head.weight, net.head.weight)
