"""A driver that dies mid-fit: run by tests/faults/test_resume.py.

Usage: ``python killed_driver.py CHECKPOINT_DIR KILL_AT``. Fits the model of
``test_resume.py`` for 50 synchronous steps, writing a checkpoint every 5 steps, and kills its
own process (SIGKILL: no cleanup, the local Spark JVM dies with it) as soon as a checkpoint of
at least KILL_AT steps exists.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from pyspark.sql import SparkSession  # noqa: E402

from resume_case import estimator, frame  # noqa: E402
from sparktorch import _native  # noqa: E402


def watch(ckpt_dir: Path, kill_at: int) -> None:
    path = ckpt_dir / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if path.exists():
            try:
                version = int(_native.read_checkpoint(str(path))["version"])
            except Exception:  # noqa: BLE001 - being replaced right now: look again
                version = -1
            if version >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)
    os._exit(3)  # the checkpoint never came: fail loudly


def main(ckpt_dir: str, kill_at: int) -> None:
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    threading.Thread(target=watch, args=(Path(ckpt_dir), kill_at), daemon=True).start()
    estimator(checkpointPath=ckpt_dir, checkpointInterval=5).fit(frame(spark))
    os._exit(4)  # finished without being killed: the test must notice


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
