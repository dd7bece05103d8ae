"""sparktorch beside Spark's own TorchDistributor, the tool a PySpark user would otherwise pick.

    .venv/bin/python benchmarks/vs_torch_distributor.py [--reps 2] [--seed-steps 50] [--big-steps 5]
    make bench-peer

Sides, each one fresh process per measurement, the order alternating between repetitions, all on
``local[2]``-sized resources (2 training processes, one torch thread each; plain torch: one
process with torch's default threads):

- ``td``: ``TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(td_train, ...)``
  -- two Spark barrier tasks, each running ``torchrun`` for one rank; DDP over gloo; rank ``r``
  reads the training CSV (pandas) and keeps rows ``r::2``; Adam, full-batch steps on its share;
  rank 0 returns the final ``state_dict`` (it travels back through Spark, as TorchDistributor
  returns a function's value);
- ``sync``: ``SparkTorch(mode='synchronous', partitions=2, iters=N, useBarrier=True)``;
- ``hogwild``: ``mode='hogwild', acquireLock=False`` (lock-free);
- ``async``: ``mode='hogwild', acquireLock=True``;
- ``plain``: the same full-batch steps on all rows in one process (reference, no Spark).

Our sides read a DataFrame of the same CSV (explicit integer schema, so nothing runs before the
fit) through the seed's ``VectorAssembler``; the DataFrame is not cached. Every side builds its
network after ``torch.manual_seed(0)`` (the same init), uses CrossEntropyLoss on the Softmax
output and Adam lr 1e-4, and runs the same number of full-batch steps per worker. Workloads: the
seed program (784-256-256-10, 0.27M values) and ``mlp([2000, 1700])`` (4.99M values).

Measured (``time.time()``, one host, so rank and driver clocks agree):

- ``first_step_s``: from the ``.run``/``.fit`` call to the first optimizer step applied (td: rank
  0's timestamp right after its first ``opt.step()``; ours: a driver thread polling the
  parameter server's ``version()`` every 10 ms; plain: from the start of its CSV read);
- ``fit_s``: from the ``.run``/``.fit`` call to its return (plain: CSV read + steps);
- ``accuracy``: the returned network on the 2,000 held-out rows, in plain torch, after timing;
- ``time_to_target_s``: from the call to the first snapshot whose held-out accuracy reaches the
  workload's target (TorchDistributor's final accuracy - 0.01, median of the repetitions).
  Snapshots: td: rank 0 ``torch.save``s its weights every ``grid`` steps (inside the timed run);
  ours: the polling thread copies ``parameters()`` every ``grid`` rounds (synchronous) or
  ``2 x grid`` pushes (2 workers); plain: in-memory copies. Scored after the run.
- the crash probe (``--crash``): rank / partition 1 raises at its step 5 (td: inside
  ``td_train``; ours: a criterion that raises in partition 1 at its 5th call) -- what ``.run`` /
  ``.fit`` does, how long it takes, bounded by a timeout that kills the process group.

Output: ``<out>/peer.json`` (every record + the summary) and ``<out>/table.md``; job logs under
``benchmarks/out/peer/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402 - stdlib-only module
    OUR_PY,
    ROOT,
    TEST_CSV,
    TRAIN_CSV,
    WORK,
    accuracy,
    free_port,
    num_params,
    read_jsonl,
    run_bounded,
    setup_logging,
)

log = logging.getLogger("bench.peer")

WORKLOADS: dict[str, list[int]] = {"seed": [256, 256], "5M": [2000, 1700]}
SIDES = ("td", "sync", "hogwild", "async", "plain")
SIDE_NAMES = {
    "td": "TorchDistributor (DDP, gloo)",
    "sync": "ours: synchronous",
    "hogwild": "ours: hogwild lock-free",
    "async": "ours: async (hogwild + lock)",
    "plain": "plain torch, 1 process",
}
CRASH_STEP = 5


# ---------------------------------------------------------------- shared (pickled by value)


def build_mlp(hidden: list[int]) -> Any:
    """common.mlp, repeated here so that the TorchDistributor ranks (which import nothing from
    benchmarks/) get it by value with ``td_train``."""
    from torch import nn

    layers: list[Any] = []
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers += [nn.Linear(width, 10), nn.Softmax(dim=1)]
    return nn.Sequential(*layers)


def td_train(hidden: list[int], steps: int, grid: int, train_csv: str, snap_dir: str, crash_step: int) -> Any:
    """One TorchDistributor rank: DDP over gloo, full-batch Adam on rows ``rank::world``."""
    import time

    t_enter = time.time()
    import numpy as np
    import pandas as pd
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    arr = pd.read_csv(train_csv, header=None, dtype=np.float32).to_numpy()
    x = torch.from_numpy(np.ascontiguousarray(arr[rank::world, 1:]))
    y = torch.from_numpy(arr[rank::world, 0].astype(np.int64))
    torch.manual_seed(0)
    net = build_mlp(hidden)
    model = DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=0.0001)
    loss_fn = nn.CrossEntropyLoss()
    t_ready = time.time()
    step_times: list[float] = []
    snaps: list[list[Any]] = []
    for step in range(1, steps + 1):
        if crash_step and rank == 1 and step == crash_step:
            raise RuntimeError(f"injected crash: rank {rank} at step {step}")
        model.train()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        step_times.append(time.time())
        if rank == 0 and step % grid == 0 and step < steps:
            path = f"{snap_dir}/td_step{step}.pt"
            torch.save(net.state_dict(), path)
            snaps.append([step_times[-1], step, path])
    info = {"t_enter": t_enter, "t_ready": t_ready, "step_times": step_times, "snaps": snaps,
            "torch_threads": torch.get_num_threads(), "rows": int(x.shape[0])}
    state = {k: v.detach().clone() for k, v in net.state_dict().items()} if rank == 0 else None
    dist.destroy_process_group()
    return {"state": state, "info": info} if rank == 0 else None


try:  # our crash probe's criterion: a class of this module, pickled by value with the torchObj
    from torch import nn as _nn

    class CrashingLoss(_nn.CrossEntropyLoss):
        """CrossEntropyLoss that raises in partition 1 at its ``crash_step``-th call of a task
        attempt; with a ``marker`` path (persistent), every later attempt raises at its first call."""

        def __init__(self, crash_step: int, marker: str = "") -> None:
            super().__init__()
            self.crash_step = crash_step
            self.marker = marker
            self.calls = 0

        def forward(self, input: Any, target: Any) -> Any:  # noqa: A002 - torch's names
            from pyspark import BarrierTaskContext, TaskContext

            # a barrier task's context is set on BarrierTaskContext only
            ctx = TaskContext.get() or getattr(BarrierTaskContext, "_taskContext", None)
            if ctx is not None and ctx.partitionId() == 1:
                self.calls += 1
                if self.calls >= self.crash_step or (self.marker and os.path.exists(self.marker)):
                    if self.marker:
                        Path(self.marker).touch()
                    raise RuntimeError(f"injected crash: partition 1 at call {self.calls} of this attempt")
            return super().forward(input, target)
except ImportError:  # the orchestrator imports no torch
    CrashingLoss = None  # type: ignore[assignment,misc]


# ---------------------------------------------------------------- one side (child process)


def spark_session() -> Any:
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.appName("bench-peer").master("local[2]")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def score(hidden: list[int], states: list[tuple[float, int, Any]], x_test: Any, y_test: Any) -> list[list[float]]:
    """[[seconds since the call, held-out accuracy, step], ...] of (t, step, state_dict | flat)."""
    import numpy as np
    import torch

    curve = []
    for t, step, state in states:
        net = build_mlp(hidden)
        if isinstance(state, np.ndarray):
            torch.nn.utils.vector_to_parameters(torch.from_numpy(state.copy()), net.parameters())
        else:
            net.load_state_dict(state)
        curve.append([round(t, 3), accuracy(net, x_test, y_test), step])
    return curve


def side_td(args: argparse.Namespace, rec: dict[str, Any], x_test: Any, y_test: Any) -> None:
    import tempfile

    import torch
    from pyspark.ml.torch.distributor import TorchDistributor

    hidden = WORKLOADS[args.workload]
    snap_dir = tempfile.mkdtemp(prefix="peer-td-", dir=str(WORK))
    dist = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False)
    t_call = time.time()
    try:
        out = dist.run(td_train, hidden, args.steps, args.grid, str(TRAIN_CSV), snap_dir, args.crash_step)
    finally:
        rec["fit_s"] = time.time() - t_call
    info = out["info"]
    st = info["step_times"]
    rec["first_step_s"] = st[0] - t_call
    rec["rank_enter_s"] = info["t_enter"] - t_call  # the rank's Python function starts
    rec["rank_ready_s"] = info["t_ready"] - t_call  # process group, rows, DDP model ready
    rec["step_s"] = (st[-1] - st[0]) / max(1, len(st) - 1)
    rec["after_last_step_s"] = t_call + rec["fit_s"] - st[-1]
    rec["torch_threads"] = info["torch_threads"]
    states = [(t - t_call, step, torch.load(path)) for t, step, path in info["snaps"]]
    states.append((st[-1] - t_call, args.steps, out["state"]))
    rec["curve"] = score(hidden, states, x_test, y_test)
    rec["accuracy"] = rec["curve"][-1][1]


class Poller:
    """Polls the fit's parameter server: when the first step lands, and weight copies every
    ``grid_v`` versions (scored after the fit)."""

    def __init__(self, grid_v: int) -> None:
        self.grid_v = grid_v
        self.t_call = 0.0
        self.first: float | None = None
        self.last: tuple[float, int] = (0.0, 0)
        self.snaps: list[tuple[float, int, Any]] = []
        self.stop_flag = threading.Event()

    def hook(self) -> None:
        from sparktorch import _native

        real = _native.ParameterServer

        def factory(*a: Any, **kw: Any) -> Any:
            server = real(*a, **kw)
            threading.Thread(target=self.loop, args=(server,), daemon=True).start()
            return server

        _native.ParameterServer = factory  # type: ignore[misc]

    def loop(self, server: Any) -> None:
        next_v = self.grid_v
        while not self.stop_flag.is_set() and server.running:
            try:
                v = int(server.version())
                now = time.time()
                if v >= 1 and self.first is None:
                    self.first = now
                if v > self.last[1]:
                    self.last = (now, v)
                if v >= next_v:
                    params = server.parameters()
                    self.snaps.append((now - self.t_call, v, params))
                    next_v = v + self.grid_v
            except Exception:  # noqa: BLE001 - the server stopped under us
                break
            self.stop_flag.wait(0.01)


def side_ours(args: argparse.Namespace, rec: dict[str, Any], x_test: Any, y_test: Any) -> None:
    import torch
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.pipeline import Pipeline
    from pyspark.sql.types import IntegerType, StructField, StructType
    from torch import nn

    from sparktorch import SparkTorch, serialize_torch_obj

    hidden = WORKLOADS[args.workload]
    workers = 2
    pushes_per_step = 1 if args.side == "sync" else workers
    poller = Poller(args.grid * pushes_per_step)
    poller.hook()
    t0 = time.time()
    spark = spark_session()
    rec["session_s"] = time.time() - t0
    try:
        schema = StructType([StructField(f"_c{i}", IntegerType()) for i in range(785)])
        df = spark.read.schema(schema).csv(str(TRAIN_CSV))
        va = VectorAssembler(inputCols=df.columns[1:], outputCol="features")
        torch.manual_seed(0)
        network = build_mlp(hidden)
        marker = ""
        if args.crash_persistent:
            marker = str(WORK / f"peer-crash-marker-{os.getpid()}")
        criterion = CrashingLoss(args.crash_step, marker) if args.crash_step else nn.CrossEntropyLoss()
        torch_obj = serialize_torch_obj(model=network, criterion=criterion, optimizer=torch.optim.Adam, lr=0.0001)
        kw: dict[str, Any] = dict(
            inputCol="features", labelCol="_c0", predictionCol="predictions", torchObj=torch_obj,
            iters=args.steps, partitions=workers, verbose=0, useBarrier=True,
        )
        if args.side == "sync":
            kw["mode"] = "synchronous"
        else:
            kw.update(mode="hogwild", acquireLock=args.side == "async", port=free_port())
        est = SparkTorch(**kw)
        t_call = time.time()
        poller.t_call = t_call
        try:
            fitted = Pipeline(stages=[va, est]).fit(df)
        finally:
            rec["fit_s"] = time.time() - t_call
            poller.stop_flag.set()
        net = fitted.stages[-1].getPytorchModel()
        rec["first_step_s"] = poller.first - t_call if poller.first else None
        if poller.first and poller.last[1] > 1:
            rec["step_s"] = (poller.last[0] - poller.first) / ((poller.last[1] - 1) / pushes_per_step)
        rec["after_last_step_s"] = t_call + rec["fit_s"] - poller.last[0] if poller.last[1] else None
        rec["versions"] = poller.last[1]
        states: list[tuple[float, int, Any]] = [
            (t, v // pushes_per_step, p) for t, v, p in poller.snaps if v < poller.last[1]
        ]
        states.append((poller.last[0] - t_call, poller.last[1] // pushes_per_step, net.state_dict()))
        rec["curve"] = score(hidden, states, x_test, y_test)
        rec["accuracy"] = accuracy(net, x_test, y_test)
    finally:
        spark.stop()


def side_plain(args: argparse.Namespace, rec: dict[str, Any], x_test: Any, y_test: Any) -> None:
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    hidden = WORKLOADS[args.workload]
    t_call = time.time()
    arr = pd.read_csv(TRAIN_CSV, header=None, dtype=np.float32).to_numpy()
    x = torch.from_numpy(np.ascontiguousarray(arr[:, 1:]))
    y = torch.from_numpy(arr[:, 0].astype(np.int64))
    torch.manual_seed(0)
    net = build_mlp(hidden)
    opt = torch.optim.Adam(net.parameters(), lr=0.0001)
    loss_fn = nn.CrossEntropyLoss()
    states: list[tuple[float, int, Any]] = []
    step_times = []
    for step in range(1, args.steps + 1):
        net.train()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        step_times.append(time.time())
        if step % args.grid == 0 or step == args.steps:
            states.append((step_times[-1] - t_call, step, {k: v.detach().clone() for k, v in net.state_dict().items()}))
    rec["fit_s"] = time.time() - t_call
    rec["first_step_s"] = step_times[0] - t_call
    rec["step_s"] = (step_times[-1] - step_times[0]) / max(1, args.steps - 1)
    rec["torch_threads"] = torch.get_num_threads()
    rec["curve"] = score(hidden, states, x_test, y_test)
    rec["accuracy"] = rec["curve"][-1][1]


def child(args: argparse.Namespace) -> None:
    setup_logging()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    WORK.mkdir(parents=True, exist_ok=True)
    t_proc = time.time()
    from common import load_csv

    x_test, y_test = load_csv(TEST_CSV)
    rec: dict[str, Any] = {
        "side": args.side, "workload": args.workload, "hidden": WORKLOADS[args.workload],
        "num_params": num_params(WORKLOADS[args.workload]), "steps": args.steps, "grid": args.grid,
        "rep": args.rep, "crash_step": args.crash_step, "crash_persistent": args.crash_persistent,
    }
    try:
        if args.side == "td":
            t0 = time.time()
            spark = spark_session()
            rec["session_s"] = time.time() - t0
            try:
                side_td(args, rec, x_test, y_test)
            finally:
                if args.crash_step:
                    time.sleep(3)
                    rec["leftover_rank_processes_3s_after"] = _rank_processes()
                spark.stop()
        elif args.side == "plain":
            side_plain(args, rec, x_test, y_test)
        else:
            side_ours(args, rec, x_test, y_test)
        rec["ok"] = True
        log.info("%s %s: first step %.1fs fit %.1fs accuracy %.4f", args.side, args.workload,
                 rec.get("first_step_s") or -1, rec["fit_s"], rec["accuracy"])
    except Exception as exc:  # noqa: BLE001 - the failure is a result (the crash probe's)
        rec["ok"] = False
        rec["error_type"] = type(exc).__name__
        rec["error"] = str(exc)[:3000]
        rec["error_names_cause"] = "injected crash" in str(exc)
        rec["traceback"] = traceback.format_exc()[-3000:]
        log.error("%s %s failed: %s: %s", args.side, args.workload, type(exc).__name__, str(exc)[:400])
    rec["process_s"] = time.time() - t_proc
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _rank_processes() -> list[str]:
    """Command lines of TorchDistributor rank processes (torchrun wrappers, the train script)
    still alive in this process group."""
    me = os.getpgid(0)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if os.getpgid(int(pid)) != me:
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if "torch_run_process_wrapper" in cmd or "train.py" in cmd or "torch.distributed" in cmd:
            found.append(f"{pid}: {cmd[:160]}")
    return found


# ---------------------------------------------------------------- orchestrator


def summarize(records: list[dict[str, Any]], reps: int) -> dict[str, Any]:
    ok = [r for r in records if r.get("ok") and not r.get("crash_step")]
    summary: dict[str, Any] = {}
    for wl in WORKLOADS:
        recs = [r for r in ok if r["workload"] == wl]
        td_acc = [r["accuracy"] for r in recs if r["side"] == "td"]
        base = td_acc or [r["accuracy"] for r in recs if r["side"] == "sync"]
        if not base:
            continue
        target = round(statistics.median(base) - 0.01, 4)
        for r in recs:
            r["time_to_target_s"] = next((t for t, a, _ in r["curve"] if a >= target), None)
            r["steps_to_target"] = next((s for _, a, s in r["curve"] if a >= target), None)
        rows = {}
        for side in SIDES:
            mine = [r for r in recs if r["side"] == side]
            if not mine:
                continue
            row: dict[str, Any] = {"n": len(mine)}
            for key in ("first_step_s", "fit_s", "accuracy", "time_to_target_s", "step_s", "after_last_step_s", "session_s"):
                vals = [r[key] for r in mine if r.get(key) is not None]
                row[key] = statistics.median(vals) if vals else None
                row[key + "_all"] = [r.get(key) for r in mine]
            row["steps_to_target_all"] = [r.get("steps_to_target") for r in mine]
            for key in ("first_step_s", "fit_s", "time_to_target_s"):
                ratios = []
                for r in mine:
                    td = next((t for t in recs if t["side"] == "td" and t["rep"] == r["rep"]), None)
                    if td and r.get(key) is not None and td.get(key):
                        ratios.append(r[key] / td[key])
                row[key + "_vs_td"] = statistics.median(ratios) if ratios else None
            rows[side] = row
        summary[wl] = {"target_accuracy": target, "num_params": num_params(WORKLOADS[wl]), "sides": rows}
    return summary


def fmt(v: Any, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def table(summary: dict[str, Any], steps: dict[str, int]) -> str:
    lines = []
    for wl, s in summary.items():
        lines.append(f"**{wl}** ({s['num_params']:,} values, {steps[wl]} full-batch steps per worker; "
                     f"target accuracy {s['target_accuracy']:.4f})\n")
        lines.append("| side | first step | whole fit | held-out accuracy | time to target | per step (steady) "
                     "| first step / TD | fit / TD | time to target / TD |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for side, r in s["sides"].items():
            lines.append(
                f"| {SIDE_NAMES[side]} | {fmt(r['first_step_s'], '.1f', ' s')} | {fmt(r['fit_s'], '.1f', ' s')} "
                f"| {fmt(r['accuracy'], '.4f')} | {fmt(r['time_to_target_s'], '.1f', ' s')} "
                f"| {fmt(r['step_s'], '.2f', ' s')} | {fmt(r['first_step_s_vs_td'], '.2f', 'x')} "
                f"| {fmt(r['fit_s_vs_td'], '.2f', 'x')} | {fmt(r['time_to_target_s_vs_td'], '.2f', 'x')} |"
            )
        lines.append("")
    return "\n".join(lines)


def crash_table(records: list[dict[str, Any]]) -> str:
    lines = ["| side | crash | outcome | call to outcome | the error names the rank's exception | error (first line) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if r.get("timed_out"):
            outcome = f"hung: killed by the {r['timeout_s']:.0f} s timeout"
        elif r.get("ok"):
            outcome = f"completed all {r.get('steps')} steps, accuracy {fmt(r.get('accuracy'), '.4f')}"
        else:
            outcome = f"raised {r.get('error_type')}"
        err = (r.get("error") or "").strip()
        first = err.splitlines()[0][:160] if err else ""
        names = "n/a" if r.get("ok") else ("yes" if r.get("error_names_cause") else "no")
        kind = "every attempt from step 5" if r.get("crash_persistent") else "once, at step 5"
        lines.append(f"| {SIDE_NAMES[r['side']]} | {kind} | {outcome} | {fmt(r.get('fit_s') or r.get('wall_s'), '.1f', ' s')} "
                     f"| {names} | {first.replace('|', '/')} |")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> None:
    setup_logging()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = WORK / "peer"
    logs.mkdir(parents=True, exist_ok=True)
    raw = logs / f"records-{int(time.time())}.jsonl"
    steps = {"seed": args.seed_steps, "5M": args.big_steps}
    grids = {"seed": args.seed_grid, "5M": 1}
    workloads = [w for w in args.workloads.split(",") if w]
    sides = [s for s in args.sides.split(",") if s]
    t_start = time.time()
    plan = []
    for rep in range(args.reps):
        order = sides if rep % 2 == 0 else list(reversed(sides))
        for wl in workloads:
            for side in order:
                if wl == "seed" or rep < args.big_reps:
                    plan.append((rep, wl, side, 0, False))
    if args.crash:
        plan += [(0, "seed", side, CRASH_STEP, persistent)
                 for side, persistent in (("td", False), ("sync", False), ("sync", True))]
    crash_records = []
    runs: list[dict[str, Any]] = []
    for rep, wl, side, crash, persistent in plan:
        before = len(read_jsonl(raw))
        cmd = [str(OUR_PY), str(Path(__file__).resolve()), "--child", side, "--workload", wl,
               "--steps", str(args.crash_steps if crash else steps[wl]), "--grid", str(grids[wl]),
               "--rep", str(rep), "--crash-step", str(crash), "--out-jsonl", str(raw)]
        if persistent:
            cmd.append("--crash-persistent")
        timeout = args.crash_timeout if crash else args.timeout
        log.info("rep %d %s %s%s", rep, wl, side, f" (crash at step {crash})" if crash else "")
        tag = ("-crash-persistent" if persistent else "-crash") if crash else ""
        res = run_bounded(cmd, timeout, log_path=logs / f"{wl}-{side}{tag}.log")
        new = read_jsonl(raw)[before:]
        if not new:  # the child never wrote: hung (timeout) or died
            new = [{"side": side, "workload": wl, "rep": rep, "crash_step": crash, "crash_persistent": persistent, "ok": False,
                    "error": res["tail"][-1500:], "error_type": "no record"}]
            with open(raw, "a") as f:
                f.write(json.dumps(new[0]) + "\n")
        for r in new:
            r.update(wall_s=res["wall_s"], timed_out=res["timed_out"], rc=res["rc"], timeout_s=timeout)
            (crash_records if crash else runs).append(r)
        log.info("  -> rc=%s wall=%.1fs timed_out=%s", res["rc"], res["wall_s"], res["timed_out"])
    summary = summarize(runs, args.reps)
    doc = {
        "what": "sparktorch vs Spark's TorchDistributor (benchmarks/vs_torch_distributor.py)",
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "total_s": time.time() - t_start,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "versions": _versions(),
        "steps": steps, "grid": grids, "reps": args.reps,
        "summary": summary,
        "crash": [{k: r.get(k) for k in ("side", "crash_persistent", "ok", "accuracy", "steps", "error_type", "error", "error_names_cause", "fit_s", "wall_s", "timed_out",
                                         "timeout_s", "leftover_rank_processes_3s_after")} for r in crash_records],
        "records": [{k: v for k, v in r.items() if k != "traceback"} for r in runs],
    }
    (out_dir / "peer.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = table(summary, steps) + ("\nCrash probe (seed, rank/partition 1 raises at step 5):\n\n" + crash_table(crash_records) + "\n" if crash_records else "")
    (out_dir / "table.md").write_text(md)
    print(md)
    log.info("total %.0fs; wrote %s", time.time() - t_start, out_dir / "peer.json")


def _versions() -> dict[str, str]:
    import subprocess

    code = "import pyspark, torch, platform; print(pyspark.__version__, torch.__version__, platform.python_version())"
    try:
        out = subprocess.run([str(OUR_PY), "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout.split()
        return {"pyspark": out[0], "torch": out[1], "python": out[2]}
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed-steps", type=int, default=50)
    ap.add_argument("--seed-grid", type=int, default=5, help="snapshot every this many steps (seed)")
    ap.add_argument("--big-steps", type=int, default=5)
    ap.add_argument("--big-reps", type=int, default=2, help="repetitions of the 5M workload (<= --reps)")
    ap.add_argument("--crash-steps", type=int, default=10, help="steps of the crash probes (the crash is at step 5)")
    ap.add_argument("--workloads", default="seed,5M")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--crash", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--crash-timeout", type=float, default=180)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer")
    # child mode
    ap.add_argument("--child", choices=SIDES)
    ap.add_argument("--workload", choices=list(WORKLOADS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--crash-step", type=int, default=0)
    ap.add_argument("--crash-persistent", action="store_true", help="ours: the crash recurs in every retried attempt")
    ap.add_argument("--out-jsonl", type=Path)
    args = ap.parse_args()
    if args.child:
        args.side = args.child
        args.out = args.out_jsonl
        child(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
