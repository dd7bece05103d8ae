"""The Arrow data path: Spark columns -> Arrow record batches -> numpy/torch, no per-row objects.

On the driver, :func:`training_frame` checks the columns and selects them in the layout the
tasks read: features as ``array<float>`` (``vector_to_array(inputCol, "float32")``) and the
label as a double, or as ``array<float>`` when it is a vector/array. In a task, ``_spill``
streams those Arrow batches, one at a time, into a spill file the training steps read back.
"""

from __future__ import annotations

from dataclasses import dataclass

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
