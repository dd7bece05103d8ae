"""Where shards and in-stage servers bind: Spark's SPARK_LOCAL_IP when an executor's host sets
it, loopback of the driver's family when the driver is on loopback, and IPv6 throughout."""

from __future__ import annotations

import numpy as np
import pytest

from sparktorch import _native
from sparktorch._colocated import _executor_host, _resolve
from sparktorch._shards import _shard_host


def test_spark_local_ip_overrides_the_route(monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.2")
    assert _shard_host("127.0.0.1", 7077) == "127.0.0.2"
    monkeypatch.setenv("SPARK_LOCAL_IP", "[::1]")
    assert _shard_host("127.0.0.1", 7077) == "::1"


def test_ipv6_loopback_driver_gives_an_ipv6_loopback_shard(monkeypatch):
    monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
    assert _shard_host("::1", 7077) == "::1"
    assert _shard_host("127.0.0.1", 7077) == "127.0.0.1"


def test_ipv6_executor_addresses_resolve():
    assert _executor_host("[::1]:40000") == "::1"
    assert _resolve("::1") == "::1"
    assert _resolve("127.0.0.1") == "127.0.0.1"


def test_a_shard_bound_where_the_override_says_serves_a_client(monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_IP", "::1")
    host = _shard_host("127.0.0.1", 7077)
    server = _native.ParameterServer(
        np.arange(6, dtype=np.float32), [("w", [6])], "sgd", {"lr": 0.1}, secret=b"k" * 32, mode="hogwild",
        host=host, port=0, num_workers=1,
    )
    try:
        bound, port = server.address
        assert bound == "::1"
        client = _native.Client(bound, port, b"k" * 32, worker=0)
        out = np.zeros(6, dtype=np.float32)
        client.pull(out)
        client.close()
        assert out.tolist() == list(range(6))
    finally:
        server.stop()
