"""The executor task body: one Spark task trains one partition against the parameter server.

Each task reads its partition's Arrow batches into one matrix, builds the model from the
``torchObj`` string, connects to the driver's parameter server (authenticated with the per-fit
secret that travels inside this closure) and loops: forward, backward, push the gradients and
pull the new parameters in one round trip. The model's parameters are views into one flat
buffer, so a pull lands in the model with no extra copy and the gradients are pushed from one
flat buffer.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .errors import DataError, ParamError

log = logging.getLogger("sparktorch")

RESULT_SCHEMA = "partition int, attempt int, rows long, steps int, last_loss double, batch long, digest double"

# Losses known to take class indices (int64) when the label column is a scalar; any other loss
# gets float targets first and class indices when it refuses floats (see `_TargetChoice`).
_CLASS_INDEX_LOSSES = ("CrossEntropyLoss", "NLLLoss", "MultiMarginLoss", "MultiLabelMarginLoss")


@dataclass(frozen=True)
class TaskConfig:
    """Everything a task needs; pickled into the Spark closure (no model weights: tasks pull)."""

    host: str
    port: int
    synchronous: bool
    secret: bytes
    torch_obj: str
    iters: int
    step_offset: int
    label_kind: str
    mini_batch: int
    validation_pct: float
    device: str
    compile_mode: str | None
    seed: int
    io_timeout_s: float
    connect_timeout_s: float
    # SHA-256 of the parameter server's TLS certificate (pinned); None: plaintext.
    tls_fingerprint: bytes | None = None


def task_device(requested: str) -> str:
    """The torch device of this task: ``cpu``, or the task's own GPU for ``cuda``."""
    import torch

    if not requested.startswith("cuda"):
        return "cpu"
    if not torch.cuda.is_available():
        raise ParamError(f"device={requested!r}: CUDA is not available on this executor")
    if ":" in requested:
        return requested
    from pyspark import TaskContext

    ctx = TaskContext.get()
    resources = ctx.resources() if ctx is not None else {}
    if "gpu" in resources and resources["gpu"].addresses:
        return f"cuda:{int(resources['gpu'].addresses[0])}"
    partition = ctx.partitionId() if ctx is not None else 0
    return f"cuda:{partition % torch.cuda.device_count()}"


def uses_class_indices(criterion: object) -> bool:
    """True when the loss is known to expect class indices (int64) as targets."""
    return type(criterion).__name__ in _CLASS_INDEX_LOSSES


def class_indices(criterion: object, y: np.ndarray) -> np.ndarray:
    """Scalar labels as int64 class indices, or a DataError when some are not whole numbers."""
    if not np.all(np.equal(np.mod(y, 1), 0)):
        bad = int(np.count_nonzero(np.mod(y, 1)))
        raise DataError(f"labelCol: {bad} label(s) are not whole numbers, but {_loss_name(criterion)} needs class indices")
    return y.astype(np.int64)


def _loss_name(criterion: object) -> str:
    return getattr(criterion, "__name__", None) or type(criterion).__name__


def prepare_targets(criterion: object, y: np.ndarray | None, x: np.ndarray, label_kind: str) -> np.ndarray:
    """Targets as the loss is first tried with: class indices for known class-index losses,
    floats for everything else (vectors as they are), or the features (autoencoder)."""
    if label_kind == "none" or y is None:
        return x
    if label_kind == "scalar" and uses_class_indices(criterion):
        return class_indices(criterion, y)
    return y.astype(np.float32, copy=False)


def _loss(criterion: object, out: object, target: object) -> object:
    # A scalar float target against an (n, 1) output: match shapes instead of broadcasting.
    if getattr(out, "dim", lambda: 0)() == 2 and out.shape[1] == 1 and target.dim() == 1 and target.is_floating_point():  # type: ignore[attr-defined]
        target = target.unsqueeze(1)  # type: ignore[attr-defined]
    return criterion(out, target)  # type: ignore[operator]


def first_loss(criterion: object, out: object, tb: object, label_kind: str) -> tuple[object, bool]:
    """The loss of the first step, and whether the targets must become class indices.

    Scalar labels are tried as floats first (unless the loss is a known class-index loss); a
    loss that refuses float targets but takes int64 ones (a custom cross-entropy, ``nll_loss``
    in a function, ...) switches the fit to class indices, as 0.2.0 did by retrying with
    ``.long()``.
    """
    try:
        return _loss(criterion, out, tb), False
    except (RuntimeError, TypeError, ValueError) as float_error:
        if label_kind != "scalar" or tb.is_floating_point() is False:  # type: ignore[attr-defined]
            raise
        as_long = tb.long()  # type: ignore[attr-defined]
        if not bool((as_long == tb).all()):  # type: ignore[attr-defined]
            raise
        check_class_range(criterion, out, as_long.cpu().numpy())
        try:
            loss = _loss(criterion, out, as_long)
        except Exception:  # noqa: BLE001 - the float error is the one to report
            raise float_error from None
        log.info("%s refused float targets: training with class indices (int64)", _loss_name(criterion))
        return loss, True


def check_class_range(criterion: object, out: object, y: np.ndarray) -> None:
    """Class-index labels must lie in ``[0, classes)`` of the model's output."""
    if y.dtype != np.int64 or y.size == 0:
        return
    classes = out.shape[1] if getattr(out, "dim", lambda: 0)() >= 2 else None  # type: ignore[attr-defined]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (classes is not None and hi >= classes):
        bad = int(np.count_nonzero((y < 0) | ((y >= classes) if classes else False)))
        raise DataError(
            f"labelCol: {bad} label(s) outside [0, {classes}) (seen {lo}..{hi}); "
            f"{_loss_name(criterion)} needs class indices below the model's {classes} outputs"
        )


def train_partition(cfg: TaskConfig, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The body of one Spark task (``mapInArrow``): train on this partition, yield one result row."""
    import torch
    from pyspark import TaskContext

    from . import _native
    from ._data import batches_to_numpy, check_finite
    from ._state import FlatModel
    from .util import load_torch_obj

    ctx = TaskContext.get()
    partition = ctx.partitionId() if ctx is not None else 0
    attempt = ctx.attemptNumber() if ctx is not None else 0

    x_np, y_np = batches_to_numpy(batches, cfg.label_kind)
    rows = len(x_np)
    steps_done = 0
    last_loss = math.nan
    finished = False

    client = _native.Client(
        cfg.host,
        cfg.port,
        cfg.secret,
        worker=partition,
        attempt=attempt,
        timeout_s=cfg.io_timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        tls_fingerprint=cfg.tls_fingerprint,
    )
    try:
        if rows == 0:
            log.info("partition %d is empty: leaving the fit", partition)
            finished = True
            yield _result(partition, attempt, 0, 0, last_loss, 0, 0.0)
            return

        check_finite(x_np, "inputCol (features)")
        if y_np is not None:
            check_finite(y_np, "labelCol")
        digest = rows_digest(x_np)

        obj = load_torch_obj(cfg.torch_obj)
        device = task_device(cfg.device)
        model = obj.model.to(device)
        model.train()
        criterion = obj.criterion
        flat = FlatModel(model, device)
        if flat.numel != client.num_params:
            raise ParamError(f"torchObj: the model has {flat.numel} values to train but the server holds {client.num_params}")
        forward = torch.compile(model, mode=cfg.compile_mode) if cfg.compile_mode else model

        y_t = prepare_targets(criterion, y_np, x_np, cfg.label_kind)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + partition)
        with warnings.catch_warnings():
            # Arrow's buffers are read-only; the tensors over them are only ever read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x_all = torch.from_numpy(x_np)
            t_all = torch.from_numpy(y_t) if y_t is not x_np else x_all

        # Validation holdout: a random share of this partition, never trained on.
        val_x = val_t = None
        if cfg.validation_pct > 0:
            perm = torch.randperm(rows, generator=gen)
            n_val = int(rows * cfg.validation_pct)
            if 0 < n_val < rows:
                val_idx, train_idx = perm[:n_val], perm[n_val:]
                val_x, val_t = x_all[val_idx].to(device), t_all[val_idx].to(device)
                x_all, t_all = x_all[train_idx], t_all[train_idx]
        n_train = len(x_all)
        batch = cfg.mini_batch if 0 < cfg.mini_batch < n_train else -1
        if cfg.mini_batch > n_train:
            log.warning(
                "miniBatch=%d is larger than partition %d's %d training rows: its steps use all %d rows",
                cfg.mini_batch, partition, n_train, n_train,
            )
        x_dev, t_dev = x_all.to(device), t_all.to(device)

        start = max(client.resume_step, cfg.step_offset)
        end = cfg.step_offset + cfg.iters
        if start > 0 and cfg.synchronous:
            # A restarted synchronous worker may have pushed step start-1 into a round that is
            # still open: step `start` must see that round's result (version `start`), not the
            # parameters the round began with.
            client.pull(flat.params_np, newer_than=start - 1)
        else:
            client.pull(flat.params_np)
        flat.params_pulled()
        checked = False
        for step in range(start, end):
            if batch > 0:
                idx = torch.randperm(n_train, generator=gen)[:batch].to(device)
                xb, tb = x_dev[idx], t_dev[idx]
            else:
                xb, tb = x_dev, t_dev
            flat.zero_grad()
            if not checked:
                try:
                    out = forward(xb)
                except RuntimeError as e:
                    raise DataError(
                        f"inputCol: the model cannot take this partition's vectors of {x_np.shape[1]} features "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})"
                    ) from e
                check_class_range(criterion, out, y_t)
                loss, to_indices = first_loss(criterion, out, tb, cfg.label_kind)
                if to_indices:
                    y_t = class_indices(criterion, y_np)  # type: ignore[arg-type]
                    check_class_range(criterion, out, y_t)
                    t_dev = t_dev.long()
                    if val_t is not None:
                        val_t = val_t.long()
                checked = True
            else:
                out = forward(xb)
                loss = _loss(criterion, out, tb)
            loss.backward()  # type: ignore[attr-defined]
            flat.grads_ready()
            val_loss = validation_loss(model, forward, criterion, val_x, val_t)
            last_loss = float(loss.detach())  # type: ignore[attr-defined]
            _, stop = client.push_pull(
                flat.grads_np,
                flat.params_np,
                batch_size=len(xb),
                loss=last_loss,
                step=step,
                val_loss=val_loss,
            )
            flat.params_pulled()
            steps_done += 1
            if stop:
                log.info("partition %d: global early stop after step %d", partition, step)
                break
        finished = True
        yield _result(partition, attempt, rows, steps_done, last_loss, batch if batch > 0 else n_train, digest)
    finally:
        # Bye only when done (an empty partition is done at once). A task that fails is not
        # done: the server keeps its place (a synchronous round waits for its retry, up to
        # roundTimeout), and dropping the Client closes the socket without a Bye.
        if finished:
            client.close()


def validation_loss(model: object, forward: object, criterion: object, val_x: object, val_t: object) -> float:
    """The loss on the holdout, in evaluation mode (dropout off, BatchNorm on its running
    statistics, which the holdout leaves untouched) and without autograd; NaN without a holdout."""
    if val_x is None:
        return math.nan
    import torch

    model.train(False)  # type: ignore[attr-defined]
    try:
        with torch.no_grad():
            return float(_loss(criterion, forward(val_x), val_t))  # type: ignore[operator]
    finally:
        model.train(True)  # type: ignore[attr-defined]


def rows_digest(x: np.ndarray) -> float:
    """An order-independent fingerprint of a partition's rows (which rows it holds, not where)."""
    if x.size == 0:
        return 0.0
    w = np.cos(np.arange(x.shape[1], dtype=np.float64))
    return float(np.sum(np.sin(x.astype(np.float64) @ w)))


def _result(partition: int, attempt: int, rows: int, steps: int, last_loss: float, batch: int, digest: float) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "partition": pa.array([partition], pa.int32()),
            "attempt": pa.array([attempt], pa.int32()),
            "rows": pa.array([rows], pa.int64()),
            "steps": pa.array([steps], pa.int32()),
            "last_loss": pa.array([last_loss], pa.float64()),
            "batch": pa.array([batch], pa.int64()),
            "digest": pa.array([digest], pa.float64()),
        }
    )


def make_task(cfg: TaskConfig):  # noqa: ANN201 - a closure for mapInArrow
    """The function handed to ``DataFrame.mapInArrow`` (a closure over ``cfg`` only)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from train_partition(cfg, batches)

    return run
