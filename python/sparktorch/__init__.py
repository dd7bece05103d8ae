"""sparktorch: distributed PyTorch training on Apache Spark.

Hand over a ``torch.nn.Module``, a loss, an optimizer class and a DataFrame; get back a Spark ML
``Model``. Training runs through a parameter server (Rust, in the driver process) in one of three
styles: hogwild (lock-free), async with locking, and synchronous.

The public names are those of the ``sparktorch`` 0.2.0 package::

    from sparktorch import serialize_torch_obj, serialize_torch_obj_lazy, SparkTorch
    from sparktorch import SparkTorchModel, create_spark_torch_model, PysparkPipelineWrapper
"""

from __future__ import annotations

import logging

from ._native import __version__ as _engine_version
from .estimator import SparkTorch
from .inference import attach_pytorch_model_to_pipeline, create_spark_torch_model
from .model import SparkTorchModel
from .pipeline_util import PysparkPipelineWrapper
from .util import (
    TorchObj,
    deserialize_model,
    load_torch_obj,
    serialize_model,
    serialize_torch_obj,
    serialize_torch_obj_lazy,
)

logging.getLogger("sparktorch").addHandler(logging.NullHandler())

__version__ = _engine_version

__all__ = [
    "SparkTorch",
    "SparkTorchModel",
    "PysparkPipelineWrapper",
    "TorchObj",
    "attach_pytorch_model_to_pipeline",
    "create_spark_torch_model",
    "deserialize_model",
    "load_torch_obj",
    "serialize_model",
    "serialize_torch_obj",
    "serialize_torch_obj_lazy",
    "__version__",
]
