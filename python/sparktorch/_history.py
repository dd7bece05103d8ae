"""A fitted model's training history, held by column.

A fit records every applied push as ``(worker, step, loss, val_loss)``; the server keeps up to
2^20 of them. Held as one Python dict per record, that is some 400 MB in the driver; held as
four numpy columns it is 28 bytes a record (28 MiB at 2^20). :class:`TrainingHistory` is that
columnar form. It reads as a sequence of the ``{"worker", "step", "loss", "val_loss"}`` dicts
``getTrainingHistory`` has always returned, built one at a time when asked for; a missing
validation loss is NaN in the column and ``None`` in a record.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import numpy as np

__all__ = ["TrainingHistory", "COLUMNS"]

COLUMNS = ("worker", "step", "loss", "val_loss")


class TrainingHistory(Sequence[dict[str, Any]]):
    """Training records by column: ``worker`` (int32), ``step`` (int64), ``loss`` and
    ``val_loss`` (float64; NaN where a step had no validation loss). Immutable."""

    __slots__ = ("worker", "step", "loss", "val_loss")

    def __init__(self, worker: np.ndarray, step: np.ndarray, loss: np.ndarray, val_loss: np.ndarray) -> None:
        n = len(worker)
        if not (len(step) == len(loss) == len(val_loss) == n):
            raise ValueError("training history columns of different lengths")
        self.worker = np.ascontiguousarray(worker, dtype=np.int32)
        self.step = np.ascontiguousarray(step, dtype=np.int64)
        self.loss = np.ascontiguousarray(loss, dtype=np.float64)
        self.val_loss = np.ascontiguousarray(val_loss, dtype=np.float64)
        for column in (self.worker, self.step, self.loss, self.val_loss):
            column.setflags(write=False)

    @classmethod
    def empty(cls) -> TrainingHistory:
        return cls(np.empty(0), np.empty(0), np.empty(0), np.empty(0))

    @classmethod
    def from_entries(cls, entries: Any) -> TrainingHistory:
        """From the engine's ``(worker, step, loss, val_loss)`` entries: a sequence of tuples or
        an ``(n, 4)`` float64 array."""
        table = np.asarray(entries, dtype=np.float64).reshape(-1, 4)
        return cls(table[:, 0], table[:, 1], table[:, 2], table[:, 3])

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> TrainingHistory:
        """From ``{"worker", "step", "loss", "val_loss"}`` dicts (``val_loss`` None or absent:
        NaN). Raises ValueError (or TypeError) on a record without a number where one belongs."""
        rows = list(records)
        worker = np.fromiter((int(r.get("worker", 0)) for r in rows), dtype=np.int32, count=len(rows))
        step = np.fromiter((int(r["step"]) for r in rows), dtype=np.int64, count=len(rows))
        loss = np.fromiter((float(r["loss"]) for r in rows), dtype=np.float64, count=len(rows))
        val = np.fromiter(
            (np.nan if r.get("val_loss") is None else float(r["val_loss"]) for r in rows), dtype=np.float64, count=len(rows)
        )
        return cls(worker, step, loss, val)

    @classmethod
    def of(cls, value: Any) -> TrainingHistory:
        """``value`` as a history: a history as it is, None as empty, else records."""
        if isinstance(value, TrainingHistory):
            return value
        if value is None:
            return cls.empty()
        return cls.from_records(value)

    def __len__(self) -> int:
        return len(self.step)

    def _record(self, i: int) -> dict[str, Any]:
        val = float(self.val_loss[i])
        return {"worker": int(self.worker[i]), "step": int(self.step[i]), "loss": float(self.loss[i]), "val_loss": None if val != val else val}

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._record(i) for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("training history index out of range")
        return self._record(index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self._record(i)

    def records(self) -> list[dict[str, Any]]:
        """Every record as a dict (what ``getTrainingHistory()`` returns)."""
        return list(self)

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` with the four columns (``val_loss`` NaN where missing)."""
        import pandas as pd

        return pd.DataFrame({"worker": self.worker, "step": self.step, "loss": self.loss, "val_loss": self.val_loss}, columns=list(COLUMNS))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TrainingHistory):
            return (
                np.array_equal(self.worker, other.worker)
                and np.array_equal(self.step, other.step)
                and np.array_equal(self.loss, other.loss, equal_nan=True)
                and np.array_equal(self.val_loss, other.val_loss, equal_nan=True)
            )
        if isinstance(other, Sequence):
            return self.records() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TrainingHistory({len(self)} records)"
