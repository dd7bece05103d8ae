"""Saving and loading sparktorch stages with plain ``save`` / ``load`` (no unwrap step).

Layout of a saved :class:`~sparktorch.SparkTorchModel` directory::

    metadata/part-00000        DefaultParamsWriter JSON: class, uid, params (modStr left out),
                               plus "sparktorch": {formatVersion, modelKind, files: {name: sha256}}
    data/model.json            the model definition: {"kind": "spec", "spec": {class, kwargs}}
                               or {"kind": "pickle"}
    data/weights.safetensors   the weights (state dict)
    data/model.pkl             kind "pickle" only: the cloudpickled module
    data/history.json          the training history (a JSON list)

The ``class`` in the metadata (``sparktorch.model.SparkTorchModel``) is what
``PipelineModel.load`` uses to find this reader. A "spec" model is rebuilt by importing its class
and loading safetensors weights: nothing is unpickled. Any failure to read raises
:class:`~sparktorch.errors.PersistenceError` naming the file and the cause.

:class:`SparkTorchParamsWritable` / :class:`SparkTorchParamsReadable` give the same versioned,
checked persistence to stages whose state is only params (the unfitted ``SparkTorch``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse

from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import SparkSession

from sparktorch._serialize import (
    _from_json_value,
    _to_json_value,
    build_from_spec,
    load_safetensors_into,
    model_from_parts,
    serialize_model,
    split_model_string,
    state_dict_to_safetensors,
)
from sparktorch.errors import PersistenceError, SerializationError

__all__ = [
    "FORMAT_VERSION",
    "SparkTorchModelWriter",
    "SparkTorchModelReader",
    "SparkTorchParamsWriter",
    "SparkTorchParamsReader",
    "SparkTorchParamsWritable",
    "SparkTorchParamsReadable",
]

_log = logging.getLogger("sparktorch")

#: version of the on-disk layout; readers refuse directories with a newer one
FORMAT_VERSION = 1
_MODEL_JSON = "data/model.json"
_WEIGHTS = "data/weights.safetensors"
_PICKLE = "data/model.pkl"
_HISTORY = "data/history.json"
_MAX_SIDE_FILE_BYTES = 1 << 34  # 16 GiB: refuse to read anything larger

R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# file access: local paths with Python I/O (atomic writes), others through Hadoop's FileSystem


def _local_path(path: str) -> str | None:
    parsed = urlparse(path)
    if parsed.scheme == "":
        return path
    if parsed.scheme == "file":
        return parsed.path
    return None


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    local = _local_path(path)
    if local is not None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(local) or ".")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[union-attr]
    out = fs.create(hpath, True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()


def _read_bytes(spark: SparkSession, path: str) -> bytes:
    local = _local_path(path)
    if local is not None:
        size = os.path.getsize(local)
        if size > _MAX_SIDE_FILE_BYTES:
            raise OSError(f"{size} bytes is more than the {_MAX_SIDE_FILE_BYTES} allowed")
        with open(local, "rb") as fh:
            return fh.read()
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[union-attr]
    stream = fs.open(hpath)
    try:
        return bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(stream))  # type: ignore[union-attr]
    finally:
        stream.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# metadata


def _sparktorch_meta(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"formatVersion": FORMAT_VERSION}
    try:
        from importlib.metadata import version

        meta["sparktorchVersion"] = version("sparktorch")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        pass
    meta.update(extra or {})
    return meta


def _load_metadata(path: str, spark: SparkSession) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check ``path/metadata``; return (metadata, its "sparktorch" section)."""
    meta_path = _join(path, "metadata")
    try:
        metadata = DefaultParamsReader.loadMetadata(path, spark)
    except Exception as exc:  # noqa: BLE001 - JVM, JSON and missing-file errors alike
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PersistenceError(
            f"cannot read {meta_path}: {type(exc).__name__}: {cause}"
        ) from exc
    if not isinstance(metadata, dict) or "class" not in metadata or "paramMap" not in metadata:
        raise PersistenceError(f"corrupt {meta_path}: not a Spark ML stage metadata")
    section = metadata.get("sparktorch")
    if not isinstance(section, dict):
        raise PersistenceError(
            f"{meta_path} has no 'sparktorch' section: not saved by this sparktorch (a stage "
            "saved by sparktorch 0.2.0 is a pickle and is not loaded; re-save it from the "
            "original model with this version)"
        )
    version = section.get("formatVersion")
    if not isinstance(version, int):
        raise PersistenceError(f"corrupt {meta_path}: bad sparktorch formatVersion {version!r}")
    if version > FORMAT_VERSION:
        raise PersistenceError(
            f"{meta_path} has sparktorch format version {version}, newer than this sparktorch "
            f"reads ({FORMAT_VERSION}); upgrade sparktorch"
        )
    return metadata, section


def _set_params(instance: Any, metadata: dict[str, Any], path: str) -> None:
    try:
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
    except Exception as exc:  # noqa: BLE001
        raise PersistenceError(
            f"cannot restore params from {_join(path, 'metadata')}: {type(exc).__name__}: {exc}"
        ) from exc


# --------------------------------------------------------------------------------------------
# SparkTorchModel


class SparkTorchModelWriter(MLWriter):
    """Saves a :class:`~sparktorch.SparkTorchModel`: JSON params, safetensors weights, model
    definition (import path + JSON kwargs, or a cloudpickle for models without one), history."""

    def __init__(self, instance: Any) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        spark = self.sparkSession
        inst = self.instance
        mod_str = inst.getModStr()
        files: dict[str, bytes] = {}
        kind = "none"
        if mod_str:
            parts = split_model_string(mod_str)
            kind = parts.kind
            if parts.kind == "spec":
                assert parts.spec is not None
                doc = {
                    "kind": "spec",
                    "spec": {"class": parts.spec[0], "kwargs": _to_json_value(parts.spec[1])},
                }
                files[_WEIGHTS] = parts.payload
            else:
                doc = {"kind": "pickle"}
                files[_PICKLE] = parts.payload
                weights = state_dict_to_safetensors(model_from_parts(parts))
                if weights is not None:
                    files[_WEIGHTS] = weights
            files[_MODEL_JSON] = json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")
        history = getattr(inst, "_training_history", []) or []
        files[_HISTORY] = json.dumps(history).encode("utf-8")
        params = {
            p.name: v for p, v in inst._paramMap.items() if p.name != "modStr"
        }
        extra = {
            "sparktorch": _sparktorch_meta(
                {"modelKind": kind, "files": {name: _sha256(data) for name, data in files.items()}}
            )
        }
        # metadata first: without overwrite() it fails on an existing path before any side file
        DefaultParamsWriter.saveMetadata(inst, path, spark, extraMetadata=extra, paramMap=params)
        for name, data in files.items():
            try:
                _write_bytes(spark, _join(path, name), data)
            except OSError as exc:
                raise PersistenceError(f"cannot write {_join(path, name)}: {exc}") from exc


class SparkTorchModelReader(MLReader[R], Generic[R]):
    """Loads what :class:`SparkTorchModelWriter` saved; PersistenceError naming the file on
    corrupt, truncated, newer-format or unimportable content."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def _side_file(self, path: str, name: str, section: dict[str, Any]) -> bytes:
        full = _join(path, name)
        try:
            data = _read_bytes(self.sparkSession, full)
        except OSError as exc:
            raise PersistenceError(f"cannot read {full}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - Hadoop errors through py4j
            raise PersistenceError(f"cannot read {full}: {type(exc).__name__}") from exc
        want = (section.get("files") or {}).get(name)
        if want is not None and want != _sha256(data):
            raise PersistenceError(
                f"{full} is corrupt or truncated: its SHA-256 does not match the one recorded "
                f"in {_join(path, 'metadata')}"
            )
        return data

    def load(self, path: str) -> R:
        metadata, section = _load_metadata(path, self.sparkSession)
        instance = self.cls()
        _set_params(instance, metadata, path)
        kind = section.get("modelKind")
        if kind in ("spec", "pickle"):
            instance._set(modStr=self._load_model_string(path, section, kind))
        elif kind != "none":
            raise PersistenceError(
                f"corrupt {_join(path, 'metadata')}: unknown sparktorch modelKind {kind!r}"
            )
        raw = self._side_file(path, _HISTORY, section)
        try:
            history = json.loads(raw)
            if not isinstance(history, list):
                raise ValueError("not a list")
        except ValueError as exc:
            raise PersistenceError(f"corrupt {_join(path, _HISTORY)}: {exc}") from exc
        instance._training_history = history
        return instance

    def _load_model_string(self, path: str, section: dict[str, Any], kind: str) -> str:
        model_json = _join(path, _MODEL_JSON)
        try:
            doc = json.loads(self._side_file(path, _MODEL_JSON, section))
            if doc["kind"] != kind:
                raise ValueError(f"kind {doc['kind']!r} but metadata says {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise PersistenceError(f"corrupt {model_json}: {exc}") from exc
        if kind == "spec":
            try:
                spec = (doc["spec"]["class"], _from_json_value(doc["spec"]["kwargs"] or {}))
            except (KeyError, TypeError) as exc:
                raise PersistenceError(f"corrupt {model_json}: {exc}") from exc
            try:
                module = build_from_spec(spec, what=f"model class in {model_json}")
            except SerializationError as exc:
                raise PersistenceError(f"cannot rebuild the model of {model_json}: {exc}") from exc
        else:
            pickle_file = _join(path, _PICKLE)
            payload = self._side_file(path, _PICKLE, section)
            _log.info("sparktorch: unpickling the model definition %s", pickle_file)
            try:
                import cloudpickle

                module = cloudpickle.loads(payload)
            except Exception as exc:  # noqa: BLE001
                raise PersistenceError(
                    f"cannot unpickle {pickle_file}: {type(exc).__name__}: {exc}"
                ) from exc
            spec = None
        names = section.get("files") or {}
        if kind == "spec" or _WEIGHTS in names:
            weights = self._side_file(path, _WEIGHTS, section)
            try:
                load_safetensors_into(module, weights, what=_join(path, _WEIGHTS))
            except SerializationError as exc:
                raise PersistenceError(str(exc)) from exc
        try:
            return serialize_model(module, spec)
        except SerializationError as exc:
            raise PersistenceError(f"cannot use the model of {model_json}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# params-only stages (the unfitted SparkTorch estimator)


class SparkTorchParamsWriter(DefaultParamsWriter):
    """``DefaultParamsWriter`` that also records the sparktorch format version."""

    def saveImpl(self, path: str) -> None:
        DefaultParamsWriter.saveMetadata(
            self.instance,
            path,
            self.sparkSession,
            extraMetadata={"sparktorch": _sparktorch_meta({"modelKind": "none"})},
        )


class SparkTorchParamsReader(MLReader[R], Generic[R]):
    """Reads what :class:`SparkTorchParamsWriter` saved; PersistenceError on bad content."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> R:
        metadata, _ = _load_metadata(path, self.sparkSession)
        instance = self.cls()
        _set_params(instance, metadata, path)
        return instance


class SparkTorchParamsWritable(MLWritable):
    """Mixin: ``write()`` returns a :class:`SparkTorchParamsWriter` (params-only stages)."""

    def write(self) -> MLWriter:
        """A writer that saves this stage's params as versioned JSON metadata."""
        return SparkTorchParamsWriter(self)  # type: ignore[arg-type]


class SparkTorchParamsReadable(MLReadable[R], Generic[R]):
    """Mixin: ``read()`` returns a :class:`SparkTorchParamsReader` (params-only stages)."""

    @classmethod
    def read(cls) -> SparkTorchParamsReader[R]:
        """A reader for directories written by :class:`SparkTorchParamsWriter`."""
        return SparkTorchParamsReader(cls)
