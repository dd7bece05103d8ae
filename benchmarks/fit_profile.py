"""Where the first seconds of a real seed-program fit go, stage by stage, from one fresh session.

Runs the seed program's ``Pipeline.fit`` (``VectorAssembler`` + ``SparkTorch``, ``partitions=4``,
``useBarrier=True``, ``local[4]``, MNIST CSV as in ``benchmarks/e2e_fit.py``) ``--fits`` times in
one Spark session (the first is cold: Python workers start and import torch; later ones are warm)
and reports, for each fit, times from the call to ``Pipeline.fit``:

* every Spark stage of the fit's jobs: submitted, first task launched, completed (Spark's status
  store), its tasks, and the sum of their executor run time;
* from the parameter server (polled every 20 ms): the first worker connected, all workers
  connected, the first update applied (the parameters first change), the last update;
* the fit's return.

    .venv/bin/python benchmarks/fit_profile.py --fits 2 [--out results.jsonl] [--label NAME]

With ``PYTHONPATH`` pointing at another checkout's ``python/`` the same script profiles that
code, which is how before/after numbers of a start-up change are taken side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TRAIN_CSV, append_jsonl, seed_network, setup_logging  # noqa: E402

log = logging.getLogger("bench.fit_profile")


class ServerWatch:
    """Polls the fit's parameter server: when workers connect and updates start and end."""

    def __init__(self) -> None:
        self.server: Any = None
        self.marks: dict[str, float] = {}
        self.t0 = 0.0
        self.stop = threading.Event()

    def hook(self) -> None:
        from sparktorch import _native

        real = _native.ParameterServer
        watch = self

        def factory(*args: Any, **kwargs: Any) -> Any:
            server = real(*args, **kwargs)
            watch.server = server
            watch.marks["server started"] = time.perf_counter() - watch.t0
            threading.Thread(target=watch.poll, args=(server, kwargs.get("num_workers", 1)), daemon=True).start()
            return server

        _native.ParameterServer = factory  # type: ignore[misc]

    def poll(self, server: Any, workers: int) -> None:
        while not self.stop.is_set() and server.running:
            try:
                st = server.stats()
            except Exception:  # noqa: BLE001 - stopped
                return
            now = time.perf_counter() - self.t0
            live = int(st.get("connections", 0)) + int(st.get("workers_done", 0))
            if live > 0:
                self.marks.setdefault("first worker connected", now)
            if live >= workers:
                self.marks.setdefault("all workers connected", now)
            if int(st.get("updates", 0)) > 0:
                self.marks.setdefault("parameters first change", now)
                self.marks["last update seen"] = now
            time.sleep(0.02)


def stage_table(sc: Any, since_ms: int, t0_wall: float) -> list[dict[str, Any]]:
    """Every stage submitted after ``since_ms`` (epoch ms), times relative to ``t0_wall``."""
    store = sc._jsc.sc().statusStore()
    everything = sc._jvm.java.util.ArrayList()  # empty: no status filter
    quantiles = getattr(store, "stageList$default$4")()
    stages = store.stageList(everything, False, False, quantiles, everything)
    out = []
    for i in range(stages.size()):
        s = stages.apply(i)

        def at(opt: Any) -> float | None:
            return None if opt.isEmpty() else round(opt.get().getTime() / 1000.0 - t0_wall, 2)

        sub = s.submissionTime()
        if sub.isEmpty() or sub.get().getTime() < since_ms:
            continue
        out.append({
            "stage": s.stageId(), "name": s.name()[:60], "tasks": s.numTasks(), "status": str(s.status()),
            "submitted": at(sub), "first_task": at(s.firstTaskLaunchedTime()), "completed": at(s.completionTime()),
            "run_s_sum": round(s.executorRunTime() / 1000.0, 2),
        })
    return sorted(out, key=lambda r: r["stage"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fits", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    setup_logging()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    import torch
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.pipeline import Pipeline
    from pyspark.sql import SparkSession
    from torch import nn

    import sparktorch
    from sparktorch import SparkTorch, serialize_torch_obj

    watch = ServerWatch()
    watch.hook()
    t_session = time.perf_counter()
    spark = (
        SparkSession.builder.appName("fit-profile").master("local[4]")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    session_s = time.perf_counter() - t_session
    sc = spark.sparkContext
    try:
        for index in range(args.fits):
            torch.manual_seed(0)
            obj = serialize_torch_obj(model=seed_network(), criterion=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, lr=0.0001)
            df = spark.read.option("inferSchema", "true").csv(str(TRAIN_CSV)).coalesce(4)
            va = VectorAssembler(inputCols=df.columns[1:785], outputCol="features")
            est = SparkTorch(inputCol="features", labelCol="_c0", predictionCol="predictions", torchObj=obj,
                             iters=args.iters, partitions=4, verbose=0, useBarrier=True)
            watch.marks = {}
            watch.stop.clear()
            since_ms = int(time.time() * 1000)
            t0_wall = time.time()
            watch.t0 = time.perf_counter()
            Pipeline(stages=[va, est]).fit(df)
            fit_s = time.perf_counter() - watch.t0
            watch.stop.set()
            rec = {
                "label": args.label, "sparktorch": os.path.dirname(sparktorch.__file__), "fit_index": index,
                "cold": index == 0, "session_start_s": round(session_s, 2), "fit_s": round(fit_s, 2),
                "marks": {k: round(v, 2) for k, v in sorted(watch.marks.items(), key=lambda kv: kv[1])},
                "stages": stage_table(sc, since_ms, t0_wall),
                "loadavg": os.getloadavg()[0],
            }
            log.info("%s fit %d: %.2f s, parameters first change at %s s", args.label, index, fit_s,
                     rec["marks"].get("parameters first change"))
            for st in rec["stages"]:
                log.info("  stage %(stage)d %(tasks)d tasks: submitted %(submitted)s first task %(first_task)s "
                         "completed %(completed)s (run %(run_s_sum)s s) %(name)s", st)
            log.info("  server: %s", rec["marks"])
            if args.out:
                append_jsonl(args.out, rec)
            else:
                print(json.dumps(rec))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
