"""sparktorch on a Spark Connect session: every public entry point, against a local Connect
server (``conftest.py``), with nothing that needs the client to be reachable from executors
(the parameter servers run inside the training stage: ``sparktorch._colocated``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import cases
from nets import BNConvNet, FrozenEmbeddingLSTM, NoisyInTraining, TwoLayer
from toy_data import blobs
from sparktorch import SparkTorch, SparkTorchModel, create_spark_torch_model, serialize_torch_obj
from sparktorch.errors import ClusterError, ParamError

pytestmark = pytest.mark.timeout(300)

HERE = os.path.dirname(os.path.abspath(__file__))


def _frame(spark, n=96, classes=3, dim=5, seed=0):
    from pyspark.ml.linalg import Vectors

    x, y = blobs(n=n, seed=seed, classes=classes, dim=dim)
    return spark.createDataFrame([(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)], ["features", "label"]), x, y


def _accuracy(model, x, y) -> float:
    net = model.getPytorchModel().eval()
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_the_session_is_connect(connect):
    from sparktorch._session import ConnectSession, session_of

    assert isinstance(session_of(connect), ConnectSession)
    with pytest.raises(Exception, match="JVM_ATTRIBUTE_NOT_SUPPORTED"):
        connect.sparkContext  # noqa: B018 - what the old fit tripped over


@pytest.mark.parametrize("mode,lock", [("hogwild", False), ("hogwild", True), ("synchronous", True)], ids=["hogwild-lockfree", "async-locking", "synchronous"])
def test_every_style_fits(connect, mode, lock):
    df, x, y = _frame(connect)
    torch.manual_seed(0)
    obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    model = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=30, partitions=2, mode=mode, acquireLock=lock).fit(df)
    history = model.getTrainingHistory()
    assert len(history) == 60  # 30 steps by each of 2 workers
    assert _accuracy(model, x, y) >= 0.9
    out = model.transform(df).select("predicted").collect()
    assert len(out) == len(y)


def test_buffers_dropout_and_two_shards_in_bfloat16(connect):
    """BatchNorm running statistics (buffers) and dropout, over psShards=2 with bfloat16 traffic."""
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=64)
    x = (rng.normal(0, 1, size=(64, 64)) + y[:, None] * 1.5).astype(np.float32)
    df = connect.createDataFrame([(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)], ["features", "label"])
    torch.manual_seed(0)
    net = BNConvNet(side=8, classes=2, dropout=0.2)
    before = net.features[1].running_mean.clone()
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    model = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=20, partitions=2, mode="hogwild",
                       psShards=2, psDtype="bfloat16").fit(df)
    trained = model.getPytorchModel()
    assert not torch.equal(trained.features[1].running_mean, before)  # buffers came back trained
    assert _accuracy(model, x, y) >= 0.8


def test_frozen_embedding_lstm_async(connect):
    """Token ids through a frozen embedding and an LSTM: frozen values come back untouched."""
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=60)
    x = np.stack([rng.integers(0, 6, size=5) + 6 * c for c in y]).astype(np.float32)
    df = connect.createDataFrame([(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)], ["features", "label"])
    torch.manual_seed(0)
    net = FrozenEmbeddingLSTM(vocab=20)
    frozen = net.emb.weight.detach().clone()
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
    model = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=40, partitions=2, mode="async").fit(df)
    assert torch.equal(model.getPytorchModel().emb.weight, frozen)
    assert _accuracy(model, x, y) >= 0.8


# ------------------------------------------------------------------------------ classic <-> Connect


@pytest.fixture(scope="module")
def cross(connect, tmp_path_factory):
    """The shared synchronous fits on Connect; a model saved here; then the classic side
    (a subprocess) fits the same cases, saves its model and loads this one."""
    work = str(tmp_path_factory.mktemp("cross"))
    df = cases.frame(connect)
    flats, steps = {}, {}
    for name, params in cases.TORCH_CASES.items():
        model = cases.estimator(**params).fit(df)
        flats[name] = cases.flat(model)
        steps[name] = len(model.getTrainingHistory())
        if name == "k1":
            model.write().overwrite().save(os.path.join(work, "connect_model"))
            connect_pred = cases.predictions(model, df)
    env = {**os.environ}
    env.pop("SPARK_REMOTE", None)
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    done = subprocess.run([sys.executable, os.path.join(HERE, "classic_side.py"), work], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"work": work, "flats": flats, "steps": steps, "connect_pred": connect_pred, "df": df}


@pytest.mark.parametrize("case", list(cases.SYNC_CASES))
def test_synchronous_fit_equals_classic(cross, case):
    classic = np.load(os.path.join(cross["work"], f"classic_{case}.npy"))
    ours = cross["flats"][case]
    initial = np.concatenate([p.detach().reshape(-1).numpy() for p in cases.initial_model().parameters()])
    assert np.abs(ours - initial).max() > 1e-2  # it trained
    assert np.abs(ours - classic).max() <= 1e-5


@pytest.mark.parametrize("case", list(cases.TORCH_CASES))
def test_synchronous_fit_equals_single_process_torch(cross, case):
    shuffles = cases.TORCH_CASES[case].get("partitionShuffles", 1)
    assert np.abs(cross["flats"][case] - cases.torch_reference(15 * shuffles)).max() <= 1e-5
    assert cross["steps"][case] == 2 * 15 * shuffles  # the history holds every stage's pushes


def test_saved_on_connect_loads_on_classic(cross):
    on_classic = np.load(os.path.join(cross["work"], "connect_model_pred_on_classic.npy"))
    np.testing.assert_array_equal(on_classic, cross["connect_pred"])


def test_saved_on_classic_loads_on_connect(cross):
    model = SparkTorchModel.load(os.path.join(cross["work"], "classic_model"))
    np.testing.assert_array_equal(cases.predictions(model, cross["df"]), np.load(os.path.join(cross["work"], "classic_model_pred.npy")))


# ------------------------------------------------------------------------------ pipelines, helpers


def test_pipeline_fit_save_load(connect, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import VectorAssembler

    x, y = blobs(n=80, seed=4)
    df = connect.createDataFrame([tuple(float(v) for v in r) + (float(t),) for r, t in zip(x, y)], [f"f{i}" for i in range(5)] + ["label"])
    torch.manual_seed(0)
    obj = serialize_torch_obj(cases.initial_model(), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    stages = [VectorAssembler(inputCols=[f"f{i}" for i in range(5)], outputCol="features"),
              SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=25, partitions=2, mode="synchronous")]
    fitted = Pipeline(stages=stages).fit(df)
    before = [r["predicted"] for r in fitted.transform(df).select("predicted").collect()]
    fitted.save(str(tmp_path / "pipe"))
    loaded = PipelineModel.load(str(tmp_path / "pipe"))
    after = [r["predicted"] for r in loaded.transform(df).select("predicted").collect()]
    assert after == before
    assert np.mean(np.array(after) == y) >= 0.9


def test_create_and_attach(connect, tmp_path):
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import VectorAssembler

    from sparktorch.inference import attach_pytorch_model_to_pipeline

    x, y = blobs(n=20, seed=5)
    df = connect.createDataFrame([tuple(float(v) for v in r) for r in x], [f"f{i}" for i in range(5)])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))  # torch.nn only: saved without pickle
    expected = net(torch.from_numpy(x)).argmax(1).numpy().astype(float).tolist()
    va = VectorAssembler(inputCols=[f"f{i}" for i in range(5)], outputCol="features")
    piped = attach_pytorch_model_to_pipeline(net, PipelineModel(stages=[va]), "features", "pred", False)
    assert [r["pred"] for r in piped.transform(df).collect()] == expected
    piped.save(str(tmp_path / "attached"))
    assert [r["pred"] for r in PipelineModel.load(str(tmp_path / "attached")).transform(df).collect()] == expected
    single = create_spark_torch_model(net, inputCol="features", predictionCol="p2")
    assert [r["p2"] for r in single.transform(va.transform(df)).collect()] == expected


# ------------------------------------------------------------------------------ checkpoints, validation


def test_checkpoint_then_resume(connect, tmp_path):
    df, _, _ = _frame(connect)
    ckpt = str(tmp_path / "ckpt")
    first = cases.estimator(iters=6, checkpointPath=ckpt, checkpointInterval=2).fit(df)
    assert os.path.isfile(os.path.join(ckpt, "checkpoint.safetensors"))
    from sparktorch import _native

    assert _native.read_checkpoint(ckpt)["version"] == 6
    resumed = cases.estimator(iters=10, checkpointPath=ckpt, resumeFrom=ckpt).fit(df)
    assert _native.read_checkpoint(ckpt)["version"] == 10  # steps 6..9 ran on top of the first 6
    assert np.abs(cases.flat(resumed) - cases.flat(first)).max() > 0
    straight = cases.estimator(iters=10).fit(df)
    assert np.abs(cases.flat(resumed) - cases.flat(straight)).max() <= 1e-5


def test_validation_and_early_stopping(connect):
    df, _, _ = _frame(connect, n=120)
    torch.manual_seed(0)
    obj = serialize_torch_obj(NoisyInTraining(5, 3), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.0)
    model = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=200, partitions=2, mode="synchronous",
                       validationPct=0.25, earlyStopPatience=3).fit(df)
    history = model.getTrainingHistory()
    assert all(h["val_loss"] is not None for h in history)
    assert len(history) < 2 * 200  # lr=0: the validation loss never improves, the fit stops early


# ------------------------------------------------------------------------------ errors, cancellation


def test_too_few_slots_is_a_clear_error_before_training(connect):
    df, _, _ = _frame(connect)
    with pytest.raises(ClusterError, match="runs only 2 tasks at once"):
        cases.estimator(partitions=3).fit(df)


def test_driver_placement_is_refused_on_connect(connect):
    df, _, _ = _frame(connect)
    with pytest.raises(ParamError, match="psPlacement='driver'"):
        cases.estimator(psPlacement="driver").fit(df)


def _running_tasks_after(tracker, timeout_s: float) -> int:
    """Tasks the server still runs once they have had ``timeout_s`` to end (0 as soon as none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = sum((tracker.getStageInfo(s).numActiveTasks if tracker.getStageInfo(s) else 0) for s in tracker.getActiveStageIds())
        if running == 0 or time.monotonic() > deadline:
            return running
        time.sleep(0.5)


def test_a_cancelled_fit_leaves_no_running_task(connect, server_context):
    """``interruptAll`` (the Connect user's cancel) mid-training: the fit fails, and no task of
    it (training or server host) is left running."""
    from nets import SlowTwoLayer

    df, _, _ = _frame(connect)
    obj = serialize_torch_obj(SlowTwoLayer(5, 8, 3, delay_s=0.2), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    est = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=10_000, partitions=2, mode="hogwild")
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            est.fit(df)
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    tracker = server_context.statusTracker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stages = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
        if any(st is not None and st.numActiveTasks == 2 for st in stages):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the training stage never ran its 2 tasks")
    time.sleep(2.0)
    connect.interruptAll()
    thread.join(timeout=120)
    assert not thread.is_alive(), "fit did not return after the interrupt"
    assert "error" in outcome
    assert _running_tasks_after(tracker, 60.0) == 0


def test_ctrl_c_cancels_the_fit_and_leaves_no_running_task(connect, server_context):
    """Ctrl-C (SIGINT to the client process) while the training stage runs: the fit raises
    KeyboardInterrupt, and its job tag is interrupted, so no task of it is left running."""
    import os
    import signal

    from nets import SlowTwoLayer

    df, _, _ = _frame(connect)
    obj = serialize_torch_obj(SlowTwoLayer(5, 8, 3, delay_s=0.2), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    est = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=10_000, partitions=2, mode="synchronous")
    tracker = server_context.statusTracker()
    seen = threading.Event()

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stages = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
            if any(st is not None and st.numActiveTasks == 2 for st in stages):
                seen.set()
                break
            time.sleep(0.2)
        time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        est.fit(df)
    assert seen.is_set(), "the training stage never ran its 2 tasks"
    assert time.monotonic() - started < 150
    assert _running_tasks_after(tracker, 60.0) == 0
