"""The shard registry (``psShards``) under a connection flood: a cap on pending handshakes, a
small pre-authentication header bound and a handshake deadline keep it working."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from nets import SlowTwoLayer
from toy_data import blobs
from toy_data import vector_frame as frame
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch._shards import (
    MAX_PREAUTH_HEADER,
    REGISTRY_MAX_PENDING,
    _canonical,
    _mac,
    _recv,
    _send,
    live_shards,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("spark")]


def _handshake_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "sparktorch-shard-handshake")


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading past what it sent), None if it did not."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except (socket.timeout, TimeoutError):
        return None
    except OSError:
        pass
    return time.monotonic() - start


def test_a_thousand_registry_connections_leave_the_fit_working(spark):
    x, y = blobs(80, seed=12)
    df = frame(spark, x, y, 2)
    torch.manual_seed(0)
    obj = serialize_torch_obj(SlowTwoLayer(5, 8, 3, delay_s=0.1), nn.CrossEntropyLoss(), torch.optim.Adam, lr=0.05)
    report: dict = {"connect_errors": 0, "peak": 0}

    def flood() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not live_shards():
            time.sleep(0.05)
        host, port = live_shards()[0]["registry"]
        fit = live_shards()[0]["fit"]
        silent = socket.create_connection((host, port), timeout=10)  # connects, never speaks
        silent_since = time.monotonic()
        # a peer announcing a header over the pre-auth bound is dropped before it sends it
        big = socket.create_connection((host, port), timeout=10)
        _recv(big, 0)
        big.sendall(struct.pack(">I", MAX_PREAUTH_HEADER + 1))
        report["big_closed_s"] = _closed_within(big, 8.0)
        big.close()
        # 1,000 connections: silent, garbage, and a valid length with no body
        start = time.monotonic()
        held = []
        for i in range(1000):
            try:
                s = socket.create_connection((host, port), timeout=5)
            except OSError:
                report["connect_errors"] += 1
                continue
            try:
                if i % 3 == 1:
                    s.sendall(b"\xff" * 64)
                elif i % 3 == 2:
                    s.sendall(struct.pack(">I", 100))
            except OSError:
                pass
            held.append(s)
            report["peak"] = max(report["peak"], _handshake_threads())
        report["held"] = len(held)
        report["flood_s"] = time.monotonic() - start
        for s in held:
            s.close()
        time.sleep(0.2)
        # still answering: a forged registration is refused on its MAC
        with socket.create_connection((host, port), timeout=10) as s:
            s.settimeout(10)
            nonce = bytes.fromhex(_recv(s, 0)[0]["nonce"])
            fields = {"fit": fit, "shard": 1, "attempt": 0, "host": "127.0.0.1", "port": 9,
                      "fingerprint": None, "pid": 1, "nonce": "00" * 32}
            _send(s, {**fields, "mac": _mac(b"not-the-secret-0123456789", b"shard-register", nonce, _canonical(fields))})
            report["answer"] = _recv(s, 0)[0]
        # the silent one is dropped at the handshake deadline
        closed = _closed_within(silent, 25.0)
        report["silent_closed_s"] = None if closed is None else time.monotonic() - silent_since
        silent.close()

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=100, partitions=2, psShards=2,
        mode="synchronous", lostWorkerPolicy="fail",
    ).fit(df)
    t.join(60)
    assert not t.is_alive()
    assert report["answer"] == {"ok": False, "error": "authentication failed"}, report
    assert report["peak"] <= REGISTRY_MAX_PENDING, report  # not a thread per connection
    assert report["big_closed_s"] is not None and report["big_closed_s"] < 2.0, report
    assert report["silent_closed_s"] is not None and report["silent_closed_s"] < 20.0, report  # the deadline
    history = fitted.getTrainingHistory()
    assert len(history) == 200  # every push of both workers, as without the flood
    losses = [h["loss"] for h in history]
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < np.mean(losses[:10])


def test_a_flood_before_the_shards_register_does_not_keep_them_out(spark, monkeypatch):
    """The flood starts before the shard jobs do: more than REGISTRY_MAX_PENDING silent
    connections are held, each one the registry closes is renewed at once, until both shards
    have registered. The oldest unauthenticated handshake is evicted for a new connection, and a
    shard whose try is dropped tries again: the fit completes."""
    from sparktorch import _shards

    x, y = blobs(60, seed=3)
    df = frame(spark, x, y, 2)
    torch.manual_seed(0)
    obj = serialize_torch_obj(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), nn.CrossEntropyLoss(),
                              torch.optim.Adam, lr=0.05)
    report: dict = {"renewed": 0, "renewed_after_start": 0, "held_at_start": 0, "peak": 0}
    stop = threading.Event()
    full = threading.Event()
    jobs_started = threading.Event()
    original = _shards.ShardedServer._run_job

    def flood(host: str, port: int) -> None:
        import select

        want = REGISTRY_MAX_PENDING + 32
        held: list[socket.socket] = []
        deadline = time.monotonic() + 50
        while not stop.is_set() and time.monotonic() < deadline:
            while len(held) < want:
                try:
                    held.append(socket.create_connection((host, port), timeout=5))
                except OSError:
                    break
                report["renewed"] += 1
                if jobs_started.is_set():
                    report["renewed_after_start"] += 1
            report["peak"] = max(report["peak"], _handshake_threads())
            if report["renewed"] >= want and sum(1 for s in held if s.fileno() >= 0) >= REGISTRY_MAX_PENDING:
                full.set()
            readable, _, _ = select.select(held, [], [], 0.01)
            for s in readable:  # closed by the registry (refused, evicted or timed out): renew it
                try:
                    if s.recv(65536):
                        continue
                except OSError:
                    pass
                s.close()
                held.remove(s)
        for s in held:
            s.close()

    def run_job(self, rows, spec):
        t = threading.Thread(target=flood, args=(spec.registry_host, spec.registry_port), daemon=True)
        t.start()
        report["flood"] = t
        assert full.wait(20), "the flood did not fill the registry"
        report["held_at_start"] = REGISTRY_MAX_PENDING
        jobs_started.set()
        try:
            return original(self, rows, spec)
        finally:
            stop.set()

    def registered(port: int) -> int:
        return sum(1 for s in live_shards() if s["registry"][1] == port)

    monkeypatch.setattr(_shards.ShardedServer, "_run_job", run_job)
    # stop the flood once both shards are in (the fit itself then runs without it)
    real_wait = _shards.ShardedServer._wait_registered

    def wait_registered(self, timeout_s):
        try:
            real_wait(self, timeout_s)
            report["registered"] = registered(self._listener.getsockname()[1])
        finally:
            stop.set()

    monkeypatch.setattr(_shards.ShardedServer, "_wait_registered", wait_registered)
    start = time.monotonic()
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=15, partitions=2, psShards=2,
        mode="synchronous", lostWorkerPolicy="fail",
    ).fit(df)
    report["fit_s"] = time.monotonic() - start
    report["flood"].join(10)
    assert report["registered"] == 2, report
    assert report["renewed_after_start"] > 0, report  # the flood was on while the shards registered
    assert report["peak"] <= REGISTRY_MAX_PENDING, report
    assert len(fitted.getTrainingHistory()) == 30, report
    assert report["fit_s"] < 60, report
