"""Range partitioning and the sharded task client against real engine servers (loopback, no
Spark): K shards built as the shard tasks build them give what one server gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sparktorch import _native
from sparktorch._shards import ShardAddress, ShardedClient, shard_layout, split_ranges
from sparktorch.errors import ParamError, ServerUnavailableError

SECRET = b"shard-test-secret-0123456789"


def test_split_ranges_cover_the_vector_and_give_each_shard_its_buffers():
    # 10 trainable values then 6 buffer values over 4 shards: [0,4) [4,8) [8,12) [12,16).
    r = split_ranges(10, 6, 4)
    assert [(s.lo, s.hi) for s in r] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert [(s.trainable, s.buffers) for s in r] == [(4, 0), (4, 0), (2, 2), (0, 4)]
    for k in range(1, 17):
        parts = split_ranges(10, 6, k)
        assert parts[0].lo == 0 and parts[-1].hi == 16
        assert all(a.hi == b.lo for a, b in zip(parts, parts[1:]))
        assert sum(p.trainable for p in parts) == 10 and sum(p.buffers for p in parts) == 6
        assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    with pytest.raises(ParamError, match="psShards=17"):
        split_ranges(10, 6, 17)
    with pytest.raises(ParamError, match="psShards=0"):
        split_ranges(10, 6, 0)


def test_shard_layout_clips_tensors_at_the_boundaries():
    shapes = [("a", [2, 3]), ("b", [4]), ("c", [])]  # 6 + 4 + 1 values
    assert shard_layout(shapes, 0, 6) == [("a", [2, 3])]
    assert shard_layout(shapes, 4, 9) == [("a[4:6]", [2]), ("b[0:3]", [3])]
    assert shard_layout(shapes, 9, 11) == [("b[3:4]", [1]), ("c", [])]


def _servers(init, num_trainable, k, mode, workers):
    ranges = split_ranges(num_trainable, len(init) - num_trainable, k)
    shapes = [("w", [num_trainable]), ("buf", [len(init) - num_trainable])]
    servers, addresses = [], []
    for r in ranges:
        ps = _native.ParameterServer(
            init[r.lo : r.hi].copy(), shard_layout(shapes, r.lo, r.hi), "Adam", {"lr": 0.1},
            secret=SECRET, mode=mode, num_workers=workers, model_buffers=r.buffers,
            lost_worker_policy="fail", round_timeout_s=30.0,
        )
        servers.append(ps)
        host, port = ps.address
        addresses.append(ShardAddress(r.index, host, port, r.lo, r.hi, None))
    return servers, addresses


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_synchronous_rounds_over_shards_equal_one_server(k):
    # 7 trainable values and an 8-value buffer tail: with 5 shards the last two hold buffers only.
    rng = np.random.default_rng(0)
    init = rng.normal(size=15).astype(np.float32)
    grads = {w: [rng.normal(size=15).astype(np.float32) for _ in range(4)] for w in range(2)}
    results = {}
    for kk in (1, k):
        servers, addresses = _servers(init, 7, kk, "synchronous", 2)
        out: dict[int, np.ndarray] = {}

        def work(w: int) -> None:
            c = ShardedClient(addresses, SECRET, worker=w, timeout_s=20.0)
            params = np.empty(15, np.float32)
            c.pull(params)
            for step, g in enumerate(grads[w]):
                c.push_pull(g, params, batch_size=3 + w, loss=float(step), step=step)
            out[w] = params.copy()
            c.close()

        threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(out) == 2
        flat = np.concatenate([s.parameters() for s in servers])
        assert servers[0].version() == 4
        for s in servers:
            s.stop()
        np.testing.assert_array_equal(out[0], flat)
        results[kk] = flat
    np.testing.assert_array_equal(results[1], results[k])


def test_client_names_the_unreachable_shard():
    init = np.zeros(6, np.float32)
    servers, addresses = _servers(init, 6, 2, "async", 1)
    port = addresses[1].port
    servers[1].stop()
    try:
        with pytest.raises(ServerUnavailableError, match=rf"parameter server shard 1 \(127\.0\.0\.1:{port}\)"):
            ShardedClient(addresses, SECRET, worker=0, timeout_s=5.0, connect_timeout_s=2.0)
    finally:
        servers[0].stop()


def test_control_frames_are_authenticated_in_order():
    import socket

    from sparktorch._shards import _Channel

    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    dn, sn = b"d" * 32, b"s" * 32
    driver = _Channel(a, SECRET, dn, sn, is_driver=True)
    shard = _Channel(b, SECRET, dn, sn, is_driver=False)
    driver.send({"cmd": "stats"})
    assert shard.recv(0)[0] == {"cmd": "stats"}
    shard.send({"next": 1}, b"\x01" * 16)
    head, payload = driver.recv(64)
    assert head == {"next": 1} and bytes(payload) == b"\x01" * 16
    # A frame under another secret, or replayed / reflected, fails its MAC.
    _Channel(a, b"another-secret-0123456789abc", dn, sn, is_driver=True).send({"cmd": "stop"})
    with pytest.raises(ConnectionError, match="failed authentication"):
        shard.recv(0)
    # A payload larger than the receiver's bound is refused from the header.
    a2, b2 = socket.socketpair()
    _Channel(a2, SECRET, dn, sn, is_driver=True).send({"x": 1}, b"\x00" * 100)
    with pytest.raises(ConnectionError, match="exceeds"):
        _Channel(b2, SECRET, dn, sn, is_driver=False).recv(10)
    for s in (a, b, a2, b2):
        s.close()
