"""What the progress display counts: rounds in synchronous mode (the ``iters`` the user asked
for), pushes in the asynchronous styles (every worker's step), and its lines say which.

A fake server stands in for the parameter server: no Spark, no engine. In synchronous mode the
server's ``version`` is the rounds applied (one averaged step each) and ``updates`` the pushes
accepted into rounds (``num_workers`` per round): ``iters=50`` on 4 workers is 50 rounds, 200
pushes, and the display must say ``50/50 rounds``, not ``200/200 steps``.
"""

from __future__ import annotations

import io
import logging
import time

import pytest

from sparktorch._progress import PUSHES, ROUNDS, Progress

WORKERS, ITERS = 4, 50


class _SyncServer:
    """A synchronous fit of ``ITERS`` rounds on ``WORKERS`` workers, resumed at ``start``:
    each poll closes 5 rounds (every worker pushes once per round)."""

    def __init__(self, start: int = 0) -> None:
        self.start, self.rounds = start, 0

    def stats(self) -> dict:
        stats = {"version": self.start + self.rounds, "updates": WORKERS * self.rounds, "mode": "synchronous",
                 "workers_live": WORKERS, "recent_loss": {0: 0.5}}
        self.rounds = min(ITERS, self.rounds + 5)
        return stats


class _AsyncServer:
    """An asynchronous fit: ``ITERS`` pushes per worker, 20 pushes per poll."""

    def __init__(self) -> None:
        self.pushes = 0

    def stats(self) -> dict:
        self.pushes = min(ITERS * WORKERS, self.pushes + 20)
        return {"version": self.pushes, "updates": self.pushes, "mode": "async", "workers_live": WORKERS,
                "recent_loss": {0: 0.5}}


def _lines(monkeypatch, server, total: int, unit: str, done) -> list[str]:
    """The plain lines of a display over ``server`` until ``done()``."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(Progress, "POLL_S", 0.005)
    stream = io.StringIO()
    with Progress(server, total=total, verbose=1, num_workers=WORKERS, stream=stream, unit=unit) as progress:
        deadline = time.monotonic() + 20
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    assert progress.reported[-1][1] == total, progress.reported
    return stream.getvalue().splitlines()


def test_synchronous_counts_rounds_not_pushes(monkeypatch):
    server = _SyncServer()
    lines = _lines(monkeypatch, server, ITERS, ROUNDS, lambda: server.rounds >= ITERS)
    assert lines[-1].startswith(f"sparktorch [end] {ITERS}/{ITERS} rounds"), lines
    assert all("rounds" in line for line in lines), lines
    assert not any(f"/{ITERS * WORKERS}" in line for line in lines), lines


def test_synchronous_resumed_counts_this_fits_rounds(monkeypatch):
    """A fit resumed from a checkpoint at version 120 still counts its own 50 rounds."""
    server = _SyncServer(start=120)
    progress = Progress(server, total=ITERS, verbose=0, num_workers=WORKERS, unit=ROUNDS)
    assert progress.done({"version": 0}) == 0
    lines = _lines(monkeypatch, server, ITERS, ROUNDS, lambda: server.rounds >= ITERS)
    assert lines[-1].startswith(f"sparktorch [end] {ITERS}/{ITERS} rounds"), lines
    # The first line comes before the last round: not already finished at the start.
    assert "finishing" not in lines[0], lines


def test_asynchronous_counts_pushes(monkeypatch):
    server = _AsyncServer()
    lines = _lines(monkeypatch, server, ITERS * WORKERS, PUSHES, lambda: server.pushes >= ITERS * WORKERS)
    assert lines[-1].startswith(f"sparktorch [end] {ITERS * WORKERS}/{ITERS * WORKERS} pushes"), lines


def test_phase_counts_in_the_displays_unit():
    rounds = Progress(_SyncServer(), total=ITERS, verbose=0, num_workers=WORKERS, unit=ROUNDS)
    # Every worker pushed into the first round, which has not closed yet: no round applied.
    assert rounds.phase({"version": 0, "updates": WORKERS, "workers_live": WORKERS}) == "starting 4 workers"
    assert rounds.phase({"version": ITERS, "updates": ITERS * WORKERS}) == "finishing"
    pushes = Progress(_AsyncServer(), total=ITERS * WORKERS, verbose=0, num_workers=WORKERS, unit=PUSHES)
    assert pushes.phase({"version": ITERS, "updates": ITERS}) == "training"


def test_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="unit"):
        Progress(_AsyncServer(), total=1, verbose=0, num_workers=1, unit="steps")


def test_a_fits_total_is_rounds_when_synchronous():
    from types import SimpleNamespace

    from sparktorch._progress import progress_total

    def plan(mode: str, epochs: int = 0) -> SimpleNamespace:
        return SimpleNamespace(engine_mode=mode, iters=ITERS, shuffles=2, epochs=epochs)

    assert progress_total(plan("synchronous"), WORKERS) == (2 * ITERS, ROUNDS)
    assert progress_total(plan("hogwild"), WORKERS) == (2 * ITERS * WORKERS, PUSHES)
    assert progress_total(plan("async"), WORKERS) == (2 * ITERS * WORKERS, PUSHES)
    assert progress_total(plan("synchronous", epochs=3), WORKERS) == (None, ROUNDS)
