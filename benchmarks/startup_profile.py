"""Where the start-up of a seed-program fit goes, stage by stage (no training).

Runs, in one local[4] session on the bundled MNIST CSV, the data path of a fit with tasks that
do nothing but count rows:

1. ``noop (cold)``: CSV parse + VectorAssembler + vector_to_array + repartition + Arrow to Python,
   the first time in the session (JVM code generation and JIT included);
2. ``noop (warm)``: the same again;
3. ``import torch``: the same, with each task also importing torch and sparktorch (as a training
   task does); the tasks report their import time;
4. ``no repartition``: step 2 without the repartition shuffle.

Usage: ``.venv/bin/python benchmarks/startup_profile.py`` (after ``make setup``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
sys.path.insert(0, str(ROOT / "examples"))

from prepare_mnist import prepare  # noqa: E402
from pyspark.ml.feature import VectorAssembler  # noqa: E402
from pyspark.ml.functions import vector_to_array  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

log = logging.getLogger("bench.startup")


def count_rows(batches):
    import pyarrow as pa

    n = sum(b.num_rows for b in batches)
    yield pa.RecordBatch.from_pydict({"n": [n], "import_s": [0.0]})


def import_and_count(batches):
    t = time.perf_counter()
    import pyarrow as pa
    import torch  # noqa: F401

    import sparktorch  # noqa: F401

    took = time.perf_counter() - t
    n = sum(b.num_rows for b in batches)
    yield pa.RecordBatch.from_pydict({"n": [n], "import_s": [took]})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_csv, _ = prepare()
    spark = SparkSession.builder.master("local[4]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    df = spark.read.option("inferSchema", "true").csv(str(train_csv)).coalesce(4)
    asm = VectorAssembler(inputCols=df.columns[1:785], outputCol="features")
    schema = "n long, import_s double"
    for name, fn, shuffle in [
        ("noop (cold)", count_rows, True),
        ("noop (warm)", count_rows, True),
        ("import torch", import_and_count, True),
        ("no repartition", count_rows, False),
    ]:
        t = time.perf_counter()
        frame = asm.transform(df).select(vector_to_array("features", "float32").alias("features"), "_c0")
        if shuffle:
            frame = frame.repartition(4)
        rows = frame.mapInArrow(fn, schema).collect()
        imports = max(r["import_s"] for r in rows)
        log.info("%-16s %5.2f s (rows %d, slowest task import %.2f s)", name, time.perf_counter() - t, sum(r["n"] for r in rows), imports)
    spark.stop()


if __name__ == "__main__":
    main()
