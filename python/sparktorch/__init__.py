"""sparktorch: distributed PyTorch training on Apache Spark.

Hand over a ``torch.nn.Module``, a loss, an optimizer class and a DataFrame; get back a Spark ML
``Model``. Training runs through a parameter server (Rust) in one of three styles: hogwild
(lock-free), async with locking, and synchronous.
"""

from __future__ import annotations

import logging

logging.getLogger("sparktorch").addHandler(logging.NullHandler())

__all__: list[str] = []
