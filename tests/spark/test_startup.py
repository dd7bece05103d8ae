"""Start-up of a fit: Spark's Python workers fork from a daemon that has torch imported."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors

from nets import TwoLayer
from sparktorch import SparkTorch, serialize_torch_obj

pytestmark = pytest.mark.timeout(240)


def test_after_a_fit_python_workers_fork_with_torch_already_imported(spark):
    rows = [(Vectors.dense([float(i), 1.0]), float(i % 2)) for i in range(8)]
    df = spark.sparkContext.parallelize(rows, 2).toDF(["features", "label"])
    torch.manual_seed(0)
    obj = serialize_torch_obj(TwoLayer(2, 4, 2), nn.CrossEntropyLoss(), torch.optim.SGD, lr=0.1)
    SparkTorch(inputCol="features", labelCol="label", torchObj=obj, iters=2).fit(df)

    # Defined here: pickled by value (the workers cannot import this test module).
    def _worker_facts(batches):
        import os
        import sys

        import pyarrow as pa

        import pyspark.worker

        preloaded = "torch" in sys.modules
        source = pyspark.worker.__file__
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            parent = fh.read().replace(b"\0", b" ").decode()
        for _ in batches:
            pass
        yield pa.RecordBatch.from_pydict({"preloaded": [preloaded], "parent": [parent], "source": [source]})

    facts = spark.range(2, numPartitions=2).mapInArrow(
        _worker_facts, "preloaded boolean, parent string, source string"
    ).collect()
    assert all("sparktorch._daemon" in f["parent"] for f in facts), facts
    assert all(f["preloaded"] for f in facts), facts
    # pip's pyspark: Spark puts <pyspark>/python/lib/pyspark.zip first on the workers' path; the
    # daemon imports the same files from the installed package (compiled, cached) instead.
    import pyspark

    assert all(f["source"] == os.path.join(os.path.dirname(pyspark.__file__), "worker.py") for f in facts), facts


def _fake_install(root, py4j_version="0.10.9.9"):
    """site-packages with pyspark (and its python/lib zips) and py4j, as pip lays them out."""
    site = root / "site"
    lib = site / "pyspark" / "python" / "lib"
    lib.mkdir(parents=True)
    (site / "pyspark" / "__init__.py").write_text("")
    (site / "py4j").mkdir()
    (site / "py4j" / "__init__.py").write_text("")
    (site / "py4j" / "version.py").write_text(f"__version__ = '{py4j_version}'\n")
    for name in ("pyspark.zip", "py4j-0.10.9.9-src.zip"):
        (lib / name).write_bytes(b"")
    return site, lib


def test_only_zip_copies_of_the_installed_pyspark_and_py4j_are_dropped(tmp_path):
    from sparktorch._daemon import zip_copies_of_installed_packages

    site, lib = _fake_install(tmp_path)
    own = [str(lib / "pyspark.zip"), str(lib / "py4j-0.10.9.9-src.zip")]
    other_home = tmp_path / "spark" / "python" / "lib"  # a Spark installation of its own
    other_home.mkdir(parents=True)
    other = [str(other_home / "pyspark.zip"), str(other_home / "py4j-0.10.9.9-src.zip")]
    path = [*own, *other, str(tmp_path / "user.zip"), str(site)]
    assert zip_copies_of_installed_packages(path) == own
    # no pyspark installed outside a zip: nothing to prefer
    assert zip_copies_of_installed_packages([*own, str(tmp_path)]) == []


def test_a_py4j_zip_of_another_version_than_the_installed_one_stays(tmp_path):
    from sparktorch._daemon import zip_copies_of_installed_packages

    site, lib = _fake_install(tmp_path, py4j_version="0.10.9.7")
    path = [str(lib / "pyspark.zip"), str(lib / "py4j-0.10.9.9-src.zip"), str(site)]
    assert zip_copies_of_installed_packages(path) == [str(lib / "pyspark.zip")]


class _Conf:
    def __init__(self, values):
        self.values = dict(values)

    def contains(self, key):
        return key in self.values

    def get(self, key):
        return self.values[key]

    def set(self, key, value):
        self.values[key] = value


class _SC:
    def __init__(self, master, values):
        self.master = master
        self.conf = _Conf(values)
        outer = self

        class _JSC:
            def sc(self):
                class _Inner:
                    def conf(self):
                        return outer.conf

                return _Inner()

        self._jsc = _JSC()


def test_the_daemon_setting_of_the_user_is_kept_and_clusters_are_left_alone():
    from sparktorch._driver import DAEMON_MODULE, use_preloading_daemon

    mine = _SC("local[4]", {"spark.python.daemon.module": "pyspark.daemon"})
    assert use_preloading_daemon(mine) is False
    assert mine.conf.values["spark.python.daemon.module"] == "pyspark.daemon"
    cluster = _SC("spark://host:7077", {})
    assert use_preloading_daemon(cluster) is False and cluster.conf.values == {}
    local = _SC("local[*]", {})
    assert use_preloading_daemon(local) is True
    assert local.conf.values["spark.python.daemon.module"] == DAEMON_MODULE
