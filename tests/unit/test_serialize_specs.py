"""Model specs: torch.nn container trees saved without pickle, class checks before any call,
and the allow_pickle switch of the string readers (no Spark)."""

from __future__ import annotations

import base64
import json
import os
import pickle
from collections import OrderedDict

import cloudpickle
import pytest
import torch
import torch.nn as nn

from sparktorch._serialize import build_from_spec, split_model_string, structural_spec
from sparktorch.errors import SerializationError, UnsafeModelError
from sparktorch.util import (
    deserialize_model,
    load_torch_obj,
    serialize_model,
    serialize_torch_obj,
    serialize_torch_obj_lazy,
)
from nets import seed_mlp


def _no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise AssertionError("unpickling is not allowed here")

    for mod, name in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)


class _Heads(nn.Module):
    """Runs a ModuleDict of an Embedding, an LSTM and a ModuleList of heads."""

    def __init__(self, tree: nn.ModuleDict) -> None:
        super().__init__()
        self.tree = tree

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.tree["lstm"](self.tree["emb"](idx))
        last = out[:, -1]
        return torch.cat([self.tree["heads"][0](last), self.tree["heads"][1](last)], dim=1)


def _seed() -> nn.Module:
    return seed_mlp()


def _conv() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 5),
    )
    net.train()
    net(torch.randn(8, 1, 8, 8))  # moves the BatchNorm running statistics off their defaults
    return net


def _tree() -> nn.ModuleDict:
    return nn.ModuleDict({
        "emb": nn.Embedding(10, 4, padding_idx=0),
        "lstm": nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1),
        "heads": nn.ModuleList([
            nn.Linear(12, 2),
            nn.Sequential(OrderedDict(fc=nn.Linear(12, 3), act=nn.GELU(approximate="tanh"))),
        ]),
    })


# (name, builder, input, expected kind)
SHAPES = [
    ("seed", _seed, lambda: torch.randn(3, 784), "spec"),
    ("conv-bn-dropout", _conv, lambda: torch.randn(2, 1, 8, 8), "spec"),
    ("dict-list-embedding-lstm", _tree, None, "spec"),
    ("gru", lambda: nn.GRU(3, 4, num_layers=2), lambda: torch.randn(5, 2, 3), "spec"),
    ("rnn-relu", lambda: nn.RNN(3, 4, nonlinearity="relu"), lambda: torch.randn(5, 2, 3), "spec"),
    ("layernorm", lambda: nn.Sequential(nn.LayerNorm(5, elementwise_affine=False), nn.LayerNorm(5, eps=1e-3)), lambda: torch.randn(2, 5), "spec"),
    ("transformer-layer", lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), lambda: torch.randn(3, 2, 8), "pickle"),
    ("float64", lambda: nn.Sequential(nn.Linear(2, 2)).double(), lambda: torch.randn(2, 2, dtype=torch.float64), "pickle"),
]


def _tied() -> nn.Module:
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.ReLU(), lin)


def _frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3))
    net[0].weight.requires_grad_(False)
    return net


def _hooked() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3))
    net[0].register_forward_hook(lambda _m, _i, out: out * 2)
    return net


def _extra_attr() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3))
    net.scale = 3.0
    return net


SHAPES += [
    ("tied-weights", _tied, lambda: torch.randn(2, 3), "pickle"),
    ("frozen-layer", _frozen, lambda: torch.randn(2, 3), "pickle"),
    ("forward-hook", _hooked, lambda: torch.randn(2, 3), "pickle"),
    ("extra-attribute", _extra_attr, lambda: torch.randn(2, 3), "pickle"),
]


@pytest.mark.parametrize("name,build,make_input,kind", SHAPES, ids=[s[0] for s in SHAPES])
def test_container_shapes_round_trip(monkeypatch, name, build, make_input, kind) -> None:
    torch.manual_seed(0)
    net = build()
    s = serialize_model(net)
    assert split_model_string(s).kind == kind
    if kind == "spec":
        _no_pickle(monkeypatch)
    back = deserialize_model(s)
    monkeypatch.undo()
    if isinstance(net, nn.ModuleDict):
        net, back = _Heads(net), _Heads(back)
        x = torch.randint(0, 10, (2, 5))
    else:
        x = make_input()
    net.eval(), back.eval()
    with torch.no_grad():
        a, b = net(x), back(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert torch.equal(a, b)
    assert repr(back) == repr(net)
    if name == "frozen-layer":
        assert not back[0].weight.requires_grad


def test_seed_spec_is_plain_torch_nn_json() -> None:
    spec = structural_spec(_seed())
    assert spec is not None
    assert spec["class"] == "torch.nn.modules.container:Sequential"
    assert [c[1]["class"].split(":")[1] for c in spec["children"]] == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "Softmax"]
    assert spec["children"][0][1]["kwargs"] == {"in_features": 784, "out_features": 256}
    assert spec["children"][5][1]["kwargs"] == {"dim": 1}
    assert serialize_model(_seed()).startswith("sparktorch-model/2;")  # container trees: format 2
    assert serialize_model(nn.Linear(2, 2)).startswith("sparktorch-model/1;")


# ------------------------------------------------------------------ class checks before any call


@pytest.mark.parametrize(
    "doc, match",
    [
        (lambda m: {"class": "subprocess:Popen", "kwargs": {"args": ["touch", m]}}, "not a torch.nn.Module subclass"),
        (lambda m: {"class": "os:system", "kwargs": {"command": f"touch {m}"}}, "not a class"),
        (lambda m: {"class": "torch.nn.modules.container:Sequential",
                    "children": [["0", {"class": "subprocess:Popen", "kwargs": {"args": ["touch", m]}}]]},
         "not a torch.nn layer"),  # refused on its name, before any import
        (lambda m: {"class": "subprocess:Popen", "children": []}, "not a torch.nn layer"),
        (lambda m: {"class": "torch.nn.modules.linear:Linear", "children": []}, "only these have children"),
        (lambda m: {"class": "torch.nn.modules.container:Sequential",
                    "children": [["0", {"class": "nets:TwoLayer", "kwargs": {}}]]}, "not a torch.nn layer"),
    ],
    ids=["Popen", "os.system", "Popen-in-Sequential", "Popen-as-container", "Linear-as-container", "user-class-in-container"],
)
def test_spec_builds_only_nn_modules(tmp_path, doc, match) -> None:
    marker = str(tmp_path / "pwned")
    with pytest.raises(SerializationError, match=match):
        build_from_spec(doc(marker), what="test")
    assert not os.path.exists(marker)


def _torch_obj_with(**overrides) -> str:
    doc = {
        "model": {"class": "torch.nn.modules.linear:Linear", "kwargs": {"in_features": 2, "out_features": 2}},
        "criterion": {"class": "torch.nn.modules.loss:MSELoss", "kwargs": {}},
        "optimizer": {"class": "torch.optim.adam:Adam", "kwargs": {"lr": 0.1}},
    }
    doc.update(overrides)
    return "sparktorch-torchobj/1;json;" + json.dumps(doc)


@pytest.mark.parametrize("part", ["model", "criterion", "optimizer"])
def test_torch_obj_json_builds_only_the_expected_kinds(tmp_path, part) -> None:
    load_torch_obj(_torch_obj_with())  # the untouched one loads
    marker = str(tmp_path / "pwned")
    bad = {"class": "subprocess:Popen", "kwargs": {"args": ["touch", marker]}}
    with pytest.raises(SerializationError, match="subprocess:Popen.*not a torch"):
        load_torch_obj(_torch_obj_with(**{part: bad}))
    assert not os.path.exists(marker)


# ------------------------------------------------------------------ torchObj of a model instance


def test_seed_torch_obj_is_json_with_weights(monkeypatch) -> None:
    torch.manual_seed(0)
    net = _seed()
    s = serialize_torch_obj(net, nn.CrossEntropyLoss(label_smoothing=0.1), torch.optim.Adam, lr=1e-4, betas=(0.8, 0.9))
    assert s.startswith("sparktorch-torchobj/2;json;")
    _no_pickle(monkeypatch)
    obj = load_torch_obj(s, allow_pickle=False)
    monkeypatch.undo()
    x = torch.randn(4, 784)
    assert torch.equal(obj.model(x), net(x))
    assert obj.optimizer is torch.optim.Adam and obj.optimizer_params == {"lr": 1e-4, "betas": (0.8, 0.9)}
    assert obj.criterion.label_smoothing == pytest.approx(0.1)


def test_corrupt_torch_obj_weights() -> None:
    s = serialize_torch_obj(nn.Sequential(nn.Linear(2, 2)), nn.MSELoss(), torch.optim.SGD, lr=0.1)
    doc = json.loads(s.split(";", 2)[2])
    doc["weights"] = base64.b64encode(b"garbage").decode()
    with pytest.raises(SerializationError, match="corrupt safetensors"):
        load_torch_obj("sparktorch-torchobj/2;json;" + json.dumps(doc))


def test_non_module_criterion_class_is_pickled_not_named() -> None:
    class NotAModule:  # a callable loss class that is not an nn.Module
        def __call__(self, a, b):
            return ((a - b) ** 2).mean()

    s = serialize_torch_obj_lazy(nn.Linear, NotAModule, torch.optim.SGD, {"lr": 0.1}, {"in_features": 2, "out_features": 1})
    assert ";pickle;" in s


# ------------------------------------------------------------------ allow_pickle=False


def test_string_readers_refuse_pickles_when_asked() -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    mod_str = serialize_model(Local())
    torch_obj = serialize_torch_obj(Local(), nn.MSELoss(), torch.optim.SGD, lr=0.1)
    with pytest.raises(UnsafeModelError, match="modStr.*pickle.*arbitrary code"):
        deserialize_model(mod_str, allow_pickle=False)
    with pytest.raises(UnsafeModelError, match="torchObj.*pickle.*arbitrary code"):
        load_torch_obj(torch_obj, allow_pickle=False)
    # strings made in this process are trusted by default (0.2.0 programs pass them around)
    assert isinstance(deserialize_model(mod_str), Local)
    assert isinstance(load_torch_obj(torch_obj).model, Local)
