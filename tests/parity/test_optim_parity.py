"""Server-side optimizers against torch.optim.

Validation and state-conversion tests run everywhere. The trajectory tests drive the real engine
(``sparktorch._native.ParameterServer`` in mode ``"async"`` with one ``Client``) and run through
the Python binding exactly as the estimator does.
"""

from __future__ import annotations

import copy
import pathlib
import sys

import numpy as np
import pytest
import torch

from sparktorch._optim import SUPPORTED, from_torch_optimizer, resolve_optimizer, to_torch_state_dict
from sparktorch.errors import ParamError

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from cases import CASES, gradient_scale  # noqa: E402

from sparktorch import _native  # noqa: E402

STEPS = 200
CONTINUE = 10
# |server - torch| / max(1, |torch|) after every step. torch's vectorised CPU kernels fuse
# multiply-adds where the server rounds twice: differences are a few ulps (see docs/optimizers.md).
TOL = 1e-6
# SGD with a momentum buffer: the buffer carries each step's one-ulp FMA difference forward
# (torch: buf = fma(grad, 1 - dampening, buf * momentum); p = fma(buf, -lr, p)), so over 200 steps
# the differences add up to a few ulps of |p| ~ 10 (measured: 2.2e-6). See docs/optimizers.md.
TOL_BY_CASE = {"sgd_momentum": 4e-6, "sgd_dampening_wd": 4e-6, "sgd_nesterov_max": 4e-6}
SECRET = b"parity-test-secret-0123456789"
IDS = [c[0] for c in CASES]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, p in model.named_parameters() if p.requires_grad]


def flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().astype(np.float32)


def gradients(model: torch.nn.Module, seed: int, steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=g) * gradient_scale(s) for p in trainable(model)] for s in range(steps)
    ]


def torch_optimizer(name: str, kwargs: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    return getattr(torch.optim, name)(trainable(model), foreach=False, **kwargs)


def torch_step(opt: torch.optim.Optimizer, model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(trainable(model), grads):
        p.grad = g.clone()
    opt.step()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


# --- validation on the driver -----------------------------------------------------------------


@pytest.mark.parametrize("case,name,kwargs", CASES, ids=IDS)
def test_resolve_accepts_every_case(case: str, name: str, kwargs: dict) -> None:
    got_name, hyper = resolve_optimizer(getattr(torch.optim, name), kwargs)
    assert got_name == name
    assert set(hyper) == set(SUPPORTED[name])
    # torch agrees with what we send: its param_groups hold the same values.
    group = torch_optimizer(name, kwargs, make_model()).param_groups[0]
    for k, v in hyper.items():
        want = group[k]
        assert (tuple(want) if isinstance(want, (tuple, list)) else want) == v, k


def test_defaults_and_ignorable_keywords() -> None:
    name, hyper = resolve_optimizer(torch.optim.Adam, {"lr": 1, "foreach": True, "fused": None, "capturable": False})
    assert name == "Adam"
    assert hyper["lr"] == 1.0 and isinstance(hyper["lr"], float)
    assert hyper["betas"] == (0.9, 0.999) and hyper["eps"] == 1e-8
    assert "foreach" not in hyper and "fused" not in hyper and "capturable" not in hyper
    assert resolve_optimizer(torch.optim.AdamW, None)[1]["weight_decay"] == 1e-2
    assert resolve_optimizer("rmsprop", {"differentiable": False})[0] == "RMSprop"
    assert resolve_optimizer(torch.optim.SGD, {"lr": torch.tensor(0.5)})[1]["lr"] == 0.5
    assert resolve_optimizer(torch.optim.Adam, {"betas": [0.5, 0.6]})[1]["betas"] == (0.5, 0.6)


@pytest.mark.parametrize(
    "optimizer,kwargs,needle",
    [
        (torch.optim.LBFGS, {}, "LBFGS"),
        (torch.optim.SparseAdam, {}, "SparseAdam"),
        ("Lion", {}, "Lion"),
        (42, {}, "42"),
        (torch.optim.Adam, {"momentum": 0.9}, "'momentum'"),
        (torch.optim.Adam, {"lr": -1.0}, "lr"),
        (torch.optim.Adam, {"betas": (1.0, 0.9)}, "betas[0]"),
        (torch.optim.Adam, {"betas": (0.9,)}, "betas"),
        (torch.optim.Adam, {"eps": -1e-8}, "eps"),
        (torch.optim.Adam, {"amsgrad": 1}, "amsgrad"),
        (torch.optim.Adam, {"lr": "fast"}, "lr"),
        (torch.optim.Adam, {"differentiable": True}, "differentiable"),
        (torch.optim.SGD, {"nesterov": True}, "nesterov"),
        (torch.optim.SGD, {"weight_decay": -0.1}, "weight_decay"),
        (torch.optim.Adadelta, {"rho": 1.5}, "rho"),
        (torch.optim.NAdam, {"momentum_decay": -1.0}, "momentum_decay"),
        (torch.optim.AdamW, {"decoupled_weight_decay": True}, "decoupled_weight_decay"),
    ],
)
def test_rejected_with_named_keyword(optimizer, kwargs, needle) -> None:
    with pytest.raises(ParamError) as e:
        resolve_optimizer(optimizer, kwargs)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_keyword_lists_accepted() -> None:
    with pytest.raises(ParamError, match=r"takes: lr, betas, eps, weight_decay, amsgrad"):
        resolve_optimizer(torch.optim.Adam, {"momentum": 0.9})
    with pytest.raises(ParamError, match=r"supported: torch\.optim\.SGD, torch\.optim\.Adam"):
        resolve_optimizer(torch.optim.LBFGS, {})


def test_subclass_is_rejected() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    with pytest.raises(ParamError, match="not subclasses"):
        resolve_optimizer(MyAdam, {})


# --- state conversion, torch on both ends -----------------------------------------------------


@pytest.mark.parametrize("case,name,kwargs", CASES, ids=IDS)
def test_state_roundtrip_through_engine_form(case: str, name: str, kwargs: dict) -> None:
    model = make_model()
    opt = torch_optimizer(name, kwargs, model)
    grads = gradients(model, 7, 15)
    for g in grads[:5]:
        torch_step(opt, model, g)
    engine = from_torch_optimizer(opt)
    assert engine["name"] == name
    assert all(v.size == sum(p.numel() for p in trainable(model)) for v in engine["buffers"].values())

    twin = copy.deepcopy(model)
    twin_opt = torch_optimizer(name, kwargs, twin)
    twin_opt.load_state_dict(to_torch_state_dict(engine, twin))
    for g in grads[5:]:
        torch_step(opt, model, g)
        torch_step(twin_opt, twin, g)
    np.testing.assert_array_equal(flat(trainable(model)), flat(trainable(twin)))


def test_fresh_state_converts() -> None:
    model = make_model()
    sd = to_torch_state_dict({"name": "Adam", "hyperparameters": {}, "step": 0, "scalars": {}, "buffers": {}}, model)
    assert sd["state"] == {}
    torch.optim.Adam(trainable(model)).load_state_dict(sd)


def test_wrong_buffer_length_is_rejected() -> None:
    with pytest.raises(ParamError, match="exp_avg"):
        to_torch_state_dict(
            {"name": "Adam", "hyperparameters": {}, "step": 1, "scalars": {}, "buffers": {"exp_avg": np.zeros(3)}},
            make_model(),
        )


# --- the engine against torch -----------------------------------------------------------------


def start_server(name: str, hyper: dict, model: torch.nn.Module):
    layout = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    server = _native.ParameterServer(flat(trainable(model)), layout, name, hyper, secret=SECRET, mode="async")
    host, port = server.address
    client = _native.Client(host, port, SECRET, worker=0)
    return server, client


@pytest.mark.parametrize("case,name,kwargs", CASES, ids=IDS)
def test_server_matches_torch(case: str, name: str, kwargs: dict) -> None:
    model = make_model()
    opt = torch_optimizer(name, kwargs, model)
    opt_name, hyper = resolve_optimizer(getattr(torch.optim, name), kwargs)
    grads = gradients(model, 11, STEPS + CONTINUE)
    server, client = start_server(opt_name, hyper, model)
    out = np.zeros(client.num_params, dtype=np.float32)
    worst = 0.0
    try:
        for step, g in enumerate(grads[:STEPS]):
            torch_step(opt, model, g)
            client.push(flat(g), batch_size=1, loss=0.0, step=step)
            client.pull(out)
            worst = max(worst, rel_diff(out, flat(trainable(model))))
        assert server.version() == STEPS
        tol = TOL_BY_CASE.get(case, TOL)
        assert worst <= tol, f"{case}: max relative diff {worst:.3e}"

        # Export the server's state into torch; continuing in torch equals continuing on the server.
        state = server.optimizer_state()
        twin = copy.deepcopy(model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(out.copy()), trainable(twin))
        twin_opt = torch_optimizer(name, kwargs, twin)
        twin_opt.load_state_dict(to_torch_state_dict(state, twin))
        for step, g in enumerate(grads[STEPS:], start=STEPS):
            torch_step(twin_opt, twin, g)
            client.push(flat(g), batch_size=1, loss=0.0, step=step)
        client.pull(out)
        cont = rel_diff(out, flat(trainable(twin)))
        assert cont <= tol, f"{case}: continuing in torch differs by {cont:.3e}"

        # And back: torch's state loads into the server.
        server.load_optimizer_state(from_torch_optimizer(twin_opt))
        again = server.optimizer_state()
        for k, v in again["buffers"].items():
            np.testing.assert_array_equal(np.asarray(v), from_torch_optimizer(twin_opt)["buffers"][k])
    finally:
        client.close()
        server.stop()
