"""The stage runner: what ``stages/<name>.py`` calls (``run("train")``).

``run("train")`` parses ``<experiment> [--params FILE] [--data DIR]``, validates the
whole params file, looks the experiment instance's kind up, sets torch's intra-op threads when
``ATTNLAB_NUM_THREADS`` is set (default: torch's, one per core; set it to 1 when
several stages run at once, e.g. ``dvc queue start -j 2``), and runs the stage's
function of :mod:`attnlab.pipeline.stages` with a :class:`~attnlab.layout.Layout` whose
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

A stage that succeeds records when it ran (:func:`~attnlab.pipeline.timing.record_timing`).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from attnlab.config import ConfigError, load_params, stage_device
from attnlab.io import DataError, ServerUnreachable, atomic_dir, require_tracking_server
from attnlab.layout import STAGES, Layout
from attnlab.pipeline.timing import now_ms, record_timing


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
    start_ms = now_ms()
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

    import attnlab.distributed as distributed
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
        record_timing(Layout(root), name, start_ms, now_ms(),     # only a stage that succeeded
                      processes=distributed.world_size() if parallel else 1)
    else:
        out = Path(distributed.broadcast(None))
        yield StageContext(name, experiment, cfg, Layout(root, writing=(name, out)))
        distributed.barrier()


def run(name: str, argv: list[str] | None = None, *, progress: bool = True) -> None:
    """Run stage ``name`` for the experiment named on the command line (``argv``)."""
    import attnlab.distributed as distributed
    from attnlab.pipeline.stages import STAGE_FUNCTIONS

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
