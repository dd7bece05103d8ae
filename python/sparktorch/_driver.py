"""The driver side of a fit: validate, start the parameter server, run the Spark job, collect.

Order of events in :func:`fit`:

1. every param is checked and the torch object is loaded and tried on the driver (a forward pass
   on a zero batch of the feature size when known) — no Spark job has started yet;
2. a :class:`sparktorch._native.ParameterServer` starts on the driver's address with a fresh
   per-fit secret (it travels to the tasks inside the Spark closure);
3. one Spark job per partition shuffle runs :func:`sparktorch._task.train_partition` on every
   partition, while a driver thread shows the fit's phase and steps (:mod:`sparktorch._progress`);
4. the server's final parameters are loaded into the model, the server is stopped (on success,
   failure and Ctrl-C alike) and a :class:`~sparktorch.SparkTorchModel` is returned.

With an active MLflow run (and ``mlflowLogging``), params are logged before step 2 and the
per-step metrics and the model after step 4 (:mod:`sparktorch._mlflow`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._history import TrainingHistory
from ._progress import Progress, progress_total
from ._session import FIT_TAG_PREFIX, ClassicSession, FitSession, session_of  # noqa: F401 - FIT_TAG_PREFIX: re-exported
from ._shards import ShardedServer
from ._state import StateLayout, buffer_change_scale, buffer_momentum
from .errors import (
    ClusterError,
    DataError,
    EngineError,
    ParamError,
    SparkTorchError,
)

log = logging.getLogger("sparktorch")

_ENGINE_MODES = {("hogwild", False): "hogwild", ("hogwild", True): "async", ("async", True): "async", ("async", False): "async"}


@dataclass(frozen=True)
class FitPlan:
    """The validated settings of one fit."""

    engine_mode: str
    iters: int
    partitions: int
    shuffles: int
    mini_batch: int
    validation_pct: float
    patience: int
    device: str
    compile_mode: str | None
    port: int
    verbose: int
    checkpoint_path: str | None
    checkpoint_interval: int
    resume_from: str | None
    epochs: int = 0
    """> 0: passes over each partition's training rows (the steps follow from the data)."""
    max_staleness: int | None = None
    """Bounded staleness of the asynchronous styles; None: unbounded."""
    ps_dtype: str = "float32"
    """Element type of parameter traffic on the wire."""
    ps_shards: int = 1
    """Parameter server shards (1: one server on the driver; K > 1: K shards on executors)."""


def engine_mode(mode: str, acquire_lock: bool) -> str:
    """The engine's mode for the user's ``mode`` + ``acquireLock``."""
    if mode == "synchronous":
        return "synchronous"
    return _ENGINE_MODES[(mode, bool(acquire_lock))]


def validate(est: Any) -> FitPlan:
    """Check every param of the estimator; raise :class:`ParamError` naming the first bad one."""
    from .estimator import COMPILE_MODES, LOST_WORKER_POLICIES, MODES

    mode = est.getMode()
    if mode not in MODES:
        raise ParamError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    iters = est.getIters()
    if iters <= 0:
        raise ParamError(f"iters={iters}: must be a positive number of optimizer steps per partition")
    shuffles = est.getPartitionShuffles()
    if shuffles <= 0:
        raise ParamError(f"partitionShuffles={shuffles}: must be >= 1")
    pct = est.getValidationPct()
    if not (0.0 <= pct < 1.0) or math.isnan(pct):
        raise ParamError(f"validationPct={pct}: must be in [0, 1)")
    port = est.getPort()
    if not (0 <= port <= 65535):
        raise ParamError(f"port={port}: must be 0 (chosen by the OS) or a TCP port 1-65535")
    device = est.getDevice()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ParamError(f"device={device!r}: expected 'cpu' or 'cuda' (or 'cuda:N')")
    compile_mode = est.getCompileMode()
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ParamError(f"compileMode={compile_mode!r}: expected None or one of {', '.join(COMPILE_MODES)}")
    policy = est.getLostWorkerPolicy()
    if policy not in LOST_WORKER_POLICIES:
        raise ParamError(f"lostWorkerPolicy={policy!r}: expected one of {', '.join(LOST_WORKER_POLICIES)}")
    for name in ("ioTimeout", "roundTimeout"):
        value = est.getOrDefault(name)
        if not value > 0:
            raise ParamError(f"{name}={value}: must be a positive number of seconds")
    if not est.getTorchObj():
        raise ParamError("torchObj is empty: pass the string made by sparktorch.serialize_torch_obj(...)")
    _validate_ps_encryption(est)
    max_staleness, ps_dtype = _validate_traffic(est, mode)
    k = est.getPsShards()
    if isinstance(k, int) and not isinstance(k, bool) and k > 1:
        checkpoint_path, interval, resume_from = _sharded_checkpoint_plan(est, k)
    else:
        checkpoint_path, interval, resume_from = _checkpoint_plan(est)
    epochs = est.getEpochs()
    if epochs < 0:
        raise ParamError(f"epochs={epochs}: must be >= 0 (0: run iters steps)")
    if epochs > 0 and est.isSet("iters"):
        raise ParamError(f"epochs={epochs} and iters={iters} are both set: set iters (steps) or epochs (passes over the data), not both")
    shards = _validate_ps_shards(est, mode, policy)
    return FitPlan(
        engine_mode=engine_mode(mode, est.getAcquireLock()),
        iters=iters,
        partitions=est.getPartitions(),
        shuffles=shuffles,
        mini_batch=est.getMiniBatch(),
        validation_pct=pct,
        patience=est.getEarlyStopPatience(),
        device=device,
        compile_mode=compile_mode,
        port=port,
        verbose=est.getVerbose(),
        checkpoint_path=checkpoint_path,
        checkpoint_interval=interval,
        resume_from=resume_from,
        epochs=epochs,
        max_staleness=max_staleness,
        ps_dtype=ps_dtype,
        ps_shards=shards,
    )


def _validate_traffic(est: Any, mode: str) -> tuple[int | None, str]:
    """``maxStaleness`` (None when unbounded) and ``psDtype``, checked."""
    from .estimator import PS_DTYPES

    k = est.getMaxStaleness()
    if k < -1:
        raise ParamError(f"maxStaleness={k}: must be >= 0, or -1 for unbounded")
    if k >= 0 and mode == "synchronous":
        raise ParamError(
            f"maxStaleness={k} applies to mode='hogwild' (asynchronous updates); synchronous rounds are never stale"
        )
    dtype = est.getPsDtype()
    if dtype not in PS_DTYPES:
        raise ParamError(f"psDtype={dtype!r}: expected one of {', '.join(PS_DTYPES)}")
    return (k if k >= 0 else None), dtype


def _validate_ps_shards(est: Any, mode: str, policy: str) -> int:
    """``psShards``: an int >= 1; K > 1 refuses the combinations it cannot keep (see
    ``docs/architecture.md``, "Sharded parameter server")."""
    k = est.getPsShards()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ParamError(f"psShards={k!r}: must be an int >= 1 (1: one parameter server on the driver)")
    if k == 1:
        return 1
    staleness = est.getMaxStaleness()
    if staleness >= 0:
        raise ParamError(
            f"psShards={k} with maxStaleness={staleness}: bounded staleness is not supported across shards (a push "
            "refused by one shard and applied by another would be half a step); use psShards=1 or maxStaleness=-1"
        )
    if mode == "synchronous" and policy == "drop":
        raise ParamError(
            f"psShards={k} with mode='synchronous' needs lostWorkerPolicy='fail': each shard would drop a late "
            "worker from its own round on its own clock, so shards could close a round with different sets of "
            "workers (and the result would differ from one server's)"
        )
    return k


def _sharded_checkpoint_plan(est: Any, k: int) -> tuple[str | None, int, str | None]:
    """As :func:`_checkpoint_plan`, for a sharded checkpoint: a directory holding
    ``manifest.json`` and one ``part-<i>/`` per shard (see ``docs/architecture.md``). Resuming
    needs the same ``psShards`` (checked here) and model (checked when the shards start)."""
    from ._shards import MANIFEST, read_manifest

    path, interval, resume = _checkpoint_params(est)
    if resume:
        if not os.path.isfile(os.path.join(resume, MANIFEST)):
            single = os.path.isfile(resume) or os.path.isfile(os.path.join(resume, CHECKPOINT_FILE))
            raise ParamError(
                f"resumeFrom={resume!r}: no sharded checkpoint there (expected a directory holding {MANIFEST}, "
                f"written by a fit with psShards > 1)" + ("; it holds a one-server checkpoint: resume it with psShards=1" if single else "")
            )
        manifest = read_manifest(resume)
        if int(manifest.get("shards", 0)) != k:
            raise ParamError(
                f"psShards={k}: resumeFrom={resume!r} was written with psShards={manifest.get('shards')}; "
                "resume with the same psShards"
            )
        log.warning("resuming from sharded checkpoint %s (version %s)", resume, manifest.get("version"))
    elif path and os.path.isfile(os.path.join(path, MANIFEST)):
        raise ParamError(
            f"checkpointPath={path!r} already holds {MANIFEST} from an earlier fit: pass "
            f"resumeFrom={path!r} to continue from it, or choose an empty directory (or delete it) to start over"
        )
    return path or None, interval, resume or None


def check_shard_slots(k: int, num_parts: int, slots: int, num_values: int) -> None:
    """Refuse, before any job, a sharded fit that cannot get its task slots or has fewer values
    than shards. K shard tasks hold K slots for the whole fit, and every training task needs a
    slot of its own beside them (whatever the mode)."""
    if k > num_values:
        raise ParamError(f"psShards={k}: the model has only {num_values} values to split over the shards")
    if k + num_parts > slots:
        raise ParamError(
            f"psShards={k}: {k} shard tasks plus {num_parts} training tasks need {k + num_parts} task slots, "
            f"but the cluster runs only {slots} tasks at once; lower psShards or partitions, or add executor cores"
        )


CHECKPOINT_FILE = "checkpoint.safetensors"


def _checkpoint_params(est: Any) -> tuple[str | None, int, str | None]:
    """``checkpointPath``, ``checkpointInterval`` and ``resumeFrom``, with the checks every
    checkpoint plan shares (one server or sharded)."""
    path, interval, resume = est.getCheckpointPath(), est.getCheckpointInterval(), est.getResumeFrom()
    if interval < 0:
        raise ParamError(f"checkpointInterval={interval}: must be >= 0 (0: a checkpoint only when the fit ends)")
    if interval > 0 and not path:
        raise ParamError(f"checkpointInterval={interval} needs checkpointPath (the directory to write to)")
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise ParamError(f"checkpointPath={path!r} exists and is not a directory")
    return path, interval, resume


def _checkpoint_plan(est: Any) -> tuple[str | None, int, str | None]:
    """(checkpoint directory, interval, checkpoint file to resume from), validated.

    Resuming is explicit: a ``checkpointPath`` that already holds a checkpoint is refused unless
    ``resumeFrom`` names a checkpoint to continue from (that one, typically), so that a rerun
    never silently returns old weights, nor overwrites a checkpoint someone may still need.
    """
    path, interval, resume = _checkpoint_params(est)
    if resume:
        file = os.path.join(resume, CHECKPOINT_FILE) if os.path.isdir(resume) else resume
        if not os.path.isfile(file):
            raise ParamError(f"resumeFrom={resume!r}: no checkpoint there (expected a file, or a directory holding {CHECKPOINT_FILE})")
        resume = file
        log.warning("resuming from checkpoint %s", resume)
    elif path and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        raise ParamError(
            f"checkpointPath={path!r} already holds {CHECKPOINT_FILE} from an earlier fit: pass "
            f"resumeFrom={path!r} to continue from it, or choose an empty directory (or delete it) to start over"
        )
    return path or None, interval, resume or None


DAEMON_MODULE = "sparktorch._daemon"
_DAEMON_CONF = "spark.python.daemon.module"


def use_preloading_daemon(sc: Any) -> bool:
    """In local mode, fork Spark's Python workers from :mod:`sparktorch._daemon` (torch imported
    once, before the fork) unless ``spark.python.daemon.module`` is set. Returns whether it is in use.

    Spark reads the setting from the running context's configuration each time it starts a task's
    Python runner, so setting it on the live configuration takes effect for the next Python
    task (a new daemon starts for it; workers of the old one are left alone). On a cluster the
    executors' configuration is fixed when they start: set
    ``spark.python.daemon.module=sparktorch._daemon`` there. ``pyspark.daemon`` as the setting
    turns this off.
    """
    master = sc.master
    if not master.startswith("local") or master.startswith("local-cluster"):
        return False
    try:
        conf = sc._jsc.sc().conf()
        if conf.contains(_DAEMON_CONF):
            return str(conf.get(_DAEMON_CONF)) == DAEMON_MODULE
        conf.set(_DAEMON_CONF, DAEMON_MODULE)
        log.info("Python workers now fork from %s (torch imported once per executor)", DAEMON_MODULE)
        return True
    except Exception as e:  # noqa: BLE001 - an optimisation: never fail over it
        log.debug("could not set %s: %s", _DAEMON_CONF, e)
        return False


_DAEMON_STARTED: set[str] = set()
"""Spark application ids whose preloading daemon a fit has started ahead of its data stage."""


def _touch_worker(batches: Iterator[Any]) -> Iterator[Any]:
    """Task body that only starts a Python worker (and with it the daemon) and imports the
    training task's module."""
    import pyarrow as pa

    from . import _task  # noqa: F401 - numpy, pyarrow and the package, as a training task needs

    for _ in batches:
        pass
    yield pa.RecordBatch.from_pydict({"ok": [1]})


def prestart_python_workers(spark: Any, wait_s: float = 1.0) -> threading.Thread | None:
    """Start the Python worker daemon while Spark still runs the fit's data stage.

    The first Python task of a session starts the daemon, which imports torch
    (:mod:`sparktorch._daemon`): seconds that a fit used to spend after its data stage, when the
    training tasks began. A one-row job of one task, submitted just before the fit's own job
    (Spark schedules jobs first come, first served, so it gets a slot ahead of the data stage),
    starts the daemon meanwhile; its worker is then reused by a training task. Once per
    application, only where the preloading daemon is in use.
    """
    sc = spark.sparkContext
    key = sc.applicationId
    if key in _DAEMON_STARTED:
        return None
    _DAEMON_STARTED.add(key)
    tracker = sc.statusTracker()
    before = set(tracker.getActiveJobsIds())

    def run() -> None:
        try:
            sc.setLocalProperty("spark.job.description", "sparktorch: start the Python worker daemon")
            spark.range(1, numPartitions=1).mapInArrow(_touch_worker, "ok long").collect()
        except Exception as e:  # noqa: BLE001 - an optimisation: the fit starts workers anyway
            log.debug("pre-starting the Python workers failed: %s", e)

    thread = threading.Thread(target=run, name="sparktorch-prestart", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and thread.is_alive():
        if set(tracker.getActiveJobsIds()) - before:
            break
        time.sleep(0.02)
    return thread


def server_host(sc: Any) -> tuple[str, str]:
    """(address to bind, address tasks connect to) for the parameter server.

    In local mode every task runs on this machine: loopback. On a cluster: the driver's
    ``spark.driver.bindAddress`` (bind) and ``spark.driver.host`` (connect).
    """
    conf = sc.getConf()
    if sc.master.startswith("local") and not sc.master.startswith("local-cluster"):
        return "127.0.0.1", "127.0.0.1"
    connect = conf.get("spark.driver.host", "127.0.0.1")
    bind = conf.get("spark.driver.bindAddress", connect)
    return bind, connect


def _validate_ps_encryption(est: Any) -> None:
    from .estimator import PS_ENCRYPTION

    setting = est.getPsEncryption()
    if setting not in PS_ENCRYPTION:
        raise ParamError(f"psEncryption={setting!r}: expected one of {', '.join(PS_ENCRYPTION)}")


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (a host name other than ``localhost`` may resolve
    anywhere: not loopback)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def use_tls(setting: str, conf: Any, bind: str) -> bool:
    """Whether the parameter server speaks TLS (param ``psEncryption``).

    ``'on'`` / ``'off'``: as set. ``'auto'``: on when Spark's own RPC encryption is on
    (``spark.network.crypto.enabled``, ``spark.ssl.rpc.enabled`` or ``spark.ssl.enabled``), or
    when the server binds an address that is not loopback (``0.0.0.0`` and host names included).
    """
    if setting in ("on", "off"):
        return setting == "on"

    def enabled(key: str) -> bool:
        return str(conf.get(key, "false")).strip().lower() == "true"

    if any(enabled(k) for k in ("spark.network.crypto.enabled", "spark.ssl.rpc.enabled", "spark.ssl.enabled")):
        return True
    return not _is_loopback(bind)


def _stop_server(server: Any) -> None:
    """Stop the server. A failed final checkpoint is reported (logged and warned: the fitted model
    is still returned, but the checkpoint directory holds an older state or none) rather than
    raised, so that it never hides the fit's result nor the fit's own error."""
    import warnings

    from .errors import CheckpointError

    try:
        server.stop()
    except CheckpointError as e:
        log.error("the final checkpoint failed: %s", e)
        warnings.warn(f"the final checkpoint failed (a resume would start from an older one, or none): {e}", RuntimeWarning, stacklevel=3)


def _dry_run(model: Any, criterion: Any, feature_dim: int | None, label_kind: str, input_col: str) -> None:
    """A forward pass on a zero batch of the known feature size: catch a size mismatch early."""
    import torch

    if feature_dim is None:
        return
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                model(torch.zeros(2, feature_dim))
            finally:
                model.train(was_training)
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit the model
        raise DataError(
            f"inputCol {input_col!r}: the model cannot take vectors of {feature_dim} features "
            f"({type(e).__name__}: {e})"
        ) from e


_TASK_ERROR = re.compile(r"sparktorch\.errors\.(\w+): (.*)")


def translate_job_error(exc: BaseException) -> BaseException | None:
    """The sparktorch error a failed task raised, re-created on the driver, or None."""
    from . import errors

    text = str(exc)
    m = _TASK_ERROR.search(text)
    if not m:
        # Plain Python builtins from the task keep their type name but not their class.
        return None
    cls = getattr(errors, m.group(1), None)
    if isinstance(cls, type) and issubclass(cls, SparkTorchError):
        return cls(m.group(2).strip())
    return None


def _run_jobs(
    est: Any,
    plan: FitPlan,
    frame: Any,
    label_kind: str,
    server: Any,
    connect: str,
    secret: bytes,
    num_parts: int,
    progress: Progress | None = None,
    buffer_scale: float = 1.0,
    fs: FitSession | None = None,
) -> list[Any]:
    """Run one Spark job per partition shuffle; return the tasks' result rows.

    A failed job is re-raised as the server's fatal error when it has one, else as the
    sparktorch error the task raised (re-created on the driver), else as Spark raised it.
    """
    from ._spill import BUFFER_BYTES
    from ._task import RESULT_SCHEMA, TaskConfig, make_task

    fs = fs or session_of(frame.sparkSession)
    port = server.address[1]
    results: list[Any] = []
    buffer_bytes = int(frame.sparkSession.conf.get(BUFFER_CONF, str(BUFFER_BYTES)))
    offset = 0
    base = frame
    for shuffle in range(plan.shuffles):
        if shuffle > 0:
            if server.stats().get("should_stop"):
                break
            # Dealt from the first layout each time: one exchange per shuffle, not k stacked.
            frame = reshuffled(base, num_parts, est.getSeed() + shuffle)
        cfg = TaskConfig(
            host=connect,
            port=port,
            synchronous=plan.engine_mode == "synchronous",
            secret=secret,
            torch_obj=est.getTorchObj(),
            iters=plan.iters,
            step_offset=offset,
            label_kind=label_kind,
            mini_batch=plan.mini_batch,
            validation_pct=plan.validation_pct,
            device=plan.device,
            compile_mode=plan.compile_mode,
            seed=est.getSeed() + shuffle,
            io_timeout_s=est.getIoTimeout(),
            connect_timeout_s=min(60.0, est.getIoTimeout()),
            tls_fingerprint=server.tls_fingerprint,
            buffer_scale=buffer_scale,
            epochs=plan.epochs,
            holdout_seed=est.getSeed(),
            buffer_bytes=buffer_bytes,
            ps_dtype=plan.ps_dtype,
            shards=server.addresses if isinstance(server, ShardedServer) else None,
        )
        trained = frame.mapInArrow(make_task(cfg), RESULT_SCHEMA, barrier=est.getUseBarrier())
        if est.getUseBarrier():
            # Spark retries a failed barrier stage as a whole only when it is a shuffle-map
            # stage (a failed barrier *result* stage aborts the job): end it with a shuffle.
            trained = trained.repartition(1)
        description = f"sparktorch fit ({plan.engine_mode}), shuffle {shuffle + 1}/{plan.shuffles}"
        try:
            with fs.tagged(description) as tag:
                if progress is not None:
                    progress.job_started(tag)
                # A lost shard cancels the training job (its tasks would wait on the others).
                guard = server.guard_job(tag) if isinstance(server, ShardedServer) else contextlib.nullcontext()
                try:
                    with guard:
                        rows = trained.collect()
                except KeyboardInterrupt:
                    fs.cancel(tag)
                    raise
            for r in rows:
                log.debug("shuffle %d, partition %d: %d rows (digest %.6g), %d steps", shuffle, r["partition"], r["rows"], r["digest"], r["steps"])
            results.extend(rows)
            # Step ids continue across shuffles (with epochs, after the longest partition's).
            offset = max([offset + plan.iters] if plan.epochs <= 0 else [offset] + [int(r["end_step"]) for r in rows])
        except KeyboardInterrupt:
            raise
        except Exception as e:
            err = server.stats().get("error")
            if err:
                raise EngineError(f"training failed: {err}") from e
            translated = translate_job_error(e)
            if translated is not None:
                raise translated from e
            raise
    return results


BUFFER_CONF = "spark.sparktorch.bufferBytes"
"""Spark conf: byte budget of a task's full-batch chunk and resident holdout (default 32 MiB)."""

def reshuffled(frame: Any, num_parts: int, seed: int) -> Any:
    """``frame`` with its rows dealt anew over ``num_parts`` partitions, by a seeded hash.

    A plain ``repartition(n)`` on top of ``repartition(n)`` collapses into one round-robin
    exchange that deals every row to the partition it already had. Hash partitioning on a
    seeded hash of each row's own values (``xxhash64(columns..., seed)``) moves rows between
    partitions, differently for every seed, and deterministically: a retried stage deals every
    row where the first attempt did, so no row is lost or duplicated (``rand()`` would depend on
    the order rows arrive in). Identical rows land together.
    """
    from pyspark.sql import functions as F

    key = "__sparktorch_shuffle"
    hashed = F.xxhash64(*[F.col(c) for c in frame.columns], F.lit(seed))
    return frame.withColumn(key, hashed).repartition(num_parts, key).drop(key)


def _start_server(
    native: Any,
    state: StateLayout,
    opt_name: str,
    hyper: Any,
    secret: bytes,
    bind: str,
    plan: FitPlan,
    num_parts: int,
    est: Any,
    tls: bool = False,
) -> Any:
    """Start the fit's parameter server (raises ``OSError`` when the address cannot be bound)."""
    return native.ParameterServer(
        state.flatten(),
        state.shapes(),
        opt_name,
        hyper,
        secret=secret,
        mode=plan.engine_mode,
        host=bind,
        port=plan.port,
        num_workers=num_parts,
        round_timeout_s=est.getRoundTimeout(),
        lost_worker_policy=est.getLostWorkerPolicy(),
        early_stop_patience=plan.patience if plan.patience > 0 else -1,
        io_timeout_s=est.getIoTimeout(),
        checkpoint_path=plan.checkpoint_path,
        checkpoint_interval=plan.checkpoint_interval,
        resume_from=plan.resume_from,
        model_buffers=state.num_buffers,
        tls=tls,
        max_staleness=plan.max_staleness,
    )


def _start_shards(
    spark: Any, state: StateLayout, opt_name: str, hyper: Any, secret: bytes, bind: str, connect: str, plan: FitPlan, num_parts: int, est: Any
) -> ShardedServer:
    """Start the fit's ``psShards`` shards on executors and wait for them to register (the
    registry listens on the driver's address, on ``port`` when set)."""
    try:
        server = ShardedServer(spark, state, opt_name, dict(hyper), secret, bind, connect, plan.port, plan, num_parts, est, plan.ps_shards)
    except OSError as e:
        raise ParamError(
            f"port={plan.port}: the shard registry cannot listen on {bind}:{plan.port} ({e}); choose a free port, or 0 to let the OS choose"
        ) from e
    for a in server.addresses:
        log.info(
            "parameter server shard %d (%s, %s) at %s:%d holds [%d, %d) for %d workers",
            a.index, plan.engine_mode, "TLS" if a.tls_fingerprint else "plaintext", a.host, a.port, a.lo, a.hi, num_parts,
        )
    return server


def fit(est: Any, dataset: Any) -> Any:
    """Train ``est`` on ``dataset``; see the module docstring for the order of events."""
    import numpy as np
    import torch

    from . import _mlflow
    from ._data import training_frame
    from ._optim import resolve_optimizer
    from .model import SparkTorchModel
    from .util import load_torch_obj

    plan = validate(est)
    fs = session_of(dataset.sparkSession)
    placement = resolve_placement(est.getPsPlacement(), fs)
    obj = load_torch_obj(est.getTorchObj())
    opt_name, hyper = resolve_optimizer(obj.optimizer, obj.optimizer_params)
    if plan.device.startswith("cuda") and not torch.cuda.is_available() and fs.is_local:
        raise ParamError(f"device={plan.device!r}: CUDA is not available on this machine (torch.cuda.is_available() is False)")

    frame, info = training_frame(dataset, est.getInputCol(), est.getLabelCol())
    model = obj.model
    _dry_run(model, obj.criterion, info.feature_dim, info.label_kind, est.getInputCol())
    state = StateLayout.of(model)
    if placement == "tasks":
        check_colocated_plan(plan, est)
        if fs.is_connect:
            from ._session import check_executors

            check_executors(fs)

    preloading = fs.use_preloading_daemon()
    if plan.partitions > 0:
        frame = frame.repartition(plan.partitions)
    num_parts = plan.partitions if plan.partitions > 0 else fs.num_partitions(frame)
    if num_parts == 0:
        raise DataError("the DataFrame has zero rows (and no partitions): nothing to train on")
    slots = fs.slots()
    if placement == "tasks":
        check_colocated_slots(plan.ps_shards, num_parts, slots, state.num_trainable + state.num_buffers)
    else:
        assert slots is not None  # a classic session always knows
        if plan.ps_shards > 1:
            check_shard_slots(plan.ps_shards, num_parts, slots, state.num_trainable + state.num_buffers)
        needs_all = est.getUseBarrier() or plan.engine_mode == "synchronous"
        if needs_all and num_parts > slots:
            why = "useBarrier=True" if est.getUseBarrier() else "mode='synchronous'"
            raise ParamError(
                f"partitions: {num_parts} partitions but the cluster runs only {slots} tasks at once; "
                f"{why} needs every partition's task running together. Set partitions<={slots} "
                "(or coalesce the DataFrame)"
            )

    check_result_size(
        fs, placement, plan.ps_shards, state_bytes(opt_name, dict(hyper), state.num_trainable, state.num_buffers),
        largest_shard_bytes(opt_name, dict(hyper), state.num_trainable, state.num_buffers, plan.ps_shards)
        if plan.ps_shards <= state.num_trainable + state.num_buffers else None,
    )

    tracker = _mlflow.start(
        est.getMlflowLogging(),
        est,
        {
            "optimizer": opt_name,
            **{f"optimizer.{k}": v for k, v in hyper.items()},
            "workers": num_parts,
            "engine_mode": plan.engine_mode,
            "model_class": type(model).__name__,
            "num_params": sum(p.numel() for p in model.parameters()),
        },
    )

    scale = buffer_change_scale(plan.engine_mode, num_parts, buffer_momentum(model)) if state.num_buffers else 1.0
    if placement == "tasks":
        from ._colocated import fit_colocated

        outcome = fit_colocated(fs, est, plan, frame, info.label_kind, state, opt_name, hyper, num_parts, scale)
        results, final, raw_history, opt_state, final_stats = (
            outcome.results, outcome.params, outcome.history, outcome.optimizer_state, outcome.stats,
        )
    else:
        if preloading:
            prestart_python_workers(fs.spark)
        results, final, raw_history, opt_state, final_stats = _fit_driver_hosted(
            fs, est, plan, frame, info.label_kind, state, opt_name, hyper, num_parts, scale
        )

    history = TrainingHistory.from_entries(raw_history)  # by column: 28 bytes a record
    state.load(np.asarray(final))
    log.info("fit done: %d steps over %d workers", len(history), num_parts)
    out = SparkTorchModel._from_module(
        model,
        model_spec=obj.model_spec,
        inputCol=est.getInputCol(),
        predictionCol=est.getPredictionCol(),
        useVectorOut=est.getUseVectorOut(),
        device=plan.device,
        history=history,
    )
    out._optimizer_state = opt_state  # type: ignore[attr-defined]
    out._fit_stats = final_stats  # type: ignore[attr-defined]
    if tracker is not None:
        tracker.log_end(raw_history, final_stats, model, info.feature_dim)
    return out


PLACEMENTS = ("auto", "driver", "tasks")


def resolve_placement(setting: str, fs: FitSession) -> str:
    """Where the parameter server(s) run: ``'driver'`` (the calling process, or shards as their
    own job: ``psShards``) or ``'tasks'`` (inside the training stage; see :mod:`._colocated`).
    ``'auto'``: the driver on a classic session, the tasks on Spark Connect (where executors
    may not reach the client)."""
    if setting not in PLACEMENTS:
        raise ParamError(f"psPlacement={setting!r}: expected one of {', '.join(PLACEMENTS)}")
    if setting == "auto":
        return "tasks" if fs.is_connect else "driver"
    if setting == "driver" and fs.is_connect:
        raise ParamError(
            "psPlacement='driver': on a Spark Connect session the client is not the driver and executors may not "
            "reach it; use psPlacement='auto' or 'tasks' (the servers then run inside the training stage)"
        )
    return setting


def check_colocated_plan(plan: FitPlan, est: Any) -> None:
    """What servers inside the training stage cannot do, refused before any job."""
    if plan.ps_shards > 1 and plan.checkpoint_path:
        raise ParamError(
            f"psShards={plan.ps_shards} with checkpointPath: sharded checkpoints need the driver's manifest keeper, "
            "which servers inside the training stage (Spark Connect, psPlacement='tasks') do not have yet; "
            "use psShards=1 to checkpoint, or drop checkpointPath"
        )
    if est.isSet("port") and est.getPort() != 0:
        log.warning("port=%d is ignored: the parameter servers run inside the training stage and pick free ports", est.getPort())
    if est.isSet("useBarrier") and not est.getUseBarrier():
        log.info("useBarrier=False is ignored: servers inside the training stage need a barrier stage")


def check_colocated_slots(k: int, num_parts: int, slots: int | None, num_values: int) -> None:
    """A barrier stage of ``num_parts`` tasks, the first ``k`` of them hosting a shard."""
    if k > num_values:
        raise ParamError(f"psShards={k}: the model has only {num_values} values to split over the shards")
    if k > num_parts:
        raise ParamError(
            f"psShards={k}: the shards run inside the training stage, one in each of its first {k} tasks, but it has "
            f"only {num_parts} partitions; set partitions>={k} or lower psShards"
        )
    if slots is None:
        log.warning(
            "the session does not say how many task slots the cluster has: the barrier training stage needs %d at once "
            "(Spark fails it when they are not there)", num_parts,
        )
        return
    if num_parts > slots:
        raise ClusterError(
            f"partitions: {num_parts} partitions but the cluster runs only {slots} tasks at once, and the training "
            f"stage (a barrier stage: its tasks host the parameter servers) needs every one running together. Set "
            f"partitions<={slots} (or coalesce the DataFrame), or add executor cores"
        )


_STATE_SLOTS: dict[str, tuple[int, tuple[tuple[str, Any], ...]]] = {
    # optimizer -> (per-value state buffers, (hyperparameter, value that adds one more) ...)
    "SGD": (0, (("momentum", "nonzero"),)),
    "Adam": (2, (("amsgrad", True),)),
    "AdamW": (2, (("amsgrad", True),)),
    "Adamax": (2, ()),
    "NAdam": (2, ()),
    "RAdam": (2, ()),
    "Adagrad": (1, ()),
    "RMSprop": (1, (("momentum", "nonzero"), ("centered", True))),
    "Adadelta": (2, ()),
}


def state_bytes(opt_name: str, hyper: dict[str, Any], num_trainable: int, num_buffers: int) -> int:
    """Bytes of a fit's whole float32 state: the values (trainable + model buffers) and the
    optimizer's per-value state buffers (Adam: two; an unknown optimizer counts three)."""
    base, extra = _STATE_SLOTS.get(opt_name, (3, ()))
    slots = base + sum(1 for key, when in extra if (bool(hyper.get(key)) if when == "nonzero" else hyper.get(key) is when))
    return 4 * (num_trainable + num_buffers) + 4 * slots * num_trainable


def parse_spark_bytes(text: str) -> int:
    """A Spark size string (``1g``, ``512m``, ``1024k``, ``2048``: bytes by default) in bytes."""
    value = text.strip().lower()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    for suffix in ("kb", "mb", "gb", "tb", "pb"):
        if value.endswith(suffix):
            value = value[:-1]
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(float(value.rstrip("b") or 0))


def largest_shard_bytes(opt_name: str, hyper: dict[str, Any], num_trainable: int, num_buffers: int, k: int) -> int:
    """Bytes of the largest shard's state: the ranges have (almost) equal lengths, but only
    their trainable part carries optimizer state (the buffer tail ends the last ranges)."""
    from ._shards import split_ranges

    return max(state_bytes(opt_name, hyper, r.trainable, r.buffers) for r in split_ranges(num_trainable, num_buffers, k))


def check_result_size(fs: FitSession, placement: str, k: int, total_bytes: int, shard_bytes: int | None = None) -> None:
    """Where the final state comes back as a Spark job's result, check the largest such result
    against ``spark.driver.maxResultSize`` before any job starts (past it Spark aborts the job
    only after training has finished): the whole state from the servers inside the training
    stage (one job), or one shard's range from each shard's own job."""
    if placement != "tasks" and k <= 1:
        return  # one server in this process: the state never leaves it
    if placement != "tasks":
        total_bytes = shard_bytes if shard_bytes is not None else -(-total_bytes // k)

    raw = fs.conf("spark.driver.maxResultSize", "1g") or "1g"
    try:
        limit = parse_spark_bytes(raw)
    except ValueError:
        return
    need = int(total_bytes * 1.05) + (1 << 20)  # the rows' framing and pickling, with room
    if placement == "tasks":
        need += 32 << 20  # shard 0 also returns the history: up to 2^20 entries of 32 bytes
    if limit > 0 and need > limit:
        what = (
            f"the fit's final state ({total_bytes / 2**20:,.0f} MiB: values and optimizer state, and up to 32 MiB of training "
            "history) comes back from the servers inside the training stage as one Spark job's result"
            if placement == "tasks"
            else f"each of the {k} parameter server shards returns its final state ({total_bytes / 2**20:,.0f} MiB: its "
            "range's values and optimizer state) as its own Spark job's result"
        )
        more = "" if placement == "tasks" else ", or raise psShards"
        raise ClusterError(
            f"{what}, over spark.driver.maxResultSize={raw}; set spark.driver.maxResultSize to at least "
            f"{need / 2**20:,.0f}m (or 0: no limit) when the session starts{more}, or use an optimizer with less state"
        )


def _fit_driver_hosted(
    fs: FitSession, est: Any, plan: FitPlan, frame: Any, label_kind: str, state: StateLayout, opt_name: str, hyper: Any,
    num_parts: int, scale: float,
) -> tuple[list[Any], Any, list[Any], dict[str, Any], dict[str, Any]]:
    """Train with the server(s) started here (one in this process, or ``psShards`` as a job of
    their own); returns (task results, final flat values, history, optimizer state, stats)."""
    from . import _native

    assert isinstance(fs, ClassicSession)
    sc = fs.sc
    secret = os.urandom(32)
    bind, connect = server_host(sc)
    tls = use_tls(est.getPsEncryption(), sc.getConf(), bind)
    if plan.ps_shards > 1:
        server: Any = _start_shards(fs.spark, state, opt_name, hyper, secret, bind, connect, plan, num_parts, est)
    else:
        try:
            server = _start_server(_native, state, opt_name, hyper, secret, bind, plan, num_parts, est, tls=tls)
        except SparkTorchError:
            raise  # e.g. a CheckpointError (also an OSError) when resuming
        except OSError as e:
            raise ParamError(
                f"port={plan.port}: the parameter server cannot listen on {bind}:{plan.port} ({e}); "
                "choose a free port, or 0 to let the OS choose"
            ) from e
        host, port = server.address
        log.info("parameter server (%s, %s) listening on %s:%d for %d workers", plan.engine_mode, "TLS" if tls else "plaintext", host, port, num_parts)
    total, unit = progress_total(plan, num_parts)  # synchronous: rounds, else pushes; None with epochs: known to the tasks
    try:
        with Progress(server, total, plan.verbose, num_parts, session=fs, barrier=est.getUseBarrier(), unit=unit) as progress:
            results = _run_jobs(
                est, plan, frame, label_kind, server, connect, secret, num_parts, progress=progress, buffer_scale=scale, fs=fs
            )
        if sum(r["rows"] for r in results) == 0:
            raise DataError("the DataFrame has zero rows: nothing to train on")
        _warn_clamped_batches(plan, results)
        err = server.stats().get("error")
        if err:
            raise EngineError(f"training failed: {err}")
        final = server.parameters()
        raw_history = server.history()
        opt_state = server.optimizer_state()
        final_stats = server.stats()
    finally:
        _stop_server(server)
    return results, final, raw_history, opt_state, final_stats


def _warn_clamped_batches(plan: FitPlan, results: list[Any]) -> None:
    """Say on the driver when ``miniBatch`` exceeded a partition (its tasks used all its rows)."""
    if plan.mini_batch <= 0:
        return
    small = sorted({(int(r["partition"]), int(r["batch"])) for r in results if 0 < r["batch"] < plan.mini_batch})
    if small:
        shown = ", ".join(f"{p} ({n} rows)" for p, n in small[:5]) + (" ..." if len(small) > 5 else "")
        log.warning(
            "miniBatch=%d is larger than %d partition(s) after the validation split: %s; their steps used every row",
            plan.mini_batch, len(small), shown,
        )
