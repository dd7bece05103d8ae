"""The first ``transform`` of a session against the warm one, and the warm one against its bound.

In one fresh Spark session (``local[2]``): 100,000 rows x 784 uniform features cached as a
Vector column (as ``transform_cell.py``), then, forced with the ``noop`` sink:

1. ``cold``: the first ``SparkTorchModel.transform`` of the session (Python workers start,
   import torch, build the model);
2. ``warm``: the same again, best of ``--repeats``;
3. ``noop_udf``: Spark's own Arrow UDF path with a UDF that returns zeros (``vector_to_array``
   + Arrow to Python and back, no model), best of ``--repeats``;
4. ``torch``: the seed MLP over the same matrix in plain torch in this process, with as many
   threads as Spark runs tasks, batches of ``inferenceBatchSize``, best of ``--repeats``.

The bound of the warm transform is what the two costs add up to: ``1 / (1/noop_udf + 1/torch)``
rows/s. Reported: rows/s of each, ``cold_over_warm`` (time ratio) and ``warm_over_bound``.

    .venv/bin/python benchmarks/transform_cold.py [--rows 100000] [--json out.json] [--noop-first]

``--noop-first`` runs the no-op UDF first instead (cold, then warm), so its cold pass is the
session's first Python task: what any Python UDF pays at first (``noop_cold_over_warm``); both
then use the ``sparktorch._daemon`` worker daemon, set at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import seed_network  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--noop-first", action="store_true",
                    help="time the no-op UDF cold first (the session's first Python task): Spark's own cold cost")
    ap.add_argument("--daemon", help="spark.python.daemon.module to set at start-up (default: left to sparktorch; "
                    "with --noop-first: sparktorch._daemon)")
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import torch
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType

    import sparktorch
    from sparktorch.inference import create_spark_torch_model

    builder = (
        SparkSession.builder.master(args.master).appName("transform-cold")
        .config("spark.driver.memory", "4g").config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1").config("spark.ui.enabled", "false")
    )
    daemon = args.daemon or ("sparktorch._daemon" if args.noop_first else None)
    if daemon:  # one daemon for both (set at start-up, as on a cluster)
        builder = builder.config("spark.python.daemon.module", daemon)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    parts = spark.sparkContext.defaultParallelism
    torch.manual_seed(0)
    net = seed_network().eval()
    x = np.random.default_rng(0).random((args.rows, 784), dtype=np.float32)
    pdf = pd.DataFrame({"id": np.arange(args.rows), "arr": list(x.astype(np.float64))})
    # The input is built without any Python worker (Arrow from the driver, JVM-side conversion),
    # so that the first transform is the session's first Python task.
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    df = spark.createDataFrame(pdf).select("id", array_to_vector("arr").alias("features")).repartition(parts).cache()
    df.count()
    del pdf

    def timed(frame) -> float:
        t = time.perf_counter()
        frame.write.format("noop").mode("overwrite").save()
        return time.perf_counter() - t

    res: dict[str, float] = {}

    def ours() -> None:
        model = create_spark_torch_model(net, inputCol="features", predictionCol="predicted")
        out = model.transform(df).select("id", "predicted")
        res["cold_s"] = timed(out)
        res["warm_s"] = min(timed(out) for _ in range(args.repeats))

    if not args.noop_first:
        ours()

    # (Real classes as hints: this module postpones annotations, and the UDF type is read from them.)
    try:
        from pyspark.sql.pandas.functions import arrow_udf

        def zeros_arrow(arr: pa.Array) -> pa.Array:
            return pa.array(np.zeros(len(arr)), type=pa.float64())

        zeros_arrow.__annotations__ = {"arr": pa.Array, "return": pa.Array}
        zeros = arrow_udf(zeros_arrow, DoubleType())
    except ImportError:  # PySpark < 4.1: the pandas UDF that our transform uses there
        from pyspark.sql.functions import pandas_udf

        def zeros_pandas(s: pd.Series) -> pd.Series:
            return pd.Series(np.zeros(len(s)))

        zeros_pandas.__annotations__ = {"s": pd.Series, "return": pd.Series}
        zeros = pandas_udf(zeros_pandas, DoubleType())

    noop = df.select("id", zeros(F.when(F.col("features").isNotNull(), vector_to_array("features", "float32"))).alias("predicted"))
    noop_cold = timed(noop)
    if args.noop_first:
        res["noop_udf_cold_s"] = noop_cold
    res["noop_udf_s"] = min(timed(noop) for _ in range(args.repeats))
    if args.noop_first:
        ours()

    threads = torch.get_num_threads()
    torch.set_num_threads(parts)
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, args.rows, 1024):
                net(torch.from_numpy(x[i : i + 1024])).argmax(1)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(threads)
    res["torch_s"] = best
    spark.stop()

    rate = {k[: -len("_s")]: args.rows / v for k, v in res.items()}
    bound = 1.0 / (1.0 / rate["noop_udf"] + 1.0 / rate["torch"])
    report = {
        "rows": args.rows, "master": args.master, "daemon": daemon, "partitions": parts, "sparktorch": os.path.dirname(sparktorch.__file__),
        "seconds": {k: round(v, 2) for k, v in res.items()},
        "rows_per_s": {**{k: round(v) for k, v in rate.items()}, "bound": round(bound)},
        "cold_over_warm": round(res["cold_s"] / res["warm_s"], 2),
        "warm_over_bound": round(rate["warm"] / bound, 2),
        **({"noop_cold_over_warm": round(res["noop_udf_cold_s"] / res["noop_udf_s"], 2)} if args.noop_first else {}),
        "loadavg": os.getloadavg()[0],
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
