"""Peak memory of the seed program's whole process tree: PSS (and RSS) summed over the driver,
Spark's JVM, the Python worker daemon and its workers, sampled while the program runs.

PSS (proportional set size, ``/proc/<pid>/smaps_rollup``) counts a page shared by k processes as
1/k in each, so the sum over the tree is the memory the tree really holds; RSS counts shared
pages (torch's libraries, pages a forked worker shares with its daemon) once per process.

    .venv/bin/python benchmarks/pss_peak.py [--mode hogwild] [--iters 50] [--every 0.2] [--json out.json]

The program run is ``benchmarks/e2e_fit.py`` (the seed pipeline, one fit, ``local[4]``,
``partitions=4``, ``useBarrier=True``) without its accuracy snapshots, in a new process group.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; (0, 0) when it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="hogwild", choices=["hogwild", "async", "synchronous"])
    ap.add_argument("--iters", default="50")
    ap.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_fit.py"), "--side", "ours", "--mode", args.mode,
               "--iters", args.iters, "--snapshot-every", "0", "--out", str(Path(tmp) / "e2e.jsonl")]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        peak = {"pss_kib": 0, "rss_kib": 0, "at_s": 0.0, "processes": 0}
        samples = 0
        while proc.poll() is None:
            pids = tree(proc.pid)
            mem = [memory_kib(p) for p in pids]
            pss, rss = sum(m[0] for m in mem), sum(m[1] for m in mem)
            samples += 1
            if pss > peak["pss_kib"]:
                peak = {"pss_kib": pss, "rss_kib": rss, "at_s": round(time.perf_counter() - t0, 1), "processes": len(pids)}
            time.sleep(args.every)
        err = proc.stderr.read() if proc.stderr else ""
        result_lines = (Path(tmp) / "e2e.jsonl").read_text().splitlines() if (Path(tmp) / "e2e.jsonl").exists() else []
    fit = json.loads(result_lines[-1]) if result_lines else {}
    report = {
        "program": "benchmarks/e2e_fit.py (seed pipeline, one fit)", "mode": args.mode, "iters": args.iters,
        "rc": proc.returncode, "fit_ok": fit.get("ok"), "fit_s": fit.get("fit_s"), "accuracy": fit.get("accuracy"),
        "peak_pss_gib": round(peak["pss_kib"] / 2**20, 2), "rss_at_peak_gib": round(peak["rss_kib"] / 2**20, 2),
        "peak_at_s": peak["at_s"], "processes_at_peak": peak["processes"], "samples": samples,
        "wall_s": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg()[0],
    }
    if proc.returncode != 0:
        report["stderr_tail"] = err[-2000:]
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
