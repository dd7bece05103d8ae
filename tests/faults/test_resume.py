"""Checkpoint, kill the driver mid-fit, resume: the result equals an uninterrupted fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparktorch import _native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume_case import ITERS, estimator, frame  # noqa: E402

from sparktorch.errors import ParamError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

HERE = Path(__file__).resolve().parent


def test_resume_after_the_driver_is_killed_equals_an_uninterrupted_fit(spark, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, str(HERE / "killed_driver.py"), str(ckpt), "25"],
        env=dict(os.environ, PYSPARK_PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == -9, f"the driver was not killed (rc {proc.returncode}): {proc.stderr[-3000:]}"
    killed_at = int(_native.read_checkpoint(str(ckpt / "checkpoint.safetensors"))["version"])
    assert 25 <= killed_at < ITERS

    # A rerun with the same checkpointPath is refused before any job: resuming is explicit.
    with pytest.raises(ParamError, match="resumeFrom"):
        estimator(checkpointPath=str(ckpt), checkpointInterval=5).fit(frame(spark))
    # resumeFrom: the fit continues from what the killed driver left.
    resumed = estimator(checkpointPath=str(ckpt), resumeFrom=str(ckpt), checkpointInterval=5).fit(frame(spark))
    history = resumed.getTrainingHistory()
    assert min(h["step"] for h in history) == killed_at  # only the missing steps ran
    assert max(h["step"] for h in history) == ITERS - 1

    uninterrupted = estimator().fit(frame(spark))
    # Parameters AND buffers (BatchNorm's running statistics travel through the checkpoint).
    got, want = resumed.getPytorchModel().state_dict(), uninterrupted.getPytorchModel().state_dict()
    assert got.keys() == want.keys() and "net.1.running_var" in got
    assert int(got["net.1.num_batches_tracked"]) == ITERS
    for name in want:
        assert float((got[name].double() - want[name].double()).abs().max()) <= 1e-5, name
    # The final checkpoint holds the finished fit.
    assert int(_native.read_checkpoint(str(ckpt / "checkpoint.safetensors"))["version"]) == ITERS


def test_resume_from_a_missing_checkpoint_is_a_clear_error(spark, tmp_path):
    with pytest.raises(ParamError, match="resumeFrom"):
        estimator(resumeFrom=str(tmp_path / "nope")).fit(frame(spark))
