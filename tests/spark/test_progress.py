"""What a fit shows while it runs (verbose=1): phases, and a bounded log when not on a terminal."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors

from nets import TwoLayer
from sparktorch import SparkTorch, serialize_torch_obj

pytestmark = pytest.mark.timeout(240)

PREPARING, TRAINING, FINISHING = "preparing data", "training", "finishing"
PHASES = {PREPARING, "starting 2 workers", TRAINING, FINISHING, "end"}
LINE = re.compile(r"sparktorch \[([^\]]+)\]")


def _frame(spark, n: int = 64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    rows = [(Vectors.dense(r.tolist()), float(v)) for r, v in zip(x, y)]
    return spark.sparkContext.parallelize(rows, 2).toDF(["features", "label"])


def test_non_tty_fit_writes_few_lines_each_naming_its_phase(spark, capfd, caplog):
    torch.manual_seed(0)
    obj = serialize_torch_obj(TwoLayer(5, 8, 3), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01)
    est = SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=150, partitions=2,
                     useBarrier=True, verbose=1)
    df = _frame(spark)
    capfd.readouterr()
    est.fit(df)
    err = capfd.readouterr().err
    # A progress bar on a non-terminal redraws with carriage returns: count every piece as a
    # line. The plain lines go through logging (here pytest's handler; else stderr).
    pieces = [p for p in re.split(r"[\r\n]+", err) if "sparktorch" in p and "%" in p or "sparktorch [" in p]
    pieces += [r.getMessage() for r in caplog.records if r.name == "sparktorch.progress"]
    assert pieces, err[-2000:]
    assert len(pieces) <= 16, pieces
    phases = []
    for piece in pieces:
        m = LINE.search(piece)
        assert m is not None and m.group(1) in PHASES, piece
        phases.append(m.group(1))
    # Spark's own console progress bar (on in this session) stayed quiet during the fit.
    assert "\r" not in err and "[Stage" not in err, err[-2000:]
    assert phases[-1] == "end"
    assert TRAINING in phases or FINISHING in phases, phases


class _FakeServer:
    def __init__(self, stats):
        self.stats_value = stats

    def stats(self):
        return self.stats_value


def test_phase_follows_the_server():
    from sparktorch._progress import Progress

    progress = Progress(_FakeServer({}), total=100, verbose=0, num_workers=4)
    assert progress.phase({"updates": 0, "workers_live": 0}) == PREPARING
    assert progress.phase({"updates": 0, "workers_live": 2}) == "starting 4 workers"
    assert progress.phase({"updates": 10, "workers_live": 4}) == TRAINING
    assert progress.phase({"updates": 100, "workers_live": 4}) == FINISHING


class _CountingServer:
    """Stats of a fit that applies 10 steps per poll, all workers connected."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def stats(self):
        self.done = min(self.total, self.done + 10)
        return {"updates": self.done, "workers_live": 4, "recent_loss": {0: 0.5}}


def test_plain_lines_reach_stderr_when_logging_is_not_configured(monkeypatch):
    """No handler anywhere (a plain script): the lines still show, on the display's stream."""
    import io
    import logging
    import time

    from sparktorch._progress import Progress

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(Progress, "POLL_S", 0.005)
    stream = io.StringIO()
    server = _CountingServer(1000)
    with Progress(server, total=1000, verbose=1, num_workers=4, stream=stream):
        deadline = time.monotonic() + 20
        while server.done < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    lines = stream.getvalue().splitlines()
    assert 5 <= len(lines) <= 16, lines
    assert all(LINE.search(line) for line in lines), lines
    assert "[end] 1000/1000" in lines[-1]
