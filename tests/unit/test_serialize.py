"""Serialization of the torch object and of trained models (no Spark)."""

from __future__ import annotations

import base64
import json
import pickle

import cloudpickle
import pytest
import torch
import torch.nn as nn

from sparktorch.errors import SerializationError
from sparktorch.util import (
    TorchObj,
    deserialize_model,
    load_torch_obj,
    serialize_model,
    serialize_torch_obj,
    serialize_torch_obj_lazy,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=1))


def _no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise AssertionError("unpickling is not allowed here")

    for mod, name in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)


def test_eager_round_trip_keeps_weights_and_optimizer() -> None:
    net = _mlp()
    s = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.01, betas=(0.8, 0.9))
    obj = load_torch_obj(s)
    assert isinstance(obj, TorchObj)
    assert obj.optimizer is torch.optim.Adam
    assert obj.optimizer_params == {"lr": 0.01, "betas": (0.8, 0.9)}
    assert obj.model_spec is None
    assert isinstance(obj.criterion, nn.CrossEntropyLoss)
    x = torch.randn(5, 4)
    assert torch.equal(obj.model(x), net(x))


def test_lazy_importable_is_json_and_loads_without_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    s = serialize_torch_obj_lazy(
        nn.Linear,
        nn.CrossEntropyLoss,
        torch.optim.SGD,
        optimizer_params={"lr": 0.1, "momentum": 0.9},
        model_parameters={"in_features": 4, "out_features": 2},
    )
    assert s.startswith("sparktorch-torchobj/1;json;")
    json.loads(s.split(";", 2)[2])  # the body is plain JSON
    _no_pickle(monkeypatch)
    obj = load_torch_obj(s)
    assert isinstance(obj.model, nn.Linear) and obj.model.out_features == 2
    assert obj.optimizer is torch.optim.SGD
    assert obj.optimizer_params == {"lr": 0.1, "momentum": 0.9}
    assert obj.model_spec == ("torch.nn.modules.linear:Linear", {"in_features": 4, "out_features": 2})


def test_lazy_criterion_instance_kwargs_survive() -> None:
    s = serialize_torch_obj_lazy(
        nn.Linear, nn.CrossEntropyLoss(label_smoothing=0.2), torch.optim.Adam,
        model_parameters={"in_features": 2, "out_features": 2},
    )
    assert ";json;" in s
    assert load_torch_obj(s).criterion.label_smoothing == pytest.approx(0.2)


def test_lazy_local_class_falls_back_to_pickle() -> None:
    class Local(nn.Module):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.fc = nn.Linear(2, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    s = serialize_torch_obj_lazy(Local, nn.MSELoss(), torch.optim.Adam, {"lr": 1e-3}, {"width": 5})
    assert ";pickle;" in s
    obj = load_torch_obj(s)
    assert obj.model.fc.out_features == 5 and obj.model_spec is None


@pytest.mark.parametrize(
    "bad",
    [
        lambda: serialize_torch_obj(nn.Linear, nn.MSELoss(), torch.optim.Adam),
        lambda: serialize_torch_obj(nn.Linear(2, 2), nn.MSELoss(), torch.optim.Adam(nn.Linear(2, 2).parameters())),
        lambda: serialize_torch_obj_lazy(nn.Linear(2, 2), nn.MSELoss, torch.optim.Adam),
    ],
)
def test_wrong_arguments_raise(bad) -> None:
    with pytest.raises(SerializationError):
        bad()


def test_upstream_dill_string_is_refused_not_unpickled(monkeypatch: pytest.MonkeyPatch) -> None:
    # what sparktorch 0.2.0 produced: base64 (with newlines) of a pickle, maybe inside JSON
    upstream = base64.encodebytes(pickle.dumps({"model": "x"}, protocol=4)).decode()
    _no_pickle(monkeypatch)
    for s in (upstream, json.dumps({"torch_obj": upstream, "shapes": None})):
        with pytest.raises(SerializationError, match="0.2.0.*serialize_torch_obj"):
            load_torch_obj(s)
        with pytest.raises(SerializationError, match="0.2.0"):
            deserialize_model(s)


@pytest.mark.parametrize("foreign", ["", "hello", "{}", "sparktorch-torchobj/x;json;{}"])
def test_foreign_strings_raise(foreign: str) -> None:
    with pytest.raises(SerializationError, match="serialize_torch_obj|malformed|non-empty"):
        load_torch_obj(foreign)


def test_newer_version_is_refused() -> None:
    with pytest.raises(SerializationError, match="newer"):
        load_torch_obj("sparktorch-torchobj/99;json;{}")
    with pytest.raises(SerializationError, match="newer"):
        deserialize_model("sparktorch-model/99;AAAA")


def test_model_string_spec_round_trip_without_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(4, 3)
    s = serialize_model(lin, (nn.Linear, {"in_features": 4, "out_features": 3}))
    _no_pickle(monkeypatch)
    back = deserialize_model(s)
    x = torch.randn(6, 4)
    assert torch.equal(back(x), lin(x))


def test_model_string_pickle_round_trip_and_bad_spec_falls_back() -> None:
    net = _mlp()
    # a spec that does not describe the module is not used
    s = serialize_model(net, (nn.Linear, {"in_features": 4, "out_features": 3}))
    back = deserialize_model(s)
    x = torch.randn(3, 4)
    assert torch.equal(back(x), net(x))


def test_corrupt_model_string() -> None:
    good = serialize_model(nn.Linear(2, 2), (nn.Linear, {"in_features": 2, "out_features": 2}))
    with pytest.raises(SerializationError):
        deserialize_model(good[:-40])
    with pytest.raises(SerializationError):
        deserialize_model("sparktorch-model/1;" + base64.b64encode(b"nope").decode())
