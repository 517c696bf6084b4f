"""The ``params.yaml`` schema: typed, validated once at the edge, clear errors.

Every stage loads the whole file through :func:`load_params`, so an unknown key, a
wrong type or an unknown experiment anywhere stops the stage before it writes
anything, with one line naming the key and what was expected.

The schema of an experiment kind lives with the kind (its module of
:mod:`attnlab.experiments`, from the shared sections of :mod:`attnlab.schema`);
:data:`EXPERIMENTS` is built from :data:`attnlab.experiments.KINDS`, so adding a kind
needs no edit here. This module is the public entry point: every schema class, the
device helpers and :func:`flatten` are importable from it as before. Loading params does
not import torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from attnlab import methods as method_registry
from attnlab.experiments import KINDS
# Re-exported (``from attnlab.config import MotionParams, stage_device, ...`` keeps working):
# the shared sections and helpers, then the built-in kinds' own schema classes.
from attnlab.schema import (_DEVICE, Aggregate, ClassifierEvaluate, ClassifierParams, ConfigError,  # noqa: F401
                            EncoderModel, Evaluate, Explain, Extract, HeadOptions, HeadsDivideWidth, InputOptions,
                            Knockout, MethodsSection, NoSection, Report, SampleCap, Sanity, Section, SequenceOptions,
                            TokensExplain, Train, aggregate_fits_store, check_device, did_you_mean, flatten,
                            resolve_device, stage_device)
from attnlab.experiments.motion import MotionParams, MotionPrepare  # noqa: F401
from attnlab.experiments.tokens import (CausalModel, TokensEvaluate, TokensParams, TokensPrepare,  # noqa: F401
                                        TokensReport)
from attnlab.experiments.clips import (FramesParams, FramesPrepare, SpaceTimeExplain, SpaceTimeModel,  # noqa: F401
                                       VideoParams, VideoPrepare)
from attnlab.experiments.fusion import (FusionEvaluate, FusionExplain, FusionModel, FusionParams,  # noqa: F401
                                        FusionPrepare, FusionTrain, Stream)
from attnlab.experiments.pretrained import (PretrainedExplain, PretrainedModel, PretrainedParams,  # noqa: F401
                                            PretrainedPrepare)
from attnlab.experiments.external import (ExternalExplain, ExternalModel, ExternalParams,  # noqa: F401
                                          ExternalPrepare)

#: Experiment kind -> its params schema, in the kinds' order (``Experiment.order``).
EXPERIMENTS: dict[str, type[Section]] = {name: kind.params for name, kind in KINDS.items()}
TOP_LEVEL = ("experiments", "externals", "device")


class Params:
    """A validated params file: the ``experiments`` to run, the ``externals`` (models
    trained elsewhere: name -> the directory holding their files), the ``device`` the
    stages run models on, and a section per instance.

    An instance is a top-level section named like a kind (``motion:``), or any name with
    ``kind: <kind>`` inside (``motion_cls: {kind: motion, model: {pooling: cls}}``), so
    several instances of one kind run side by side, each with its own outputs and MLflow
    experiment. ``params.motion`` is the section of instance ``motion``."""

    def __init__(self, experiments: list[str], sections: dict[str, tuple[str, Section]],
                 externals: dict[str, str] | None = None, device: str = "auto"):
        self.experiments = experiments
        self.externals = externals or {}       # instance of kind external -> the directory of its files
        self.device = device                   # auto | cpu | cuda | cuda:N (see resolve_device)
        self._sections = sections
        for _, section in sections.values():
            section._device = device

    def kind(self, name: str) -> str:
        """The experiment kind of instance ``name``."""
        return self._section(name)[0]

    def experiment(self, name: str) -> Section:
        """The section of experiment ``name``; it must be listed in ``experiments`` or ``externals``."""
        if name not in self.experiments and name not in self.externals:
            listed = [*self.experiments, *self.externals]
            raise ConfigError(f"experiment {name!r} is not listed in params.yaml 'experiments' or 'externals'"
                              f"{did_you_mean(name, listed)} (listed: {', '.join(listed) or 'none'})")
        return self._section(name)[1]

    def _section(self, name: str) -> tuple[str, Section]:
        if name not in self._sections:
            raise ConfigError(f"no section {name!r}; sections: {', '.join(self._sections) or 'none'}")
        return self._sections[name]

    def __getattr__(self, name: str) -> Section:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._sections[name][1] if name in self._sections else None


def _instance(name: str, data: Any) -> tuple[str, Section]:
    """Validate one instance section: its ``kind`` (default: the section's name) and its knobs."""
    if data is None or (not isinstance(data, dict) and did_you_mean(name, TOP_LEVEL)):
        data = {}                              # a misspelt top-level key (devcie: cpu) is reported below
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a mapping, got {type(data).__name__}")
    kind = data.get("kind", name)
    if kind not in EXPERIMENTS:
        if "kind" in data:
            raise ValueError(f"{name}.kind: unknown experiment kind {kind!r}{did_you_mean(kind, EXPERIMENTS)}; "
                             f"accepted: {', '.join(EXPERIMENTS)}")
        suggestion = did_you_mean(name, [*TOP_LEVEL, *EXPERIMENTS])
        raise ValueError(f"unknown key {name!r}{suggestion}; accepted: {', '.join(TOP_LEVEL)}, {', '.join(EXPERIMENTS)}, "
                         "or a section with 'kind: <one of those>'")
    try:
        section = EXPERIMENTS[kind].model_validate({k: v for k, v in data.items() if k != "kind"})
    except ValidationError as err:
        raise ValueError(_one_line(err, prefix=name)) from None
    explain = getattr(section, "explain", None)
    if isinstance(explain, MethodsSection):
        given = data.get("explain")
        if isinstance(given, dict) and "methods" in given:
            try:
                method_registry.check_experiment(explain.methods, kind)
            except ValueError as err:
                raise ValueError(f"{name}.explain.methods: {err}") from None
        else:                                  # the defaults: those that can explain this kind's models
            kept = [m for m in explain.methods if kind not in method_registry.get(m).unsupported]
            section = section.model_copy(update={"explain": explain.model_copy(update={"methods": kept})})
        section = _knockout_method(name, section)
    return kind, section


def _knockout_method(name: str, section: Section) -> Section:
    """``evaluate.knockout.method`` resolved (null: rollout if listed, else the first of
    ``explain.methods``) and checked to be one of ``explain.methods``."""
    evaluate, explain = getattr(section, "evaluate", None), getattr(section, "explain", None)
    knockout = getattr(evaluate, "knockout", None)
    if knockout is None or not isinstance(explain, MethodsSection) or not explain.methods:
        return section
    method = knockout.chosen(explain.methods)
    if method not in explain.methods:
        raise ValueError(f"{name}.evaluate.knockout.method: {method!r} is not among {name}.explain.methods "
                         f"({', '.join(explain.methods)}); pick one of them or set knockout.samples: 0")
    knockout = knockout.model_copy(update={"method": method})
    return section.model_copy(update={"evaluate": evaluate.model_copy(update={"knockout": knockout})})


def _one_line(err: ValidationError, prefix: str = "") -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in ([prefix] if prefix else []) + list(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("value_error", "missing") and "input" in first:
        msg += f" (got {first['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raises :class:`ConfigError` with one line."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    experiments = data.get("experiments")
    if not isinstance(experiments, list) or not all(isinstance(e, str) for e in experiments):
        raise ConfigError(f"{source}: experiments: expected a list of experiment names, got {experiments!r}")
    externals = data.get("externals") or {}
    if not isinstance(externals, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                  for k, v in externals.items()):
        raise ConfigError(f"{source}: externals: expected a mapping of instance name -> the directory holding "
                          f"its files, got {externals!r}")
    try:
        device = check_device(data.get("device", "auto"))
        sections = {name: _instance(name, value) for name, value in data.items() if name not in TOP_LEVEL}
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    _check_externals(experiments, externals, sections, data, source)
    for i, name in enumerate(experiments):
        if name not in sections:
            if name in EXPERIMENTS:
                raise ConfigError(f"{source}: experiments[{i}]: {name!r} is listed but has no '{name}:' section")
            accepted = [k for k in dict.fromkeys([*EXPERIMENTS, *sections])    # external ones go in externals
                        if (sections[k][0] if k in sections else k) != "external"]
            raise ConfigError(f"{source}: experiments[{i}]: unknown experiment {name!r}"
                              f"{did_you_mean(name, accepted)}; accepted: {', '.join(accepted)}")
    if len(set(experiments)) != len(experiments):
        raise ConfigError(f"{source}: experiments: listed twice: "
                          f"{sorted(e for e in set(experiments) if experiments.count(e) > 1)[0]!r}")
    return Params(experiments, sections, externals, device)


def _check_externals(experiments: list[str], externals: dict[str, str],
                     sections: dict[str, tuple[str, Section]], data: dict[str, Any], source: str) -> None:
    """External instances are listed under ``externals`` only (they are not trained),
    write out every stage section (``dvc.yaml`` tracks each; ``{}`` takes the defaults)
    and name files inside their directory, the one ``dvc.yaml`` watches for them."""
    for i, name in enumerate(experiments):
        if name in sections and sections[name][0] == "external":
            raise ConfigError(f"{source}: experiments[{i}]: {name!r} is of kind external (a model trained "
                              f"elsewhere): list it under 'externals: {{{name}: DIR}}' instead")
    for name, directory in externals.items():
        if name in experiments:
            raise ConfigError(f"{source}: externals: {name!r} is also listed in experiments")
        if name not in sections or sections[name][0] != "external":
            raise ConfigError(f"{source}: externals: {name!r} needs a '{name}:' section with 'kind: external'")
        cfg = sections[name][1]
        missing = [k for k in type(cfg).model_fields if k not in data[name]]
        if missing:
            raise ConfigError(f"{source}: {name}: missing section {missing[0]!r} (write '{missing[0]}: {{}}' for "
                              "the defaults: dvc.yaml tracks every stage's section)")
        root = Path(directory).resolve()
        for key, files in (("model", cfg.model.files()), ("prepare", cfg.prepare.files())):
            for f in files:
                if not Path(f).resolve().is_relative_to(root):
                    raise ConfigError(f"{source}: {name}.{key}: {f!r} is outside {directory!r}, the directory "
                                      f"'externals' names for {name!r} (dvc.yaml watches only that directory)")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse_params(data, str(path))
