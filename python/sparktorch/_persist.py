"""Saving and loading sparktorch stages with plain ``save`` / ``load`` (no unwrap step).

Layout of a saved :class:`~sparktorch.SparkTorchModel` directory::

    metadata/part-00000        DefaultParamsWriter JSON: class, uid, params (modStr left out),
                               plus "sparktorch": {formatVersion, modelKind, files: {name: sha256}}
    data/model.json            the model definition: {"kind": "spec", "spec": <model spec>}
                               or {"kind": "pickle"}
    data/weights.safetensors   the weights (state dict)
    data/model.pkl             kind "pickle" only: the cloudpickled module
    data/history.json          the training history (a JSON list)

The ``class`` in the metadata (``sparktorch.model.SparkTorchModel``) is what
``PipelineModel.load`` uses to find this reader. A "spec" model (an import path + JSON kwargs,
or a container tree of ``torch.nn`` layers, see :mod:`sparktorch._serialize`) is rebuilt after
its class names pass the load's :class:`~sparktorch._serialize.ClassPolicy` *as text*
(``torch.nn`` plus the call's ``allowed_classes``), after it was built on the ``meta`` device
and compared with the safetensors header (names, shapes, dtypes), and then loads its weights:
nothing is unpickled. A "pickle" model, and an estimator whose ``torchObj`` is a pickle, load
only with ``allow_pickle=True`` on that load (:class:`LoadOptions`), or the process-wide switch
(:data:`ALLOW_PICKLE_CONF`, :data:`ALLOW_PICKLE_ENV`), which warns on every use; without either
:class:`~sparktorch.errors.UnsafeModelError` names the file and the opt-in before anything is
unpickled. Any failure to read raises
:class:`~sparktorch.errors.PersistenceError` naming the file and the cause.

Paths are resolved as Spark resolves the metadata's: a path without a scheme is qualified
against Hadoop's default filesystem (``fs.defaultFS``) and its working directory, so the side
files always land next to ``metadata/``. Qualified ``file:`` paths are written with Python I/O
(temp file + rename); any other filesystem through Hadoop's ``FileSystem`` API.

:class:`SparkTorchParamsWritable` / :class:`SparkTorchParamsReadable` give the same versioned,
checked persistence to stages whose state is only params (the unfitted ``SparkTorch``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Generic, Iterator, TypeVar
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

from sparktorch._history import TrainingHistory
from sparktorch._serialize import (
    MAX_SPEC_PARAMS,
    ClassPolicy,
    build_from_spec,
    check_import_origin,
    check_stored_torch_obj,
    check_weights_fit,
    load_safetensors_into,
    model_from_parts,
    probe_spec,
    safetensors_manifest,
    model_string_from_spec,
    serialize_model,
    spec_format_version,
    split_model_string,
    state_dict_to_safetensors,
    torch_obj_class_paths,
    torch_obj_encoding,
)
from sparktorch.errors import PersistenceError, SerializationError, UnsafeModelError

__all__ = [
    "FORMAT_VERSION",
    "ALLOW_PICKLE_CONF",
    "ALLOW_PICKLE_ENV",
    "pickle_allowed",
    "LoadOptions",
    "SparkTorchModelWriter",
    "SparkTorchModelReader",
    "SparkTorchParamsWriter",
    "SparkTorchParamsReader",
    "SparkTorchParamsWritable",
    "SparkTorchParamsReadable",
]

_log = logging.getLogger("sparktorch")

#: highest version of the on-disk layout this reads; readers refuse directories with a newer
#: one. Writers stamp the lowest version that holds the content (2: a container-tree spec).
FORMAT_VERSION = 2
#: Spark conf that lets readers unpickle a stored pickle (``spark.conf.set(..., "true")``)
ALLOW_PICKLE_CONF = "spark.sparktorch.allowPickle"
#: environment variable that does the same (``1``, ``true`` or ``yes``)
ALLOW_PICKLE_ENV = "SPARKTORCH_ALLOW_PICKLE"
_MODEL_JSON = "data/model.json"
_WEIGHTS = "data/weights.safetensors"
_PICKLE = "data/model.pkl"
_HISTORY = "data/history.json"
_MAX_SIDE_FILE_BYTES = 1 << 34  # 16 GiB: refuse to read any weights file larger
_MAX_SMALL_FILE_BYTES = 64 << 20  # model.json, history.json, model.pkl: 64 MiB
_MAX_WEIGHTS_OVERHEAD = 16 << 20  # a safetensors header on top of the tensors' bytes

R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# file access: resolved like Spark resolves the metadata path (Hadoop's default filesystem);
# qualified file: paths with Python I/O (atomic writes), others through Hadoop's FileSystem


def _connect(spark: Any) -> bool:
    from ._session import is_connect

    return is_connect(spark)


def _meta_context(spark: Any) -> Any:
    """What ``DefaultParamsWriter``/``Reader`` take: the SparkContext on a classic session
    (PySpark 3.5 needs it), the session itself on Spark Connect (PySpark 4 takes either)."""
    return spark if _connect(spark) else spark.sparkContext


def _qualify(spark: SparkSession, path: str) -> str:
    """``path`` fully qualified on the filesystem Hadoop resolves it to.

    A path without a scheme is resolved against ``fs.defaultFS`` and that filesystem's working
    directory, exactly where ``DefaultParamsWriter`` puts ``metadata/`` (HDFS, DBFS, ... on a
    cluster; the JVM's working directory for the local filesystem). On Spark Connect (no JVM
    here) the server says where: the qualified name of the ``metadata/`` files it lists.
    """
    if _connect(spark):
        return _qualify_connect(spark, path)
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[union-attr]
    return str(fs.makeQualified(hpath).toString())


def _qualify_connect(spark: Any, path: str) -> str:
    meta = _join(path, "metadata")
    try:
        rows = spark.read.format("binaryFile").load(meta).select("path").limit(1).collect()
    except Exception as exc:  # noqa: BLE001 - the server's error, made readable below
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PersistenceError(f"cannot list {meta}: {cause}") from exc
    if not rows:
        raise PersistenceError(f"cannot list {meta}: no metadata file there")
    found = str(rows[0]["path"])
    cut = found.rfind("/metadata/")
    if cut < 0:
        raise PersistenceError(f"cannot qualify {path}: the server lists its metadata as {found}")
    return found[:cut]


def _local_path(spark: SparkSession, path: str) -> str | None:
    """The local file behind a qualified ``file:`` path, else None (use Hadoop)."""
    if urlparse(path).scheme != "file":
        return None
    if _connect(spark):
        from urllib.parse import unquote

        return unquote(urlparse(path).path)
    jvm = spark.sparkContext._jvm
    return str(jvm.org.apache.hadoop.fs.Path(path).toUri().getPath())  # type: ignore[union-attr]


def _untrusted_root(spark: SparkSession, qualified: str) -> str | None:
    """The local directory tree a saved stage came from: the stage directory, or the whole
    outermost pipeline directory for a stage under ``<pipeline>/stages/``. No module is imported from
    inside it (a saved directory on ``sys.path`` is an importable package). None when the
    files are not on the local filesystem (Python cannot import from there)."""
    local = _local_path(spark, qualified)
    if local is None:
        return None
    local = os.path.normpath(local)
    while os.path.basename(os.path.dirname(local)) == "stages":  # pipelines nest
        local = os.path.dirname(os.path.dirname(local))
    return local


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _hadoop_fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath  # type: ignore[union-attr]


def _write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    """Write ``data`` to the qualified ``path``."""
    local = _local_path(spark, path)
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
    if _connect(spark):
        _write_bytes_arrow(path, data)
        return
    fs, hpath = _hadoop_fs(spark, path)
    out = fs.create(hpath, True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()


def _read_bytes(spark: SparkSession, path: str, limit: int = _MAX_SIDE_FILE_BYTES) -> bytes:
    """Read the qualified ``path``, refusing (before reading) a file over ``limit`` bytes."""
    local = _local_path(spark, path)
    if local is not None and _connect(spark) and not os.path.exists(local):
        local = None  # the server's file, not on this client's machine: the server reads it
    if local is not None:
        size = os.path.getsize(local)
        if size > limit:
            raise OSError(f"{size} bytes is more than the {limit} allowed")
        with open(local, "rb") as fh:
            return fh.read()
    if _connect(spark):
        return _read_bytes_spark(spark, path, limit)
    fs, hpath = _hadoop_fs(spark, path)
    size = int(fs.getFileStatus(hpath).getLen())
    if size > limit:
        raise OSError(f"{size} bytes is more than the {limit} allowed")
    stream = fs.open(hpath)
    try:
        jvm = spark.sparkContext._jvm
        return bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(stream))  # type: ignore[union-attr]
    finally:
        stream.close()


_CONNECT_CHUNK = 4 << 20
"""Bytes of one row when a Spark Connect client reads a side file through the server."""


def _write_bytes_arrow(path: str, data: bytes) -> None:
    """Spark Connect, a non-local path: write with ``pyarrow.fs`` (S3, GCS, HDFS, ABFS, ...
    as pyarrow reaches them from this client)."""
    from pyarrow import fs as pafs

    uri = path.replace("s3a://", "s3://", 1)
    try:
        filesystem, inner = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow knows no such filesystem
        raise OSError(
            f"this Spark Connect client cannot write to {path} ({exc}); the stage's metadata is there, but its data "
            "files are written by the client: save to a filesystem the client reaches (a mounted volume, s3://, "
            "gs://, hdfs://, abfs://)"
        ) from exc
    with filesystem.open_output_stream(inner) as out:
        out.write(data)


def _read_bytes_spark(spark: Any, path: str, limit: int = _MAX_SIDE_FILE_BYTES) -> bytes:
    """Spark Connect, a path this client cannot open: the server reads it (``binaryFile``) and
    sends it back in rows of at most :data:`_CONNECT_CHUNK` bytes."""
    from pyspark.sql import functions as F

    df = spark.read.format("binaryFile").load(path)
    first = df.select("length").collect()
    if len(first) != 1:
        raise OSError("no such file")
    size = int(first[0]["length"])
    if size > limit:
        raise OSError(f"{size} bytes is more than the {limit} allowed")
    n = max(1, -(-size // _CONNECT_CHUNK))
    chunks = df.select(F.explode(F.sequence(F.lit(0), F.lit(n - 1))).alias("i"), "content").select(
        "i", F.expr(f"substring(content, i * {_CONNECT_CHUNK} + 1, {_CONNECT_CHUNK})").alias("data")
    )
    out = bytearray(size)
    got = 0
    for row in chunks.toLocalIterator():
        piece = bytes(row["data"])
        start = int(row["i"]) * _CONNECT_CHUNK
        out[start : start + len(piece)] = piece
        got += len(piece)
    if got != size:
        raise OSError(f"read {got} of {size} bytes")
    return bytes(out)


# --------------------------------------------------------------------------------------------
# the pickle opt-in and the classes a load accepts: per call


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What one load accepts beyond data: the caller's classes and the pickle opt-in.

    Attributes:
        policy: the classes a saved model or ``torchObj`` may name (``torch.nn``,
            ``torch.optim`` and the caller's ``allowed_classes``).
        allow_pickle: unpickle a stored pickle (a model of a class without a spec, a pickle
            ``torchObj``) in this load only.
        max_params: the most parameter values that a stored ``torchObj`` model without
            weights may describe (counted on the ``meta`` device; see ``MAX_SPEC_PARAMS``).
    """

    policy: ClassPolicy
    allow_pickle: bool = False
    max_params: int = MAX_SPEC_PARAMS

    @classmethod
    def of(
        cls, allowed_classes: Any = None, allow_pickle: bool = False, max_params: int | None = None
    ) -> LoadOptions:
        """Options from the keyword arguments of a ``load`` (checked: ParamError if wrong)."""
        from sparktorch.errors import ParamError

        if not isinstance(allow_pickle, bool):
            raise ParamError(f"allow_pickle must be True or False, got {allow_pickle!r}")
        if max_params is None:
            max_params = MAX_SPEC_PARAMS
        if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
            raise ParamError(f"max_params must be a positive int, got {max_params!r}")
        return cls(
            policy=ClassPolicy.from_storage(allowed_classes), allow_pickle=allow_pickle, max_params=max_params
        )


_LOAD_OPTIONS: contextvars.ContextVar[LoadOptions | None] = contextvars.ContextVar(
    "sparktorch_load_options", default=None
)
"""The options of the load in progress in this context (set by ``load(...)`` and
:func:`sparktorch.load_pipeline` for the readers of the stages they load), else None."""


@contextlib.contextmanager
def load_options(options: LoadOptions) -> Iterator[LoadOptions]:
    """Make ``options`` those of every sparktorch reader run inside the ``with`` block (in
    this context only), and restore the previous ones after: nothing leaks to the next load."""
    token = _LOAD_OPTIONS.set(options)
    try:
        yield options
    finally:
        _LOAD_OPTIONS.reset(token)


def current_load_options() -> LoadOptions:
    """The options of the load in progress; outside one (``PipelineModel.load``, ``read()``)
    the defaults: ``torch.nn`` classes only, no pickle."""
    return _LOAD_OPTIONS.get() or LoadOptions(policy=ClassPolicy.from_storage(()))


def pickle_allowed(spark: SparkSession | None, *, allow_pickle: bool = False, file: str = "") -> bool:
    """True when this load may unpickle ``file``: ``allow_pickle`` (the per-call opt-in) or
    the process-wide switch.

    The process-wide switch is the environment variable ``SPARKTORCH_ALLOW_PICKLE``
    (``1``/``true``/``yes``) or the Spark conf ``spark.sparktorch.allowPickle=true``. It
    exists for loads that cannot take an argument: a plain ``PipelineModel.load`` (pyspark
    calls each stage's ``load(path)`` itself) and programs written before the per-call
    opt-in. It opens every later load of the process to pickles, so each use logs a WARNING
    naming the file.
    """
    if allow_pickle:
        return True
    switch = None
    if os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes"):
        switch = f"the environment variable {ALLOW_PICKLE_ENV}"
    elif spark is not None:
        try:
            value = spark.conf.get(ALLOW_PICKLE_CONF, "false")
        except Exception:  # noqa: BLE001 - no conf: no opt-in
            value = "false"
        if str(value).strip().lower() == "true":
            switch = f"the Spark conf {ALLOW_PICKLE_CONF}"
    if switch is None:
        return False
    _log.warning(
        "sparktorch: unpickling %s because %s allows pickles process-wide: every load in this "
        "process may now run code from the files it reads. Prefer the per-call opt-in "
        "(SparkTorchModel.load(path, allow_pickle=True), sparktorch.load_pipeline(path, "
        "allow_pickle=True)) and unset the switch",
        file or "a stored pickle",
        switch,
    )
    return True


def _unsafe(file: str, what: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"{file} holds {what} as a pickle, and unpickling it can run arbitrary code, so it is "
        "not loaded without an opt-in: pass allow_pickle=True to this load "
        "(SparkTorchModel.load(path, allow_pickle=True), SparkTorch.load(...), "
        "sparktorch.load_pipeline(path, allow_pickle=True)), and only for files you trust. "
        f"(The process-wide switches {ALLOW_PICKLE_CONF}=true and {ALLOW_PICKLE_ENV}=1 still "
        "work, with a warning on every use. Models of torch.nn layers or of importable classes "
        "with a model_spec are saved without pickle by this sparktorch.)"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# metadata


def _sparktorch_meta(extra: dict[str, Any] | None = None, version: int = 1) -> dict[str, Any]:
    meta: dict[str, Any] = {"formatVersion": version}
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
        # The SparkContext: PySpark 3.5 needs it, 4.x takes it as well as a session.
        metadata = DefaultParamsReader.loadMetadata(path, _meta_context(spark))
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


def _weights_bytes(module: Any) -> int:
    """Bytes of ``module``'s state dict (a module on the ``meta`` device: nothing allocated)."""
    total = 0
    for value in module.state_dict().values():
        total += int(value.numel()) * int(value.element_size())
    return total


def _inside_dir(spark: Any, target: str, root_qualified: str) -> bool:
    """Whether ``target`` (a param's path) lies inside the saved directory ``root_qualified``."""
    from urllib.parse import urlparse

    parsed = urlparse(target)
    if parsed.scheme:
        import posixpath

        root = urlparse(root_qualified)
        if (parsed.scheme.lower(), parsed.netloc) != (root.scheme.lower(), root.netloc):
            return False  # another filesystem (or the same one spelled differently): outside
        # normalised: "hdfs://nn/saved/../elsewhere" is not inside "hdfs://nn/saved"
        got, base = posixpath.normpath(parsed.path or "/"), posixpath.normpath(root.path or "/")
        return got == base or got.startswith(base.rstrip("/") + "/")
    local = _local_path(spark, root_qualified)
    if local is None:
        return False
    root = os.path.realpath(local)
    real = os.path.realpath(target)
    return real == root or real.startswith(root + os.sep)


def _warn_weakening_params(spark: Any, instance: Any, path: str) -> None:
    """Log a WARNING naming each saved param that weakens the next ``fit``: ``psEncryption``
    ``'off'`` (the parameter server without TLS), a ``resumeFrom`` (the fit starts from a file
    that the directory chose), a ``checkpointPath`` outside the saved directory (the fit
    writes there). They take effect silently otherwise: the directory's writer chose them."""
    found: list[str] = []

    def value(name: str) -> Any:
        if not instance.hasParam(name) or not instance.isDefined(name):
            return None
        return instance.getOrDefault(name)

    if value("psEncryption") == "off":
        found.append("psEncryption='off' (the parameter server will not use TLS)")
    resume = value("resumeFrom")
    if resume:
        found.append(f"resumeFrom={resume!r} (the fit will start from that checkpoint)")
    ckpt = value("checkpointPath")
    if ckpt:
        try:
            root = _qualify(spark, path)
            inside = _inside_dir(spark, str(ckpt), root)
        except Exception:  # noqa: BLE001 - cannot tell: say so
            inside = False
        if not inside:
            found.append(f"checkpointPath={ckpt!r} (outside the saved directory: the fit will write there)")
    if found:
        _log.warning(
            "sparktorch: the stage loaded from %s has saved params that weaken or redirect its next fit: %s; "
            "check them (or set them yourself) before calling fit",
            path,
            "; ".join(found),
        )


# --------------------------------------------------------------------------------------------
# SparkTorchModel


def _delete_for_overwrite(spark: Any, path: str) -> None:
    """``write().overwrite()`` on Spark Connect, where pyspark's own handling needs the JVM:
    delete what is at ``path`` (a saved stage, located through the server; else a local path)."""
    import shutil

    try:
        root = _qualify_connect(spark, path)
    except PersistenceError:
        root = None
    if root is None:
        if os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        return
    local = _local_path(spark, root)
    if local is not None:
        if not os.path.isdir(os.path.join(local, "metadata")):
            raise PersistenceError(f"cannot overwrite {root}: the Spark Connect server's filesystem is not this client's")
        shutil.rmtree(local)
        return
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(root.replace("s3a://", "s3://", 1))
    filesystem.delete_dir(inner)


class _ConnectOverwrite:
    """Writer mixin: ``overwrite()`` works on Spark Connect too."""

    def _handleOverwrite(self, path: str) -> None:
        spark = self.sparkSession  # type: ignore[attr-defined]
        if _connect(spark):
            _delete_for_overwrite(spark, path)
        else:
            super()._handleOverwrite(path)  # type: ignore[misc]


class SparkTorchModelWriter(_ConnectOverwrite, MLWriter):
    """Saves a :class:`~sparktorch.SparkTorchModel`: JSON params, safetensors weights, model
    definition (a JSON model spec, or a cloudpickle for models without one), history."""

    def __init__(self, instance: Any) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        spark = self.sparkSession
        inst = self.instance
        mod_str = inst.getModStr()
        files: dict[str, bytes] = {}
        kind = "none"
        version = 1
        if mod_str:
            parts = split_model_string(mod_str)
            kind = parts.kind
            if parts.kind == "spec":
                assert parts.spec is not None
                doc = {"kind": "spec", "spec": parts.spec}
                version = spec_format_version(parts.spec)
                files[_WEIGHTS] = parts.payload
            else:
                doc = {"kind": "pickle"}
                files[_PICKLE] = parts.payload
                weights = state_dict_to_safetensors(model_from_parts(parts))
                if weights is not None:
                    files[_WEIGHTS] = weights
            files[_MODEL_JSON] = json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")
        history = TrainingHistory.of(getattr(inst, "_training_history", None))
        files[_HISTORY] = json.dumps(history.records()).encode("utf-8")
        params = {
            p.name: v for p, v in inst._paramMap.items() if p.name != "modStr"
        }
        extra = {
            "sparktorch": _sparktorch_meta(
                {"modelKind": kind, "files": {name: _sha256(data) for name, data in files.items()}},
                version,
            )
        }
        # metadata first: without overwrite() it fails on an existing path before any side file
        # The SparkContext: PySpark 3.5 needs it, 4.x takes it as well as a session.
        DefaultParamsWriter.saveMetadata(inst, path, _meta_context(spark), extraMetadata=extra, paramMap=params)
        root = _qualify(spark, path)  # where Hadoop just put metadata/
        local_root = _local_path(spark, root)
        if _connect(spark) and local_root is not None and not os.path.isdir(os.path.join(local_root, "metadata")):
            raise PersistenceError(
                f"cannot write the data files of {root}: the Spark Connect server wrote metadata/ on its own machine, "
                "which this client does not see; save to a filesystem both reach (a shared mount, s3://, hdfs://, ...)"
            )
        for name, data in files.items():
            try:
                _write_bytes(spark, _join(root, name), data)
            except OSError as exc:
                raise PersistenceError(f"cannot write {_join(root, name)}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - Hadoop errors through py4j
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise PersistenceError(f"cannot write {_join(root, name)}: {cause}") from exc


class SparkTorchModelReader(MLReader[R], Generic[R]):
    """Loads what :class:`SparkTorchModelWriter` saved; PersistenceError naming the file on
    corrupt, truncated, newer-format, refused or unimportable content.

    Args:
        cls: the stage class to make.
        options: the classes the saved model may name and the pickle opt-in; default: those
            of the load in progress (:func:`load_options`), else ``torch.nn`` only, no pickle.
    """

    def __init__(self, cls: type, options: LoadOptions | None = None) -> None:
        super().__init__()
        self.cls = cls
        self.options = options if options is not None else current_load_options()

    def _side_file(self, path: str, name: str, section: dict[str, Any], limit: int = _MAX_SMALL_FILE_BYTES) -> bytes:
        full = _join(path, name)
        try:
            data = _read_bytes(self.sparkSession, full, limit)
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
        for key in ("paramMap", "defaultParamMap"):
            if (metadata.get(key) or {}).get("modStr"):
                # the writer keeps the model in data/; a model string here would be loaded
                # (maybe unpickled) without the checks below
                raise PersistenceError(
                    f"corrupt {_join(path, 'metadata')}: it holds a modStr param in {key}; "
                    "sparktorch keeps the model in data/ and refuses a model string in metadata"
                )
        instance = self.cls()
        _set_params(instance, metadata, path)
        kind = section.get("modelKind")
        path = _qualify(self.sparkSession, path)  # the side files are next to metadata/
        if kind in ("spec", "pickle"):
            instance._set(modStr=self._load_model_string(path, section, kind))
        elif kind != "none":
            raise PersistenceError(
                f"corrupt {_join(path, 'metadata')}: unknown sparktorch modelKind {kind!r}"
            )
        raw = self._side_file(path, _HISTORY, section)
        try:
            records = json.loads(raw)
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("not a list of records")
            history = TrainingHistory.from_records(records)
        except (ValueError, TypeError, KeyError) as exc:
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
        weights_file = _join(path, _WEIGHTS)
        policy = self.options.policy
        if kind == "spec":
            spec = doc.get("spec")
            what = f"model class in {model_json}"
            root = _untrusted_root(self.sparkSession, path)
            try:
                # names checked as text (torch.nn + the caller's classes) before any import,
                # then the model built on the meta device: its size, shapes and dtypes are
                # compared with the weights' header before anything is allocated
                probe = probe_spec(spec, what=what, policy=policy, untrusted_root=root)
            except SerializationError as exc:
                raise PersistenceError(f"cannot rebuild the model of {model_json}: {exc}") from exc
            limit = _MAX_SIDE_FILE_BYTES
            if probe is not None:
                limit = min(limit, _weights_bytes(probe) + _MAX_WEIGHTS_OVERHEAD)
            weights = self._side_file(path, _WEIGHTS, section, limit=limit)
            try:
                manifest = safetensors_manifest(weights, what=weights_file)
                if probe is not None:
                    check_weights_fit(probe, manifest, what=f"{weights_file} for the model of {model_json}")
                    del probe
                module = build_from_spec(spec, what=what, policy=policy, untrusted_root=root)
                load_safetensors_into(module, weights, what=weights_file)
            except SerializationError as exc:
                raise PersistenceError(str(exc)) from exc
            return model_string_from_spec(spec, weights)
        pickle_file = _join(path, _PICKLE)
        if not pickle_allowed(self.sparkSession, allow_pickle=self.options.allow_pickle, file=pickle_file):
            raise _unsafe(pickle_file, "the model")
        payload = self._side_file(path, _PICKLE, section, limit=_MAX_SIDE_FILE_BYTES)
        _log.info("sparktorch: unpickling the model definition %s", pickle_file)
        try:
            import cloudpickle

            module = cloudpickle.loads(payload)
        except BaseException as exc:  # noqa: BLE001 - opted in, yet it must not end the process
            raise PersistenceError(
                f"cannot unpickle {pickle_file}: {type(exc).__name__}: {exc}"
            ) from exc
        if _WEIGHTS in (section.get("files") or {}):
            weights = self._side_file(path, _WEIGHTS, section, limit=_MAX_SIDE_FILE_BYTES)
            try:
                load_safetensors_into(module, weights, what=weights_file)
            except SerializationError as exc:
                raise PersistenceError(str(exc)) from exc
        try:
            return serialize_model(module)
        except SerializationError as exc:
            raise PersistenceError(f"cannot use the model of {model_json}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# params-only stages (the unfitted SparkTorch estimator)


class SparkTorchParamsWriter(_ConnectOverwrite, DefaultParamsWriter):
    """``DefaultParamsWriter`` that also records the sparktorch format version."""

    def saveImpl(self, path: str) -> None:
        DefaultParamsWriter.saveMetadata(
            self.instance,
            path,
            _meta_context(self.sparkSession),
            extraMetadata={"sparktorch": _sparktorch_meta({"modelKind": "none"})},
        )


class SparkTorchParamsReader(MLReader[R], Generic[R]):
    """Reads what :class:`SparkTorchParamsWriter` saved; PersistenceError on bad content.

    Args:
        cls: the stage class to make.
        options: as for :class:`SparkTorchModelReader`.
    """

    def __init__(self, cls: type, options: LoadOptions | None = None) -> None:
        super().__init__()
        self.cls = cls
        self.options = options if options is not None else current_load_options()

    def load(self, path: str) -> R:
        metadata, _ = _load_metadata(path, self.sparkSession)
        instance = self.cls()
        _set_params(instance, metadata, path)
        self._check_torch_obj(instance, path)
        _warn_weakening_params(self.sparkSession, instance, path)
        return instance

    def _check_torch_obj(self, instance: Any, path: str) -> None:
        """Refuse a pickle ``torchObj`` read from storage unless this load opted in: ``fit``
        would unpickle it. A JSON one is vetted now, on its names (``torch.nn``, ``torch.optim``
        and the caller's classes, nothing imported) and, when it carries weights, on the size
        of the model it describes (built on the ``meta`` device); ``fit`` then builds it like
        the caller's own. A foreign or sparktorch 0.2.0 string is refused by ``fit`` and never
        unpickled."""
        if not instance.hasParam("torchObj") or not instance.isDefined("torchObj"):
            return
        value = instance.getOrDefault("torchObj")
        if not value:
            return
        try:
            encoding = torch_obj_encoding(value)
        except SerializationError:
            return
        qualified = _qualify(self.sparkSession, path)
        meta = _join(qualified, "metadata")
        if encoding == "pickle":
            if not pickle_allowed(self.sparkSession, allow_pickle=self.options.allow_pickle, file=meta):
                raise _unsafe(meta, "the param torchObj")
            return
        try:
            check_stored_torch_obj(
                value, policy=self.options.policy, what=f"torchObj in {meta}", max_params=self.options.max_params
            )
        except SerializationError as exc:
            raise PersistenceError(f"cannot load {meta}: {exc}") from exc
        root = _untrusted_root(self.sparkSession, qualified)
        if root is not None:
            for class_path in torch_obj_class_paths(value):
                try:
                    check_import_origin(class_path, root, what=f"torchObj in {meta}")
                except SerializationError as exc:
                    raise PersistenceError(str(exc)) from exc


class SparkTorchParamsWritable(MLWritable):
    """Mixin: ``write()`` returns a :class:`SparkTorchParamsWriter` (params-only stages)."""

    def write(self) -> MLWriter:
        """A writer that saves this stage's params as versioned JSON metadata."""
        return SparkTorchParamsWriter(self)  # type: ignore[arg-type]


class SparkTorchParamsReadable(MLReadable[R], Generic[R]):
    """Mixin: ``read()`` returns a :class:`SparkTorchParamsReader` (params-only stages), and
    ``load`` takes the per-call options."""

    @classmethod
    def read(cls) -> SparkTorchParamsReader[R]:
        """A reader for directories written by :class:`SparkTorchParamsWriter` (with the
        options of the load in progress, else ``torch.nn`` classes only and no pickle)."""
        return SparkTorchParamsReader(cls)

    @classmethod
    def load(
        cls, path: str, *, allowed_classes: Any = None, allow_pickle: bool = False, max_params: int | None = None
    ) -> R:
        """Load a stage saved with ``save(path)``.

        Args:
            path: the directory.
            allowed_classes: classes (objects, such as ``[MyNet]``) that the saved
                ``torchObj`` may name besides ``torch.nn`` layers and losses and
                ``torch.optim`` optimizers; nothing outside these is imported.
            allow_pickle: unpickle a pickle ``torchObj`` (this load only; it can run code).
            max_params: the most parameter values that a saved ``torchObj`` model without
                weights may describe (default 2**31, ``MAX_SPEC_PARAMS``): it is built on the
                ``meta`` device and counted before it is accepted.

        Raises:
            PersistenceError: unreadable, corrupt or refused content (UnsafeModelError for a
                pickle without the opt-in).
        """
        with load_options(LoadOptions.of(allowed_classes, allow_pickle, max_params)):
            return cls.read().load(path)
