"""The `sparktorch-ps` command ships with the package: the README's set-up puts it on the venv's
PATH, and it reads the checkpoints that fits write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sparktorch import _native

COMMAND = Path(sys.executable).parent / "sparktorch-ps"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=60)


def test_help_lists_the_subcommands():
    assert COMMAND.exists(), f"{COMMAND} is missing: the set-up did not install the command"
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for sub in ("serve", "bench", "inspect"):
        assert sub in proc.stdout


def test_inspect_reads_a_checkpoint_with_model_buffers(tmp_path):
    flat = np.arange(7, dtype=np.float32)
    layout = [("fc.weight", [2, 2]), ("fc.bias", [1]), ("bn.running_mean", [2])]
    with _native.ParameterServer(
        flat, layout, "Adam", {"lr": 0.1}, secret=b"k" * 32, model_buffers=2
    ) as server:
        server.save_checkpoint(str(tmp_path))
    proc = run("inspect", "--json", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["num_params"] == 7 and info["model_buffers"] == 2
    assert run("inspect", str(tmp_path / "missing")).returncode != 0
