"""Loading a saved ``Pipeline`` / ``PipelineModel`` as data: :func:`load_pipeline`.

pyspark's ``PipelineModel.load(path)`` reads each stage's ``metadata/`` JSON, imports the Python
module of the class named there (``"class": "pkg.mod.Cls"``), and calls ``Cls.load`` on the
stage directory, whose path is built from the ``stageUids`` of the pipeline's metadata. Whoever
wrote the directory therefore chooses a module to import (its top level runs) and a ``load`` to
call. :func:`load_pipeline` does the same loading after two passes over the metadata alone:

1. every ``metadata/`` in the tree (the pipeline's, each stage's, nested pipelines') is read
   as JSON and checked: each stage's class against an allow-list (Spark ML's own stages:
   the classes of the modules in :data:`SPARK_ML_STAGE_MODULES`, by their ``pyspark.ml`` or
   JVM ``org.apache.spark.ml`` names, never ``pyspark.ml.connect`` / ``torch`` / ``deepspeed``
   / ``tests``; sparktorch's stages; the classes the caller passes) and every UID against
   :data:`UID_PATTERN` (no ``*``, ``/``, ``..``: a UID becomes part of a path, and Hadoop
   expands glob characters);
2. only then are the stages loaded, ours with the caller's ``allowed_classes`` and
   ``allow_pickle`` (see :mod:`sparktorch._persist`), Spark ML's with their own readers, each
   Spark ML class checked after its import to be a stage read by the JVM's reader,
   ``DefaultParamsReader`` or pyspark's tuning / ``OneVsRest`` reader (:func:`_check_spark_ml_class`).
   A Spark ML stage whose reader loads nested stages by the name in their metadata (tuning,
   ``OneVsRest``) has each of those checked the same way before pyspark imports it: during
   :func:`load_pipeline`, ``DefaultParamsReader.loadParamsInstance`` is wrapped
   (:func:`_install_guard`).

Works on a classic session and on Spark Connect: metadata is read through the session.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import threading
from typing import Any

from sparktorch._persist import LoadOptions, _meta_context, load_options
from sparktorch.errors import PersistenceError

__all__ = ["load_pipeline", "UID_PATTERN"]

_log = logging.getLogger("sparktorch")

UID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
"""A stage UID that :func:`load_pipeline` accepts: letters, digits, ``_``, ``-`` and ``.`` (not
first, never ``..``), at most 255 characters. Spark's own UIDs are ``ClassName_<12 hex>``."""

_OURS = {
    "sparktorch.model.SparkTorchModel": ("sparktorch.model", "SparkTorchModel"),
    "sparktorch.estimator.SparkTorch": ("sparktorch.estimator", "SparkTorch"),
}
_PIPELINES = {"pyspark.ml.pipeline.Pipeline", "pyspark.ml.pipeline.PipelineModel", "pyspark.ml.Pipeline", "pyspark.ml.PipelineModel"}
SPARK_ML_STAGE_MODULES = (
    "feature",
    "classification",
    "regression",
    "clustering",
    "recommendation",
    "fpm",
    "tuning",
    "evaluation",
    "pipeline",
)
"""The ``pyspark.ml`` modules whose stage classes :func:`load_pipeline` loads (with their JVM
names ``org.apache.spark.ml.<module>.<Class>``). Not ``pyspark.ml.connect`` (its reader imports
and calls whatever its own metadata names), ``torch``, ``deepspeed`` or ``tests``."""

_PYSPARK_READERS = {
    # Spark ML stages whose ``load`` is a pyspark reader (not the JVM's, not DefaultParamsReader)
    "pyspark.ml.classification.OneVsRest",
    "pyspark.ml.classification.OneVsRestModel",
    "pyspark.ml.tuning.CrossValidator",
    "pyspark.ml.tuning.CrossValidatorModel",
    "pyspark.ml.tuning.TrainValidationSplit",
    "pyspark.ml.tuning.TrainValidationSplitModel",
}
_MAX_DEPTH = 16
_MAX_STAGES = 10_000


@dataclasses.dataclass
class _Node:
    """One checked stage directory: its path, metadata, Python class name and children."""

    path: str
    metadata: dict[str, Any]
    class_name: str
    children: list[_Node] = dataclasses.field(default_factory=list)


def _python_class_name(metadata: dict[str, Any]) -> str:
    name = metadata.get("class")
    if not isinstance(name, str):
        raise ValueError("no class")
    if name.startswith("org.apache.spark.ml."):
        return "pyspark.ml." + name[len("org.apache.spark.ml.") :]
    return name


def _check_uid(uid: Any, where: str) -> str:
    if not isinstance(uid, str) or not UID_PATTERN.fullmatch(uid) or ".." in uid:
        raise PersistenceError(
            f"{where}: stage UID {uid!r} is not allowed (a UID is part of a path: only letters, digits, "
            "'_', '-' and '.', not '..', and no '*' or '/'); nothing was imported"
        )
    return uid


def _allowed(class_name: str, caller: dict[str, type], where: str) -> None:
    """Refuse ``class_name`` unless it is Spark ML's, ours or the caller's (checked as text).

    Spark ML's are the classes named ``pyspark.ml.<module>.<Class>`` (or the JVM's
    ``org.apache.spark.ml.<module>.<Class>``) for a module of :data:`SPARK_ML_STAGE_MODULES`,
    and the two pipeline classes; nothing else under ``pyspark.ml`` (``pyspark.ml.connect``,
    ``pyspark.ml.torch``, ``pyspark.ml.deepspeed``, ``pyspark.ml.tests``, ...)."""
    parts = class_name.split(".")
    if not all(p.isidentifier() for p in parts) or "__main__" in parts:
        raise PersistenceError(f"{where}: invalid stage class {class_name!r}; nothing was imported")
    if class_name in caller or class_name in _OURS or class_name in _PIPELINES:
        return
    if (
        len(parts) == 4
        and parts[:2] == ["pyspark", "ml"]
        and parts[2] in SPARK_ML_STAGE_MODULES
        and not parts[3].startswith("_")
    ):
        return
    names = ", ".join(sorted(caller)) or "none"
    modules = ", ".join(f"pyspark.ml.{m}" for m in SPARK_ML_STAGE_MODULES)
    raise PersistenceError(
        f"{where}: stage class {class_name!r} is not allowed: load_pipeline loads Spark ML's own stages "
        f"(classes of {modules}, or their org.apache.spark.ml names), sparktorch's, and the classes "
        f"passed in allowed_classes (here: {names}); nothing was imported. If you trust this directory "
        "and that class, pass it: load_pipeline(path, allowed_classes=[TheClass])"
    )


def _read_metadata(spark: Any, path: str) -> dict[str, Any]:
    from pyspark.ml.util import DefaultParamsReader

    meta = path.rstrip("/") + "/metadata"
    try:
        metadata = DefaultParamsReader.loadMetadata(path, _meta_context(spark))
    except Exception as exc:  # noqa: BLE001 - JVM, JSON and missing-file errors alike
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PersistenceError(f"cannot read {meta}: {type(exc).__name__}: {cause}") from exc
    if not isinstance(metadata, dict):
        raise PersistenceError(f"corrupt {meta}: not a Spark ML stage metadata")
    return metadata


def _stage_path(stages_dir: str, uid: str, index: int, count: int) -> str:
    # as pyspark.ml.pipeline.PipelineSharedReadWrite.getStagePath
    return os.path.join(stages_dir, str(index).zfill(len(str(count))) + "_" + uid)


def _vet(spark: Any, path: str, caller: dict[str, type], depth: int = 0) -> _Node:
    """Read and check the metadata of ``path`` and, for a pipeline, of every stage below it."""
    meta = path.rstrip("/") + "/metadata"
    if depth > _MAX_DEPTH:
        raise PersistenceError(f"{meta}: pipelines nested deeper than {_MAX_DEPTH}")
    metadata = _read_metadata(spark, path)
    try:
        class_name = _python_class_name(metadata)
    except ValueError as exc:
        raise PersistenceError(f"corrupt {meta}: {exc}") from exc
    _allowed(class_name, caller, meta)
    _check_uid(metadata.get("uid"), meta)
    node = _Node(path=path, metadata=metadata, class_name=class_name)
    if class_name in _PIPELINES:
        uids = (metadata.get("paramMap") or {}).get("stageUids")
        if not isinstance(uids, list) or len(uids) > _MAX_STAGES:
            raise PersistenceError(f"corrupt {meta}: stageUids is not a list of at most {_MAX_STAGES} UIDs")
        for uid in uids:
            _check_uid(uid, meta)
        stages_dir = os.path.join(path, "stages")
        for index, uid in enumerate(uids):
            node.children.append(_vet(spark, _stage_path(stages_dir, uid, index, len(uids)), caller, depth + 1))
    return node


def _class_of(class_name: str, caller: dict[str, type], where: str) -> type:
    """The class of a checked name: the caller's object, or imported from sparktorch/pyspark.ml."""
    if class_name in caller:
        return caller[class_name]
    if class_name in _OURS:
        module_name, attr = _OURS[class_name]
    else:
        module_name, _, attr = class_name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from an import too
        raise PersistenceError(f"{where}: cannot import {class_name!r} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, type):
        raise PersistenceError(f"{where}: {class_name!r} is not a Spark ML stage class; refusing to call it")
    if class_name not in _OURS:
        _check_spark_ml_class(obj, class_name, where)
    if not callable(getattr(obj, "load", None)):
        raise PersistenceError(f"{where}: {class_name!r} cannot be loaded (no load method)")
    return obj


def _check_spark_ml_class(obj: type, class_name: str, where: str) -> None:
    """After the import: ``obj`` must be defined in the module its name names (no re-export),
    be a Spark ML stage (``Params``) read by the JVM's reader (``JavaMLReadable``),
    ``DefaultParamsReader`` (``DefaultParamsReadable``) or one of pyspark's own stage readers
    (tuning, ``OneVsRest``), and owe nothing to ``pyspark.ml.connect`` (whose ``ParamsReadWrite``
    reader imports and calls the classes its metadata names)."""
    from pyspark.ml.param import Params
    from pyspark.ml.util import DefaultParamsReadable, JavaMLReadable

    module_name = class_name.rpartition(".")[0]
    refused = f"{where}: {class_name!r} is not a Spark ML stage class that load_pipeline reads; refusing to call it"
    if obj.__module__ != module_name or obj.__qualname__ != class_name.rpartition(".")[2]:
        raise PersistenceError(refused)
    if any((getattr(base, "__module__", "") or "").startswith("pyspark.ml.connect") for base in obj.__mro__):
        raise PersistenceError(refused)
    if not issubclass(obj, Params):
        raise PersistenceError(refused)
    if not (issubclass(obj, (JavaMLReadable, DefaultParamsReadable)) or class_name in _PYSPARK_READERS):
        raise PersistenceError(refused)


def _load_node(node: _Node, caller: dict[str, type]) -> Any:
    meta = node.path.rstrip("/") + "/metadata"
    if node.class_name in _PIPELINES:
        from pyspark.ml import Pipeline, PipelineModel

        stages = [_load_node(child, caller) for child in node.children]
        if node.class_name.endswith("PipelineModel"):
            return PipelineModel(stages=stages)._resetUid(node.metadata["uid"])
        return Pipeline(stages=stages)._resetUid(node.metadata["uid"])
    cls = _class_of(node.class_name, caller, meta)
    try:
        if node.class_name in _OURS:
            return cls.read().load(node.path)  # the reader takes the options of this load
        return cls.load(node.path)
    except PersistenceError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a stage's load must not end the process
        if isinstance(exc, OSError):
            raise PersistenceError(f"cannot load {node.path}: {exc}") from exc
        raise PersistenceError(f"cannot load {node.path}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------ nested loads by pyspark readers

_GUARD: dict[str, Any] = {}
_GUARD_LOCK = threading.Lock()
_CALLER_CLASSES: Any = None  # contextvar, set in _install_guard


def _install_guard() -> None:
    """Wrap ``DefaultParamsReader.loadParamsInstance`` once: inside :func:`load_pipeline` (and
    only there: a context variable says so) the stage it would load is checked like the
    pipeline's own before pyspark imports its class. Outside, it is pyspark's, unchanged."""
    global _CALLER_CLASSES
    import contextvars

    from pyspark.ml.util import DefaultParamsReader

    with _GUARD_LOCK:
        if "original" in _GUARD:
            return
        _CALLER_CLASSES = contextvars.ContextVar("sparktorch_pipeline_classes", default=None)
        original = DefaultParamsReader.__dict__["loadParamsInstance"].__func__

        def loadParamsInstance(path: str, sc: Any) -> Any:  # noqa: N802 - pyspark's name
            caller = _CALLER_CLASSES.get()
            if caller is None:
                return original(path, sc)
            spark = sc if hasattr(sc, "createDataFrame") else None
            if spark is None:
                from pyspark.sql import SparkSession

                spark = SparkSession.active()
            return _load_node(_vet(spark, path, caller), caller)

        _GUARD["original"] = original
        DefaultParamsReader.loadParamsInstance = staticmethod(loadParamsInstance)


def load_pipeline(
    path: str,
    *,
    allowed_classes: Any = None,
    allow_pickle: bool = False,
    spark: Any = None,
    max_params: int | None = None,
) -> Any:
    """Load a ``PipelineModel`` (or ``Pipeline``) saved with ``save(path)``, reading the
    directory as data: the way to load a pipeline you did not write.

    Plain ``PipelineModel.load(path)`` imports the Python module of the class that each
    stage's metadata names and calls that class's ``load``: whoever wrote the directory
    chooses code to run. This function first reads every ``metadata/`` of the tree and
    refuses, before anything is imported:

    * a stage whose class is not Spark ML's own (a class of ``pyspark.ml.feature``,
      ``classification``, ``regression``, ``clustering``, ``recommendation``, ``fpm``,
      ``tuning``, ``evaluation`` or ``pipeline``, or its JVM name ``org.apache.spark.ml.*``;
      not ``pyspark.ml.connect``, whose readers import whatever their own metadata names),
      sparktorch's (``SparkTorch``, ``SparkTorchModel``) or in ``allowed_classes``;
    * a stage UID that is not a plain name (:data:`UID_PATTERN`: no ``*``, ``/`` or ``..``).

    Then it loads the stages: sparktorch's with ``allowed_classes`` and ``allow_pickle``
    (their models' classes checked by name, their sizes against the weights), Spark ML's with
    their own readers, the caller's with their ``load``.

    Args:
        path: the saved pipeline directory.
        allowed_classes: classes (the objects) to accept besides those above: your own
            stages, and your ``nn.Module`` classes named by a saved model or ``torchObj``.
        allow_pickle: unpickle sparktorch models stored as pickles, in this call only.
        spark: the session to read with (default: the active one; classic or Spark Connect).
        max_params: the most parameter values that a saved ``SparkTorch`` estimator's
            ``torchObj`` without weights may describe (default 2**31; see
            :meth:`SparkTorch.load <sparktorch._persist.SparkTorchParamsReadable.load>`).

    Returns:
        The ``PipelineModel`` (or ``Pipeline``), with the saved UID.

    Raises:
        PersistenceError: a refused class or UID, or a stage that cannot be read
            (:class:`~sparktorch.errors.UnsafeModelError` for a pickle without the opt-in).
        ParamError: ``allowed_classes`` is not a list of classes.
    """
    options = LoadOptions.of(allowed_classes, allow_pickle, max_params)
    caller = {f"{c.__module__}.{c.__qualname__}": c for c in options.policy.allowed.values()}
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.active()
    tree = _vet(spark, path, caller)
    if tree.class_name not in _PIPELINES:
        raise PersistenceError(
            f"{path.rstrip('/')}/metadata: {tree.class_name!r} is not a Pipeline or PipelineModel; "
            "load a single stage with its own load"
        )
    _install_guard()
    token = _CALLER_CLASSES.set(caller)
    try:
        with load_options(options):
            loaded = _load_node(tree, caller)
    finally:
        _CALLER_CLASSES.reset(token)
    _log.info("sparktorch: loaded pipeline %s (%d stages, checked before loading)", path, len(tree.children))
    return loaded
