"""One seam between a fit and Spark: what a fit needs from the session, classic or Connect.

A fit needs a handful of things from Spark: run a tagged job and cancel it, count the task slots,
read a conf, ship a file to the tasks, count a DataFrame's partitions, and (for the progress
display) know whether the training stage has started. On a classic session these come from the
``SparkContext`` (py4j, the status tracker); on a Spark Connect session there is no
``SparkContext``, no ``_jvm``, no RDD and no broadcast, and the process that calls ``fit`` may sit
outside the cluster. :func:`session_of` picks the implementation once, from the DataFrame's
session; nothing else in the package looks at ``sparkContext`` for a fit.

================== ======================================= ==========================================
need               classic (:class:`ClassicSession`)       Connect (:class:`ConnectSession`)
================== ======================================= ==========================================
tag a job          ``sc.addJobTag`` + job description      ``spark.addTag``
cancel it          ``sc.cancelJobsWithTag``                ``spark.interruptTag``
task slots         ``spark.master`` / defaultParallelism   ``spark.master`` / executor confs / None
partitions         ``df.rdd.getNumPartitions()``           a one-row-per-task job (no data read)
ship a file        ``sc.addFile``                          ``spark.addArtifacts(file=True)``
stage started      the status tracker                      Connect's progress handler (Spark >= 4.0)
================== ======================================= ==========================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("sparktorch")

FIT_TAG_PREFIX = "sparktorch-fit-"

__all__ = ["FitSession", "ClassicSession", "ConnectSession", "session_of", "is_connect", "slots_from_master"]


def is_connect(spark: Any) -> bool:
    """Whether ``spark`` is a Spark Connect session (``SparkSession.builder.remote(...)``)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def slots_from_master(master: str | None, task_cpus: int) -> int | None:
    """Task slots of a ``local[N]`` / ``local[*]`` / ``local-cluster[N,C,MB]`` master; None for
    any other master (a cluster manager: ask the cluster)."""
    if not master:
        return None
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master)
    if m:
        n = m.group(1)
        cores = 1 if n is None else (os.cpu_count() or 1) if n == "*" else int(n)
        return max(1, cores // task_cpus)
    m = re.fullmatch(r"local-cluster\[(\d+),\s*(\d+),\s*\d+\]", master)
    if m:
        return max(1, int(m.group(1)) * int(m.group(2)) // task_cpus)
    return None


def _one_row(batches: Iterator[Any]) -> Iterator[Any]:
    """Task body of :meth:`ConnectSession.num_partitions`: one row per task, data unread."""
    import pyarrow as pa

    yield pa.RecordBatch.from_pydict({"n": pa.array([1], pa.int32())})


class FitSession:
    """What a fit needs from Spark (see the module docstring). Chosen once by :func:`session_of`."""

    is_connect = False

    def __init__(self, spark: Any) -> None:
        self.spark = spark

    # ---------------------------------------------------------------- confs

    def conf(self, key: str, default: str | None = None) -> str | None:
        """A Spark or SQL conf as the session sees it, or ``default``."""
        try:
            value = self.spark.conf.get(key, default)
        except Exception:  # noqa: BLE001 - a conf the session cannot read: as unset
            return default
        return default if value is None else str(value)

    def flag(self, key: str) -> bool:
        """A boolean conf (unset: False)."""
        return str(self.conf(key, "false")).strip().lower() == "true"

    @property
    def master(self) -> str | None:
        """``spark.master`` (None when the session does not say)."""
        return self.conf("spark.master")

    @property
    def is_local(self) -> bool:
        """Every task runs in this machine's one Spark JVM (``local``/``local[N]``)."""
        m = self.master or ""
        return m.startswith("local") and not m.startswith("local-cluster")

    @property
    def task_cpus(self) -> int:
        """``spark.task.cpus``."""
        try:
            return max(1, int(self.conf("spark.task.cpus", "1") or "1"))
        except ValueError:
            return 1

    def rpc_encrypted(self) -> bool:
        """Whether Spark's own RPC is encrypted (what protects task closures and barrier messages)."""
        return any(self.flag(k) for k in ("spark.network.crypto.enabled", "spark.ssl.rpc.enabled", "spark.ssl.enabled"))

    def slots(self) -> int | None:
        """How many tasks the cluster runs at once; None when the session cannot tell."""
        return slots_from_master(self.master, self.task_cpus)

    # ---------------------------------------------------------------- jobs

    def num_partitions(self, frame: Any) -> int:
        """The number of partitions (tasks) of ``frame``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def tagged(self, description: str) -> Iterator[str]:
        """Tag the jobs this thread starts meanwhile with a fresh ``sparktorch-fit-*`` tag."""
        raise NotImplementedError
        yield ""  # pragma: no cover

    def cancel(self, tag: str) -> None:
        """Cancel every job tagged ``tag`` (running tasks are killed)."""
        raise NotImplementedError

    def ship_file(self, path: str) -> str:
        """Make the local file ``path`` readable by tasks as ``SparkFiles.get(name)``; returns
        the name. The caller may delete ``path`` once the fit's jobs have ended."""
        raise NotImplementedError

    def ship_new_file(self, directory: str, name: str, write: Any) -> str:
        """Write ``directory/name`` with ``write(path)``, then :meth:`ship_file` it."""
        path = os.path.join(directory, name)
        write(path)
        return self.ship_file(path)

    def training_stage_started(self, tag: str, barrier: bool) -> bool | None:
        """Whether a task of the training stage of the job tagged ``tag`` has started (None:
        this session cannot tell)."""
        return None

    def use_preloading_daemon(self) -> bool:
        """Whether Python workers fork from :mod:`sparktorch._daemon` (see ``_driver``)."""
        return False

    @property
    def metadata_context(self) -> Any:
        """What ``DefaultParamsWriter``/``Reader`` take: a SparkContext (PySpark 3.5 needs it)
        or the session (PySpark 4 on Connect)."""
        return self.spark


class ClassicSession(FitSession):
    """A classic session: the SparkContext through py4j."""

    def __init__(self, spark: Any) -> None:
        super().__init__(spark)
        self.sc = spark.sparkContext

    @property
    def master(self) -> str | None:
        return str(self.sc.master)

    def conf(self, key: str, default: str | None = None) -> str | None:
        value = self.sc.getConf().get(key, None)
        return super().conf(key, default) if value is None else str(value)

    def slots(self) -> int | None:
        known = slots_from_master(self.master, self.task_cpus)
        return known if known is not None else max(1, self.sc.defaultParallelism // self.task_cpus)

    def num_partitions(self, frame: Any) -> int:
        return int(frame.rdd.getNumPartitions())

    @contextlib.contextmanager
    def tagged(self, description: str) -> Iterator[str]:
        tag = f"{FIT_TAG_PREFIX}{uuid.uuid4().hex[:12]}"
        previous = self.sc.getLocalProperty("spark.job.description")
        self.sc.addJobTag(tag)
        self.sc.setLocalProperty("spark.job.description", description)
        try:
            yield tag
        finally:
            self.sc.removeJobTag(tag)
            self.sc.setLocalProperty("spark.job.description", previous)  # None removes it

    def cancel(self, tag: str) -> None:
        self.sc.cancelJobsWithTag(tag)

    def ship_file(self, path: str) -> str:
        self.sc.addFile(path)
        return os.path.basename(path)

    def training_stage_started(self, tag: str, barrier: bool) -> bool | None:
        try:
            tracker = self.sc._jsc.sc().statusTracker()
            job_ids = list(tracker.getJobIdsForTag(tag))
            if not job_ids:
                return False
            status = self.sc.statusTracker()
            for job_id in job_ids:
                info = status.getJobInfo(job_id)
                if info is None or not info.stageIds:
                    continue
                stages = sorted(info.stageIds)
                # The training stage is the job's last stage, or the one before it when a
                # barrier fit ends the training stage with a shuffle (see _driver._run_jobs).
                stage_id = stages[-2] if barrier and len(stages) >= 2 else stages[-1]
                st = status.getStageInfo(stage_id)
                if st is not None and (st.numActiveTasks + st.numCompletedTasks + st.numFailedTasks) > 0:
                    return True
            return False
        except Exception as e:  # noqa: BLE001 - the status tracker is an aid, not a need
            log.debug("status tracker unavailable: %s", e)
            return None

    def use_preloading_daemon(self) -> bool:
        from ._driver import use_preloading_daemon

        return use_preloading_daemon(self.sc)

    @property
    def metadata_context(self) -> Any:
        return self.sc


class ConnectSession(FitSession):
    """A Spark Connect session: only what the Connect protocol offers (no JVM handle)."""

    is_connect = True

    def __init__(self, spark: Any) -> None:
        super().__init__(spark)
        self._inflight = 0
        self._lock = threading.Lock()
        self._handler: Any = None

    def slots(self) -> int | None:
        known = super().slots()
        if known is not None:
            return known
        # A cluster manager: executors x cores when the session's conf says (static allocation).
        try:
            n = int(self.conf("spark.executor.instances", "0") or "0")
            cores = int(self.conf("spark.executor.cores", "0") or "0")
        except ValueError:
            return None
        if n > 0 and cores > 0 and not self.flag("spark.dynamicAllocation.enabled"):
            return max(1, n * cores // self.task_cpus)
        return None

    def num_partitions(self, frame: Any) -> int:
        """A job of one task per partition that returns one row without reading its data."""
        with self.tagged("sparktorch: count the training DataFrame's partitions"):
            return int(frame.mapInArrow(_one_row, "n int").count())

    @contextlib.contextmanager
    def tagged(self, description: str) -> Iterator[str]:
        tag = f"{FIT_TAG_PREFIX}{uuid.uuid4().hex[:12]}"
        self.spark.addTag(tag)
        try:
            yield tag
        finally:
            self.spark.removeTag(tag)

    def cancel(self, tag: str) -> None:
        self.spark.interruptTag(tag)

    def ship_file(self, path: str) -> str:
        self.spark.addArtifacts(path, file=True)
        return os.path.basename(path)

    # ---------------------------------------------------------------- progress

    def watch_progress(self) -> None:
        """Follow Spark's own progress (Connect's progress handler, Spark >= 4.0): the number
        of tasks in flight, which :meth:`training_stage_started` reads."""
        if self._handler is not None or not hasattr(self.spark, "registerProgressHandler"):
            return

        def handler(stages: Any, inflight_tasks: int, operation_id: Any, done: bool) -> None:
            with self._lock:
                self._inflight = 0 if done else int(inflight_tasks)

        try:
            self.spark.registerProgressHandler(handler)
            self._handler = handler
        except Exception as e:  # noqa: BLE001 - an aid, not a need
            log.debug("no Connect progress handler: %s", e)

    def unwatch_progress(self) -> None:
        if self._handler is None:
            return
        try:
            self.spark.removeProgressHandler(self._handler)
        except Exception as e:  # noqa: BLE001
            log.debug("removing the Connect progress handler: %s", e)
        self._handler = None

    @property
    def inflight_tasks(self) -> int:
        """Tasks Spark reports running for this session's current operation."""
        with self._lock:
            return self._inflight

    def training_stage_started(self, tag: str, barrier: bool) -> bool | None:
        if self._handler is None:
            return None
        return self.inflight_tasks > 0


def session_of(spark: Any) -> FitSession:
    """The seam for ``spark`` (a DataFrame's ``sparkSession``)."""
    return ConnectSession(spark) if is_connect(spark) else ClassicSession(spark)


# A probe with no import of sparktorch in its own pickle: it is compiled outside any importable
# module, so cloudpickle ships it by value, and an executor without sparktorch can still run it
# and say so (a function of this module would fail to unpickle there, with a less useful error).
_PROBE_SOURCE = '''
def probe(batches):
    import json, sys
    import pyarrow as pa
    for _ in batches:
        pass
    info = {"python": "%d.%d" % sys.version_info[:2]}
    try:
        import torch
        import sparktorch
        from sparktorch import _native
        info.update(engine=_native.__version__, protocol=_native.PROTOCOL_VERSION, torch=torch.__version__)
    except BaseException as e:
        info["error"] = "%s: %s" % (type(e).__name__, e)
    yield pa.RecordBatch.from_pydict({"info": [json.dumps(info)]})
'''

_CHECKED: set[int] = set()
"""Sessions (by ``id``) whose executors :func:`check_executors` has found fit."""


def _probe_fn() -> Any:
    namespace: dict[str, Any] = {"__name__": "sparktorch_executor_probe"}
    exec(compile(_PROBE_SOURCE, "<sparktorch executor probe>", "exec"), namespace)  # noqa: S102 - our own constant source
    return namespace["probe"]


def check_executors(fs: FitSession) -> None:
    """Before a Connect fit's first job: one small task checks that executors import
    sparktorch, with the client's engine and wire protocol, and run the client's Python
    (``ClusterError`` naming what differs). Once per session."""
    import json
    import sys

    from . import _native
    from .errors import ClusterError

    key = id(fs.spark)
    if key in _CHECKED:
        return
    try:
        with fs.tagged("sparktorch: check the executors' Python packages"):
            rows = fs.spark.range(1, numPartitions=1).mapInArrow(_probe_fn(), "info string").collect()
    except Exception as e:  # noqa: BLE001 - turned into a clear error below
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("File ", "at ", "^"))]
        detail = next((ln for ln in reversed(lines) if "Error" in ln or "MISMATCH" in ln), lines[0] if lines else type(e).__name__)
        if "PYTHON_VERSION_MISMATCH" in text or "different version" in text:
            hint = "the executors run another Python than this client: use the same minor version"
        elif "ModuleNotFoundError" in text:
            hint = "the executors' Python lacks a package sparktorch needs (PySpark's own Arrow path included): install sparktorch and its dependencies there"
        else:
            hint = "see the cause"
        raise ClusterError(f"the executors could not run a Python task; {hint} ({detail[:300]})") from e
    info = json.loads(rows[0]["info"])
    mine = "%d.%d" % sys.version_info[:2]
    if "error" in info:
        raise ClusterError(
            f"the executors cannot import sparktorch ({info['error']}): install the same sparktorch on every executor "
            "(see docs/architecture.md, 'Spark Connect')"
        )
    if info["python"] != mine:
        raise ClusterError(f"the executors run Python {info['python']}, this client {mine}: use the same Python minor version")
    if info["protocol"] != _native.PROTOCOL_VERSION or info["engine"] != _native.__version__:
        raise ClusterError(
            f"the executors run sparktorch engine {info['engine']} (protocol {info['protocol']}), this client "
            f"{_native.__version__} (protocol {_native.PROTOCOL_VERSION}): install the same sparktorch version on both"
        )
    _CHECKED.add(key)
