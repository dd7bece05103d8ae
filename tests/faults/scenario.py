"""Fault scenarios, each in its own driver process with its own local Spark (task retries on).

Usage: ``python scenario.py NAME OUT.json``. Run by tests/faults/test_faults.py. Trains a small
MLP on the bundled MNIST (first 2,000 training rows, evaluated on the 2,000 held-out rows) and
writes what a user would check: accuracy, steps per worker, duplicated steps, the error raised.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from pyspark.ml.feature import VectorAssembler  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from faulty import DieOnce  # noqa: E402
from prepare_mnist import prepare  # noqa: E402
from sparktorch import SparkTorch, _native, serialize_torch_obj  # noqa: E402

ITERS = 300


def session(slots: int = 2) -> SparkSession:
    # local[2,3]: two task slots, and a failed task is retried (up to 3 attempts in all);
    # the psShards=2 scenarios need 2 more slots for the shard tasks.
    return (
        SparkSession.builder.master(f"local[{slots},3]")
        .appName("sparktorch-faults")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )


def data(spark: SparkSession):
    train_csv, test_csv = prepare()
    raw = spark.read.option("inferSchema", "true").csv(str(train_csv)).limit(2000)
    asm = VectorAssembler(inputCols=raw.columns[1:785], outputCol="features")
    train = asm.transform(raw).select("features", F.col("_c0").cast("double").alias("label")).repartition(2).cache()
    train.count()
    test = np.loadtxt(test_csv, delimiter=",", dtype=np.float32)
    return train, test[:, 1:], test[:, 0].astype(np.int64)


def held_out_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def fit(train, marker: str, **kwargs):
    torch.manual_seed(0)
    obj = serialize_torch_obj(DieOnce(marker), nn.CrossEntropyLoss(), torch.optim.Adam, lr=1e-3)
    est = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=ITERS, miniBatch=128, **kwargs)
    return est.fit(train)


def summary(model, x, y) -> dict:
    history = model.getTrainingHistory()
    keys = Counter((h["worker"], h["step"]) for h in history)
    return {
        "accuracy": held_out_accuracy(model.getPytorchModel(), x, y),
        "steps_per_worker": {str(w): n for w, n in sorted(Counter(h["worker"] for h in history).items())},
        "duplicates": sum(1 for n in keys.values() if n > 1),
    }


def kill_worker(spark, **kwargs) -> dict:
    """Partition 1's Python worker dies mid-fit; Spark retries the task (or the barrier stage)."""
    train, x, y = data(spark)
    tmp = Path(tempfile.mkdtemp())
    never = tmp / "undisturbed"
    never.touch()  # exists: the undisturbed run never dies
    clean = fit(train, str(never), **kwargs)
    marker = tmp / "killed"
    faulted = fit(train, str(marker), **kwargs)
    return {
        "iters": ITERS,
        "clean": summary(clean, x, y),
        "faulted": summary(faulted, x, y),
        "killed": marker.read_text() if marker.exists() else None,
    }


def kill_server(spark) -> dict:
    """Stop the parameter server mid-fit: the fit must fail fast and leave nothing listening."""
    train, _, _ = data(spark)
    servers = []
    real = _native.ParameterServer

    def recording(*args, **kwargs):
        s = real(*args, **kwargs)
        servers.append(s)
        return s

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if servers and servers[0].stats()["updates"] >= 5:
                servers[0].stop()
                return
            time.sleep(0.05)

    tmp = Path(tempfile.mkdtemp())
    (tmp / "never").touch()
    _native.ParameterServer = recording  # the driver looks the class up at fit time
    threading.Thread(target=killer, daemon=True).start()
    started = time.monotonic()
    error = None
    try:
        fit(train, str(tmp / "never"), ioTimeout=20.0)
    except Exception as e:  # noqa: BLE001 - the scenario reports whatever was raised
        error = f"{type(e).__module__}.{type(e).__name__}: {str(e)[:3000]}"
    finally:
        _native.ParameterServer = real
    elapsed = time.monotonic() - started
    host, port = servers[0].address if servers else ("127.0.0.1", 0)
    with socket.socket() as s:
        s.settimeout(2)
        listening = s.connect_ex((host, port)) == 0
    return {"error": error, "elapsed_s": elapsed, "address": f"{host}:{port}", "still_listening": listening}


SCENARIOS = {
    "kill-worker-async": lambda spark: kill_worker(spark, mode="hogwild", acquireLock=True),
    "kill-worker-hogwild": lambda spark: kill_worker(spark, mode="hogwild", acquireLock=False),
    "kill-worker-barrier": lambda spark: kill_worker(spark, mode="hogwild", acquireLock=True, useBarrier=True),
    "kill-worker-sync": lambda spark: kill_worker(spark, mode="synchronous", useBarrier=True),
    "kill-server": kill_server,
    # A training task dies while two parameter-server shards serve the fit: its retry registers
    # with every shard and continues from the smallest step they report.
    "kill-worker-async-shards": lambda spark: kill_worker(spark, mode="hogwild", acquireLock=True, psShards=2),
    "kill-worker-sync-shards": lambda spark: kill_worker(
        spark, mode="synchronous", useBarrier=True, psShards=2, lostWorkerPolicy="fail"
    ),
}


def main(name: str, out: str) -> None:
    spark = session(4 if name.endswith("-shards") else 2)
    spark.sparkContext.setLogLevel("ERROR")
    try:
        Path(out).write_text(json.dumps(SCENARIOS[name](spark)))
    finally:
        spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
