"""The compatibility suite: what every supported PySpark version must do.

`make test` runs this file on the venv's PySpark (the latest supported) with the rest of the
suite, then once more for each older supported line (3.5.x, 4.0.x) with that PySpark first on
``PYTHONPATH`` (see ``scripts/setup_compat.sh``); ``SPARKTORCH_EXPECT_PYSPARK`` says which version the
run is meant to exercise, so a broken ``PYTHONPATH`` cannot pass silently.
"""

from __future__ import annotations

import os

import numpy as np
import pyspark
import pytest
import torch
import torch.nn as nn
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler

from nets import BNConvNet
from toy_data import blobs
from sparktorch import SparkTorch, serialize_torch_obj

pytestmark = pytest.mark.timeout(300)


def test_runs_the_expected_pyspark():
    expected = os.environ.get("SPARKTORCH_EXPECT_PYSPARK")
    if expected:
        assert pyspark.__version__ == expected, pyspark.__file__



def columns_frame(spark, x: np.ndarray, y: np.ndarray, parts: int):
    """Plain numeric columns (f0..f4, label), as a CSV would give them."""
    rows = [tuple(float(v) for v in r) + (float(t),) for r, t in zip(x, y)]
    return spark.createDataFrame(rows, [f"f{i}" for i in range(x.shape[1])] + ["label"]).repartition(parts)


@pytest.mark.parametrize(
    "mode,lock,barrier,traffic",
    [
        ("hogwild", False, False, {}),
        ("hogwild", True, True, {}),
        ("synchronous", True, False, {}),
        # The traffic options and the sharded server on every PySpark line too.
        ("hogwild", False, False, {"psDtype": "bfloat16", "maxStaleness": 1}),
        ("synchronous", True, False, {"psShards": 2, "lostWorkerPolicy": "fail", "psDtype": "bfloat16"}),
    ],
)
def test_fit_transform_save_load(spark, tmp_path, mode, lock, barrier, traffic):
    torch.manual_seed(0)
    x, y = blobs(120)
    df = columns_frame(spark, x, y, 2)
    # The seed's shape: torch.nn layers in a Sequential (saved as a spec, no pickle).
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    assembler = VectorAssembler(inputCols=[f"f{i}" for i in range(5)], outputCol="features")
    est = SparkTorch(
        inputCol="features", labelCol="label", predictionCol="predicted", torchObj=obj, iters=40,
        partitions=2, mode=mode, acquireLock=lock, useBarrier=barrier, **traffic,
    )
    fitted = Pipeline(stages=[assembler, est]).fit(df)
    out = fitted.transform(df)
    # Batched inference (an Arrow or pandas UDF), never a row-at-a-time Python UDF.
    plan = out._jdf.queryExecution().executedPlan().toString()
    assert "ArrowEvalPython" in plan and "BatchEvalPython" not in plan, plan
    rows = out.select("label", "predicted").collect()
    acc = float(np.mean([r["label"] == r["predicted"] for r in rows]))
    assert acc >= 0.9

    Pipeline(stages=[assembler, est]).write().overwrite().save(str(tmp_path / "unfitted"))
    unfitted = Pipeline.load(str(tmp_path / "unfitted")).getStages()[-1]
    assert unfitted.getIters() == 40
    for name, value in traffic.items():
        assert unfitted.getOrDefault(name) == value, name
    fitted.write().overwrite().save(str(tmp_path / "p"))
    loaded = PipelineModel.load(str(tmp_path / "p"))
    again = loaded.transform(df).select("label", "predicted").collect()
    assert [r["predicted"] for r in again] == [r["predicted"] for r in rows]


def test_batchnorm_buffers_and_vector_output(spark):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    x = rng.random((64, 16)).astype(np.float32)
    y = (x.mean(axis=1) > 0.5).astype(np.int64)
    df = columns_frame(spark, x, y, 2)
    assembler = VectorAssembler(inputCols=[f"f{i}" for i in range(16)], outputCol="features")
    obj = serialize_torch_obj(BNConvNet(side=4, classes=2), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    est = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=5, partitions=2, mode="synchronous", useVectorOut=True)
    fitted = Pipeline(stages=[assembler, est]).fit(df)
    state = fitted.stages[-1].getPytorchModel().state_dict()
    assert int(state["features.1.num_batches_tracked"]) == 5
    assert float(state["features.1.running_var"].sub(1).abs().max()) > 1e-4
    vectors = fitted.transform(df).select("predicted").collect()
    assert len(vectors) == 64 and all(len(r["predicted"]) == 2 for r in vectors)


@pytest.mark.timeout(420)
def test_spark_connect_on_this_line(tmp_path):
    """Every line whose pip package bundles the Connect server (4.0 on): a local Connect server
    of that line fits in-stage shards equal to torch, transforms, saves and loads
    (``connect_case.py``, in a process of its own)."""
    import subprocess
    import sys
    from pathlib import Path

    from pyspark.find_spark_home import _find_spark_home

    if not os.environ.get("SPARKTORCH_EXPECT_PYSPARK"):
        pytest.skip("the venv's own PySpark: tests/connect (make test-connect) covers Connect on it")

    jars = Path(_find_spark_home()) / "jars"
    if not any(p.name.startswith("spark-connect_") for p in jars.glob("*.jar")):
        pytest.skip(f"PySpark {pyspark.__version__}'s pip package has no Connect server (it comes from --packages)")
    case = Path(__file__).with_name("connect_case.py")
    proc = subprocess.run([sys.executable, str(case), str(tmp_path / "model")], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 and f"CONNECT OK {pyspark.__version__}" in proc.stdout, proc.stderr[-4000:]
