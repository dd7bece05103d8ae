"""``SparkTorch``: the Spark ML Estimator that trains a torch model through the parameter server.

Every param, getter and default of the ``sparktorch`` 0.2.0 package is kept (see
``docs/api.md``); the differences are deliberate fixes: ``port`` defaults to 0 (chosen by the
OS), the default mode is the parameter server's async-with-locking style, and every param is
validated before any Spark job starts, with an error that names it.
"""

from __future__ import annotations

from typing import Any

from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params, TypeConverters

from ._params import _SharedTorchParams
from ._persist import SparkTorchParamsReadable, SparkTorchParamsWritable

MODES = ("hogwild", "async", "synchronous")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOST_WORKER_POLICIES = ("drop", "fail")
PS_ENCRYPTION = ("auto", "on", "off")
PS_DTYPES = ("float32", "bfloat16")


def _to_optional_string(value: Any) -> str | None:
    return None if value is None else TypeConverters.toString(value)


class _SparkTorchParams(_SharedTorchParams):
    """The params of :class:`SparkTorch` (upstream's names and meanings), with getters."""

    labelCol = Param(
        Params._dummy(),
        "labelCol",
        "label column: a number, a Vector or an array; None means the features are the target (autoencoder)",
        typeConverter=_to_optional_string,
    )
    torchObj = Param(Params._dummy(), "torchObj", "the string made by serialize_torch_obj or serialize_torch_obj_lazy", typeConverter=TypeConverters.toString)
    iters = Param(Params._dummy(), "iters", "optimizer steps per partition (not epochs)", typeConverter=TypeConverters.toInt)
    epochs = Param(
        Params._dummy(),
        "epochs",
        "> 0: passes over each partition's training rows instead of iters steps (ceil(rows / miniBatch) steps "
        "a pass; one step a pass in full batch)",
        typeConverter=TypeConverters.toInt,
    )
    partitions = Param(Params._dummy(), "partitions", "repartition to this many partitions (= workers) when > 0", typeConverter=TypeConverters.toInt)
    mode = Param(
        Params._dummy(),
        "mode",
        "training style: 'hogwild' (lock-free when acquireLock=False, else async with locking), 'async', or 'synchronous'",
        typeConverter=TypeConverters.toString,
    )
    acquireLock = Param(Params._dummy(), "acquireLock", "in hogwild mode, apply each update whole, one at a time", typeConverter=TypeConverters.toBoolean)
    useBarrier = Param(Params._dummy(), "useBarrier", "run the training stage in barrier execution mode", typeConverter=TypeConverters.toBoolean)
    partitionShuffles = Param(Params._dummy(), "partitionShuffles", "repartition and train again this many times", typeConverter=TypeConverters.toInt)
    port = Param(Params._dummy(), "port", "parameter server port; 0 lets the OS choose", typeConverter=TypeConverters.toInt)
    verbose = Param(Params._dummy(), "verbose", "0: quiet; 1: progress on the driver, naming the fit's phase (a bar on a terminal, a few log lines elsewhere); 2: also a log line per worker step", typeConverter=TypeConverters.toInt)
    earlyStopPatience = Param(Params._dummy(), "earlyStopPatience", "> 0: stop all workers after this many evaluations without improvement", typeConverter=TypeConverters.toInt)
    miniBatch = Param(Params._dummy(), "miniBatch", "> 0: rows per step, in shuffled passes over the partition (each row once a pass); else the whole partition", typeConverter=TypeConverters.toInt)
    validationPct = Param(Params._dummy(), "validationPct", "share of each partition held out for validation loss, in [0, 1)", typeConverter=TypeConverters.toFloat)
    compileMode = Param(Params._dummy(), "compileMode", "torch.compile mode, or None for eager execution", typeConverter=_to_optional_string)
    seed = Param(Params._dummy(), "seed", "seed of mini-batch sampling and validation splits", typeConverter=TypeConverters.toInt)
    ioTimeout = Param(Params._dummy(), "ioTimeout", "seconds a task waits on one network read or write of the parameter server", typeConverter=TypeConverters.toFloat)
    roundTimeout = Param(Params._dummy(), "roundTimeout", "synchronous mode: seconds a round waits for a missing worker", typeConverter=TypeConverters.toFloat)
    checkpointPath = Param(
        Params._dummy(),
        "checkpointPath",
        "directory where the parameter server writes checkpoint.safetensors (parameters, model buffers, optimizer "
        "state, steps); a fit refuses a checkpointPath that already holds a checkpoint unless resumeFrom names it",
        typeConverter=_to_optional_string,
    )
    checkpointInterval = Param(
        Params._dummy(),
        "checkpointInterval",
        "write a checkpoint every this many optimizer steps (0: only when the fit ends)",
        typeConverter=TypeConverters.toInt,
    )
    resumeFrom = Param(
        Params._dummy(),
        "resumeFrom",
        "a checkpoint file (or a directory holding checkpoint.safetensors) to continue from",
        typeConverter=_to_optional_string,
    )
    lostWorkerPolicy = Param(
        Params._dummy(),
        "lostWorkerPolicy",
        "synchronous mode, a worker missing past roundTimeout: 'drop' it from the round, or 'fail' the fit",
        typeConverter=TypeConverters.toString,
    )

    psEncryption = Param(
        Params._dummy(),
        "psEncryption",
        "TLS for parameter traffic: 'auto' (on when Spark's RPC encryption is on or the server binds a "
        "non-loopback address), 'on' or 'off'",
        typeConverter=TypeConverters.toString,
    )

    maxStaleness = Param(
        Params._dummy(),
        "maxStaleness",
        "bounded staleness for mode='hogwild' (with or without acquireLock): a push computed on "
        "parameters more than this many updates old is refused and recomputed on fresh ones; "
        "-1: unbounded",
        typeConverter=TypeConverters.toInt,
    )

    psDtype = Param(
        Params._dummy(),
        "psDtype",
        "element type of gradients and parameters on the wire: 'float32', or 'bfloat16' (half "
        "the bytes; the server keeps float32 weights)",
        typeConverter=TypeConverters.toString,
    )

    psShards = Param(
        Params._dummy(),
        "psShards",
        "number of parameter server shards: 1 (default) serves every parameter from the driver; K > 1 "
        "range-partitions them over K shards that run as long-lived Spark tasks on executors (K task slots "
        "besides the training tasks)",
        typeConverter=TypeConverters.toInt,
    )

    psPlacement = Param(
        Params._dummy(),
        "psPlacement",
        "where the parameter server(s) run: 'auto' (default: the driver on a classic session, the training "
        "stage's own tasks on Spark Connect), 'driver', or 'tasks' (the first psShards tasks of a barrier "
        "training stage each host a shard; nothing needs the client to be reachable from executors)",
        typeConverter=TypeConverters.toString,
    )

    mlflowLogging = Param(
        Params._dummy(),
        "mlflowLogging",
        "when an MLflow run is active, log the fit's params, per-step losses, staleness and the fitted model to it",
        typeConverter=TypeConverters.toBoolean,
    )

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._setDefault(psEncryption="auto", mlflowLogging=True, maxStaleness=-1, psDtype="float32", psShards=1, psPlacement="auto")
        self._setDefault(
            labelCol=None,
            torchObj="",
            iters=10,
            epochs=0,
            partitions=-1,
            mode="hogwild",
            acquireLock=True,
            useBarrier=False,
            partitionShuffles=1,
            port=0,
            verbose=0,
            earlyStopPatience=-1,
            miniBatch=-1,
            validationPct=0.0,
            compileMode=None,
            seed=0,
            ioTimeout=120.0,
            roundTimeout=600.0,
            lostWorkerPolicy="drop",
            checkpointPath=None,
            checkpointInterval=0,
            resumeFrom=None,
        )

    def getLabelCol(self) -> str | None:
        """The label column, or None (autoencoder)."""
        return self.getOrDefault(self.labelCol)

    def getTorchObj(self) -> str:
        """The serialized torch object."""
        return self.getOrDefault(self.torchObj)

    def getIters(self) -> int:
        """Optimizer steps per partition."""
        return self.getOrDefault(self.iters)

    def getEpochs(self) -> int:
        """Passes over each partition per partition shuffle (0: ``iters`` steps instead)."""
        return self.getOrDefault(self.epochs)

    def getPartitions(self) -> int:
        """Partitions (workers) to repartition to; <= 0 keeps the DataFrame's."""
        return self.getOrDefault(self.partitions)

    def getMode(self) -> str:
        """The training style."""
        return self.getOrDefault(self.mode)

    def getAcquireLock(self) -> bool:
        """Whether hogwild mode applies updates one at a time."""
        return self.getOrDefault(self.acquireLock)

    def getAqcuireLock(self) -> bool:
        """Alias of :meth:`getAcquireLock` (0.2.0's getter name, spelled as it shipped)."""
        return self.getAcquireLock()

    def getBarrier(self) -> bool:
        """Alias of :meth:`getUseBarrier` (0.2.0's getter name)."""
        return self.getUseBarrier()

    def getUseBarrier(self) -> bool:
        """Whether the training stage runs in barrier mode."""
        return self.getOrDefault(self.useBarrier)

    def getPartitionShuffles(self) -> int:
        """How many times the data is repartitioned and trained on again."""
        return self.getOrDefault(self.partitionShuffles)

    def getPort(self) -> int:
        """The parameter server port (0: chosen by the OS)."""
        return self.getOrDefault(self.port)

    def getVerbose(self) -> int:
        """The verbosity level."""
        return self.getOrDefault(self.verbose)

    def getEarlyStopPatience(self) -> int:
        """Early-stopping patience (<= 0: off)."""
        return self.getOrDefault(self.earlyStopPatience)

    def getMiniBatch(self) -> int:
        """Rows per step (<= 0: the whole partition)."""
        return self.getOrDefault(self.miniBatch)

    def getValidationPct(self) -> float:
        """Share of each partition held out for validation."""
        return self.getOrDefault(self.validationPct)

    def getCompileMode(self) -> str | None:
        """The torch.compile mode, or None."""
        return self.getOrDefault(self.compileMode)

    def getSeed(self) -> int:
        """The sampling seed."""
        return self.getOrDefault(self.seed)

    def getIoTimeout(self) -> float:
        """Seconds a task waits on one read or write of the parameter server."""
        return self.getOrDefault(self.ioTimeout)

    def getRoundTimeout(self) -> float:
        """Synchronous mode: seconds a round waits for a missing worker."""
        return self.getOrDefault(self.roundTimeout)

    def getCheckpointPath(self) -> str | None:
        """The checkpoint directory, or None."""
        return self.getOrDefault(self.checkpointPath)

    def getCheckpointInterval(self) -> int:
        """Optimizer steps between checkpoints (0: only at the end)."""
        return self.getOrDefault(self.checkpointInterval)

    def getResumeFrom(self) -> str | None:
        """The checkpoint to continue from, or None."""
        return self.getOrDefault(self.resumeFrom)

    def getLostWorkerPolicy(self) -> str:
        """Synchronous mode: 'drop' or 'fail' a worker missing past the round timeout."""
        return self.getOrDefault(self.lostWorkerPolicy)

    def getPsEncryption(self) -> str:
        """TLS for parameter traffic: 'auto', 'on' or 'off'."""
        return self.getOrDefault(self.psEncryption)

    def getMaxStaleness(self) -> int:
        """Bounded staleness of the asynchronous styles (-1: unbounded)."""
        return self.getOrDefault(self.maxStaleness)

    def getPsDtype(self) -> str:
        """Element type of parameter traffic: 'float32' or 'bfloat16'."""
        return self.getOrDefault(self.psDtype)
    def getPsShards(self) -> int:
        """Number of parameter server shards (1: one server on the driver)."""
        return self.getOrDefault(self.psShards)

    def getPsPlacement(self) -> str:
        """Where the parameter server(s) run: 'auto', 'driver' or 'tasks'."""
        return self.getOrDefault(self.psPlacement)

    def getMlflowLogging(self) -> bool:
        """Whether a fit logs to the active MLflow run (when there is one)."""
        return self.getOrDefault(self.mlflowLogging)


class SparkTorch(Estimator, _SparkTorchParams, SparkTorchParamsReadable, SparkTorchParamsWritable):
    """Train a PyTorch model on a DataFrame across the Spark cluster.

    Example::

        torch_obj = serialize_torch_obj(model=net, criterion=nn.CrossEntropyLoss(),
                                        optimizer=torch.optim.Adam, lr=1e-3)
        model = SparkTorch(inputCol="features", labelCol="label", torchObj=torch_obj,
                           iters=50, partitions=4).fit(df)
        model.transform(df)

    ``fit`` starts a parameter server in the driver process (bound to the driver's address, port
    chosen by the OS unless ``port`` is set), runs one Spark task per partition, and returns a
    :class:`~sparktorch.SparkTorchModel` with the trained parameters and the training history.
    """

    @keyword_only
    def __init__(
        self,
        inputCol: str | None = None,
        labelCol: str | None = None,
        torchObj: str | None = None,
        iters: int | None = None,
        predictionCol: str | None = None,
        partitions: int | None = None,
        acquireLock: bool | None = None,
        verbose: int | None = None,
        mode: str | None = None,
        device: str | None = None,
        useBarrier: bool | None = None,
        useVectorOut: bool | None = None,
        earlyStopPatience: int | None = None,
        miniBatch: int | None = None,
        validationPct: float | None = None,
        partitionShuffles: int | None = None,
        port: int | None = None,
        compileMode: str | None = None,
        seed: int | None = None,
        ioTimeout: float | None = None,
        roundTimeout: float | None = None,
        lostWorkerPolicy: str | None = None,
        checkpointPath: str | None = None,
        checkpointInterval: int | None = None,
        resumeFrom: str | None = None,
        psEncryption: str | None = None,
        maxStaleness: int | None = None,
        psDtype: str | None = None,
        mlflowLogging: bool | None = None,
        epochs: int | None = None,
        psShards: int | None = None,
        psPlacement: str | None = None,
    ) -> None:
        super().__init__()
        kwargs = self._input_kwargs
        self.setParams(**kwargs)

    @keyword_only
    def setParams(
        self,
        inputCol: str | None = None,
        labelCol: str | None = None,
        torchObj: str | None = None,
        iters: int | None = None,
        predictionCol: str | None = None,
        partitions: int | None = None,
        acquireLock: bool | None = None,
        verbose: int | None = None,
        mode: str | None = None,
        device: str | None = None,
        useBarrier: bool | None = None,
        useVectorOut: bool | None = None,
        earlyStopPatience: int | None = None,
        miniBatch: int | None = None,
        validationPct: float | None = None,
        partitionShuffles: int | None = None,
        port: int | None = None,
        compileMode: str | None = None,
        seed: int | None = None,
        ioTimeout: float | None = None,
        roundTimeout: float | None = None,
        lostWorkerPolicy: str | None = None,
        checkpointPath: str | None = None,
        checkpointInterval: int | None = None,
        resumeFrom: str | None = None,
        psEncryption: str | None = None,
        maxStaleness: int | None = None,
        psDtype: str | None = None,
        mlflowLogging: bool | None = None,
        epochs: int | None = None,
        psShards: int | None = None,
        psPlacement: str | None = None,
    ) -> "SparkTorch":
        """Set any of the params by keyword; returns ``self``."""
        kwargs = self._input_kwargs
        # An explicit labelCol=None means "no label" (autoencoder), as upstream.
        return self._set(**kwargs)

    def _fit(self, dataset: Any) -> Any:
        from ._driver import fit

        return fit(self, dataset)
