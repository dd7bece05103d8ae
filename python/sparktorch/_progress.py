"""What the driver shows while a fit runs (``verbose >= 1``).

A fit spends its first seconds before any step: Spark runs the data stage (CSV parse, the
``partitions`` shuffle), then starts one Python worker per partition, each importing torch and
reading its rows, and only then do steps arrive at the parameter server. The display names
that phase instead of sitting at 0%:

``preparing data``
    the training stage has not started any task yet (Spark's status tracker, by the fit's job tag);
``starting N workers``
    training tasks run, but fewer than N have reached the server (``workers_live``) and no step
    has been applied;
``training``
    steps are being applied (out of the fit's total, counted in the display's unit: see below);
``finishing``
    every step is applied; the job is collecting the tasks' results.
``training N workers in the cluster``
    the parameter servers run inside the training stage (Spark Connect, or
    ``psPlacement='tasks'``): the client cannot see steps while they happen, only Spark's own
    progress (tasks in flight); the closing line gives the steps applied.

What it counts (``unit``):

- ``rounds`` in synchronous mode: a round is every worker's push averaged into one step, so the
  total is the ``iters`` the user asked for (per partition shuffle), however many workers; read
  from the server's ``version`` (steps applied), counted from where the fit started (a resumed
  fit starts at its checkpoint's version);
- ``pushes`` in the asynchronous styles (hogwild, async): every worker's step is applied on its
  own, so the total is ``iters`` times the workers; read from the server's ``updates``.

Where it goes:

- an interactive stream (a TTY, or a notebook): a ``tqdm`` bar whose description is the phase;
- anything else (a log file, a pipe, a CI log): plain lines through the ``sparktorch.progress``
  logger, one per phase change (the first time each phase appears) and one per 10% of the
  steps, plus a closing line, so at most about 15 lines per fit however long it runs. When no
  logging is configured they go to ``stderr``.

While the display is on, Spark's own console progress bar (``spark.ui.showConsoleProgress``,
drawn by the JVM on the same terminal) is held back, so the two never overwrite each other; it
comes back when the fit ends (Spark resumes it itself whenever a job ends, so the display holds
it again at each poll while the fit runs). ``verbose >= 2`` also logs every applied step (worker, step, loss,
validation loss) through the ``sparktorch`` logger.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger("sparktorch")
progress_log = logging.getLogger("sparktorch.progress")

PREPARING = "preparing data"
STARTING = "starting {n} workers"
TRAINING = "training"
FINISHING = "finishing"
IN_CLUSTER = "training {n} workers in the cluster"

#: the display's unit in synchronous mode: rounds (one averaged step of every worker's push)
ROUNDS = "round"
#: the display's unit in the asynchronous styles: pushes (each worker's step, applied alone)
PUSHES = "push"
_PLURAL = {ROUNDS: "rounds", PUSHES: "pushes"}

#: plain (non-interactive) output: a line every this share of the steps
LINE_EVERY = 0.10
#: far-future ``lastFinishTime`` of Spark's ConsoleProgressBar: its refresh() draws nothing
#: until a job ends (``finishAll`` resets it to now)
_HOLD_MS = 1 << 62


def progress_total(plan: Any, num_workers: int) -> tuple[int | None, str]:
    """``(total, unit)`` of a fit's display, from its plan (``engine_mode``, ``iters``,
    ``shuffles``, ``epochs``): synchronous, ``iters`` rounds per partition shuffle; otherwise
    ``iters`` pushes per worker per shuffle. The total is None when the fit runs ``epochs``
    (only the tasks know their batches)."""
    unit = ROUNDS if plan.engine_mode == "synchronous" else PUSHES
    if plan.epochs > 0:
        return None, unit
    per_shuffle = plan.iters if unit == ROUNDS else plan.iters * num_workers
    return per_shuffle * plan.shuffles, unit


def _interactive(stream: Any) -> bool:
    """A terminal, or a Jupyter kernel (where tqdm.auto draws a widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):
        return False
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not running under IPython
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def hold_console_progress(sc: Any) -> bool:
    """Keep Spark's console progress bar from drawing until the running job ends.

    Spark draws it from a JVM timer when ``spark.ui.showConsoleProgress`` was on at start-up
    (a start-up setting: it cannot be turned off per fit). Its ``refresh`` draws nothing while
    less than its first delay has passed since ``lastFinishTime``, which ``finishAll`` (called
    by Spark when each job ends) resets to now: setting that field far in the future holds the
    bar for the job, and Spark itself lets it draw again afterwards. Returns whether it was held.
    Any failure (another Spark version, no JVM access) leaves the bar as it is.
    """
    try:
        opt = sc._jsc.sc().progressBar()
        if not opt.isDefined():
            return False
        bar = opt.get()
        bar.finishAll()  # erase a bar drawn now
        field = bar.getClass().getDeclaredField("lastFinishTime")
        field.setAccessible(True)
        field.setLong(bar, _HOLD_MS)
        return True
    except Exception as e:  # noqa: BLE001 - cosmetic: never fail a fit over it
        log.debug("could not hold Spark's console progress bar: %s", e)
        return False


def release_console_progress(sc: Any) -> None:
    """Let Spark's console progress bar draw again (as after any job)."""
    try:
        opt = sc._jsc.sc().progressBar()
        if opt.isDefined():
            opt.get().finishAll()
    except Exception as e:  # noqa: BLE001
        log.debug("could not release Spark's console progress bar: %s", e)


def _has_real_handler(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` reaches a handler other than a ``NullHandler`` (the
    package's own, which ``hasHandlers`` counts)."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


class Progress:
    """Driver-side progress of one fit; a context manager around the fit's Spark jobs.

    ``session``: the fit's :class:`~sparktorch._session.FitSession` (phases from Spark's own
    progress; None: from the server alone). ``barrier``: the training stage ends in a shuffle
    (the job's last stage is after it). ``live_steps=False``: the servers run inside the
    training stage, out of the client's reach (Spark Connect): steps are known only when the
    stage ends, so the display shows the phase, then the final count. ``unit``: :data:`ROUNDS`
    (synchronous; ``total`` is rounds) or :data:`PUSHES` (asynchronous; ``total`` is pushes).
    """

    POLL_S = 0.5

    def __init__(
        self,
        server: Any,
        total: int | None,
        verbose: int,
        num_workers: int,
        session: Any = None,
        barrier: bool = False,
        stream: Any = None,
        live_steps: bool = True,
        unit: str = PUSHES,
    ) -> None:
        if unit not in _PLURAL:
            raise ValueError(f"unit must be {ROUNDS!r} or {PUSHES!r}, got {unit!r}")
        self._unit = unit
        #: the server's version when the display started (rounds are counted from there)
        self._base = 0
        self._server = server
        self._total = max(1, total) if total is not None else None  # None: epochs (the tasks know)
        self._verbose = verbose
        self._workers = num_workers
        self._session = session
        # Spark's console bar is the JVM's: only a classic session can hold it.
        self._sc = getattr(session, "sc", None)
        self._live = live_steps
        self._barrier = barrier
        self._stream = stream
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._handler: logging.Handler | None = None
        self._level_set = False
        #: every (phase, steps done) the display reported, in order (tests read it)
        self.reported: list[tuple[str, int]] = []

    # ---------------------------------------------------------------- the fit's side

    def __enter__(self) -> "Progress":
        if self._verbose >= 1:
            if self._unit == ROUNDS:
                try:
                    self._base = int(self._server.stats().get("version", 0))
                except Exception:  # noqa: BLE001 - not up yet: count from zero
                    self._base = 0
            if self._stream is None:
                self._stream = sys.stderr
            self._interactive = _interactive(self._stream)
            if not self._interactive:
                self._route_plain_lines()
            self._thread = threading.Thread(target=self._run, name="sparktorch-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._held and self._sc is not None:
            release_console_progress(self._sc)
            self._held = False
        if self._handler is not None:
            progress_log.removeHandler(self._handler)
            self._handler = None
        if self._level_set:
            progress_log.setLevel(logging.NOTSET)
            self._level_set = False

    def job_started(self, tag: str) -> None:
        """Called by the fit before each Spark job: follow the job ``tag``; hold Spark's bar."""
        self._tag = tag
        if self._verbose >= 1 and self._sc is not None:
            self._held = hold_console_progress(self._sc) or self._held

    def _route_plain_lines(self) -> None:
        """Make sure the plain lines are seen: INFO passes the ``sparktorch.progress`` logger
        (unless the user set its level), and with no handler anywhere they go to the stream."""
        if progress_log.level == logging.NOTSET and not progress_log.isEnabledFor(logging.INFO):
            progress_log.setLevel(logging.INFO)
            self._level_set = True
        if not _has_real_handler(progress_log):
            self._handler = logging.StreamHandler(self._stream)
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            progress_log.addHandler(self._handler)

    # ---------------------------------------------------------------- phases

    def _training_stage_started(self) -> bool | None:
        """Whether a task of the training stage of the current job has started (None: unknown)."""
        if self._session is None or self._tag is None:
            return None
        return self._session.training_stage_started(self._tag, self._barrier)

    def done(self, stats: dict[str, Any]) -> int:
        """The rounds (synchronous) or pushes (asynchronous) applied so far, from the server's
        stats."""
        if self._unit == ROUNDS:
            return max(0, int(stats.get("version", 0)) - self._base)
        return int(stats.get("updates", 0))

    def phase(self, stats: dict[str, Any]) -> str:
        """The phase the fit is in, from the server's stats and Spark's status tracker."""
        done = self.done(stats)
        if self._total is not None and done >= self._total:
            return FINISHING
        if done > 0:
            return TRAINING
        started = self._training_stage_started()
        if not self._live:
            return IN_CLUSTER.format(n=self._workers) if started else PREPARING
        if int(stats.get("workers_live", 0)) > 0 or started:
            return STARTING.format(n=self._workers)
        return PREPARING

    # ---------------------------------------------------------------- the display thread

    def _run(self) -> None:
        t0 = time.monotonic()
        logged = 0
        bar = None
        if self._interactive:
            from tqdm.auto import tqdm

            bar = tqdm(total=self._total, desc=f"sparktorch [{PREPARING}]", unit=self._unit, leave=True, file=self._stream)
        seen: set[str] = set()
        next_mark = LINE_EVERY
        last_phase = ""
        try:
            while True:
                stopping = self._stop.wait(self.POLL_S)
                try:
                    st = self._server.stats()
                    # Incremental: only the entries recorded since the last poll are copied.
                    logged, history = self._server.history(since=logged) if self._verbose >= 2 else (logged, [])
                except Exception:  # noqa: BLE001 - the server is gone: the fit reports why
                    break
                for worker, step, loss, val_loss in history:
                    log.info("worker %d step %d: loss %.5f, validation loss %.5f", worker, step, loss, val_loss)
                done = self.done(st)
                if self._total is not None:
                    done = min(done, self._total)
                phase = self.phase(st)
                if self._held and not stopping:
                    # Any job that ends (another thread's, such as the one that starts the
                    # Python worker daemon beside the data stage) lets Spark's bar draw again.
                    hold_console_progress(self._sc)
                elapsed = time.monotonic() - t0
                losses = [v for v in st.get("recent_loss", {}).values() if v == v]
                loss_text = f"{sum(losses) / len(losses):.4f}" if losses else "-"
                rate = done / max(elapsed, 1e-9)
                if bar is not None:
                    if phase != last_phase:
                        bar.set_description(f"sparktorch [{phase}]", refresh=False)
                    bar.update(done - bar.n)
                    bar.set_postfix(loss=loss_text, upd_s=f"{rate:.1f}")
                else:
                    line = None
                    if phase not in seen:
                        seen.add(phase)
                        line = phase
                    if self._total is not None and done / self._total >= next_mark:
                        while done / self._total >= next_mark:
                            next_mark += LINE_EVERY
                        line = phase
                    if line is not None:
                        progress_log.info(
                            "sparktorch [%s] %d/%s %s (%s), loss %s, %.1f s",
                            line, done, self._total if self._total is not None else "?", _PLURAL[self._unit],
                            f"{100 * done // self._total}%" if self._total is not None else "epochs", loss_text, elapsed,
                        )
                if phase != last_phase or not self.reported or self.reported[-1][1] != done:
                    self.reported.append((phase, done))
                last_phase = phase
                if stopping:
                    break
        finally:
            if bar is not None:
                bar.set_description("sparktorch [end]", refresh=False)
                bar.close()
            elif last_phase:
                done = self.reported[-1][1] if self.reported else 0
                progress_log.info(
                    "sparktorch [end] %d/%s %s, %.1f s", done, self._total if self._total is not None else "?",
                    _PLURAL[self._unit], time.monotonic() - t0,
                )
