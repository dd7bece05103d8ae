"""Helpers shared by the benchmark scripts.

Imported by scripts that run under *either* venv (ours: ``.venv``; upstream's:
``benchmarks/.venv-upstream``), so the module level uses the standard library only; torch is
imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
OUR_PY = ROOT / ".venv" / "bin" / "python"
UP_PY = BENCH / ".venv-upstream" / "bin" / "python"
DATA = ROOT / "examples" / "data"
TRAIN_CSV = DATA / "mnist_train.csv"
TEST_CSV = DATA / "mnist_test.csv"
WORK = BENCH / "out"  # scratch (git-ignored)

log = logging.getLogger("bench")

# Parameter-server model sizes: name -> hidden widths of an MLP 784 -> h... -> 10.
# "0.27M" is the seed program's network (269,322 parameters).
PS_MODELS: dict[str, list[int]] = {
    "0.27M": [256, 256],
    "5M": [2000, 1700],
    "25M": [4096, 4096, 1200],
}


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )


def mlp(hidden: list[int], softmax: bool = True) -> Any:
    """The seed network generalised: Linear/ReLU stack 784 -> hidden... -> 10 (+ Softmax)."""
    from torch import nn

    layers: list[Any] = []
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    if softmax:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


def seed_network() -> Any:
    """The seed program's network, exactly."""
    return mlp([256, 256])


def num_params(hidden: list[int]) -> int:
    total, width = 0, 784
    for h in list(hidden) + [10]:
        total += width * h + h
        width = h
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_csv(path: Path) -> tuple[Any, Any]:
    """(features float32 [n, 784] raw 0-255, labels int64 [n]) from a ``label,p0..p783`` CSV."""
    import numpy as np

    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return arr[:, 1:].copy(), arr[:, 0].astype(np.int64)


def accuracy(network: Any, x: Any, y: Any) -> float:
    """Held-out accuracy of a torch network on numpy arrays (argmax of the outputs)."""
    import torch

    network.eval()
    with torch.inference_mode():
        pred = network(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_bounded(
    cmd: list[str], timeout_s: float, env: dict[str, str] | None = None, log_path: Path | None = None
) -> dict[str, Any]:
    """Run ``cmd`` in its own process group; kill the whole group (Spark's JVM and Python workers
    included) when it outlives ``timeout_s``. Returns rc, wall time, timed_out and the output tail."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
        start_new_session=True, text=True, errors="replace",
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, _ = proc.communicate()
    else:
        # Leftovers (a forked server that outlived its parent) die with the group.
        _kill_group(proc, quiet=True)
    wall = time.perf_counter() - t0
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}\n[rc={proc.returncode} wall={wall:.1f}s timed_out={timed_out}]\n\n")
    return {"rc": proc.returncode, "wall_s": wall, "timed_out": timed_out, "tail": out[-4000:]}


def _kill_group(proc: subprocess.Popen, quiet: bool = False) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        if sig == signal.SIGTERM:
            time.sleep(0.5 if quiet else 2.0)


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, min, max and n of a list of measurements (empty -> None fields)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
