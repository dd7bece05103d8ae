"""One local Spark Connect server and client session for this folder's tests.

``SparkSession.builder.remote("local[N]")`` starts a Connect server inside this process (its own
JVM, with the Connect plugin) and returns a client session; a process that already holds a
classic session cannot start one. So these tests run in a pytest process of their own
(``make test-connect``; the root ``conftest.py`` leaves this folder out of other runs), and the
classic side of the cross-session tests runs in a subprocess (``classic_side.py``).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def connect():
    """A Connect client session on a local[2] server (2 task slots), shared by every test."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.remote("local[2]")
        .appName("sparktorch-connect-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def server_context(connect):
    """The SparkContext of the in-process Connect *server* (tests only: it shows which tasks
    run, through its status tracker; the library never touches it on Connect)."""
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    assert sc is not None
    return sc
