"""The fitted model's training history is held by column (24 bytes a record), and reads as the
records getTrainingHistory has always returned."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from sparktorch._history import TrainingHistory
from sparktorch.model import SparkTorchModel


def test_records_round_trip_with_missing_validation_loss():
    entries = [(0, 0, 1.5, math.nan), (1, 0, 1.25, 0.5), (0, 1, 1.0, math.nan)]
    h = TrainingHistory.from_entries(entries)
    want = [
        {"worker": 0, "step": 0, "loss": 1.5, "val_loss": None},
        {"worker": 1, "step": 0, "loss": 1.25, "val_loss": 0.5},
        {"worker": 0, "step": 1, "loss": 1.0, "val_loss": None},
    ]
    assert h.records() == want and list(h) == want and h[-1] == want[-1] and h[0:2] == want[:2]
    assert TrainingHistory.from_records(want) == h
    df = h.to_pandas()
    assert list(df.columns) == ["worker", "step", "loss", "val_loss"] and len(df) == 3
    with pytest.raises(IndexError):
        h[3]


def test_a_million_records_take_columns_not_dicts():
    n = 1 << 20
    table = np.zeros((n, 4))
    table[:, 1] = np.arange(n)
    table[:, 3] = np.nan
    tracemalloc.start()
    h = TrainingHistory.from_entries(table)
    model = SparkTorchModel(modStr="")
    model._training_history = h
    copied = model.copy()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(copied._training_history) == n
    # 4 columns: 28 bytes a record (the float64 table is the caller's); dicts would be ~400 bytes.
    assert peak < 40 * n, peak


def test_a_diverged_fit_equals_itself():
    h = TrainingHistory.from_entries([(0, 0, math.nan, math.nan)])
    assert h == TrainingHistory.from_entries([(0, 0, math.nan, math.nan)])


def test_bad_records_are_refused():
    with pytest.raises((ValueError, TypeError, KeyError)):
        TrainingHistory.from_records([{"worker": 0, "loss": 1.0}])
