"""The Rust engine through its Python binding (``sparktorch._native``): servers, clients,
modes, errors. Loopback only, ports chosen by the OS, no Spark."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

from sparktorch import _native, errors

SECRET = b"engine-test-secret-0123"


def make_server(n=8, mode="async", num_workers=1, lr=1.0, init=0.0, **kw):
    return _native.ParameterServer(
        np.full(n, init, np.float32),
        [("w", [n])],
        "SGD",
        {"lr": lr},
        secret=SECRET,
        mode=mode,
        num_workers=num_workers,
        **kw,
    )


def client(ps, worker=0, **kw):
    host, port = ps.address
    kw.setdefault("timeout_s", 10.0)
    return _native.Client(host, port, SECRET, worker=worker, **kw)


def run_threads(fn, n):
    results, failures = {}, []

    def wrap(i):
        try:
            results[i] = fn(i)
        except BaseException as e:  # surfaced below
            failures.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if failures:
        raise failures[0]
    return results


def test_module_constants():
    assert isinstance(_native.__version__, str)
    assert _native.PROTOCOL_VERSION >= 1


def test_server_properties_and_stop_is_idempotent():
    ps = make_server(n=5, init=2.0)
    host, port = ps.address
    assert host == "127.0.0.1" and port > 0
    assert ps.running and ps.num_params == 5 and ps.version() == 0
    np.testing.assert_array_equal(ps.parameters(), np.full(5, 2.0, np.float32))
    ps.stop()
    ps.stop()
    assert not ps.running


@pytest.mark.parametrize("mode", ["async", "hogwild"])
def test_threads_push_and_pull(mode):
    n, workers, steps = 100, 3, 20
    with make_server(n=n, mode=mode, num_workers=workers) as ps:

        def work(w):
            with client(ps, worker=w) as c:
                assert c.num_params == n and c.resume_step == 0
                out = np.empty(n, np.float32)
                for step in range(steps):
                    c.pull(out)
                    c.push(np.ones(n, np.float32), batch_size=4, loss=1.0 / (step + 1), step=step)
                return c.version

        run_threads(work, workers)
        stats = ps.stats()
        assert ps.version() == workers * steps == stats["updates"]
        assert stats["mode"] == mode
        assert stats["updates_per_worker"] == {w: steps for w in range(workers)}
        assert stats["steps_per_worker"] == {w: steps for w in range(workers)}
        assert stats["workers_done"] == workers and stats["workers_live"] == 0
        assert stats["bytes_in"] > workers * steps * n * 4
        assert stats["staleness_max"] >= stats["staleness_mean"] >= 0
        assert len(ps.history()) == workers * steps
        if mode == "async":  # no lost update: SGD lr=1 on ones
            np.testing.assert_array_equal(ps.parameters(), np.full(n, -60.0, np.float32))


def test_synchronous_rounds_average_weighted_by_batch_size():
    n, workers = 50, 4
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(workers)]
    batch = [3, 1, 7, 5]
    with make_server(n=n, mode="synchronous", num_workers=workers) as ps:

        def work(w):
            c = client(ps, worker=w)
            out = np.empty(n, np.float32)
            c.pull(out)
            version, stop = c.push_pull(grads[w], out, batch_size=batch[w], loss=1.0, step=0)
            c.close()
            return version, out

        results = run_threads(work, workers)
        acc = sum(np.float64(b) * g.astype(np.float64) for b, g in zip(batch, grads))
        expected = -(acc / sum(batch)).astype(np.float32)
        for version, out in results.values():
            assert version == 1
            np.testing.assert_array_equal(out, expected)
        assert ps.version() == 1


def test_pull_newer_than_waits_for_the_round():
    with make_server(n=4, mode="synchronous", num_workers=2) as ps:
        a, b = client(ps, worker=0), client(ps, worker=1)
        out = np.zeros(4, np.float32)
        a.push(np.ones(4, np.float32), batch_size=1, loss=1.0, step=0)
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("v", a.pull(out, newer_than=0)))
        t.start()
        b.push(np.ones(4, np.float32), batch_size=1, loss=1.0, step=0)
        t.join(10)
        assert got["v"] == 1 and a.version == 1
        np.testing.assert_array_equal(out, np.full(4, -1.0, np.float32))


def test_replayed_push_is_applied_once_and_retry_resumes():
    with make_server(n=4) as ps:
        c = client(ps, worker=0, attempt=0)
        g = np.ones(4, np.float32)
        assert c.push(g, batch_size=1, loss=0.5, step=0) == (1, False)
        assert c.push(g, batch_size=1, loss=0.5, step=0) == (1, False)  # duplicate
        c.push(g, batch_size=1, loss=0.5, step=1)
        retry = client(ps, worker=0, attempt=1)
        assert retry.resume_step == 2
        stats = ps.stats()
        assert stats["updates"] == 2 and stats["duplicates"] == 1
        with pytest.raises(errors.EngineError):
            c.push(g, batch_size=1, loss=0.5, step=2)  # attempt 0 is stale now
        retry.close()


def test_history_and_recent_loss():
    with make_server(n=2) as ps:
        with client(ps) as c:
            c.push(np.zeros(2, np.float32), batch_size=1, loss=2.0, step=0)
            c.push(np.zeros(2, np.float32), batch_size=1, loss=4.0, step=1, val_loss=3.0)
        hist = ps.history()
        assert hist[0][:3] == (0, 0, 2.0) and np.isnan(hist[0][3])
        assert hist[1] == (0, 1, 4.0, 3.0)
        assert ps.stats()["recent_loss"] == {0: 3.0}
        # Incremental reads: only entries from index `since` on, and the next `since`.
        assert ps.history(since=1) == (2, [(0, 1, 4.0, 3.0)])
        assert ps.history(since=2) == (2, [])
        assert ps.stats()["history_total"] == 2


def test_global_early_stopping():
    with make_server(n=2, num_workers=1, early_stop_patience=2) as ps:
        with client(ps) as c:
            flags = [
                c.push(np.zeros(2, np.float32), batch_size=1, loss=loss, step=i)[1]
                for i, loss in enumerate([1.0, 0.5, 0.6, 0.5, 0.4])
            ]
            assert flags == [False, False, False, True, True]
            assert c.should_stop()
        stats = ps.stats()
        assert stats["should_stop"] and stats["best_loss"] == 0.4


def test_optimizer_state_roundtrip():
    with make_server(n=3) as ps:
        with client(ps) as c:
            c.push(np.ones(3, np.float32), batch_size=1, loss=1.0, step=0)
        state = ps.optimizer_state()
        assert state["name"] == "SGD" and state["step"] == 1
        assert state["hyperparameters"]["lr"] == 1.0
        state["step"] = 7
        ps.load_optimizer_state(state)
        assert ps.optimizer_state()["step"] == 7
        with pytest.raises(errors.ParamError):
            ps.load_optimizer_state({"name": "Adam"})


def test_wrong_secret_raises_authentication_error():
    with make_server() as ps:
        host, port = ps.address
        with pytest.raises(errors.AuthenticationError):
            _native.Client(host, port, b"not-the-right-secret", worker=0)
        stats = ps.stats()
        assert stats["auth_failures"] == 1 and stats["steps_per_worker"] == {}


def test_closed_port_raises_server_unavailable_within_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(errors.ServerUnavailableError, match=f"127.0.0.1:{port}"):
        _native.Client("127.0.0.1", port, SECRET, worker=0, connect_timeout_s=0.3)
    assert time.monotonic() - t0 < 3
    # Also a ConnectionError, as the errors module promises.
    with pytest.raises(ConnectionError):
        _native.Client("127.0.0.1", port, SECRET, worker=0, connect_timeout_s=0.1)


def test_pull_newer_than_times_out_and_leaves_out_alone():
    with make_server(n=3, round_timeout_s=0.2) as ps:
        c = client(ps, timeout_s=10.0)
        out = np.full(3, 9.0, np.float32)
        t0 = time.monotonic()
        with pytest.raises(errors.EngineTimeoutError):
            c.pull(out, newer_than=5)
        assert time.monotonic() - t0 < 8
        np.testing.assert_array_equal(out, np.full(3, 9.0, np.float32))
        assert c.pull(out) == 0  # the connection is still usable


def test_lost_worker_fail_policy_raises_worker_lost():
    with make_server(
        n=2, mode="synchronous", num_workers=2, round_timeout_s=0.2, lost_worker_policy="fail"
    ) as ps:
        c = client(ps, worker=0)
        out = np.zeros(2, np.float32)
        with pytest.raises(errors.WorkerLostError):
            c.push_pull(np.ones(2, np.float32), out, batch_size=1, loss=1.0, step=0)
        assert "round" in ps.stats()["error"]


def test_lost_worker_drop_policy_closes_the_round_without_it():
    with make_server(n=2, mode="synchronous", num_workers=2, round_timeout_s=0.2) as ps:
        c = client(ps, worker=0)
        out = np.zeros(2, np.float32)
        version, _ = c.push_pull(np.ones(2, np.float32), out, batch_size=1, loss=1.0, step=0)
        assert version == 1
        np.testing.assert_array_equal(out, np.full(2, -1.0, np.float32))
        assert ps.stats()["workers_lost"] == 1


def test_a_dropped_worker_pushing_late_continues_from_the_current_version():
    with make_server(n=2, mode="synchronous", num_workers=2, round_timeout_s=1.0) as ps:
        a, b = client(ps, worker=0), client(ps, worker=1)
        out_a, out_b = np.zeros(2, np.float32), np.zeros(2, np.float32)
        a.pull(out_a)
        b.pull(out_b)
        # Worker 1 is slow: round 1 closes without it.
        version, _ = a.push_pull(np.ones(2, np.float32), out_a, batch_size=1, loss=1.0, step=0)
        assert version == 1
        # Its gradient for step 0, computed on version 0, is discarded, not averaged into
        # round 2; it gets version 1 and continues from there.
        version, _ = b.push_pull(np.full(2, 100.0, np.float32), out_b, batch_size=1, loss=1.0, step=0)
        assert version == 1
        np.testing.assert_array_equal(out_b, np.full(2, -1.0, np.float32))
        assert ps.stats()["stale_discarded"] == 1
        # Round 2 waits for both again and is their exact average.
        got = {}
        t = threading.Thread(
            target=lambda: got.setdefault(
                "a", a.push_pull(np.ones(2, np.float32), out_a, batch_size=1, loss=1.0, step=1)
            )
        )
        t.start()
        version, _ = b.push_pull(np.full(2, 3.0, np.float32), out_b, batch_size=1, loss=1.0, step=1)
        t.join(10)
        assert version == 2 and got["a"][0] == 2
        np.testing.assert_array_equal(out_b, np.full(2, -3.0, np.float32))
        np.testing.assert_array_equal(out_a, out_b)
        a.close()
        b.close()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "sync"}, "mode"),
        ({"num_workers": 0}, "num_workers"),
        ({"round_timeout_s": 0.0}, "round_timeout_s"),
        ({"lost_worker_policy": "ignore"}, "lost_worker_policy"),
        ({"io_timeout_s": -1.0}, "io_timeout_s"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"max_staleness": 2, "mode": "synchronous"}, "max_staleness"),
    ],
)
def test_bad_arguments_raise_param_error_naming_the_param(kwargs, name):
    with pytest.raises(errors.ParamError, match=name):
        make_server(**kwargs)


def test_bfloat16_client_rounds_on_the_wire_and_the_server_keeps_float32():
    torch = pytest.importorskip("torch")
    init = np.linspace(-1.0, 1.0, 1000, dtype=np.float32) + np.float32(1e-3)
    grads = np.linspace(0.3, -0.2, 1000, dtype=np.float32)
    with _native.ParameterServer(init, [("w", [1000])], "SGD", {"lr": 1.0}, secret=SECRET) as ps:
        with pytest.raises(errors.ParamError, match="dtype"):
            client(ps, dtype="float16")
        c = client(ps, dtype="bfloat16")
        assert c.dtype == "bfloat16"
        out = np.empty(1000, np.float32)
        c.pull(out)
        # What torch's own conversion gives: round to nearest even.
        bf16 = lambda a: torch.from_numpy(a).to(torch.bfloat16).float().numpy()  # noqa: E731
        np.testing.assert_array_equal(out, bf16(init))
        c.push_pull(grads, out, batch_size=1, loss=0.0, step=0)
        master = ps.parameters()
        np.testing.assert_array_equal(master, init - bf16(grads))
        assert not np.array_equal(master, bf16(master)), "the server keeps float32 weights"
        np.testing.assert_array_equal(out, bf16(master))
        c.close()


def test_a_push_staler_than_max_staleness_is_refused_and_not_applied():
    ps = make_server(n=4, num_workers=2, max_staleness=0)
    try:
        slow, fast = client(ps, 0), client(ps, 1)
        out = np.empty(4, np.float32)
        slow.pull(out)
        fast.push_pull(np.ones(4, np.float32), out, batch_size=1, loss=0.0, step=0)
        assert not fast.last_push_stale
        version, _ = slow.push_pull(np.full(4, 50.0, np.float32), out, batch_size=1, loss=0.0, step=0)
        assert slow.last_push_stale and version == 1
        np.testing.assert_array_equal(out, np.full(4, -1.0, np.float32))
        slow.push_pull(np.ones(4, np.float32), out, batch_size=1, loss=0.0, step=0)
        assert not slow.last_push_stale
        stats = ps.stats()
        assert (stats["stale_refused"], stats["updates"], stats["staleness_max"]) == (1, 2, 0)
        slow.close()
        fast.close()
    finally:
        ps.stop()


def test_bad_params_secret_optimizer_layout():
    p = np.zeros(4, np.float32)
    with pytest.raises(errors.ParamError, match="secret"):
        _native.ParameterServer(p, [], "SGD", {}, secret=b"short")
    with pytest.raises(errors.ParamError, match="float32"):
        _native.ParameterServer(np.zeros(4), [], "SGD", {}, secret=SECRET)
    with pytest.raises(errors.ParamError, match="optimizer"):
        _native.ParameterServer(p, [], "NoSuchOpt", {}, secret=SECRET)
    with pytest.raises(errors.ParamError, match="layout"):
        _native.ParameterServer(p, [("w", [5])], "SGD", {}, secret=SECRET)
    with pytest.raises(errors.ParamError, match="lr"):
        _native.ParameterServer(p, [], "SGD", {"lr": "fast"}, secret=SECRET)


def test_port_in_use_raises_oserror():
    with make_server() as ps:
        host, port = ps.address
        with pytest.raises(OSError):
            make_server(port=port)


def test_wrong_lengths_raise_param_error():
    with make_server(n=4) as ps:
        c = client(ps)
        with pytest.raises(errors.ParamError):
            c.push(np.ones(3, np.float32), batch_size=1, loss=0.0, step=0)
        with pytest.raises(errors.ParamError):
            c.pull(np.ones(4, np.float64))
        c.close()


def test_garbage_connection_does_not_touch_state():
    with make_server(n=4, init=1.0) as ps:
        host, port = ps.address
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        assert ps.stats()["rejected_frames"] >= 1
        np.testing.assert_array_equal(ps.parameters(), np.ones(4, np.float32))
        with client(ps) as c:
            out = np.zeros(4, np.float32)
            assert c.pull(out) == 0


def test_calls_release_the_gil():
    # A pull blocked on a synchronous round must not stop other Python threads.
    with make_server(n=2, mode="synchronous", num_workers=2, round_timeout_s=5.0) as ps:
        a, b = client(ps, worker=0), client(ps, worker=1)
        out = np.zeros(2, np.float32)
        a.push(np.ones(2, np.float32), batch_size=1, loss=1.0, step=0)
        t = threading.Thread(target=lambda: a.pull(out, newer_than=0))
        t.start()
        ticks, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 0.2:
            ticks += 1
        assert ticks > 1000 and t.is_alive()
        b.push(np.ones(2, np.float32), batch_size=1, loss=1.0, step=0)
        t.join(10)
        assert not t.is_alive() and a.version == 1


@pytest.mark.slow
def test_stats_and_history_answer_while_a_checkpoint_is_written(tmp_path):
    # A 256 MB model: its checkpoint takes a while to write. stats() and history() wait for
    # no lock the write holds, and release the GIL (the Rust unit test
    # `server::tests::nothing_waits_for_checkpoint_io` makes a write last 2 s).
    with make_server(n=64 << 20) as ps:
        writer = threading.Thread(target=lambda: ps.save_checkpoint(str(tmp_path / "big.safetensors")))
        writer.start()
        took = []
        while writer.is_alive():
            t0 = time.monotonic()
            ps.stats()
            ps.history(since=0)
            took.append(time.monotonic() - t0)
            time.sleep(0.005)
        writer.join()
        assert took and max(took) < 0.05, took
        assert ps.stats()["last_checkpoint_version"] == 0


def test_engine_logs_reach_python_logging(caplog):
    caplog.set_level("INFO", logger="sparktorch.engine")
    with make_server() as ps:
        host, port = ps.address
        with pytest.raises(errors.AuthenticationError):
            _native.Client(host, port, b"not-the-right-secret", worker=0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            "authentication failed" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.01)
    records = [r for r in caplog.records if r.name == "sparktorch.engine"]
    assert any(r.levelname == "WARNING" and "authentication failed" in r.getMessage() for r in records)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_its_own_runtime():
    # PySpark forks Python workers from a parent that may already run engine threads.
    with make_server() as parent_ps:
        pid = os.fork()
        if pid == 0:  # the child: a fresh server and client must work
            code = 1
            try:
                with make_server(n=3) as ps, client(ps) as c:
                    c.push(np.ones(3, np.float32), batch_size=1, loss=0.0, step=0)
                    code = 0 if ps.version() == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert parent_ps.running


def test_stop_wakes_waiting_clients_with_server_unavailable():
    ps = make_server(n=2, mode="synchronous", num_workers=2, round_timeout_s=30.0)
    c = client(ps, worker=0)
    c.push(np.ones(2, np.float32), batch_size=1, loss=1.0, step=0)
    caught = []

    def wait():
        try:
            c.pull(np.zeros(2, np.float32), newer_than=0)
        except errors.EngineError as e:
            caught.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)  # let the pull reach the server and wait there
    t0 = time.monotonic()
    ps.stop()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(caught[0], errors.ServerUnavailableError)
    assert not ps.running and ps.version() == 0
