"""``psShards``: the parameter vector range-partitioned over shards running as Spark tasks.

Real local Spark (the shared local[4] session: 2 shard slots + 2 training slots), real sockets,
real process deaths. See docs/architecture.md, "Sharded parameter server".
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from nets import BNConvNet, SlowTwoLayer, TwoLayer
from toy_data import blobs
from toy_data import vector_frame as frame
from sparktorch import SparkTorch, _native, serialize_torch_obj
from sparktorch.errors import EngineError, ParamError

pytestmark = pytest.mark.timeout(300)


def _state(fitted) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in fitted.getPytorchModel().state_dict().items()}


def _accuracy(fitted, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        net = fitted.getPytorchModel().eval()
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _jobs(spark) -> set[int]:
    return set(spark.sparkContext.statusTracker().getJobIdsForGroup(None)) | set(
        spark.sparkContext.statusTracker().getActiveJobsIds()
    )


def test_synchronous_two_shards_equal_one_mlp(spark):
    x, y = blobs(120, seed=4)
    df = frame(spark, x, y, 2)
    states = {}
    for k in (1, 2):
        torch.manual_seed(0)
        obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=15, miniBatch=16, partitions=2,
            mode="synchronous", lostWorkerPolicy="fail", psShards=k,
        ).fit(df)
        states[k] = (_state(fitted), fitted.getTrainingHistory(), fitted.getOptimizerStateDict())
    (one, h1, o1), (two, h2, o2) = states[1], states[2]
    assert one.keys() == two.keys()
    for name in one:
        assert float((one[name] - two[name]).abs().max()) <= 1e-6, name
    # The history (shard 0's) is the global one: every push of every worker, once.
    assert sorted((h["worker"], h["step"]) for h in h1) == sorted((h["worker"], h["step"]) for h in h2)
    assert len(h2) == 30
    # The optimizer state is whole: every shard's slice in place.
    for p1, p2 in zip(o1["state"].values(), o2["state"].values()):
        for key in p1:
            assert torch.allclose(torch.as_tensor(p1[key]).double(), torch.as_tensor(p2[key]).double(), atol=1e-6), key


def test_synchronous_two_shards_equal_one_batchnorm_cnn(spark):
    # Buffers (BatchNorm running statistics, num_batches_tracked) are the tail of the flat vector:
    # with 2 shards the last one holds trainable values and the whole buffer tail, and the
    # boundary cuts the head's linear layer in two.
    rng = np.random.default_rng(5)
    x = rng.random((96, 14 * 14), dtype=np.float32)
    y = rng.integers(0, 10, 96)
    df = frame(spark, x, y, 2)
    states = {}
    for k in (1, 2):
        torch.manual_seed(1)
        obj = serialize_torch_obj(BNConvNet(14), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=6, miniBatch=16, partitions=2,
            mode="synchronous", lostWorkerPolicy="fail", psShards=k,
        ).fit(df)
        states[k] = _state(fitted)
    one, two = states
    one, two = states[1], states[2]
    assert float((one["features.1.running_var"] - 1).abs().max()) > 1e-3  # buffers moved
    assert int(two["features.1.num_batches_tracked"]) == int(one["features.1.num_batches_tracked"]) == 6
    for name in one:
        assert float((one[name] - two[name]).abs().max()) <= 1e-6, name


@pytest.mark.parametrize("mode,lock", [("hogwild", False), ("async", True)])
def test_async_styles_train_with_two_shards(spark, mode, lock):
    x, y = blobs(200, seed=6)
    df = frame(spark, x, y, 2)
    acc = {}
    for k in (1, 2):
        torch.manual_seed(2)
        obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.02)
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=40, miniBatch=20, partitions=2,
            mode=mode, acquireLock=lock, psShards=k,
        ).fit(df)
        acc[k] = _accuracy(fitted, x, y)
        if k == 2:
            hist = fitted.getTrainingHistory()
            assert sorted({h["worker"] for h in hist}) == [0, 1] and len(hist) == 80
    assert acc[2] >= 0.9 and acc[2] >= acc[1] - 0.05, acc


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"psShards": 0}, r"psShards=0: must be an int >= 1"),
        ({"psShards": -2}, r"psShards=-2: must be an int >= 1"),
        ({"psShards": 3}, r"psShards=3: 3 shard tasks plus 2 training tasks need 5 task slots.*only 4"),
        ({"psShards": 2, "mode": "synchronous"}, r"psShards=2 with mode='synchronous' needs lostWorkerPolicy='fail'"),
        ({"psShards": 2, "resumeFrom": "/tmp/sparktorch-never-written"}, r"resumeFrom=.*no sharded checkpoint there"),
    ],
)
def test_bad_ps_shards_fail_before_any_job(spark, kwargs, match):
    x, y = blobs(40, seed=7)
    df = frame(spark, x, y, 2)
    torch.manual_seed(0)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    before = _jobs(spark)
    with pytest.raises(ParamError, match=match):
        SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2, partitions=2, **kwargs).fit(df)
    assert _jobs(spark) == before


def test_more_shards_than_values_fails_before_any_job(spark):
    x, y = blobs(40, seed=7, dim=1, classes=2)
    df = frame(spark, x, y, 1)
    obj = serialize_torch_obj(nn.Linear(1, 1, bias=False), nn.MSELoss(), torch.optim.SGD, lr=0.01)
    before = _jobs(spark)
    with pytest.raises(ParamError, match=r"psShards=2: the model has only 1 values"):
        SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2, partitions=1, psShards=2).fit(df)
    assert _jobs(spark) == before


@pytest.mark.parametrize("mode,when", [("synchronous", "mid-fit"), ("async", "mid-fit"), ("async", "at-start")])
def test_killed_shard_fails_the_fit_naming_it(spark, mode, when):
    # A long fit; once the shards have registered and training runs (mid-fit), or as soon as
    # shard 1 has registered (at-start: the training job may not even be submitted yet), the
    # Python worker serving shard 1 is killed (SIGKILL, a real process death). Documented
    # outcome: the fit fails with an EngineError naming shard 1, within seconds (no restart, no
    # hang).
    x, y = blobs(400, seed=8)
    df = frame(spark, x, y, 2)
    torch.manual_seed(3)
    obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    est = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=100_000, miniBatch=8, partitions=2,
        mode=mode, lostWorkerPolicy="fail", psShards=2,
    )
    from sparktorch._shards import live_shards

    killed: dict[str, float] = {}

    tracker = spark.sparkContext.statusTracker()

    def running_tasks() -> int:
        stages = [tracker.getStageInfo(i) for i in tracker.getActiveStageIds()]
        return sum(st.numActiveTasks for st in stages if st is not None)

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            shard = [s for s in live_shards() if s["shard"] == 1]
            if shard and (when == "at-start" or running_tasks() >= 4):  # 2 shard + 2 training tasks
                if when == "mid-fit":
                    time.sleep(2.0)  # training steps run meanwhile
                os.kill(int(shard[0]["pid"]), signal.SIGKILL)
                killed["at"] = time.monotonic()
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(EngineError, match=r"parameter server shard 1 \(127\.0\.0\.1:\d+\)") as info:
        est.fit(df)
    failed = time.monotonic()
    t.join(5)
    assert "at" in killed, "the shard was never seen"
    assert failed - killed["at"] < 30, f"the fit took {failed - killed['at']:.1f} s to fail"
    assert "not restarted" in str(info.value) or "lost" in str(info.value)
    assert live_shards() == []


def _sync_est(obj: str, **kw):
    args = {
        "inputCol": "features", "labelCol": "label", "torchObj": obj, "miniBatch": 16, "partitions": 2,
        "mode": "synchronous", "lostWorkerPolicy": "fail", "psShards": 2, **kw,
    }
    return SparkTorch(**args)


def test_sharded_checkpoint_resumes_to_the_uninterrupted_result(spark, tmp_path):
    x, y = blobs(120, seed=9)
    df = frame(spark, x, y, 2)
    torch.manual_seed(4)
    obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    ckpt = str(tmp_path / "ckpt")
    first = _sync_est(obj, iters=4, checkpointPath=ckpt, checkpointInterval=2).fit(df)
    assert len(first.getTrainingHistory()) == 8
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["shards"] == 2 and manifest["version"] == 4 and manifest["global_cut"] and manifest["final"]
    for i, part in enumerate(manifest["parts"]):
        meta = _native.read_checkpoint(str(tmp_path / "ckpt" / part))
        assert meta["version"] == 4
        lo, hi = manifest["ranges"][i]
        assert meta["params"].size == hi - lo
    # Reusing the directory without resumeFrom is refused, as with one server.
    with pytest.raises(ParamError, match=r"checkpointPath=.*manifest\.json.*resumeFrom="):
        _sync_est(obj, iters=8, checkpointPath=ckpt).fit(df)
    resumed = _sync_est(obj, iters=8, checkpointPath=ckpt, resumeFrom=ckpt).fit(df)
    assert sorted({h["step"] for h in resumed.getTrainingHistory()}) == [4, 5, 6, 7]
    straight = _sync_est(obj, iters=8).fit(df)
    a, b = _state(resumed), _state(straight)
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-6, name
    assert json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["version"] == 8


def test_resuming_a_sharded_checkpoint_needs_the_same_ps_shards(spark, tmp_path):
    x, y = blobs(40, seed=10)
    df = frame(spark, x, y, 2)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    ckpt = str(tmp_path / "ckpt")
    _sync_est(obj, iters=2, checkpointPath=ckpt).fit(df)
    before = _jobs(spark)
    with pytest.raises(ParamError, match=r"psShards=3: resumeFrom=.* was written with psShards=2"):
        _sync_est(obj, iters=4, resumeFrom=ckpt, psShards=3).fit(df)
    with pytest.raises(ParamError, match=r"resumeFrom=.*no checkpoint there"):
        _sync_est(obj, iters=4, resumeFrom=ckpt, psShards=1, lostWorkerPolicy="drop").fit(df)
    assert _jobs(spark) == before


def test_periodic_sharded_checkpoints_are_consistent_cuts(spark, tmp_path):
    # While a synchronous fit runs, every manifest written names one version, and every part it
    # names is a checkpoint of that very version (a consistent cut across the shards).
    x, y = blobs(80, seed=11)
    df = frame(spark, x, y, 2)
    torch.manual_seed(5)
    obj = serialize_torch_obj(SlowTwoLayer(5, 8, 3, delay_s=0.15), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    root = tmp_path / "ckpt"
    seen: dict[int, list[int]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                m = json.loads((root / "manifest.json").read_text())
                if m["version"] not in seen:
                    seen[m["version"]] = [_native.read_checkpoint(str(root / p))["version"] for p in m["parts"]]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        _sync_est(obj, iters=24, checkpointPath=str(root), checkpointInterval=2).fit(df)
    finally:
        done.set()
        t.join(10)
    assert 24 in seen and len(seen) >= 3, seen  # some mid-fit cuts, and the final one
    for version, parts in seen.items():
        assert parts == [version, version], (version, parts)


def test_a_forged_shard_registration_is_refused_and_the_fit_goes_on(spark):
    # While a sharded fit runs, a peer without the per-fit secret connects to the driver's shard
    # registry and claims to be shard 1: it is refused (bad MAC) and the fit ends normally.
    import socket as so

    from sparktorch._shards import _canonical, _mac, _recv, _send, live_shards

    x, y = blobs(80, seed=12)
    df = frame(spark, x, y, 2)
    obj = serialize_torch_obj(SlowTwoLayer(5, 8, 3, delay_s=0.1), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    answers: list[dict] = []

    def forger() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not live_shards():
            time.sleep(0.05)
        host, port = live_shards()[0]["registry"]
        with so.create_connection((host, port), timeout=10) as s:
            s.settimeout(10)
            nonce = bytes.fromhex(_recv(s, 0)[0]["nonce"])
            fields = {"fit": live_shards()[0]["fit"], "shard": 1, "attempt": 0, "host": "127.0.0.1", "port": 9,
                      "fingerprint": None, "pid": 1, "nonce": "00" * 32}
            _send(s, {**fields, "mac": _mac(b"not-the-secret-0123456789", b"shard-register", nonce, _canonical(fields))})
            answers.append(_recv(s, 0)[0])

    t = threading.Thread(target=forger, daemon=True)
    t.start()
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=20, partitions=2, psShards=2,
    ).fit(df)
    t.join(30)
    assert answers == [{"ok": False, "error": "authentication failed"}]
    assert len(fitted.getTrainingHistory()) == 40


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_seed_program_with_two_shards_equals_one_server(tmp_path):
    # The seed program (MNIST MLP, 4 partitions, barrier) in synchronous mode, psShards 1 then 2,
    # in its own process with local[6] (2 shard slots + 4 training slots).
    import subprocess
    import sys

    out = tmp_path / "params.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "seed_sharded.py"), str(tmp_path), "10", str(out)],
        env=env, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.load(out)
    names = [n[3:] for n in got.files if n.startswith("k1_")]
    assert names
    for name in names:
        one, two = got[f"k1_{name}"], got[f"k2_{name}"]
        assert float(np.abs(one.astype(np.float64) - two).max()) <= 1e-6, name


@pytest.mark.parametrize("mode", ["synchronous", "async"])
def test_early_stopping_is_global_across_shards(spark, mode):
    # lr=0 never improves the loss: shard 0 runs early stopping for the whole fit, every task
    # stops, and the history (shard 0's) ends early, as with one server. (Async: an evaluation
    # waits for every live worker's report, so how many steps a fast worker makes before a slow
    # one's first push depends on start-up timing; every worker still stops long before iters.)
    x, y = blobs(60, seed=13)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.0)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=500, earlyStopPatience=3, partitions=2,
        mode=mode, lostWorkerPolicy="fail", psShards=2,
    ).fit(frame(spark, x, y, 2))
    history = fitted.getTrainingHistory()
    if mode == "synchronous":
        assert 0 < len(history) <= 2 * 10
    last = {w: max(h["step"] for h in history if h["worker"] == w) for w in (0, 1)}
    assert max(last.values()) < 250, last


def test_tls_shards_with_step_logging(spark, caplog):
    # psEncryption='on': every shard serves TLS with its own key; the tasks pin each shard's
    # fingerprint (registered with the driver under the MAC). verbose=2 reads shard 0's history
    # incrementally over the control connection while the fit runs.
    import logging

    x, y = blobs(80, seed=14)
    torch.manual_seed(6)
    obj = serialize_torch_obj(TwoLayer(5, 16, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    with caplog.at_level(logging.INFO, logger="sparktorch"):
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=30, partitions=2, psShards=2,
            psEncryption="on", verbose=2,
        ).fit(frame(spark, x, y, 2))
    shard_lines = [r.getMessage() for r in caplog.records if "parameter server shard" in r.getMessage() and "holds" in r.getMessage()]
    assert len(shard_lines) == 2 and all("TLS" in line for line in shard_lines), shard_lines
    step_lines = [r for r in caplog.records if r.getMessage().startswith("worker ") and " step " in r.getMessage()]
    assert step_lines  # per-step lines from shard 0's history
    assert _accuracy(fitted, x, y) >= 0.9


def test_each_shard_returns_its_state_in_a_job_of_its_own(spark):
    """spark.driver.maxResultSize bounds one shard's final state, not the whole model's: with the
    limit at 5 MiB, a model whose values + Adam state are ~6.2 MB (over it) fits with
    psShards=2 (each shard's ~3.1 MB under it), and equals the same fit with one server."""
    x, y = blobs(64, seed=6)
    df = frame(spark, x, y, 2)
    states = {}
    jconf = spark.sparkContext._jsc.sc().conf()
    jconf.set("spark.driver.maxResultSize", "5m")
    try:
        for k in (1, 2):
            torch.manual_seed(0)
            obj = serialize_torch_obj(TwoLayer(5, 60_000, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
            fitted = SparkTorch(
                inputCol="features", labelCol="label", torchObj=obj, iters=3, partitions=2,
                mode="synchronous", lostWorkerPolicy="fail", psShards=k,
            ).fit(df)
            states[k] = _state(fitted)
    finally:
        jconf.remove("spark.driver.maxResultSize")
    for name in states[1]:
        assert float((states[1][name] - states[2][name]).abs().max()) <= 1e-6, name
