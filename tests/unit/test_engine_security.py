"""Security of the engine through its Python binding: TLS on the wire (seen through a recording
proxy), certificate pinning, the rule that turns TLS on, and a failed final checkpoint.
Loopback only, ports chosen by the OS, no Spark."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

from recording_proxy import RecordingProxy
from sparktorch import _native, errors
from sparktorch._driver import _stop_server, use_tls

SECRET = b"security-test-secret-0123"
PARAM = np.float32(1234.5678)
GRAD = np.float32(-0.0078125)


def pattern(v: np.float32) -> bytes:
    """Four consecutive float32 values as they travel on the wire (little-endian)."""
    return np.full(4, v, "<f4").tobytes()


def make_server(n: int = 4096, **kw) -> _native.ParameterServer:
    return _native.ParameterServer(
        np.full(n, PARAM, np.float32), [("w", [n])], "SGD", {"lr": 1.0}, secret=SECRET, **kw
    )


def traffic(tls: bool) -> bytes:
    """Pull, push and pull again through a recording proxy; return what the proxy saw."""
    n = 4096
    with make_server(n, tls=tls) as ps:
        assert (ps.tls_fingerprint is not None) == tls
        proxy = RecordingProxy(ps.address)
        try:
            c = _native.Client(
                "127.0.0.1", proxy.port, SECRET, worker=0, timeout_s=10.0, tls_fingerprint=ps.tls_fingerprint
            )
            out = np.zeros(n, np.float32)
            c.pull(out)
            assert (out == PARAM).all()
            c.push_pull(np.full(n, GRAD, np.float32), out, batch_size=1, loss=0.5, step=0)
            assert (out == PARAM - GRAD).all()
            c.close()
        finally:
            proxy.close()
        assert proxy.connections == 1
        return proxy.recorded()


def test_with_tls_the_wire_carries_no_parameter_or_gradient_values():
    plain = traffic(tls=False)
    # The control: without TLS an observer reads both, so this test can fail.
    assert pattern(PARAM) in plain and pattern(GRAD) in plain and b"SPT1" in plain
    wire = traffic(tls=True)
    assert len(wire) > 3 * 4096 * 4
    assert pattern(PARAM) not in wire
    assert pattern(GRAD) not in wire
    assert pattern(PARAM - GRAD) not in wire
    assert b"SPT1" not in wire  # not even the frame headers
    assert wire[0] == 22  # a TLS handshake record


def test_fingerprint_is_per_server_and_pinned():
    with make_server(8, tls=True) as a, make_server(8, tls=True) as b, make_server(8) as plain:
        assert isinstance(a.tls_fingerprint, bytes) and len(a.tls_fingerprint) == 32
        assert a.tls_fingerprint != b.tls_fingerprint
        assert plain.tls_fingerprint is None
        host, port = a.address
        with pytest.raises(errors.AuthenticationError, match="fingerprint"):
            _native.Client(host, port, SECRET, worker=0, timeout_s=5.0, tls_fingerprint=b.tls_fingerprint)
        deadline = time.monotonic() + 5
        while a.stats()["auth_failures"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the server counts it when its side of the handshake ends
        assert a.stats()["auth_failures"] == 1
        assert a.stats()["steps_per_worker"] == {}
        # A TLS client to a plaintext server, and a plaintext client to a TLS server.
        with pytest.raises(errors.AuthenticationError):
            _native.Client(*plain.address, SECRET, worker=0, timeout_s=5.0, tls_fingerprint=a.tls_fingerprint)
        with pytest.raises(errors.EngineTimeoutError):
            _native.Client(host, port, SECRET, worker=0, timeout_s=0.5)
        ok = _native.Client(host, port, SECRET, worker=0, timeout_s=5.0, tls_fingerprint=a.tls_fingerprint)
        ok.push(np.ones(8, np.float32), batch_size=1, loss=0.0, step=0)
        ok.close()
        assert a.version() == 1


@pytest.mark.parametrize("bad", [b"short", "not-bytes", b"x" * 33])
def test_a_malformed_fingerprint_is_a_param_error(bad):
    with make_server(8, tls=True) as ps:
        with pytest.raises(errors.ParamError, match="tls_fingerprint"):
            _native.Client(*ps.address, SECRET, worker=0, tls_fingerprint=bad)


@pytest.mark.parametrize(
    "setting,conf,bind,expected",
    [
        ("auto", {}, "127.0.0.1", False),
        ("auto", {}, "localhost", False),
        ("auto", {}, "::1", False),
        ("auto", {"spark.network.crypto.enabled": "true"}, "127.0.0.1", True),
        ("auto", {"spark.network.crypto.enabled": "TRUE "}, "127.0.0.1", True),
        ("auto", {"spark.ssl.rpc.enabled": "true"}, "127.0.0.1", True),
        ("auto", {"spark.ssl.enabled": "true"}, "127.0.0.1", True),
        ("auto", {"spark.network.crypto.enabled": "false"}, "127.0.0.1", False),
        ("auto", {}, "10.1.2.3", True),
        ("auto", {}, "0.0.0.0", True),
        ("auto", {}, "driver-host.example", True),
        ("off", {"spark.network.crypto.enabled": "true"}, "10.1.2.3", False),
        ("on", {}, "127.0.0.1", True),
    ],
)
def test_when_parameter_traffic_is_encrypted(setting, conf, bind, expected):
    assert use_tls(setting, conf, bind) is expected


def test_stop_raises_a_failed_final_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ps = make_server(8, checkpoint_path=str(ckpt))
    # The directory becomes a file: the final write cannot succeed.
    os.rmdir(ckpt)
    ckpt.write_bytes(b"not a directory")
    with pytest.raises(errors.CheckpointError, match="ckpt"):
        ps.stop()
    assert not ps.running
    ps.stop()  # idempotent: the error is reported once


def test_the_fit_warns_about_a_failed_final_checkpoint_instead_of_losing_its_result():
    class Failing:
        def stop(self):
            raise errors.CheckpointError("checkpoint /x: cannot rename")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _stop_server(Failing())
    assert any("final checkpoint failed" in str(w.message) for w in caught)
