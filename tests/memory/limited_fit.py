"""One fit whose Python workers run under a memory limit smaller than the partition's data.

Usage: ``python limited_fit.py MODE ROWS DIM LIMIT_MIB OUT.json``. Run by
tests/memory/test_memory_limit.py, each call in its own driver process with its own local
Spark. The limit is a memory cgroup (v2 ``memory.max``, else v1 ``memory.limit_in_bytes``)
that holds only the Python workers: ``PYSPARK_PYTHON`` is a wrapper that moves itself into the
cgroup and then runs this interpreter, so the daemon and every worker it forks are charged
(anonymous memory and the page cache they fill), while the JVM and this driver are not.

Writes ``{"ok": bool, "error": str | None, "steps": int, "peak_bytes": int, ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


def own_memory_cgroup() -> tuple[Path, str] | None:
    """(directory of this process's memory cgroup, "v1" | "v2"), or None when there is none
    this process can write to."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                return base, "v1"
    for line in lines:
        if line.startswith("0::"):
            base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            if (base / "cgroup.controllers").exists() and "memory" in (base / "cgroup.controllers").read_text().split():
                if os.access(base, os.W_OK):
                    return base, "v2"
    return None


def make_cgroup(limit_bytes: int) -> tuple[Path, str]:
    found = own_memory_cgroup()
    if found is None:
        raise RuntimeError("no writable memory cgroup")
    base, version = found
    group = base / f"sparktorch-limit-{os.getpid()}"
    group.mkdir()
    if version == "v1":
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        # No swap to hide behind (when the kernel accounts it).
        sw = group / "memory.memsw.limit_in_bytes"
        if sw.exists():
            try:
                sw.write_text(str(limit_bytes))
            except OSError:
                pass
    else:
        (group / "memory.max").write_text(str(limit_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
    return group, version


def peak_and_failures(group: Path, version: str) -> tuple[int, int]:
    if version == "v1":
        return int((group / "memory.max_usage_in_bytes").read_text()), int((group / "memory.failcnt").read_text())
    peak = group / "memory.peak"
    events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
    return (int(peak.read_text()) if peak.exists() else -1), int(events.get("max", 0))


def remove_cgroup(group: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.5)


def main() -> None:
    mode, rows, dim, limit_mib, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    limit = limit_mib << 20
    group, version = make_cgroup(limit)
    work = Path(tempfile.mkdtemp(prefix="sparktorch-limit-"))
    wrapper = work / "python-in-cgroup.sh"
    wrapper.write_text(f'#!/bin/sh\necho $$ > "{group}/cgroup.procs"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    os.environ["PYSPARK_PYTHON"] = str(wrapper)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict = {"mode": mode, "rows": rows, "dim": dim, "limit_bytes": limit, "data_bytes": rows * dim * 4}
    spark = None
    try:
        import torch
        import torch.nn as nn
        from pyspark.sql import SparkSession
        from pyspark.sql import functions as F

        from sparktorch import SparkTorch, serialize_torch_obj

        spark = (
            SparkSession.builder.master("local[2]")
            .appName("sparktorch-memory-limit")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.local.dir", str(work / "local"))
            .config("spark.python.worker.reuse", "false")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        df = spark.range(0, rows, numPartitions=1).select(
            F.expr(f"transform(sequence(0, {dim - 1}), i -> cast(((id * 31 + i * 17) % 101) / 101.0 as float))").alias("features"),
            (F.col("id") % 3).cast("double").alias("label"),
        )
        torch.manual_seed(0)
        obj = serialize_torch_obj(nn.Sequential(nn.Linear(dim, 3)), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.01)
        t0 = time.monotonic()
        fitted = SparkTorch(
            inputCol="features", labelCol="label", torchObj=obj, iters=20, miniBatch=64, mode=mode, partitions=1
        ).fit(df)
        result.update(ok=True, error=None, steps=len(fitted.getTrainingHistory()), seconds=time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - the test reads what went wrong
        result.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}", steps=0, trace=traceback.format_exc()[-3000:])
    finally:
        if spark is not None:
            spark.stop()
        peak, failures = peak_and_failures(group, version)
        result.update(peak_bytes=peak, limit_hits=failures, cgroup=version)
        remove_cgroup(group)
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
