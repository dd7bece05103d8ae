"""Shared test fixtures: one local SparkSession for the whole run (start-up costs ~8 s)."""

from __future__ import annotations

import os
import sys

import pytest

# Spark's Python workers must run this interpreter (the venv), not whatever `python3` is first
# on PATH; set before any SparkContext exists.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
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
