"""Experiment kinds: what differs between the experiments named in params.yaml.

A kind is one module of this package defining an :class:`Experiment` subclass that
names itself (``name``), its params schema (``params``), its data, model, items,
ground truth and report (``write_report``). :data:`KINDS` is found here, not listed:
every module of the package is imported and its kinds collected, so adding a kind is
adding its module (and its data/model code). The stages in ``stages/`` are the same for
every experiment; they look the kind up here and run :mod:`attnlab.pipeline.stages` with it.
"""
from __future__ import annotations

import importlib
import pkgutil

from attnlab.config import EXPERIMENTS
from attnlab.experiments.base import ClassifierExperiment, Experiment, Explained, Perturbation, Prepared


def _kinds() -> dict[str, type[Experiment]]:
    """Every named :class:`Experiment` subclass defined in a module of this package, in the
    order of the params schemas (``config.EXPERIMENTS``), then by name."""
    found: dict[str, type[Experiment]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Experiment) and obj.__module__ == module.__name__
                    and obj.name):
                if obj.name in found:
                    raise RuntimeError(f"experiment kind {obj.name!r} is defined twice: by "
                                       f"{found[obj.name].__module__} and {module.__name__}")
                found[obj.name] = obj
                globals()[obj.__name__] = obj  # from attnlab.experiments import MotionExperiment
    order = list(EXPERIMENTS)
    return dict(sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


KINDS: dict[str, type[Experiment]] = _kinds()


def get_experiment(name: str) -> Experiment:
    if name not in KINDS:
        raise KeyError(f"unknown experiment {name!r}; accepted: {', '.join(KINDS)}")
    return KINDS[name]()


__all__ = ["ClassifierExperiment", "Experiment", "Explained", "KINDS", "Perturbation", "Prepared",
           "get_experiment"]
