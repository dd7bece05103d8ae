"""``SparkTorchModel``: a trained torch network as a Spark ML ``Model``.

``transform`` runs batched through an Arrow UDF: the input Vector column becomes a
``list<float32>`` Arrow array (``vector_to_array``), each batch becomes one numpy matrix without
per-row Python objects, and the network (built once per Python worker process, cached by a
content hash of ``modStr``) runs under ``torch.inference_mode()`` in chunks of
``inferenceBatchSize`` rows. Saving and loading go through :mod:`sparktorch._persist`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from pyspark import keyword_only
from pyspark.ml import Model
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.util import MLReadable, MLWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, NumericType

from sparktorch._history import TrainingHistory
from sparktorch._params import _SparkTorchModelParams
from sparktorch._serialize import (
    deserialize_model,
    model_string_key,
    serialize_model,
    split_model_string,
)
from sparktorch.errors import DataError, ParamError

if TYPE_CHECKING:
    import pandas as pd

    from sparktorch._persist import SparkTorchModelReader, SparkTorchModelWriter

__all__ = ["SparkTorchModel"]

_log = logging.getLogger("sparktorch")


def _make_udf(predict: Any, vector_out: bool) -> Any:
    """Wrap ``predict`` (``pa.Array -> pa.Array``) as a batched scalar UDF.

    PySpark 4.1+ has scalar Arrow UDFs: the Arrow batch goes to ``predict`` as it is. Before
    that (3.5, 4.0) a scalar pandas UDF carries the same batches: pyarrow turns the Series of
    per-row arrays back into one ``list<float32>`` array in C++ (no Python loop over rows),
    and the model still runs once per chunk of ``inferenceBatchSize`` rows.
    """
    return_type = ArrayType(DoubleType(), containsNull=False) if vector_out else DoubleType()
    try:
        from pyspark.sql.pandas.functions import arrow_udf
    except ImportError:  # PySpark < 4.1
        import pandas as pd
        import pyarrow as pa
        from pyspark.sql.functions import pandas_udf

        list_type = pa.list_(pa.float32())

        def via_pandas(series: pd.Series) -> pd.Series:
            arr = pa.array(series, type=list_type, from_pandas=True)
            return predict(arr).to_pandas()

        # This module postpones annotations (strings); pandas_udf reads the hints to choose
        # the UDF type, so give it the real classes.
        via_pandas.__annotations__ = {"series": pd.Series, "return": pd.Series}
        return pandas_udf(via_pandas, return_type)  # type: ignore[call-overload]
    return arrow_udf(predict, return_type)  # scalar: inferred from the pa.Array type hints


class SparkTorchModel(Model, _SparkTorchModelParams, MLReadable["SparkTorchModel"], MLWritable):
    """A trained PyTorch network that transforms a Vector column into predictions.

    Output column ``predictionCol``: a Double per row (the argmax when the network outputs
    several values per row, else the value), or the whole output as a Vector when
    ``useVectorOut``. A null input row gives a null prediction.

    Build one with :func:`sparktorch.create_spark_torch_model`, by fitting
    ``sparktorch.SparkTorch``, or from a ``modStr`` made by
    :func:`sparktorch.util.serialize_model`.
    """

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str | None = None,
        predictionCol: str | None = None,
        modStr: str | None = None,
        useVectorOut: bool | None = None,
        inferenceBatchSize: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self._training_history: TrainingHistory = TrainingHistory.empty()
        kwargs = self._input_kwargs
        self.setParams(**kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        inputCol: str | None = None,
        predictionCol: str | None = None,
        modStr: str | None = None,
        useVectorOut: bool | None = None,
        inferenceBatchSize: int | None = None,
        device: str | None = None,
    ) -> SparkTorchModel:
        """Set any of the params (keyword arguments only)."""
        kwargs = self._input_kwargs
        return self._set(**kwargs)

    def setInputCol(self, value: str) -> SparkTorchModel:
        """Set ``inputCol``."""
        return self._set(inputCol=value)

    def setPredictionCol(self, value: str) -> SparkTorchModel:
        """Set ``predictionCol``."""
        return self._set(predictionCol=value)

    def setUseVectorOut(self, value: bool) -> SparkTorchModel:
        """Set ``useVectorOut``."""
        return self._set(useVectorOut=value)

    def setInferenceBatchSize(self, value: int) -> SparkTorchModel:
        """Set ``inferenceBatchSize``."""
        return self._set(inferenceBatchSize=value)

    def setDevice(self, value: str) -> SparkTorchModel:
        """Set ``device``."""
        return self._set(device=value)

    # ------------------------------------------------------------------ construction

    @classmethod
    def _from_module(
        cls,
        module: nn.Module,
        *,
        model_spec: tuple[Any, dict[str, Any]] | None = None,
        inputCol: str = "features",
        predictionCol: str = "predicted",
        useVectorOut: bool = False,
        device: str = "cpu",
        history: TrainingHistory | list[dict[str, Any]] | None = None,
    ) -> SparkTorchModel:
        """Build a model from a trained module (used by the estimator and the helpers).

        Args:
            module: the trained network (moved to CPU for serialization).
            model_spec: ``(import path or class, constructor kwargs)`` that rebuilds the
                architecture (``TorchObj.model_spec`` of a lazy torchObj); the model then saves
                and loads without pickle.
            history: the training records (a :class:`~sparktorch._history.TrainingHistory`, or
                ``{"worker", "step", "loss", "val_loss"}`` dicts).
        """
        model = cls(
            inputCol=inputCol,
            predictionCol=predictionCol,
            modStr=serialize_model(module, model_spec),
            useVectorOut=useVectorOut,
            device=device,
        )
        model._training_history = TrainingHistory.of(history)
        return model

    def copy(self, extra: Any = None) -> SparkTorchModel:
        """A copy with the same params (plus ``extra``) and training history."""
        that = super().copy(extra)
        that._training_history = TrainingHistory.of(getattr(self, "_training_history", None))  # immutable: shared
        return that

    # ------------------------------------------------------------------ model access

    def getPytorchModel(self) -> nn.Module:
        """The network as a plain ``torch.nn.Module`` (a fresh copy, on the CPU)."""
        mod_str = self.getModStr()
        if not mod_str:
            raise ParamError("param 'modStr' is empty: this SparkTorchModel holds no network")
        return deserialize_model(mod_str)

    def getOptimizerStateDict(self, model: nn.Module | None = None) -> dict[str, Any] | None:
        """The server's optimizer state at the end of the fit, as a ``torch.optim`` state_dict.

        It fits ``model``'s trainable parameters (default: a fresh :meth:`getPytorchModel`), so
        training can go on in plain PyTorch::

            net = spark_model.getPytorchModel()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            opt.load_state_dict(spark_model.getOptimizerStateDict(net))

        None for a model that was not fitted in this session (the state is not saved with the
        model; checkpoints hold it, see ``checkpointPath``).
        """
        state = getattr(self, "_optimizer_state", None)
        if state is None:
            return None
        from ._optim import to_torch_state_dict

        return to_torch_state_dict(state, model if model is not None else self.getPytorchModel())

    # ------------------------------------------------------------------ training history

    def getTrainingHistory(self, as_pandas: bool = False) -> list[dict[str, Any]] | pd.DataFrame:
        """The training records ``{"worker", "step", "loss", "val_loss"}`` (empty if none).

        Args:
            as_pandas: return a ``pandas.DataFrame`` (columns worker, step, loss, val_loss).
        """
        history = TrainingHistory.of(getattr(self, "_training_history", None))
        if as_pandas:
            return history.to_pandas()
        return history.records()

    def plotTrainingHistory(self, path: str) -> str:
        """Plot loss (and validation loss) per worker against step into a PNG at ``path``.

        Returns:
            ``path``.

        Raises:
            DataError: the model has no training history (it was not fitted by ``SparkTorch``).
        """
        records = TrainingHistory.of(getattr(self, "_training_history", None)).records()
        if not records:
            raise DataError("this SparkTorchModel has no training history to plot")
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 5))
        ax = fig.add_subplot(1, 1, 1)
        workers = sorted({int(r.get("worker", 0)) for r in records})
        for worker in workers:
            rows = sorted(
                (r for r in records if int(r.get("worker", 0)) == worker),
                key=lambda r: r["step"],
            )
            steps = [r["step"] for r in rows]
            line = ax.plot(steps, [r["loss"] for r in rows], label=f"worker {worker} loss")[0]
            val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            if val:
                ax.plot(
                    [s for s, _ in val],
                    [v for _, v in val],
                    linestyle="--",
                    color=line.get_color(),
                    label=f"worker {worker} val loss",
                )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("SparkTorch training history")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path

    # ------------------------------------------------------------------ transform

    def _check_input(self, dataset: DataFrame) -> bool:
        """Validate the input column before any job; True when it is a Vector column."""
        column = self.getInputCol()
        try:
            field = dataset.schema[column]
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(
                f"input column {column!r} (param 'inputCol') is not in the DataFrame; "
                f"columns: {dataset.columns}"
            ) from exc
        if isinstance(field.dataType, VectorUDT):
            return True
        if isinstance(field.dataType, ArrayType) and isinstance(
            field.dataType.elementType, NumericType
        ):
            return False
        raise DataError(
            f"input column {column!r} has type {field.dataType.simpleString()}; expected a "
            "Vector (e.g. from VectorAssembler) or an array of numbers"
        )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        self._validate_model_params()
        mod_str = self.getModStr()
        if not mod_str:
            raise ParamError("param 'modStr' is empty: this SparkTorchModel holds no network")
        split_model_string(mod_str)  # foreign / corrupt / newer strings fail here, not in a task
        is_vector = self._check_input(dataset)
        from sparktorch._session import session_of

        session_of(dataset.sparkSession).use_preloading_daemon()
        in_col = self.getInputCol()
        out_col = self.getPredictionCol()
        vector_out = self.getUseVectorOut()

        from sparktorch._inference import make_predict_fn

        predict = make_predict_fn(
            key=model_string_key(mod_str),
            mod_str=mod_str,
            device=self.getDevice(),
            batch_size=self.getInferenceBatchSize(),
            vector_out=vector_out,
            column=in_col,
        )
        udf = _make_udf(predict, vector_out)
        if is_vector:
            from pyspark.ml.functions import vector_to_array

            # vector_to_array refuses nulls: keep them null, the UDF predicts null for them
            features = F.when(
                F.col(in_col).isNotNull(), vector_to_array(F.col(in_col), "float32")
            )
        else:
            features = F.col(in_col).cast("array<float>")
        result = udf(features)
        if vector_out:
            from pyspark.ml.functions import array_to_vector

            tmp = f"__sparktorch_out_{self.uid}"
            staged = dataset.withColumn(tmp, result)
            return staged.withColumn(
                out_col,
                F.when(F.col(tmp).isNull(), F.lit(None).cast(VectorUDT())).otherwise(
                    array_to_vector(F.col(tmp))
                ),
            ).drop(tmp)
        return dataset.withColumn(out_col, result)

    # ------------------------------------------------------------------ persistence

    def write(self) -> SparkTorchModelWriter:
        """A writer that saves params (JSON), weights (safetensors) and the model definition."""
        from sparktorch._persist import SparkTorchModelWriter

        return SparkTorchModelWriter(self)

    @classmethod
    def read(cls) -> SparkTorchModelReader:
        """A reader for directories written by :meth:`write` (with the options of the load in
        progress, else: ``torch.nn`` classes only, no pickle)."""
        from sparktorch._persist import SparkTorchModelReader

        return SparkTorchModelReader(cls)

    @classmethod
    def load(
        cls, path: str, *, allowed_classes: Any = None, allow_pickle: bool = False
    ) -> SparkTorchModel:
        """Load a model saved with :meth:`save` (``write().save(path)``).

        The directory is read as data: the model's classes are checked by name before anything
        is imported, the model's size, shapes and dtypes against its weights before it is
        built, and nothing is unpickled without ``allow_pickle``.

        Args:
            path: the directory.
            allowed_classes: classes (the objects, such as ``[MyNet]``) that the saved model
                may name besides ``torch.nn`` layers and containers. A model of your own
                ``nn.Module`` class, saved with a ``model_spec``, loads only when its class is
                listed here; the class is taken from this list, its module is not imported.
            allow_pickle: unpickle a model stored as a pickle (a class without a spec), in this
                load only. Unpickling runs code chosen by whoever wrote the file.

        Raises:
            PersistenceError: the directory is unreadable, corrupt, of a newer format, or
                names a class that is not allowed, or the model does not fit its weights
                (:class:`~sparktorch.errors.UnsafeModelError` for a pickle without the
                opt-in).
        """
        from sparktorch._persist import LoadOptions, load_options

        with load_options(LoadOptions.of(allowed_classes, allow_pickle)):
            return cls.read().load(path)
