"""A model that measures the task it trains in: memory of the Python worker, time of step 0.

Imported by name on Spark's Python workers (``benchmarks/`` is on their ``PYTHONPATH``), built
from a lazy torch object (no pickle). Every ``every`` forward passes in training mode it reads
``/proc/self/status`` and rewrites ``out`` (JSON): the largest ``RssAnon`` seen during the steps,
``VmHWM`` (the process's peak resident set) and the wall-clock time of the first forward pass.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn as nn


def status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status, in KiB."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


class MemoryProbe(nn.Module):
    """``Linear(dim, classes)`` that records the worker's memory while it trains."""

    def __init__(self, dim: int = 256, classes: int = 3, out: str = "", every: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)
        self.out, self.every = out, every
        self._calls = 0
        self._first: float | None = None
        self._anon = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.out:
            if self._first is None:
                self._first = time.time()
            if self._calls % self.every == 0:
                st = status_kib("RssAnon", "VmHWM", "VmRSS")
                self._anon = max(self._anon, st["RssAnon"])
                tmp = f"{self.out}.{os.getpid()}"
                with open(tmp, "w") as fh:
                    json.dump({"first_step_time": self._first, "anon_kib": self._anon, "hwm_kib": st["VmHWM"],
                               "rss_kib": st["VmRSS"], "calls": self._calls + 1}, fh)
                os.replace(tmp, self.out)
            self._calls += 1
        return self.fc(x)
