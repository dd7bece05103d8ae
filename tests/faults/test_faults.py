"""Faults during a fit, each scenario in its own driver process (see scenario.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

HERE = Path(__file__).resolve().parent


def run_scenario(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "scenario.py"), name, str(out)],
        env=dict(os.environ, PYSPARK_PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "name",
    ["kill-worker-async", "kill-worker-hogwild", "kill-worker-barrier", "kill-worker-sync", "kill-worker-async-shards", "kill-worker-sync-shards"],
)
def test_a_killed_worker_is_retried_and_the_fit_still_reaches_its_accuracy(name, tmp_path):
    result = run_scenario(name, tmp_path)
    assert result["killed"], "the fault did not fire"
    clean, faulted = result["clean"], result["faulted"]
    # The retried task rejoined the same server and continued where it stopped: every worker did
    # exactly its steps, and no (worker, step) was applied twice.
    iters = result["iters"]
    assert faulted["steps_per_worker"] == {"0": iters, "1": iters}
    assert faulted["duplicates"] == 0
    assert faulted["accuracy"] >= clean["accuracy"] - 0.02, result


def test_a_dead_server_fails_the_fit_fast_and_leaves_nothing_listening(tmp_path):
    result = run_scenario("kill-server", tmp_path)
    assert result["error"] is not None, "the fit did not fail"
    assert "ServerUnavailableError" in result["error"] or "ProtocolError" in result["error"], result["error"]
    assert result["address"] in result["error"], result["error"]
    assert result["elapsed_s"] < 120
    assert not result["still_listening"]
