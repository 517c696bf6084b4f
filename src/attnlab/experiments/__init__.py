"""Experiments: what each pipeline stage does for each experiment named in params.yaml.

The stages in ``stages/`` are the same for every experiment; they look the
experiment up here and call its methods with its validated params section.
"""
from __future__ import annotations

from attnlab.experiments.base import ClassifierExperiment
from attnlab.experiments.clips import FramesExperiment, VideoExperiment
from attnlab.experiments.fusion import FusionExperiment
from attnlab.experiments.motion import MotionExperiment
from attnlab.experiments.tokens import TokensExperiment

REGISTRY: dict[str, type[ClassifierExperiment]] = {
    "motion": MotionExperiment, "tokens": TokensExperiment, "frames": FramesExperiment, "video": VideoExperiment,
    "fusion": FusionExperiment}


def get_experiment(name: str) -> ClassifierExperiment:
    if name not in REGISTRY:
        raise KeyError(f"unknown experiment {name!r}; accepted: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


__all__ = ["ClassifierExperiment", "REGISTRY", "get_experiment"]
