"""Figures (matplotlib/seaborn) and self-contained HTML reports.

:func:`write_report` writes the report of an experiment kind's ``report_kind``
(``classifier``, ``tokens`` or ``fusion``) into the layout's report directory.
"""
from __future__ import annotations

from typing import Any


def write_report(exp: Any, cfg: Any, lay: Any):
    from attnlab.report.classifier import write_classifier_report
    from attnlab.report.fusion import write_fusion_report
    from attnlab.report.tokens import write_tokens_report

    writers = {"classifier": write_classifier_report, "tokens": write_tokens_report, "fusion": write_fusion_report}
    return writers[exp.report_kind](exp, cfg, lay)
