"""Optimizer configurations checked for parity with ``torch.optim`` (shared by the Rust fixture
generator and the pytest suite): ``(case id, torch.optim class name, constructor kwargs)``."""

from __future__ import annotations

from typing import Any

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sgd_plain", "SGD", {"lr": 0.05}),
    ("sgd_momentum", "SGD", {"lr": 0.05, "momentum": 0.9}),
    ("sgd_dampening_wd", "SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (
        "sgd_nesterov_max",
        "SGD",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True},
    ),
    ("adam_default", "Adam", {}),
    ("adam_betas_wd", "Adam", {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1}),
    ("adam_amsgrad_max", "Adam", {"lr": 0.01, "amsgrad": True, "maximize": True}),
    ("adam_decoupled", "Adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("adam_big_eps", "Adam", {"lr": 0.01, "eps": 1e-3}),
    ("adamw_default", "AdamW", {}),
    ("adamw_amsgrad", "AdamW", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ("adagrad_default", "Adagrad", {}),
    (
        "adagrad_all",
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-6},
    ),
    ("adagrad_max", "Adagrad", {"maximize": True}),
    ("rmsprop_default", "RMSprop", {}),
    ("rmsprop_momentum", "RMSprop", {"momentum": 0.9}),
    ("rmsprop_centered", "RMSprop", {"centered": True}),
    (
        "rmsprop_all",
        "RMSprop",
        {"centered": True, "momentum": 0.5, "weight_decay": 0.1, "alpha": 0.9, "maximize": True},
    ),
    ("adadelta_default", "Adadelta", {}),
    ("adadelta_all", "Adadelta", {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1, "maximize": True}),
    ("adamax_default", "Adamax", {}),
    ("adamax_all", "Adamax", {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.1, "maximize": True}),
    ("nadam_default", "NAdam", {}),
    ("nadam_md_wd", "NAdam", {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1}),
    (
        "nadam_decoupled_max",
        "NAdam",
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ),
    ("radam_default", "RAdam", {}),
    ("radam_wd", "RAdam", {"lr": 0.01, "weight_decay": 0.1}),
    (
        "radam_decoupled_max",
        "RAdam",
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ),
    ("radam_short_sma", "RAdam", {"lr": 0.01, "betas": (0.9, 0.9)}),
]


def gradient_scale(step: int) -> float:
    """Gradient magnitudes vary over a run (tiny, ordinary and large steps)."""
    return (0.01, 1.0, 1.0, 5.0, 0.3)[step % 5]
