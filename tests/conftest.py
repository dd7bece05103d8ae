"""Shared test fixtures: one local SparkSession for the whole run (start-up costs ~8 s)."""

from __future__ import annotations

import os
import sys

import pytest

# Spark's Python workers must run this interpreter (the venv), not whatever `python3` is first
# on PATH; set before any SparkContext exists.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# Spark's Python workers import test helper modules (tests/nets.py) by name: put tests/ on their
# path. The JVM, and the workers it forks, inherit this environment when the session starts.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
# tests/connect starts a Spark Connect server in its own pytest process (`make test-connect`), as
# a process holding a classic session cannot start one: other runs leave that folder out.
collect_ignore = [] if os.environ.get("SPARKTORCH_CONNECT_TESTS") == "1" else ["connect"]
# Keep torch from oversubscribing the 2-core test machines (Spark runs several tasks at once).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def spark():
    """A local[4] SparkSession shared by every test; stopped at the end of the run."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[4]")
        .appName("sparktorch-tests")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
