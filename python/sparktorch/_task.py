"""The executor task body: one Spark task trains one partition against the parameter server.

Each task streams its partition's Arrow batches once into spill files (``_spill``: memory
bounded by a fixed buffer, not by the partition), builds the model from the ``torchObj`` string, connects to the driver's parameter server (authenticated with the per-fit
secret that travels inside this closure) and loops: forward, backward, push the gradients and
pull the new parameters in one round trip. The model's parameters are views into one flat
buffer, so a pull lands in the model with no extra copy and the gradients are pushed from one
flat buffer. Mini-batch steps walk the training rows in shuffled passes (each row once per pass,
as a ``DataLoader(shuffle=True)``); a full-batch step reads them in chunks and accumulates one
exact full-batch gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ._shards import ShardAddress, ShardedClient
from ._spill import BUFFER_BYTES, Spilled
from .errors import DataError, ParamError

log = logging.getLogger("sparktorch")

RESULT_SCHEMA = "partition int, attempt int, rows long, steps int, last_loss double, batch long, digest double, end_step long"

# Losses known to take class indices (int64) when the label column is a scalar; any other loss
# gets float targets first and class indices when it refuses floats (see `_Targets`).
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
    # What this task's buffer changes are multiplied by before a push (_state.buffer_change_scale).
    buffer_scale: float = 1.0
    epochs: int = 0
    """> 0: run this many passes over the partition's training rows instead of ``iters`` steps."""
    holdout_seed: int = 0
    """The fit's seed of the validation holdout (the same in every partition shuffle)."""
    buffer_bytes: int = BUFFER_BYTES
    """Byte budget of a full-batch chunk and of a resident holdout."""
    ps_dtype: str = "float32"
    """Element type of gradients and parameters on the wire ('float32' or 'bfloat16')."""
    shards: tuple[ShardAddress, ...] | None = None
    """``psShards`` > 1: every shard's address, range and fingerprint (``host``/``port`` unused)."""


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


def _loss_name(criterion: object) -> str:
    return getattr(criterion, "__name__", None) or type(criterion).__name__


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
        try:
            loss = _loss(criterion, out, as_long)
        except Exception:  # noqa: BLE001 - the float error is the one to report
            raise float_error from None
        log.info("%s refused float targets: training with class indices (int64)", _loss_name(criterion))
        return loss, True


def check_class_range(criterion: object, out: object, data: Spilled) -> None:
    """Class-index labels must lie in ``[0, classes)`` of the model's output (the partition's
    label range was taken while spilling; the rows at fault are counted only on error)."""
    if data.rows == 0 or data.label_min > data.label_max:
        return
    classes = out.shape[1] if getattr(out, "dim", lambda: 0)() >= 2 else None  # type: ignore[attr-defined]
    lo, hi = int(data.label_min), int(data.label_max)
    if lo < 0 or (classes is not None and hi >= classes):
        bad = data.count_labels_outside(0, classes if classes is not None else math.inf)
        raise DataError(
            f"labelCol: {bad} label(s) outside [0, {classes}) (seen {lo}..{hi}); "
            f"{_loss_name(criterion)} needs class indices below the model's {classes} outputs"
        )


def check_whole_labels(criterion: object, data: Spilled) -> None:
    """Class indices must be whole numbers (counted while spilling)."""
    if data.label_nonwhole:
        raise DataError(
            f"labelCol: {data.label_nonwhole} label(s) are not whole numbers, but {_loss_name(criterion)} needs class indices"
        )


class _Targets:
    """Turns the label rows of a read into the loss's targets: the features (autoencoder),
    float32, or class indices (int64) once the loss asks for them."""

    def __init__(self, label_kind: str, criterion: object) -> None:
        self.label_kind = label_kind
        self.indices = label_kind == "scalar" and uses_class_indices(criterion)

    def of(self, x: object, y: np.ndarray | None, device: str) -> object:
        """The targets of rows whose features are ``x`` (a tensor on ``device``) and labels ``y``."""
        import torch

        if self.label_kind == "none" or y is None:
            return x
        return torch.from_numpy(y.astype(np.int64) if self.indices else y.astype(np.float32, copy=False)).to(device)


def train_partition(cfg: TaskConfig, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The body of one Spark task (``mapInArrow``): train on this partition, yield one result row.

    The partition streams once into spill files in Spark's local directory (``_spill``); the
    steps read it back in bounded pieces, and the files are gone when the task ends.
    """
    from pyspark import TaskContext

    from ._spill import spill_directory, spill_partition

    ctx = TaskContext.get()
    partition = ctx.partitionId() if ctx is not None else 0
    attempt = ctx.attemptNumber() if ctx is not None else 0
    data = spill_partition(batches, cfg.label_kind, spill_directory(partition), cfg.validation_pct, cfg.holdout_seed)
    log.info("partition %d: %d rows (%d for validation) spilled in %.2fs", partition, data.rows, data.n_val, data.seconds)
    try:
        yield from _train(cfg, data, partition, attempt)
    finally:
        data.close()


def _train(cfg: TaskConfig, data: Spilled, partition: int, attempt: int) -> Iterator[pa.RecordBatch]:
    import torch

    from . import _native
    from ._spill import RowReader, ShuffledPasses
    from ._state import FlatModel
    from .util import load_torch_obj

    rows, n_train = data.rows, data.n_train
    steps_done = 0
    last_loss = math.nan
    finished = False

    client = ShardedClient(
        cfg.shards,
        cfg.secret,
        worker=partition,
        attempt=attempt,
        timeout_s=cfg.io_timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        dtype=cfg.ps_dtype,
    ) if cfg.shards else _native.Client(
        cfg.host,
        cfg.port,
        cfg.secret,
        worker=partition,
        attempt=attempt,
        timeout_s=cfg.io_timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        tls_fingerprint=cfg.tls_fingerprint,
        dtype=cfg.ps_dtype,
    )
    try:
        if n_train == 0:
            if rows:
                log.warning("partition %d: all its %d rows are in the validation holdout: nothing to train on", partition, rows)
            else:
                log.info("partition %d is empty: leaving the fit", partition)
            finished = True
            yield _result(partition, attempt, rows, 0, last_loss, 0, data.digest, cfg.step_offset)
            return

        obj = load_torch_obj(cfg.torch_obj)
        device = task_device(cfg.device)
        model = obj.model.to(device)
        model.train()
        criterion = obj.criterion
        flat = FlatModel(model, device, buffer_scale=cfg.buffer_scale)
        if flat.numel != client.num_params:
            raise ParamError(f"torchObj: the model has {flat.numel} values to train but the server holds {client.num_params}")
        forward = torch.compile(model, mode=cfg.compile_mode) if cfg.compile_mode else model
        targets = _Targets(cfg.label_kind, criterion)
        if targets.indices:
            check_whole_labels(criterion, data)
        layout = data.layout
        assert layout is not None and data.train is not None
        chunk_rows = layout.rows_in(cfg.buffer_bytes)
        chunk_scale = getattr(criterion, "reduction", "mean") != "sum"

        batch = cfg.mini_batch if 0 < cfg.mini_batch < n_train else -1
        if cfg.mini_batch > n_train:
            log.warning(
                "miniBatch=%d is larger than partition %d's %d training rows: its steps use all %d rows",
                cfg.mini_batch, partition, n_train, n_train,
            )
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + partition)
        passes = ShuffledPasses(n_train, batch, gen) if batch > 0 else None
        steps_per_pass = passes.steps_per_pass if passes is not None else 1
        reader = RowReader(data.train, batch if batch > 0 else min(n_train, chunk_rows))
        # Full batch on a training set within the buffer: read once, kept on the device.
        resident = None
        if batch < 0 and n_train <= chunk_rows:
            x_np, y_np = reader.range(0, n_train)
            x_res = torch.from_numpy(x_np).to(device)
            resident = [x_res, targets.of(x_res, y_np, device)]
        holdout = _Holdout(data, chunk_rows, targets, device) if data.n_val else None

        checked = False

        def loss_of(xb: object, tb: object) -> object:
            """The loss of one forward pass; the first one also settles the targets' type."""
            nonlocal checked
            if checked:
                return _loss(criterion, forward(xb), tb)
            try:
                out = forward(xb)
            except RuntimeError as e:
                raise DataError(
                    f"inputCol: the model cannot take this partition's vectors of {layout.dim} features "
                    f"({type(e).__name__}: {str(e).splitlines()[0]})"
                ) from e
            if targets.indices:
                check_class_range(criterion, out, data)
            loss, to_indices = first_loss(criterion, out, tb, cfg.label_kind)
            if to_indices:
                check_whole_labels(criterion, data)
                check_class_range(criterion, out, data)
                targets.indices = True
                if resident is not None:
                    resident[1] = resident[1].long()  # type: ignore[attr-defined]
            checked = True
            return loss

        start = max(client.resume_step, cfg.step_offset)
        end = cfg.step_offset + (cfg.epochs * steps_per_pass if cfg.epochs > 0 else cfg.iters)
        if passes is not None and start > cfg.step_offset:
            passes.skip(start - cfg.step_offset)  # a retried task continues its order
        # Synchronous: when a previous attempt's step start-1 still waits in the open round,
        # the server answers this pull once that round has closed (versions are not steps:
        # rounds close without dropped workers).
        client.pull(flat.params_np)
        flat.params_pulled()

        def compute_step(idx: object) -> tuple[float, int, float | None]:
            """Gradients of one step (of the rows ``idx``, or the full batch) into the flat
            buffer; returns (loss, rows, validation loss)."""
            flat.zero_grad()
            if idx is not None:
                x_np, y_np = reader.rows(idx)
                xb = torch.from_numpy(x_np).to(device)
                loss = loss_of(xb, targets.of(xb, y_np, device))
                loss.backward()  # type: ignore[attr-defined]
                step_loss, step_rows = float(loss.detach()), len(idx)  # type: ignore[attr-defined, arg-type]
            elif resident is not None:
                loss = loss_of(resident[0], resident[1])
                loss.backward()  # type: ignore[attr-defined]
                step_loss, step_rows = float(loss.detach()), n_train  # type: ignore[attr-defined]
            else:
                # Full batch beyond the buffer: the gradient accumulates over chunks, each
                # chunk's mean loss weighted by its share of the rows, so the sum is the
                # full batch's mean-loss gradient (a sum-reduced loss needs no weights).
                step_loss, step_rows = 0.0, n_train
                for x_np, y_np in reader.chunks(n_train):
                    xb = torch.from_numpy(x_np).to(device)
                    loss = loss_of(xb, targets.of(xb, y_np, device))
                    if chunk_scale:
                        loss = loss * (len(x_np) / n_train)  # type: ignore[operator]
                    loss.backward()  # type: ignore[attr-defined]
                    step_loss += float(loss.detach())  # type: ignore[attr-defined]
            flat.grads_ready()
            return step_loss, step_rows, validation_loss(model, forward, criterion, holdout)

        stale_refusals = 0
        for step in range(start, end):
            idx = passes.next() if passes is not None else None
            while True:
                last_loss, step_rows, val_loss = compute_step(idx)
                _, stop = client.push_pull(
                    flat.grads_np,
                    flat.params_np,
                    batch_size=step_rows,
                    loss=last_loss,
                    step=step,
                    val_loss=val_loss,
                )
                flat.params_pulled()
                if stop or not client.last_push_stale:
                    break
                # maxStaleness: the server refused a gradient computed on parameters too old;
                # the same batch is computed again on the ones just pulled.
                stale_refusals += 1
                log.debug("partition %d: step %d refused as too stale, computed again", partition, step)
            steps_done += 1
            if stop:
                log.info("partition %d: global early stop after step %d", partition, step)
                break
        if stale_refusals:
            log.info("partition %d: %d pushes were staler than maxStaleness and computed again", partition, stale_refusals)
        finished = True
        yield _result(partition, attempt, rows, steps_done, last_loss, batch if batch > 0 else n_train, data.digest, end)
    finally:
        # Bye only when done (an empty partition is done at once). A task that fails is not
        # done: the server keeps its place (a synchronous round waits for its retry, up to
        # roundTimeout), and dropping the Client closes the socket without a Bye.
        if finished:
            client.close()


class _Holdout:
    """The partition's validation rows: kept on the device when they fit the buffer, else read
    in chunks for each evaluation."""

    def __init__(self, data: Spilled, chunk_rows: int, targets: _Targets, device: str) -> None:
        import torch

        from ._spill import RowReader

        assert data.val is not None
        self.n = data.n_val
        self._targets, self._device = targets, device
        self._reader = RowReader(data.val, min(self.n, chunk_rows))
        self._resident = None
        if self.n <= chunk_rows:
            x_np, y_np = self._reader.range(0, self.n)
            x = torch.from_numpy(x_np).to(device)
            self._resident = (x, y_np, {})

    def chunks(self) -> Iterator[tuple[object, object, int]]:
        """``(features, targets, rows)`` of the holdout, all of it or chunk by chunk."""
        import torch

        if self._resident is not None:
            x, y_np, cache = self._resident
            key = self._targets.indices
            if key not in cache:
                cache.clear()
                cache[key] = self._targets.of(x, y_np, self._device)
            yield x, cache[key], self.n
            return
        for x_np, y_np in self._reader.chunks(self.n):
            x = torch.from_numpy(x_np).to(self._device)
            yield x, self._targets.of(x, y_np, self._device), len(x_np)


def validation_loss(model: object, forward: object, criterion: object, holdout: _Holdout | None) -> float:
    """The loss on the holdout, in evaluation mode (dropout off, BatchNorm on its running
    statistics, which the holdout leaves untouched) and without autograd; NaN without a holdout.
    A holdout read in chunks gives the row-weighted mean of the chunks' losses (their sum for a
    sum-reduced loss)."""
    if holdout is None:
        return math.nan
    import torch

    weighted = getattr(criterion, "reduction", "mean") != "sum"
    model.train(False)  # type: ignore[attr-defined]
    try:
        with torch.no_grad():
            total = 0.0
            for x, t, n in holdout.chunks():
                value = float(_loss(criterion, forward(x), t))  # type: ignore[operator]
                total += value * n / holdout.n if weighted and n != holdout.n else value
            return total
    finally:
        model.train(True)  # type: ignore[attr-defined]


def _result(partition: int, attempt: int, rows: int, steps: int, last_loss: float, batch: int, digest: float, end_step: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "partition": pa.array([partition], pa.int32()),
            "attempt": pa.array([attempt], pa.int32()),
            "rows": pa.array([rows], pa.int64()),
            "steps": pa.array([steps], pa.int32()),
            "last_loss": pa.array([last_loss], pa.float64()),
            "batch": pa.array([batch], pa.int64()),
            "digest": pa.array([digest], pa.float64()),
            "end_step": pa.array([end_step], pa.int64()),
        }
    )


def make_task(cfg: TaskConfig):  # noqa: ANN201 - a closure for mapInArrow
    """The function handed to ``DataFrame.mapInArrow`` (a closure over ``cfg`` only)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from train_partition(cfg, batches)

    return run
