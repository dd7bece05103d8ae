"""Map the user's ``torch.optim`` choice to the engine's server-side optimizer, and convert
optimizer state between the engine's flat form and ``torch.optim`` ``state_dict``\\ s.

The parameter server runs the optimizer in Rust (crate ``sparktorch-optim``) with
``torch.optim``'s arithmetic. The user names it the PyTorch way (``optimizer=torch.optim.Adam,
lr=1e-3``); :func:`resolve_optimizer` checks it on the driver, before any Spark job starts, and
returns what :class:`sparktorch._native.ParameterServer` takes. See ``docs/optimizers.md``.

State: the engine keeps one flat buffer per state name (``exp_avg``, ...) over the trainable
parameters in ``named_parameters()`` order. :func:`to_torch_state_dict` splits it per parameter
so that ``torch_optimizer.load_state_dict(...)`` continues training in plain PyTorch, and
:func:`from_torch_optimizer` goes back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import ParamError

__all__ = [
    "HyperValue",
    "SUPPORTED",
    "resolve_optimizer",
    "to_torch_state_dict",
    "from_torch_optimizer",
]

log = logging.getLogger("sparktorch")

HyperValue = Union[float, bool, tuple[float, float]]
"""A hyperparameter as the engine takes it."""

_Check = Callable[[float], bool]


@dataclass(frozen=True)
class _Param:
    kind: str  # "float", "bool" or "pair"
    default: Any
    check: _Check | None = None
    rule: str = ""


def _nonneg(default: float) -> _Param:
    return _Param("float", default, lambda v: v >= 0.0, "must be >= 0")


def _betas() -> _Param:
    return _Param("pair", (0.9, 0.999), lambda v: 0.0 <= v < 1.0, "each beta must be in [0, 1)")


_FLAG = _Param("bool", False)

# torch.optim 2.x constructor keywords, defaults and range checks, per class (same as the Rust
# crate, which checks again). Order is torch's signature order.
SUPPORTED: dict[str, dict[str, _Param]] = {
    "SGD": {
        "lr": _nonneg(1e-3),
        "momentum": _nonneg(0.0),
        "dampening": _Param("float", 0.0, math.isfinite, "must be finite"),
        "weight_decay": _nonneg(0.0),
        "nesterov": _FLAG,
        "maximize": _FLAG,
    },
    "Adam": {
        "lr": _nonneg(1e-3),
        "betas": _betas(),
        "eps": _nonneg(1e-8),
        "weight_decay": _nonneg(0.0),
        "amsgrad": _FLAG,
        "maximize": _FLAG,
        "decoupled_weight_decay": _FLAG,
    },
    "AdamW": {
        "lr": _nonneg(1e-3),
        "betas": _betas(),
        "eps": _nonneg(1e-8),
        "weight_decay": _nonneg(1e-2),
        "amsgrad": _FLAG,
        "maximize": _FLAG,
    },
    "Adagrad": {
        "lr": _nonneg(1e-2),
        "lr_decay": _nonneg(0.0),
        "weight_decay": _nonneg(0.0),
        "initial_accumulator_value": _nonneg(0.0),
        "eps": _nonneg(1e-10),
        "maximize": _FLAG,
    },
    "RMSprop": {
        "lr": _nonneg(1e-2),
        "alpha": _nonneg(0.99),
        "eps": _nonneg(1e-8),
        "weight_decay": _nonneg(0.0),
        "momentum": _nonneg(0.0),
        "centered": _FLAG,
        "maximize": _FLAG,
    },
    "Adadelta": {
        "lr": _nonneg(1.0),
        "rho": _Param("float", 0.9, lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
        "eps": _nonneg(1e-6),
        "weight_decay": _nonneg(0.0),
        "maximize": _FLAG,
    },
    "Adamax": {
        "lr": _nonneg(2e-3),
        "betas": _betas(),
        "eps": _nonneg(1e-8),
        "weight_decay": _nonneg(0.0),
        "maximize": _FLAG,
    },
    "NAdam": {
        "lr": _nonneg(2e-3),
        "betas": _betas(),
        "eps": _nonneg(1e-8),
        "weight_decay": _nonneg(0.0),
        "momentum_decay": _nonneg(4e-3),
        "decoupled_weight_decay": _FLAG,
        "maximize": _FLAG,
    },
    "RAdam": {
        "lr": _nonneg(1e-3),
        "betas": _betas(),
        "eps": _nonneg(1e-8),
        "weight_decay": _nonneg(0.0),
        "decoupled_weight_decay": _FLAG,
        "maximize": _FLAG,
    },
}

# Keywords that only choose torch's implementation (loop, multi-tensor, fused, CUDA graphs); the
# server has one implementation, so they are accepted and dropped.
_IGNORED = ("foreach", "fused", "capturable")

# State buffer names per optimizer and options (the engine exports the same).
_SCALAR_STATE = {"NAdam": ("mu_product",)}


def _supported_list() -> str:
    return ", ".join(f"torch.optim.{n}" for n in SUPPORTED)


def _class_name(optimizer: Any) -> str:
    """The ``torch.optim`` class name of ``optimizer`` (a class or a name), or ParamError."""
    import torch

    if isinstance(optimizer, str):
        name = optimizer.rsplit(".", 1)[-1]
        for known in SUPPORTED:
            if known.lower() == name.lower():
                return known
        raise ParamError(f"optimizer {optimizer!r} is not supported; supported: {_supported_list()}")
    if isinstance(optimizer, type):
        name = optimizer.__name__
        if name in SUPPORTED and getattr(torch.optim, name, None) is optimizer:
            return name
        what = f"{optimizer.__module__}.{optimizer.__qualname__}"
        hint = ""
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            hint = (
                " (the optimizer runs on the parameter server, in Rust: only torch.optim's own "
                "classes are available, not subclasses or third-party optimizers)"
            )
        raise ParamError(f"optimizer {what} is not supported{hint}; supported: {_supported_list()}")
    raise ParamError(
        f"optimizer must be a torch.optim class such as torch.optim.Adam, got {optimizer!r}; "
        f"supported: {_supported_list()}"
    )


def _number(name: str, key: str, value: Any) -> float:
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ParamError(f"{name}: {key} as a tensor must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, str)):
        raise ParamError(f"{name}: {key}={value!r} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ParamError(f"{name}: {key}={value!r} must be a number") from e


def _coerce(name: str, key: str, spec: _Param, value: Any) -> HyperValue:
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(f"{name}: {key}={value!r} must be True or False")
        return value
    if spec.kind == "pair":
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ParamError(f"{name}: {key}={value!r} must be a pair of numbers, e.g. (0.9, 0.999)")
        pair = (_number(name, f"{key}[0]", value[0]), _number(name, f"{key}[1]", value[1]))
        for i, v in enumerate(pair):
            if spec.check is not None and not spec.check(v):
                raise ParamError(f"{name}: invalid {key}[{i}]={v!r}: {spec.rule}")
        return pair
    v = _number(name, key, value)
    if spec.check is not None and not spec.check(v):
        raise ParamError(f"{name}: invalid {key}={v!r}: {spec.rule}")
    return v


def resolve_optimizer(
    optimizer: Any, optimizer_params: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, HyperValue]]:
    """Check the user's optimizer and keywords, and return them as the engine takes them.

    Args:
        optimizer: a ``torch.optim`` class (``torch.optim.Adam``) or its name (``"Adam"``).
        optimizer_params: the keywords the user gave (``lr=...``); missing ones take torch's
            defaults.

    Returns:
        ``(name, hyperparameters)``: the torch class name and every hyperparameter with
        defaults filled in, as ``float``, ``bool`` or ``(float, float)``.

    Raises:
        ParamError: an unsupported class; an unknown keyword; a value of the wrong type or out
            of the range torch accepts; ``differentiable=True`` (no autograd through the server).
            The message names the keyword and lists what is supported.
    """
    name = _class_name(optimizer)
    spec = SUPPORTED[name]
    given = dict(optimizer_params or {})
    out: dict[str, HyperValue] = {}
    for key, value in given.items():
        if key in _IGNORED:
            log.debug("optimizer %s: dropping %s=%r (no effect on the parameter server)", name, key, value)
            continue
        if key == "differentiable":
            if value:
                raise ParamError(
                    f"{name}: differentiable=True is not supported (the optimizer step runs on the "
                    f"parameter server, outside autograd); leave it False"
                )
            continue
        if key not in spec:
            raise ParamError(
                f"{name}: unknown optimizer keyword {key!r}; torch.optim.{name} on the parameter "
                f"server takes: {', '.join(spec)} (and ignores: {', '.join(_IGNORED)})"
            )
        out[key] = _coerce(name, key, spec[key], value)
    if name == "SGD":
        nesterov = out.get("nesterov", False)
        if nesterov and (out.get("momentum", 0.0) <= 0 or out.get("dampening", 0.0) != 0):  # type: ignore[operator]
            raise ParamError("SGD: nesterov=True requires a momentum > 0 and zero dampening")
    full: dict[str, HyperValue] = {k: p.default for k, p in spec.items()}
    full.update(out)
    return name, full


# ---------------------------------------------------------------------------------------------
# State conversion


def _trainable(params: Any) -> list[Any]:
    """The tensors the flat buffer covers: a module's trainable parameters in
    ``named_parameters()`` order, or the given iterable of tensors as is."""
    import torch

    if isinstance(params, torch.nn.Module):
        return [p for _, p in params.named_parameters() if p.requires_grad]
    return list(params)


def to_torch_state_dict(state: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """Turn the engine's optimizer state into a ``torch.optim`` ``state_dict``.

    Args:
        state: what ``ParameterServer.optimizer_state()`` returns (``name``,
            ``hyperparameters``, ``step``, ``scalars``, ``buffers`` as flat arrays).
        params: the model (``torch.nn.Module``; its trainable parameters in
            ``named_parameters()`` order) or the list of tensors the flat buffer covers.

    Returns:
        A ``state_dict`` for ``torch.optim.<name>(params, **hyperparameters)``: one param group,
        per-parameter state named as torch names it, ``step`` (and NAdam's ``mu_product``) as
        float32 scalar tensors like torch stores them. Load it with
        ``optimizer.load_state_dict(...)`` to continue training in plain PyTorch.

    Raises:
        ParamError: the state does not fit ``params`` (buffer lengths differ from the total
            number of elements) or names an unsupported optimizer.
    """
    import numpy as np
    import torch

    name = _class_name(state["name"])
    tensors = _trainable(params)
    total = sum(p.numel() for p in tensors)
    hyper = dict(state.get("hyperparameters") or {})
    _, hyper = resolve_optimizer(name, hyper)
    step = int(state.get("step", 0))
    buffers = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in (state.get("buffers") or {}).items()}
    for k, v in buffers.items():
        if v.size != total:
            raise ParamError(f"optimizer state buffer {k!r} has {v.size} elements; the parameters have {total}")
    scalars = dict(state.get("scalars") or {})

    # torch's own param_groups layout for these hyperparameters (every key it expects).
    template = getattr(torch.optim, name)(
        [torch.nn.Parameter(torch.zeros(1)) for _ in tensors] or [torch.nn.Parameter(torch.zeros(1))],
        **{k: tuple(v) if isinstance(v, (tuple, list)) else v for k, v in hyper.items()},
    )
    group = template.state_dict()["param_groups"][0]
    group["params"] = list(range(len(tensors)))

    per_param: dict[int, dict[str, Any]] = {}
    fresh = step == 0 and not buffers
    if not (fresh and name != "Adagrad"):
        offset = 0
        for i, p in enumerate(tensors):
            n = p.numel()
            entry: dict[str, Any] = {}
            if name != "SGD":
                entry["step"] = torch.tensor(float(step), dtype=torch.float32)
            for s in _SCALAR_STATE.get(name, ()):
                entry[s] = torch.tensor(float(scalars.get(s, 1.0)), dtype=torch.float32)
            for k, v in buffers.items():
                entry[k] = torch.from_numpy(v[offset : offset + n].copy()).reshape(p.shape)
            if name == "SGD" and "momentum_buffer" not in entry:
                entry["momentum_buffer"] = None
            if name == "Adagrad" and "sum" not in entry:
                init = float(hyper["initial_accumulator_value"])  # type: ignore[arg-type]
                entry["sum"] = torch.full(tuple(p.shape), init, dtype=torch.float32)
            per_param[i] = entry
            offset += n
    return {"state": per_param, "param_groups": [group]}


def from_torch_optimizer(optimizer: Any) -> dict[str, Any]:
    """Turn a ``torch.optim`` optimizer's state into the engine's form.

    The optimizer must have one param group over the tensors the flat buffer covers, in the same
    order (e.g. built with ``[p for _, p in model.named_parameters() if p.requires_grad]``).

    Returns:
        ``{"name", "hyperparameters", "step", "scalars", "buffers"}`` as
        ``ParameterServer.load_optimizer_state`` takes it (buffers: flat float32 arrays).

    Raises:
        ParamError: an unsupported optimizer class, several param groups, options the server
            does not run (``differentiable=True``), or per-parameter steps that differ.
    """
    import numpy as np

    name = _class_name(type(optimizer))
    if len(optimizer.param_groups) != 1:
        raise ParamError(f"{name}: the optimizer has {len(optimizer.param_groups)} param groups; the server runs one")
    group = optimizer.param_groups[0]
    spec = SUPPORTED[name]
    given = {k: v for k, v in group.items() if k in spec}
    if group.get("differentiable"):
        given["differentiable"] = True
    _, hyper = resolve_optimizer(name, given)
    params = group["params"]
    states = [optimizer.state.get(p, {}) for p in params]
    steps = {float(s["step"]) for s in states if "step" in s}
    if len(steps) > 1:
        raise ParamError(f"{name}: parameters are at different steps {sorted(steps)}; the server keeps one step")
    step = int(steps.pop()) if steps else 0
    names: list[str] = []
    for s in states:
        for k, v in s.items():
            if k != "step" and k not in _SCALAR_STATE.get(name, ()) and v is not None and k not in names:
                names.append(k)
    buffers: dict[str, Any] = {}
    if states and all(s for s in states):
        for k in names:
            parts = []
            for s in states:
                v = s.get(k)
                if v is None:
                    raise ParamError(f"{name}: state {k!r} is missing for some parameters")
                parts.append(v.detach().to("cpu").float().reshape(-1).numpy())
            buffers[k] = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    scalars: dict[str, float] = {}
    for s in _SCALAR_STATE.get(name, ()):
        vals = {float(st[s]) for st in states if s in st}
        if vals:
            scalars[s] = vals.pop()
    return {"name": name, "hyperparameters": hyper, "step": step, "scalars": scalars, "buffers": buffers}

