"""Compatibility import path ``sparktorch.torch_distributed``.

In sparktorch 0.2.0 this module defined ``SparkTorch`` and ``SparkTorchModel``; programs still
write ``from sparktorch.torch_distributed import SparkTorch``. The classes now live in
:mod:`sparktorch.estimator` and :mod:`sparktorch.model`; this module only re-exports them. The
old torch.distributed training code is gone on purpose: every mode, ``synchronous`` included,
now runs through the parameter server.
"""

from __future__ import annotations

from sparktorch.estimator import SparkTorch
from sparktorch.model import SparkTorchModel

__all__ = ["SparkTorch", "SparkTorchModel"]
