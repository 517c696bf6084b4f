"""Experiment kinds: what differs between the experiments named in params.yaml.

A kind is one module of this package defining its params schema (a
:class:`attnlab.schema.Section` subclass, built from the shared sections of
:mod:`attnlab.schema` and its own ``prepare``/``model`` sections) and an
:class:`Experiment` subclass that names itself (``name``), its schema (``params``), its
place in the list of kinds (``order``), its data, model, items, ground truth and report
(``write_report``). :data:`KINDS` is found here, not listed: every module of the package
is imported and its kinds collected, so adding a kind is adding its module (and its
data/model code); :mod:`attnlab.config` validates ``params.yaml`` against
``{name: kind.params}``. The stages in ``stages/`` are the same for every experiment;
they look the kind up here and run :mod:`attnlab.pipeline.stages` with it.

Importing this package (and so validating params) does not import torch: the kind
modules import it, and their data and model code, inside the methods that use them.
"""
from __future__ import annotations

import importlib
import pkgutil

from attnlab.experiments.base import ClassifierExperiment, Experiment, Explained, Perturbation, Prepared


def _kinds() -> dict[str, type[Experiment]]:
    """Every named :class:`Experiment` subclass defined in a module of this package, by
    its ``order``, then by name."""
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
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


KINDS: dict[str, type[Experiment]] = _kinds()


def get_experiment(name: str) -> Experiment:
    if name not in KINDS:
        raise KeyError(f"unknown experiment {name!r}; accepted: {', '.join(KINDS)}")
    return KINDS[name]()


__all__ = ["ClassifierExperiment", "Experiment", "Explained", "KINDS", "Perturbation", "Prepared",
           "get_experiment"]
