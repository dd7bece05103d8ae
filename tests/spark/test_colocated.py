"""``psPlacement='tasks'`` on a classic session: the parameter servers inside the barrier
training stage (the path every Spark Connect fit takes; ``tests/connect`` runs it there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from toy_data import blobs, vector_frame
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import ParamError

pytestmark = pytest.mark.timeout(300)


def _estimator(**params):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    base = {"inputCol": "features", "labelCol": "label", "torchObj": obj, "iters": 12, "partitions": 2, "mode": "synchronous"}
    return SparkTorch(**{**base, **params})


def _flat(model) -> np.ndarray:
    return np.concatenate([p.detach().reshape(-1).numpy() for p in model.getPytorchModel().parameters()])


@pytest.fixture(scope="module")
def frame(spark):
    x, y = blobs(n=80, seed=11)
    return vector_frame(spark, x, y, 2)


@pytest.mark.parametrize("k", [1, 2])
def test_in_stage_servers_equal_the_driver_hosted_one(frame, k):
    extra = {"psShards": k, "lostWorkerPolicy": "fail"} if k > 1 else {}
    driver = _estimator(psPlacement="driver", **extra).fit(frame)
    tasks = _estimator(psPlacement="tasks", **extra).fit(frame)
    assert np.abs(_flat(tasks) - _flat(driver)).max() <= 1e-5
    assert len(tasks.getTrainingHistory()) == len(driver.getTrainingHistory()) == 24


def test_in_stage_hogwild_with_two_shards_learns(frame):
    x, y = blobs(n=80, seed=11)
    model = _estimator(psPlacement="tasks", mode="hogwild", acquireLock=False, psShards=2, iters=30).fit(frame)
    net = model.getPytorchModel().eval()
    assert float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean()) >= 0.9


def test_in_stage_shards_need_as_many_partitions(frame):
    with pytest.raises(ParamError, match="psShards=3.*only 2 partitions"):
        _estimator(psPlacement="tasks", psShards=3, lostWorkerPolicy="fail").fit(frame)


def test_unknown_placement_is_refused(frame):
    with pytest.raises(ParamError, match="psPlacement='moon'"):
        _estimator(psPlacement="moon").fit(frame)
