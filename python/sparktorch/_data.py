"""The Arrow data path: Spark columns -> Arrow record batches -> numpy/torch, no per-row objects.

On the driver, :func:`training_frame` checks the columns and selects them in the layout the
tasks read: features as ``array<float>`` (``vector_to_array(inputCol, "float32")``) and the
label as a double, or as ``array<float>`` when it is a vector/array. In a task,
:func:`batches_to_numpy` concatenates the Arrow buffers of a partition into one ``(n, d)``
float32 matrix (and labels) by reading the flat child arrays directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .errors import DataError

FEATURES = "features"
LABEL = "label"

# Spark SQL type names accepted for a scalar label.
_NUMERIC_TYPES = ("ByteType", "ShortType", "IntegerType", "LongType", "FloatType", "DoubleType", "DecimalType", "BooleanType")


@dataclass(frozen=True)
class FrameInfo:
    """What the driver learned about the training columns."""

    feature_dim: int | None
    """Length of the feature vectors when known from column metadata, else None."""
    label_kind: str
    """``"none"`` (autoencoder: the features are the target), ``"scalar"`` or ``"vector"``."""


def _type_name(dtype: object) -> str:
    return type(dtype).__name__


def is_vector_type(dtype: object) -> bool:
    """True for a Spark ML ``VectorUDT`` column type."""
    from pyspark.ml.linalg import VectorUDT

    return isinstance(dtype, VectorUDT)


def _feature_dim_from_metadata(field: object) -> int | None:
    meta = getattr(field, "metadata", None) or {}
    attrs = meta.get("ml_attr", {})
    n = attrs.get("num_attrs")
    if isinstance(n, int) and n > 0:
        return n
    return None


def check_feature_column(df: object, col: str, param: str = "inputCol") -> object:
    """The schema field of a vector/array feature column, or a :class:`DataError` naming it."""
    from pyspark.sql.types import ArrayType

    names = df.columns  # type: ignore[attr-defined]
    if col not in names:
        raise DataError(f"{param}: column {col!r} is not in the DataFrame (columns: {', '.join(names)})")
    field = df.schema[col]  # type: ignore[attr-defined]
    dtype = field.dataType
    if is_vector_type(dtype):
        return field
    if isinstance(dtype, ArrayType) and _type_name(dtype.elementType) in _NUMERIC_TYPES:
        return field
    raise DataError(
        f"{param}: column {col!r} has type {dtype.simpleString()}; expected a Spark ML Vector "
        "(e.g. from VectorAssembler) or an array of numbers"
    )


def training_frame(df: object, input_col: str, label_col: str | None) -> tuple[object, FrameInfo]:
    """Select and convert the training columns; validate them. No Spark job runs.

    Returns the DataFrame of ``features: array<float>`` (+ ``label``: double or array<float>)
    and what is known about it.
    """
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType

    field = check_feature_column(df, input_col, "inputCol")
    feat = F.col(input_col)
    features = (vector_to_array(feat, "float32") if is_vector_type(field.dataType) else feat.cast("array<float>")).alias(FEATURES)
    feature_dim = _feature_dim_from_metadata(field)

    if label_col is None or label_col == "":
        return df.select(features), FrameInfo(feature_dim, "none")  # type: ignore[attr-defined]

    names = df.columns  # type: ignore[attr-defined]
    if label_col not in names:
        raise DataError(f"labelCol: column {label_col!r} is not in the DataFrame (columns: {', '.join(names)})")
    ldtype = df.schema[label_col].dataType  # type: ignore[attr-defined]
    if is_vector_type(ldtype):
        label, kind = vector_to_array(F.col(label_col), "float32").alias(LABEL), "vector"
    elif isinstance(ldtype, ArrayType) and _type_name(ldtype.elementType) in _NUMERIC_TYPES:
        label, kind = F.col(label_col).cast("array<float>").alias(LABEL), "vector"
    elif _type_name(ldtype) in _NUMERIC_TYPES:
        label, kind = F.col(label_col).cast("double").alias(LABEL), "scalar"
    else:
        raise DataError(
            f"labelCol: column {label_col!r} has type {ldtype.simpleString()}; expected a number, "
            "a Vector or an array of numbers (index string labels first, e.g. with StringIndexer)"
        )
    return df.select(features, label), FrameInfo(feature_dim, kind)  # type: ignore[attr-defined]


def _list_column_to_matrix(arr: pa.Array, name: str) -> np.ndarray:
    """A ``list<float>`` Arrow column as an ``(n, d)`` float32 matrix, without per-row objects."""
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks != 1 else arr.chunk(0)
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if arr.null_count:
        raise DataError(f"column {name!r}: {arr.null_count} row(s) are null; drop or fill them before fitting")
    offsets = arr.offsets.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    d = int(lengths[0])
    if not np.all(lengths == d):
        bad = int(np.count_nonzero(lengths != d))
        raise DataError(f"column {name!r}: vectors differ in length ({bad} row(s) differ from the first row's {d})")
    values = arr.values.slice(int(offsets[0]), n * d)
    if values.null_count:
        raise DataError(f"column {name!r}: {values.null_count} vector element(s) are null")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, d)


def batches_to_numpy(batches: Iterable[pa.RecordBatch], label_kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate a partition's record batches into features ``(n, d)`` and labels.

    Labels are ``(n,)`` float64 for scalar labels, ``(n, k)`` float32 for vector labels, None
    without a label column. An empty partition gives ``n == 0``.
    """
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return np.zeros((0, 0), dtype=np.float32), None
    table = pa.Table.from_batches(batches)
    x = _list_column_to_matrix(table.column(FEATURES), FEATURES)
    if label_kind == "none":
        return x, None
    col = table.column(LABEL)
    if label_kind == "vector":
        return x, _list_column_to_matrix(col, LABEL)
    if col.null_count:
        raise DataError(f"column {LABEL!r}: {col.null_count} row(s) have a null label")
    y = col.to_numpy().astype(np.float64, copy=False)
    return x, y


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise :class:`DataError` with the count of rows holding NaN or infinity."""
    if x.size and not np.isfinite(x).all():
        rows = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        raise DataError(f"{what}: {int(rows.sum())} row(s) contain NaN or infinity; clean or impute them before fitting")
