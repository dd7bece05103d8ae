"""The state-size arithmetic a fit checks against Spark's limits before any job starts: it
must equal what the engine really holds for each optimizer."""

from __future__ import annotations

import numpy as np
import pytest

from sparktorch import _native
from sparktorch._driver import parse_spark_bytes, state_bytes
from sparktorch._optim import resolve_optimizer

CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", {"lr": 0.01}),
    ("Adagrad", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("Adadelta", {}),
    ("Adamax", {}),
    ("NAdam", {}),
    ("RAdam", {}),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{'-'.join(k)}" for n, k in CASES])
def test_state_bytes_equals_what_the_engine_holds(name, kwargs):
    import torch

    trainable, buffers = 1000, 24
    opt_name, hyper = resolve_optimizer(getattr(torch.optim, name), kwargs)
    server = _native.ParameterServer(
        np.zeros(trainable + buffers, dtype=np.float32), [("w", [trainable]), ("b", [buffers])], opt_name, hyper,
        secret=b"s" * 32, mode="hogwild", host="127.0.0.1", port=0, num_workers=1, model_buffers=buffers,
    )
    try:
        state = server.optimizer_state()
    finally:
        server.stop()
    held = 4 * (trainable + buffers) + sum(4 * np.asarray(v).size for v in state["buffers"].values())
    # SGD's momentum buffer exists only from the first step (as in torch): count it as held.
    if name == "SGD" and kwargs.get("momentum"):
        held = max(held, 4 * (trainable + buffers) + 4 * trainable)
    assert state_bytes(opt_name, hyper, trainable, buffers) == held, state.keys()


@pytest.mark.parametrize("text,value", [("1g", 1 << 30), ("512m", 512 << 20), ("1024k", 1 << 20), ("2048", 2048), ("0", 0), ("2GB", 2 << 30), ("1.5g", 3 << 29)])
def test_spark_byte_strings(text, value):
    assert parse_spark_bytes(text) == value


def test_the_largest_shard_carries_the_optimizer_state():
    """Ranges have equal lengths but only trainable values carry Adam's moments: with a large
    buffer tail, shard 0 is the largest result, not the average."""
    import torch

    from sparktorch._driver import largest_shard_bytes

    opt_name, hyper = resolve_optimizer(torch.optim.Adam, {"lr": 0.01})
    trainable, buffers = 600, 400
    # shard 0: 500 trainable values x (4 + 8) bytes; shard 1: 100 trainable x 12 + 400 buffers x 4
    assert largest_shard_bytes(opt_name, hyper, trainable, buffers, 2) == 500 * 12
    assert largest_shard_bytes(opt_name, hyper, trainable, buffers, 2) > state_bytes(opt_name, hyper, trainable, buffers) // 2
