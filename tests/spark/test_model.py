"""SparkTorchModel.transform against plain torch on the same rows (real local Spark)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql.types import DoubleType, StringType, StructField, StructType

from sparktorch.errors import DataError, ParamError
from sparktorch.inference import create_spark_torch_model
from sparktorch.model import SparkTorchModel

pytestmark = pytest.mark.timeout(180)

ROWS = 200


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=1))


@pytest.fixture(scope="module")
def data(spark):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    rows = [(i, Vectors.dense(x[i].tolist())) for i in range(ROWS)]
    schema = StructType([StructField("id", DoubleType()), StructField("features", VectorUDT())])
    df = spark.createDataFrame([(float(i), v) for i, v in rows], schema).repartition(2)
    return x, df


def _collect(df, col):
    return {r["id"]: r[col] for r in df.select("id", col).collect()}


def test_double_output_is_argmax_of_torch(data) -> None:
    x, df = data
    net = _mlp()
    out = create_spark_torch_model(net, inferenceBatchSize=7).transform(df)
    assert out.schema["predicted"].dataType == DoubleType()
    got = _collect(out, "predicted")
    want = net(torch.from_numpy(x)).argmax(dim=1).numpy()
    assert [got[float(i)] for i in range(ROWS)] == [float(v) for v in want]


def test_vector_output_matches_torch(data) -> None:
    x, df = data
    net = _mlp()
    model = create_spark_torch_model(net, predictionCol="out", useVectorOut=True)
    out = model.transform(df)
    assert isinstance(out.schema["out"].dataType, VectorUDT)
    got = _collect(out, "out")
    want = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.stack([got[float(i)].toArray() for i in range(ROWS)]), want, rtol=1e-5, atol=1e-6)


def test_single_output_regression_value(data) -> None:
    x, df = data
    torch.manual_seed(3)
    net = nn.Linear(4, 1)
    got = _collect(create_spark_torch_model(net).transform(df), "predicted")
    want = net(torch.from_numpy(x)).detach().numpy()[:, 0]
    np.testing.assert_allclose([got[float(i)] for i in range(ROWS)], want, rtol=1e-5, atol=1e-6)


def test_null_rows_give_null_predictions(spark) -> None:
    schema = StructType([StructField("id", DoubleType()), StructField("features", VectorUDT())])
    df = spark.createDataFrame(
        [(0.0, Vectors.dense([1.0, 2.0, 3.0, 4.0])), (1.0, None), (2.0, Vectors.sparse(4, {1: 1.0}))],
        schema,
    ).coalesce(1)
    net = _mlp()
    for vector_out in (False, True):
        got = _collect(create_spark_torch_model(net, useVectorOut=vector_out).transform(df), "predicted")
        assert got[1.0] is None
        assert got[0.0] is not None and got[2.0] is not None
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert got[2.0].toArray() == pytest.approx(net(x).detach().numpy()[0], rel=1e-5)


def test_missing_and_wrong_columns_fail_before_any_job(spark) -> None:
    df = spark.createDataFrame([("a",)], StructType([StructField("text", StringType())]))
    model = create_spark_torch_model(_mlp())
    with pytest.raises(DataError, match="'features'"):
        model.transform(df)
    with pytest.raises(DataError, match="'text'.*string"):
        model.setInputCol("text").transform(df)


def test_bad_params_and_empty_model(spark, data) -> None:
    _, df = data
    with pytest.raises(ParamError, match="inferenceBatchSize"):
        create_spark_torch_model(_mlp(), inferenceBatchSize=0).transform(df)
    with pytest.raises(ParamError, match="device"):
        create_spark_torch_model(_mlp(), device="gpu").transform(df)
    with pytest.raises(ParamError, match="modStr"):
        SparkTorchModel().transform(df)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_gpu_is_a_clear_error(data) -> None:
    _, df = data
    with pytest.raises(Exception, match="CUDA is not available"):
        create_spark_torch_model(_mlp(), device="cuda").transform(df).collect()


def test_get_pytorch_model_and_history(tmp_path) -> None:
    net = _mlp()
    hist = [
        {"worker": w, "step": s, "loss": 1.0 / (s + 1 + w), "val_loss": None if s % 2 else 0.5}
        for w in range(2)
        for s in range(5)
    ]
    model = SparkTorchModel._from_module(net, history=hist)
    x = torch.randn(3, 4)
    assert torch.equal(model.getPytorchModel()(x), net(x))
    assert model.getTrainingHistory() == hist
    assert list(model.getTrainingHistory(as_pandas=True).columns) == ["worker", "step", "loss", "val_loss"]
    png = model.plotTrainingHistory(str(tmp_path / "h.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert model.copy().getTrainingHistory() == hist
    with pytest.raises(DataError):
        SparkTorchModel().plotTrainingHistory(str(tmp_path / "none.png"))
