"""Experiment kinds: what differs between the experiments named in params.yaml.

The stages in ``stages/`` are the same for every experiment; they look the kind up
here and run the shared stage logic of :mod:`attnlab.workflow` with it.
"""
from __future__ import annotations

from attnlab.experiments.base import ClassifierExperiment, Experiment, Explained, Perturbation, Prepared
from attnlab.experiments.clips import FramesExperiment, VideoExperiment
from attnlab.experiments.external import ExternalExperiment
from attnlab.experiments.fusion import FusionExperiment
from attnlab.experiments.motion import MotionExperiment
from attnlab.experiments.tokens import TokensExperiment

KINDS: dict[str, type[Experiment]] = {kind.name: kind for kind in (
    MotionExperiment, TokensExperiment, FramesExperiment, VideoExperiment, FusionExperiment, ExternalExperiment)}


def get_experiment(name: str) -> Experiment:
    if name not in KINDS:
        raise KeyError(f"unknown experiment {name!r}; accepted: {', '.join(KINDS)}")
    return KINDS[name]()


__all__ = ["ClassifierExperiment", "Experiment", "Explained", "KINDS", "Perturbation", "Prepared",
           "get_experiment"]
