"""Transform throughput of SparkTorchModel against a row-at-a-time UDF and plain torch.

Workload: the seed MLP (Linear 784-256, ReLU, 256-256, ReLU, 256-10, Softmax) over ROWS rows of
784 float features. Three numbers, rows per second:

* ``sparktorch``  -- ``SparkTorchModel.transform`` (Arrow UDF, model cached per worker);
* ``row_udf``     -- what sparktorch 0.2.0 did: a Python UDF called once per row with the
  model in a broadcast variable (re-implemented here; the upstream package is not needed);
* ``ceiling``     -- plain batched torch over the same numpy matrix in this one process.

The Spark numbers force the prediction column with the ``noop`` sink over a cached input, so
data generation and caching are not timed. Run::

    .venv/bin/python benchmarks/transform_bench.py --rows 100000 --master 'local[2]'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

FEATURES = 784


def seed_mlp(kind: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":  # tiny compute: shows the data path's own cost
        return nn.Sequential(nn.Linear(FEATURES, 10), nn.Softmax(dim=1)).eval()
    return nn.Sequential(
        nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10), nn.Softmax(dim=1),
    ).eval()


def ceiling(net: nn.Module, x: np.ndarray, batch: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, x.shape[0], batch):
                net(torch.from_numpy(x[i : i + batch])).argmax(1)
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--partitions", type=int, default=0, help="0: the master's parallelism")
    ap.add_argument("--batch", type=int, default=1024, help="inferenceBatchSize")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for fast variants")
    ap.add_argument("--model", choices=["mlp", "linear"], default="mlp",
                    help="mlp: the seed network; linear: 784-10 softmax regression")
    ap.add_argument("--skip-row-udf", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType

    from sparktorch.inference import create_spark_torch_model

    spark = (
        SparkSession.builder.master(args.master)
        .appName("transform-bench")
        .config("spark.driver.memory", "4g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    parts = args.partitions or spark.sparkContext.defaultParallelism
    net = seed_mlp(args.model)

    # Input: the same matrix for every variant (uniform [0, 1), like scaled MNIST pixels).
    rng = np.random.default_rng(0)
    x = rng.random((args.rows, FEATURES), dtype=np.float32)
    import pandas as pd

    pdf = pd.DataFrame({"id": np.arange(args.rows), "arr": list(x.astype(np.float64))})
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    df = (
        spark.createDataFrame(pdf)
        .select("id", array_to_vector("arr").alias("features"))
        .repartition(parts)
        .cache()
    )
    df.count()
    del pdf

    def timed(frame, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            frame.write.format("noop").mode("overwrite").save()
            best = min(best, time.perf_counter() - start)
        return args.rows / best

    results: dict[str, float] = {}
    model = create_spark_torch_model(net, inferenceBatchSize=args.batch)
    out = model.transform(df).select("id", "predicted")
    timed(out, 1)  # warm the Python workers (and their model cache)
    results["sparktorch"] = timed(out, args.repeats)

    if not args.skip_row_udf:
        bc = spark.sparkContext.broadcast(net)

        def predict_row(v):  # type: ignore[no-untyped-def]  # sparktorch 0.2.0's approach
            m = bc.value
            m.eval()
            features = torch.from_numpy(v.toArray().reshape((1, len(v)))).float()
            raw = m(features).detach().numpy().flatten()
            return float(np.argmax(raw)) if len(raw) > 1 else float(raw[0])

        row = df.select("id", F.udf(predict_row, DoubleType())("features").alias("predicted"))
        results["row_udf"] = timed(row, 1)

    torch_threads = torch.get_num_threads()
    results["ceiling"] = ceiling(net, x, args.batch, args.repeats)
    spark.stop()

    report = {
        "model": args.model,
        "rows": args.rows,
        "master": args.master,
        "partitions": parts,
        "inferenceBatchSize": args.batch,
        "rows_per_s": {k: round(v) for k, v in results.items()},
        "sparktorch_vs_row_udf": round(results["sparktorch"] / results["row_udf"], 1)
        if "row_udf" in results
        else None,
        "ceiling_vs_sparktorch": round(results["ceiling"] / results["sparktorch"], 2),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_ceiling": torch_threads,
        "pyspark": spark.version if hasattr(spark, "version") else "",
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
