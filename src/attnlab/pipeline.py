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
full disk, and the stage's temporary directory is removed.
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

from attnlab.config import ConfigError, load_params
from attnlab.io import DataError, atomic_dir
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
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"attnlab '{name}' stage")
    parser.add_argument("experiment")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data")
    args = parser.parse_args(argv)
    import torch

    from attnlab.experiments import get_experiment

    if os.environ.get("ATTNLAB_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["ATTNLAB_NUM_THREADS"]))
    try:
        params = load_params(args.params)
        cfg = params.experiment(args.experiment)
        experiment = get_experiment(params.kind(args.experiment))
    except (ConfigError, KeyError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    root = Path(args.data) / args.experiment
    with atomic_dir(root / name) as out:
        yield StageContext(name, experiment, cfg, Layout(root, writing=(name, out)))


def run(name: str, argv: list[str] | None = None, *, progress: bool = True) -> None:
    """Run stage ``name`` for the experiment named on the command line (``argv``)."""
    from attnlab.workflow import STAGE_FUNCTIONS

    with stage(name, argv) as s:
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
