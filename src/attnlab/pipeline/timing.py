"""When each stage ran: the records the runner writes and the track stage reads.

A stage that succeeds records when it ran (:func:`record_timing`, in
``data/<experiment>/.timings/<stage>.json``: wall-clock start and end, a digest of its
outputs, and the processes and threads it ran with); the track stage gives its MLflow
run the real start and end of the state from these (:func:`stage_records`,
:func:`stage_times`) and a tag per stage with its time and resources.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from attnlab.io import hash_file
from attnlab.layout import Layout


def now_ms() -> int:
    """Wall-clock time in ms since the epoch."""
    return int(time.time() * 1000)


def outputs_digest(directory: str | Path) -> str:
    """SHA-256 of every file under ``directory``: relative path and content."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0")
        hash_file(h, path)
    return h.hexdigest()


def record_timing(lay: Layout, stage: str, start_ms: int, end_ms: int, *, processes: int = 1) -> None:
    """Write ``lay.timing(stage)`` atomically: the stage's wall-clock start and end (ms
    since the epoch), the processes and threads per process it ran with, and the digest
    of the outputs it wrote, which tells later whether the outputs in place are still
    the ones these times belong to (a stage that never imported torch, e.g. a report,
    has no thread count). Not a DVC output."""
    torch = sys.modules.get("torch")
    path = lay.timing(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "start_ms": int(start_ms), "end_ms": int(end_ms), "processes": int(processes),
              "outputs_sha256": outputs_digest(lay.dir(stage))}
    if torch is not None:
        record["threads"] = torch.get_num_threads()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def stage_records(lay: Layout, stages: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """The record (:func:`record_timing`) of each of ``stages``, or ``None`` where it is
    unknown: no record, or one whose outputs digest differs from their outputs now
    (outputs restored from DVC's cache or checked out from another state)."""
    out: dict[str, dict[str, Any] | None] = {}
    for stage in stages:
        try:
            record = json.loads(lay.timing(stage).read_text())
            known = record["outputs_sha256"] == outputs_digest(lay.dir(stage))
            record["start_ms"], record["end_ms"] = int(record["start_ms"]), int(record["end_ms"])
        except (OSError, ValueError, KeyError, TypeError):
            known = False
        out[stage] = record if known else None
    return out


def stage_times(records: dict[str, dict[str, Any] | None]) -> tuple[int | None, int | None, list[str]]:
    """``(start, end, unknown)`` of :func:`stage_records`: the earliest start and the
    latest end (ms since the epoch; ``None`` when none is known), and the stages whose
    times are unknown."""
    known = [r for r in records.values() if r is not None]
    return (min((r["start_ms"] for r in known), default=None), max((r["end_ms"] for r in known), default=None),
            [stage for stage, r in records.items() if r is None])
