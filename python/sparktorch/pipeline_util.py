"""Pipeline helpers (upstream import path ``sparktorch.pipeline_util``).

sparktorch 0.2.0 hid its stages as pickles inside a ``StopWordsRemover`` and needed
``PysparkPipelineWrapper.unwrap`` after ``PipelineModel.load`` to get them back (and loading ran
code from the file). Stages now save and load with plain ``save`` / ``load``, so ``unwrap`` is
kept only so that old programs run: it returns its argument unchanged.

:func:`load_pipeline` loads a saved ``PipelineModel`` reading the directory as data: use it for
a pipeline you did not write (plain ``PipelineModel.load`` imports and calls whatever class each
stage's metadata names; see ``docs/persistence.md``).
"""

from __future__ import annotations

from typing import TypeVar

from sparktorch._pipeline_load import load_pipeline

__all__ = ["PysparkPipelineWrapper", "load_pipeline"]

P = TypeVar("P")


class PysparkPipelineWrapper:
    """Compatibility shim for sparktorch 0.2.0 programs."""

    @staticmethod
    def unwrap(pipeline: P) -> P:
        """Return ``pipeline`` as is (a ``Pipeline`` or ``PipelineModel``); nothing to unwrap."""
        return pipeline
