"""Transform throughput of the *installed* package's ``create_spark_torch_model(...).transform``,
under either venv, so sparktorch 0.2.0's own row-at-a-time UDF is measured (not a re-creation).

    python benchmarks/transform_cell.py --side ours|upstream --rows 100000 --out results.jsonl

Same input as ``benchmarks/transform_bench.py`` (which owns the detailed inference benchmark of
our side): the seed MLP (``torch.manual_seed(0)``) over ``--rows`` rows of 784 uniform [0, 1)
features, a cached DataFrame of ``id`` + ML ``Vector`` split into the master's parallelism; the
prediction column is forced with the ``noop`` sink. Untimed warm-up on a 2% sample of every
partition first (every Python worker started, model loaded), then one timed full pass; a checksum (sum of the
predicted classes) is recorded so both sides can be seen to compute the same thing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, seed_network, setup_logging

log = logging.getLogger("bench.transform")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["ours", "upstream"], required=True)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    setup_logging()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    import numpy as np
    import pandas as pd
    import torch
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    if args.side == "upstream":
        import upstream_compat as uc

        uc.apply_loopback()
    from sparktorch.inference import create_spark_torch_model

    spark = (
        SparkSession.builder.master(args.master).appName("bench-transform")
        .config("spark.driver.memory", "4g").config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1").config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true").getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    parts = spark.sparkContext.defaultParallelism
    rec: dict[str, Any] = {"side": args.side, "rows": args.rows, "master": args.master, "partitions": parts, "rep": args.rep}
    try:
        torch.manual_seed(0)
        net = seed_network().eval()
        x = np.random.default_rng(0).random((args.rows, 784), dtype=np.float32)
        pdf = pd.DataFrame({"id": np.arange(args.rows), "arr": list(x.astype(np.float64))})
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
        df = spark.createDataFrame(pdf).select("id", array_to_vector("arr").alias("features")).repartition(parts).cache()
        df.count()
        del pdf
        model = create_spark_torch_model(net, inputCol="features", predictionCol="predicted")
        # Warm-up over ~2% of every partition (sample keeps the partitioning), so that each Python
        # worker has started, imported torch and loaded the model before the timed pass.
        warm = model.transform(df.sample(fraction=0.02, seed=1)).select("id", "predicted")
        warm.write.format("noop").mode("overwrite").save()
        out = model.transform(df).select("id", "predicted")
        t0 = time.perf_counter()
        out.write.format("noop").mode("overwrite").save()
        rec["transform_s"] = time.perf_counter() - t0
        rec["rows_per_s"] = args.rows / rec["transform_s"]
        rec["checksum"] = float(out.agg(F.sum("predicted")).collect()[0][0])
        with torch.inference_mode():
            rec["expected_checksum"] = float(net(torch.from_numpy(x)).argmax(1).sum())
        rec["ok"] = True
        log.info("%s: %d rows in %.1fs = %.0f rows/s", args.side, args.rows, rec["transform_s"], rec["rows_per_s"])
    except Exception as exc:  # noqa: BLE001 - the failure text is a result
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        rec["traceback"] = traceback.format_exc()[-4000:]
        log.error("%s transform failed: %s", args.side, rec["error"][:500])
    if args.side == "upstream":
        rec["upstream_compat"] = uc.report()
    append_jsonl(args.out, rec)
    spark.stop()


if __name__ == "__main__":
    main()
