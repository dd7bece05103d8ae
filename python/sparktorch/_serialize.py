"""Serialization of the torch object (``torchObj``) and of a trained model (``modStr``).

Two string formats, both versioned and recognisable by their prefix:

``torchObj`` (what :func:`serialize_torch_obj` / :func:`serialize_torch_obj_lazy` return)::

    sparktorch-torchobj/1;json;{...}        lazy, importable classes, JSON-able kwargs
    sparktorch-torchobj/2;json;{...}        a model instance as a structural spec + its weights
                                            (safetensors, base64) + criterion and optimizer specs
    sparktorch-torchobj/1;pickle;<base64>   anything else (cloudpickle, by value)

The JSON form names classes by import path (``package.module:Class``) and carries their
constructor kwargs; reading it checks each name under a :class:`ClassPolicy` (a string made in
this process: any importable class but ``__main__``; a string from storage: ``torch.nn`` /
``torch.optim`` and the caller's ``allowed_classes``, checked as text before any import), checks
that each class is a subclass of what it must be (``torch.nn.Module``, ``torch.optim.Optimizer``)
*before* calling it, and never unpickles anything. From storage, the model is also built on the
``meta`` device first and compared with its safetensors header (:func:`build_checked`).

A *model spec* (JSON) rebuilds an architecture without pickle::

    {"class": "pkg.module:Net", "kwargs": {...}}                  Net(**kwargs)
    {"class": "torch.nn.modules.container:Sequential",
     "children": [["0", {spec}], ["1", {spec}], ...]}             a container tree

Containers are ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``; every class inside a
container spec must come from ``torch.nn``. :func:`structural_spec` derives such a spec from a
module instance and keeps it only if the rebuilt module has the same structure (see there).

``modStr`` (the serialized model a :class:`~sparktorch.model.SparkTorchModel` carries)::

    sparktorch-model/1;<base64 of container>

where the container is ``b"STMD"`` + a little-endian ``u32`` header length + a JSON header +
a payload. With header ``{"kind": "spec", "spec": {...}}`` the payload is the weights as
``safetensors`` bytes and the model is rebuilt from its import path and kwargs (no pickle);
with ``{"kind": "pickle"}`` the payload is the cloudpickled module. Version 2 is written only
when the spec is a container tree (``children``), so older readers refuse it with "upgrade".

Strings are trusted like the Python objects they came from: :func:`load_torch_obj` and
:func:`deserialize_model` unpickle a pickle-kind string unless called with
``allow_pickle=False``. Everything that reads from *storage* (``sparktorch._persist``) refuses
pickles unless the user opted in.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import struct
import sys
from collections import OrderedDict
from typing import Any, Mapping

import cloudpickle
import torch
import torch.nn as nn

from sparktorch.errors import SerializationError

__all__ = [
    "TorchObj",
    "serialize_torch_obj",
    "serialize_torch_obj_lazy",
    "load_torch_obj",
    "serialize_model",
    "deserialize_model",
    "model_string_key",
    "structural_spec",
    "build_from_spec",
    "ClassPolicy",
    "TRUSTED",
    "torch_obj_encoding",
]

_log = logging.getLogger("sparktorch")

TORCHOBJ_PREFIX = "sparktorch-torchobj/"
TORCHOBJ_VERSION = 2  # highest version read; writers stamp the lowest one that fits
MODEL_PREFIX = "sparktorch-model/"
MODEL_VERSION = 2  # likewise
_MAX_SPEC_DEPTH = 64  # nesting of container specs

MAX_SPEC_PARAMS = 1 << 31
"""The most values (parameters and buffers, counted on the ``meta`` device) that a model spec
read from storage *without weights* may describe: 2**31 values, 8 GiB in float32. A spec
with weights is checked against them instead. Raise it per load with ``max_params=``."""
_CONTAINER_MAGIC = b"STMD"
_MAX_HEADER_BYTES = 16 * 1024 * 1024

_RESERIALIZE_HINT = (
    "re-serialize the model with sparktorch.serialize_torch_obj(model, criterion, optimizer, "
    "**optimizer_kwargs) or sparktorch.serialize_torch_obj_lazy(...) from this version of "
    "sparktorch"
)
_RECREATE_MODEL_HINT = (
    "rebuild the model with sparktorch.create_spark_torch_model(network) (or refit the "
    "SparkTorch estimator) with this version of sparktorch"
)

ModelSpec = tuple[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class TorchObj:
    """A loaded ``torchObj``: everything one training worker needs.

    Attributes:
        model: the network, built (for lazy objects, built from ``model_spec``).
        criterion: the loss, an instance.
        optimizer: the ``torch.optim.Optimizer`` subclass (not an instance).
        optimizer_params: the optimizer's keyword arguments (``lr``, ...).
        model_spec: ``(import path, constructor kwargs)`` of the model when it was serialized
            lazily from an importable class with JSON-able kwargs, else ``None``. A model with a
            spec is persisted without pickle.
    """

    model: nn.Module
    criterion: nn.Module
    optimizer: type
    optimizer_params: dict[str, Any]
    model_spec: ModelSpec | None = None


# --------------------------------------------------------------------------------------------
# JSON values with tuples (optimizer betas, model kwargs) kept as tuples


def _to_json_value(value: Any) -> Any:
    """Return ``value`` as a JSON-able structure (tuples tagged); raise TypeError if not."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError("non-finite float")
        return value
    if isinstance(value, list):
        return [_to_json_value(v) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_to_json_value(v) for v in value]}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$"):
                raise TypeError(f"dict key {key!r}")
            out[key] = _to_json_value(item)
        return out
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _from_json_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$tuple"}:
            return tuple(_from_json_value(v) for v in value["$tuple"])
        return {k: _from_json_value(v) for k, v in value.items()}
    return value


def _json_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Tagged-JSON form of ``kwargs``, or None when some value is not JSON-able."""
    try:
        return _to_json_value(dict(kwargs or {}))
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------
# classes by import path


def import_path(cls: type) -> str | None:
    """``module.QualName`` of ``cls`` when importing that path gives ``cls`` back, else None."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        return None
    try:
        found = _resolve(module, qualname)
    except Exception:  # noqa: BLE001 - any failure means "not importable"
        return None
    return f"{module}:{qualname}" if found is cls else None


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_BASE_NAMES = {nn.Module: "torch.nn.Module", torch.optim.Optimizer: "torch.optim.Optimizer"}


def _split_class_path(path: Any, what: str) -> tuple[str, str]:
    if not isinstance(path, str) or not path:
        raise SerializationError(f"{what}: invalid class path {path!r}")
    if ":" in path:
        module, _, qualname = path.partition(":")
    else:
        module, _, qualname = path.rpartition(".")
    if not module or not qualname:
        raise SerializationError(f"{what}: invalid class path {path!r}")
    return module, qualname


def _inside(location: str, root: str) -> bool:
    real = os.path.realpath(location)
    return real == root or real.startswith(root + os.sep)


def check_import_origin(path: str, untrusted_root: str, *, what: str) -> None:
    """Refuse a class whose module (or a package on the way to it) would be imported from
    inside ``untrusted_root``, the directory being loaded.

    A saved directory that sits in a directory on ``sys.path`` (the script's, or the working
    directory) is itself an importable package: a spec naming ``simple_dnn.evil:Net`` would
    run ``simple_dnn/__init__.py`` or ``simple_dnn/evil.py``, files that whoever wrote the
    directory chose. Each not yet imported prefix of the module name is located with
    ``importlib.util.find_spec`` (which runs only the code of prefixes already checked) before
    anything of it runs.
    """
    module, _ = _split_class_path(path, what)
    root = os.path.realpath(untrusted_root)
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except Exception:  # noqa: BLE001 - not importable: the import reports it
            return
        if spec is None:
            return
        locations = list(spec.submodule_search_locations or [])
        if spec.origin and spec.has_location:
            locations.append(spec.origin)
        if any(_inside(loc, root) for loc in locations):
            raise SerializationError(
                f"{what}: {path!r} would import code from inside the directory being loaded "
                f"({untrusted_root}); refusing to import {name!r}"
            )


_ALLOWED_FAMILIES: dict[type, tuple[str, ...]] = {
    nn.Module: ("torch.nn",),
    torch.optim.Optimizer: ("torch.optim",),
}
"""The packages whose classes a spec read from storage may name without the caller allowing
them, per base class: a model, a layer or a criterion from ``torch.nn``, an optimizer from
``torch.optim``. Their modules are imported (torch's own code); nothing else is."""

_IDENTIFIER_PART = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"


@dataclasses.dataclass(frozen=True)
class ClassPolicy:
    """Which classes a spec may name, decided on the spec's *string* before anything is
    imported.

    Two kinds of strings reach a spec reader:

    * **trusted** (:data:`TRUSTED`): made in this process from objects the caller handed over
      (the ``torchObj`` of a fit, the ``modStr`` of a model in memory, shipped to the
      executors). A named class is imported, as the caller's own code would; only a
      ``__main__`` module is refused.
    * **from storage** (:meth:`from_storage`): read from a saved directory that someone else
      may have written. Only ``torch.nn`` classes (``torch.optim`` for an optimizer) and the
      classes in ``allowed`` are accepted; an allowed class is taken from the object the
      caller passed, so its module is never imported by the load.

    Attributes:
        trusted: import any importable class (in-process strings only).
        allowed: the caller's classes, by ``(module, qualname)``.
    """

    trusted: bool
    allowed: Mapping[tuple[str, str], type] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_storage(cls, allowed_classes: Any = None) -> ClassPolicy:
        """The policy of a load from storage: ``torch.nn`` / ``torch.optim`` plus
        ``allowed_classes`` (classes, not names). Raises ParamError for anything else."""
        from sparktorch.errors import ParamError

        allowed: dict[tuple[str, str], type] = {}
        if allowed_classes is None:
            allowed_classes = ()
        if isinstance(allowed_classes, type) or isinstance(allowed_classes, (str, bytes)):
            allowed_classes = (allowed_classes,)
        try:
            items = list(allowed_classes)
        except TypeError as exc:
            raise ParamError(f"allowed_classes must be a list of classes, got {allowed_classes!r}") from exc
        for item in items:
            if not isinstance(item, type):
                raise ParamError(
                    f"allowed_classes must hold classes (such as MyNet), not {item!r}: a name would "
                    "have to be imported to be checked"
                )
            allowed[(item.__module__, item.__qualname__)] = item
        return cls(trusted=False, allowed=allowed)

    def describe(self) -> str:
        """The allow-list in words (for error messages)."""
        names = sorted(f"{m}:{q}" for m, q in self.allowed)
        extra = f" and the classes passed in allowed_classes ({', '.join(names)})" if names else ""
        return f"torch.nn classes (torch.optim for an optimizer){extra}"


TRUSTED = ClassPolicy(trusted=True)
"""The policy of in-process strings: see :class:`ClassPolicy`."""


def _check_class_path_text(path: Any, what: str) -> tuple[str, str]:
    """Split and check a class path as *text*: dotted identifiers, no ``__main__`` module."""
    module, qualname = _split_class_path(path, what)
    for part in module.split(".") + qualname.split("."):
        if not part or part[0].isdigit() or any(c not in _IDENTIFIER_PART for c in part):
            raise SerializationError(f"{what}: invalid class path {path!r}")
    if "__main__" in module.split("."):
        raise SerializationError(
            f"{what}: {path!r} names a __main__ module; refusing to import it (importing a "
            "__main__ module runs a program)"
        )
    return module, qualname


def check_class_name(path: Any, *, what: str, base: type, policy: ClassPolicy) -> type | None:
    """Check the class path ``path`` against ``policy`` *as a string*, importing nothing.

    Returns the class itself when the caller allowed it (it is never imported), None when the
    name may be imported (a ``torch.nn`` / ``torch.optim`` name, or any name under
    :data:`TRUSTED`). Raises SerializationError naming ``path`` and what is allowed otherwise.
    """
    module, qualname = _check_class_path_text(path, what)
    found = policy.allowed.get((module, qualname))
    if found is not None:
        if not issubclass(found, base):
            name = _BASE_NAMES.get(base, f"{base.__module__}.{base.__qualname__}")
            raise SerializationError(f"{what}: {path!r} is not a {name} subclass; refusing to call it")
        return found
    if policy.trusted:
        return None
    families = _ALLOWED_FAMILIES.get(base, ())
    in_family = any(module == f or module.startswith(f + ".") for f in families)
    if in_family and not any(part.startswith("_") for part in qualname.split(".")):
        return None
    raise SerializationError(
        f"{what}: {path!r} is not allowed: a model loaded from storage may name only "
        f"{policy.describe()}; nothing was imported. If you trust this directory and the class, "
        "pass it to the load: allowed_classes=[TheClass]"
    )


def import_class(
    path: str,
    *,
    what: str,
    base: type | None = None,
    untrusted_root: str | None = None,
    policy: ClassPolicy = TRUSTED,
) -> type:
    """The class named ``module:QualName`` (or ``module.Class``); SerializationError if not.

    The name is first checked as a string (:func:`check_class_name`): under a storage
    ``policy`` a class outside ``torch.nn`` / ``torch.optim`` is refused unless the caller
    allowed it (then the caller's object is returned and nothing is imported), and a
    ``__main__`` module is never imported. Then the module is imported (which runs its
    top-level code, as any import) and the attribute looked up; anything the import raises,
    ``SystemExit`` and ``KeyboardInterrupt`` included, becomes a SerializationError. With
    ``base``, the result must be a subclass of ``base``, so a caller that then builds it only
    ever calls constructors of that family (never, say, ``subprocess.Popen``); under a storage
    policy it must also be the class that its name names (``torch.nn`` defines it under that
    qualname). With ``untrusted_root``, a module that would be imported from inside that
    directory is refused before it is imported (:func:`check_import_origin`).
    """
    check_base = base if base is not None else object
    given = check_class_name(path, what=what, base=check_base, policy=policy)
    if given is not None:
        return given
    module, qualname = _split_class_path(path, what)
    if untrusted_root is not None:
        check_import_origin(path, untrusted_root, what=what)
    try:
        obj = _resolve(module, qualname)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a module's top level too
        raise SerializationError(
            f"{what}: cannot import {path!r} ({type(exc).__name__}: {exc}); install the package "
            "that defines it on the driver and on every executor"
        ) from exc
    if not isinstance(obj, type):
        raise SerializationError(f"{what}: {path!r} is not a class; refusing to call it")
    if base is not None and not issubclass(obj, base):
        name = _BASE_NAMES.get(base, f"{base.__module__}.{base.__qualname__}")
        raise SerializationError(
            f"{what}: {path!r} is not a {name} subclass; refusing to call it"
        )
    if not policy.trusted:
        families = _ALLOWED_FAMILIES.get(check_base, ())
        home = getattr(obj, "__module__", "") or ""
        if obj.__qualname__ != qualname or not any(home == f or home.startswith(f + ".") for f in families):
            raise SerializationError(
                f"{what}: {path!r} resolves to {home}.{obj.__qualname__}, which is not allowed "
                f"(only {policy.describe()})"
            )
    return obj


def _criterion_spec(criterion: Any) -> dict[str, Any] | None:
    """JSON spec of a criterion class or instance, or None if it cannot be rebuilt from one.

    For an instance, the constructor kwargs are read back from attributes of the same name and
    the rebuilt instance is compared with the original; only an exact match is accepted.
    """
    if isinstance(criterion, type):
        path = import_path(criterion) if issubclass(criterion, nn.Module) else None
        return {"class": path, "kwargs": {}} if path else None
    cls = type(criterion)
    path = import_path(cls)
    if path is None or not isinstance(criterion, nn.Module):
        return None
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    kwargs: dict[str, Any] = {}
    for name, param in list(sig.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in ("size_average", "reduce"):  # deprecated aliases of `reduction`
            continue
        if hasattr(criterion, name):
            value = getattr(criterion, name)
            if isinstance(value, torch.Tensor):
                return None
            kwargs[name] = value
    encoded = _json_kwargs(kwargs)
    if encoded is None:
        return None
    try:
        rebuilt = cls(**kwargs)
    except Exception:  # noqa: BLE001
        return None
    return {"class": path, "kwargs": encoded} if _modules_equal(rebuilt, criterion) else None


def _modules_equal(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for key in sa:
        if not (isinstance(sa[key], torch.Tensor) and torch.equal(sa[key], sb[key])):
            return False
    da = {k: v for k, v in vars(a).items() if not k.startswith("_")}
    db = {k: v for k, v in vars(b).items() if not k.startswith("_")}
    try:
        return bool(da == db)
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------
# model specs: import path + JSON kwargs, or a container tree of torch.nn layers

_CONTAINERS: tuple[type, ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# constructor arguments that a subclass with an ``(*args, **kwargs)`` __init__ passes to its
# base itself (nn.LSTM calls nn.RNNBase.__init__("LSTM", ...)), so they are not recovered
_SUPPLIED_BY_SUBCLASS: dict[type, tuple[str, ...]] = {nn.RNNBase: ("mode",)}
# keyword arguments such a subclass takes on top of its base's (read back like the others)
_EXTRA_KWARGS: dict[type, tuple[str, ...]] = {nn.RNN: ("nonlinearity",)}
_SKIPPED_KWARGS = frozenset({"device", "dtype"})


def _is_torch_nn(cls: type) -> bool:
    return (getattr(cls, "__module__", "") or "").startswith("torch.nn.")


def _spec_has_children(doc: Any) -> bool:
    return isinstance(doc, dict) and "children" in doc


def _lazy_doc(path: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"class": path, "kwargs": _to_json_value(dict(kwargs))}


def check_spec_names(doc: Any, *, what: str, policy: ClassPolicy = TRUSTED) -> None:
    """Check every class name of model spec ``doc`` *as text*, importing nothing.

    Walks the whole tree first, so that a refused name anywhere (the top level or a nested
    child) stops the load before any module of the spec is imported: under ``policy`` (see
    :func:`check_class_name`), and inside a container only ``torch.nn`` names (for any policy).
    Raises SerializationError naming ``what`` and the class path.
    """

    def walk(node: Any, nested: bool, depth: int) -> None:
        if depth > _MAX_SPEC_DEPTH:
            raise SerializationError(f"{what}: model spec nested deeper than {_MAX_SPEC_DEPTH}")
        if isinstance(node, tuple) and len(node) == 2:
            node = {"class": node[0]}
        if not isinstance(node, dict) or not isinstance(node.get("class"), str):
            raise SerializationError(f"{what}: corrupt model spec (no class)")
        path = node["class"]
        if nested or "children" in node:
            module, qualname = _check_class_path_text(path, what)
            if not (module == "torch.nn" or module.startswith("torch.nn.")):
                raise SerializationError(
                    f"{what}: {path!r} is not a torch.nn layer; a container spec holds only "
                    "torch.nn classes (nothing was imported)"
                )
            if not policy.trusted:
                check_class_name(path, what=what, base=nn.Module, policy=policy)
        else:
            check_class_name(path, what=what, base=nn.Module, policy=policy)
        children = node.get("children")
        if children is None:
            return
        if not isinstance(children, list):
            raise SerializationError(f"{what}: corrupt container spec (children)")
        for child in children:
            if not (isinstance(child, list) and len(child) == 2):
                raise SerializationError(f"{what}: corrupt container spec (children)")
            walk(child[1], True, depth + 1)

    walk(doc, False, 0)


def build_from_spec(
    doc: Any,
    *,
    what: str,
    untrusted_root: str | None = None,
    policy: ClassPolicy = TRUSTED,
    _nested: bool = False,
    _depth: int = 0,
) -> nn.Module:
    """Build the module that a JSON model spec describes (see the module docstring).

    First every class name of the tree is checked as text (:func:`check_spec_names`, under
    ``policy``: :data:`TRUSTED` for strings made in this process, a storage policy for a spec
    read from a saved directory); then each class is resolved with :func:`import_class`,
    checked to be a ``torch.nn.Module`` subclass and called with JSON kwargs only; inside a
    container spec only the three containers and classes from ``torch.nn`` are accepted.
    ``untrusted_root``: the directory the spec was read from; no module is imported from
    inside it. Anything an import or a constructor raises (``SystemExit`` included) becomes a
    SerializationError naming ``what``; nothing has been constructed from the offending node.
    """
    if not _nested and _depth == 0:
        check_spec_names(doc, what=what, policy=policy)
    if _depth > _MAX_SPEC_DEPTH:
        raise SerializationError(f"{what}: model spec nested deeper than {_MAX_SPEC_DEPTH}")
    if isinstance(doc, tuple) and len(doc) == 2:  # (path, kwargs) as TorchObj.model_spec
        doc = {"class": doc[0], "kwargs": _to_json_value(dict(doc[1] or {}))}
    if not isinstance(doc, dict) or not isinstance(doc.get("class"), str):
        raise SerializationError(f"{what}: corrupt model spec (no class)")
    if "children" in doc:
        if set(doc) != {"class", "children"}:
            raise SerializationError(f"{what}: corrupt container spec (keys {sorted(doc)})")
        cls = import_class(
            doc["class"], what=what, base=nn.Module, untrusted_root=untrusted_root, policy=policy
        )
        if cls not in _CONTAINERS:
            raise SerializationError(
                f"{what}: {doc['class']!r} is not nn.Sequential, nn.ModuleList or nn.ModuleDict; "
                "only these have children in a model spec"
            )
        children = doc["children"]
        if not isinstance(children, list) or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children
        ):
            raise SerializationError(f"{what}: corrupt container spec (children)")
        names = [c[0] for c in children]
        if len(set(names)) != len(names):
            raise SerializationError(f"{what}: corrupt container spec (duplicate child names)")
        if cls is nn.ModuleList and names != [str(i) for i in range(len(names))]:
            raise SerializationError(f"{what}: corrupt ModuleList spec (child names)")
        built = [
            (
                name,
                build_from_spec(
                    child,
                    what=what,
                    untrusted_root=untrusted_root,
                    policy=policy,
                    _nested=True,
                    _depth=_depth + 1,
                ),
            )
            for name, child in children
        ]
        try:
            if cls is nn.ModuleList:
                return nn.ModuleList([m for _, m in built])
            return cls(OrderedDict(built))
        except Exception as exc:  # noqa: BLE001 - e.g. a child name with a "."
            raise SerializationError(f"{what}: cannot build {doc['class']!r}: {exc}") from exc
    if set(doc) - {"class", "kwargs"}:
        raise SerializationError(f"{what}: corrupt model spec (keys {sorted(doc)})")
    cls = import_class(
        doc["class"], what=what, base=nn.Module, untrusted_root=untrusted_root, policy=policy
    )
    if _nested and not _is_torch_nn(cls):
        raise SerializationError(
            f"{what}: {doc['class']!r} is not a torch.nn layer; a container spec holds only "
            "torch.nn classes"
        )
    kwargs = _from_json_value(doc.get("kwargs") or {})
    if not isinstance(kwargs, dict):
        raise SerializationError(f"{what}: corrupt model spec (kwargs is not an object)")
    module = _build(cls, kwargs, what)
    if not isinstance(module, nn.Module):
        raise SerializationError(f"{what}: {doc['class']!r} did not build a torch.nn.Module")
    return module


def _init_params(cls: type) -> list[inspect.Parameter]:
    """The named constructor parameters of ``cls`` (through ``(*args, **kwargs)`` subclasses)."""
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY)
        for klass, names in _EXTRA_KWARGS.items()
        if issubclass(cls, klass)
        for name in names
    ]
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            return extra
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            return extra
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if named:
            drop = _SUPPLIED_BY_SUBCLASS.get(klass, ()) if klass is not cls else ()
            return [p for p in named if p.name not in drop] + extra
        if len(params) == 0:
            return extra
    return extra


def _recover_kwargs(module: nn.Module) -> dict[str, Any] | None:
    """Constructor kwargs of a layer read back from attributes of the same name.

    A ``bias``-like flag (bool default) whose attribute is a tensor or None becomes
    ``attribute is not None``; other tensors are left to their default. The result is only a
    candidate: :func:`structural_spec` rebuilds and compares before using it.
    """
    kwargs: dict[str, Any] = {}
    for param in _init_params(type(module)):
        name = param.name
        if name in _SKIPPED_KWARGS or not hasattr(module, name):
            continue
        value = getattr(module, name)
        if isinstance(param.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        elif isinstance(value, (torch.Tensor, nn.Module)):
            continue
        try:
            if param.default is not param.empty and type(value) is type(param.default) and value == param.default:
                continue  # the default: leave it out (nn.GRU refuses even proj_size=0)
        except Exception:  # noqa: BLE001 - odd __eq__: keep the value
            pass
        kwargs[name] = value
    return kwargs if _json_kwargs(kwargs) is not None else None


def _derive_spec(module: nn.Module, depth: int) -> dict[str, Any] | None:
    cls = type(module)
    if depth > _MAX_SPEC_DEPTH:
        return None
    path = import_path(cls)
    if path is None:
        return None
    if cls in _CONTAINERS:
        children = []
        for name, child in module._modules.items():
            sub = _derive_spec(child, depth + 1) if child is not None else None
            if sub is None:
                return None
            children.append([name, sub])
        return {"class": path, "children": children}
    if not _is_torch_nn(cls):
        return None
    kwargs = _recover_kwargs(module)
    return None if kwargs is None else _lazy_doc(path, kwargs)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _same_architecture(orig: nn.Module, rebuilt: nn.Module) -> bool:
    """True when ``rebuilt`` is ``orig``'s architecture: the same module tree (names, exact
    types, public attributes), the same parameters and buffers (names, shapes, dtypes,
    requires_grad), the same ``repr``; and ``orig`` has no hooks, no non-persistent buffers
    (their values are not saved) and no module or parameter used twice (ties are not saved)."""
    try:
        mods_a, mods_b = dict(orig.named_modules()), dict(rebuilt.named_modules())
        if list(mods_a) != list(mods_b):
            return False
        if len(list(orig.named_modules(remove_duplicate=False))) != len(mods_a):
            return False
        for name, a in mods_a.items():
            b = mods_b[name]
            if type(a) is not type(b) or a._non_persistent_buffers_set:
                return False
            if any(getattr(a, h, None) for h in _HOOK_DICTS):
                return False
            if not bool(_plain_attrs(a) == _plain_attrs(b)):
                return False
        params_a = list(orig.named_parameters(remove_duplicate=False))
        if len({id(p) for _, p in params_a}) != len(params_a):
            return False
        params_b = dict(rebuilt.named_parameters())
        if [n for n, _ in params_a] != list(params_b):
            return False
        if any(p.requires_grad != params_b[n].requires_grad for n, p in params_a):
            return False
        sa, sb = orig.state_dict(), rebuilt.state_dict()
        if list(sa) != list(sb):
            return False
        for key, value in sa.items():
            other = sb[key]
            if not (isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor)):
                return False
            if value.shape != other.shape or value.dtype != other.dtype:
                return False
        return repr(orig) == repr(rebuilt)
    except Exception:  # noqa: BLE001 - anything odd: not this kind
        return False


def structural_spec(module: nn.Module) -> dict[str, Any] | None:
    """A JSON model spec that rebuilds ``module``'s architecture from ``torch.nn``, or None.

    Covers a ``torch.nn`` layer and ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``
    trees of them. Layer kwargs are read back from attributes named like the constructor
    parameters; the spec is then built (on the ``meta`` device: nothing allocated) and kept
    only if :func:`_same_architecture` holds. Anything else (user classes, hooks, tied
    weights, parametrizations, non-float32 layers, ...) gives None: the caller pickles.
    """
    if not isinstance(module, nn.Module):
        return None
    doc = _derive_spec(module, 0)
    if doc is None:
        return None
    try:
        with torch.device("meta"):
            rebuilt = build_from_spec(doc, what="structural spec")
    except Exception:  # noqa: BLE001 - some layers cannot be built on meta: try for real
        try:
            rebuilt = build_from_spec(doc, what="structural spec")
        except Exception:  # noqa: BLE001
            return None
    return doc if _same_architecture(module, rebuilt) else None


# --------------------------------------------------------------------------------------------
# torchObj


def _check_optimizer(optimizer: Any) -> None:
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise SerializationError(
            f"optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.Adam), "
            f"got {optimizer!r}"
        )


def _local_modules(objects: list[Any]) -> list[Any]:
    """The user's own modules among those defining ``objects`` (and their submodules).

    A class from a module next to the driver script (or in the working directory) is usually
    not importable on the executors: such modules are pickled by value. Installed packages
    (site-packages), the standard library, torch and sparktorch are pickled by reference.
    """
    import os
    import sys
    import sysconfig

    installed = {os.path.realpath(p) for k in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(k))}
    roots = {os.path.realpath(p) for p in (sys.path[0] if sys.path and sys.path[0] else None, os.getcwd()) if p}
    classes: list[type] = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            classes.extend(type(m) for m in obj.modules())
        elif isinstance(obj, type):
            classes.append(obj)
        elif obj is not None:
            classes.append(type(obj))
    found: dict[str, Any] = {}
    for cls in classes:
        name = getattr(cls, "__module__", "") or ""
        if name == "__main__" or name.split(".")[0] in ("torch", "sparktorch", "builtins") or name in found:
            continue
        module = sys.modules.get(name)
        path = os.path.realpath(getattr(module, "__file__", None) or "")
        if not path or any(path.startswith(p + os.sep) for p in installed):
            continue
        if any(path.startswith(r + os.sep) for r in roots):
            found[name] = module
    return list(found.values())


def _encode_pickle_torchobj(payload: dict[str, Any]) -> str:
    local = _local_modules([payload.get("model"), payload.get("model_class"), payload.get("criterion")])
    for module in local:
        cloudpickle.register_pickle_by_value(module)
    try:
        data = cloudpickle.dumps(payload)
    except Exception as exc:  # noqa: BLE001
        raise SerializationError(f"cannot pickle the torch object: {exc}") from exc
    finally:
        for module in local:
            cloudpickle.unregister_pickle_by_value(module)
    return f"{TORCHOBJ_PREFIX}1;pickle;{base64.b64encode(data).decode('ascii')}"


def serialize_torch_obj(
    model: nn.Module,
    criterion: Any,
    optimizer: type,
    **optimizer_kwargs: Any,
) -> str:
    """Serialize a model instance, a criterion instance and an optimizer class for ``SparkTorch``.

    Args:
        model: the network to train (an instance; its current weights are the starting point).
        criterion: the loss, an instance such as ``nn.CrossEntropyLoss()``.
        optimizer: the optimizer class, such as ``torch.optim.Adam``.
        **optimizer_kwargs: keyword arguments for the optimizer (``lr=...``).

    Returns:
        The ``torchObj`` string for ``SparkTorch(torchObj=...)``. When the model is a
        ``torch.nn`` layer or an ``nn.Sequential``/``ModuleList``/``ModuleDict`` tree of them
        (:func:`structural_spec`), the criterion can be rebuilt from its constructor arguments
        and the optimizer kwargs are JSON-able, the string is JSON (specs + the weights as
        safetensors) and is never unpickled, also when read back from a saved estimator.
        Otherwise the objects are stored with cloudpickle by value.

    Raises:
        SerializationError: a wrong argument type, or an object that cannot be pickled.
    """
    if not isinstance(model, nn.Module):
        raise SerializationError(f"model must be a torch.nn.Module instance, got {type(model)!r}")
    if isinstance(criterion, type) or not callable(criterion):
        raise SerializationError(
            f"criterion must be a loss instance such as nn.CrossEntropyLoss(), got {criterion!r}"
        )
    _check_optimizer(optimizer)
    doc = _spec_torchobj_doc(model, criterion, optimizer, optimizer_kwargs)
    if doc is not None:
        return f"{TORCHOBJ_PREFIX}2;json;{json.dumps(doc, sort_keys=True)}"
    return _encode_pickle_torchobj(
        {
            "model": model,
            "criterion": criterion,
            "optimizer": optimizer,
            "optimizer_params": dict(optimizer_kwargs),
        }
    )


def _spec_torchobj_doc(
    model: nn.Module, criterion: Any, optimizer: type, optimizer_kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The JSON torchObj of a model instance (structural spec + weights), or None."""
    optimizer_path = import_path(optimizer)
    opt_kwargs = _json_kwargs(optimizer_kwargs)
    crit = _criterion_spec(criterion)
    if None in (optimizer_path, opt_kwargs, crit):
        return None
    spec = structural_spec(model)
    weights = state_dict_to_safetensors(model) if spec is not None else None
    if spec is None or weights is None:
        return None
    return {
        "model": spec,
        "weights": base64.b64encode(weights).decode("ascii"),
        "criterion": crit,
        "optimizer": {"class": optimizer_path, "kwargs": opt_kwargs},
    }


def serialize_torch_obj_lazy(
    model: type,
    criterion: Any,
    optimizer: type,
    optimizer_params: dict[str, Any] | None = None,
    model_parameters: dict[str, Any] | None = None,
) -> str:
    """Serialize classes for ``SparkTorch``; the model is built on each worker.

    Args:
        model: the model class; it is built as ``model(**model_parameters)``.
        criterion: the loss class (built with no arguments) or an instance.
        optimizer: the optimizer class, such as ``torch.optim.Adam``.
        optimizer_params: keyword arguments for the optimizer.
        model_parameters: keyword arguments for the model's constructor.

    Returns:
        The ``torchObj`` string. When the classes can be imported (they are not defined in
        ``__main__`` or inside a function) and the kwargs are JSON-able, the string is JSON
        (import paths + kwargs) and neither it nor a model saved from it is ever unpickled;
        otherwise the classes are stored with cloudpickle by value.

    Raises:
        SerializationError: a wrong argument type, or an object that cannot be pickled.
    """
    if not (isinstance(model, type) and issubclass(model, nn.Module)):
        raise SerializationError(
            f"model must be a torch.nn.Module subclass (the class, not an instance), got {model!r}"
        )
    if not callable(criterion):
        raise SerializationError(f"criterion must be a loss class or instance, got {criterion!r}")
    _check_optimizer(optimizer)
    if optimizer_params is not None and not isinstance(optimizer_params, dict):
        raise SerializationError("optimizer_params must be a dict or None")
    if model_parameters is not None and not isinstance(model_parameters, dict):
        raise SerializationError("model_parameters must be a dict or None")
    model_path = import_path(model)
    optimizer_path = import_path(optimizer)
    model_kwargs = _json_kwargs(model_parameters)
    opt_kwargs = _json_kwargs(optimizer_params)
    crit = _criterion_spec(criterion)
    if None not in (model_path, optimizer_path, model_kwargs, opt_kwargs, crit):
        doc = {
            "model": {"class": model_path, "kwargs": model_kwargs},
            "criterion": crit,
            "optimizer": {"class": optimizer_path, "kwargs": opt_kwargs},
        }
        return f"{TORCHOBJ_PREFIX}1;json;{json.dumps(doc, sort_keys=True)}"
    _log.info(
        "serialize_torch_obj_lazy: classes or kwargs are not importable/JSON-able; "
        "storing them with cloudpickle"
    )
    return _encode_pickle_torchobj(
        {
            "model_class": model,
            "model_parameters": dict(model_parameters or {}),
            "criterion": criterion,
            "optimizer": optimizer,
            "optimizer_params": dict(optimizer_params or {}),
        }
    )


def _looks_like_upstream(text: str) -> bool:
    """Heuristic: a string from sparktorch 0.2.0 (``base64(dill.dumps(...))``, maybe in JSON)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except ValueError:
            return False
        return isinstance(doc, dict) and "torch_obj" in doc
    try:
        head = base64.b64decode("".join(stripped[:400].split())[:320], validate=True)
    except (binascii.Error, ValueError):
        return False
    return head[:1] == b"\x80"  # pickle protocol >= 2 opcode


def _split_prefixed(text: Any, prefix: str, supported: int, what: str, hint: str) -> str:
    """Check the versioned prefix of ``text`` and return what follows ``prefix<version>;``."""
    if not isinstance(text, str) or not text:
        raise SerializationError(f"{what} must be a non-empty string made by sparktorch; {hint}")
    if not text.startswith(prefix):
        if _looks_like_upstream(text):
            raise SerializationError(
                f"this {what} was made by sparktorch 0.2.0 (a dill pickle); it is not loaded "
                f"because unpickling it would run arbitrary code: {hint}"
            )
        raise SerializationError(f"this {what} was not made by sparktorch; {hint}")
    version_text, sep, rest = text[len(prefix) :].partition(";")
    if not sep or not version_text.isdigit():
        raise SerializationError(f"malformed {what} header; {hint}")
    version = int(version_text)
    if version > supported:
        raise SerializationError(
            f"this {what} has format version {version}, newer than this sparktorch reads "
            f"({supported}); upgrade sparktorch"
        )
    return rest


def _build(cls: type, kwargs: dict[str, Any], what: str) -> Any:
    """``cls(**kwargs)``; anything it raises (``SystemExit`` included) as SerializationError."""
    try:
        return cls(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - a constructor must not end the process
        raise SerializationError(
            f"{what}: {cls.__module__}.{cls.__qualname__}(**{kwargs!r}) failed: {exc}"
        ) from exc


def check_torch_obj_names(doc: Any, *, policy: ClassPolicy) -> None:
    """Check every class name of a JSON ``torchObj`` document as text under ``policy``
    (model spec tree, criterion, optimizer), importing nothing; SerializationError if one is
    refused or the document is malformed."""
    if not isinstance(doc, dict):
        raise SerializationError("corrupt torchObj JSON (not an object)")
    check_spec_names(doc.get("model"), what="torchObj model", policy=policy)
    for key, base in (("criterion", nn.Module), ("optimizer", torch.optim.Optimizer)):
        node = doc.get(key)
        if not isinstance(node, dict):
            raise SerializationError(f"corrupt torchObj JSON (no {key})")
        check_class_name(node.get("class"), what=f"torchObj {key}", base=base, policy=policy)


def check_stored_criterion(node: Any, *, policy: ClassPolicy, what: str) -> type:
    """The criterion class of a ``torchObj`` read under ``policy``, checked before it is built:
    under a storage policy a ``torch.nn`` name must resolve to a loss class (a subclass of
    ``torch.nn.modules.loss._Loss``, which holds no parameters: never, say, a 40 GB
    ``Linear``); a class the caller allowed is the caller's. Raises SerializationError."""
    if not isinstance(node, dict):
        raise SerializationError(f"{what}: corrupt torchObj JSON (no criterion)")
    cls = import_class(node.get("class"), what=what, base=nn.Module, policy=policy)
    if policy.trusted or cls in policy.allowed.values():
        return cls
    if not issubclass(cls, nn.modules.loss._Loss):
        raise SerializationError(
            f"{what}: {node.get('class')!r} is not a loss class (torch.nn.modules.loss): a criterion "
            "loaded from storage may name only torch.nn losses and the classes passed in allowed_classes"
        )
    return cls


def spec_value_count(module: nn.Module) -> int:
    """Parameters plus buffers of ``module`` (built on ``meta``: nothing allocated), in values."""
    return sum(int(t.numel()) for t in module.parameters()) + sum(int(t.numel()) for t in module.buffers())


def check_spec_size(doc: Any, *, what: str, policy: ClassPolicy, max_params: int = MAX_SPEC_PARAMS) -> None:
    """Refuse a model spec read from storage without weights that describes more than
    ``max_params`` values: it is built on the ``meta`` device (no memory) and counted. A class
    of the caller that cannot be built on ``meta`` is not counted (the caller allowed it).
    Raises SerializationError."""
    probe = probe_spec(doc, what=what, policy=policy)
    if probe is None:
        return
    count = spec_value_count(probe)
    if count > max_params:
        raise SerializationError(
            f"{what}: the model spec describes {count:,} parameter values, more than the {max_params:,} "
            "that a spec without weights may describe when loaded from storage; nothing was allocated. "
            "If you trust it, pass a larger max_params to the load"
        )


def check_stored_torch_obj(
    torch_obj: str, *, policy: ClassPolicy, what: str, max_params: int = MAX_SPEC_PARAMS
) -> None:
    """Vet a JSON ``torchObj`` read from storage without building anything for real: every
    class name under ``policy``; the criterion a loss class (:func:`check_stored_criterion`);
    for one that carries weights, the model built on the ``meta`` device against their header
    (size, shapes, dtypes), and for one without, its size on ``meta`` against ``max_params``
    (:func:`check_spec_size`). The strings that pass are then built at ``fit`` like the
    caller's own. Raises SerializationError."""
    if torch_obj_encoding(torch_obj) != "json":
        return
    try:
        doc = json.loads(torch_obj.split(";", 2)[2])
    except (ValueError, IndexError) as exc:
        raise SerializationError(f"{what}: corrupt torchObj JSON ({exc})") from exc
    check_torch_obj_names(doc, policy=policy)
    check_stored_criterion(doc.get("criterion"), policy=policy, what=f"{what} criterion")
    weights = doc.get("weights")
    if isinstance(weights, str):
        try:
            raw = base64.b64decode(weights, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SerializationError(f"{what}: corrupt torchObj weights ({exc})") from exc
        manifest = safetensors_manifest(raw, what=what)
        probe = probe_spec(doc["model"], what=what, policy=policy)
        if probe is not None:
            check_weights_fit(probe, manifest, what=what)
    else:
        check_spec_size(doc.get("model"), what=what, policy=policy, max_params=max_params)


def torch_obj_class_paths(torch_obj: str) -> list[str]:
    """Every class path a JSON ``torchObj`` names (model spec tree, criterion, optimizer);
    [] for other strings. Nothing is imported."""
    try:
        if torch_obj_encoding(torch_obj) != "json":
            return []
        doc = json.loads(torch_obj.split(";", 2)[2])
    except (SerializationError, ValueError, IndexError):
        return []
    found: list[str] = []

    def walk(node: Any, depth: int = 0) -> None:
        if not isinstance(node, dict) or depth > _MAX_SPEC_DEPTH:
            return
        if isinstance(node.get("class"), str):
            found.append(node["class"])
        for child in node.get("children") or []:
            if isinstance(child, list) and len(child) == 2:
                walk(child[1], depth + 1)

    if isinstance(doc, dict):
        for key in ("model", "criterion", "optimizer"):
            walk(doc.get(key))
    return found


def torch_obj_encoding(torch_obj: str) -> str:
    """``"json"`` or ``"pickle"``: how a ``torchObj`` string is encoded (nothing is loaded).

    Raises:
        SerializationError: a string that :func:`load_torch_obj` would refuse on its header.
    """
    rest = _split_prefixed(
        torch_obj, TORCHOBJ_PREFIX, TORCHOBJ_VERSION, "torchObj string", _RESERIALIZE_HINT
    )
    kind, sep, _ = rest.partition(";")
    if kind not in ("json", "pickle") or not sep:
        raise SerializationError(f"unknown torchObj encoding {kind!r}; {_RESERIALIZE_HINT}")
    return kind


def _pickle_refused(what: str) -> SerializationError:
    from sparktorch.errors import UnsafeModelError

    return UnsafeModelError(
        f"{what} is a pickle: loading it can run arbitrary code, and it was read with "
        "allow_pickle=False; load it only if you trust where it came from"
    )


def load_torch_obj(
    torch_obj: str, *, allow_pickle: bool = True, allowed_classes: Any = None, max_params: int = MAX_SPEC_PARAMS
) -> TorchObj:
    """Read a ``torchObj`` string made by :func:`serialize_torch_obj` or its lazy variant.

    The model is built here. The JSON form imports the named classes, checks each before
    calling it (model and criterion: ``torch.nn.Module`` subclasses; optimizer: a
    ``torch.optim.Optimizer`` subclass), calls them with JSON kwargs only and never unpickles.
    The pickle form is unpickled: it trusts whoever made the string.

    Args:
        torch_obj: the string.
        allow_pickle: False refuses a pickle-kind string with
            :class:`~sparktorch.errors.UnsafeModelError` before unpickling it (use it for a
            string read from storage you do not control).
        allowed_classes: None (the default) trusts the string like the objects it was made
            from: the classes it names are imported. A list (``[]`` included) treats it as
            data from storage: only ``torch.nn`` classes, ``torch.optim`` optimizers and the
            listed classes are accepted, each checked on its name before anything is imported
            (see :class:`ClassPolicy`), and the model's size and dtypes are checked against
            its weights before it is built (without weights: against ``max_params``); the
            criterion must be a ``torch.nn`` loss class (or a listed class).
        max_params: under ``allowed_classes``, the most parameter values a model without
            weights may describe (counted on the ``meta`` device before it is built);
            default :data:`MAX_SPEC_PARAMS`.

    Raises:
        SerializationError: a string not made by sparktorch (including sparktorch 0.2.0's dill
            strings, which are refused rather than unpickled), a newer format version, or a
            class that cannot be imported, is not of the expected kind, or cannot be built.
    """
    rest = _split_prefixed(
        torch_obj, TORCHOBJ_PREFIX, TORCHOBJ_VERSION, "torchObj string", _RESERIALIZE_HINT
    )
    kind, sep, body = rest.partition(";")
    policy = TRUSTED if allowed_classes is None else ClassPolicy.from_storage(allowed_classes)
    if kind == "json" and sep:
        try:
            doc = json.loads(body)
            model_doc = doc["model"]
            weights = doc.get("weights")
            check_torch_obj_names(doc, policy=policy)
            crit_cls = check_stored_criterion(doc["criterion"], policy=policy, what="torchObj criterion")
            crit_kwargs = _from_json_value(doc["criterion"]["kwargs"] or {})
            opt_cls = import_class(
                doc["optimizer"]["class"],
                what="torchObj optimizer",
                base=torch.optim.Optimizer,
                policy=policy,
            )
            opt_kwargs = _from_json_value(doc["optimizer"]["kwargs"] or {})
            if not isinstance(crit_kwargs, dict) or not isinstance(opt_kwargs, dict):
                raise TypeError("kwargs is not an object")
            if weights is not None and not isinstance(weights, str):
                raise TypeError("weights is not a string")
        except SerializationError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SerializationError(f"corrupt torchObj JSON ({exc}); {_RESERIALIZE_HINT}") from exc
        if weights is not None:
            try:
                raw = base64.b64decode(weights, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise SerializationError(f"corrupt torchObj weights ({exc})") from exc
            if policy.trusted:
                model = build_from_spec(model_doc, what="torchObj model")
                load_safetensors_into(model, raw, what="torchObj model")
            else:
                model = build_checked(model_doc, raw, what="torchObj model", policy=policy)
        else:
            if not policy.trusted:
                check_spec_size(model_doc, what="torchObj model", policy=policy, max_params=max_params)
            model = build_from_spec(model_doc, what="torchObj model", policy=policy)
        model_spec = None
        if not _spec_has_children(model_doc):
            cls = type(model)
            model_spec = (import_path(cls) or model_doc["class"], _from_json_value(model_doc.get("kwargs") or {}))
        return TorchObj(
            model=model,
            criterion=_build(crit_cls, crit_kwargs, "torchObj criterion"),
            optimizer=opt_cls,
            optimizer_params=opt_kwargs,
            model_spec=model_spec,
        )
    if kind == "pickle" and sep:
        if not allow_pickle:
            raise _pickle_refused("this torchObj string")
        try:
            payload = cloudpickle.loads(base64.b64decode(body, validate=True))
        except ModuleNotFoundError as exc:
            raise SerializationError(
                f"the torchObj refers to module {exc.name!r}, which this Python process cannot "
                "import: install it on every executor, ship it with "
                "spark.sparkContext.addPyFile(...), or define the class in the driver script"
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise SerializationError(
                f"corrupt torchObj pickle ({type(exc).__name__}: {exc}); {_RESERIALIZE_HINT}"
            ) from exc
        if not isinstance(payload, dict):
            raise SerializationError(f"corrupt torchObj pickle; {_RESERIALIZE_HINT}")
        _check_optimizer(payload.get("optimizer"))
        if "model_class" in payload:
            model = _build(payload["model_class"], payload["model_parameters"], "torchObj model")
        else:
            model = payload["model"]
        criterion = payload["criterion"]
        if isinstance(criterion, type):
            criterion = _build(criterion, {}, "torchObj criterion")
        return TorchObj(
            model=model,
            criterion=criterion,
            optimizer=payload["optimizer"],
            optimizer_params=dict(payload["optimizer_params"]),
            model_spec=None,
        )
    raise SerializationError(f"unknown torchObj encoding {kind!r}; {_RESERIALIZE_HINT}")


# --------------------------------------------------------------------------------------------
# modStr: a trained model


def state_dict_to_safetensors(module: nn.Module) -> bytes | None:
    """The module's state dict as safetensors bytes; None if it holds non-tensor entries."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            return None
        # clone: safetensors refuses tensors that share storage (tied weights)
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return save(tensors)


_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # as the safetensors library itself


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype name (``"F32"``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


def safetensors_manifest(data: bytes, *, what: str) -> dict[str, TensorEntry]:
    """The tensors that safetensors ``data`` declares (names, dtypes, shapes), read from its
    header alone: nothing is allocated for the tensors.

    Each entry must be a known dtype with a shape of non-negative ints whose byte range fits
    the data exactly. Raises SerializationError naming ``what`` otherwise.
    """
    if len(data) < 8:
        raise SerializationError(f"{what}: corrupt safetensors weights (shorter than a header)")
    (head_len,) = struct.unpack("<Q", data[:8])
    body = len(data) - 8 - head_len
    if head_len > _MAX_SAFETENSORS_HEADER or body < 0:
        raise SerializationError(f"{what}: corrupt safetensors weights (header length {head_len})")
    try:
        header = json.loads(data[8 : 8 + head_len])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        out: dict[str, TensorEntry] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _SAFETENSORS_ITEMSIZE:
                raise ValueError(f"{name}: unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"{name}: bad shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise ValueError(f"{name}: bad data_offsets")
            begin, end = offsets
            if not 0 <= begin <= end <= body or end - begin != math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]:
                raise ValueError(f"{name}: data_offsets {offsets} do not fit {dtype}{shape}")
            out[name] = TensorEntry(dtype=dtype, shape=tuple(shape))
    except (ValueError, KeyError, TypeError) as exc:
        raise SerializationError(f"{what}: corrupt safetensors weights ({exc})") from exc
    return out


def check_weights_fit(module: nn.Module, manifest: Mapping[str, TensorEntry], *, what: str) -> None:
    """Compare ``module``'s state dict (on any device, ``meta`` included: only names, shapes
    and dtypes are read) with a safetensors ``manifest``: the same names, each the same shape
    and the same dtype (an F64 or I64 tensor is not converted into a float32 parameter).
    Raises SerializationError saying what differs."""
    want = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(want) - set(manifest))
    extra = sorted(set(manifest) - set(want))
    if missing or extra:
        raise SerializationError(
            f"{what}: the weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, tensor in want.items():
        entry = manifest[key]
        if entry.shape != tuple(tensor.shape):
            raise SerializationError(
                f"{what}: the weights do not fit the model: {key} is saved with shape "
                f"{list(entry.shape)}, the model's is {list(tensor.shape)} (the model described "
                f"would hold {sum(t.numel() for t in want.values())} values)"
            )
        expected = _SAFETENSORS_DTYPES.get(tensor.dtype)
        if entry.dtype != expected:
            raise SerializationError(
                f"{what}: {key} is saved as {entry.dtype}, the model's is {tensor.dtype}; "
                "refusing to convert it"
            )


def load_safetensors_into(module: nn.Module, data: bytes, *, what: str) -> None:
    """Load safetensors ``data`` into ``module`` (strict: the same names, shapes and dtypes,
    checked on the header before any tensor is read); SerializationError when it does not fit."""
    from safetensors.torch import load

    check_weights_fit(module, safetensors_manifest(data, what=what), what=what)
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001
        raise SerializationError(f"{what}: corrupt safetensors weights ({exc})") from exc
    try:
        module.load_state_dict(tensors, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise SerializationError(f"{what}: weights do not fit the model ({exc})") from exc


def _names_only_from_torch_nn(doc: Any, depth: int = 0) -> bool:
    if not isinstance(doc, dict) or depth > _MAX_SPEC_DEPTH or not isinstance(doc.get("class"), str):
        return False
    module = doc["class"].partition(":")[0] if ":" in doc["class"] else doc["class"].rpartition(".")[0]
    if not (module == "torch.nn" or module.startswith("torch.nn.")):
        return False
    return all(
        isinstance(c, list) and len(c) == 2 and _names_only_from_torch_nn(c[1], depth + 1)
        for c in doc.get("children") or []
    )


def probe_spec(doc: Any, *, what: str, policy: ClassPolicy, untrusted_root: str | None = None) -> nn.Module | None:
    """Build spec ``doc`` on the ``meta`` device (no memory for parameters), after checking its
    names (:func:`check_spec_names`): the shapes and dtypes it implies, for
    :func:`check_weights_fit`. None when a class of the caller cannot be built on ``meta``
    (then only the real build can tell); a ``torch.nn``-only spec that cannot is refused."""
    check_spec_names(doc, what=what, policy=policy)
    try:
        with torch.device("meta"):
            return build_from_spec(doc, what=what, policy=policy, untrusted_root=untrusted_root)
    except SerializationError as exc:
        if isinstance(exc.__cause__, SerializationError) or exc.__cause__ is None:
            raise
        if _names_only_from_torch_nn(doc):
            raise SerializationError(f"{what}: cannot check the size of the model before building it ({exc})") from exc
        _log.info("%s: cannot build on the meta device (%s); the size is checked after building", what, exc)
        return None


def build_checked(
    doc: Any,
    weights: bytes,
    *,
    what: str,
    policy: ClassPolicy,
    untrusted_root: str | None = None,
) -> nn.Module:
    """Build spec ``doc`` and load safetensors ``weights`` into it, refusing before the real
    build anything whose names (``policy``), parameter count, shapes or dtypes do not match
    the weights' header. Raises SerializationError."""
    manifest = safetensors_manifest(weights, what=what)
    probe = probe_spec(doc, what=what, policy=policy, untrusted_root=untrusted_root)
    if probe is not None:
        check_weights_fit(probe, manifest, what=what)
        del probe
    module = build_from_spec(doc, what=what, policy=policy, untrusted_root=untrusted_root)
    load_safetensors_into(module, weights, what=what)
    return module


def normalize_spec(module: nn.Module, model_spec: Any) -> dict[str, Any] | None:
    """Return the JSON model spec that rebuilds ``module``, or None (then it is pickled).

    ``model_spec`` (``(path, kwargs)`` or ``(class, kwargs)``) is used when the class is
    importable, the kwargs JSON-able and it builds a module with the same state-dict keys and
    shapes (checked on the ``meta`` device, so nothing is allocated). Otherwise, or without
    one, the module's own structure is tried (:func:`structural_spec`).
    """
    if model_spec is not None:
        doc = _user_spec(module, model_spec)
        if doc is not None:
            return doc
    return structural_spec(module)


def _user_spec(module: nn.Module, model_spec: Any) -> dict[str, Any] | None:
    try:
        target, kwargs = model_spec
    except (TypeError, ValueError) as exc:
        raise SerializationError("model_spec must be (import path or class, kwargs)") from exc
    cls = target if isinstance(target, type) else import_class(target, what="model_spec", base=nn.Module)
    path = import_path(cls)
    if path is None or _json_kwargs(kwargs) is None or type(module) is not cls:
        _log.info("model_spec of %s is not usable; trying the module's structure", cls)
        return None
    try:
        with torch.device("meta"):
            probe = cls(**dict(kwargs or {}))
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        if want != got:
            _log.info("model_spec of %s builds other weights; trying the module's structure", cls)
            return None
    except Exception:  # noqa: BLE001 - cannot probe on meta: trust the spec, weights load strict
        pass
    return _lazy_doc(path, dict(kwargs or {}))


def _container(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    return _CONTAINER_MAGIC + struct.pack("<I", len(head)) + head + payload


def spec_format_version(doc: Any) -> int:
    """The lowest ``modStr`` / saved-directory format version that can hold spec ``doc``."""
    return 2 if _spec_has_children(doc) else 1


def model_string_from_spec(doc: dict[str, Any], weights: bytes) -> str:
    """The ``modStr`` of a spec-kind model (``doc`` a JSON model spec, ``weights`` safetensors)."""
    blob = _container({"kind": "spec", "spec": doc}, weights)
    return f"{MODEL_PREFIX}{spec_format_version(doc)};{base64.b64encode(blob).decode('ascii')}"


def serialize_model(module: nn.Module, model_spec: Any = None) -> str:
    """Serialize a trained module into a ``modStr`` string.

    Args:
        module: the network (its current weights are stored).
        model_spec: ``(import path or class, constructor kwargs)`` that rebuilds ``module``'s
            architecture. Without a usable one, a ``torch.nn`` layer or container tree of them
            is described by its structure (:func:`structural_spec`). Either way the string
            holds a JSON spec and the weights (safetensors) and reading it never unpickles.
            Any other module is cloudpickled.

    Raises:
        SerializationError: ``module`` is not an ``nn.Module`` or cannot be pickled.
    """
    if not isinstance(module, nn.Module):
        raise SerializationError(f"expected a torch.nn.Module, got {type(module)!r}")
    spec = normalize_spec(module, model_spec)
    weights = state_dict_to_safetensors(module) if spec is not None else None
    if spec is not None and weights is not None:
        return model_string_from_spec(spec, weights)
    if any(t.device.type != "cpu" for t in module.state_dict().values() if isinstance(t, torch.Tensor)):
        import copy

        module = copy.deepcopy(module).to("cpu")  # loadable on hosts without that device
    try:
        pickled = cloudpickle.dumps(module)
    except Exception as exc:  # noqa: BLE001
        raise SerializationError(f"cannot pickle the model: {exc}") from exc
    blob = _container({"kind": "pickle"}, pickled)
    return f"{MODEL_PREFIX}1;{base64.b64encode(blob).decode('ascii')}"


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A ``modStr`` taken apart without building anything."""

    kind: str  # "spec" or "pickle"
    spec: dict[str, Any] | None  # the JSON model spec (kind "spec")
    payload: bytes  # safetensors weights (spec) or the cloudpickled module (pickle)


def split_model_string(mod_str: str) -> ModelParts:
    """Parse a ``modStr`` into its parts (no import, no unpickling)."""
    rest = _split_prefixed(mod_str, MODEL_PREFIX, MODEL_VERSION, "modStr", _RECREATE_MODEL_HINT)
    try:
        blob = base64.b64decode(rest, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SerializationError(f"corrupt modStr (bad base64: {exc})") from exc
    if len(blob) < 8 or blob[:4] != _CONTAINER_MAGIC:
        raise SerializationError("corrupt modStr (bad container header)")
    (head_len,) = struct.unpack("<I", blob[4:8])
    if head_len > _MAX_HEADER_BYTES or 8 + head_len > len(blob):
        raise SerializationError("corrupt modStr (truncated header)")
    try:
        header = json.loads(blob[8 : 8 + head_len])
        kind = header["kind"]
        spec = None
        if kind == "spec":
            spec = header["spec"]
            if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
                raise ValueError("spec without a class")
        elif kind != "pickle":
            raise ValueError(f"unknown kind {kind!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise SerializationError(f"corrupt modStr header ({exc})") from exc
    return ModelParts(kind=kind, spec=spec, payload=blob[8 + head_len :])


def deserialize_model(
    mod_str: str, *, allow_pickle: bool = True, allowed_classes: Any = None
) -> nn.Module:
    """Rebuild the module of a ``modStr`` made by :func:`serialize_model`.

    Args:
        mod_str: the string.
        allow_pickle: False refuses a pickle-kind string with
            :class:`~sparktorch.errors.UnsafeModelError` before unpickling it (use it for a
            string read from storage you do not control). A spec-kind string never unpickles.
        allowed_classes: None (the default) trusts the string like the module it was made
            from (its classes are imported). A list (``[]`` included) treats it as data from
            storage: only ``torch.nn`` classes and the listed ones, checked on their names
            before any import, and the size and dtypes checked against the weights before the
            model is built (see :class:`ClassPolicy`).

    Raises:
        SerializationError: a foreign or upstream (dill) string, a newer format version, a
            corrupt string, or a model class that cannot be imported or is not an
            ``nn.Module`` subclass.
    """
    parts = split_model_string(mod_str)
    if parts.kind == "pickle" and not allow_pickle:
        raise _pickle_refused("this modStr string")
    policy = TRUSTED if allowed_classes is None else ClassPolicy.from_storage(allowed_classes)
    return model_from_parts(parts, policy=policy)


def model_from_parts(parts: ModelParts, *, policy: ClassPolicy = TRUSTED) -> nn.Module:
    """Build the module described by ``parts`` (a pickle-kind one is unpickled: in-process
    strings only; readers of storage check the opt-in first). Under a storage ``policy`` the
    spec is checked name by name and against its weights before it is built
    (:func:`build_checked`)."""
    if parts.kind == "spec":
        if not policy.trusted:
            return build_checked(parts.spec, parts.payload, what="modStr model", policy=policy)
        module = build_from_spec(parts.spec, what="modStr model")
        load_safetensors_into(module, parts.payload, what="modStr model")
        return module
    try:
        module = cloudpickle.loads(parts.payload)
    except Exception as exc:  # noqa: BLE001
        raise SerializationError(
            f"cannot unpickle the model ({type(exc).__name__}: {exc}); is the package that "
            "defines it installed?"
        ) from exc
    if not isinstance(module, nn.Module):
        raise SerializationError("modStr did not hold a torch.nn.Module")
    return module


def model_string_key(mod_str: str) -> str:
    """A content hash of a ``modStr`` (the key of the per-worker model cache)."""
    return hashlib.sha256(mod_str.encode("utf-8")).hexdigest()
