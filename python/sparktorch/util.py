"""Serialization helpers (upstream import path ``sparktorch.util``).

* :func:`serialize_torch_obj` / :func:`serialize_torch_obj_lazy` make the ``torchObj`` string
  that :class:`sparktorch.SparkTorch` trains from; :func:`load_torch_obj` reads it back.
* :func:`serialize_model` / :func:`deserialize_model` make and read the ``modStr`` string that a
  :class:`sparktorch.SparkTorchModel` carries.

The formats are described in ``docs/persistence.md``. Strings made by sparktorch 0.2.0 (dill
pickles) are refused with :class:`~sparktorch.errors.SerializationError`, never unpickled.
"""

from __future__ import annotations

from sparktorch._serialize import (
    TorchObj,
    deserialize_model,
    load_torch_obj,
    serialize_model,
    serialize_torch_obj,
    serialize_torch_obj_lazy,
)

__all__ = [
    "TorchObj",
    "serialize_torch_obj",
    "serialize_torch_obj_lazy",
    "load_torch_obj",
    "serialize_model",
    "deserialize_model",
]
