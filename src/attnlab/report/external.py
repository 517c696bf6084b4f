"""Deprecated: ``attnlab explain`` directories are reported by the pipeline's report stage
(:func:`attnlab.external.write_directory_report`); this name works for one release and warns."""
from __future__ import annotations

import warnings
from pathlib import Path


def write_external_report(out: str | Path) -> Path:
    from attnlab.external import write_directory_report

    warnings.warn("attnlab.report.external.write_external_report is deprecated; use "
                  "attnlab.external.write_directory_report", DeprecationWarning, stacklevel=2)
    return write_directory_report(out)
