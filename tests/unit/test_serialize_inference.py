"""The executor-side predictor: one model build per process, nulls, ragged rows (no Spark)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn as nn

from sparktorch import _inference
from sparktorch._serialize import model_string_key, serialize_model
from sparktorch.errors import DataError


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    mod_str = serialize_model(net)
    kw = dict(key=model_string_key(mod_str), mod_str=mod_str, device="cpu", batch_size=2, column="f")
    _inference.clear_cache()
    return net, kw


def test_model_built_once_across_batches() -> None:
    net, kw = _setup()
    before = _inference.LOAD_COUNT
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    arr = pa.array(list(x), type=pa.list_(pa.float32()))
    for _ in range(4):
        got = _inference.predict_array(arr, vector_out=True, **kw)
    assert _inference.LOAD_COUNT == before + 1
    want = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.array(got.to_pylist()), want, rtol=1e-6)
    # the read-only Arrow input was not written by the in-place ReLU
    assert arr.to_pylist()[0] == [0.0, 1.0, 2.0]


def test_nulls_and_all_null_batches() -> None:
    net, kw = _setup()
    arr = pa.array([[1.0, 2.0, 3.0], None, [0.0, 0.0, 1.0]], type=pa.list_(pa.float32()))
    dbl = _inference.predict_array(arr, vector_out=False, **kw).to_pylist()
    assert dbl[1] is None
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    assert [dbl[0], dbl[2]] == [float(v) for v in net(x).argmax(1)]
    vec = _inference.predict_array(arr, vector_out=True, **kw).to_pylist()
    assert vec[1] is None and len(vec[0]) == 2
    none = pa.array([None, None], type=pa.list_(pa.float32()))
    assert _inference.predict_array(none, vector_out=False, **kw).to_pylist() == [None, None]
    assert _inference.predict_array(none, vector_out=True, **kw).to_pylist() == [None, None]


def test_ragged_rows_are_a_data_error() -> None:
    _, kw = _setup()
    arr = pa.array([[1.0, 2.0, 3.0], [1.0]], type=pa.list_(pa.float32()))
    with pytest.raises(DataError, match="'f'.*different vector sizes"):
        _inference.predict_array(arr, vector_out=False, **kw)


def test_output_offsets_past_int32_are_refused_not_wrapped() -> None:
    """A batch whose rows x output width pass 2^31 - 1 values: a DataError naming the Arrow
    batch setting (int32 offsets would wrap to negative or small values silently)."""
    from sparktorch.errors import DataError

    with pytest.raises(DataError, match=r"spark\.sql\.execution\.arrow\.maxRecordsPerBatch to at most 1\b"):
        _inference.list_offsets(3, 1 << 30, None, "predictions")
    with pytest.raises(DataError, match="maxRecordsPerBatch"):
        _inference.list_offsets(5, 1 << 30, np.array([True, False, True, True, False]), "predictions")
    ok = _inference.list_offsets(3, 4, np.array([True, False, True]), "predictions").to_pylist()
    assert ok == [0, 4, 4, 8]
    assert _inference.list_offsets(2, (1 << 30) - 1, None, "p").to_pylist() == [0, (1 << 30) - 1, (1 << 31) - 2]
