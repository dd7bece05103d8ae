"""Checkpoints of the Rust engine through its Python binding: periodic and final writes,
``read_checkpoint``, ``resume_from`` (resume step, same parameters, same continuation),
mismatches refused, and the ``sparktorch-ps inspect`` command on a real file. Loopback only."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time

import numpy as np
import pytest
from sparktorch import _native, errors

SECRET = b"checkpoint-test-secret-01"
LAYOUT = [("fc.weight", [3, 4]), ("fc.bias", [3])]
N = 15
ADAM = {"lr": 0.01, "betas": (0.8, 0.99)}
ROOT = pathlib.Path(__file__).resolve().parents[2]


def init():
    return np.sin(np.arange(N, dtype=np.float32) * 0.37).astype(np.float32)


def grad(worker, step):
    i = np.arange(N, dtype=np.float32)
    return np.cos((i + 1) * (step + 1.3) + worker * 0.7).astype(np.float32)


def server(
    mode="async", optimizer="Adam", hyper=ADAM, layout=LAYOUT, params=None, **kw
):
    return _native.ParameterServer(
        init() if params is None else params,
        layout,
        optimizer,
        hyper,
        secret=SECRET,
        mode=mode,
        **kw,
    )


def train(ps, start, stop, workers=1):
    host, port = ps.address
    clients = [
        _native.Client(host, port, SECRET, worker=w, timeout_s=10.0)
        for w in range(workers)
    ]
    for c in clients:
        assert c.resume_step == start
    out = np.zeros(N, np.float32)
    for step in range(start, stop):
        for w, c in enumerate(clients):
            c.push(grad(w, step), batch_size=4 + w, loss=1.0 / (step + 1), step=step)
        # Every worker computes its next step on the new version (synchronous: a gradient
        # computed on an older one would be discarded; the pull waits for the round).
        for c in clients:
            c.pull(out)
    for c in clients:
        c.close()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_checkpoint_every_k_versions_and_at_stop(tmp_path):
    ckdir = tmp_path / "ckpt"
    with server(checkpoint_path=str(ckdir), checkpoint_interval=3) as ps:
        assert ckdir.is_dir()  # created at start
        train(ps, 0, 7)
        assert wait_for(lambda: (ps.stats()["last_checkpoint_version"] or 0) >= 6)
        stats = ps.stats()
        assert stats["checkpoint_errors"] == 0
        assert stats["last_checkpoint_path"] == str(ckdir / "checkpoint.safetensors")
        c = _native.read_checkpoint(str(ckdir))
        assert c["version"] in (6, 7)
    # stop() wrote the final one.
    c = _native.read_checkpoint(str(ckdir / "checkpoint.safetensors"))
    assert c["version"] == 7
    assert sorted(os.listdir(ckdir)) == ["checkpoint.safetensors"]  # no temp file left


def test_read_checkpoint_returns_everything(tmp_path):
    with server(num_workers=2, early_stop_patience=5) as ps:
        train(ps, 0, 3, workers=2)
        ps.save_checkpoint(str(tmp_path / "a.safetensors"))
        params = ps.parameters()
        state = ps.optimizer_state()
        best = ps.stats()["best_loss"]
    c = _native.read_checkpoint(str(tmp_path / "a.safetensors"))
    assert c["format"] == "sparktorch-checkpoint" and c["format_version"] == 1
    assert c["engine_version"] == _native.__version__
    assert c["mode"] == "async" and c["optimizer"] == "Adam"
    assert c["version"] == 6 and c["num_workers"] == 2
    assert c["hyperparameters"]["lr"] == 0.01
    assert tuple(c["hyperparameters"]["betas"]) == (0.8, 0.99)
    assert [(n, list(s)) for n, s in c["layout"]] == LAYOUT
    assert c["workers"] == {
        0: {"next_step": 3, "attempt": 0},
        1: {"next_step": 3, "attempt": 0},
    }
    assert c["early_stop"]["best_loss"] == best
    assert c["params"].dtype == np.float32
    np.testing.assert_array_equal(c["params"], params)
    s = c["optimizer_state"]
    assert s["name"] == "Adam" and s["step"] == state["step"] == 6
    assert set(s["buffers"]) == set(state["buffers"]) == {"exp_avg", "exp_avg_sq"}
    for k, v in state["buffers"].items():
        np.testing.assert_array_equal(s["buffers"][k], v)
    assert c["created"].endswith("Z")


@pytest.mark.parametrize(
    ("mode", "optimizer", "hyper", "workers"),
    [
        ("async", "Adam", ADAM, 1),
        ("synchronous", "SGD", {"lr": 0.1, "momentum": 0.9}, 2),
    ],
)
def test_resume_continues_exactly_like_an_uninterrupted_run(
    tmp_path, mode, optimizer, hyper, workers
):
    with server(mode, optimizer, hyper, num_workers=workers) as full:
        train(full, 0, 9, workers)
        want = full.parameters()
        want_state = full.optimizer_state()
    ckdir = tmp_path / "ck"
    with server(
        mode, optimizer, hyper, num_workers=workers, checkpoint_path=str(ckdir)
    ) as ps:
        train(ps, 0, 5, workers)
        at_five = ps.parameters()
    # The final checkpoint of stop() is the resume point.
    with server(
        mode, optimizer, hyper, num_workers=workers, resume_from=str(ckdir)
    ) as ps:
        assert ps.version() == (5 if mode == "synchronous" else 5 * workers)
        np.testing.assert_array_equal(ps.parameters(), at_five)
        host, port = ps.address
        with _native.Client(host, port, SECRET, worker=0, attempt=0) as c:
            assert c.resume_step == 5
        train(ps, 5, 9, workers)
        np.testing.assert_array_equal(ps.parameters(), want)
        got_state = ps.optimizer_state()
        assert got_state["step"] == want_state["step"]
        for k, v in want_state["buffers"].items():
            np.testing.assert_array_equal(got_state["buffers"][k], v)


def test_resume_refuses_mismatches_and_allows_another_lr(tmp_path):
    f = str(tmp_path / "m.safetensors")
    with server() as ps:
        train(ps, 0, 2)
        ps.save_checkpoint(f)
    with pytest.raises(errors.CheckpointError, match="optimizer"):
        server(optimizer="SGD", hyper={"lr": 0.1}, resume_from=f)
    with pytest.raises(errors.CheckpointError, match="mode"):
        server(mode="synchronous", resume_from=f)
    with pytest.raises(errors.CheckpointError, match="fc.weight"):
        server(layout=[("fc.weight", [4, 3]), ("fc.bias", [3])], resume_from=f)
    with pytest.raises(errors.CheckpointError, match="parameters"):
        server(layout=[("w", [4])], params=np.zeros(4, np.float32), resume_from=f)
    with server(hyper={"lr": 0.5}, resume_from=f) as ps:
        assert ps.version() == 2
        assert ps.optimizer_state()["hyperparameters"]["lr"] == 0.5


def test_corrupt_missing_and_bad_arguments(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"x" * 50)
    with pytest.raises(errors.CheckpointError, match="bad.safetensors"):
        _native.read_checkpoint(str(bad))
    with pytest.raises(errors.CheckpointError, match="bad.safetensors"):
        server(resume_from=str(bad))
    with pytest.raises(OSError, match="missing"):
        _native.read_checkpoint(str(tmp_path / "missing.safetensors"))
    # Truncations of a real file: errors, never crashes.
    good = tmp_path / "good.safetensors"
    with server() as ps:
        ps.save_checkpoint(str(good))
    data = good.read_bytes()
    for cut in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(errors.CheckpointError):
            _native.read_checkpoint(str(bad))
    with pytest.raises(errors.ParamError, match="checkpoint_interval"):
        server(checkpoint_interval=5)
    with pytest.raises(errors.ParamError, match="checkpoint_interval"):
        server(checkpoint_path=str(tmp_path), checkpoint_interval=-1)


def cli_binary():
    """target/release/sparktorch-ps, (re)built by cargo so that it is never stale (a no-op when
    it is up to date)."""
    exe = ROOT / "target" / "release" / "sparktorch-ps"
    cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    if os.path.exists(cargo):
        subprocess.run(
            [cargo, "build", "--release", "-p", "sparktorch-cli"],
            cwd=ROOT,
            check=True,
            timeout=1800,
            capture_output=True,
        )
    assert exe.exists(), f"{exe} is missing and cargo is not available to build it"
    return exe


def test_cli_inspect_reads_a_real_checkpoint(tmp_path):
    with server(num_workers=1) as ps:
        train(ps, 0, 3)
        ps.save_checkpoint(str(tmp_path))
        params = ps.parameters()
    exe = cli_binary()
    out = subprocess.run(
        [str(exe), "inspect", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "fc.weight" in out.stdout and "exp_avg_sq" in out.stdout
    assert "version         3" in out.stdout
    out = subprocess.run(
        [str(exe), "inspect", "--json", str(tmp_path / "checkpoint.safetensors")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["version"] == 3 and doc["optimizer"] == "Adam"
    assert doc["workers"] == {"0": {"next_step": 3, "attempt": 0}}
    w = params[:12].astype(np.float64)
    p0 = doc["params"][0]
    assert p0["name"] == "fc.weight" and p0["shape"] == [3, 4]
    assert p0["min"] == pytest.approx(w.min()) and p0["max"] == pytest.approx(w.max())
    assert p0["l2"] == pytest.approx(np.sqrt((w * w).sum()))
    assert [b["name"] for b in doc["optimizer_buffers"]] == ["exp_avg", "exp_avg_sq"]
