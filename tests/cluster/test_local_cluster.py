"""Real executor JVMs (``local-cluster``), with Spark's RPC limit enforced as on a cluster.

The driver runs in a subprocess (one SparkContext per process; the shared local session of the
other tests stays untouched): see ``on_local_cluster.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent


def test_sharded_fits_whose_shards_exceed_the_rpc_limit(tmp_path):
    """psShards=2 on two executor JVMs with spark.rpc.message.maxSize=1 MiB and shard ranges of
    2.2 MB each: every style fits (the initial values reach the shards as a file, not inside
    their tasks), the synchronous fit equals single-process torch, and save/load keeps the
    predictions; then killed executors fail a fit with an EngineError, in bounded time."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "on_local_cluster.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_params"] * 4 / 2 > 1 << 20  # each shard's range is over the RPC limit
    assert result["driver_pid"] not in result["executor_pids"]
    assert len(result["executor_pids"]) == 2
    for fit in result["fits"]:
        assert fit["steps"] == 2 * 8, fit
    sync = result["fits"][-1]
    assert sync["max_diff_vs_torch"] <= 1e-5, sync
    assert sync["same_predictions_after_load"], sync
    # Then both executor JVMs are killed (SIGKILL) while a sharded hogwild fit trains: the
    # documented outcome is an EngineError naming the lost shard, not a hang.
    killed = json.loads((tmp_path / "killed.json").read_text())
    assert len(killed["killed"]) == 2, killed
    assert not killed.get("not_engine_error"), killed
    assert killed["error"] and "shard" in killed["error"], killed
    assert killed["seconds"] < 240, killed
