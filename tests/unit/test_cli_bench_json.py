"""`sparktorch-ps bench --json` and the benchmark report that reads it stay in step.

`make bench` (benchmarks/run_all.py) runs the CLI with ``--json`` and stores the document;
benchmarks/report.py turns it into the Rust-only parameter-server table. These tests run the real
built command (the venv's console script, or the binary named by ``SPARKTORCH_PS``) with a tiny
configuration and feed its stdout to the report's own reader: a change to either side that the
other does not follow fails here, not as "not available" rows in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402  (benchmarks/ is not a package)

COMMAND = os.environ.get("SPARKTORCH_PS") or str(Path(sys.executable).parent / "sparktorch-ps")
# A second or less: 2 operations x 0.1 s, one repetition, a 1,000-value model.
TINY = ["--params", "1000", "--clients", "2", "--seconds", "0.1", "--mode", "async", "--ops", "pull,push"]


def bench(*extra: str) -> str:
    """Run ``sparktorch-ps bench`` with the tiny configuration; return its stdout."""
    proc = subprocess.run(
        [COMMAND, "bench", *TINY, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SPARKTORCH_LOG": "warn"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def record(doc: dict | None, **fields) -> dict:
    """A ``cli.jsonl`` record as run_all.py's ``cli_job`` writes it."""
    rec = {"size": "0.27M", "num_params": 1000, "clients": 2, "cmd": "sparktorch-ps bench --json", **fields}
    if doc is not None:
        rec.update(ok=True, bench=doc)
    return rec


def test_the_report_reads_the_cli_json_into_numbers():
    doc = report.parse_cli_bench(bench("--json"))
    assert doc["config"]["params"] == 1000 and doc["config"]["clients"] == 2
    cells = report.cli_cells(doc)
    assert set(cells) == {"pull", "push"}
    for cell in cells.values():
        assert cell["ops_per_s"] > 0 and cell["mb_per_s"] > 0 and cell["ms_per_op_per_client"] > 0
    table = "\n".join(report.cli_table([record(doc)]))
    assert "not available" not in table, table
    row = next(line for line in table.splitlines() if line.startswith("| 0.27M | 2 |"))
    pull, push = (c.strip() for c in row.strip("|").split("|")[2:4])
    # "12,345 (49)": round trips/s, then MB/s.
    for cell in (pull, push):
        assert cell[0].isdigit() and "(" in cell, row


def test_the_text_output_is_refused_by_name():
    """The text tables are for people and change freely: the reader refuses them, and the table
    says why instead of showing numbers read from the wrong columns."""
    with pytest.raises(ValueError, match="JSON"):
        report.parse_cli_bench(bench())
    table = "\n".join(report.cli_table([record(None, ok=False, error="schema 0, this report reads schema 1")]))
    assert "not available" in table and "schema 0" in table
