"""``make bench``: every side-by-side benchmark, ours vs sparktorch 0.2.0, then the report.

    .venv/bin/python benchmarks/run_all.py            # full run (well under 30 min on 2 cores)
    BENCH_QUICK=1 .venv/bin/python benchmarks/run_all.py   # smoke test: 1 repetition, fewer cells

Steps:
1. ``examples/prepare_mnist.py`` (the bundled MNIST CSV files) and ``benchmarks/setup_upstream.sh``
   (``benchmarks/.venv-upstream`` with ``sparktorch==0.2.0``; skipped when already set up).
2. The workloads, each measurement in its own subprocess with a timeout (the whole process group
   -- Spark's JVM, Python workers, upstream's forked server -- is killed when it overruns), ours
   and upstream alternating (the order flips every repetition):
   - ``ps_bench.py``: parameter-server pull/push round trips, 1/2/4 Python clients, 3 model sizes;
   - ``e2e_fit.py``: the seed program's fit (wall time, held-out accuracy) in every mode;
   - ``transform_cell.py``: ``create_spark_torch_model(...).transform`` over 100,000 rows;
   - ``plain_torch.py``: the same training steps in one plain PyTorch process;
   plus, once, ``transform_bench.py`` (the inference benchmark of our side, owned by the
   inference work), ``sparktorch-ps bench`` (the Rust load generator) when it is built, and
   ``fit_profile.py`` (where our first fit's start-up goes, stage by stage).
3. ``report.py``: tables into docs/benchmarks.md, plots into docs/plots/.

Raw results: ``benchmarks/results/<full|quick>/*.jsonl`` (one JSON object per line) and
``run.json`` (machine, versions, command, the log of every job). A time budget
(``BENCH_BUDGET_S``, default 1380 s full / 900 s quick) drops the optional jobs (later
repetitions, the extra runs of our own benchmarks) that would not fit, and says so in the report.

Environment knobs: ``BENCH_QUICK=1``, ``BENCH_REPS`` (default 3 full / 1 quick),
``BENCH_BUDGET_S``, ``BENCH_SKIP`` (comma list of ps,e2e,transform,plain,cli,profile),
``BENCH_OURS=0`` (upstream and plain only, e.g. while our package is being built).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BENCH,
    OUR_PY,
    ROOT,
    UP_PY,
    WORK,
    append_jsonl,
    run_bounded,
    setup_logging,
)

log = logging.getLogger("bench")

QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
KIND = "quick" if QUICK else "full"
RESULTS = BENCH / "results" / KIND
REPS = int(os.environ.get("BENCH_REPS", "1" if QUICK else "3"))
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "900" if QUICK else "1380"))
SKIP = {s for s in os.environ.get("BENCH_SKIP", "").split(",") if s}
WITH_OURS = os.environ.get("BENCH_OURS", "1") not in ("", "0")

if QUICK:
    PS = {"sizes": "0.27M,5M", "clients": "1,4", "seconds": 1.0}
    TRANSFORM_ROWS = 20_000
    TRANSFORM_REPS = 1
    WARM_REFIT = False
else:
    PS = {"sizes": "0.27M,5M,25M", "clients": "1,2,4", "seconds": 1.5}
    TRANSFORM_ROWS = 100_000
    TRANSFORM_REPS = min(REPS, 2)  # 0.2.0 needs ~1.5 min per 100,000-row pass on 2 cores
    WARM_REFIT = True  # the last repetition fits a second time in the same Spark session (warm workers)
SEED_ITERS = 50
PLAIN_ITERS = [SEED_ITERS]  # the curve inside each run gives the accuracy at every earlier step

# (side, mode) of the end-to-end fits; "async" is ours' hogwild + acquireLock=True.
E2E_MODES = [("ours", "hogwild"), ("upstream", "hogwild"), ("ours", "async"), ("ours", "synchronous"), ("upstream", "synchronous")]

# Upstream's hogwild server is a fork of the driver: with OpenMP threads alive in the parent the
# fork can deadlock (UPSTREAM.md). Both sides run with the same setting, so the comparison is even.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Runner:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.jobs: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.walls: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def job(self, name: str, cmd: list[str], timeout_s: float, results: Path | None, fail_record: dict[str, Any],
            optional: bool = False, estimate_s: float = 0.0, kind: str = "") -> bool:
        """Run one measurement subprocess; on failure with no record written, write one.

        ``kind`` names jobs of the same shape: once one has run, its wall time replaces
        ``estimate_s`` when the budget decides whether an optional one still fits."""
        estimate_s = self.walls.get(kind, estimate_s)
        if optional and self.elapsed() + estimate_s > BUDGET_S:
            self.skipped.append(f"{name} (time budget: {self.elapsed():.0f}s used of {BUDGET_S:.0f}s)")
            log.warning("skipping %s: time budget", name)
            return False
        before = len(results.read_text().splitlines()) if results and results.exists() else 0
        log.info("[%4.0fs] %s", self.elapsed(), name)
        res = run_bounded(cmd, timeout_s, env=ENV, log_path=WORK / f"{KIND}-jobs.log")
        after = len(results.read_text().splitlines()) if results and results.exists() else 0
        entry = {"name": name, "cmd": cmd, "rc": res["rc"], "wall_s": round(res["wall_s"], 1), "timed_out": res["timed_out"]}
        if kind:
            self.walls[kind] = max(self.walls.get(kind, 0.0), res["wall_s"])
        ok = res["rc"] == 0 and not res["timed_out"]
        if not ok:
            entry["tail"] = res["tail"][-2500:]
            log.error("%s: rc=%s timed_out=%s\n%s", name, res["rc"], res["timed_out"], res["tail"][-1500:])
            if results is not None and after == before:
                why = f"timed out after {timeout_s:.0f}s" if res["timed_out"] else f"exit code {res['rc']}"
                append_jsonl(results, {**fail_record, "ok": False, "error": f"{why}: {res['tail'][-1500:]}"})
        self.jobs.append(entry)
        return ok


def versions() -> dict[str, Any]:
    def ask(py: Path, code: str) -> str:
        try:
            return subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **ENV}).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({exc})"

    probe = (
        "import importlib.metadata as m, json, sys\n"
        "out={'python': sys.version.split()[0]}\n"
        "for d in ['sparktorch','torch','pyspark','numpy','pandas','pyarrow','dill','flask','werkzeug','requests']:\n"
        "    try: out[d]=m.version(d)\n"
        "    except Exception: out[d]=None\n"
        "try:\n"
        "    import sparktorch; out['sparktorch_import']=getattr(sparktorch,'__version__',None)\n"
        "except Exception as e: out['sparktorch_import']='import failed: '+repr(e)[:200]\n"
        "print(json.dumps(out))"
    )
    res: dict[str, Any] = {}
    for side, py in (("ours", OUR_PY), ("upstream", UP_PY)):
        text = ask(py, probe)
        try:
            res[side] = json.loads(text.splitlines()[-1])
        except (ValueError, IndexError):
            res[side] = {"error": text[-500:]}
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    res["java"] = java[0] if java else None
    return res


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout
    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
        "cpu_model": cpu,
        "free_g": free.strip(),
        "kernel": platform.release(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def ours_works() -> tuple[bool, str]:
    code = "import sparktorch, sparktorch._native as n; n.ParameterServer; n.Client; from sparktorch import SparkTorch"
    r = subprocess.run([str(OUR_PY), "-c", code], capture_output=True, text=True, timeout=120)
    return r.returncode == 0, (r.stderr or "")[-800:]


def cli_binary() -> Path | None:
    """``sparktorch-ps``: the built release binary, built now (incrementally) if cargo can."""
    exe = ROOT / "target" / "release" / "sparktorch-ps"
    if shutil.which("cargo") and (ROOT / "crates" / "sparktorch-cli").exists():
        run_bounded(["cargo", "build", "--release", "-q", "-p", "sparktorch-cli"], 900, log_path=WORK / f"{KIND}-jobs.log")
    return exe if exe.exists() else None


def main() -> None:
    setup_logging()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{KIND}-jobs.log").unlink(missing_ok=True)
    if RESULTS.exists():
        shutil.rmtree(RESULTS)
    RESULTS.mkdir(parents=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run = Runner()

    subprocess.run([str(OUR_PY), str(ROOT / "examples" / "prepare_mnist.py")], check=True, cwd=ROOT)
    subprocess.run([str(BENCH / "setup_upstream.sh")], check=True, cwd=ROOT)
    meta: dict[str, Any] = {
        "kind": KIND, "started": started, "reps": REPS, "budget_s": BUDGET_S,
        "command": ("BENCH_QUICK=1 " if QUICK else "") + "make bench",
        "machine": machine(), "versions": versions(), "git": git_state(),
        "config": {"ps": PS, "seed_iters": SEED_ITERS, "plain_iters": PLAIN_ITERS, "transform_rows": TRANSFORM_ROWS,
                   "transform_reps": TRANSFORM_REPS, "warm_refit": WARM_REFIT, "e2e_modes": E2E_MODES, "env": ENV},
    }
    ok, why = ours_works() if WITH_OURS else (False, "BENCH_OURS=0")
    meta["ours_available"] = ok
    if not ok:
        meta["ours_unavailable_reason"] = why
        log.warning("our package is not usable yet; running upstream and plain torch only:\n%s", why)
    sides_all = ["ours", "upstream"] if ok else ["upstream"]
    py = {"ours": str(OUR_PY), "upstream": str(UP_PY)}
    ps_out, e2e_out, tr_out, plain_out = (RESULTS / f"{n}.jsonl" for n in ("ps", "e2e", "transform", "plain"))

    def ordered(rep: int) -> list[str]:
        return sides_all if rep % 2 == 0 else list(reversed(sides_all))

    def ps_job(rep: int, optional: bool) -> None:
        for side in ordered(rep):
            run.job(f"ps {side} rep{rep}", [py[side], "benchmarks/ps_bench.py", "--side", side, "--sizes", PS["sizes"],
                    "--clients", PS["clients"], "--seconds", str(PS["seconds"]), "--rep", str(rep), "--out", str(ps_out)],
                    300, ps_out, {"side": side, "rep": rep, "op": "all"}, optional=optional, estimate_s=90, kind=f"ps {side}")

    def e2e_job(rep: int, optional: bool) -> None:
        modes = E2E_MODES if rep % 2 == 0 else list(reversed(E2E_MODES))
        # The warm refit rides on the last repetition, the first thing the time budget drops.
        iters = [SEED_ITERS, SEED_ITERS] if (rep == REPS - 1 and WARM_REFIT) else [SEED_ITERS]
        for side, mode in modes:
            if side not in sides_all:
                continue
            it = ",".join(map(str, iters))
            run.job(f"e2e {side} {mode} iters={it} rep{rep}", [py[side], "benchmarks/e2e_fit.py", "--side", side, "--mode", mode,
                    "--iters", it, "--rep", str(rep), "--out", str(e2e_out)],
                    150 + 5 * sum(iters), e2e_out, {"side": side, "mode": mode, "iters": iters[0], "rep": rep},
                    optional=optional, estimate_s=30 + 1.5 * sum(iters), kind=f"e2e {side} {mode} {len(iters)}")

    def transform_job(rep: int, optional: bool) -> None:
        if "transform" in SKIP or rep >= TRANSFORM_REPS:
            return
        for side in ordered(rep):
            run.job(f"transform {side} rep{rep}", [py[side], "benchmarks/transform_cell.py", "--side", side, "--rows", str(TRANSFORM_ROWS),
                    "--rep", str(rep), "--out", str(tr_out)],
                    60 + TRANSFORM_ROWS / 200, tr_out, {"side": side, "rep": rep, "rows": TRANSFORM_ROWS},
                    optional=optional, estimate_s=30 + TRANSFORM_ROWS / 1000, kind=f"transform {side}")

    def plain_job(rep: int, optional: bool) -> None:
        if "plain" in SKIP:
            return
        run.job(f"plain torch rep{rep}", [str(OUR_PY), "benchmarks/plain_torch.py", "--iters", ",".join(map(str, PLAIN_ITERS)),
                "--rep", str(rep), "--out", str(plain_out)], 600, plain_out, {"side": "plain", "rep": rep},
                optional=optional, estimate_s=40, kind="plain")

    # Repetition 0 of everything first, then the later repetitions, then the extras: the time
    # budget can only cut from the end of this list.
    for rep in range(REPS):
        if "ps" not in SKIP:
            ps_job(rep, optional=rep > 0)
        if "e2e" not in SKIP:
            e2e_job(rep, optional=rep > 0)
        transform_job(rep, optional=rep > 0)
        plain_job(rep, optional=rep > 0)
    if "cli" not in SKIP and ok:
        cli_job(run)
    if "transform" not in SKIP and ok:
        theirs = RESULTS / "transform_bench.json"
        run.job("transform_bench.py (ours, inference benchmark)", [str(OUR_PY), "benchmarks/transform_bench.py", "--rows", str(TRANSFORM_ROWS),
                "--master", "local[2]", "--skip-row-udf", "--json", str(theirs)], 600, None, {}, optional=True,
                estimate_s=30 + TRANSFORM_ROWS / 1000)

    if "profile" not in SKIP and ok:
        # The start-up profile of our first fit (and warm refit), stage by stage, for the report.
        prof = RESULTS / "profile.jsonl"
        run.job("fit profile ours", [py["ours"], "benchmarks/fit_profile.py", "--fits", "2", "--out", str(prof)], 300, prof,
                {"label": "ours"}, optional=True, estimate_s=90)

    meta.update({
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": round(run.elapsed(), 1),
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3], "jobs": run.jobs, "skipped": run.skipped,
    })
    (RESULTS / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("measurements done in %.0fs; writing the report", run.elapsed())
    subprocess.run([str(OUR_PY), str(BENCH / "report.py"), "--results", str(RESULTS)], check=True, cwd=ROOT)


def cli_job(run: Runner) -> None:
    """``sparktorch-ps bench --json``: the Rust load generator (client threads in Rust, no Python
    in the loop), cited beside the Python-client numbers. It steps plain SGD on push (ps_bench:
    Adam). The JSON document is checked by ``report.parse_cli_bench`` (the report's own reader,
    tests/unit/test_cli_bench_json.py keeps the two in step) and stored whole as ``bench``."""
    from common import PS_MODELS, num_params
    from report import parse_cli_bench

    out = RESULTS / "cli.jsonl"
    exe = cli_binary()
    if exe is None:
        append_jsonl(out, {"ok": False, "error": "sparktorch-ps is not built (cargo build --release -p sparktorch-cli)"})
        return
    for size in PS["sizes"].split(","):
        n = num_params(PS_MODELS[size])
        for clients in (1, 4):
            cmd = [str(exe), "bench", "--params", str(n), "--clients", str(clients), "--seconds", str(PS["seconds"]),
                   "--mode", "async", "--ops", "pull,push", "--json"]
            rec: dict[str, Any] = {"size": size, "num_params": n, "clients": clients, "cmd": "sparktorch-ps " + " ".join(cmd[1:])}
            t0 = time.perf_counter()
            # One process, no children: a plain timeout is enough; stdout is the document alone.
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                                     env={**os.environ, **ENV, "SPARKTORCH_LOG": "warn"})
                rc, timed_out, stdout, stderr = res.returncode, False, res.stdout, res.stderr
            except subprocess.TimeoutExpired as e:
                rc, timed_out = None, True
                stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            wall = time.perf_counter() - t0
            with open(WORK / f"{KIND}-jobs.log", "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{stdout}\n{stderr}\n[rc={rc} wall={wall:.1f}s timed_out={timed_out}]\n\n")
            if rc == 0:
                try:
                    rec.update(ok=True, bench=parse_cli_bench(stdout))
                except ValueError as e:
                    rec.update(ok=False, error=str(e))
            else:
                rec.update(ok=False, error="timed out after 120 s" if timed_out else f"exit code {rc}",
                           output=(stderr or stdout)[-2000:])
            append_jsonl(out, rec)
            run.jobs.append({"name": f"cli {size} c={clients}", "cmd": cmd, "rc": rc, "wall_s": round(wall, 1),
                             "timed_out": timed_out})

if __name__ == "__main__":
    main()
