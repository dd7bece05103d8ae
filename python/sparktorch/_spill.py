"""The task side of the data path: a partition streams once into a spill file, steps read it back.

A task never holds its partition in memory. :func:`spill_partition` reads the partition's Arrow
record batches one at a time, checks each (nulls, vector lengths, NaN/infinity, class labels),
routes each row to the training or the validation file, and appends it there as one
fixed-size record: the row's features (float32), then its label (float64 for a number, float32s
for a vector, nothing without a label column). Steps read rows back with ``pread`` into buffers
allocated once (:class:`RowReader`): a mini-batch step reads its rows, a full-batch step reads
the training file in chunks of a fixed byte budget. See docs/architecture.md, "Data path".

Why a flat record file and not Arrow IPC: a shuffled pass reads rows in random order; row ``i``
of a fixed-size record file is at byte ``i * record_bytes``, one ``pread`` into a reusable
buffer, with no index, no decoding and no allocation. Reading with ``pread`` rather than a
memory map keeps the file's pages out of the task's resident set (the page cache stays the
kernel's to reclaim).

The files are anonymous (``tempfile.TemporaryFile``: unlinked at once, in Spark's local
directory for the task): they vanish when the task ends, fails or is killed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ._data import FEATURES, LABEL
from .errors import DataError


BUFFER_BYTES = 32 << 20
"""Default byte budget of a task's full-batch chunk (and of a resident holdout): ``bufferBytes``."""

_WRITE_BYTES = 4 << 20
"""Records are assembled and written in pieces of about this many bytes."""

_HASH_ROWS = 4096
"""Rows hashed at once for the holdout (bounds the temporary of the row hash)."""

# The holdout: a row is held out when the hash of its feature bytes, as a fraction of 2**32,
# is below validationPct. The hash depends on the row's content and the fit's seed only.
_FMIX_1 = np.uint32(0x85EBCA6B)
_FMIX_2 = np.uint32(0xC2B2AE35)


@dataclass(frozen=True)
class Layout:
    """The fixed-size record of one row: ``dim`` float32 features, then the label."""

    dim: int
    label_kind: str
    """``"none"`` (no label bytes), ``"scalar"`` (one float64) or ``"vector"`` (``label_dim`` float32)."""
    label_dim: int = 0

    @property
    def feature_bytes(self) -> int:
        return 4 * self.dim

    @property
    def label_bytes(self) -> int:
        if self.label_kind == "scalar":
            return 8
        if self.label_kind == "vector":
            return 4 * self.label_dim
        return 0

    @property
    def record_bytes(self) -> int:
        return self.feature_bytes + self.label_bytes

    def rows_in(self, budget_bytes: int) -> int:
        """Rows whose record and feature/label buffers fit ``budget_bytes`` (at least one)."""
        per_row = self.record_bytes + (self.feature_bytes + self.label_bytes if self.label_kind != "none" else 0)
        return max(1, budget_bytes // max(per_row, 1))


def spill_directory(partition: int) -> str:
    """Spark's local directory for this task (``SPARK_LOCAL_DIRS``, set by Spark in its Python
    workers; one of them, by partition), else the system's temporary directory."""
    dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d]
    usable = [d for d in dirs if os.path.isdir(d) and os.access(d, os.W_OK)]
    if usable:
        return usable[partition % len(usable)]
    return tempfile.gettempdir()


class RowFile:
    """Fixed-size records appended to an anonymous file, read back by row index."""

    def __init__(self, directory: str, layout: Layout) -> None:
        self.layout = layout
        self._fh = tempfile.TemporaryFile(dir=directory, prefix="sparktorch-spill-")
        self._fd = self._fh.fileno()
        self._rb = layout.record_bytes
        self.rows = 0
        """Records written so far."""

    def append(self, x: np.ndarray, y: np.ndarray | None) -> None:
        """Append rows: features ``(n, dim)`` float32 and labels (``(n,)`` float64, ``(n, k)``
        float32, or None)."""
        n = len(x)
        if n == 0:
            return
        if y is None:
            _write_all(self._fd, np.ascontiguousarray(x, dtype=np.float32))
        else:
            fb, step = self.layout.feature_bytes, max(1, _WRITE_BYTES // self._rb)
            rec = np.empty((min(n, step), self._rb), dtype=np.uint8)
            for lo in range(0, n, step):
                m = min(step, n - lo)
                rec[:m, :fb] = np.ascontiguousarray(x[lo : lo + m], dtype=np.float32).view(np.uint8).reshape(m, fb)
                rec[:m, fb:] = np.ascontiguousarray(y[lo : lo + m]).view(np.uint8).reshape(m, -1)
                _write_all(self._fd, rec[:m])
        self.rows += n

    def read_range(self, start: int, out: np.ndarray) -> None:
        """Records ``start .. start + len(out)`` into ``out`` (``(m, record_bytes)`` uint8)."""
        _pread_all(self._fd, memoryview(out).cast("B"), start * self._rb)

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """The records of ``rows`` (any order) into ``out[:len(rows)]``, one ``pread`` each."""
        rb, fd = self._rb, self._fd
        mv = memoryview(out).cast("B")
        for j, i in enumerate(rows.tolist()):
            dst = mv[j * rb : (j + 1) * rb]
            if os.preadv(fd, [dst], i * rb) != rb:
                _pread_all(fd, dst, i * rb)

    def close(self) -> None:
        self._fh.close()


def _write_all(fd: int, arr: np.ndarray) -> None:
    mv = memoryview(arr).cast("B")
    while len(mv):
        mv = mv[os.write(fd, mv) :]


def _pread_all(fd: int, dst: memoryview, offset: int) -> None:
    while len(dst):
        got = os.preadv(fd, [dst], offset)
        if got <= 0:
            raise OSError(f"spill file ended early at byte {offset}")
        dst, offset = dst[got:], offset + got


class RowReader:
    """Preallocated buffers for up to ``capacity`` rows of a :class:`RowFile`, and the reads that
    fill them. The arrays returned are views of these buffers, valid until the next read."""

    def __init__(self, file: RowFile, capacity: int) -> None:
        lay = file.layout
        self.file = file
        self.capacity = capacity
        self._fb = lay.feature_bytes
        self.x = np.empty((capacity, lay.dim), dtype=np.float32)
        if lay.label_kind == "none":
            self.y = None
            self._rec = self.x.view(np.uint8)  # the record is the features: read in place
        else:
            self.y = np.empty((capacity,) if lay.label_kind == "scalar" else (capacity, lay.label_dim), dtype=np.float64 if lay.label_kind == "scalar" else np.float32)
            self._rec = np.empty((capacity, lay.record_bytes), dtype=np.uint8)

    def _split(self, m: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.y is None:
            return self.x[:m], None
        self.x[:m] = self._rec[:m, : self._fb].view(np.float32)
        labels = self._rec[:m, self._fb :].view(self.y.dtype)
        self.y[:m] = labels[:, 0] if self.y.ndim == 1 else labels
        return self.x[:m], self.y[:m]

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows ``idx`` (in that order)."""
        self.file.read_rows(idx, self._rec)
        return self._split(len(idx))

    def range(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows ``start .. start + count``."""
        self.file.read_range(start, self._rec[:count])
        return self._split(count)

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The first ``rows`` rows, ``capacity`` at a time, in file order."""
        for lo in range(0, rows, self.capacity):
            yield self.range(lo, min(self.capacity, rows - lo))


@dataclass
class Spilled:
    """A partition after :func:`spill_partition`: its two record files and what was learned
    about its rows while they streamed past."""

    rows: int = 0
    """Rows of the partition (training + validation)."""
    layout: Layout | None = None
    train: RowFile | None = None
    val: RowFile | None = None
    digest: float = 0.0
    """An order-independent fingerprint of the rows (which rows the partition holds)."""
    label_min: float = math.inf
    label_max: float = -math.inf
    label_nonwhole: int = 0
    """Scalar labels that are not whole numbers (class indices must be)."""
    seconds: float = 0.0
    """Time spent reading and spilling the partition."""

    @property
    def n_train(self) -> int:
        return self.train.rows if self.train is not None else 0

    @property
    def n_val(self) -> int:
        return self.val.rows if self.val is not None else 0

    def count_labels_outside(self, lo: float, hi: float) -> int:
        """Scalar labels outside ``[lo, hi)`` (a scan of both files; for error messages)."""
        bad = 0
        for file in (self.train, self.val):
            if file is None or file.rows == 0:
                continue
            reader = RowReader(file, min(file.rows, file.layout.rows_in(BUFFER_BYTES)))
            for _, y in reader.chunks(file.rows):
                bad += int(np.count_nonzero((y < lo) | (y >= hi)))  # type: ignore[operator]
        return bad

    def close(self) -> None:
        for file in (self.train, self.val):
            if file is not None:
                file.close()


def spill_partition(
    batches: Iterable[pa.RecordBatch], label_kind: str, directory: str, holdout_pct: float = 0.0, holdout_seed: int = 0
) -> Spilled:
    """Stream a partition's record batches into record files; return them and what was learned.

    Raises :class:`DataError` for null rows or vector elements and vectors of different lengths
    (at the batch that shows it), and for rows with NaN or infinity (after the whole partition,
    with the count of such rows). On error the files are closed (and so gone).
    """
    import time

    t0 = time.perf_counter()
    out = Spilled()
    bad_x = bad_y = 0
    keys: np.ndarray | None = None
    try:
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            x = _list_column_to_matrix(batch.column(batch.schema.get_field_index(FEATURES)), FEATURES, out.layout.dim if out.layout else None)
            y = _labels(batch, label_kind, out.layout.label_dim if out.layout and label_kind == "vector" else None)
            if out.layout is None:
                if x.shape[1] == 0:
                    raise DataError(f"column {FEATURES!r}: the feature vectors are empty")
                out.layout = Layout(x.shape[1], label_kind, y.shape[1] if y is not None and y.ndim == 2 else 0)
                out.train = RowFile(directory, out.layout)
                if holdout_pct > 0:
                    out.val = RowFile(directory, out.layout)
                    keys = _hash_keys(out.layout.dim, holdout_seed)
            out.rows += n
            bad_rows_x, digest = _finite_rows_and_digest(x)
            bad_x += bad_rows_x
            out.digest += digest
            if y is not None:
                finite = np.isfinite(y) if y.ndim == 1 else np.isfinite(y).all(axis=1)
                bad_y += n - int(np.count_nonzero(finite))
                if label_kind == "scalar" and finite.any():
                    yf = y[finite]
                    out.label_min = min(out.label_min, float(yf.min()))
                    out.label_max = max(out.label_max, float(yf.max()))
                    out.label_nonwhole += int(np.count_nonzero(np.mod(yf, 1)))
            if bad_x or bad_y:
                continue  # the partition fails after the count; nothing more to write
            if keys is not None:
                held = _held_out(x, keys, holdout_pct)
                if held.any():
                    keep = ~held
                    out.val.append(x[held], None if y is None else y[held])  # type: ignore[union-attr]
                    out.train.append(x[keep], None if y is None else y[keep])  # type: ignore[union-attr]
                    continue
            out.train.append(x, y)  # type: ignore[union-attr]
        if bad_x:
            raise DataError(f"inputCol (features): {bad_x} row(s) contain NaN or infinity; clean or impute them before fitting")
        if bad_y:
            raise DataError(f"labelCol: {bad_y} row(s) contain NaN or infinity; clean or impute them before fitting")
    except BaseException:
        out.close()
        raise
    out.seconds = time.perf_counter() - t0
    return out


def _list_column_to_matrix(arr: pa.Array, name: str, dim: int | None) -> np.ndarray:
    """One batch's ``list<float>`` column as an ``(n, d)`` float32 matrix (a view of the Arrow
    buffer when it is float32), checking nulls and that every vector has the length ``dim``
    (the first row's when ``dim`` is None)."""
    if isinstance(arr, pa.ChunkedArray):  # pragma: no cover - a RecordBatch column is one Array
        arr = pa.concat_arrays(arr.chunks)
    n = len(arr)
    if arr.null_count:
        raise DataError(f"column {name!r}: {arr.null_count} row(s) are null; drop or fill them before fitting")
    offsets = arr.offsets.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    d = int(lengths[0]) if dim is None else dim
    if not np.all(lengths == d):
        bad = int(np.count_nonzero(lengths != d))
        raise DataError(f"column {name!r}: vectors differ in length ({bad} row(s) differ from the first row's {d})")
    values = arr.values.slice(int(offsets[0]), n * d)
    if values.null_count:
        raise DataError(f"column {name!r}: {values.null_count} vector element(s) are null")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d)


def _labels(batch: pa.RecordBatch, label_kind: str, dim: int | None) -> np.ndarray | None:
    if label_kind == "none":
        return None
    col = batch.column(batch.schema.get_field_index(LABEL))
    if label_kind == "vector":
        return _list_column_to_matrix(col, LABEL, dim)
    if col.null_count:
        raise DataError(f"column {LABEL!r}: {col.null_count} row(s) have a null label")
    return col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _finite_rows_and_digest(x: np.ndarray) -> tuple[int, float]:
    """(rows holding NaN or infinity, the batch's part of the rows digest).

    One pass over the batch serves both: the row sums. A row with NaN or infinity has a
    non-finite sum; only then are the rows checked one by one. The digest is the sum of
    ``sin(row sum)``: which rows a partition holds, whatever their order (a fingerprint for logs
    and tests, not a checksum).
    """
    p = x.sum(axis=1, dtype=np.float32)
    if np.isfinite(p).all():
        return 0, float(np.sum(np.sin(p.astype(np.float64))))
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
    if bad == 0:  # finite but huge values overflowed float32: the digest in float64
        return 0, float(np.sum(np.sin(x.sum(axis=1, dtype=np.float64))))
    return bad, 0.0


def _hash_keys(dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([0x5EED, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF])
    return (rng.integers(0, 2**31, size=dim + 1, dtype=np.uint64) * 2 + 1).astype(np.uint32)


def _held_out(x: np.ndarray, keys: np.ndarray, pct: float) -> np.ndarray:
    """Whether each row is in the validation holdout: a seeded hash of its feature bytes,
    below ``pct`` as a fraction of 2**32 (the same row is held out in every task and shuffle)."""
    threshold = int(pct * 2**32)
    words = x.view(np.uint32)
    held = np.empty(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        for lo in range(0, len(x), _HASH_ROWS):
            h = (words[lo : lo + _HASH_ROWS] * keys[:-1]).sum(axis=1, dtype=np.uint32) + keys[-1]
            h ^= h >> np.uint32(16)
            h *= _FMIX_1
            h ^= h >> np.uint32(13)
            h *= _FMIX_2
            h ^= h >> np.uint32(16)
            held[lo : lo + _HASH_ROWS] = h.astype(np.int64) < threshold
    return held


class ShuffledPasses:
    """Mini-batches of row indices in shuffled passes, as ``DataLoader(shuffle=True,
    generator=gen)`` draws them: each pass is ``torch.randperm(n, generator=gen)`` cut into
    consecutive batches (the last one smaller when ``batch`` does not divide ``n``), so each row
    is used once per pass. A pass also makes the generator draws a DataLoader epoch makes
    besides its permutation (the iterator's base seed before it, ``RandomSampler``'s permutation
    for the ``num_samples % n`` remainder after it), so the same generator seed gives the same
    batches in both (checked against ``torch.utils.data.DataLoader`` by the tests).

    Memory: one int64 index per row (8 bytes a row; 16 for a moment at a pass boundary).
    """

    def __init__(self, n: int, batch: int, gen: object) -> None:
        self.n, self.batch, self._gen = n, batch, gen
        self.steps_per_pass = -(-n // batch)
        self._perm: np.ndarray | None = None
        self._at = 0  # batch number within the current pass

    def _new_pass(self) -> None:
        import torch

        self._perm = None
        torch.empty((), dtype=torch.int64).random_(generator=self._gen)  # the DataLoader iterator's base seed
        perm = torch.randperm(self.n, generator=self._gen).numpy()
        torch.randperm(self.n, generator=self._gen)  # RandomSampler's remainder draw
        self._perm, self._at = perm, 0

    def skip(self, steps: int) -> None:
        """Advance past ``steps`` batches (a retried task continues where its order was)."""
        while steps > 0:
            if self._perm is None or self._at >= self.steps_per_pass:
                self._new_pass()
            take = min(steps, self.steps_per_pass - self._at)
            self._at += take
            steps -= take

    def next(self) -> np.ndarray:
        """The row indices of the next step."""
        if self._perm is None or self._at >= self.steps_per_pass:
            self._new_pass()
        lo = self._at * self.batch
        self._at += 1
        return self._perm[lo : lo + self.batch]  # type: ignore[index]
