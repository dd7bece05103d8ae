"""Models that fail on purpose inside a Spark task: real process deaths, no hooks in the product.

Importable by name on Spark's Python workers (tests/faults is put on their PYTHONPATH).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

_calls = 0


class DieOnce(nn.Module):
    """An MLP for 784 raw pixels. The task on ``partition`` kills its own Python worker process
    (``os._exit``) at its ``at_call``-th training forward pass, unless the ``marker`` file exists
    (it is created just before dying, so each marker kills once)."""

    def __init__(self, marker: str, partition: int = 1, at_call: int = 10) -> None:
        super().__init__()
        self.marker = marker
        self.partition = partition
        self.at_call = at_call
        self.net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _calls
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if self.training and ctx is not None and ctx.partitionId() == self.partition and not os.path.exists(self.marker):
            _calls += 1
            if _calls >= self.at_call:
                with open(self.marker, "w") as f:
                    f.write(f"killed pid {os.getpid()} at forward {_calls}\n")
                os._exit(17)
        return self.net(x / 255.0)
