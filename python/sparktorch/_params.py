"""Params shared by :class:`~sparktorch.SparkTorchModel` and the ``SparkTorch`` estimator.

Names and defaults follow sparktorch 0.2.0 (see ``UPSTREAM.md``): ``inputCol='features'``,
``predictionCol='predicted'``, ``modStr=''``, ``useVectorOut=False``, ``device='cpu'``; plus
``inferenceBatchSize`` (rows per forward pass in ``transform``).
"""

from __future__ import annotations

import re
from typing import Any

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasPredictionCol

from sparktorch.errors import ParamError

__all__ = ["_SharedTorchParams", "_SparkTorchModelParams", "validate_device"]

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def validate_device(device: str) -> str:
    """Return ``device`` if it is ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; else ParamError."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ParamError(f"param 'device' must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return device


class _SharedTorchParams(HasInputCol, HasPredictionCol):
    """Params that the estimator and the model share: columns, output form, device."""

    useVectorOut: Param[bool] = Param(
        Params._dummy(),
        "useVectorOut",
        "output the whole network output as a Vector instead of a Double",
        typeConverter=TypeConverters.toBoolean,
    )
    device: Param[str] = Param(
        Params._dummy(),
        "device",
        "torch device: 'cpu', 'cuda' (the task's GPU) or 'cuda:N'",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._setDefault(inputCol="features", predictionCol="predicted", useVectorOut=False, device="cpu")

    def getUseVectorOut(self) -> bool:
        """Whether ``transform`` outputs a Vector instead of a Double."""
        return self.getOrDefault(self.useVectorOut)

    def getVectorOut(self) -> bool:
        """Alias of :meth:`getUseVectorOut` (the upstream getter name)."""
        return self.getUseVectorOut()

    def getDevice(self) -> str:
        """The torch device."""
        return self.getOrDefault(self.device)


class _SparkTorchModelParams(_SharedTorchParams):
    """Private params mixin: typed Params, defaults and getters of the torch stages."""

    modStr: Param[str] = Param(
        Params._dummy(),
        "modStr",
        "the serialized model (sparktorch.util.serialize_model)",
        typeConverter=TypeConverters.toString,
    )
    inferenceBatchSize: Param[int] = Param(
        Params._dummy(),
        "inferenceBatchSize",
        "rows per forward pass in transform (> 0)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(modStr="", inferenceBatchSize=1024)

    def getModStr(self) -> str:
        """The serialized model."""
        return self.getOrDefault(self.modStr)

    def getInferenceBatchSize(self) -> int:
        """Rows per forward pass in ``transform``."""
        return self.getOrDefault(self.inferenceBatchSize)

    def _validate_model_params(self) -> None:
        """Check the params ``transform`` needs; ParamError naming the param."""
        batch = self.getInferenceBatchSize()
        if batch <= 0:
            raise ParamError(f"param 'inferenceBatchSize' must be > 0, got {batch}")
        validate_device(self.getDevice())
        for name in ("inputCol", "predictionCol"):
            value = self.getOrDefault(name)
            if not isinstance(value, str) or not value:
                raise ParamError(f"param '{name}' must be a non-empty column name, got {value!r}")
