"""Compatibility import path ``sparktorch.torch_distributed``.

In sparktorch 0.2.0 this module defined ``SparkTorch`` and ``SparkTorchModel``; programs still
write ``from sparktorch.torch_distributed import SparkTorchModel``. The classes now live in
:mod:`sparktorch.model` and :mod:`sparktorch.estimator`; this module only re-exports them. The
old torch.distributed training code and its helpers are gone on purpose.
"""

from __future__ import annotations

from typing import Any

from sparktorch.model import SparkTorchModel

__all__ = ["SparkTorch", "SparkTorchModel"]


def __getattr__(name: str) -> Any:
    # Imported on first use so this module does not depend on the estimator at import time.
    if name == "SparkTorch":
        from sparktorch.estimator import SparkTorch

        return SparkTorch
    raise AttributeError(f"module 'sparktorch.torch_distributed' has no attribute {name!r}")
