"""Training semantics a PyTorch or PySpark user expects, each observable from outside the fit."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from nets import LogSoftmaxNLL, NoisyInTraining, TwoLayer
from toy_data import blobs
from toy_data import vector_frame as frame
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import ParamError

pytestmark = pytest.mark.timeout(240)




def test_validation_runs_in_eval_mode(spark):
    # lr=0: the weights never move, so in eval mode (dropout off) every step's validation loss is
    # the same number; in train mode dropout would make it jump from step to step.
    torch.manual_seed(0)
    x, y = blobs(80)
    obj = serialize_torch_obj(NoisyInTraining(), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.0)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=6, validationPct=0.5, partitions=1
    ).fit(frame(spark, x, y, 1))
    val = [h["val_loss"] for h in fitted.getTrainingHistory()]
    train = [h["loss"] for h in fitted.getTrainingHistory()]
    assert len(val) == 6 and all(v is not None for v in val)
    assert max(val) - min(val) <= 1e-6, val
    assert max(train) - min(train) > 1e-3  # dropout is on while training


def test_custom_class_index_loss_trains(spark):
    # Not in any list of known losses: it refuses float targets, so targets become class indices.
    torch.manual_seed(1)
    x, y = blobs(90, seed=1)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), LogSoftmaxNLL(), torch.optim.Adam, lr=0.05)
    fitted = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=40, partitions=2).fit(
        frame(spark, x, y, 2)
    )
    with torch.no_grad():
        acc = float((fitted.getPytorchModel()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc >= 0.9


def test_partition_shuffles_move_rows_between_partitions(spark, caplog):
    torch.manual_seed(2)
    x, y = blobs(200, seed=2)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    with caplog.at_level(logging.DEBUG, logger="sparktorch"):
        SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=2, partitions=4, partitionShuffles=3
        ).fit(frame(spark, x, y, 4))
    held: dict[int, set[str]] = {}
    for rec in caplog.records:
        m = re.match(r"shuffle (\d+), partition (\d+): (\d+) rows \(digest (\S+)\)", rec.getMessage())
        if m:
            held.setdefault(int(m.group(1)), set()).add(m.group(4))
    assert sorted(held) == [0, 1, 2], caplog.text
    # Each shuffle deals different rows to the partitions.
    assert held[0] != held[1] and held[1] != held[2] and held[0] != held[2]


def test_fit_tags_its_jobs_and_keeps_the_callers_job_group(spark):
    sc = spark.sparkContext
    x, y = blobs(40, seed=3)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    sc.setJobGroup("my-group", "my description")
    tags_before = set(sc.getJobTags())
    try:
        SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2).fit(frame(spark, x, y, 2))
        assert sc.getLocalProperty("spark.jobGroup.id") == "my-group"
        assert sc.getLocalProperty("spark.job.description") == "my description"
        assert set(sc.getJobTags()) == tags_before
        # The training job ran under a sparktorch tag: Spark's status store lists it.
        tracker = sc._jsc.sc().statusStore()
        jobs = tracker.jobsList(None)
        tags = {t for i in range(jobs.size()) for t in _scala_seq(jobs.apply(i).jobTags())}
        assert any(t.startswith("sparktorch-fit-") for t in tags), tags
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)


def _scala_seq(seq) -> list[str]:
    it = seq.iterator()
    out = []
    while it.hasNext():
        out.append(str(it.next()))
    return out


def test_reusing_a_checkpoint_path_is_refused_unless_resuming(spark, tmp_path):
    x, y = blobs(40, seed=4)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    ckpt = str(tmp_path / "ckpt")

    def est(**kw):
        args = {"inputCol": "features", "labelCol": "label", "torchObj": obj, "iters": 4, "checkpointPath": ckpt, **kw}
        return SparkTorch(**args)

    first = est().fit(frame(spark, x, y, 2))
    assert len(first.getTrainingHistory()) == 8
    # The same fit again would resume a finished checkpoint and return its weights after 0
    # steps: refused before any job, naming the way to resume.
    with pytest.raises(ParamError, match=r"checkpointPath=.*resumeFrom="):
        est().fit(frame(spark, x, y, 2))
    # Resuming is explicit, and says so in the log.
    resumed = est(resumeFrom=ckpt, iters=6).fit(frame(spark, x, y, 2))
    assert sorted({h["step"] for h in resumed.getTrainingHistory()}) == [4, 5]


def test_upstream_getter_aliases():
    est = SparkTorch(acquireLock=False, useBarrier=True)
    assert est.getAqcuireLock() is False
    assert est.getBarrier() is True
