"""A model's trained state as one flat float32 vector: trainable parameters, then buffers.

The parameter server holds one flat ``float32`` vector per fit. Its head is every trainable
parameter (``named_parameters()`` order, ``requires_grad`` only): the optimizer steps it. Its tail
is every *state buffer*: a persistent buffer (one ``state_dict`` holds) of a floating-point or
integer dtype, such as BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``.
Workers push the change their forward pass made to the buffers they pulled, and the server adds
it (see ``docs/architecture.md``, "Trained state").

This module is the one place that enumerates them; the driver (layout, final load) and the task
(:class:`FlatModel`) both go through :class:`StateLayout`.

Buffers of another dtype than float32 (``num_batches_tracked`` is int64) travel as float32
*relative to the value they started from*: a buffer's value is ``start + (flat - float32(start))``
in its own dtype (rounded for integers), so a buffer the model never changes comes back exactly
as the user set it, whatever its dtype and magnitude, and a counter stays exact as long as it
moves by less than 2**24 in a fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ParamError

__all__ = ["StateLayout", "FlatModel", "buffer_change_scale", "buffer_momentum"]


def _is_state_buffer(t: Any) -> bool:
    import torch

    return t.dtype != torch.bool and not t.is_complex()


@dataclass
class StateLayout:
    """The trainable parameters and state buffers of a module, in flat-vector order."""

    params: list[tuple[str, Any]]
    """``(name, parameter)`` for every trainable parameter."""
    buffers: list[tuple[str, Any]]
    """``(name, buffer)`` for every persistent floating-point or integer buffer."""

    @classmethod
    def of(cls, module: Any) -> StateLayout:
        """The layout of ``module`` (raises ParamError when nothing is trainable)."""
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not params:
            raise ParamError("torchObj: the model has no trainable parameters")
        persistent = set(module.state_dict(keep_vars=True).keys())
        buffers = [(n, b) for n, b in module.named_buffers() if n in persistent and _is_state_buffer(b)]
        return cls(params, buffers)

    @property
    def num_trainable(self) -> int:
        """Elements the optimizer steps (the head of the flat vector)."""
        return sum(p.numel() for _, p in self.params)

    @property
    def num_buffers(self) -> int:
        """Elements of state buffers (the tail of the flat vector)."""
        return sum(b.numel() for _, b in self.buffers)

    def shapes(self) -> list[tuple[str, list[int]]]:
        """``(name, shape)`` of every tensor, in order (the server's and checkpoints' layout)."""
        return [(n, list(t.shape)) for n, t in self.params + self.buffers]

    def flatten(self) -> np.ndarray:
        """The current values as one contiguous float32 vector."""
        import torch

        parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for _, t in self.params + self.buffers]
        return np.ascontiguousarray(torch.cat(parts).numpy())

    def load(self, flat: np.ndarray) -> None:
        """Write ``flat`` (as :meth:`flatten` lays it out) into the module's tensors.

        A float32 tensor takes its values as they are; any other dtype moves by the difference
        to its own current value (see the module docstring).
        """
        import torch

        flat_t = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        if flat_t.numel() != self.num_trainable + self.num_buffers:
            raise ParamError(f"the flat state has {flat_t.numel()} values, the model {self.num_trainable + self.num_buffers}")
        offset = 0
        with torch.no_grad():
            for _, t in self.params + self.buffers:
                n = t.numel()
                _assign(t, flat_t[offset : offset + n].view(t.shape))
                offset += n


def _assign(t: Any, value32: Any) -> None:
    """``t`` takes ``value32`` (float32): as is when ``t`` is float32, else relative to itself."""
    import torch

    value32 = value32.to(t.device)
    if t.dtype == torch.float32:
        t.copy_(value32)
        return
    moved = value32.double() - t.to(torch.float32).double()
    if t.is_floating_point():
        t.copy_((t.double() + moved).to(t.dtype))
    else:
        t.add_(torch.round(moved).to(t.dtype))


class FlatModel:
    """A module whose trained state lives in two flat float32 buffers the engine reads and writes.

    ``params_np`` (pulled into) holds the state, ``grads_np`` (pushed from) the gradients of the
    trainable head and, for the buffer tail, the change of each buffer since the last pull. The
    trainable parameters, their gradients and float32 buffers are views into these buffers, so a
    pull lands in the module with no copy; other buffers (``num_batches_tracked``) are copied in
    :meth:`params_pulled` and out in :meth:`grads_ready`. On a CUDA device the module's tensors
    live on the GPU and the buffers are copied from/to the CPU once per step.
    """

    def __init__(self, module: Any, device: Any, buffer_scale: float = 1.0) -> None:
        import torch

        self.module = module
        self.device = device
        self.buffer_scale = float(buffer_scale)
        layout = StateLayout.of(module)
        self.num_trainable = layout.num_trainable
        self.numel = layout.num_trainable + layout.num_buffers
        self.params_cpu = torch.zeros(self.numel, dtype=torch.float32)
        self.grads_cpu = torch.zeros(self.numel, dtype=torch.float32)
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu:
            self.params_dev, self.grads_dev = self.params_cpu, self.grads_cpu
        else:
            self.params_dev = torch.zeros(self.numel, dtype=torch.float32, device=device)
            self.grads_dev = torch.zeros(self.numel, dtype=torch.float32, device=device)
        # Buffers, found again through their owner each step: a module may replace a buffer
        # (``self.avg = 0.9 * self.avg + ...``) instead of updating it in place.
        self._views: list[tuple[Any, str, Any]] = []  # float32: (owner, name, view installed)
        self._copied: list[tuple[Any, str, slice]] = []  # other dtypes: (owner, name, slice)
        offset = 0
        with torch.no_grad():
            for _, p in layout.params:
                n = p.numel()
                self.params_dev[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = self.params_dev[offset : offset + n].view_as(p)
                p.grad = self.grads_dev[offset : offset + n].view_as(p)
                offset += n
            for name, b in layout.buffers:
                n = b.numel()
                view = self.params_dev[offset : offset + n]
                view.copy_(b.detach().reshape(-1).to(torch.float32))
                owner, leaf = _owner(module, name)
                if b.dtype == torch.float32:
                    shaped = view.view_as(b)
                    owner._buffers[leaf] = shaped
                    self._views.append((owner, leaf, shaped))
                else:
                    self._copied.append((owner, leaf, slice(offset, offset + n)))
                offset += n
        if on_cpu:
            self.params_cpu.copy_(self.params_dev)
        # The buffer tail as pulled (and the copied buffers' values then), to compute what
        # this step's forward changed.
        self._tail_pulled = self.params_dev[self.num_trainable :].clone()
        self._copied_pulled = [owner._buffers[leaf].detach().clone() for owner, leaf, _ in self._copied]
        self.params_np = self.params_cpu.numpy()
        self.grads_np = self.grads_cpu.numpy()
        self._on_cpu = on_cpu

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer in place (the parameters keep their ``.grad`` views)."""
        self.grads_dev.zero_()

    def params_pulled(self) -> None:
        """Make freshly pulled CPU state visible to the module."""
        if not self._on_cpu:
            self.params_dev.copy_(self.params_cpu, non_blocking=False)
        if self.numel > self.num_trainable:
            import torch

            with torch.no_grad():
                for (owner, leaf, sl), before in zip(self._copied, self._copied_pulled):
                    b = owner._buffers[leaf]
                    _assign(b, self.params_dev[sl].view(b.shape))
                    before.copy_(b)
                self._tail_pulled.copy_(self.params_dev[self.num_trainable :])

    def grads_ready(self) -> None:
        """After backward: put the buffers' changes (times ``buffer_scale``) in the tail and make
        it all visible on CPU."""
        if self.numel > self.num_trainable:
            import torch

            with torch.no_grad():
                for owner, leaf, view in self._views:
                    current = owner._buffers[leaf]
                    if current is not view:  # replaced in forward: take its value, re-install the view
                        view.copy_(current.detach().reshape(view.shape))
                        owner._buffers[leaf] = view
                k = self.num_trainable
                torch.sub(self.params_dev[k:], self._tail_pulled, out=self.grads_dev[k:])
                for (owner, leaf, sl), before in zip(self._copied, self._copied_pulled):
                    b = owner._buffers[leaf]
                    self.grads_dev[sl].copy_((b.double() - before.double()).reshape(-1))
                if self.buffer_scale != 1.0:
                    self.grads_dev[k:].mul_(self.buffer_scale)
        if not self._on_cpu:
            self.grads_cpu.copy_(self.grads_dev)


def buffer_change_scale(engine_mode: str, num_workers: int, momentum: float = 1.0) -> float:
    """What a worker's buffer change is multiplied by before it is pushed.

    Synchronous rounds average the workers' changes: 1. In the async styles every push adds its
    change, and each change is measured from buffers pulled up to ``num_workers - 1`` pushes
    earlier: a running statistic with momentum ``m`` then updates as
    ``s += m * scale * (b - s_stale)``, a delayed feedback that overshoots and diverges once
    ``m * scale`` passes about ``pi / (2 * num_workers - 1)`` (BatchNorm's 0.1 with 32 workers,
    added whole, reaches 1e9 in a unit test). The scale is the largest that keeps
    ``m * scale <= 1 / num_workers``: 1 while the workers are few for the momentum (BatchNorm:
    up to 10 workers), so each push moves the statistics as plain PyTorch's step would, and
    ``1 / (num_workers * m)`` beyond. ``momentum``: the largest of the model's buffer-owning
    modules (:func:`buffer_momentum`); 1 when unknown.
    """
    if engine_mode == "synchronous" or num_workers <= 1:
        return 1.0
    return min(1.0, 1.0 / (num_workers * max(momentum, 1e-6)))


def buffer_momentum(module: Any) -> float:
    """The largest momentum among the submodules that own state buffers: a module's float
    ``momentum`` attribute in (0, 1] (BatchNorm's), else 1 (a buffer updated at an unknown
    rate, or BatchNorm's cumulative average with ``momentum=None``: assume the worst)."""
    worst = 0.0
    for sub in module.modules():
        if not any(_is_state_buffer(b) for b in sub._buffers.values() if b is not None):
            continue
        m = getattr(sub, "momentum", None)
        worst = max(worst, float(m) if isinstance(m, float) and 0.0 < m <= 1.0 else 1.0)
    return worst or 1.0


def _owner(module: Any, name: str) -> tuple[Any, str]:
    """The submodule that holds buffer ``name``, and the buffer's own name in it."""
    owner = module
    *path, leaf = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf
