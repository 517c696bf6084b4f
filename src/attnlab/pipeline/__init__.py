"""The pipeline: the stage runner, the stage bodies and the records of when stages ran.

* :mod:`attnlab.pipeline.runner` — ``run("train")``, what ``stages/<name>.py`` calls:
  arguments, params, the experiment kind, an atomic stage directory, clean failures.
* :mod:`attnlab.pipeline.stages` — what every stage does, the same way for every
  experiment kind (``STAGE_FUNCTIONS``); also run on a directory by ``attnlab explain``.
* :mod:`attnlab.pipeline.timing` — when each stage ran (the track stage's start and end).

``from attnlab.pipeline import run`` is the stage scripts' one import.
"""
from __future__ import annotations

from typing import Any

from attnlab.pipeline.runner import StageContext, run, stage
from attnlab.pipeline.timing import now_ms, outputs_digest, record_timing, stage_records, stage_times

_now_ms = now_ms                 # the name before attnlab.pipeline was a package


def __getattr__(name: str) -> Any:
    """``STAGE_FUNCTIONS`` and the stage bodies, loaded when asked for (they import torch)."""
    if name == "STAGE_FUNCTIONS":
        from attnlab.pipeline.stages import STAGE_FUNCTIONS

        return STAGE_FUNCTIONS
    raise AttributeError(f"module 'attnlab.pipeline' has no attribute {name!r}")


__all__ = ["STAGE_FUNCTIONS", "StageContext", "now_ms", "outputs_digest", "record_timing", "run", "stage",
           "stage_records", "stage_times"]
