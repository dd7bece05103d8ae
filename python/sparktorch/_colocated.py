"""Parameter servers inside the training stage: a fit that needs nothing from the client.

On Spark Connect the process that calls ``fit`` may sit outside the cluster, where no executor
can reach it, and it has no SparkContext. So the parameter server(s) cannot run there. Instead
the training stage is one **barrier** stage whose first ``psShards`` tasks each also host one
shard of the parameter server (a :class:`sparktorch._native.ParameterServer` on the task's own
Rust threads, beside its training loop). The pieces find each other through Spark itself:

1. every task spills its partition (``_spill``), as on the classic path;
2. each host task draws its shard's secret (32 random bytes) and starts its shard,
   initialised from a file the client shipped with the job (``SparkFiles``: ``addArtifacts`` on
   Connect, ``addFile`` on classic), reading only its own range of it; or resumed from a
   checkpoint file (``resumeFrom``, or the state a previous partition shuffle handed back);
3. one ``allGather``: every host's address, port, TLS certificate fingerprint and secret. It
   travels through Spark's barrier coordinator (Spark RPC: encrypted when
   ``spark.network.crypto.enabled`` is), never through the client or its Connect channel. This
   is the stage's only synchronisation: each costs about a second of Spark's barrier protocol;
4. every task trains exactly as on the classic path (``_task._train``), against the hosts;
5. each host waits until every task of the stage has said goodbye to its shard (the server
   counts them; the wait ends early only when the server has failed, and times out when no
   traffic arrives for ``ioTimeout + roundTimeout``), so no server stops under a worker;
6. each host writes its server's whole state (parameters, model buffers, optimizer state,
   steps, early stopping) as a checkpoint file and returns it, with shard 0's history and
   stats, as rows of at most :data:`CHUNK_BYTES` bytes: the client reassembles them.

The stage's output is one schema for both kinds of row (:data:`SCHEMA`): a training result row
has ``shard = -1``; a state row names its shard, its part (``checkpoint``, ``history``,
``stats``), its byte offset and the part's total length.

A failed task fails the whole barrier stage: Spark kills every task of it (hosts included:
their servers die with their Python workers) and retries the stage from its start, which
restarts training from the same initial state (the shipped file), never from a half-trained one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from ._shards import ShardAddress, ShardRange, bind_override, read_init_range
from ._task import TaskConfig
from .errors import EngineError

log = logging.getLogger("sparktorch")

CHUNK_BYTES = 4 << 20
"""Largest payload of one state row (bytes): far below any Spark RPC or Arrow batch limit."""

SCHEMA = (
    "partition int, attempt int, rows long, steps int, last_loss double, batch long, digest double, end_step long, "
    "shard int, part string, offset long, total long, data binary"
)
"""Output of the co-located training stage: training results and state chunks."""

PARTS = ("checkpoint", "history", "stats")


@dataclass(frozen=True)
class ColocatedPlan:
    """What the tasks of a co-located stage need (pickled into the closure; holds no secret)."""

    task: TaskConfig
    """The training task's settings; ``host``, ``port``, ``secret``, ``tls_fingerprint`` and
    ``shards`` are filled in inside the stage."""
    ranges: tuple[ShardRange, ...]
    layouts: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]
    optimizer: str
    hyperparameters: dict[str, Any]
    mode: str
    round_timeout_s: float
    lost_worker_policy: str
    early_stop_patience: int
    io_timeout_s: float
    ps_encryption: str
    spark_rpc_encrypted: bool
    loopback: bool
    """Every task runs on this machine (local mode): servers bind 127.0.0.1."""
    max_staleness: int | None = None
    init_file: str | None = None
    """``SparkFiles`` name of the flat float32 initial values (all shards; each reads its range)."""
    resume_files: tuple[str, ...] | None = None
    """Per shard, the ``SparkFiles`` name of a checkpoint to continue from (partition shuffles)."""
    resume_path: str | None = None
    """``resumeFrom`` (one shard): a checkpoint path the executors see."""
    checkpoint_path: str | None = None
    checkpoint_interval: int = 0


def _executor_host(address: str) -> str:
    """The host part of a ``BarrierTaskInfo.address`` (``host:port`` or ``[v6]:port``)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]")


def _resolve(host: str) -> str:
    """An address of ``host`` to bind: the literal itself, else its IPv4 address when it has
    one (as Spark's JVM prefers), else its IPv6 one."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    v4 = [i for i in infos if i[0] == socket.AF_INET]
    return str((v4 or infos)[0][4][0])


def _start_shard(plan: ColocatedPlan, index: int, secret: bytes, num_workers: int, address: str) -> Any:
    """Start shard ``index``'s server in this task."""
    from pyspark import SparkFiles

    from . import _native
    from ._driver import use_tls

    rng = plan.ranges[index]
    bind = bind_override() or ("127.0.0.1" if plan.loopback else _resolve(_executor_host(address)))
    conf = {"spark.network.crypto.enabled": "true" if plan.spark_rpc_encrypted else "false"}
    tls = use_tls(plan.ps_encryption, conf, bind)
    resume = None
    if plan.resume_files is not None:
        resume = SparkFiles.get(plan.resume_files[index])
    elif plan.resume_path is not None:
        resume = plan.resume_path
    if resume is not None:
        init = np.zeros(rng.size, dtype=np.float32)  # the length only: the checkpoint has the values
    else:
        assert plan.init_file is not None
        init = read_init_range(plan.init_file, rng, index)
    server = _native.ParameterServer(
        init,
        [(n, list(s)) for n, s in plan.layouts[index]],
        plan.optimizer,
        plan.hyperparameters,
        secret=secret,
        mode=plan.mode,  # type: ignore[arg-type]
        host=bind,
        port=0,
        num_workers=num_workers,
        round_timeout_s=plan.round_timeout_s,
        lost_worker_policy=plan.lost_worker_policy,  # type: ignore[arg-type]
        early_stop_patience=plan.early_stop_patience if index == 0 else -1,
        io_timeout_s=plan.io_timeout_s,
        model_buffers=rng.buffers,
        tls=tls,
        max_staleness=plan.max_staleness,
        checkpoint_path=plan.checkpoint_path,
        checkpoint_interval=plan.checkpoint_interval,
        resume_from=resume,
    )
    host, port = server.address
    log.info("in-stage parameter server shard %d [%d, %d) at %s:%d (%s)", index, rng.lo, rng.hi, host, port, "TLS" if tls else "plaintext")
    return server


def _with_state(result: pa.RecordBatch, shard: int, part: str | None, offset: int, total: int, data: bytes | None) -> pa.RecordBatch:
    """A one-row batch of :data:`SCHEMA`: a training result row (``_task._result``) and the
    state columns (``shard = -1`` and nulls for a training result)."""
    extra = {
        "shard": pa.array([shard], pa.int32()),
        "part": pa.array([part], pa.string()),
        "offset": pa.array([offset], pa.int64()),
        "total": pa.array([total], pa.int64()),
        "data": pa.array([data], pa.binary()),
    }
    return pa.RecordBatch.from_arrays(result.columns + list(extra.values()), names=result.schema.names + list(extra))


def _state_row(shard: int, part: str, offset: int, total: int, data: bytes) -> pa.RecordBatch:
    from ._task import _result

    return _with_state(_result(-1, -1, 0, 0, float("nan"), 0, 0.0, 0), shard, part, offset, total, data)


def _chunks(shard: int, part: str, data: bytes | memoryview) -> Iterator[pa.RecordBatch]:
    view = memoryview(data)
    total = len(view)
    for offset in range(0, max(total, 1), CHUNK_BYTES):
        yield _state_row(shard, part, offset, total, bytes(view[offset : offset + CHUNK_BYTES]))


def _final_state(server: Any, index: int, directory: str) -> list[pa.RecordBatch]:
    """Stop the shard and return its state as rows: its checkpoint file, and for shard 0 the
    history and the stats. The final ``checkpointPath`` checkpoint is written by ``stop``; a
    failure there is reported in the stats (the fit warns), not raised."""
    from .errors import SparkTorchError

    path = os.path.join(directory, f"sparktorch-shard-{index}-{uuid.uuid4().hex}.safetensors")
    try:
        server.save_checkpoint(path)
        stats = server.stats()
        history = server.history() if index == 0 else []
        checkpoint_error = None
        try:
            server.stop()
        except SparkTorchError as e:
            checkpoint_error = str(e)
        stats = {**stats, "checkpoint_error": checkpoint_error}
        rows: list[pa.RecordBatch] = []
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < total:
                piece = f.read(CHUNK_BYTES)
                rows.append(_state_row(index, "checkpoint", offset, total, piece))
                offset += len(piece)
        if index == 0:
            rows.extend(_chunks(0, "history", np.asarray(history, dtype=np.float64).reshape(-1, 4).tobytes()))
        rows.extend(_chunks(index, "stats", json.dumps(stats, default=str).encode()))
        return rows
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def colocated_partition(plan: ColocatedPlan, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The body of one task of the co-located barrier stage (see the module docstring)."""
    from pyspark import BarrierTaskContext

    from ._spill import spill_directory, spill_partition
    from ._task import _train

    ctx = BarrierTaskContext.get()
    partition, attempt = ctx.partitionId(), ctx.attemptNumber()
    infos = ctx.getTaskInfos()
    k = len(plan.ranges)
    cfg = plan.task
    directory = spill_directory(partition)
    data = spill_partition(batches, cfg.label_kind, directory, cfg.validation_pct, cfg.holdout_seed)
    log.info("partition %d: %d rows (%d for validation) spilled in %.2fs", partition, data.rows, data.n_val, data.seconds)
    server = None
    try:
        if len(infos) < k:
            raise EngineError(f"psShards={k}: the training stage has only {len(infos)} tasks to host the shards")
        mine: dict[str, Any] = {"p": partition}
        if partition < k:
            # Each host draws its own shard's secret: it leaves this task only through the
            # barrier coordinator (Spark RPC), to the stage's other tasks.
            secret = os.urandom(32)
            server = _start_shard(plan, partition, secret, len(infos), infos[partition].address)
            host, port = server.address
            fp = server.tls_fingerprint
            mine.update(host=host, port=port, fp=fp.hex() if fp else None, secret=secret.hex())
        # The stage's one synchronisation before training (each costs Spark's barrier
        # round trip, about a second): every host's address, fingerprint and secret.
        hosts = sorted((json.loads(m) for m in ctx.allGather(json.dumps(mine))), key=lambda m: m["p"])
        shards = tuple(
            ShardAddress(
                r.index, str(m["host"]), int(m["port"]), r.lo, r.hi,
                bytes.fromhex(m["fp"]) if m["fp"] else None, bytes.fromhex(m["secret"]),
            )
            for r, m in zip(plan.ranges, hosts[:k])
        )
        cfg = replace(
            cfg,
            host=shards[0].host,
            port=shards[0].port,
            secret=shards[0].secret or b"",
            tls_fingerprint=shards[0].tls_fingerprint,
            shards=shards if k > 1 else None,
        )
        results = list(_train(cfg, data, partition, attempt))
        if server is not None:
            # Every task has trained and said goodbye to the servers before any stops.
            _await_workers(server, partition, len(infos), plan.io_timeout_s + plan.round_timeout_s)
        for r in results:
            yield _with_state(r, -1, None, 0, 0, None)
        if server is not None:
            rows = _final_state(server, partition, directory)
            server = None
            yield from rows
    finally:
        data.close()
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()


def _await_workers(server: Any, index: int, num_workers: int, idle_timeout_s: float) -> None:
    """Wait until every one of the stage's ``num_workers`` training tasks has said goodbye to
    this shard. The deadline moves with the server's
    traffic: a fit still training is never cut short; one silent for ``idle_timeout_s`` is an
    :class:`EngineError` (which fails the stage)."""
    import time

    last_bytes = -1
    deadline = time.monotonic() + idle_timeout_s
    pause = 0.005
    while True:
        stats = server.stats()
        # Goodbyes only: a synchronous server marks a late worker "lost" and takes it back at
        # its next push, so a lost worker may still need this server. One that is really gone
        # fails the barrier stage (Spark kills every task of it), or falls silent (below).
        if int(stats.get("workers_done", 0)) >= num_workers:
            return
        if stats.get("error"):
            return  # reported with the state; the workers have failed or will
        moved = int(stats.get("bytes_in", 0))
        now = time.monotonic()
        if moved != last_bytes:
            last_bytes, deadline = moved, now + idle_timeout_s
        elif now > deadline:
            raise EngineError(
                f"parameter server shard {index}: {num_workers - int(stats.get('workers_done', 0))} of "
                f"{num_workers} training tasks neither finished nor sent anything for {idle_timeout_s:.0f}s"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def make_colocated_task(plan: ColocatedPlan):  # noqa: ANN201 - a closure for mapInArrow
    """The function handed to ``DataFrame.mapInArrow(..., barrier=True)``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from colocated_partition(plan, batches)

    return run


class StateAssembler:
    """The client's side of step 7: state rows in (any order, one at a time), per-shard
    checkpoint files on local disk, history and stats in memory."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.directory = tempfile.mkdtemp(prefix="sparktorch-state-")
        self._files: dict[int, Any] = {}
        self._got: dict[tuple[int, str], int] = {}
        self._total: dict[tuple[int, str], int] = {}
        self._small: dict[tuple[int, str], dict[int, bytes]] = {}
        self.results: list[dict[str, Any]] = []

    def add(self, row: Any) -> None:
        """One output row of the stage."""
        shard = int(row["shard"])
        if shard < 0:
            self.results.append({c: row[c] for c in ("partition", "attempt", "rows", "steps", "last_loss", "batch", "digest", "end_step")})
            return
        part, offset, total, data = str(row["part"]), int(row["offset"]), int(row["total"]), bytes(row["data"])
        key = (shard, part)
        self._total[key] = total
        self._got[key] = self._got.get(key, 0) + len(data)
        if part == "checkpoint":
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(self.checkpoint_file(shard), "wb")  # noqa: SIM115 - closed in finish
            f.seek(offset)
            f.write(data)
        else:
            self._small.setdefault(key, {})[offset] = data

    def checkpoint_file(self, shard: int) -> str:
        """Where shard ``shard``'s final checkpoint lands."""
        return os.path.join(self.directory, f"shard-{shard}.safetensors")

    def finish(self) -> None:
        """Check that every shard's every part arrived whole."""
        for f in self._files.values():
            f.close()
        for shard in range(self.k):
            for part in ("checkpoint", "stats") + (("history",) if shard == 0 else ()):
                key = (shard, part)
                if key not in self._total or self._got.get(key) != self._total[key]:
                    raise EngineError(
                        f"parameter server shard {shard}: its final {part} did not come back whole "
                        f"({self._got.get(key, 0)} of {self._total.get(key, '?')} bytes)"
                    )

    def _part(self, shard: int, part: str) -> bytes:
        pieces = self._small.get((shard, part), {})
        return b"".join(pieces[o] for o in sorted(pieces))

    def stats(self, shard: int) -> dict[str, Any]:
        """Shard ``shard``'s final stats."""
        return dict(json.loads(self._part(shard, "stats") or b"{}"))

    def history(self) -> list[tuple[int, int, float, float]]:
        """Shard 0's history: ``(worker, step, loss, val_loss)`` per applied push."""
        arr = np.frombuffer(self._part(0, "history"), dtype=np.float64).reshape(-1, 4)
        return [(int(w), int(s), float(loss), float(vl)) for w, s, loss, vl in arr]

    def close(self) -> None:
        """Delete the local files."""
        import shutil

        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        shutil.rmtree(self.directory, ignore_errors=True)


# ------------------------------------------------------------------------------------ the client


@dataclass
class Outcome:
    """What a co-located fit hands back to :func:`sparktorch._driver.fit`."""

    results: list[dict[str, Any]]
    params: np.ndarray
    history: list[tuple[int, int, float, float]]
    optimizer_state: dict[str, Any]
    stats: dict[str, Any]


class _StatsAtEnd:
    """The ``server`` the progress display polls: nothing until the stage ends, then the
    final stats (steps applied, losses)."""

    def __init__(self) -> None:
        self.final: dict[str, Any] = {}

    def stats(self) -> dict[str, Any]:
        return dict(self.final)

    def history(self, since: int = 0) -> tuple[int, list[Any]]:
        return since, []


def fit_colocated(
    fs: Any, est: Any, plan: Any, frame: Any, label_kind: str, state: Any, opt_name: str, hyper: Any, num_parts: int, scale: float
) -> Outcome:
    """Run the fit's training stage(s) with the servers inside them; see the module docstring.

    The client ships the initial values (one file; each host reads its range), runs one
    barrier job per partition shuffle, and reads the servers' final state back from the job's
    rows, streamed (``toLocalIterator``) into per-shard files. Between partition shuffles the
    state goes back out as those checkpoint files, so the next stage's servers continue exactly
    (parameters, optimizer state, steps, early stopping).
    """
    from . import _native
    from ._driver import reshuffled, translate_job_error, _warn_clamped_batches
    from ._progress import Progress, progress_total
    from ._shards import shard_layout, split_ranges
    from ._spill import BUFFER_BYTES
    from ._driver import BUFFER_CONF

    k = plan.ps_shards
    fit_id = uuid.uuid4().hex[:12]
    ranges = tuple(split_ranges(state.num_trainable, state.num_buffers, k))
    shapes = state.shapes()
    layouts = tuple(tuple((n, tuple(s)) for n, s in shard_layout(shapes, r.lo, r.hi)) for r in ranges)
    buffer_bytes = int(fs.conf(BUFFER_CONF, str(BUFFER_BYTES)) or BUFFER_BYTES)
    workdir = tempfile.mkdtemp(prefix="sparktorch-fit-")
    results: list[dict[str, Any]] = []
    history: list[tuple[int, int, float, float]] = []
    assembler: StateAssembler | None = None
    watcher = _StatsAtEnd()
    total, unit = progress_total(plan, num_parts)  # synchronous: rounds, else pushes; None with epochs: known to the tasks
    resume_files: tuple[str, ...] | None = None
    init_file: str | None = None
    if not plan.resume_from:
        init_file = fs.ship_new_file(workdir, f"sparktorch-init-{fit_id}.f32", lambda p: state.flatten().tofile(p))
    if hasattr(fs, "watch_progress"):
        fs.watch_progress()
    try:
        with Progress(watcher, total, plan.verbose, num_parts, session=fs, barrier=True, live_steps=False, unit=unit) as progress:
            offset = 0
            base = frame
            for shuffle in range(plan.shuffles):
                if shuffle > 0:
                    if assembler is not None and assembler.stats(0).get("should_stop"):
                        break
                    frame = reshuffled(base, num_parts, est.getSeed() + shuffle)
                task = TaskConfig(
                    host="", port=0, synchronous=plan.engine_mode == "synchronous", secret=b"",
                    torch_obj=est.getTorchObj(), iters=plan.iters, step_offset=offset, label_kind=label_kind,
                    mini_batch=plan.mini_batch, validation_pct=plan.validation_pct, device=plan.device,
                    compile_mode=plan.compile_mode, seed=est.getSeed() + shuffle, io_timeout_s=est.getIoTimeout(),
                    connect_timeout_s=min(60.0, est.getIoTimeout()), buffer_scale=scale, epochs=plan.epochs,
                    holdout_seed=est.getSeed(), buffer_bytes=buffer_bytes, ps_dtype=plan.ps_dtype,
                )
                cplan = ColocatedPlan(
                    task=task, ranges=ranges, layouts=layouts, optimizer=opt_name, hyperparameters=dict(hyper),
                    mode=plan.engine_mode, round_timeout_s=float(est.getRoundTimeout()),
                    lost_worker_policy=est.getLostWorkerPolicy(),
                    early_stop_patience=plan.patience if plan.patience > 0 else -1,
                    io_timeout_s=float(est.getIoTimeout()), ps_encryption=est.getPsEncryption(),
                    spark_rpc_encrypted=fs.rpc_encrypted(), loopback=fs.is_local, max_staleness=plan.max_staleness,
                    init_file=init_file if resume_files is None else None,
                    resume_files=resume_files,
                    resume_path=plan.resume_from if shuffle == 0 else None,
                    checkpoint_path=plan.checkpoint_path, checkpoint_interval=plan.checkpoint_interval,
                )
                # Spark retries a failed barrier stage as a whole only when it is a shuffle-map
                # stage: end it with a shuffle.
                staged = frame.mapInArrow(make_colocated_task(cplan), SCHEMA, barrier=True).repartition(1)
                if assembler is not None:
                    assembler.close()
                assembler = StateAssembler(k)
                description = f"sparktorch fit ({plan.engine_mode}, {k} in-stage server(s)), shuffle {shuffle + 1}/{plan.shuffles}"
                try:
                    with fs.tagged(description) as tag:
                        progress.job_started(tag)
                        try:
                            for row in staged.toLocalIterator():
                                assembler.add(row)
                        except KeyboardInterrupt:
                            fs.cancel(tag)
                            raise
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    translated = translate_job_error(e)
                    if translated is not None:
                        raise translated from e
                    raise
                assembler.finish()
                # Each stage's servers record the pushes they applied: the fit's history is
                # every stage's, in order.
                history.extend(assembler.history())
                rows = assembler.results
                results.extend(rows)
                offset = max([offset + plan.iters] if plan.epochs <= 0 else [offset] + [int(r["end_step"]) for r in rows])
                if shuffle + 1 < plan.shuffles:
                    carried = []
                    for i in range(k):
                        src = assembler.checkpoint_file(i)
                        carried.append(fs.ship_new_file(workdir, f"sparktorch-state-{fit_id}-{shuffle}-{i}.safetensors", lambda p, s=src: os.replace(s, p)))
                    resume_files = tuple(carried)
            assert assembler is not None
            per = [assembler.stats(i) for i in range(k)]
            stats = dict(per[0])
            for key in ("bytes_in", "bytes_out", "connections", "rejected_frames", "auth_failures"):
                stats[key] = sum(int(s.get(key, 0) or 0) for s in per)
            stats["shards"] = [{"shard": i, **{c: s.get(c) for c in ("version", "updates", "bytes_in", "bytes_out")}} for i, s in enumerate(per)]
            watcher.final = stats
        if sum(r["rows"] for r in results) == 0:
            from .errors import DataError

            raise DataError("the DataFrame has zero rows: nothing to train on")
        _warn_clamped_batches(plan, results)
        errors = [f"parameter server shard {i}: {s['error']}" for i, s in enumerate(per) if s.get("error")]
        if errors:
            raise EngineError(f"training failed: {errors[0]}")
        failed = [f"shard {i}: {s['checkpoint_error']}" for i, s in enumerate(per) if s.get("checkpoint_error")]
        if failed:
            import warnings

            log.error("the final checkpoint failed: %s", "; ".join(failed))
            warnings.warn(f"the final checkpoint failed (a resume would start from an older one, or none): {'; '.join(failed)}", RuntimeWarning, stacklevel=3)
        flat = np.empty(state.num_trainable + state.num_buffers, dtype=np.float32)
        meta: dict[str, Any] = {}
        buffers: dict[str, list[np.ndarray]] = {}
        for r in ranges:
            ck = _native.read_checkpoint(assembler.checkpoint_file(r.index))
            flat[r.lo : r.hi] = np.asarray(ck["params"], dtype=np.float32)
            opt = dict(ck["optimizer_state"])
            for name, value in opt.pop("buffers", {}).items():
                buffers.setdefault(str(name), []).append(np.asarray(value, dtype=np.float32).reshape(-1))
            if r.index == 0:
                meta = opt
        return Outcome(
            results=results,
            params=flat,
            history=history,
            optimizer_state={**meta, "buffers": {n: np.concatenate(v) for n, v in buffers.items()}},
            stats=stats,
        )
    finally:
        if assembler is not None:
            assembler.close()
        if hasattr(fs, "unwatch_progress"):
            fs.unwatch_progress()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
