"""A range-partitioned (sharded) parameter server: ``psShards=K`` with K > 1.

The flat parameter vector (trainable head, then the model-buffer tail; see :mod:`._state`) is
split into K contiguous ranges ``[lo, hi)`` of (almost) equal length. Each range is served by a
full :class:`sparktorch._native.ParameterServer` (its own store, optimizer state, versions,
rounds) that runs inside one long-lived Spark task, each the only task of its own *shard job*
(the driver starts the K jobs at once, under one job tag, before the training job). A shard's trainable/buffer split is the overlap of its range with the global head
and tail (the tail is the end of the vector, so it is always the end of a shard's range).

Pieces, in the order a fit uses them:

- :func:`split_ranges` / :func:`shard_layout`: the ranges and the per-shard layout.
- :class:`ShardedServer` (driver): a *registry* listener on the driver's address, the shard job
  (its own job tag; cancelled at the end of the fit or on error), and one authenticated control
  connection per shard, used to poll stats (progress, early stop, history), to detect a lost
  shard, to collect the final parameters and optimizer state, and to stop the shards. It offers
  the part of the ``ParameterServer`` interface the driver and :mod:`._progress` use.
- :func:`serve_shard` (executor): the body of one shard task.
- :class:`ShardedClient` (executor): what a training task uses instead of ``_native.Client``;
  it holds one client per shard and pushes/pulls all slices concurrently (the engine releases
  the GIL during I/O).

Registration and control protocol (driver registry <-> shard task), over plain TCP; every frame
is ``u32 header length | JSON header | u64 payload length | payload`` (big-endian), both lengths
checked against bounds before anything is allocated:

1. the shard connects to the registry and the driver sends ``{"nonce": 32 random bytes}``;
2. the shard sends its index, attempt, fit id, address, TLS fingerprint, pid, its own nonce and
   ``mac = HMAC-SHA256(secret, "shard-register" | driver nonce | canonical JSON of the rest)``;
3. the driver checks the MAC (constant-time), the fit id and the index, and answers
   ``{"ok": true, "mac": HMAC(secret, "shard-registry-ack" | shard nonce | driver nonce)}``,
   which the shard checks in turn. Only then is the shard's address used.

After that, every control frame carries an HMAC under a per-connection key (see
:class:`_Channel`): the driver's requests (``stats``, ``history``, ``stop``) and the shard's
answers cannot be forged, altered or replayed by a peer without the secret. They are not
encrypted: they carry counters and losses, never parameters. A shard's final parameters and
optimizer state are its Spark task's *result* (through Spark's own result channel, protected as
the task closure that carries the secret is, and bounded by ``spark.driver.maxResultSize``, per
shard: each shard's result is its own job's). The initial values reach the shards as one shipped
file (``addFile``), each shard reading its own range: no task carries model values.

The per-fit secret is the one the data connections use (it travels in the Spark closure); the
shard's TLS certificate fingerprint reaches the training tasks inside their closure, and the
fingerprint itself is covered by the registration MAC. See ``docs/architecture.md`` ("Sharded
parameter server") and ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import EngineError, ParamError, SparkTorchError

log = logging.getLogger("sparktorch")

__all__ = [
    "ShardRange",
    "ShardAddress",
    "ShardSpec",
    "split_ranges",
    "shard_layout",
    "ShardedServer",
    "ShardedClient",
    "serve_shard",
    "live_shards",
]

SHARD_TAG_PREFIX = "sparktorch-shards-"
MAX_HEADER = 4 << 20
"""Bound of a control frame's JSON header (bytes), once the peer is authenticated."""
MAX_PREAUTH_HEADER = 16 << 10
"""Bound of the registration frame's header (bytes), read before its MAC is checked: a
registration is a few hundred bytes, so an unauthenticated peer makes the registry hold at
most this much."""
REGISTRY_MAX_PENDING = 64
"""Registry connections being handshaken at once. When all are taken, a new connection evicts
the oldest one that has not yet sent its registration frame (it is closed), so a peer that
holds connections open cannot keep a shard out: a shard answers the registry's nonce at once,
the flood's connections are older. Only K shards ever need one, once."""
REGISTRY_BACKLOG = 1024
"""Listen backlog of the registry: a burst of connections waits for the acceptor rather than
being refused by the kernel before a shard's own connection gets in."""
REGISTRY_RETRY_MAX_DELAY_S = 2.0
"""A shard whose registration connection is dropped or times out (an evicted or refused
handshake, a flood at the registry) tries again, backing off from 50 ms to this, until the
driver's registration wait (``max(60 s, ioTimeout)``) has passed."""
REGISTRY_HANDSHAKE_TIMEOUT_S = 10.0
"""Deadline of a whole registry handshake (all its reads together), so that a peer that
connects and sends nothing, or trickles bytes, holds a slot at most this long."""
POLL_S = 0.5
"""How often the driver's watchdog polls every shard (also the shards' heartbeat)."""


# ------------------------------------------------------------------------------------ ranges


@dataclass(frozen=True)
class ShardRange:
    """One shard's contiguous range ``[lo, hi)`` of the flat vector."""

    index: int
    lo: int
    hi: int
    trainable: int
    """Elements of the range inside the trainable head (the optimizer steps them)."""
    buffers: int
    """Elements of the range inside the model-buffer tail (they end the range)."""

    @property
    def size(self) -> int:
        """Elements in the range."""
        return self.hi - self.lo


def split_ranges(num_trainable: int, num_buffers: int, k: int) -> list[ShardRange]:
    """K contiguous ranges of (almost) equal length over ``num_trainable + num_buffers``
    elements; shard ``i`` holds ``[n*i//k, n*(i+1)//k)``. Each range's trainable part is its
    overlap with ``[0, num_trainable)``, the rest of it is model buffers."""
    n = num_trainable + num_buffers
    if not 1 <= k <= n:
        raise ParamError(f"psShards={k}: must be between 1 and the model's {n} values")
    out = []
    for i in range(k):
        lo, hi = n * i // k, n * (i + 1) // k
        t = max(0, min(hi, num_trainable) - lo)
        out.append(ShardRange(i, lo, hi, t, (hi - lo) - t))
    return out


def shard_layout(shapes: Sequence[tuple[str, Sequence[int]]], lo: int, hi: int) -> list[tuple[str, list[int]]]:
    """The layout of the tensors (``(name, shape)`` in flat order) clipped to ``[lo, hi)``: a
    tensor wholly inside keeps its name and shape, a cut one becomes ``name[a:b]`` of shape
    ``[b - a]`` (flat offsets inside the tensor)."""
    out: list[tuple[str, list[int]]] = []
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) if len(shape) else 1
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            if a == offset and b == offset + n:
                out.append((name, list(shape)))
            else:
                out.append((f"{name}[{a - offset}:{b - offset}]", [b - a]))
        offset += n
    return out


@dataclass(frozen=True)
class ShardAddress:
    """Where training tasks reach one shard (travels in their closure)."""

    index: int
    host: str
    port: int
    lo: int
    hi: int
    tls_fingerprint: bytes | None
    secret: bytes | None = field(default=None, repr=False)
    """This shard's own secret, where each shard has one (servers inside the training stage);
    None: the fit's one secret."""


# ------------------------------------------------------------------------------------ framing


def _send(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)))
    if len(payload):
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the handshake deadline passed")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return buf


def _recv(
    sock: socket.socket, max_payload: int, max_header: int = MAX_HEADER, deadline: float | None = None
) -> tuple[dict[str, Any], bytearray]:
    """One frame; the socket's timeout bounds each read (and ``deadline``, a
    ``time.monotonic()`` instant, all of them together). ConnectionError (or TimeoutError) for
    a frame that breaks the bounds or is not a JSON object header; the header length is
    checked before a byte of it is read."""
    (hlen,) = struct.unpack(">I", _recv_exact(sock, 4, deadline))
    if hlen > max_header:
        raise ConnectionError(f"control frame header of {hlen} bytes exceeds {max_header}")
    try:
        header = json.loads(bytes(_recv_exact(sock, hlen, deadline)))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConnectionError(f"control frame header is not JSON ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ConnectionError("control frame header is not an object")
    (plen,) = struct.unpack(">Q", _recv_exact(sock, 8, deadline))
    if plen > max_payload:
        raise ConnectionError(f"control frame payload of {plen} bytes exceeds {max_payload}")
    return header, _recv_exact(sock, plen, deadline) if plen else bytearray()


def _mac(secret: bytes, label: bytes, *parts: bytes) -> str:
    return hmac.new(secret, label + b"|" + b"|".join(parts), hashlib.sha256).hexdigest()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _int_keys(stats: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the int keys of per-worker dicts into strings: turn them back."""
    out = dict(stats)
    for key, value in stats.items():
        if isinstance(value, dict):
            out[key] = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in value.items()}
    return out


class _Channel:
    """The control connection after registration: every frame carries a trailing
    ``HMAC-SHA256(key, direction | sequence number | header | payload)`` with a per-connection key
    ``HMAC(secret, "shard-control" | driver nonce | shard nonce)``, checked before the frame is
    used: a peer without the secret can neither forge, alter, reorder nor replay a frame (it can
    read them: they hold counters and losses, never parameters)."""

    def __init__(self, sock: socket.socket, secret: bytes, driver_nonce: bytes, shard_nonce: bytes, is_driver: bool) -> None:
        self.sock = sock
        self._key = hmac.new(secret, b"shard-control|" + driver_nonce + b"|" + shard_nonce, hashlib.sha256).digest()
        self._out, self._in = (b"d", b"s") if is_driver else (b"s", b"d")
        self._seq_out = 0
        self._seq_in = 0

    def _tag(self, direction: bytes, seq: int, head: bytes, payload: bytes | bytearray | memoryview) -> bytes:
        m = hmac.new(self._key, direction + struct.pack(">Q", seq) + struct.pack(">I", len(head)) + head, hashlib.sha256)
        m.update(payload)
        return m.digest()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        head = json.dumps(header, separators=(",", ":")).encode()
        tag = self._tag(self._out, self._seq_out, head, payload)
        self._seq_out += 1
        self.sock.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)))
        if len(payload):
            self.sock.sendall(payload)
        self.sock.sendall(tag)

    def recv(self, max_payload: int) -> tuple[dict[str, Any], bytearray]:
        (hlen,) = struct.unpack(">I", _recv_exact(self.sock, 4))
        if hlen > MAX_HEADER:
            raise ConnectionError(f"control frame header of {hlen} bytes exceeds {MAX_HEADER}")
        head = bytes(_recv_exact(self.sock, hlen))
        (plen,) = struct.unpack(">Q", _recv_exact(self.sock, 8))
        if plen > max_payload:
            raise ConnectionError(f"control frame payload of {plen} bytes exceeds {max_payload}")
        payload = _recv_exact(self.sock, plen) if plen else bytearray()
        tag = bytes(_recv_exact(self.sock, 32))
        if not hmac.compare_digest(tag, self._tag(self._in, self._seq_in, head, payload)):
            raise ConnectionError("control frame failed authentication")
        self._seq_in += 1
        header = json.loads(head)
        if not isinstance(header, dict):
            raise ConnectionError("control frame header is not an object")
        return header, payload


# ------------------------------------------------------------------------------------ shard task


@dataclass(frozen=True)
class ShardSpec:
    """Everything a shard task needs (pickled into the shard job; the initial values follow in a file)."""

    fit_id: str
    registry_host: str
    registry_port: int
    secret: bytes
    num_shards: int
    ranges: tuple[ShardRange, ...]
    layouts: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]
    optimizer: str
    hyperparameters: dict[str, Any]
    mode: str
    num_workers: int
    round_timeout_s: float
    lost_worker_policy: str
    early_stop_patience: int
    io_timeout_s: float
    ps_encryption: str
    spark_rpc_encrypted: bool
    idle_timeout_s: float
    """A shard that hears nothing from the driver for this long stops (the driver is gone)."""
    checkpoint_path: str | None = None
    """The sharded checkpoint directory: shard ``i`` writes ``<dir>/part-<i>/``."""
    checkpoint_interval: int = 0
    resume_parts: tuple[str, ...] | None = None
    """Per shard, the part file to resume from (absolute paths; from the manifest)."""
    init_file: str | None = None
    """``SparkFiles`` name of the flat float32 initial values of every shard (each reads its
    own range): the values travel as a file, never inside a task, so no task nears
    ``spark.rpc.message.maxSize`` whatever the model's size."""


def _job_error_detail(e: BaseException) -> str:
    """The line of a failed Spark job's error that says what went wrong (a sparktorch error
    when there is one), at most 500 characters."""
    lines = [ln.strip(" :\t") for ln in str(e).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith("at ") and ("Error" in ln or "Exception" in ln)]
    return next((ln for ln in useful if "sparktorch.errors" in ln), useful[0] if useful else repr(e))[:500]


def read_init_range(name: str, rng: ShardRange, index: int) -> np.ndarray:
    """Shard ``index``'s initial values: its range of the shipped file ``name``."""
    from pyspark import SparkFiles

    path = SparkFiles.get(name)
    init = np.fromfile(path, dtype=np.float32, count=rng.size, offset=rng.lo * 4)
    if init.size != rng.size:
        raise EngineError(f"parameter server shard {index}: the initial values file {path} is short ({init.size} of {rng.size} values)")
    return init


BIND_ENV = "SPARK_LOCAL_IP"
"""Spark's own per-host bind setting: where it is set on an executor's host, the servers that
executor hosts (shards, in-stage servers) bind that address instead of the one picked by route."""


def bind_override() -> str | None:
    """The executor host's ``SPARK_LOCAL_IP``, when set (an IPv4 or IPv6 address)."""
    value = os.environ.get(BIND_ENV, "").strip().strip("[]")
    return value or None


def _shard_host(registry_host: str, registry_port: int) -> str:
    """The address a shard binds: ``SPARK_LOCAL_IP`` when the executor's host sets it, else the
    address this executor reaches the driver from (the interface the route to the driver's
    registry leaves by): loopback, of the registry's address family, when the driver is on
    loopback. IPv6 addresses work throughout (the engine binds and dials either family)."""
    from ._driver import _is_loopback

    override = bind_override()
    if override is not None:
        return override
    v6 = ":" in registry_host
    if _is_loopback(registry_host):
        return "::1" if v6 else "127.0.0.1"
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((registry_host.strip("[]"), registry_port))  # UDP: no packet is sent, only a route chosen
        return str(s.getsockname()[0])


def serve_shard(spec: ShardSpec, index: int, init: np.ndarray | None = None, attempt: int = 0) -> dict[str, Any]:
    """The body of shard task ``index``: serve ``[lo, hi)`` until the driver says stop.

    Binds this executor's address (see :func:`_shard_host`), registers with the driver's
    registry and answers its control requests. Returns the shard's final state (``{"shard",
    "params", "optimizer", "error"}``: the task's result, which the driver collects). A retried
    attempt is refused (the first attempt's state is lost with it): a lost shard fails the fit,
    it is not restarted.
    """
    from . import _native
    from ._driver import use_tls

    if attempt > 0:
        raise EngineError(
            f"parameter server shard {index}: attempt {attempt} refused; a lost shard is not restarted "
            "(its parameters and optimizer state were lost with it), the fit fails instead"
        )
    rng = spec.ranges[index]
    if init is None:
        if spec.resume_parts:
            init = np.zeros(rng.size, dtype=np.float32)  # the length only: the part has the values
        elif spec.init_file is not None:
            init = read_init_range(spec.init_file, rng, index)
        else:
            raise EngineError(f"parameter server shard {index}: no initial values (neither a file nor a resume part)")
    bind = _shard_host(spec.registry_host, spec.registry_port)
    conf = {"spark.network.crypto.enabled": "true" if spec.spark_rpc_encrypted else "false"}
    tls = use_tls(spec.ps_encryption, conf, bind)
    server = _native.ParameterServer(
        np.ascontiguousarray(init, dtype=np.float32),
        [(n, list(s)) for n, s in spec.layouts[index]],
        spec.optimizer,
        spec.hyperparameters,
        secret=spec.secret,
        mode=spec.mode,  # type: ignore[arg-type]
        host=bind,
        port=0,
        num_workers=spec.num_workers,
        round_timeout_s=spec.round_timeout_s,
        lost_worker_policy=spec.lost_worker_policy,  # type: ignore[arg-type]
        early_stop_patience=spec.early_stop_patience if index == 0 else -1,
        io_timeout_s=spec.io_timeout_s,
        model_buffers=rng.buffers,
        tls=tls,
        checkpoint_path=part_dir(spec.checkpoint_path, index) if spec.checkpoint_path else None,
        checkpoint_interval=spec.checkpoint_interval,
        resume_from=spec.resume_parts[index] if spec.resume_parts else None,
    )
    parts = _PartKeeper(part_dir(spec.checkpoint_path, index), server) if spec.checkpoint_path else None
    try:
        host, port = server.address
        log.info("parameter server shard %d [%d, %d) listening on %s:%d (%s)", index, rng.lo, rng.hi, host, port, "TLS" if tls else "plaintext")
        sock, channel = _register_with_retry(spec, index, attempt, host, port, server.tls_fingerprint)
        try:
            return _serve_control(channel, spec, index, server, parts)
        finally:
            sock.close()
    finally:
        if parts is not None:
            parts.close()
        try:
            server.stop()
        except SparkTorchError as e:  # a failed final checkpoint: the fit's outcome is told elsewhere
            log.error("parameter server shard %d: %s", index, e)


# ------------------------------------------------------------------------------------ checkpoints

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sparktorch-sharded-checkpoint"
KEEP_PARTS = 8
"""Versions of its part each shard keeps (the manifest points at the newest common one)."""


def part_dir(root: str | None, index: int) -> str:
    """Shard ``index``'s directory under a sharded checkpoint directory."""
    return os.path.join(str(root), f"part-{index}")


def part_name(version: int) -> str:
    """The file name of a part of ``version``."""
    return f"v{version:012d}.safetensors"


def checkpoint_version(path: str) -> int:
    """The ``version`` in a checkpoint file's safetensors header (the header alone is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    return int(header["__metadata__"]["version"])


class _PartKeeper:
    """Keeps versions of a shard's checkpoint: the engine rewrites ``checkpoint.safetensors``
    (atomically: temp file, rename) every ``checkpointInterval`` versions; a thread polling the
    server's ``last_checkpoint_version`` every 10 ms hard-links each new file as
    ``v<version>.safetensors`` (the version read from the linked file's own header) and keeps the
    newest :data:`KEEP_PARTS`. The driver's manifest names a version every shard still has."""

    def __init__(self, directory: str, server: Any) -> None:
        self.directory = directory
        self._server = server
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen: int | None = None
        self.pinned: int | None = None
        """The version the driver's manifest names now: never pruned."""
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="sparktorch-shard-parts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                v = self._server.stats().get("last_checkpoint_version")
            except Exception:  # noqa: BLE001 - the server is stopping
                return
            if v is not None and v != self._seen:
                self.keep()

    def keep(self) -> None:
        """Link the current ``checkpoint.safetensors`` under its version; prune old ones."""
        with self._lock:
            src = os.path.join(self.directory, "checkpoint.safetensors")
            tmp = os.path.join(self.directory, f".link-{uuid.uuid4().hex}")
            try:
                os.link(src, tmp)
                version = checkpoint_version(tmp)
                os.replace(tmp, os.path.join(self.directory, part_name(version)))
                self._seen = version
            except (OSError, ValueError, KeyError) as e:
                self.errors += 1
                log.warning("checkpoint part in %s not kept: %s", self.directory, e)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return
            for old in self.versions()[:-KEEP_PARTS]:
                if old == self.pinned:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, part_name(old)))

    def versions(self) -> list[int]:
        """The versions kept, oldest first."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n[1:13]) for n in names if n.startswith("v") and n.endswith(".safetensors") and n[1:13].isdigit())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
    """Write ``<root>/manifest.json`` atomically (temp file, fsync, rename)."""
    tmp = os.path.join(root, f".{MANIFEST}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MANIFEST))


def read_manifest(root: str) -> dict[str, Any]:
    """Read and check ``<root>/manifest.json``; :class:`ParamError` naming ``resumeFrom``."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ParamError(f"resumeFrom={root!r}: cannot read {MANIFEST} ({e})") from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ParamError(f"resumeFrom={root!r}: {MANIFEST} is not a sparktorch sharded checkpoint manifest")
    if int(m.get("format_version", 0)) > 1:
        raise ParamError(f"resumeFrom={root!r}: {MANIFEST} has format_version {m.get('format_version')}, newer than this sparktorch reads (1)")
    parts = m.get("parts")
    if not isinstance(parts, list) or len(parts) != int(m.get("shards", -1)):
        raise ParamError(f"resumeFrom={root!r}: {MANIFEST} does not name one part per shard")
    for i, part in enumerate(parts):
        if not isinstance(part, str) or not re.fullmatch(rf"part-{i}/v\d{{12}}\.safetensors", part):
            raise ParamError(f"resumeFrom={root!r}: {MANIFEST} names part {i} as {part!r}, not part-{i}/v<version>.safetensors")
        if not os.path.isfile(os.path.join(root, part)):
            raise ParamError(f"resumeFrom={root!r}: part {i} ({part}) named by {MANIFEST} is missing")
    return m


def _register_with_retry(
    spec: ShardSpec, index: int, attempt: int, host: str, port: int, fp: bytes | None
) -> tuple[socket.socket, _Channel]:
    """Connect to the driver's registry and register; a connection that fails, is dropped or
    times out before the registry answers (an evicted handshake, a flood) is tried again with
    backoff until the driver's own registration wait, ``max(60 s, ioTimeout)``, has passed. A
    registry that answers and refuses (bad MAC, shard not expected) is not retried."""
    deadline = time.monotonic() + max(60.0, spec.io_timeout_s)
    delay = 0.05
    tries = 0
    while True:
        tries += 1
        sock: socket.socket | None = None
        try:
            left = max(0.1, deadline - time.monotonic())
            sock = socket.create_connection((spec.registry_host, spec.registry_port), timeout=min(spec.io_timeout_s, left))
            sock.settimeout(min(spec.io_timeout_s, left))
            channel = _register(sock, spec, index, attempt, host, port, fp)
            sock.settimeout(spec.io_timeout_s)
            if tries > 1:
                log.info("parameter server shard %d: registered at try %d", index, tries)
            return sock, channel
        except OSError as e:  # ConnectionError, TimeoutError: dropped or no answer
            if sock is not None:
                sock.close()
            if time.monotonic() + delay >= deadline:
                raise EngineError(
                    f"parameter server shard {index}: could not register with the driver's registry at "
                    f"{spec.registry_host}:{spec.registry_port} in {tries} tries ({type(e).__name__}: {e})"
                ) from e
            log.info("parameter server shard %d: registration try %d failed (%s); retrying", index, tries, e)
            time.sleep(delay)
            delay = min(delay * 2, REGISTRY_RETRY_MAX_DELAY_S)
        except BaseException:
            if sock is not None:
                sock.close()
            raise


def _register(sock: socket.socket, spec: ShardSpec, index: int, attempt: int, host: str, port: int, fp: bytes | None) -> _Channel:
    hello, _ = _recv(sock, 0)
    driver_nonce = bytes.fromhex(str(hello.get("nonce", "")))
    if len(driver_nonce) != 32:
        raise EngineError(f"parameter server shard {index}: the driver's registry sent no valid nonce")
    fields = {
        "fit": spec.fit_id,
        "shard": index,
        "attempt": attempt,
        "host": host,
        "port": port,
        "fingerprint": fp.hex() if fp else None,
        "pid": os.getpid(),
        "nonce": os.urandom(32).hex(),
    }
    _send(sock, {**fields, "mac": _mac(spec.secret, b"shard-register", driver_nonce, _canonical(fields))})
    ack, _ = _recv(sock, 0)
    expected = _mac(spec.secret, b"shard-registry-ack", bytes.fromhex(fields["nonce"]), driver_nonce)
    if not ack.get("ok") or not hmac.compare_digest(str(ack.get("mac", "")), expected):
        raise EngineError(f"parameter server shard {index}: the registry refused it or failed to authenticate: {ack.get('error')}")
    return _Channel(sock, spec.secret, driver_nonce, bytes.fromhex(fields["nonce"]), is_driver=False)


def _serve_control(channel: _Channel, spec: ShardSpec, index: int, server: Any, parts: _PartKeeper | None = None) -> dict[str, Any]:
    """Answer the driver until it says stop; then return this shard's final state (the task's
    result: it reaches the driver through Spark's own result channel, not the control one)."""
    channel.sock.settimeout(spec.idle_timeout_s)
    while True:
        try:
            req, _ = channel.recv(0)
        except socket.timeout as e:
            raise EngineError(f"parameter server shard {index}: no word from the driver in {spec.idle_timeout_s:.0f} s; stopping") from e
        cmd = req.get("cmd")
        if cmd == "stats":
            if parts is not None and isinstance(req.get("pinned"), int):
                parts.pinned = int(req["pinned"])
            channel.send({"stats": server.stats(), "parts": parts.versions() if parts else None})
        elif cmd == "history":
            nxt, entries = server.history(since=int(req.get("since", 0)))
            arr = np.asarray(entries, dtype=np.float64).reshape(-1, 4)
            channel.send({"next": nxt, "count": len(arr)}, arr.tobytes())
        elif cmd == "stop":
            error = server.stats().get("error")
            params = np.ascontiguousarray(server.parameters(), dtype=np.float32)
            opt = server.optimizer_state()
            checkpoint_error = None
            if parts is not None:
                parts.close()
            try:
                server.stop()  # writes the final checkpoint when checkpointing
            except SparkTorchError as e:
                checkpoint_error = str(e)
            if parts is not None and checkpoint_error is None:
                parts.keep()
            channel.send({"stopped": True, "error": error, "checkpoint_error": checkpoint_error, "parts": parts.versions() if parts else None})
            return {"shard": index, "params": params, "optimizer": opt, "error": error}
        else:
            channel.send({"error": f"unknown command {cmd!r}"})


def _shard_task(spec: ShardSpec) -> Callable[[int, Iterator[Any]], Iterator[Any]]:
    """The function of the shard job's ``mapPartitionsWithIndex`` (a closure over ``spec``)."""

    def run(index: int, rows: Iterator[Any]) -> Iterator[Any]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        attempt = ctx.attemptNumber() if ctx is not None else 0
        for row in rows:
            yield serve_shard(spec, int(row[0]), row[1] if len(row) > 1 else None, attempt)

    return run


# ------------------------------------------------------------------------------------ driver


class _Handle:
    """The driver's control connection to one registered shard (one request at a time)."""

    def __init__(self, index: int, channel: _Channel, info: dict[str, Any], timeout_s: float) -> None:
        self.index = index
        self.channel = channel
        self.sock = channel.sock
        self.info = info
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.address = ShardAddress(
            index, str(info["host"]), int(info["port"]), 0, 0, bytes.fromhex(info["fingerprint"]) if info.get("fingerprint") else None
        )

    def request(self, header: dict[str, Any], max_payload: int = 0, timeout_s: float | None = None) -> tuple[dict[str, Any], bytearray]:
        with self.lock:
            self.sock.settimeout(timeout_s or self.timeout_s)
            self.channel.send(header)
            return self.channel.recv(max_payload)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_LIVE: dict[str, list[dict[str, Any]]] = {}
"""fit id -> the registered shards of fits in progress (diagnostics: :func:`live_shards`)."""


def live_shards() -> list[dict[str, Any]]:
    """The shards of the sharded fits running in this driver process: ``{"fit", "shard", "host",
    "port", "pid", "registry"}`` each (``pid``: the Python worker serving it; ``registry``: the
    driver's registry address). For diagnostics and tests."""
    return [dict(s) for shards in list(_LIVE.values()) for s in shards]


class ShardedServer:
    """The driver's view of K parameter-server shards running in a Spark job.

    Offers what the fit and :class:`~sparktorch._progress.Progress` use of a
    ``ParameterServer``: :meth:`stats` (merged), :meth:`history` (shard 0's), :meth:`parameters`,
    :meth:`optimizer_state`, :meth:`stop`, ``address`` and ``tls_fingerprint`` (shard 0's).
    History and early stopping are global through shard 0: every push carries the loss and goes
    to every shard, so shard 0 records every applied push and alone runs early stopping.
    """

    def __init__(
        self,
        spark: Any,
        state: Any,
        opt_name: str,
        hyper: dict[str, Any],
        secret: bytes,
        bind: str,
        connect: str,
        port: int,
        plan: Any,
        num_parts: int,
        est: Any,
        k: int,
    ) -> None:
        self._sc = spark.sparkContext
        self.k = k
        self.fit_id = uuid.uuid4().hex
        self.ranges = split_ranges(state.num_trainable, state.num_buffers, k)
        self._n = state.num_trainable + state.num_buffers
        self._secret = secret
        self._io_timeout = float(est.getIoTimeout())
        self._error: str | None = None
        self._error_lock = threading.Lock()
        self._handles: dict[int, _Handle] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._stopping = False
        self._guarded: set[str] = set()
        self._results: list[dict[str, Any]] | None = None
        self._job_error: str | None = None  # a shard job that failed after the fit ended
        self._final: tuple[np.ndarray, dict[str, Any]] | None = None
        self._final_stats: dict[str, Any] | None = None
        self._final_history: list[tuple[int, int, float, float]] | None = None
        self.tag = f"{SHARD_TAG_PREFIX}{uuid.uuid4().hex[:12]}"
        self._manifest_lock = threading.Lock()
        self._workdir: str | None = None
        resume_parts = self._resume_parts(plan.resume_from)
        if plan.checkpoint_path:
            os.makedirs(plan.checkpoint_path, exist_ok=True)

        self._listener = socket.create_server((bind, port), backlog=REGISTRY_BACKLOG)
        self._listener.settimeout(POLL_S)
        reg_port = self._listener.getsockname()[1]
        conf = self._sc.getConf()
        encrypted = any(
            str(conf.get(key, "false")).strip().lower() == "true"
            for key in ("spark.network.crypto.enabled", "spark.ssl.rpc.enabled", "spark.ssl.enabled")
        )
        shapes = state.shapes()
        spec = ShardSpec(
            fit_id=self.fit_id,
            registry_host=connect,
            registry_port=reg_port,
            secret=secret,
            num_shards=k,
            ranges=tuple(self.ranges),
            layouts=tuple(tuple((n, tuple(s)) for n, s in shard_layout(shapes, r.lo, r.hi)) for r in self.ranges),
            optimizer=opt_name,
            hyperparameters=dict(hyper),
            mode=plan.engine_mode,
            num_workers=num_parts,
            round_timeout_s=float(est.getRoundTimeout()),
            lost_worker_policy=est.getLostWorkerPolicy(),
            early_stop_patience=plan.patience if plan.patience > 0 else -1,
            io_timeout_s=self._io_timeout,
            ps_encryption=est.getPsEncryption(),
            spark_rpc_encrypted=encrypted,
            idle_timeout_s=max(30.0, self._io_timeout),
            checkpoint_path=os.path.abspath(plan.checkpoint_path) if plan.checkpoint_path else None,
            checkpoint_interval=plan.checkpoint_interval,
            resume_parts=resume_parts,
            init_file=None if resume_parts else self._ship_init(spark, state),
        )
        self._spec_checkpoint_path = spec.checkpoint_path
        self._manifest_base = self._manifest_skeleton(state, plan) if plan.checkpoint_path else None
        self._manifest_version: int | None = None
        log.info("parameter server: %d shards of ~%d values; registry on %s:%d", k, self._n // k, bind, reg_port)
        self._acceptor = threading.Thread(target=self._accept_loop, name="sparktorch-shard-registry", daemon=True)
        self._acceptor.start()
        rows = [(r.index,) for r in self.ranges]  # the values follow in the shipped file
        self._job = threading.Thread(target=self._run_job, args=(rows, spec), name="sparktorch-shard-job", daemon=True)
        self._job.start()
        self._watchdog: threading.Thread | None = None
        try:
            self._wait_registered(max(60.0, self._io_timeout))
        except BaseException:
            self.stop()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="sparktorch-shard-watchdog", daemon=True)
        self._watchdog.start()

    def _ship_init(self, spark: Any, state: Any) -> str:
        """Write the flat initial values to a file and ship it to the executors (``addFile``);
        returns its ``SparkFiles`` name. The local copy goes when the fit stops."""
        import tempfile

        from ._session import ClassicSession

        self._workdir = tempfile.mkdtemp(prefix="sparktorch-shards-")
        return ClassicSession(spark).ship_new_file(self._workdir, f"sparktorch-init-{self.fit_id}.f32", lambda p: state.flatten().tofile(p))

    # ---------------------------------------------------------------- checkpoints

    def _resume_parts(self, resume_from: str | None) -> tuple[str, ...] | None:
        if not resume_from:
            return None
        m = read_manifest(resume_from)
        if int(m["shards"]) != self.k or [list(r) for r in m["ranges"]] != [[r.lo, r.hi] for r in self.ranges]:
            raise ParamError(
                f"resumeFrom={resume_from!r}: written with psShards={m['shards']} over {m.get('values')} values, "
                f"this fit has psShards={self.k} over {self._n}; resume with the same psShards and model"
            )
        return tuple(os.path.abspath(os.path.join(resume_from, p)) for p in m["parts"])

    def _manifest_skeleton(self, state: Any, plan: Any) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "shards": self.k,
            "values": self._n,
            "num_trainable": int(state.num_trainable),
            "model_buffers": int(state.num_buffers),
            "mode": plan.engine_mode,
            "ranges": [[r.lo, r.hi] for r in self.ranges],
        }

    def _update_manifest(self, kept: list[list[int] | None], final: bool = False) -> None:
        """Point the manifest at the newest version every shard has kept (if newer)."""
        if self._manifest_base is None or any(k is None for k in kept):
            return
        with self._manifest_lock:
            self._update_manifest_locked(kept, final)

    def _update_manifest_locked(self, kept: list[list[int] | None], final: bool) -> None:
        common = set(kept[0] or [])
        for k in kept[1:]:
            common &= set(k or [])
        if not common:
            return
        version = max(common)
        current = self._manifest_version
        if current is not None and (version < current or (version == current and not final)):
            return
        root = self._spec_checkpoint_path
        manifest = {
            **self._manifest_base,
            "version": version,
            "parts": [os.path.join(f"part-{i}", part_name(version)) for i in range(self.k)],
            # Synchronous: every shard stepped the same rounds. Async styles: the same number of
            # pushes, not necessarily the same ones, unless the fit had ended (final).
            "global_cut": self._manifest_base["mode"] == "synchronous" or final,
            "final": final,
            "created_unix": time.time(),
        }
        try:
            write_manifest(root, manifest)
            self._manifest_version = version
            log.info("sharded checkpoint: %s now names version %d of every shard", os.path.join(root, MANIFEST), version)
        except OSError as e:
            log.error("sharded checkpoint: writing %s failed: %s", os.path.join(root, MANIFEST), e)

    # ---------------------------------------------------------------- start-up

    def _run_job(self, rows: list[tuple[int]], spec: ShardSpec) -> None:
        """Run the shards: one single-task Spark job per shard, all at once (one thread each),
        all under the fit's shard tag. One job per shard, not one job of K tasks, because a
        job's task results together are bounded by ``spark.driver.maxResultSize``: each shard's
        final state (its range's values and optimizer state) is its own job's result, so the
        bound applies to one range, not to the whole model."""
        results: list[dict[str, Any] | None] = [None] * len(rows)
        errors: list[tuple[int, BaseException]] = []

        def one(slot: int, row: tuple[int]) -> None:
            sc = self._sc
            sc.addJobTag(self.tag)  # job tags and descriptions are per thread
            sc.setLocalProperty("spark.job.description", f"sparktorch parameter server: shard {row[0]} of {self.k}")
            try:
                got = sc.parallelize([row], 1).mapPartitionsWithIndex(_shard_task(spec)).collect()
                results[slot] = got[0] if got else None
                if not self._stopping:
                    self._lost(int(row[0]), "its job ended before the fit did")
            except Exception as e:  # noqa: BLE001 - recorded as the fit's error below
                errors.append((int(row[0]), e))
                if not self._stopping:
                    self._shard_job_failed(e)
            finally:
                sc.removeJobTag(self.tag)

        threads = [
            threading.Thread(target=one, args=(slot, row), name=f"sparktorch-shard-job-{row[0]}", daemon=True)
            for slot, row in enumerate(rows)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not errors and all(r is not None for r in results):
            self._results = [r for r in results if r is not None]
        elif errors:
            index, e = errors[0]
            self._job_error = f"parameter server shard {index}'s job failed: {_job_error_detail(e)}"

    def _shard_job_failed(self, e: BaseException) -> None:
        """A shard's job failed while the fit ran: name the lost shard(s), then the cause."""
        with self._cond:
            registered = sorted(self._handles.items())
        for i, h in registered:  # names the shard that is gone, when one is
            try:
                h.request({"cmd": "stats"}, timeout_s=5.0)
            except (OSError, ValueError) as probe:
                self._lost(i, f"lost ({type(probe).__name__}: {probe}); a lost shard is not restarted, the fit fails")
        if not self._stopping:
            self._lost(None, f"the shard job failed: {_job_error_detail(e)}")

    def _accept_loop(self) -> None:
        """Accept registry connections; at most :data:`REGISTRY_MAX_PENDING` are handshaken at
        once (each in a thread, for at most :data:`REGISTRY_HANDSHAKE_TIMEOUT_S`). When all are
        taken, the oldest connection that has not sent its registration frame yet is closed
        (its thread ends, its slot is the new one's): silent connections age out first, and a
        shard, which answers at once, gets in (and retries if it is ever evicted)."""
        slots = threading.BoundedSemaphore(REGISTRY_MAX_PENDING)
        pending: dict[int, socket.socket] = {}  # insertion order: oldest first
        lock = threading.Lock()
        evicted = 0
        serial = 0
        while not self._stopped:
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not slots.acquire(blocking=False):
                with lock:
                    oldest = next(iter(pending), None)
                    if oldest is not None:
                        victim = pending.pop(oldest)
                        try:
                            victim.shutdown(socket.SHUT_RDWR)  # its thread's read returns: it ends
                        except OSError:
                            pass
                if oldest is not None:
                    evicted += 1
                    if evicted == 1 or evicted % 1000 == 0:
                        log.warning(
                            "shard registry: %d unauthenticated connection(s) evicted, %d handshakes were "
                            "pending (latest from %s)", evicted, REGISTRY_MAX_PENDING, peer,
                        )
                if not slots.acquire(timeout=2.0):  # the evicted thread frees its slot at once
                    try:
                        sock.close()
                    except OSError:
                        pass
                    continue
            serial += 1
            key = serial
            with lock:
                pending[key] = sock

            def unpend(key: int = key) -> None:
                with lock:
                    pending.pop(key, None)

            def run(sock: socket.socket = sock, peer: Any = peer, unpend: Callable[[], None] = unpend) -> None:
                try:
                    self._handshake(sock, peer, unpend)
                finally:
                    unpend()
                    slots.release()

            try:
                threading.Thread(target=run, name="sparktorch-shard-handshake", daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one
                unpend()
                slots.release()
                sock.close()

    def _handshake(self, sock: socket.socket, peer: Any, unpend: Callable[[], None] = lambda: None) -> None:
        """One registration. ``unpend`` takes the connection off the evictable list: called
        once its registration frame is read, and before it is closed on an error."""
        try:
            timeout = min(REGISTRY_HANDSHAKE_TIMEOUT_S, self._io_timeout)
            deadline = time.monotonic() + timeout
            sock.settimeout(timeout)
            nonce = os.urandom(32)
            _send(sock, {"nonce": nonce.hex()})
            # unauthenticated until the MAC is checked: a small header, one deadline
            msg, _ = _recv(sock, 0, max_header=MAX_PREAUTH_HEADER, deadline=deadline)
            unpend()  # a whole frame: checked now, no longer evictable
            sock.settimeout(min(30.0, self._io_timeout))
            mac = str(msg.pop("mac", ""))
            if not hmac.compare_digest(mac, _mac(self._secret, b"shard-register", nonce, _canonical(msg))):
                log.warning("shard registry: refused %s (bad MAC)", peer)
                _send(sock, {"ok": False, "error": "authentication failed"})
                sock.close()
                return
            index = int(msg.get("shard", -1))
            with self._cond:
                if msg.get("fit") != self.fit_id or not 0 <= index < self.k or index in self._handles or self._stopped:
                    _send(sock, {"ok": False, "error": f"shard {index} not expected"})
                    sock.close()
                    return
                _send(sock, {"ok": True, "mac": _mac(self._secret, b"shard-registry-ack", bytes.fromhex(str(msg["nonce"])), nonce)})
                channel = _Channel(sock, self._secret, nonce, bytes.fromhex(str(msg["nonce"])), is_driver=True)
                handle = _Handle(index, channel, msg, self._io_timeout)
                r = self.ranges[index]
                handle.address = ShardAddress(index, handle.address.host, handle.address.port, r.lo, r.hi, handle.address.tls_fingerprint)
                self._handles[index] = handle
                _LIVE.setdefault(self.fit_id, []).append(
                    {
                        "fit": self.fit_id, "shard": index, "host": handle.address.host, "port": handle.address.port,
                        "pid": msg.get("pid"), "registry": self._listener.getsockname()[:2],
                    }
                )
                self._cond.notify_all()
            log.info("parameter server shard %d [%d, %d) registered from %s:%d", index, r.lo, r.hi, handle.address.host, handle.address.port)
        except Exception as e:  # noqa: BLE001 - one bad connection never stops the registry
            unpend()  # before the close: the acceptor never shuts down a closed socket
            log.info("shard registry: connection from %s failed: %s", peer, e)
            try:
                sock.close()
            except OSError:
                pass

    def _wait_registered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._handles) < self.k:
                if self._error:
                    raise EngineError(f"psShards={self.k}: the parameter server shards did not start: {self._error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.k)) - set(self._handles))
                    raise EngineError(
                        f"psShards={self.k}: shard(s) {missing} did not register within {timeout_s:.0f} s "
                        f"(does the cluster have {self.k} free task slots for them?)"
                    )
                self._cond.wait(min(left, POLL_S))

    # ---------------------------------------------------------------- failure

    def _lost(self, index: int | None, why: str) -> None:
        """Record the fit's fatal shard error (the first one wins) and cancel guarded jobs."""
        with self._error_lock:
            if self._stopping or self._error is not None:
                return
            where = "the parameter server shards" if index is None else self.describe(index)
            self._error = f"{where}: {why}"
            tags = list(self._guarded)
        log.error("%s; failing the fit", self._error)
        for tag in tags:
            try:
                self._sc.cancelJobsWithTag(tag)
            except Exception as e:  # noqa: BLE001
                log.debug("cancelling %s failed: %s", tag, e)

    def describe(self, index: int) -> str:
        """``parameter server shard i (host:port)``."""
        h = self._handles.get(index)
        where = f" ({h.address.host}:{h.address.port})" if h else ""
        return f"parameter server shard {index}{where}"

    def guard_job(self, tag: str) -> Any:
        """Context manager: while it is open, a lost shard cancels the jobs tagged ``tag``."""

        @contextlib.contextmanager
        def guard() -> Iterator[None]:
            with self._error_lock:
                if self._error is not None:
                    raise EngineError(f"training failed: {self._error}")
                self._guarded.add(tag)
            try:
                yield
            finally:
                with self._error_lock:
                    self._guarded.discard(tag)

        return guard()

    def _watch(self) -> None:
        # After a loss, the guarded jobs are cancelled again at every tick: a job submitted just
        # after the first cancel (the tag is set before its job exists) is caught by the next.
        while not self._stopping:
            if self._error is None:
                self._poll_all()
            else:
                with self._error_lock:
                    tags = list(self._guarded)
                for tag in tags:
                    with contextlib.suppress(Exception):
                        self._sc.cancelJobsWithTag(tag)
            time.sleep(POLL_S)

    def _poll_all(self) -> list[dict[str, Any]]:
        out = []
        kept: list[list[int] | None] = []
        for i in range(self.k):
            h = self._handles[i]
            try:
                head, _ = h.request({"cmd": "stats", "pinned": self._manifest_version})
                out.append(_int_keys(head["stats"]))
                kept.append(head.get("parts"))
            except (OSError, ValueError, KeyError) as e:
                self._lost(i, f"lost ({type(e).__name__}: {e}); a lost shard is not restarted, the fit fails")
                out.append({})
                kept.append(None)
        if self._manifest_base is not None and not self._stopping:
            self._update_manifest(kept)
        return out

    # ---------------------------------------------------------------- the ParameterServer surface

    @property
    def addresses(self) -> tuple[ShardAddress, ...]:
        """Every shard's address and range, in shard order."""
        return tuple(self._handles[i].address for i in range(self.k))

    @property
    def address(self) -> tuple[str, int]:
        """Shard 0's address."""
        a = self._handles[0].address
        return a.host, a.port

    @property
    def tls_fingerprint(self) -> bytes | None:
        """Shard 0's certificate fingerprint (each shard has its own: see :attr:`addresses`)."""
        return self._handles[0].address.tls_fingerprint

    def stats(self) -> dict[str, Any]:
        """Shard 0's stats (versions, updates, losses, early stop), with the byte and connection
        counters summed over shards, ``error`` set when any shard failed or was lost, and
        ``shards``: per shard ``{"shard", "host", "port", "version", "updates", "bytes_in",
        "bytes_out"}``."""
        if self._final_stats is not None:
            return dict(self._final_stats)
        if self._stopping:
            raise EngineError("the sharded parameter server is stopped")
        per = self._poll_all()
        merged = dict(per[0])
        for key in ("bytes_in", "bytes_out", "connections", "rejected_frames", "auth_failures"):
            merged[key] = sum(int(s.get(key, 0)) for s in per)
        errors = [f"{self.describe(i)}: {s['error']}" for i, s in enumerate(per) if s.get("error")]
        merged["error"] = self._error or (errors[0] if errors else None)
        merged["shards"] = [
            {
                "shard": i,
                "host": self._handles[i].address.host,
                "port": self._handles[i].address.port,
                **{k: s.get(k) for k in ("version", "updates", "bytes_in", "bytes_out")},
            }
            for i, s in enumerate(per)
        ]
        return merged

    def history(self, since: int | None = None) -> Any:
        """Shard 0's history (every applied push, in its order); as ``ParameterServer.history``."""
        if self._final_history is not None:
            entries = self._final_history[since or 0 :]
            return list(entries) if since is None else (len(self._final_history), list(entries))
        head, payload = self._handles[0].request({"cmd": "history", "since": since or 0}, max_payload=32 * 2**20 * 2, timeout_s=max(60.0, self._io_timeout))
        arr = np.frombuffer(bytes(payload), dtype=np.float64).reshape(-1, 4)
        entries = [(int(w), int(s), float(loss), float(vl)) for w, s, loss, vl in arr]
        return entries if since is None else (int(head["next"]), entries)

    def _collect_final(self) -> tuple[np.ndarray, dict[str, Any]]:
        """End the shards (once the training job is over): take the final stats and shard 0's
        whole history over the control connections, tell every shard to stop, and read each
        shard's final parameters and optimizer state from the shard job's results."""
        if self._final is not None:
            return self._final
        stats = self.stats()
        if stats.get("error"):
            raise EngineError(f"training failed: {stats['error']}")
        history = self.history()
        self._stopping = True
        replies = []
        for i in range(self.k):
            try:
                head, _ = self._handles[i].request({"cmd": "stop"}, timeout_s=max(60.0, self._io_timeout))
                replies.append(head)
            except (OSError, ValueError) as e:
                raise EngineError(f"training failed: {self.describe(i)} was lost before it returned its parameters ({e})") from e
        self._final_checkpoint(replies)
        wait_s = max(60.0, self._io_timeout)
        self._job.join(timeout=wait_s)
        if self._job_error is not None:
            raise EngineError(f"training finished, but collecting its final state failed: {self._job_error}")
        if self._job.is_alive() or self._results is None:
            raise EngineError(f"psShards={self.k}: the shard job did not return the final parameters within {wait_s:.0f} s")
        flat = np.empty(self._n, dtype=np.float32)
        buffers: dict[str, list[np.ndarray]] = {}
        meta: dict[str, Any] = {}
        for row in sorted(self._results, key=lambda r: int(r["shard"])):
            r = self.ranges[int(row["shard"])]
            params = np.asarray(row["params"], dtype=np.float32)
            if params.size != r.size:
                raise EngineError(f"{self.describe(r.index)} returned {params.size} values for a range of {r.size}")
            flat[r.lo : r.hi] = params
            opt = dict(row["optimizer"])
            for name, value in opt.pop("buffers", {}).items():
                buffers.setdefault(str(name), []).append(np.asarray(value, dtype=np.float32).reshape(-1))
            if r.index == 0:
                meta = opt
        self._final_stats, self._final_history = stats, history
        self._final = (flat, {**meta, "buffers": {k: np.concatenate(v) for k, v in buffers.items()}})
        return self._final

    def _final_checkpoint(self, replies: list[dict[str, Any]], final: bool = True) -> None:
        """After every shard stopped: the manifest names their final parts (a failed final
        checkpoint is warned about, as with one server, and leaves the manifest where it was)."""
        if self._manifest_base is None:
            return
        failed = [f"{self.describe(i)}: {r['checkpoint_error']}" for i, r in enumerate(replies) if r.get("checkpoint_error")]
        if failed:
            import warnings

            log.error("the final checkpoint failed: %s", "; ".join(failed))
            warnings.warn(f"the final checkpoint failed (a resume would start from an older one, or none): {'; '.join(failed)}", RuntimeWarning, stacklevel=4)
            return
        self._update_manifest([r.get("parts") for r in replies], final=final)

    def parameters(self) -> np.ndarray:
        """The flat parameters, every shard's range in place. Call it once the training job is
        over: it ends the shards (their final state is their task's result); afterwards
        :meth:`stats` and :meth:`history` answer with what they held then."""
        return self._collect_final()[0].copy()

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state: per-element buffers concatenated in shard order (they cover the
        trainable head), ``step`` and scalars from shard 0 (every shard steps alike)."""
        return self._collect_final()[1]

    def stop(self) -> None:
        """Stop every shard (their tasks end), wait for the shard job (bounded), cancel it if it
        is still there, close the registry. Idempotent; never raises."""
        if self._stopped:
            return
        already = self._stopping
        self._stopping = self._stopped = True
        replies: list[dict[str, Any]] = []
        for i, h in list(self._handles.items()):
            if not already:
                try:
                    head, _ = h.request({"cmd": "stop"}, timeout_s=max(30.0, self._io_timeout))
                    replies.append(head)
                except Exception as e:  # noqa: BLE001 - a shard already gone
                    log.debug("stopping shard %d: %s", i, e)
            h.close()
        if len(replies) == self.k and self._error is None:
            # Stopped without a lost shard (an error in a task, Ctrl-C): every shard wrote its
            # final part. Not necessarily one cut (a push may have reached one shard and not
            # another): the manifest moves only to a version every shard has, as mid-fit.
            self._final_checkpoint(replies, final=False)
        self._job.join(timeout=30.0)
        if self._job.is_alive():
            log.warning("the shard job did not end in 30 s: cancelling it")
        try:
            self._sc.cancelJobsWithTag(self.tag)
        except Exception as e:  # noqa: BLE001
            log.debug("cancelling the shard job failed: %s", e)
        self._job.join(timeout=30.0)
        try:
            self._listener.close()
        except OSError:
            pass
        if self._workdir is not None:
            import shutil

            shutil.rmtree(self._workdir, ignore_errors=True)
        _LIVE.pop(self.fit_id, None)


# ------------------------------------------------------------------------------------ task client


class ShardedClient:
    """A training task's client of K shards: the ``_native.Client`` surface the task uses.

    Each push and pull is split by range and sent to every shard at once (shard 0 on the
    calling thread, the others on a small thread pool; the engine releases the GIL). A call
    returns once every shard has answered; an error of any shard is raised with the shard
    named. ``version`` and ``should_stop`` are shard 0's (early stopping runs there).
    ``resume_step`` is the smallest over shards: a step some shard already applied is a
    duplicate there (acknowledged, not applied again).
    """

    def __init__(
        self,
        shards: Sequence[ShardAddress],
        secret: bytes,
        *,
        worker: int,
        attempt: int = 0,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 30.0,
        dtype: str = "float32",
    ) -> None:
        from . import _native

        self._shards = list(shards)
        # maxStaleness is refused with psShards > 1 (a push refused by one shard and applied by
        # another would be half a step): no push is ever refused here.
        self.last_push_stale = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(shards) - 1), thread_name_prefix="sparktorch-shard-client")

        def connect(a: ShardAddress) -> Any:
            return _native.Client(
                a.host, a.port, a.secret or secret, worker=worker, attempt=attempt, timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s, tls_fingerprint=a.tls_fingerprint, dtype=dtype,
            )

        self._clients: list[Any] = []
        try:
            self._clients = self._each(lambda i: connect(self._shards[i]))
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        self.num_params = sum(c.num_params for c in self._clients)
        expected = sum(a.hi - a.lo for a in self._shards)
        for a, c in zip(self._shards, self._clients):
            if c.num_params != a.hi - a.lo:
                raise EngineError(f"parameter server shard {a.index} ({a.host}:{a.port}) holds {c.num_params} values, its range {a.hi - a.lo}")
        assert self.num_params == expected

    def _each(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(i)`` for every shard, concurrently; every call is waited for, then the first
        error (in shard order) is raised naming its shard."""
        futures = [self._pool.submit(fn, i) for i in range(1, len(self._shards))]
        results: list[Any] = [None] * len(self._shards)
        errors: list[tuple[int, BaseException]] = []
        try:
            results[0] = fn(0)
        except BaseException as e:  # noqa: BLE001 - raised below, after the others
            errors.append((0, e))
        for i, f in enumerate(futures, start=1):
            try:
                results[i] = f.result()
            except BaseException as e:  # noqa: BLE001
                errors.append((i, e))
        if errors:
            i, e = errors[0]
            a = self._shards[i]
            prefix = f"parameter server shard {i} ({a.host}:{a.port}): "
            named: BaseException | None = None
            if isinstance(e, SparkTorchError):
                try:
                    named = type(e)(prefix + str(e))
                except TypeError:
                    named = None
            if named is not None:
                raise named from e
            raise e
        return results

    @property
    def resume_step(self) -> int:
        return min(c.resume_step for c in self._clients)

    @property
    def version(self) -> int:
        return int(self._clients[0].version)

    def pull(self, out: np.ndarray, newer_than: int = -1) -> int:
        if newer_than >= 0:
            raise ParamError("newer_than is not supported across shards")
        versions = self._each(lambda i: self._clients[i].pull(out[self._shards[i].lo : self._shards[i].hi]))
        return int(versions[0])

    def push_pull(self, grads: np.ndarray, out: np.ndarray, *, batch_size: int, loss: float, step: int, val_loss: float = float("nan")) -> tuple[int, bool]:
        def one(i: int) -> tuple[int, bool]:
            a = self._shards[i]
            return self._clients[i].push_pull(grads[a.lo : a.hi], out[a.lo : a.hi], batch_size=batch_size, loss=loss, step=step, val_loss=val_loss)

        results = self._each(one)
        return int(results[0][0]), bool(results[0][1])

    def push(self, grads: np.ndarray, *, batch_size: int, loss: float, step: int, val_loss: float = float("nan")) -> tuple[int, bool]:
        def one(i: int) -> tuple[int, bool]:
            a = self._shards[i]
            return self._clients[i].push(grads[a.lo : a.hi], batch_size=batch_size, loss=loss, step=step, val_loss=val_loss)

        results = self._each(one)
        return int(results[0][0]), bool(results[0][1])

    def should_stop(self) -> bool:
        return bool(self._clients[0].should_stop())

    def close(self) -> None:
        try:
            self._each(lambda i: self._clients[i].close())
        finally:
            self._pool.shutdown(wait=False)
