"""Figures (matplotlib/seaborn) and self-contained HTML reports.

Each experiment kind owns its report (:meth:`~attnlab.experiments.Experiment.write_report`):
the classifier's sections (:mod:`attnlab.report.classifier`) by default, the token and
fusion kinds their own (:mod:`attnlab.report.tokens`, :mod:`attnlab.report.fusion`).
:mod:`attnlab.report.figures` and :mod:`attnlab.report.html` are the primitives they draw
with; :mod:`attnlab.report.index` is the page over every experiment.
"""
from __future__ import annotations

from typing import Any


def write_report(exp: Any, cfg: Any, lay: Any):
    """The report of experiment kind ``exp`` (its own :meth:`write_report`)."""
    return exp.write_report(cfg, lay)
