"""Fuzzing the shard registry's control framing (``sparktorch._shards``) with seeded random
mutations of real frames: a reader raises only ConnectionError / TimeoutError (never a
``json``, ``struct``, ``Unicode`` or ``Memory`` error), accepts a mutated authenticated frame
never, and never waits past its deadline; the registry's handshake refuses every mutated
registration, never raises and ends within its deadline."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest

from sparktorch import _shards
from sparktorch._shards import (
    MAX_PREAUTH_HEADER,
    REGISTRY_HANDSHAKE_TIMEOUT_S,
    _Channel,
    _canonical,
    _mac,
    _recv,
    _send,
)

pytestmark = pytest.mark.timeout(300)

SECRET = b"fuzz-secret-0123456789"
ROUNDS = int(os.environ.get("SPARKTORCH_FUZZ_ROUNDS", "400"))


def _frame(header: dict, payload: bytes = b"") -> bytes:
    a, b = socket.socketpair()
    with a, b:
        _send(a, header, payload)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(1 << 16):
            out += chunk
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and len(buf) >= 4:  # a new header length
            buf[0:4] = struct.pack(">I", rng.choice([0, 1, 2, 255, MAX_PREAUTH_HEADER, MAX_PREAUTH_HEADER + 1, 1 << 31, rng.getrandbits(32)]))
        elif op == 4 and len(buf) >= 12:  # a new payload length (after the header)
            (hlen,) = struct.unpack(">I", bytes(buf[:4]))
            at = 4 + hlen
            if at + 8 <= len(buf):
                buf[at : at + 8] = struct.pack(">Q", rng.choice([0, 1, 1 << 20, 1 << 63, rng.getrandbits(64)]))
        else:  # replace a byte with a JSON-significant one
            if buf:
                buf[rng.randrange(len(buf))] = rng.choice(b'{}[]",:\\\x00\xff')
    return bytes(buf)


def _feed(data: bytes, read, timeout_s: float = 2.0):
    """Write ``data`` then close; run ``read(sock, deadline)``; return (result, error, seconds)."""
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(timeout_s)
        writer = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)), daemon=True)
        writer.start()
        start = time.monotonic()
        try:
            return read(b, time.monotonic() + timeout_s), None, time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - what the test checks
            return None, exc, time.monotonic() - start
        finally:
            writer.join(5)


def _registration(nonce: bytes) -> dict:
    fields = {"fit": "f" * 32, "shard": 0, "attempt": 0, "host": "127.0.0.1", "port": 9,
              "fingerprint": None, "pid": 1, "nonce": "00" * 32}
    return {**fields, "mac": _mac(SECRET, b"shard-register", nonce, _canonical(fields))}


def test_preauth_frames_raise_only_connection_errors() -> None:
    rng = random.Random(22)
    seeds = [_frame({"nonce": "ab" * 32}), _frame(_registration(b"\x03" * 32)), _frame({"ok": True}, b"xyz"), _frame({"cmd": "stats"})]
    for _ in range(ROUNDS):
        data = _mutate(rng, rng.choice(seeds))
        _, err, took = _feed(data, lambda s, d: _recv(s, 16, max_header=MAX_PREAUTH_HEADER, deadline=d))
        assert err is None or isinstance(err, (ConnectionError, TimeoutError)), (data[:64], repr(err))
        assert took < 3.0


def test_authenticated_channel_accepts_no_mutated_frame() -> None:
    rng = random.Random(23)
    dn, sn = b"\x01" * 32, b"\x02" * 32

    def framed(header: dict, payload: bytes = b"") -> bytes:
        a, b = socket.socketpair()
        with a, b:
            _Channel(a, SECRET, dn, sn, is_driver=False).send(header, payload)
            a.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := b.recv(1 << 16):
                out += chunk
        return out

    seeds = [framed({"stats": {"pushes": 3}, "parts": None}), framed({"next": 4, "count": 1}, b"\x00" * 32)]
    for seed in seeds:  # the genuine frame is read
        result, err, _ = _feed(seed, lambda s, d: _Channel(s, SECRET, dn, sn, is_driver=True).recv(64))
        assert err is None and isinstance(result[0], dict)
    for _ in range(ROUNDS):
        seed = rng.choice(seeds)
        data = _mutate(rng, seed)
        if data[: len(seed)] == seed:
            continue  # the frame intact (bytes after it belong to the next frame)
        _, err, took = _feed(data, lambda s, d: _Channel(s, SECRET, dn, sn, is_driver=True).recv(64))
        assert isinstance(err, (ConnectionError, TimeoutError)), (data[:64], repr(err))
        assert took < 3.0


class _Registry:
    """The parts of a ShardedServer that ``_handshake`` uses (no Spark, no job)."""

    def __init__(self) -> None:
        self.fit_id = "f" * 32
        self.k = 1
        self._secret = SECRET
        self._io_timeout = 2.0
        self._cond = threading.Condition()
        self._handles: dict = {}
        self._stopped = False


def test_registry_handshake_refuses_every_mutated_registration(monkeypatch) -> None:
    monkeypatch.setattr(_shards, "REGISTRY_HANDSHAKE_TIMEOUT_S", 0.5)
    rng = random.Random(24)
    handshake = _shards.ShardedServer._handshake
    for i in range(ROUNDS // 8):
        reg = _Registry()
        a, b = socket.socketpair()
        with a, b:
            a.settimeout(5)

            def attacker() -> None:
                try:
                    nonce = bytes.fromhex(_recv(a, 0)[0]["nonce"])
                    a.sendall(_mutate(rng, _frame(_registration(nonce))))
                    if i % 2:
                        a.shutdown(socket.SHUT_WR)  # else: keep it open, silent after the bytes
                except OSError:
                    pass

            t = threading.Thread(target=attacker, daemon=True)
            t.start()
            start = time.monotonic()
            handshake(reg, b, ("fuzz", i))  # never raises
            assert time.monotonic() - start < 0.5 + 1.0  # the deadline, not the io timeout
            t.join(5)
        assert reg._handles == {}, "a mutated registration was accepted"
    assert REGISTRY_HANDSHAKE_TIMEOUT_S >= 1.0
