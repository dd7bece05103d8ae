"""The trained state's flat vector (``_state``) against a real parameter server, no Spark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparktorch import _native
from sparktorch._state import FlatModel, StateLayout, buffer_change_scale, buffer_momentum

SECRET = b"s" * 32


def _stale_async_workers(workers: int, rounds: int, scale: float) -> torch.Tensor:
    """``workers`` BatchNorm workers in async mode, each pushing a change measured from
    buffers pulled ``workers - 1`` pushes earlier (the most stale a turn of all workers gets).
    Returns the server's running mean after ``rounds`` turns; the data's mean is 3."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():  # the identity (lr=0 keeps it), so the BatchNorm sees the data itself
        base[0].weight.copy_(torch.eye(4))
        base[0].bias.zero_()
    state = StateLayout.of(base)
    gen = torch.Generator().manual_seed(1)
    with _native.ParameterServer(
        state.flatten(), state.shapes(), "SGD", {"lr": 0.0}, secret=SECRET, mode="async",
        num_workers=workers, model_buffers=state.num_buffers,
    ) as server:
        host, port = server.address
        clients, flats = [], []
        for w in range(workers):
            clients.append(_native.Client(host, port, SECRET, worker=w, attempt=0, timeout_s=30.0))
            model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            model.load_state_dict(base.state_dict())
            flats.append(FlatModel(model, "cpu", buffer_scale=scale))
        for flat, client in zip(flats, clients):
            client.pull(flat.params_np)
            flat.params_pulled()
        for step in range(rounds):
            for flat, client in zip(flats, clients):
                flat.zero_grad()
                x = 3.0 + torch.randn(16, 4, generator=gen)
                flat.module(x).sum().backward()
                flat.grads_ready()
                client.push_pull(flat.grads_np, flat.params_np, batch_size=16, loss=0.0, step=step)
                flat.params_pulled()
        final = np.asarray(server.parameters())
        for c in clients:
            c.close()
    state.load(final)
    return base[1].running_mean.clone()


def test_async_buffer_changes_stay_stable_with_many_stale_workers():
    scale = buffer_change_scale("async", 32, buffer_momentum(nn.BatchNorm1d(4)))
    assert scale == pytest.approx(1 / 3.2)
    mean = _stale_async_workers(32, rounds=40, scale=scale)
    assert torch.isfinite(mean).all()
    assert float((mean - 3.0).abs().max()) < 0.5, mean
    # Added whole, the same stale changes diverge: what the scale is for.
    unscaled = _stale_async_workers(32, rounds=40, scale=1.0)
    assert not bool(torch.isfinite(unscaled).all()) or float((unscaled - 3.0).abs().max()) > 10


def test_scale_per_mode_and_momentum():
    assert buffer_change_scale("synchronous", 64, 0.1) == 1.0
    assert buffer_change_scale("async", 1, 1.0) == 1.0
    assert buffer_change_scale("async", 2, 0.1) == 1.0  # few workers: every push as plain PyTorch
    assert buffer_change_scale("hogwild", 4, 1.0) == pytest.approx(0.25)  # unknown rate: worst case
    assert buffer_momentum(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, momentum=0.2))) == pytest.approx(0.2)
    assert buffer_momentum(nn.BatchNorm1d(2, momentum=None)) == 1.0
    assert buffer_momentum(ReplacesItsBuffer()) == 1.0


class ReplacesItsBuffer(nn.Module):
    """A running average kept by replacing the buffer, not updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.register_buffer("avg", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.avg = 0.5 * self.avg + 0.5 * x.detach().mean(0)
        return self.fc(x)


def test_a_buffer_replaced_in_forward_is_pushed_and_pulled():
    model = ReplacesItsBuffer()
    flat = FlatModel(model, "cpu")
    flat.params_pulled()
    flat.zero_grad()
    model(torch.tensor([[2.0, 4.0], [2.0, 4.0]])).sum().backward()
    flat.grads_ready()
    # The change (1, 2) is in the pushed tail, and the module's buffer is the flat view again.
    assert flat.grads_np[-2:].tolist() == [1.0, 2.0]
    flat.params_np[-2:] = [7.0, 8.0]  # as a pull writes it
    flat.params_pulled()
    assert model.avg.tolist() == [7.0, 8.0]
