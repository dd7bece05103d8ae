"""Loading never runs code that nobody opted into (as an attacker who can write a saved
directory would have it), and side files land where Spark puts the metadata."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler

from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import PersistenceError, UnsafeModelError
from sparktorch.inference import create_spark_torch_model
from sparktorch.model import SparkTorchModel
from nets import TwoLayer, seed_mlp

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("spark")]

COLS = ["a", "b", "c", "d"]
OPT_IN = ("spark.sparktorch.allowPickle", "SPARKTORCH_ALLOW_PICKLE")


@pytest.fixture(scope="module")
def raw(spark):
    rng = np.random.default_rng(3)
    rows = [tuple(float(v) for v in r) for r in rng.normal(size=(40, 4))]
    return spark.createDataFrame(rows, COLS).coalesce(2)


def _preds(df, col="predicted"):
    return [r[0] for r in df.select(col).collect()]


def _stage_dir(pipeline_dir: str) -> str:
    stages = os.path.join(pipeline_dir, "stages")
    return os.path.join(stages, next(d for d in sorted(os.listdir(stages)) if "SparkTorchModel" in d))


def _replace_side_file(stage_dir: str, name: str, data: bytes) -> None:
    """Write ``data`` as ``stage_dir/name`` and record its SHA-256 in the metadata, as an
    attacker who can write the directory would (the hashes catch accidents, not attackers)."""
    with open(os.path.join(stage_dir, name), "wb") as fh:
        fh.write(data)
    meta_dir = os.path.join(stage_dir, "metadata")
    for crc in [f for f in os.listdir(meta_dir) if f.endswith(".crc")]:
        os.unlink(os.path.join(meta_dir, crc))
    part = os.path.join(meta_dir, next(f for f in os.listdir(meta_dir) if f.startswith("part-")))
    meta = json.loads(open(part).read())
    meta["sparktorch"]["files"][name] = hashlib.sha256(data).hexdigest()
    open(part, "w").write(json.dumps(meta, separators=(",", ":")) + "\n")


def _saved_pipeline(tmp_path, net: nn.Module, name: str, model_spec=None) -> str:
    stage = create_spark_torch_model(net, model_spec=model_spec)
    pm = PipelineModel(stages=[VectorAssembler(inputCols=COLS, outputCol="features"), stage])
    path = str(tmp_path / name)
    pm.save(path)
    return path


def _custom() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayer(n_in=4, hidden=8, n_out=3)


# ------------------------------------------------------------------ an edited spec


@pytest.mark.parametrize(
    "spec",
    [
        lambda marker: {"class": "subprocess:Popen", "kwargs": {"args": ["touch", marker]}},
        lambda marker: {
            "class": "torch.nn.modules.container:Sequential",
            "children": [["0", {"class": "subprocess:Popen", "kwargs": {"args": ["touch", marker]}}]],
        },
        lambda marker: {"class": "os:system", "kwargs": {"command": f"touch {marker}"}},
    ],
    ids=["Popen", "Popen-in-Sequential", "os.system"],
)
def test_edited_spec_runs_nothing(tmp_path, spec) -> None:
    torch.manual_seed(2)
    lazy = (nn.Linear, {"in_features": 4, "out_features": 3})  # a lazy (spec) model
    path = _saved_pipeline(tmp_path, nn.Linear(4, 3), "edited", model_spec=lazy)
    stage = _stage_dir(path)
    marker = str(tmp_path / "pwned")
    doc = {"kind": "spec", "spec": spec(marker)}
    _replace_side_file(stage, "data/model.json", json.dumps(doc).encode())
    with pytest.raises(PersistenceError, match=r"data/model\.json.*(is not allowed|not a torch\.nn layer).*nothing was imported"):
        PipelineModel.load(path)
    assert not os.path.exists(marker)


def test_spec_child_must_be_a_torch_nn_layer(tmp_path) -> None:
    path = _saved_pipeline(tmp_path, nn.Sequential(nn.Linear(4, 3)), "child")
    stage = _stage_dir(path)
    doc = json.loads(open(os.path.join(stage, "data", "model.json")).read())
    doc["spec"]["children"][0][1] = {"class": "nets:TwoLayer", "kwargs": {"n_in": 4}}
    _replace_side_file(stage, "data/model.json", json.dumps(doc).encode())
    with pytest.raises(PersistenceError, match=r"model\.json.*'nets:TwoLayer' is not a torch\.nn layer"):
        PipelineModel.load(path)


# ------------------------------------------------------------------ a replaced pickle


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


def test_replaced_pickle_runs_nothing_without_opt_in(spark, raw, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SPARKTORCH_ALLOW_PICKLE", raising=False)
    net = _custom()
    path = _saved_pipeline(tmp_path, net, "pickled")
    stage = _stage_dir(path)
    assert json.load(open(os.path.join(stage, "data", "model.json")))["kind"] == "pickle"
    tampered = str(tmp_path / "tampered")
    import shutil

    shutil.copytree(path, tampered)
    marker = str(tmp_path / "pwned")
    _replace_side_file(_stage_dir(tampered), "data/model.pkl", pickle.dumps(_Payload(marker)))

    for directory in (tampered, path):
        with pytest.raises(UnsafeModelError) as info:
            PipelineModel.load(directory)
        msg = str(info.value)
        assert os.path.join(_stage_dir(directory), "data", "model.pkl") in msg
        assert "arbitrary code" in msg and all(o in msg for o in OPT_IN)
    assert not os.path.exists(marker)

    # the opt-in loads the genuine directory (and is what stands between a payload and a run)
    spark.conf.set("spark.sparktorch.allowPickle", "true")
    try:
        loaded = PipelineModel.load(path)
    finally:
        spark.conf.unset("spark.sparktorch.allowPickle")
    x = torch.tensor(raw.toPandas()[COLS].to_numpy(), dtype=torch.float32)
    assert _preds(loaded.transform(raw)) == [float(v) for v in net(x).argmax(1)]
    monkeypatch.setenv("SPARKTORCH_ALLOW_PICKLE", "1")
    assert isinstance(SparkTorchModel.load(stage).getPytorchModel(), TwoLayer)


def test_model_string_in_metadata_is_refused(tmp_path) -> None:
    path = str(tmp_path / "m")
    torch.manual_seed(2)
    model = create_spark_torch_model(nn.Linear(4, 3))
    model.save(path)
    meta_dir = os.path.join(path, "metadata")
    for crc in [f for f in os.listdir(meta_dir) if f.endswith(".crc")]:
        os.unlink(os.path.join(meta_dir, crc))
    part = os.path.join(meta_dir, next(f for f in os.listdir(meta_dir) if f.startswith("part-")))
    meta = json.loads(open(part).read())
    meta["sparktorch"]["modelKind"] = "none"  # a pickle modStr would then ride in the params
    meta["paramMap"]["modStr"] = create_spark_torch_model(_custom()).getModStr()
    open(part, "w").write(json.dumps(meta) + "\n")
    with pytest.raises(PersistenceError, match="metadata.*modStr"):
        SparkTorchModel.load(path)


# ------------------------------------------------------------------ the unfitted estimator


def test_stored_pickle_torch_obj_needs_opt_in(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SPARKTORCH_ALLOW_PICKLE", raising=False)
    pickled = serialize_torch_obj(_custom(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    assert ";pickle;" in pickled
    est = SparkTorch(inputCol="features", labelCol="a", torchObj=pickled, iters=3)
    path = str(tmp_path / "unfitted")
    Pipeline(stages=[est]).save(path)
    with pytest.raises(UnsafeModelError) as info:
        Pipeline.load(path)
    msg = str(info.value)
    assert "metadata" in msg and "torchObj" in msg and all(o in msg for o in OPT_IN)
    monkeypatch.setenv("SPARKTORCH_ALLOW_PICKLE", "1")
    assert Pipeline.load(path).getStages()[0].getOrDefault("torchObj") == pickled


def test_seed_torch_obj_is_json_and_loads_without_opt_in(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SPARKTORCH_ALLOW_PICKLE", raising=False)
    network = seed_mlp()
    torch_obj = serialize_torch_obj(model=network, criterion=nn.CrossEntropyLoss(),
                                    optimizer=torch.optim.Adam, lr=0.0001)
    assert torch_obj.startswith("sparktorch-torchobj/2;json;")
    path = str(tmp_path / "seed_unfitted")
    Pipeline(stages=[SparkTorch(inputCol="features", labelCol="_c0", torchObj=torch_obj)]).save(path)
    assert Pipeline.load(path).getStages()[0].getOrDefault("torchObj") == torch_obj


# ------------------------------------------------------------------ the seed program, end to end

_FRESH = textwrap.dedent(
    """
    import json, pickle, sys
    import cloudpickle, torch
    from pyspark.ml import PipelineModel
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    saved = {}
    def boom(*_a, **_k):
        raise AssertionError("unpickling while loading the seed pipeline")
    for mod, name in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (torch, "load")]:
        saved[(mod, name)] = getattr(mod, name)
        setattr(mod, name, boom)
    model = PipelineModel.load(sys.argv[1])
    for (mod, name), fn in saved.items():
        setattr(mod, name, fn)  # Spark itself pickles the UDF for its workers
    model.stages[-1].setUseVectorOut(True)
    df = spark.read.parquet(sys.argv[2])
    rows = model.transform(df).select("predictions").collect()
    json.dump([r[0].toArray().tolist() for r in rows], open(sys.argv[3], "w"))
    spark.stop()
    """
)


@pytest.mark.timeout(600)
def test_seed_pipeline_holds_no_pickle_and_loads_in_a_fresh_process(spark, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SPARKTORCH_ALLOW_PICKLE", raising=False)
    rng = np.random.default_rng(0)
    rows = [(int(i % 10), *[float(v) for v in r]) for i, r in enumerate(rng.random(size=(48, 784)))]
    df = spark.createDataFrame(rows, ["_c0"] + [f"_c{i}" for i in range(1, 785)]).coalesce(2)
    torch.manual_seed(0)
    network = seed_mlp()
    torch_obj = serialize_torch_obj(model=network, criterion=nn.CrossEntropyLoss(),
                                    optimizer=torch.optim.Adam, lr=0.0001)
    vector_assembler = VectorAssembler(inputCols=df.columns[1:785], outputCol="features")
    spark_model = SparkTorch(inputCol="features", labelCol="_c0", predictionCol="predictions",
                             torchObj=torch_obj, iters=5, partitions=2, useBarrier=True)
    p = Pipeline(stages=[vector_assembler, spark_model]).fit(df)
    path = str(tmp_path / "simple_dnn")
    p.save(path)

    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    assert not [f for f in files if f.endswith(".pkl")]
    spec = json.load(open(os.path.join(_stage_dir(path), "data", "model.json")))
    assert spec["kind"] == "spec"
    assert spec["spec"]["class"] == "torch.nn.modules.container:Sequential"

    data = str(tmp_path / "data.parquet")
    df.write.parquet(data)
    p.stages[-1].setUseVectorOut(True)
    before = [v.toArray().tolist() for v in _preds(p.transform(spark.read.parquet(data)), "predictions")]
    out = str(tmp_path / "preds.json")
    env = dict(os.environ)
    env.pop("SPARKTORCH_ALLOW_PICKLE", None)
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, path, data, out],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out)) == before  # the whole softmax output, bit for bit


# ------------------------------------------------------------------ Hadoop's default filesystem


def test_scheme_less_path_goes_to_the_default_filesystem(spark, raw, tmp_path) -> None:
    """With ``fs.defaultFS`` a viewfs mount table whose ``/models`` is a temp directory, a
    scheme-less ``/models/...`` path is where Spark puts ``metadata/``: every side file must
    land there too (read and written through Hadoop), none on the driver's local ``/models``."""
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    old = conf.get("fs.defaultFS")
    cluster = f"st{uuid.uuid4().hex[:12]}"  # fresh authority: Hadoop caches filesystems by it
    root = tmp_path / "mounted"
    root.mkdir()
    mount = f"/sparktorch-test-{cluster}"
    conf.set(f"fs.viewfs.mounttable.{cluster}.link.{mount}", "file://" + str(root))
    conf.set("fs.defaultFS", f"viewfs://{cluster}/")
    try:
        torch.manual_seed(0)
        pm = PipelineModel(
            stages=[
                VectorAssembler(inputCols=COLS, outputCol="features"),
                create_spark_torch_model(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))),
            ]
        )
        before = _preds(pm.transform(raw))
        pm.save(f"{mount}/pipe")
        stage = _stage_dir(str(root / "pipe"))
        for name in ("metadata", "data/model.json", "data/weights.safetensors", "data/history.json"):
            assert os.path.exists(os.path.join(stage, name)), name
        assert not os.path.exists(mount)
        loaded = PipelineModel.load(f"{mount}/pipe")
        assert _preds(loaded.transform(raw)) == before
    finally:
        conf.set("fs.defaultFS", old)
        conf.unset(f"fs.viewfs.mounttable.{cluster}.link.{mount}")
        if os.path.isdir(mount):  # the old behaviour: side files on the local disk
            import shutil

            shutil.rmtree(mount)


# ------------------------------------------------------------------ code shipped inside the directory


@pytest.mark.parametrize("where", ["__init__.py", "evil.py"])
def test_spec_cannot_import_code_from_the_saved_directory(tmp_path, monkeypatch, where) -> None:
    """A saved directory inside a directory on sys.path (the script's, the working directory)
    is an importable package: a spec naming a module in it must not import it."""
    lazy = (nn.Linear, {"in_features": 4, "out_features": 3})
    path = _saved_pipeline(tmp_path, nn.Linear(4, 3), "simple_dnn", model_spec=lazy)
    marker = str(tmp_path / "pwned")
    with open(os.path.join(path, where), "w") as fh:
        fh.write(f"import torch.nn\nopen({marker!r}, 'w').close()\nclass Net(torch.nn.Linear):\n    pass\n")
    module = "simple_dnn" if where == "__init__.py" else "simple_dnn.evil"
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = _stage_dir(path)
    doc = {"kind": "spec", "spec": {"class": f"{module}:Net", "kwargs": {"in_features": 4, "out_features": 3}}}
    _replace_side_file(stage, "data/model.json", json.dumps(doc).encode())
    # refused on its name (not torch.nn, not allowed by the call) before any import
    with pytest.raises(PersistenceError, match="is not allowed.*nothing was imported"):
        PipelineModel.load(path)
    with pytest.raises(PersistenceError, match="is not allowed.*nothing was imported"):
        SparkTorchModel.load(stage)
    assert not os.path.exists(marker)
    # the same for a stored torchObj naming code planted in its own directory
    est_path = str(tmp_path / "est_dnn")
    est_module = module.replace("simple_dnn", "est_dnn")
    torch_obj = "sparktorch-torchobj/1;json;" + json.dumps({
        "model": {"class": f"{est_module}:Net", "kwargs": {"in_features": 4, "out_features": 3}},
        "criterion": {"class": "torch.nn.modules.loss:MSELoss", "kwargs": {}},
        "optimizer": {"class": "torch.optim.adam:Adam", "kwargs": {}},
    })
    Pipeline(stages=[SparkTorch(torchObj=torch_obj)]).save(est_path)
    with open(os.path.join(est_path, where), "w") as fh:
        fh.write(f"open({marker!r}, 'w').close()\n")
    with pytest.raises(PersistenceError, match="is not allowed.*nothing was imported"):
        Pipeline.load(est_path)
    assert not os.path.exists(marker)
