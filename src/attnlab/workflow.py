"""Deprecated: the stage bodies are :mod:`attnlab.pipeline.stages` (this name works for one
release and warns)."""
from __future__ import annotations

import warnings
from typing import Any

from attnlab.pipeline import stages as _stages

warnings.warn("attnlab.workflow is deprecated; use attnlab.pipeline.stages", DeprecationWarning, stacklevel=2)


#: Helpers that moved below the pipeline (used by the command line as well).
_MOVED = {"write_curves": "attnlab.evaluate.summaries", "self_attention_only": "attnlab.evaluate.summaries"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    return getattr(_stages, name)


def __dir__() -> list[str]:
    return dir(_stages)
