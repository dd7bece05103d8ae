"""The seed program end to end, under either venv: fit wall time and held-out accuracy.

    python benchmarks/e2e_fit.py --side ours|upstream --mode hogwild|async|synchronous \
        --iters 10,50 --out results.jsonl [--rep N]

One Spark session (``local[4]``, loopback, as the seed program) runs one fit per ``--iters``
value: the seed's pipeline (``VectorAssembler`` over the 784 pixel columns of
``examples/data/mnist_train.csv``, 8,000 rows, then ``SparkTorch`` with ``partitions=4``,
``useBarrier=True``, Adam lr 1e-4, the seed's MLP). The fit is timed from ``Pipeline.fit`` to its
return, CSV read included (the DataFrame is not cached, as in the seed). The fitted network is then
read back (``getPytorchModel()``) and scored on the 2,000 held-out rows of ``mnist_test.csv`` in
plain torch, the same way for both sides.

Time to accuracy: while a fit runs, a driver thread copies the parameter server's parameters
every ``--snapshot-every`` seconds (ours: ``ParameterServer.parameters()`` of the server the
estimator starts, reached by wrapping ``sparktorch._native.ParameterServer``; upstream hogwild:
``GET /parameters`` on its Flask server, the request its workers make), and after the fit every
copy is scored on the held-out rows: accuracy against seconds since ``Pipeline.fit`` was called.
Upstream's synchronous mode has no server to copy from (only its final point exists).

Modes: ours ``hogwild`` (``acquireLock=False``: lock-free), ``async`` (``mode='hogwild',
acquireLock=True``) and ``synchronous``; upstream ``hogwild`` (its default ``acquireLock=True``)
and ``synchronous`` (torch.distributed, gloo, barrier).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    TEST_CSV,
    TRAIN_CSV,
    accuracy,
    append_jsonl,
    free_port,
    load_csv,
    seed_network,
    setup_logging,
)

log = logging.getLogger("bench.e2e")


class Snapshots:
    """Copies of the parameters taken every ``every`` seconds by a daemon thread."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.t0 = time.perf_counter()
        self.items: list[tuple[float, Any, int]] = []  # (seconds since t0, params, version or -1)
        self.stop_flag = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, take: Any) -> None:
        def loop() -> None:
            while not self.stop_flag.is_set():
                try:
                    got = take()
                except Exception:  # noqa: BLE001 - server not up yet / already stopped
                    got = None
                if got is not None:
                    self.items.append((time.perf_counter() - self.t0, got[0], got[1]))
                self.stop_flag.wait(self.every)

        self.thread = threading.Thread(target=loop, name="bench-snapshots", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(timeout=30)


def hook_ours(snap_holder: dict[str, Any]) -> None:
    """Wrap ``sparktorch._native.ParameterServer`` so each server the estimator starts gets a
    snapshot thread (benchmark-side only; the library is unchanged)."""
    from sparktorch import _native

    real = _native.ParameterServer

    def factory(*args: Any, **kwargs: Any) -> Any:
        server = real(*args, **kwargs)
        snap_holder["server"] = server
        snaps: Snapshots = snap_holder["current"]
        snaps.start(lambda: (server.parameters(), int(server.version())) if server.running else None)
        return server

    _native.ParameterServer = factory  # type: ignore[misc]


def poll_upstream(snaps: Snapshots, port: int) -> None:
    import socket

    import dill
    import requests

    up = {"yes": False}

    def take() -> Any:
        # Until the server listens, probe with a bare socket: its server is forked from this
        # process, and a fork while this thread holds a lock inside requests/urllib3 could leave
        # the child deadlocked.
        if not up["yes"]:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                up["yes"] = True
        r = requests.get(f"http://127.0.0.1:{port}/parameters", timeout=5)
        return dill.loads(r.content), -1

    snaps.start(take)


def score_curve(snaps: Snapshots, x_test: Any, y_test: Any, max_points: int = 80) -> list[list[float]]:
    import torch

    items = snaps.items
    if len(items) > max_points:
        stride = len(items) / max_points
        items = [items[int(i * stride)] for i in range(max_points)] + [items[-1]]
    curve = []
    for t, params, version in items:
        torch.manual_seed(0)
        net = seed_network()
        if isinstance(params, dict):
            net.load_state_dict(params)
        else:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), net.parameters())
        curve.append([round(t, 3), accuracy(net, x_test, y_test), version])
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["ours", "upstream"], required=True)
    ap.add_argument("--mode", choices=["hogwild", "async", "synchronous"], required=True)
    ap.add_argument("--iters", default="50")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--snapshot-every", type=float, default=0.5, help="seconds; 0: no time-to-accuracy curve")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    setup_logging()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    import torch
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.pipeline import Pipeline
    from pyspark.sql import SparkSession
    from torch import nn

    base = {"side": args.side, "mode": args.mode, "rep": args.rep, "partitions": args.partitions}
    compat: Any = None
    if args.side == "upstream":
        import upstream_compat as uc

        compat = uc
        uc.apply_loopback()
        if args.mode == "async":
            raise SystemExit("upstream has no 'async' mode name (its hogwild with acquireLock=True is it)")
    from sparktorch import SparkTorch, serialize_torch_obj

    snap_holder: dict[str, Any] = {}
    if args.side == "ours" and args.snapshot_every > 0:
        hook_ours(snap_holder)

    x_test, y_test = load_csv(TEST_CSV)
    t0 = time.perf_counter()
    spark = (
        SparkSession.builder.appName("bench-e2e").master(f"local[{args.partitions}]")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", str(args.partitions))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    session_s = time.perf_counter() - t0
    try:
        for index, iters in enumerate(int(i) for i in args.iters.split(",")):
            # The first fit of a session is "cold" (Python workers start, torch is imported in them);
            # later fits in the same session reuse the warm workers.
            rec: dict[str, Any] = {**base, "iters": iters, "session_start_s": session_s, "fit_index": index, "cold": index == 0}
            try:
                torch.manual_seed(0)
                network = seed_network()
                kwargs = dict(model=network, criterion=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, lr=0.0001)
                torch_obj = compat.serialize(serialize_torch_obj, **kwargs) if compat else serialize_torch_obj(**kwargs)
                df = spark.read.option("inferSchema", "true").csv(str(TRAIN_CSV)).coalesce(args.partitions)
                va = VectorAssembler(inputCols=df.columns[1:785], outputCol="features")
                est_kwargs: dict[str, Any] = dict(
                    inputCol="features", labelCol="_c0", predictionCol="predictions", torchObj=torch_obj,
                    iters=iters, partitions=args.partitions, verbose=0, useBarrier=True,
                )
                if args.mode == "synchronous":
                    est_kwargs["mode"] = "synchronous"
                else:
                    est_kwargs["mode"] = "hogwild"
                    est_kwargs["acquireLock"] = args.mode == "async" or args.side == "upstream"
                    est_kwargs["port"] = free_port()
                est = SparkTorch(**est_kwargs)
                snaps = Snapshots(args.snapshot_every)
                snap_holder["current"] = snaps
                if args.side == "upstream" and args.mode == "hogwild" and args.snapshot_every > 0:
                    poll_upstream(snaps, est_kwargs["port"])
                t1 = time.perf_counter()
                snaps.t0 = t1
                try:
                    fitted = Pipeline(stages=[va, est]).fit(df)
                    rec["fit_s"] = time.perf_counter() - t1
                finally:
                    snaps.stop()
                net = fitted.stages[-1].getPytorchModel()
                rec["accuracy"] = accuracy(net, x_test, y_test)
                server = snap_holder.pop("server", None)
                if server is not None:
                    try:
                        st = server.stats()
                        rec["server_stats"] = {k: st.get(k) for k in ("updates", "duplicates", "staleness_mean", "staleness_max", "workers_lost")}
                    except Exception as exc:  # noqa: BLE001 - optional diagnostics
                        rec["server_stats"] = {"error": repr(exc)[:200]}
                if snaps.items:
                    rec["curve"] = score_curve(snaps, x_test, y_test) + [[round(rec["fit_s"], 3), rec["accuracy"], -2]]
                    rec["snapshots"] = len(snaps.items)
                rec["ok"] = True
                log.info("%s %s iters=%d: fit %.1fs accuracy %.4f", args.side, args.mode, iters, rec["fit_s"], rec["accuracy"])
            except Exception as exc:  # noqa: BLE001 - the failure text is a result
                rec["ok"] = False
                rec["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
                rec["traceback"] = traceback.format_exc()[-4000:]
                log.error("%s %s iters=%d failed: %s", args.side, args.mode, iters, rec["error"][:500])
            if compat:
                rec["upstream_compat"] = compat.report()
            append_jsonl(args.out, rec)
            if not rec["ok"]:
                break
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
