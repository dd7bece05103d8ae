"""MLflow tracking of a fit (optional: ``pip install sparktorch[mlflow]``).

When an MLflow run is active in the thread that calls ``fit`` (``with mlflow.start_run():``)
and the estimator's ``mlflowLogging`` param is True (the default), the fit logs into that run:

- **params**, before any Spark job: every param of the estimator that is set or has a default
  (``torchObj`` left out: it is the model itself), plus ``optimizer``, its hyperparameters
  (``optimizer.lr``, ...), ``workers`` (tasks = partitions), ``engine_mode``, ``model_class`` and
  ``num_params``. A param the run already holds with another value (a second fit in one run) is
  left as it is, with a warning;
- **metrics**, when training ends (from the server's history of applied steps, so the step axis
  is the server's update count, 0 .. total-1): ``train_loss`` (the loss each worker reported with
  the step that was applied), ``val_loss`` (with ``validationPct > 0``), and once:
  ``staleness_mean`` / ``staleness_max`` (server versions between a worker's pull and its push),
  ``updates``, ``duplicates``, ``workers_lost``, ``fit_seconds``;
- **the fitted network** as an MLflow PyTorch model under ``model`` (load it with
  ``mlflow.pytorch.load_model``): PyTorch's ``pt2`` export when the feature size is known (with
  a zero input example of that size; nothing pickled), MLflow's pickle format otherwise or when
  the export fails. A failure to log the model is a warning: the fit's result stands.

Nothing here imports mlflow unless the user did: without ``mlflow`` in ``sys.modules`` there can
be no active run, and a fit pays nothing.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from typing import Any

log = logging.getLogger("sparktorch")

#: metrics per ``log_batch`` call (MLflow's limit is 1000)
_BATCH = 1000
_MAX_PARAM_CHARS = 500


def active_run(enabled: bool) -> Any:
    """The active MLflow run to log the fit into, or None (off, mlflow not imported, no run)."""
    if not enabled:
        return None
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    try:
        return mlflow.active_run()
    except Exception as e:  # noqa: BLE001 - tracking is an aid: never fail a fit over it
        log.warning("MLflow: cannot read the active run (%s); this fit is not logged", e)
        return None


class FitTracker:
    """Logs one fit into an MLflow run (see the module docstring)."""

    def __init__(self, run: Any) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self._client = MlflowClient()
        self._run_id = run.info.run_id
        self._t0 = time.monotonic()

    def log_params(self, est: Any, extra: dict[str, Any]) -> None:
        params: dict[str, str] = {}
        for param, value in est.extractParamMap().items():
            if param.name == "torchObj":
                continue
            params[param.name] = str(value)[:_MAX_PARAM_CHARS]
        for key, value in extra.items():
            params[key] = str(value)[:_MAX_PARAM_CHARS]
        try:
            existing = self._client.get_run(self._run_id).data.params
        except Exception:  # noqa: BLE001
            existing = {}
        clash = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if clash:
            log.warning("MLflow: run %s already holds params %s with other values; kept as they were", self._run_id, ", ".join(clash[:5]))
        fresh = {k: v for k, v in params.items() if k not in existing}
        self._guard("params", lambda: self._mlflow.log_params(fresh) if fresh else None)

    def log_end(self, history: list[tuple[int, int, float, float]], stats: dict[str, Any], model: Any, feature_dim: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics: list[Any] = []
        for i, (_worker, _step, loss, val_loss) in enumerate(history):
            if math.isfinite(loss):
                metrics.append(Metric("train_loss", float(loss), now, i))
            if math.isfinite(val_loss):
                metrics.append(Metric("val_loss", float(val_loss), now, i))
        final = {
            "staleness_mean": stats.get("staleness_mean"),
            "staleness_max": stats.get("staleness_max"),
            "updates": stats.get("updates"),
            "duplicates": stats.get("duplicates"),
            "workers_lost": stats.get("workers_lost"),
            "fit_seconds": time.monotonic() - self._t0,
        }
        for key, value in final.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics.append(Metric(key, float(value), now, len(history)))

        def send() -> None:
            for start in range(0, len(metrics), _BATCH):
                self._client.log_batch(self._run_id, metrics=metrics[start : start + _BATCH])

        # The model first: MLflow 3's log_model copies metrics the run already has onto the
        # logged model, and writes them into the run's history once more.
        self._guard("the model", lambda: self._log_model(model, feature_dim))
        self._guard("metrics", send)

    def _log_model(self, model: Any, feature_dim: int | None) -> None:
        import inspect

        import mlflow.pytorch
        import torch

        kwargs: dict[str, Any] = {"pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"]}
        sig = inspect.signature(mlflow.pytorch.log_model).parameters
        kwargs["name" if "name" in sig else "artifact_path"] = "model"
        model = model.cpu().eval()
        if "serialization_format" in sig:
            if feature_dim is not None:
                import numpy as np

                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        mlflow.pytorch.log_model(
                            model, serialization_format="pt2", input_example=np.zeros((1, feature_dim), np.float32), **kwargs
                        )
                    return
                except Exception as e:  # noqa: BLE001 - torch.export refuses some models
                    log.info("MLflow: pt2 export of the model failed (%s); logging it in MLflow's pickle format", e)
            kwargs["serialization_format"] = "pickle"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(model, **kwargs)

    def _guard(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking is an aid: never fail a fit over it
            log.warning("MLflow: could not log %s to run %s: %s", what, self._run_id, e)
            warnings.warn(f"MLflow: could not log {what}: {e}", RuntimeWarning, stacklevel=3)


def start(enabled: bool, est: Any, extra: dict[str, Any]) -> FitTracker | None:
    """A tracker for this fit with its params logged, or None when nothing is to be logged."""
    run = active_run(enabled)
    if run is None:
        return None
    try:
        tracker = FitTracker(run)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: cannot log this fit (%s)", e)
        return None
    tracker.log_params(est, extra)
    log.info("MLflow: logging this fit to run %s", run.info.run_id)
    return tracker
