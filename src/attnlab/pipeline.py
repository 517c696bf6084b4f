"""Wiring shared by the DVC stage scripts in ``stages/``.

``run("train")`` parses ``<experiment> [--params FILE] [--data DIR]``, validates the
whole params file, looks the experiment instance's kind up, sets torch's intra-op threads when
``ATTNLAB_NUM_THREADS`` is set (default: torch's, one per core; set it to 1 when
several stages run at once, e.g. ``dvc queue start -j 2``), and runs the stage's
function of :mod:`attnlab.workflow` with a :class:`~attnlab.layout.Layout` whose
stage directory is a temporary one, renamed to ``data/<experiment>/<stage>/`` only if
the stage succeeds. A bad params file or experiment name ends the process with one
line on stderr and exit status 2, before anything is written; so does a damaged input
file (:class:`~attnlab.io.DataError`: a truncated checkpoint or attention store) or a
full disk, and the stage's temporary directory is removed. When ``MLFLOW_TRACKING_URI``
names an http(s) tracking server, every stage first checks that it answers (within
seconds; :func:`attnlab.io.require_tracking_server`) and otherwise stops the same way,
before any work: a server that is down never costs a training run.

Train, extract and aggregate run as several processes under ``torchrun`` (started by
hand, or by the stage script itself when ``ATTNLAB_NPROC`` > 1): process 0 owns the
temporary directory and the others write into it only what process 0 merges
(:mod:`attnlab.distributed`).

A stage that succeeds records when it ran (:func:`record_timing`, in
``data/<experiment>/.timings/<stage>.json``: wall-clock start and end, and a digest of
its outputs, and the processes and threads it ran with); the track stage gives its
MLflow run the real start and end of the state from these (:func:`stage_records`,
:func:`stage_times`) and a tag per stage with its time and resources.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from attnlab.config import ConfigError, load_params, stage_device
from attnlab.io import DataError, ServerUnreachable, atomic_dir, hash_file, require_tracking_server
from attnlab.layout import STAGES, Layout


@dataclass
class StageContext:
    name: str
    experiment: Any        # the experiment kind (attnlab.experiments.Experiment)
    cfg: Any               # its validated params section
    layout: Layout         # its files; the running stage's resolve into its temporary directory


@contextlib.contextmanager
def stage(name: str, argv: list[str] | None = None) -> Iterator[StageContext]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    start_ms = _now_ms()
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"attnlab '{name}' stage")
    parser.add_argument("experiment")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data")
    args = parser.parse_args(argv)
    try:            # a tracking server that is down fails every stage at once, not track after training
        require_tracking_server()
    except ServerUnreachable as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import torch

    from attnlab import distributed
    from attnlab.experiments import get_experiment

    if os.environ.get("ATTNLAB_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["ATTNLAB_NUM_THREADS"]))
    try:
        params = load_params(args.params)
        cfg = params.experiment(args.experiment)
        experiment = get_experiment(params.kind(args.experiment))
        parallel = name in distributed.STAGES
        if not parallel and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"the {name!r} stage runs in one process; torchrun runs "
                              f"{', '.join(distributed.STAGES)}")
        if parallel and argv is None:          # NPROC=N make run: this stage again, under torchrun
            distributed.relaunch(name, sys.argv)
    except (ConfigError, KeyError, ValueError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    if parallel:
        distributed.init(stage_device(cfg))
        if distributed.active() and distributed.is_main():
            print(f"{name}: {distributed.world_size()} processes (torchrun, {distributed.backend()})",
                  file=sys.stderr)
    root = Path(args.data) / args.experiment
    if not parallel or distributed.is_main():  # under torchrun only process 0 writes the outputs
        with atomic_dir(root / name) as out:
            if parallel:
                distributed.broadcast(str(out))
            yield StageContext(name, experiment, cfg, Layout(root, writing=(name, out)))
            if parallel:
                distributed.barrier()          # every process done before the directory is renamed
        record_timing(Layout(root), name, start_ms, _now_ms(),     # only a stage that succeeded
                      processes=distributed.world_size() if parallel else 1)
    else:
        out = Path(distributed.broadcast(None))
        yield StageContext(name, experiment, cfg, Layout(root, writing=(name, out)))
        distributed.barrier()


def run(name: str, argv: list[str] | None = None, *, progress: bool = True) -> None:
    """Run stage ``name`` for the experiment named on the command line (``argv``)."""
    from attnlab import distributed
    from attnlab.workflow import STAGE_FUNCTIONS

    with contextlib.ExitStack() as cleanup:
        if name in distributed.STAGES:
            cleanup.callback(distributed.shutdown)
        s = cleanup.enter_context(stage(name, argv))
        try:
            STAGE_FUNCTIONS[name](s.experiment, s.cfg, s.layout, progress=progress)
        except DataError as err:               # a damaged input file: one line, nothing written
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            what = Path(err.filename).name if err.filename else "its outputs"
            print(f"error: no space left on device: the {name!r} stage of {s.layout.root} stopped while writing "
                  f"{what} and wrote nothing (its temporary directory was removed); free some space and re-run",
                  file=sys.stderr)
            raise SystemExit(2) from None


# --------------------------------------------------------------------------- stage timings
def _now_ms() -> int:
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
    the ones these times belong to. Not a DVC output."""
    import torch

    path = lay.timing(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "start_ms": int(start_ms), "end_ms": int(end_ms), "processes": int(processes),
              "threads": torch.get_num_threads(), "outputs_sha256": outputs_digest(lay.dir(stage))}
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
