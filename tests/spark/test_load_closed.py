"""Issue 22, "Loading, closed for good": a load runs no import or constructor that nobody
allowed, allocates nothing the weights do not back, converts no dtype silently, opts into
pickle per call, and loads pipelines as data (sparktorch.load_pipeline)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml import PipelineModel
from pyspark.ml.feature import VectorAssembler

import sparktorch
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import ParamError, PersistenceError, UnsafeModelError
from sparktorch.inference import create_spark_torch_model
from sparktorch.model import SparkTorchModel
from nets import TwoLayer

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("spark")]

COLS = ["a", "b", "c", "d"]
LAZY = (nn.Linear, {"in_features": 4, "out_features": 3})


@pytest.fixture(scope="module")
def raw(spark):
    rng = np.random.default_rng(5)
    rows = [tuple(float(v) for v in r) for r in rng.normal(size=(24, 4))]
    return spark.createDataFrame(rows, COLS).coalesce(1)


def _preds(df, col="predicted"):
    return [r[0] for r in df.select(col).collect()]


def _rewrite_metadata(meta_dir: str, edit) -> None:
    for crc in [f for f in os.listdir(meta_dir) if f.endswith(".crc")]:
        os.unlink(os.path.join(meta_dir, crc))
    part = os.path.join(meta_dir, next(f for f in os.listdir(meta_dir) if f.startswith("part-")))
    meta = json.loads(open(part).read())
    edit(meta)
    open(part, "w").write(json.dumps(meta, separators=(",", ":")) + "\n")


def _replace_side_file(stage_dir: str, name: str, data: bytes) -> None:
    """As an attacker who can write the directory: new content, and its SHA-256 recorded."""
    with open(os.path.join(stage_dir, name), "wb") as fh:
        fh.write(data)
    _rewrite_metadata(
        os.path.join(stage_dir, "metadata"),
        lambda meta: meta["sparktorch"]["files"].__setitem__(name, hashlib.sha256(data).hexdigest()),
    )


def _saved_model(tmp_path, name: str, net: nn.Module | None = None, model_spec=LAZY) -> str:
    torch.manual_seed(2)
    net = net if net is not None else nn.Linear(4, 3)
    path = str(tmp_path / name)
    create_spark_torch_model(net, model_spec=model_spec).save(path)
    return path


def _with_spec(path: str, spec: dict) -> str:
    _replace_side_file(path, "data/model.json", json.dumps({"kind": "spec", "spec": spec}).encode())
    return path


# ------------------------------------------------------------------ in a fresh process: no import, no allocation

_FRESH = textwrap.dedent(
    """
    import json, resource, sys
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master("local[1]").appName("load-closed")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1").getOrCreate())
    from sparktorch.model import SparkTorchModel
    # a safety net for the code before the fix (it allocated the spec's 40 GB): cap this
    # process's address space now that the JVM runs
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (6 << 30), resource.RLIM_INFINITY))
    out = {}
    for case, path in json.loads(sys.argv[1]).items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            SparkTorchModel.load(path)
            result = ["loaded", ""]
        except BaseException as exc:  # noqa: BLE001 - SystemExit is what we look for
            result = [type(exc).__name__, str(exc)]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out[case] = result + [after - before, "this" in sys.modules, "unittest.__main__" in sys.modules]
    print("RESULT " + json.dumps(out))
    spark.stop()
    """
)


def test_fresh_process_imports_and_allocates_nothing_it_was_not_allowed(tmp_path) -> None:
    """`this` prints on import (a module with a top-level side effect); `unittest.__main__`
    runs test discovery and raises SystemExit; Linear(100000, 100000) is 40 GB. Each is
    refused before its import or allocation, as a PersistenceError."""
    cases = {
        "this-top": _with_spec(_saved_model(tmp_path, "this_top"), {"class": "this:Zen", "kwargs": {}}),
        "this-child": _with_spec(
            _saved_model(tmp_path, "this_child"),
            {"class": "torch.nn.modules.container:Sequential", "children": [["0", {"class": "this:Zen", "kwargs": {}}]]},
        ),
        "unittest-main": _with_spec(_saved_model(tmp_path, "main"), {"class": "unittest.__main__:Foo", "kwargs": {}}),
        "huge-linear": _with_spec(
            _saved_model(tmp_path, "huge"),
            {"class": "torch.nn.modules.linear:Linear", "kwargs": {"in_features": 100000, "out_features": 100000}},
        ),
    }
    workdir = tmp_path / "cwd"  # unittest discovery, if it ever ran, would find nothing here
    workdir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps(cases)],
        cwd=workdir, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(line[len("RESULT "):])
    assert "Beautiful is better than ugly" not in proc.stdout
    for case in ("this-top", "this-child"):
        kind, msg, _, this_imported, _ = got[case]
        assert kind == "PersistenceError", got[case]
        assert "'this:Zen'" in msg and "nothing was imported" in msg
        assert not this_imported, f"{case}: `this` was imported"
    kind, msg, _, _, main_imported = got["unittest-main"]
    assert kind == "PersistenceError", got["unittest-main"]  # not SystemExit
    assert "__main__" in msg and not main_imported
    kind, msg, grew_kib, _, _ = got["huge-linear"]
    assert kind == "PersistenceError", got["huge-linear"]
    assert "shape [3, 4]" in msg and "[100000, 100000]" in msg
    assert grew_kib < 256 * 1024, f"peak RSS grew by {grew_kib} KiB while refusing"


# ------------------------------------------------------------------ the caller's classes


def test_own_class_loads_only_when_the_call_allows_it(raw, tmp_path) -> None:
    torch.manual_seed(0)
    net = TwoLayer(n_in=4, hidden=8, n_out=3)
    path = _saved_model(tmp_path, "own", net, model_spec=(TwoLayer, {"n_in": 4, "hidden": 8, "n_out": 3}))
    assert json.load(open(os.path.join(path, "data", "model.json")))["spec"]["class"] == "nets:TwoLayer"
    with pytest.raises(PersistenceError, match=r"'nets:TwoLayer' is not allowed.*allowed_classes"):
        SparkTorchModel.load(path)
    loaded = SparkTorchModel.load(path, allowed_classes=[TwoLayer])
    x = torch.randn(5, 4)
    assert torch.equal(loaded.getPytorchModel()(x), net(x))
    with pytest.raises(ParamError, match="allowed_classes"):
        SparkTorchModel.load(path, allowed_classes=["nets:TwoLayer"])  # names are not classes


class _Exits(nn.Linear):
    def __init__(self, **kwargs) -> None:
        raise SystemExit(3)


class _Interrupts(nn.Linear):
    def __init__(self, **kwargs) -> None:
        raise KeyboardInterrupt


@pytest.mark.parametrize("cls", [_Exits, _Interrupts])
def test_an_allowed_constructor_cannot_end_the_process(tmp_path, cls) -> None:
    path = _with_spec(
        _saved_model(tmp_path, cls.__name__),
        {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": {"in_features": 4, "out_features": 3}},
    )
    with pytest.raises(PersistenceError, match=cls.__name__):
        SparkTorchModel.load(path, allowed_classes=[cls])


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype, name", [(torch.float64, "F64"), (torch.int64, "I64")])
def test_weights_of_another_dtype_are_refused(tmp_path, dtype, name) -> None:
    from safetensors.torch import save

    path = _saved_model(tmp_path, f"dtype_{name}")
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    _replace_side_file(path, "data/weights.safetensors", save({k: v.to(dtype) for k, v in lin.state_dict().items()}))
    with pytest.raises(PersistenceError, match=rf"saved as {name}, the model's is torch.float32; refusing to convert"):
        SparkTorchModel.load(path)


# ------------------------------------------------------------------ pickle: per call


def test_pickle_opt_in_is_per_call(tmp_path, monkeypatch, spark) -> None:
    monkeypatch.delenv("SPARKTORCH_ALLOW_PICKLE", raising=False)
    spark.conf.unset("spark.sparktorch.allowPickle")
    torch.manual_seed(0)
    net = TwoLayer(n_in=4, hidden=8, n_out=3)
    path = str(tmp_path / "pickled")
    create_spark_torch_model(net).save(path)  # no spec: a pickle
    assert json.load(open(os.path.join(path, "data", "model.json")))["kind"] == "pickle"
    x = torch.randn(3, 4)
    assert torch.equal(SparkTorchModel.load(path, allow_pickle=True).getPytorchModel()(x), net(x))
    with pytest.raises(UnsafeModelError, match="allow_pickle=True"):
        SparkTorchModel.load(path)  # the opt-in of the previous call does not carry over
    PipelineModel(stages=[SparkTorchModel.load(path, allow_pickle=True)]).save(str(tmp_path / "p"))
    with pytest.raises(UnsafeModelError):
        PipelineModel.load(str(tmp_path / "p"))
    with pytest.raises(UnsafeModelError):
        sparktorch.load_pipeline(str(tmp_path / "p"))
    assert isinstance(sparktorch.load_pipeline(str(tmp_path / "p"), allow_pickle=True).stages[0], SparkTorchModel)
    with pytest.raises(UnsafeModelError):
        sparktorch.load_pipeline(str(tmp_path / "p"))


def test_process_wide_switch_warns_on_every_use(tmp_path, monkeypatch, caplog) -> None:
    torch.manual_seed(0)
    path = str(tmp_path / "pickled")
    create_spark_torch_model(TwoLayer(n_in=4, hidden=8, n_out=3)).save(path)
    monkeypatch.setenv("SPARKTORCH_ALLOW_PICKLE", "1")
    with caplog.at_level(logging.WARNING, logger="sparktorch"):
        SparkTorchModel.load(path)
        SparkTorchModel.load(path)
    warned = [r for r in caplog.records if "process-wide" in r.getMessage() and "SPARKTORCH_ALLOW_PICKLE" in r.getMessage()]
    assert len(warned) == 2


# ------------------------------------------------------------------ saved params that weaken a fit


def test_weakening_params_are_named_at_load(tmp_path, caplog) -> None:
    torch_obj = serialize_torch_obj(nn.Linear(4, 3), nn.MSELoss(), torch.optim.SGD, lr=0.1)
    outside = str(tmp_path / "elsewhere")
    est = SparkTorch(torchObj=torch_obj, psEncryption="off", resumeFrom=str(tmp_path / "ck.bin"), checkpointPath=outside)
    path = str(tmp_path / "est")
    est.save(path)
    with caplog.at_level(logging.WARNING, logger="sparktorch"):
        back = SparkTorch.load(path)
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "psEncryption='off'" in msg and "resumeFrom=" in msg and f"checkpointPath={outside!r}" in msg
    assert back.getOrDefault("psEncryption") == "off"
    caplog.clear()
    inside = str(tmp_path / "est2" / "checkpoints")
    SparkTorch(torchObj=torch_obj, checkpointPath=inside).save(str(tmp_path / "est2"))
    with caplog.at_level(logging.WARNING, logger="sparktorch"):
        SparkTorch.load(str(tmp_path / "est2"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_stored_torch_obj_names_only_allowed_classes(tmp_path) -> None:
    torch_obj = "sparktorch-torchobj/1;json;" + json.dumps({
        "model": {"class": "nets:TwoLayer", "kwargs": {"n_in": 4, "hidden": 8, "n_out": 3}},
        "criterion": {"class": "torch.nn.modules.loss:MSELoss", "kwargs": {}},
        "optimizer": {"class": "torch.optim.adam:Adam", "kwargs": {}},
    })
    path = str(tmp_path / "est")
    SparkTorch(torchObj=torch_obj).save(path)
    with pytest.raises(PersistenceError, match="'nets:TwoLayer' is not allowed"):
        SparkTorch.load(path)
    assert SparkTorch.load(path, allowed_classes=[TwoLayer]).getOrDefault("torchObj") == torch_obj


# ------------------------------------------------------------------ load_pipeline


def _pipeline(tmp_path, name: str, net: nn.Module | None = None, model_spec=LAZY) -> str:
    torch.manual_seed(2)
    net = net if net is not None else nn.Linear(4, 3)
    stage = create_spark_torch_model(net, model_spec=model_spec)
    path = str(tmp_path / name)
    PipelineModel(stages=[VectorAssembler(inputCols=COLS, outputCol="features"), stage]).save(path)
    return path


def test_load_pipeline_round_trip(raw, tmp_path) -> None:
    torch.manual_seed(0)
    net = TwoLayer(n_in=4, hidden=8, n_out=3)
    path = _pipeline(tmp_path, "own", net, model_spec=(TwoLayer, {"n_in": 4, "hidden": 8, "n_out": 3}))
    with pytest.raises(PersistenceError, match="'nets:TwoLayer' is not allowed"):
        sparktorch.load_pipeline(path)
    loaded = sparktorch.load_pipeline(path, allowed_classes=[TwoLayer])
    assert isinstance(loaded, PipelineModel) and isinstance(loaded.stages[-1], SparkTorchModel)
    meta_dir = os.path.join(path, "metadata")
    saved = json.loads(open(os.path.join(meta_dir, next(f for f in os.listdir(meta_dir) if f.startswith("part-")))).read())
    assert loaded.uid == saved["uid"]
    x = torch.tensor(raw.toPandas()[COLS].to_numpy(), dtype=torch.float32)
    assert _preds(loaded.transform(raw)) == [float(v) for v in net(x).argmax(1)]
    nested = str(tmp_path / "nested")
    PipelineModel(stages=[loaded]).save(nested)  # a pipeline inside a pipeline
    again = sparktorch.load_pipeline(nested, allowed_classes=[TwoLayer])
    assert _preds(again.transform(raw)) == _preds(loaded.transform(raw))


def _fresh(code: str, cwd) -> dict:
    script = textwrap.dedent(
        """
        import json, sys
        from pyspark.sql import SparkSession
        spark = (SparkSession.builder.master("local[1]").appName("load-pipeline")
                 .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1").getOrCreate())
        import sparktorch
        out = {}
        for case, path in json.loads(sys.argv[1]).items():
            try:
                sparktorch.load_pipeline(path)
                out[case] = ["loaded", "", "this" in sys.modules]
            except BaseException as exc:  # noqa: BLE001
                out[case] = [type(exc).__name__, str(exc), "this" in sys.modules]
        print("RESULT " + json.dumps(out))
        spark.stop()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, code], cwd=cwd, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Beautiful is better than ugly" not in proc.stdout
    return json.loads(line[len("RESULT "):])


def test_load_pipeline_refuses_classes_and_uids_before_any_import(tmp_path) -> None:
    cases: dict[str, str] = {}
    # a stage whose class is not allowed (a module with a top-level side effect)
    path = _pipeline(tmp_path, "bad_class")
    stage = os.path.join(path, "stages", sorted(os.listdir(os.path.join(path, "stages")))[0])
    _rewrite_metadata(os.path.join(stage, "metadata"), lambda m: m.__setitem__("class", "this.Zen"))
    cases["class"] = path
    # the second stage's class refused: the first is not loaded either (checked before loading)
    path = _pipeline(tmp_path, "bad_second")
    stage = os.path.join(path, "stages", sorted(os.listdir(os.path.join(path, "stages")))[1])
    _rewrite_metadata(os.path.join(stage, "metadata"), lambda m: m.__setitem__("class", "this.Zen"))
    cases["second"] = path
    # UIDs that are not plain names
    for case, uid in {"star": "*", "slash": "../../x/SparkTorchModel_1", "dots": "..", "glob": "Vector*"}.items():
        path = _pipeline(tmp_path, f"uid_{case}")
        _rewrite_metadata(
            os.path.join(path, "metadata"),
            lambda m, uid=uid: m["paramMap"].__setitem__("stageUids", [uid, m["paramMap"]["stageUids"][1]]),
        )
        cases[case] = path
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    got = _fresh(json.dumps(cases), workdir)
    for case in ("class", "second"):
        kind, msg, this_imported = got[case]
        assert kind == "PersistenceError", got[case]
        assert "'this.Zen' is not allowed" in msg and "nothing was imported" in msg
        assert not this_imported
    for case in ("star", "slash", "dots", "glob"):
        kind, msg, _ = got[case]
        assert kind == "PersistenceError", got[case]
        assert "stage UID" in msg and "is not allowed" in msg, msg


def test_load_pipeline_refuses_a_stage_it_did_not_check(tmp_path) -> None:
    """A non-pipeline class at the top, and a caller class (allowed) is taken from the caller."""
    path = _saved_model(tmp_path, "single")
    with pytest.raises(PersistenceError, match="not a Pipeline or PipelineModel"):
        sparktorch.load_pipeline(path)


def test_load_pipeline_refuses_spark_connect_ml_and_other_pyspark_ml_modules(tmp_path) -> None:
    """pyspark.ml.connect's readers import and call every class their own metadata.json names:
    a stage naming one is refused before anything is imported (so is any pyspark.ml module
    outside Spark ML's stage modules)."""
    cases: dict[str, str] = {}
    for case, name in {
        "connect": "pyspark.ml.connect.pipeline.PipelineModel",
        "connect-jvm": "org.apache.spark.ml.connect.pipeline.PipelineModel",
        "torch": "pyspark.ml.torch.distributor.TorchDistributor",
        "util": "pyspark.ml.util.DefaultParamsReadable",
    }.items():
        path = _pipeline(tmp_path, f"ml_{case}")
        stage = os.path.join(path, "stages", sorted(os.listdir(os.path.join(path, "stages")))[0])
        _rewrite_metadata(os.path.join(stage, "metadata"), lambda m, name=name: m.__setitem__("class", name))
        with open(os.path.join(stage, "metadata.json"), "w") as fh:  # what the Connect-ML reader reads
            json.dump({"type": "spark_connect", "class": name, "uid": "p1", "paramMap": {}, "defaultParamMap": {},
                       "stages": [{"type": "spark_connect", "class": "this.Zen", "uid": "s", "paramMap": {},
                                   "defaultParamMap": {}}]}, fh)
        cases[case] = path
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    got = _fresh(json.dumps(cases), workdir)
    for case in cases:
        kind, msg, this_imported = got[case]
        assert kind == "PersistenceError", got[case]
        assert "is not allowed" in msg and "nothing was imported" in msg, msg
        assert not this_imported, f"{case}: `this` was imported"


# ------------------------------------------------------------------ a stored torchObj's size without weights, its criterion

_HUGE = {"class": "torch.nn.modules.linear:Linear", "kwargs": {"in_features": 100000, "out_features": 100000}}
_SGD = {"class": "torch.optim.sgd:SGD", "kwargs": {"lr": 0.1}}
_MSE = {"class": "torch.nn.modules.loss:MSELoss", "kwargs": {}}


def _torch_obj(model: dict, criterion: dict) -> str:
    return "sparktorch-torchobj/1;json;" + json.dumps({"model": model, "criterion": criterion, "optimizer": _SGD})


_FRESH_TORCHOBJ = textwrap.dedent(
    """
    import json, resource, sys
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master("local[1]").appName("load-closed-torchobj")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1").getOrCreate())
    from sparktorch import SparkTorch, load_torch_obj
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (6 << 30), resource.RLIM_INFINITY))
    out = {}
    cases = json.loads(sys.argv[1])
    for case, (path, torch_obj) in cases.items():
        for how in ("SparkTorch.load", "load_torch_obj"):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                if how == "SparkTorch.load":
                    SparkTorch.load(path)
                else:
                    load_torch_obj(torch_obj, allowed_classes=[])
                result = ["loaded", ""]
            except BaseException as exc:  # noqa: BLE001
                result = [type(exc).__name__, str(exc)]
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out[case + " " + how] = result + [after - before]
    print("RESULT " + json.dumps(out))
    spark.stop()
    """
)


def test_stored_torch_obj_without_weights_or_with_a_parameterised_criterion_allocates_nothing(tmp_path) -> None:
    """A lazy torchObj (no weights) describing Linear(100000, 100000) (40 GB), and a criterion
    naming that Linear, are refused at load (SparkTorch.load) and by load_torch_obj under a
    storage policy, before anything is built."""
    cases = {}
    for case, obj in {
        "lazy-huge-model": _torch_obj(_HUGE, _MSE),
        "huge-criterion": _torch_obj({"class": "torch.nn.modules.linear:Linear", "kwargs": {"in_features": 4, "out_features": 3}}, _HUGE),
    }.items():
        path = str(tmp_path / case)
        SparkTorch(torchObj=obj).save(path)
        cases[case] = [path, obj]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_TORCHOBJ, json.dumps(cases)],
        cwd=workdir, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(line[len("RESULT "):])
    for key, (kind, msg, grew_kib) in got.items():
        assert kind in ("PersistenceError", "SerializationError"), (key, got[key])
        if key.startswith("lazy"):
            assert "10,000,100,000 parameter values" in msg and "max_params" in msg, msg
        else:
            assert "'torch.nn.modules.linear:Linear' is not a loss class" in msg, msg
        assert grew_kib < 256 * 1024, f"{key}: peak RSS grew by {grew_kib} KiB while refusing"


def test_max_params_is_per_load(tmp_path) -> None:
    path = str(tmp_path / "lazy")
    SparkTorch(torchObj=_torch_obj(_HUGE, _MSE)).save(path)
    with pytest.raises(PersistenceError, match="max_params"):
        SparkTorch.load(path)
    assert SparkTorch.load(path, max_params=10**11).getOrDefault("torchObj")  # checked on meta: nothing built
    small = str(tmp_path / "small")
    SparkTorch(torchObj=_torch_obj({"class": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 3}}, _MSE)).save(small)
    SparkTorch.load(small)
    with pytest.raises(PersistenceError, match="15 parameter values, more than the 10"):
        SparkTorch.load(small, max_params=10)
    with pytest.raises(ParamError, match="max_params"):
        SparkTorch.load(small, max_params=0)


def test_load_pipeline_checks_the_stages_that_tuning_loads_itself(tmp_path) -> None:
    """A CrossValidatorModel's reader loads its evaluator, estimator and bestModel by the class
    names in their own metadata (DefaultParamsReader.loadParamsInstance): during load_pipeline
    each is checked like a pipeline stage, before pyspark imports it."""
    from pyspark.ml import Pipeline
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.tuning import CrossValidatorModel

    def saved(name: str) -> tuple[str, str]:
        assembler = VectorAssembler(inputCols=COLS, outputCol="features")
        cvm = CrossValidatorModel(PipelineModel(stages=[assembler]), avgMetrics=[0.0])
        cvm.set(cvm.estimator, Pipeline(stages=[assembler]))
        cvm.set(cvm.estimatorParamMaps, [{}])
        cvm.set(cvm.evaluator, RegressionEvaluator())
        path = str(tmp_path / name)
        PipelineModel(stages=[cvm]).save(path)
        stages = os.path.join(path, "stages")
        return path, os.path.join(stages, os.listdir(stages)[0])

    cases = {}
    path, _ = saved("cv_ok")
    cases["ok"] = path
    path, cv = saved("cv_evaluator")
    _rewrite_metadata(os.path.join(cv, "evaluator", "metadata"), lambda m: m.__setitem__("class", "this.Zen"))
    cases["evaluator"] = path
    path, cv = saved("cv_best")
    inner = os.path.join(cv, "bestModel", "stages")
    _rewrite_metadata(os.path.join(inner, os.listdir(inner)[0], "metadata"), lambda m: m.__setitem__("class", "this.Zen"))
    cases["bestModel-stage"] = path
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    got = _fresh(json.dumps(cases), workdir)
    assert got["ok"][0] == "loaded", got["ok"]
    for case in ("evaluator", "bestModel-stage"):
        kind, msg, this_imported = got[case]
        assert kind == "PersistenceError", got[case]
        assert "'this.Zen' is not allowed" in msg and "nothing was imported" in msg, msg
        assert not this_imported, f"{case}: `this` was imported"


def test_checkpoint_path_with_a_scheme_is_compared_normalised() -> None:
    from sparktorch._persist import _inside_dir

    root = "hdfs://nn:8020/models/est"
    assert _inside_dir(None, "hdfs://nn:8020/models/est/checkpoints", root)
    assert _inside_dir(None, "hdfs://nn:8020/models/est", root)
    assert not _inside_dir(None, "hdfs://nn:8020/models/est/../elsewhere", root)
    assert not _inside_dir(None, "hdfs://nn:8020/models/estimator2", root)
    assert not _inside_dir(None, "hdfs://other:8020/models/est/checkpoints", root)
    assert not _inside_dir(None, "s3a://nn:8020/models/est/checkpoints", root)
