"""sparktorch: distributed PyTorch training on Apache Spark.

Hand over a ``torch.nn.Module``, a loss, an optimizer class and a DataFrame; get back a Spark ML
``Model``. Training runs through a parameter server (Rust, in the driver process) in one of three
styles: hogwild (lock-free), async with locking, and synchronous.

The public names are those of the ``sparktorch`` 0.2.0 package::

    from sparktorch import serialize_torch_obj, serialize_torch_obj_lazy, SparkTorch
    from sparktorch import SparkTorchModel, create_spark_torch_model, PysparkPipelineWrapper

plus :func:`load_pipeline`, the loader for a saved pipeline you did not write.

They are imported on first use (PEP 562): importing a private module of the package (a Spark
Python worker unpickling a task, the worker daemon :mod:`sparktorch._daemon`) does not pull in
pyspark.ml, pandas and pyarrow through this file.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._native import __version__ as _engine_version

logging.getLogger("sparktorch").addHandler(logging.NullHandler())

__version__ = _engine_version

_LAZY = {
    "SparkTorch": ".estimator",
    "SparkTorchModel": ".model",
    "PysparkPipelineWrapper": ".pipeline_util",
    "TorchObj": ".util",
    "attach_pytorch_model_to_pipeline": ".inference",
    "create_spark_torch_model": ".inference",
    "deserialize_model": ".util",
    "load_torch_obj": ".util",
    "load_pipeline": ".pipeline_util",
    "serialize_model": ".util",
    "serialize_torch_obj": ".util",
    "serialize_torch_obj_lazy": ".util",
}

__all__ = [
    "SparkTorch",
    "SparkTorchModel",
    "PysparkPipelineWrapper",
    "TorchObj",
    "attach_pytorch_model_to_pipeline",
    "create_spark_torch_model",
    "deserialize_model",
    "load_torch_obj",
    "load_pipeline",
    "serialize_model",
    "serialize_torch_obj",
    "serialize_torch_obj_lazy",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparktorch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
