"""A fit succeeds with its Python workers under a memory limit smaller than its partition's data.

Each fit runs in its own driver process (``limited_fit.py``) whose Python workers live in a
memory cgroup: the limit is the memory a bare worker needs (torch imported) plus 320 MiB, and
the partition holds 64 MiB more feature data than that limit. A task that materialises its
partition is killed by the kernel; a task that streams it into a spill file is not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from limited_fit import own_memory_cgroup  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(own_memory_cgroup() is None, reason="needs a writable memory cgroup (root, cgroup v1 memory or v2)"),
]

DIM = 1024
HEADROOM_MIB = 320
EXCESS_MIB = 64


def worker_baseline_mib() -> int:
    """Anonymous memory of a Python process holding what a training worker imports."""
    code = (
        "import numpy, pyarrow, torch, torch.nn, pyspark.worker, sparktorch._task\n"
        "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return math.ceil(int(out.stdout.strip()) / 1024)


@pytest.mark.parametrize("mode", ["async", "synchronous"])
def test_fit_under_a_memory_limit_smaller_than_the_partition(tmp_path, mode):
    limit_mib = worker_baseline_mib() + HEADROOM_MIB
    rows = ((limit_mib + EXCESS_MIB) << 20) // (DIM * 4)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "limited_fit.py"), mode, str(rows), str(DIM), str(limit_mib), str(out)],
        capture_output=True, text=True, timeout=540, env=dict(os.environ),
    )
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data_bytes"] > result["limit_bytes"]
    assert result["ok"], result.get("error", "")[:1500]
    assert result["steps"] == 20
