"""What it takes to run sparktorch 0.2.0 on today's stack, applied from the outside.

Nothing here edits the installed package; each change is a patch of the running process, applied
by the benchmark scripts that run under ``benchmarks/.venv-upstream`` and recorded in their
results, so the report can say exactly what was needed:

- ``loopback`` (always; a safety rule of these benchmarks, not a fix): its Flask parameter server
  hard-codes ``host='0.0.0.0'`` and tells workers ``gethostbyname(gethostname())``; both are
  pointed at 127.0.0.1.
- ``dill-optim-module`` (only after serialization failed without it): on dill 0.4 with torch 2.x,
  ``serialize_torch_obj`` raises ``PicklingError: Can't pickle ... sentinel``; setting the
  attribute ``torch.optim.<module>`` of the optimizer class (``torch.optim.adam``) makes dill
  find the class by reference again.
- ``OMP_NUM_THREADS=1`` is set by the orchestrator in the environment (see ``run_all.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

APPLIED: list[str] = []
FAILURES: dict[str, str] = {}


def apply_loopback() -> None:
    """Bind upstream's Flask server to 127.0.0.1 and make workers dial 127.0.0.1."""
    import flask
    from sparktorch import server

    if "loopback" in APPLIED:
        return
    original_run = flask.Flask.run

    def run_on_loopback(self: Any, host: Any = None, port: Any = None, **kwargs: Any) -> Any:
        return original_run(self, host="127.0.0.1", port=port, **kwargs)

    flask.Flask.run = run_on_loopback  # type: ignore[method-assign]
    server.Server.determine_master = staticmethod(lambda port: f"127.0.0.1:{port}")  # type: ignore[method-assign]
    APPLIED.append("loopback")


def apply_dill_workaround(optimizer: type) -> None:
    """``torch.optim.adam = sys.modules['torch.optim.adam']`` for ``optimizer``'s module."""
    import torch

    module = optimizer.__module__
    short = module.rsplit(".", 1)[-1]
    setattr(torch.optim, short, sys.modules[module])
    tag = f"dill-optim-module ({module})"
    if tag not in APPLIED:
        APPLIED.append(tag)


def serialize(fn: Callable[..., str], **kwargs: Any) -> str:
    """Call an upstream serializer (``serialize_torch_obj*``) with keyword arguments; on failure
    record the error, apply the dill workaround for ``kwargs['optimizer']`` and try once more."""
    optimizer = kwargs.get("optimizer")
    try:
        return fn(**kwargs)
    except Exception as exc:
        FAILURES.setdefault(fn.__name__, f"{type(exc).__name__}: {exc}"[:800])
        if not isinstance(optimizer, type):
            raise
        apply_dill_workaround(optimizer)
        return fn(**kwargs)


def report() -> dict[str, Any]:
    return {"patches": list(APPLIED), "failures_before_patch": dict(FAILURES)}
