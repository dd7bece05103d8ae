"""Saving and loading with plain save / load: round trips, no pickle for lazy and torch.nn
models, and PersistenceError naming the file for broken directories."""

from __future__ import annotations

import json
import os
import pickle

import cloudpickle
import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.pipeline import Estimator

from sparktorch._persist import SparkTorchParamsReadable, SparkTorchParamsWritable
from sparktorch.errors import PersistenceError
from sparktorch.inference import attach_pytorch_model_to_pipeline, create_spark_torch_model
from sparktorch.model import SparkTorchModel
from sparktorch.pipeline_util import PysparkPipelineWrapper
from nets import TwoLayer

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("spark")]

COLS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def raw(spark):
    rng = np.random.default_rng(1)
    rows = [tuple(float(v) for v in r) for r in rng.normal(size=(120, 4))]
    return spark.createDataFrame(rows, COLS).coalesce(2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=1))


def _custom() -> nn.Module:
    """A model of a user class without a spec: stored as a pickle."""
    torch.manual_seed(0)
    return TwoLayer(n_in=4, hidden=8, n_out=3)


@pytest.fixture
def allow_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKTORCH_ALLOW_PICKLE", "1")


def _lazy_model(**kw) -> SparkTorchModel:
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    return create_spark_torch_model(lin, model_spec=(nn.Linear, {"in_features": 4, "out_features": 3}), **kw)


def _preds(df, col="predicted"):
    out = df.select(col).collect()
    return [r[0].toArray().tolist() if hasattr(r[0], "toArray") else r[0] for r in out]


def _no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise AssertionError("unpickling while loading a lazy model")

    for mod, name in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("how", ["pickle", "structure", "lazy"])
@pytest.mark.parametrize("vector_out", [False, True], ids=["double", "vector"])
def test_pipeline_round_trip(raw, tmp_path, monkeypatch, how: str, vector_out: bool) -> None:
    assembler = VectorAssembler(inputCols=COLS, outputCol="features")
    if how == "lazy":
        stage = _lazy_model(useVectorOut=vector_out)
    else:
        net = _custom() if how == "pickle" else _mlp()
        stage = create_spark_torch_model(net, useVectorOut=vector_out)
    if how == "pickle":
        monkeypatch.setenv("SPARKTORCH_ALLOW_PICKLE", "1")
    fitted = Pipeline(stages=[assembler, stage]).fit(raw)  # Model stages pass through fit
    before = _preds(fitted.transform(raw))
    path = str(tmp_path / "pipe")
    fitted.write().overwrite().save(path)
    loaded = PipelineModel.load(path)
    assert isinstance(loaded.stages[-1], SparkTorchModel)
    assert loaded.stages[-1].getUseVectorOut() is vector_out
    assert PysparkPipelineWrapper.unwrap(loaded) is loaded
    assert _preds(loaded.transform(raw)) == before
    kind = json.load(open(os.path.join(path, "stages", sorted(os.listdir(os.path.join(path, "stages")))[1], "data", "model.json")))["kind"]
    assert kind == ("pickle" if how == "pickle" else "spec")


def test_lazy_pipeline_loads_without_unpickling(raw, tmp_path, monkeypatch) -> None:
    assembler = VectorAssembler(inputCols=COLS, outputCol="features")
    pm = PipelineModel(stages=[assembler, _lazy_model()])
    before = _preds(pm.transform(raw))
    path = str(tmp_path / "lazy")
    pm.save(path)
    _no_pickle(monkeypatch)
    loaded = PipelineModel.load(path)
    model = loaded.stages[-1]
    assert isinstance(model.getPytorchModel(), nn.Linear)
    monkeypatch.undo()  # Spark itself pickles the UDF for the executors
    assert _preds(loaded.transform(raw)) == before


def test_model_save_load_keeps_params_and_history(tmp_path) -> None:
    hist = [{"worker": 0, "step": 1, "loss": 0.5, "val_loss": None}]
    model = SparkTorchModel._from_module(_lazy_model().getPytorchModel(), inputCol="x", predictionCol="y", useVectorOut=True, history=hist)
    model.setInferenceBatchSize(17)
    path = str(tmp_path / "m")
    model.save(path)
    back = SparkTorchModel.load(path)
    assert back.uid == model.uid
    assert (back.getInputCol(), back.getPredictionCol(), back.getUseVectorOut(), back.getInferenceBatchSize()) == ("x", "y", True, 17)
    assert back.getTrainingHistory() == hist
    x = torch.randn(4, 4)
    assert torch.equal(back.getPytorchModel()(x), _lazy_model().getPytorchModel()(x))
    meta_dir = os.path.join(path, "metadata")
    meta = open(os.path.join(meta_dir, next(f for f in os.listdir(meta_dir) if f.startswith("part-")))).read()
    assert "modStr" not in json.loads(meta)["paramMap"]  # the model lives in data/, not in JSON
    assert json.loads(meta)["sparktorch"]["formatVersion"] == 1


def test_attach_to_pipeline_and_unwrap_passthrough(raw, tmp_path) -> None:
    base = Pipeline(stages=[VectorAssembler(inputCols=COLS, outputCol="features")]).fit(raw)
    net = _mlp()
    pm = attach_pytorch_model_to_pipeline(net, base, predictionCol="p")
    assert isinstance(pm, PipelineModel) and len(pm.stages) == 2
    got = _preds(pm.transform(raw), "p")
    x = torch.tensor(raw.toPandas()[COLS].to_numpy(), dtype=torch.float32)
    assert got == [float(v) for v in net(x).argmax(1)]
    pipeline = Pipeline(stages=[])
    assert PysparkPipelineWrapper.unwrap(pipeline) is pipeline


class _StandIn(Estimator, SparkTorchParamsReadable, SparkTorchParamsWritable):
    """A params-only estimator like the unfitted SparkTorch."""

    torchObj = Param(Params._dummy(), "torchObj", "", typeConverter=TypeConverters.toString)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(torchObj="")

    def _fit(self, dataset):  # pragma: no cover - never fitted here
        raise NotImplementedError


def test_unfitted_estimators_in_pipeline_save_and_load(tmp_path) -> None:
    from sparktorch import SparkTorch, serialize_torch_obj

    torch_obj = serialize_torch_obj(_mlp(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    standin = _StandIn()
    standin._set(torchObj=torch_obj)
    est = SparkTorch(inputCol="features", labelCol="a", torchObj=torch_obj, iters=3)
    path = str(tmp_path / "unfitted")
    Pipeline(stages=[VectorAssembler(inputCols=COLS, outputCol="features"), standin, est]).save(path)
    loaded = Pipeline.load(path).getStages()
    assert isinstance(loaded[1], _StandIn) and loaded[1].getOrDefault("torchObj") == torch_obj
    assert isinstance(loaded[2], SparkTorch)
    assert loaded[2].getOrDefault("torchObj") == torch_obj and loaded[2].getOrDefault("iters") == 3


# ------------------------------------------------------------------ broken directories


@pytest.fixture(scope="module")
def saved_dirs(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    lazy, eager = str(root / "lazy"), str(root / "eager")
    _lazy_model().save(lazy)
    create_spark_torch_model(_custom()).save(eager)
    return lazy, eager


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, str(dst))
    return str(dst)


def _rewrite_meta(path: str, change) -> None:
    meta_dir = os.path.join(path, "metadata")
    name = next(f for f in os.listdir(meta_dir) if f.startswith("part-"))
    for crc in [f for f in os.listdir(meta_dir) if f.endswith(".crc")]:
        os.unlink(os.path.join(meta_dir, crc))
    full = os.path.join(meta_dir, name)
    text = open(full).read()
    open(full, "w").write(change(text))


def test_truncated_weights(saved_dirs, tmp_path) -> None:
    path = _copy(saved_dirs[0], tmp_path / "t")
    w = os.path.join(path, "data", "weights.safetensors")
    data = open(w, "rb").read()
    open(w, "wb").write(data[: len(data) // 2])
    with pytest.raises(PersistenceError, match="weights.safetensors.*(corrupt|truncated)"):
        SparkTorchModel.load(path)


def test_missing_definition(saved_dirs, tmp_path, allow_pickle) -> None:
    path = _copy(saved_dirs[1], tmp_path / "m")
    os.unlink(os.path.join(path, "data", "model.pkl"))
    with pytest.raises(PersistenceError, match="model.pkl"):
        SparkTorchModel.load(path)


def test_corrupt_metadata(saved_dirs, tmp_path) -> None:
    path = _copy(saved_dirs[0], tmp_path / "c")
    _rewrite_meta(path, lambda t: t[: len(t) // 2])
    with pytest.raises(PersistenceError, match="metadata"):
        SparkTorchModel.load(path)


def test_newer_format_version(saved_dirs, tmp_path) -> None:
    path = _copy(saved_dirs[0], tmp_path / "n")
    _rewrite_meta(path, lambda t: t.replace('"formatVersion":1', '"formatVersion":99'))
    with pytest.raises(PersistenceError, match="metadata.*newer"):
        SparkTorchModel.load(path)


def test_unimportable_model_class(saved_dirs, tmp_path) -> None:
    path = _copy(saved_dirs[0], tmp_path / "u")
    mj = os.path.join(path, "data", "model.json")
    doc = json.load(open(mj))
    doc["spec"]["class"] = "no_such_package.models:Net"
    data = json.dumps(doc).encode()
    open(mj, "wb").write(data)
    # keep the checksum consistent so the import failure is what is reported
    import hashlib

    _rewrite_meta(path, lambda t: t.replace(json.loads(t)["sparktorch"]["files"]["data/model.json"], hashlib.sha256(data).hexdigest()))
    with pytest.raises(PersistenceError, match="model.json.*no_such_package"):
        SparkTorchModel.load(path)


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(PersistenceError, match="nowhere"):
        SparkTorchModel.load(str(tmp_path / "nowhere"))
