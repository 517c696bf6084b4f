"""Wiring shared by the DVC stage scripts in ``stages/``.

``with stage("train") as s:`` parses ``<experiment> [--params FILE] [--data DIR]``,
validates the whole params file, looks the experiment up, sets torch's intra-op
threads when ``ATTNLAB_NUM_THREADS`` is set (default: torch's, one per core; set it to 1
when several stages run at once, e.g. ``dvc queue start -j 2``), and gives the stage an
output directory ``s.out`` that replaces ``data/<experiment>/<stage>/`` only if the
block succeeds. A bad params file or experiment name ends the process with one
line on stderr and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from attnlab.config import ConfigError, Section, load_params
from attnlab.experiments import ClassifierExperiment, get_experiment
from attnlab.io import atomic_dir


@dataclass
class StageContext:
    name: str
    experiment: ClassifierExperiment
    cfg: Section
    root: Path            # data/<experiment>
    out: Path             # temporary output dir, renamed to root/<stage> on success

    def dir(self, stage: str) -> Path:
        """The output directory of an upstream stage of the same experiment."""
        return self.root / stage


@contextlib.contextmanager
def stage(name: str, argv: list[str] | None = None) -> Iterator[StageContext]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"attnlab '{name}' stage")
    parser.add_argument("experiment")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data")
    args = parser.parse_args(argv)
    import torch

    if os.environ.get("ATTNLAB_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["ATTNLAB_NUM_THREADS"]))
    try:
        cfg = load_params(args.params).experiment(args.experiment)
        experiment = get_experiment(args.experiment)
    except (ConfigError, KeyError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    root = Path(args.data) / args.experiment
    with atomic_dir(root / name) as out:
        yield StageContext(name, experiment, cfg, root, out)
