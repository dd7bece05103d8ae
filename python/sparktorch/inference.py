"""Inference helpers (upstream import path ``sparktorch.inference``).

Turn an already trained ``torch.nn.Module`` into a Spark ML stage, alone or appended to a
fitted pipeline.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from pyspark.ml.pipeline import PipelineModel

from sparktorch._serialize import serialize_model
from sparktorch.model import SparkTorchModel

__all__ = [
    "convert_to_serialized_torch",
    "create_spark_torch_model",
    "attach_pytorch_model_to_pipeline",
]


def convert_to_serialized_torch(network: nn.Module, model_spec: Any = None) -> str:
    """Serialize a network into the ``modStr`` string of a :class:`SparkTorchModel`.

    Args:
        network: the trained network.
        model_spec: optional ``(class or import path, constructor kwargs)`` that rebuilds the
            network's architecture; with it, saving and loading the model never pickles.
    """
    return serialize_model(network, model_spec)


def create_spark_torch_model(
    network: nn.Module,
    inputCol: str = "features",
    predictionCol: str = "predicted",
    useVectorOut: bool = False,
    *,
    model_spec: Any = None,
    inferenceBatchSize: int = 1024,
    device: str = "cpu",
) -> SparkTorchModel:
    """Wrap an already trained network as a :class:`SparkTorchModel` (inference on Spark).

    Args:
        network: the trained ``torch.nn.Module``.
        inputCol: the Vector column fed to the network.
        predictionCol: the output column.
        useVectorOut: output the whole network output as a Vector instead of a Double.
        model_spec: optional ``(class or import path, constructor kwargs)`` of the network, so
            that a saved model loads without unpickling (see ``docs/persistence.md``).
        inferenceBatchSize: rows per forward pass.
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
    """
    model = SparkTorchModel._from_module(
        network,
        model_spec=model_spec,
        inputCol=inputCol,
        predictionCol=predictionCol,
        useVectorOut=useVectorOut,
        device=device,
    )
    return model.setInferenceBatchSize(inferenceBatchSize)


def attach_pytorch_model_to_pipeline(
    network: nn.Module,
    pipeline_model: PipelineModel,
    inputCol: str = "features",
    predictionCol: str = "predicted",
    useVectorOut: bool = False,
    *,
    model_spec: Any = None,
) -> PipelineModel:
    """Return a ``PipelineModel`` that runs ``pipeline_model`` and then the network.

    The stages of ``pipeline_model`` come first, then a :class:`SparkTorchModel` reading
    ``inputCol``. The result saves and loads with plain ``save`` / ``PipelineModel.load``.
    """
    torch_stage = create_spark_torch_model(
        network, inputCol, predictionCol, useVectorOut, model_spec=model_spec
    )
    return PipelineModel(stages=[*pipeline_model.stages, torch_stage])
