"""Executor-side inference: the per-process model cache and the Arrow batch predictor.

The UDF closure carries the ``modStr`` and its content hash. Each Python worker process builds
the model once per (hash, device) and keeps it in :data:`_CACHE` (bounded, least recently used
evicted), so neither batches nor rows reload it; with ``spark.python.worker.reuse`` (the
default) the model survives from one task to the next.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn as nn

from sparktorch._serialize import deserialize_model
from sparktorch.errors import DataError, ParamError

__all__ = ["get_model", "resolve_device", "predict_array", "clear_cache"]

_log = logging.getLogger("sparktorch")

_CACHE_SIZE = 2
_CACHE: collections.OrderedDict[tuple[str, str], tuple[nn.Module, torch.device]] = (
    collections.OrderedDict()
)
_LOCK = threading.Lock()
#: how many times this process has built a model (tests read it to prove the cache works)
LOAD_COUNT = 0


def clear_cache() -> None:
    """Forget every cached model of this process."""
    with _LOCK:
        _CACHE.clear()


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device`` in this process.

    ``'cuda'`` picks the GPU Spark assigned to the running task (resource ``gpu``), else spreads
    tasks over the visible GPUs by partition id. Raises ParamError when CUDA is not available.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            import socket

            raise ParamError(
                f"param 'device' is {device!r} but CUDA is not available on "
                f"{socket.gethostname()} (torch {torch.__version__}, "
                f"cuda build {torch.version.cuda}); use device='cpu'"
            )
        if device != "cuda":
            return torch.device(device)
        count = torch.cuda.device_count()
        index = 0
        try:
            from pyspark import TaskContext

            ctx = TaskContext.get()
            if ctx is not None:
                gpus = ctx.resources().get("gpu")
                if gpus is not None and gpus.addresses:
                    index = int(gpus.addresses[0]) % count
                else:
                    index = ctx.partitionId() % count
        except Exception:  # noqa: BLE001 - no task context (driver): first GPU
            index = 0
        return torch.device("cuda", index)
    return torch.device(device)


def get_model(key: str, mod_str: str, device: str) -> tuple[nn.Module, torch.device]:
    """The model for ``mod_str`` (hash ``key``) on ``device``, built once per process."""
    global LOAD_COUNT
    cache_key = (key, device)
    with _LOCK:
        hit = _CACHE.get(cache_key)
        if hit is not None:
            _CACHE.move_to_end(cache_key)
            return hit
        dev = resolve_device(device)
        module = deserialize_model(mod_str).to(dev).eval()
        LOAD_COUNT += 1
        _CACHE[cache_key] = (module, dev)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        _log.debug("sparktorch: model %s loaded on %s", key[:12], dev)
        return module, dev


def _as_matrix(dense: pa.Array, column: str) -> np.ndarray:
    """A (rows, width) float32 matrix from a null-free list array, without per-row objects."""
    rows = len(dense)
    values = dense.flatten()
    if values.null_count:
        raise DataError(f"column {column!r} holds null elements inside vectors")
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    if rows == 0:
        return flat.reshape(0, 0)
    lengths = pc.list_value_length(dense)
    lo, hi = pc.min_max(lengths).values()
    if lo.as_py() != hi.as_py():
        raise DataError(
            f"rows of column {column!r} have different vector sizes ({lo.as_py()} to "
            f"{hi.as_py()}); the network needs one size"
        )
    return flat.reshape(rows, int(hi.as_py()))


def _forward(model: nn.Module, dev: torch.device, x: np.ndarray, batch: int) -> np.ndarray:
    outs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch):
            part = x[start : start + batch]
            if not part.flags.writeable:  # Arrow memory is read-only; an in-place layer
                part = part.copy()  # (ReLU(inplace=True)) must not write into it
            chunk = torch.from_numpy(part).to(dev, non_blocking=True)
            out = model(chunk)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.detach().to("cpu", torch.float64).reshape(chunk.shape[0], -1))
    return torch.cat(outs).numpy()


def predict_array(
    arr: pa.Array | pa.ChunkedArray,
    *,
    key: str,
    mod_str: str,
    device: str,
    batch_size: int,
    vector_out: bool,
    column: str,
) -> pa.Array:
    """Predict one Arrow batch of ``list<float>`` rows; null rows give null predictions.

    Returns ``float64`` (argmax when the output has several values per row, else the value) or
    ``list<float64>`` (the whole output) when ``vector_out``.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    valid = None
    dense = arr
    if arr.null_count:
        valid_arr = arr.is_valid()
        valid = valid_arr.to_numpy(zero_copy_only=False)
        dense = arr.filter(valid_arr)
    if len(dense):
        model, dev = get_model(key, mod_str, device)
        out = _forward(model, dev, _as_matrix(dense, column), batch_size)
    else:
        out = np.zeros((0, 0), dtype=np.float64)
    if vector_out:
        offsets = list_offsets(n, out.shape[1], valid, column)
        if valid is None:
            return pa.ListArray.from_arrays(offsets, pa.array(out.ravel()))
        return pa.ListArray.from_arrays(offsets, pa.array(out.ravel()), mask=pa.array(~valid))
    if out.shape[1] > 1:
        pred = np.argmax(out, axis=1).astype(np.float64)
    elif out.shape[1] == 1:
        pred = out[:, 0]
    else:
        pred = np.zeros(out.shape[0], dtype=np.float64)
    if valid is None:
        return pa.array(pred, type=pa.float64())
    full = np.zeros(n, dtype=np.float64)
    full[valid] = pred
    return pa.array(full, type=pa.float64(), mask=~valid)


_MAX_LIST_VALUES = (1 << 31) - 1
"""Values one Arrow ``list`` array (Spark's ``array`` column in a batch) can hold: int32 offsets."""


def list_offsets(n: int, width: int, valid: np.ndarray | None, column: str) -> pa.Array:
    """The int32 offsets of ``n`` output rows of ``width`` values each (null rows empty),
    computed in int64 and refused, not wrapped, past what int32 offsets can address."""
    counts = np.full(n, width, dtype=np.int64) if valid is None else valid.astype(np.int64) * width
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > _MAX_LIST_VALUES:
        rows = max(1, _MAX_LIST_VALUES // max(1, width))
        raise DataError(
            f"{column}: {n} rows x {width} output values = {int(offsets[-1]):,} values in one Arrow batch, over the "
            f"{_MAX_LIST_VALUES:,} a Spark array column's batch can hold; set "
            f"spark.sql.execution.arrow.maxRecordsPerBatch to at most {rows:,}"
        )
    return pa.array(offsets.astype(np.int32), type=pa.int32())


def make_predict_fn(**kwargs: Any) -> Any:
    """A one-argument function ``pa.Array -> pa.Array`` bound to ``kwargs`` (for the UDF)."""

    def predict(arr: pa.Array) -> pa.Array:
        return predict_array(arr, **kwargs)

    return predict
