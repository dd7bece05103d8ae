"""The task-side data path without Spark: Arrow batches -> spill files -> bounded reads."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparktorch._spill import RowReader, ShuffledPasses, spill_partition
from sparktorch.errors import DataError


def batches(x: np.ndarray, y: np.ndarray | None, size: int = 64, large: bool = False):
    """``x`` (and ``y``) as record batches of ``size`` rows, as mapInArrow hands them to a task."""
    d = x.shape[1]
    cls = pa.LargeListArray if large else pa.ListArray
    for lo in range(0, len(x), size):
        xs = np.ascontiguousarray(x[lo : lo + size])
        offsets = pa.array(np.arange(0, len(xs) * d + 1, d), pa.int64() if large else pa.int32())
        cols, names = [cls.from_arrays(offsets, pa.array(xs.ravel(), pa.float32()))], ["features"]
        if y is not None:
            cols.append(pa.array(y[lo : lo + size], pa.float64()))
            names.append("label")
        yield pa.RecordBatch.from_arrays(cols, names)


def data(n: int = 500, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 3, n).astype(np.float64)


def read_all(file, n: int, capacity: int = 37) -> tuple[np.ndarray, np.ndarray | None]:
    reader = RowReader(file, capacity)
    xs, ys = [], []
    for xc, yc in reader.chunks(n):
        xs.append(xc.copy())
        ys.append(None if yc is None else yc.copy())
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


def rows_of(x: np.ndarray) -> list[tuple[float, ...]]:
    return sorted(map(tuple, x.tolist()))


@pytest.mark.parametrize("large", [False, True])
def test_rows_come_back_as_they_went_in(tmp_path, large):
    x, y = data()
    spilled = spill_partition(batches(x, y, 64, large), "scalar", str(tmp_path))
    try:
        assert (spilled.rows, spilled.n_train, spilled.n_val) == (500, 500, 0)
        got_x, got_y = read_all(spilled.train, 500)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
        reader = RowReader(spilled.train, 4)
        idx = np.array([499, 0, 250, 7])
        bx, by = reader.rows(idx)
        np.testing.assert_array_equal(bx, x[idx])
        np.testing.assert_array_equal(by, y[idx])
    finally:
        spilled.close()


def test_the_spill_leaves_no_file_behind(tmp_path):
    x, y = data()
    spilled = spill_partition(batches(x, y), "scalar", str(tmp_path), 0.3, 1)
    # Anonymous files: nothing in the directory while open, and nothing after.
    assert os.listdir(tmp_path) == []
    spilled.close()
    assert os.listdir(tmp_path) == []


def test_vector_labels_and_no_labels(tmp_path):
    x, _ = data(100, 4)
    y = np.random.default_rng(1).normal(size=(100, 3)).astype(np.float32)
    cols = [
        pa.RecordBatch.from_arrays(
            [b.column(0), pa.ListArray.from_arrays(pa.array(np.arange(0, len(b) * 3 + 1, 3), pa.int32()), pa.array(y[i * 50 : i * 50 + len(b)].ravel()))],
            ["features", "label"],
        )
        for i, b in enumerate(batches(x, None, 50))
    ]
    spilled = spill_partition(iter(cols), "vector", str(tmp_path))
    got_x, got_y = read_all(spilled.train, 100)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    spilled.close()
    auto = spill_partition(batches(x, None), "none", str(tmp_path))
    got_x, got_y = read_all(auto.train, 100)
    np.testing.assert_array_equal(got_x, x)
    assert got_y is None
    auto.close()


def test_the_holdout_depends_on_the_rows_not_their_order_or_batches(tmp_path):
    x, y = data(2000)
    first = spill_partition(batches(x, y, 100), "scalar", str(tmp_path), 0.25, 7)
    perm = np.random.default_rng(3).permutation(2000)
    again = spill_partition(batches(x[perm], y[perm], 33), "scalar", str(tmp_path), 0.25, 7)
    other_seed = spill_partition(batches(x, y, 100), "scalar", str(tmp_path), 0.25, 8)
    try:
        val, _ = read_all(first.val, first.n_val)
        train, _ = read_all(first.train, first.n_train)
        assert 0.2 < first.n_val / 2000 < 0.3
        assert rows_of(np.concatenate([train, val])) == rows_of(x)  # disjoint, nothing lost
        assert rows_of(read_all(again.val, again.n_val)[0]) == rows_of(val)
        assert rows_of(read_all(other_seed.val, other_seed.n_val)[0]) != rows_of(val)
    finally:
        for s in (first, again, other_seed):
            s.close()


def test_nan_and_infinity_are_counted_over_the_whole_partition(tmp_path):
    x, y = data(300)
    x[3, 1], x[150, 0], x[299, 5] = np.nan, np.inf, -np.inf
    with pytest.raises(DataError, match=r"inputCol \(features\): 3 row\(s\) contain NaN"):
        spill_partition(batches(x, y, 64), "scalar", str(tmp_path))
    x, y = data(300)
    y[10] = np.nan
    with pytest.raises(DataError, match=r"labelCol: 1 row\(s\)"):
        spill_partition(batches(x, y, 64), "scalar", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_vectors_of_another_length_in_a_later_batch(tmp_path):
    x, y = data(100, 4)
    good = list(batches(x, y, 50))
    short = next(batches(x[:10, :3], y[:10], 10))
    with pytest.raises(DataError, match=r"column 'features': vectors differ in length \(10 row\(s\) differ from the first row's 4\)"):
        spill_partition(iter([good[0], short]), "scalar", str(tmp_path))


def test_label_statistics_for_class_indices(tmp_path):
    x, y = data(200)
    y[5] = 7.0
    y[6] = 1.5
    spilled = spill_partition(batches(x, y), "scalar", str(tmp_path), 0.5, 0)
    assert (spilled.label_min, spilled.label_max, spilled.label_nonwhole) == (0.0, 7.0, 1)
    assert spilled.count_labels_outside(0, 3) == 1
    spilled.close()


def test_empty_partition(tmp_path):
    spilled = spill_partition(iter([]), "scalar", str(tmp_path))
    assert (spilled.rows, spilled.n_train, spilled.train) == (0, 0, None)


def test_shuffled_passes_are_a_dataloaders_batches():
    n, batch, seed = 50, 16, 11
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    want = [b[0].numpy() for _ in range(4) for b in loader]
    passes = ShuffledPasses(n, batch, torch.Generator().manual_seed(seed))
    got = [passes.next() for _ in range(len(want))]
    assert [len(b) for b in got[:4]] == [16, 16, 16, 2]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    # Each pass uses every row once.
    assert sorted(np.concatenate(got[:4]).tolist()) == list(range(n))
    # A retried task skips to where its order was.
    for skip in (1, 4, 6, 13):
        resumed = ShuffledPasses(n, batch, torch.Generator().manual_seed(seed))
        resumed.skip(skip)
        np.testing.assert_array_equal(resumed.next(), want[skip])
