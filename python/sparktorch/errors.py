"""The exceptions sparktorch raises.

Every class derives from :class:`SparkTorchError` *and* from the builtin exception that users
already catch for that kind of failure (``ValueError``, ``ConnectionError``, ...), so both
``except SparkTorchError`` and ``except ValueError`` work. The native engine
(``sparktorch._native``) raises these same classes: the hierarchy is declared here, once.
"""

from __future__ import annotations

__all__ = [
    "SparkTorchError",
    "ParamError",
    "DataError",
    "SerializationError",
    "PersistenceError",
    "UnsafeModelError",
    "EngineError",
    "ProtocolError",
    "AuthenticationError",
    "ServerUnavailableError",
    "EngineTimeoutError",
    "WorkerLostError",
    "CheckpointError",
    "ClusterError",
]


class SparkTorchError(Exception):
    """Base class of every error raised by sparktorch."""


class ParamError(SparkTorchError, ValueError):
    """A param of an Estimator/Model (or an optimizer keyword) has an invalid value.

    The message names the param.
    """


class DataError(SparkTorchError, ValueError):
    """The training or inference data does not fit: a missing column, a wrong type, NaN, ...

    The message names the column (and, where known, how many rows are at fault).
    """


class SerializationError(SparkTorchError, ValueError):
    """A ``torchObj`` string could not be made or read."""


class PersistenceError(SparkTorchError, OSError):
    """A saved stage could not be written or read (corrupt, truncated, newer format, ...)."""


class UnsafeModelError(PersistenceError, SerializationError):
    """A stored model or torch object is a pickle, which can run arbitrary code when loaded,
    and loading pickles was not opted into.

    Raised before anything is unpickled. The message names the file (or the string) and the
    opt-in: ``allow_pickle=True`` on that load call (``SparkTorchModel.load``,
    ``SparkTorch.load``, ``sparktorch.load_pipeline``), or the process-wide switches
    ``spark.sparktorch.allowPickle=true`` / ``SPARKTORCH_ALLOW_PICKLE=1``, which warn on every
    use (see ``docs/persistence.md``).
    """


class EngineError(SparkTorchError, RuntimeError):
    """The parameter server engine failed (base of the engine's errors)."""


class ProtocolError(EngineError, ConnectionError):
    """A peer sent a frame that breaks the wire protocol; the connection was closed."""


class AuthenticationError(ProtocolError):
    """The handshake failed: wrong secret, or a peer speaking another protocol version."""


class ServerUnavailableError(EngineError, ConnectionError):
    """The parameter server could not be reached, or went away. The message names the address."""


class EngineTimeoutError(EngineError, TimeoutError):
    """A bounded wait of the engine ran out (connect, read, a synchronous round, ...)."""


class WorkerLostError(EngineError):
    """A worker of a synchronous round vanished and the policy is to fail the fit."""


class CheckpointError(EngineError, OSError):
    """A checkpoint could not be written or read."""


class ClusterError(SparkTorchError, RuntimeError):
    """The cluster cannot run the fit as asked: too few task slots, or executors that cannot
    import sparktorch (or run another Python or engine version than the client). Raised before
    training starts, naming what to change."""
