"""Typed surface of ``sparktorch._native``, the Rust engine (PyO3).

This stub is the contract between the Python package and the engine. Errors raised are the
classes of :mod:`sparktorch.errors`. Every blocking call releases the GIL and is bounded by a
timeout. Nothing here starts a thread or a runtime at import time (PySpark forks its workers).
Engine logs go to the :mod:`logging` logger ``"sparktorch.engine"``, pre-filtered by the
environment variable ``SPARKTORCH_LOG`` (default ``info``). Wire format: ``docs/protocol.md``.
"""

from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

__version__: str
"""The engine's version (the crate version)."""

PROTOCOL_VERSION: int
"""The wire protocol version this engine speaks (first field of the handshake)."""

Mode = Literal["hogwild", "async", "synchronous"]
HyperValue = float | bool | tuple[float, float]

class ParameterServer:
    """A parameter server running on its own threads inside this process.

    The model is one flat float32 buffer: every trainable tensor (``named_parameters()`` order)
    back to back, then ``model_buffers`` elements of model buffers (BatchNorm running statistics,
    ...); ``layout`` names them all. The optimizer runs here, in Rust, with torch.optim's
    numerics, over the trainable head; the buffer tail is updated by adding what workers push for
    it (the change their forward pass made), averaged per round in synchronous mode.

    Modes:
      - ``"hogwild"``: lock-free; pushes apply concurrently over relaxed atomics.
      - ``"async"``: each push applied whole, one at a time; pulls see consistent snapshots.
      - ``"synchronous"``: a round closes when every live worker of ``num_workers`` has pushed;
        the gradients are averaged weighted by batch size (f64 accumulation in worker order),
        the optimizer steps once, the version is bumped, waiting pulls are answered.
    """

    def __init__(
        self,
        params: npt.NDArray[np.float32],
        layout: list[tuple[str, list[int]]],
        optimizer: str,
        hyperparameters: dict[str, HyperValue],
        *,
        secret: bytes,
        mode: Mode = "async",
        host: str = "127.0.0.1",
        port: int = 0,
        num_workers: int = 1,
        round_timeout_s: float = 600.0,
        lost_worker_policy: Literal["drop", "fail"] = "drop",
        early_stop_patience: int = -1,
        io_timeout_s: float = 60.0,
        checkpoint_path: str | None = None,
        checkpoint_interval: int = 0,
        resume_from: str | None = None,
        model_buffers: int = 0,
        tls: bool = False,
        max_staleness: int | None = None,
    ) -> None:
        """Bind ``host:port`` (0 = chosen by the OS) and start serving.

        ``secret`` (at least 16 bytes) authenticates clients (HMAC over a server nonce).
        ``tls=True``: every connection is TLS 1.3 (rustls) with a key pair and self-signed
        certificate generated for this server (the private key never leaves this process);
        clients pin :attr:`tls_fingerprint`. The HMAC handshake then runs inside TLS.
        Connections that have not authenticated yet are capped at 64 (further ones wait in the
        kernel's backlog).
        ``max_staleness`` (``hogwild``/``async`` only; ``ParamError`` in synchronous mode): a
        push computed on a version more than this many steps old is refused, not applied
        (:attr:`Client.last_push_stale`); ``None``: unbounded.
        ``num_workers``: the tasks that take part (synchronous rounds wait for each live one;
        a task with no data registers and leaves at once). ``round_timeout_s``: how long a
        synchronous round waits for a missing worker before ``lost_worker_policy`` applies
        (``"drop"``: the round closes without it; ``"fail"``: the server records a
        :class:`~sparktorch.errors.WorkerLostError` and answers every waiter with it).
        ``early_stop_patience`` > 0 enables global early stopping (see :meth:`stats`).
        Raises :class:`~sparktorch.errors.ParamError` for a bad argument (the message names
        it) and ``OSError`` when the address cannot be bound (e.g. port in use).

        Checkpoints (format: ``docs/engine.md``, "Checkpoints"): with ``checkpoint_path`` (a
        directory, created if needed) the server writes ``<dir>/checkpoint.safetensors`` every
        ``checkpoint_interval`` versions (0: none but the final one) in the background, and once
        more in :meth:`stop`; a failed write is logged and counted (``stats()``), never fatal.
        ``resume_from`` (a checkpoint file, or a directory holding ``checkpoint.safetensors``)
        continues from it: parameters (``params`` only gives the length), optimizer state,
        version, each worker's ``resume_step`` and the early-stopping state. Its layout (names
        and shapes), optimizer name and mode must equal the ones given here
        (:class:`~sparktorch.errors.CheckpointError` naming the mismatch); the hyperparameters
        given here win (a warning is logged where they differ). A missing, corrupt or foreign
        file raises :class:`~sparktorch.errors.CheckpointError` naming the file. A failed final
        checkpoint makes :meth:`stop` raise :class:`~sparktorch.errors.CheckpointError`.
        """

    @property
    def tls_fingerprint(self) -> bytes | None:
        """With ``tls=True``: the SHA-256 digest (32 bytes) of this server's certificate, for
        clients to pin (``Client(..., tls_fingerprint=...)``); else None."""

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""

    @property
    def running(self) -> bool:
        """False once stopped (or failed)."""

    @property
    def num_params(self) -> int:
        """Number of float32 elements in the flat buffer."""

    @property
    def num_trainable(self) -> int:
        """Number of leading elements the optimizer steps (the rest are model buffers)."""

    def version(self) -> int:
        """Number of optimizer steps applied so far."""

    def parameters(self) -> npt.NDArray[np.float32]:
        """A copy of the flat parameters (a consistent snapshot except in hogwild mode)."""

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state: ``{"name": str, "hyperparameters": dict, "step": int,
        "scalars": dict[str, float], "buffers": dict[str, ndarray]}`` (flat buffers named as
        torch names them, e.g. ``exp_avg``)."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Replace the optimizer state (same form as :meth:`optimizer_state`)."""

    def save_checkpoint(self, path: str) -> None:
        """Write a checkpoint now: to ``path`` when it ends in ``.safetensors``, else to
        ``<path>/checkpoint.safetensors`` (directories are created). Atomic (temp file, fsync,
        rename); raises :class:`~sparktorch.errors.CheckpointError` naming the file on
        failure."""

    def stats(self) -> dict[str, Any]:
        """A snapshot of the server's counters, at any time:

        ``version``, ``mode``, ``updates`` (pushes applied), ``duplicates`` (replayed pushes
        acknowledged without applying), ``stale_discarded`` (synchronous pushes computed on a
        version older than the open round, e.g. from a dropped worker: acknowledged, not
        averaged), ``updates_per_worker`` (dict worker -> count),
        ``steps_per_worker`` (dict worker -> highest step applied + 1), ``workers_live``,
        ``workers_done``, ``workers_lost``, ``connections`` (open now), ``rejected_frames``,
        ``auth_failures``, ``bytes_in``, ``bytes_out``, ``recent_loss`` (dict worker -> mean of
        its last 10 losses), ``staleness_mean`` / ``staleness_max`` (versions between a worker's
        pull and its push), ``history_total`` (history entries ever recorded), ``should_stop`` (global early stop reached), ``best_loss``,
        ``error`` (str or None: a fatal condition such as a lost worker under ``"fail"``),
        ``checkpoint_errors`` (failed automatic/final checkpoint writes),
        ``last_checkpoint_version`` / ``last_checkpoint_path`` (int / str, None before the
        first checkpoint written).
        """

    @overload
    def history(self) -> list[tuple[int, int, float, float]]: ...
    @overload
    def history(self, since: int) -> tuple[int, list[tuple[int, int, float, float]]]: ...
    def history(self, since: int | None = None) -> Any:
        """Every applied push as ``(worker, step, loss, val_loss)`` in the order applied
        (``val_loss`` is NaN when none was reported). The server holds the newest 2**20
        entries (32 MiB); ``stats()["history_total"]`` counts every one ever recorded.

        With ``since=n``: ``(next, entries)``, the entries of index ``n`` and later (entry ``i``
        is the ``i``-th applied push; when the oldest of them are no longer held, from the
        oldest held) and the ``since`` of the next call. Copies only the new entries."""

    def stop(self) -> None:
        """Close the listener and every connection, and join the server threads. With
        ``checkpoint_path``, the final checkpoint is written; if that fails, raises
        :class:`~sparktorch.errors.CheckpointError` (the server is stopped all the same).
        Idempotent."""

    def __enter__(self) -> "ParameterServer": ...
    def __exit__(self, *exc: object) -> None: ...

class Client:
    """A blocking client of a :class:`ParameterServer`, for executor tasks.

    Connects, checks the protocol version, proves the secret and registers ``worker`` (the
    partition index) with ``attempt`` (Spark's attempt number). Each call is one round trip on
    a persistent connection; the GIL is released during I/O. Each exchange (a request and its
    whole answer) must end within ``timeout_s``, however the server paces its bytes (a wait for
    a synchronous round may take longer: it is bounded by the server's ``round_timeout_s`` plus
    its grace plus ``timeout_s``). ``connect_timeout_s`` bounds connecting, the host-name lookup
    included. With ``tls_fingerprint`` (the server's :attr:`ParameterServer.tls_fingerprint`)
    the connection is TLS and only that certificate is accepted.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        *,
        worker: int,
        attempt: int = 0,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 30.0,
        tls_fingerprint: bytes | None = None,
        dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        """``dtype``: element type of gradients and parameters on the wire (``"bfloat16"``:
        half the bytes, rounded to nearest even; the server keeps float32 weights).

        Raises :class:`~sparktorch.errors.ServerUnavailableError` (names the address) when
        the server cannot be reached in time, :class:`~sparktorch.errors.AuthenticationError`
        on a wrong secret or protocol version, a certificate that does not match
        ``tls_fingerprint``, or a server without TLS when a fingerprint is given;
        :class:`~sparktorch.errors.EngineTimeoutError` when a TLS server is addressed without
        one (it waits for a TLS handshake)."""

    @property
    def num_params(self) -> int:
        """Length of the server's flat parameter buffer."""

    @property
    def resume_step(self) -> int:
        """Steps of this worker already applied by earlier attempts: continue from here."""

    @property
    def version(self) -> int:
        """The version of the parameters last pulled."""

    @property
    def dtype(self) -> str:
        """Element type of tensors on the wire: ``"float32"`` or ``"bfloat16"``."""

    @property
    def last_push_stale(self) -> bool:
        """True when the last push was refused by the server's ``max_staleness``: nothing was
        applied and the step is not done; compute it again on the parameters :meth:`push_pull`
        has just written into ``out`` (after :meth:`push`, pull first)."""

    def pull(self, out: npt.NDArray[np.float32], newer_than: int = -1) -> int:
        """Write the server's parameters into ``out`` (1-D float32, C-contiguous, num_params
        long) and return their version. With ``newer_than >= 0`` the server answers once its
        version exceeds it (synchronous mode: after the round closes), and leaves ``out`` alone
        if it times out (raises :class:`~sparktorch.errors.EngineTimeoutError`). In synchronous
        mode, while this worker's gradient waits in the open round, any pull waits for that
        round to close (a retried task gets the result of its previous attempt's round)."""

    def push(
        self,
        grads: npt.NDArray[np.float32],
        *,
        batch_size: int,
        loss: float,
        step: int,
        val_loss: float = ...,
    ) -> tuple[int, bool]:
        """Send this worker's gradients for ``step`` (idempotent per (worker, attempt, step)).
        Returns ``(version, should_stop)``: the server version after the push was accepted and
        the global early-stop flag."""

    def push_pull(
        self,
        grads: npt.NDArray[np.float32],
        out: npt.NDArray[np.float32],
        *,
        batch_size: int,
        loss: float,
        step: int,
        val_loss: float = ...,
    ) -> tuple[int, bool]:
        """:meth:`push` then :meth:`pull` in one round trip (synchronous mode: the pull waits for
        the round holding this push; a push computed on a version older than the open round,
        e.g. by a worker dropped for missing a round, is discarded and the pull answers at once
        with the current version). Returns ``(version pulled, should_stop)``."""

    def should_stop(self) -> bool:
        """The global early-stop flag."""

    def close(self) -> None:
        """Tell the server this worker is done (it leaves synchronous rounds) and close."""

    def __enter__(self) -> "Client": ...
    def __exit__(self, *exc: object) -> None: ...

def read_checkpoint(path: str) -> dict[str, Any]:
    """Read and validate a checkpoint (a file, or a directory holding
    ``checkpoint.safetensors``). Returns ``{"path", "format", "format_version",
    "engine_version", "mode", "version", "optimizer", "hyperparameters", "num_workers",
    "layout": [(name, shape)], "model_buffers", "workers": {worker: {"next_step", "attempt"}},
    "early_stop": {"best_loss", "bad_evaluations", "should_stop"}, "created_unix", "created",
    "params": flat float32 ndarray, "optimizer_state": same form as
    :meth:`ParameterServer.optimizer_state`}``. Raises
    :class:`~sparktorch.errors.CheckpointError` naming the file (missing, truncated, corrupt,
    not a checkpoint, newer format)."""

def cli_main(argv: list[str]) -> int:
    """Run the ``sparktorch-ps`` command (``argv[0]`` is the program name); returns its exit
    code. Used by the ``sparktorch-ps`` console script (:mod:`sparktorch.cli`)."""
