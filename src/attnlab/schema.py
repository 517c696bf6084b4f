"""What every experiment kind's params schema is made of: the base :class:`Section`, the
sections several kinds share (training, extraction, aggregation, explanation, evaluation,
report), the device setting and :class:`ConfigError`.

A kind's own sections (its ``prepare``, its ``model``, its whole params class) live in
its module of :mod:`attnlab.experiments`; :mod:`attnlab.config` builds the map of kinds
from there and validates ``params.yaml`` (and re-exports every schema class, so
``from attnlab.config import MotionParams`` works as before). Nothing here imports torch
at import time (only the device helpers do, when they run).
"""
from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from attnlab import methods as method_registry
from attnlab.selection import Selection

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A malformed ``params.yaml``; the message is one line naming the key."""


def did_you_mean(word: Any, choices: Any) -> str:
    """`` (did you mean 'lr'?)`` when one of ``choices`` is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors naming the closest accepted
    key and listing them all; numbers must be finite and never booleans; an empty
    sub-section (``train:`` with nothing under it) means its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # the params file's top-level ``device`` (set on each instance section by parse_params;
    # not a field: it is not a knob of the experiment, nor logged or fingerprinted with it)
    _device: str = PrivateAttr("auto")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields), key=str)
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], cls.model_fields)}; "
                                 f"accepted: {', '.join(cls.model_fields)}")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``true`` as 1 for a number; YAML's ``yes``/``on`` are booleans too.
        An empty sub-section (``None``) is its defaults."""
        annotation = cls.model_fields[info.field_name].annotation
        if value is None and isinstance(annotation, type) and issubclass(annotation, Section):
            return {}
        if isinstance(value, bool):
            kinds = set(get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got the boolean {value!r}")
        return value


# --------------------------------------------------------------------------- model, train, extract, aggregate
class HeadsDivideWidth(Section):
    """A model section whose attention splits ``d_model`` over ``nhead`` heads."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "HeadsDivideWidth":
        if self.d_model % self.nhead:
            raise ValueError(f"d_model={self.d_model} must be divisible by nhead={self.nhead}")
        return self


class EncoderModel(HeadsDivideWidth):
    d_model: int = Field(32, gt=0)
    nhead: int = Field(4, gt=0)
    num_layers: int = Field(2, gt=0)
    dim_feedforward: int = Field(64, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pooling: Literal["mean", "cls"] = "mean"
    positional: bool = False
    norm_first: bool = False


class Train(Section):
    epochs: int = Field(60, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["constant", "onecycle"] = "constant"   # onecycle: warm-up then cosine decay (per step)
    warmup: float = Field(0.15, ge=0.0, lt=1.0)              # onecycle: share of the steps spent warming up
    seed: int = 0


class Extract(Section):
    """What the extract stage stores of each recorded attention entry (see
    :class:`attnlab.selection.Selection`); a later stage that needs more is refused when the
    params are loaded, naming the key to change."""

    batch_size: int = Field(16, gt=0)
    layers: Literal["all"] | list[int] = "all"          # entries (attention calls) kept; negative from the end
    heads: Literal["all", "mean"] | list[int] = "all"   # heads kept, or their mean
    rows: Literal["all", "cls"] | list[int] = "all"     # query rows kept (cls: row 0, the class token's)
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"

    @model_validator(mode="after")
    def _valid_selection(self) -> "Extract":
        self.selection()
        return self

    def selection(self) -> Selection:
        """The :class:`~attnlab.selection.Selection` these knobs describe."""
        return Selection(layers=self.layers, heads=self.heads, rows=self.rows, dtype=self.dtype)


class Aggregate(Section):
    """Vocabulary x vocabulary aggregation of the stored attention (``VocabAttention``): the
    token kinds' ``aggregate`` section (``tokens``, ``pretrained``, ``external`` on token ids)."""

    attention: Literal["layer", "mean", "rollout"] = "layer"   # which attention is aggregated
    layers: list[int] = Field([0], min_length=1)   # with attention: layer, each its own matrices
                                                   # (negative counts from the end); the first is the headline
    heads: bool = True                         # one matrix per head as well (layer, mean)
    top_k: int = Field(16, gt=0)               # top pairs by lift (recall@K on planted)
    min_count: int = Field(20, gt=0)           # pairs seen fewer times are not ranked
    exclude: Literal["special"] | list[str] | None = None   # tokens left out of the top pairs: "special"
                                                   # ([CLS], [SEP], <pad>, ...: VocabAttention's rule) or a list
    batch_size: int = Field(64, gt=0)


def aggregate_fits_store(aggregate: Aggregate, extract: Extract) -> None:
    """Refuse (:class:`~attnlab.selection.MissingAttention`, one line naming the ``extract``
    knob) an aggregation the store will not hold: ``VocabAttention`` takes whole
    ``[N, N]`` maps (every query row) of the aggregated layers, and each head's map
    when ``aggregate.heads`` (not for the rollout, which fuses heads by their mean)."""
    a = aggregate
    extract.selection().require(f"aggregate.attention {a.attention!r}",
                                layers=a.layers if a.attention == "layer" else "all", rows="all",
                                heads="each" if a.heads and a.attention != "rollout" else "any")


# --------------------------------------------------------------------------- explain
class MethodsSection(Section):
    """A section listing explanation methods: each must be in the registry of
    :mod:`attnlab.methods` and defined for the experiment's item kind ``ITEMS``
    (checked here, when params are loaded, not midway through a stage). Left out,
    ``methods`` is every default method of the registry for that kind."""

    ITEMS: ClassVar[str] = "sequence"
    methods: list[str]
    batch_size: int = Field(16, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_methods(cls, data: Any) -> Any:
        if isinstance(data, dict) and "methods" not in data:
            data = {**data, "methods": method_registry.names(cls.ITEMS, default_only=True)}
        return data

    @field_validator("methods")
    @classmethod
    def _registered(cls, methods: list[str]) -> list[str]:
        return method_registry.check(methods, cls.ITEMS)


class HeadOptions(Section):
    head_fusion: Literal["mean", "max", "min"] = "mean"
    residual: bool = True                               # model the skip connection as 0.5 A + 0.5 I


class SequenceOptions(HeadOptions):
    discard_ratio: float = Field(0.0, ge=0.0, lt=1.0)   # rollout: drop this fraction of the smallest entries
    flow_max_pairs: int | None = Field(200_000, gt=0)   # refuse flow beyond this many max-flow problems per batch


class InputOptions(Section):
    ig_steps: int = Field(32, gt=0)                     # integrated gradients: integration points
    baseline: float | Literal["mean"] = 0.0   # a removed item's value, for integrated gradients and the
                                              # deletion/insertion tests ("mean": training mean per feature)


class SampleCap(Section):
    samples: int | None = Field(None, gt=0)    # explain and evaluate only this many test samples, evenly
                                               # spread (None: all); extract and aggregate still read all


class Explain(MethodsSection, SequenceOptions, InputOptions, SampleCap):
    examples: int = Field(4, gt=0)                      # samples drawn with every method's importance


class TokensExplain(MethodsSection, SequenceOptions):
    """Importance of every token for one next-token prediction per test sequence
    (``tokens``; ``pretrained`` explains its sentences' classes with the same knobs)."""

    ITEMS: ClassVar[str] = "tokens"
    batch_size: int = Field(64, gt=0)


class Sanity(Section):
    """The model-parameter randomisation test (:mod:`attnlab.evaluate.sanity`)."""

    samples: int = Field(16, ge=0)             # explained samples explained again per randomisation (0: off)
    threshold: float = Field(0.5, gt=0.0, le=1.0)  # a method passes when mean |Spearman rho| at full
                                               # randomisation is below this
    independent: bool = True                   # also randomise each block alone (not only cascading)


class Knockout(Section):
    """The knockout diagnostic (:mod:`attnlab.evaluate.knockout`): per layer and head, the
    explained rows' attention to the top-``k`` items of ``method`` blocked vs ``k`` random items."""

    samples: int | None = Field(32, ge=0)      # explained samples (spread over them) knocked out (0/null: off)
    k: int = Field(3, gt=0)                    # items whose incoming edges are blocked
    method: str | None = None                  # whose top-k (one of explain.methods; null: rollout if listed,
                                               # else the first listed)

    def chosen(self, methods: list[str]) -> str | None:
        """``method``, or with none given rollout if among ``methods``, else the first of them."""
        return self.method or ("rollout" if "rollout" in methods else (methods[0] if methods else None))


class Evaluate(Section):
    steps: int | None = Field(None, gt=1)      # fractions on the deletion/insertion curves (None: every item)
    seed: int = 0                              # random-baseline importance
    sink_k: int | None = Field(None, gt=0)     # keys counted by the sink score (None: max(1, N/20))
    batch_size: int = Field(64, gt=0)
    resamples: int = Field(1000, gt=0)         # bootstrap resamples of the 95% intervals over samples
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # level of the paired test behind "beats random"
    sanity: Sanity = Sanity()                  # does each method's explanation depend on the weights?


class ClassifierEvaluate(Evaluate):
    ablation: bool = True                      # head importance by zeroing each head
    knockout: Knockout = Knockout()            # does the attention the explanation points at carry the prediction?
    debiased: bool = True                      # also ROAD deletion (interpolated + noise)
    road_noise: float = Field(0.1, ge=0.0)     # ROAD noise std, as a fraction of the inputs' std


class Report(Section):
    examples: int = Field(4, gt=0)


class NoSection(Section):
    """A stage section with no knobs (``dvc.yaml`` declares the section, so
    ``params.yaml`` holds it, empty)."""


class ClassifierParams(Section):
    """The stage sections every classification experiment shares; each adds
    ``prepare`` and ``model``."""

    train: Train = Train()
    extract: Extract = Extract()
    aggregate: NoSection = NoSection()         # no token vocabulary: nothing to aggregate
    explain: Explain = Explain()
    evaluate: ClassifierEvaluate = ClassifierEvaluate()
    report: Report = Report()


# --------------------------------------------------------------------------- device
_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def check_device(value: Any) -> str:
    """``value`` if it is a device setting this machine can use: ``auto``, ``cpu``, ``cuda``
    or ``cuda:N``; otherwise ``ValueError`` naming it (CUDA asked for but not available,
    or a CUDA index beyond the visible devices, included)."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:<index>, got {value!r}")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device: {value!r} but torch.cuda.is_available() is False; use 'auto' or 'cpu'")
        index, count = _DEVICE.fullmatch(value).group(1), torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ValueError(f"device: {value!r} but only {count} CUDA device{'s' if count != 1 else ''} "
                             f"{'are' if count != 1 else 'is'} visible (cuda:0..cuda:{count - 1})")
    return value


def resolve_device(value: str = "auto") -> torch.device:
    """The ``torch.device`` of a device setting: ``auto`` is CUDA when
    ``torch.cuda.is_available()``, else the CPU. A bad setting raises :class:`ConfigError`."""
    import torch

    try:
        value = check_device(value)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def stage_device(cfg: Section) -> torch.device:
    """The device the stages of an experiment section run its model on: the params file's
    top-level ``device`` (``auto`` for a section built directly, not by
    :func:`attnlab.config.parse_params`)."""
    return resolve_device(cfg._device)


# --------------------------------------------------------------------------- logging
def flatten(section: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.002, ...}``: a section's params as flat keys (for MLflow)."""
    out: dict[str, Any] = {}
    for key, value in section:
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
