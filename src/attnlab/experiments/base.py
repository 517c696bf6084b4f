"""What an experiment kind declares: only what differs between experiments.

A kind says how its data are made (:meth:`Experiment.prepare`), which model it trains
(:meth:`~Experiment.model_spec`) and how a batch is fed to it (:meth:`~Experiment.forward`),
what is explained and how items are read out (:meth:`~Experiment.explained`), how items
are removed for the deletion/insertion tests (:meth:`~Experiment.perturbation`) and
what ground truth exists (the ``evidence`` of :class:`Explained`,
:meth:`~Experiment.ground_truth`). Everything every experiment does the same way —
training loops, extraction, aggregation, explanation, evaluation, tracking — lives once
in :mod:`attnlab.pipeline.stages`; the stage files are listed in :mod:`attnlab.layout`.

:class:`ClassifierExperiment` is the base of the classification kinds (one label per
sample; its predicted class is explained); the ``tokens`` kind is an
:class:`Experiment` of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:                      # torch, the items and the models load when a stage needs them:
    import torch                       # validating params (which imports every kind) does not
    from torch import nn

    from attnlab.items import Items


@dataclass
class Prepared:
    """A prepared dataset: arrays (``x_train``/``y_train``/``x_test``/``y_test``... ) and
    meta (``classes``, ``n_items``, ``source``, ...); ``compress=False`` for noise-like data."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    compress: bool = True


@dataclass
class Explained:
    """What the explain and evaluate stages explain: one output of each explained sample (``M``).

    ``forward(model, x_rows, rows)`` gives the explained logits ``[b, C]`` of the samples
    ``rows`` (a slice into ``x``); ``items`` maps attention and inputs to items (its
    per-sample parts sliced the same way); ``evidence`` marks the items that carry the
    planted evidence, ``valid`` the items that can matter at all (others are ranked last
    by every method); ``saved`` are arrays stored beside the importance; ``rows`` ``[M]``:
    which test samples are explained, when not all of them are (None: sample ``i`` is test
    sample ``i``)."""

    x: torch.Tensor
    items: Items
    forward: Callable[[nn.Module, torch.Tensor, slice], torch.Tensor]
    y: torch.Tensor | None = None
    evidence: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    saved: dict[str, np.ndarray] = field(default_factory=dict)
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Perturbation:
    """What the deletion/insertion tests and head ablation run: ``fn(x', **forward_kwargs)
    -> logits`` on ``x`` (rows of the explained samples) with items removed by ``masker``."""

    fn: Callable[..., torch.Tensor]
    x: torch.Tensor
    masker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    forward_kwargs: dict[str, Any] | None = None


class Experiment:
    """The contract of an experiment kind (see the module docstring)."""

    name: ClassVar[str] = ""              # the kind's name in params.yaml (kind: <name>)
    params: ClassVar[type | None] = None  # its params schema (a schema.Section subclass, defined in its module)
    order: ClassVar[int] = 1000           # where it comes in KINDS (and error messages): lowest first, then by name
    item_name: ClassVar[str] = "item"     # what the items are: timestep, frame, patch, stream, token
    report_kind: ClassVar[str] = "classifier"   # which report section write_report draws (informative)

    def write_report(self, cfg: Any, lay: Any) -> Any:
        """The kind's report: ``report.html`` in ``lay.dir("report")`` (the classifier's
        sections by default: data, model, attention, importance, evaluation)."""
        from attnlab.report.classifier import write_classifier_report

        return write_classifier_report(self, cfg, lay)

    def prepare(self, cfg: Any) -> Prepared:
        raise NotImplementedError

    def model_spec(self, cfg: Any, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``(factory, kwargs)`` of the model, a factory the project ships."""
        raise NotImplementedError

    def load_model(self, cfg: Any, lay: Any) -> nn.Module:
        """The model the later stages explain: the train stage's checkpoint, in eval mode."""
        from attnlab.models import load_checkpoint

        return load_checkpoint(lay.model)

    def model_reference(self, cfg: Any, lay: Any) -> dict[str, Any] | None:
        """For a model not trained here: what identifies it (MLflow logs this, not the model)."""
        return None

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch)

    def fit(self, cfg: Any, model: nn.Module, data: dict[str, torch.Tensor], *,
            progress: bool = False) -> tuple[Any, dict[str, Any]]:
        """Train ``model``: ``(history DataFrame, final metrics)``."""
        raise NotImplementedError

    def test_inputs(self, data: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The test inputs, batched along dim 0 (a tuple is sliced and fed together)."""
        raise NotImplementedError

    def extract_outputs(self, cfg: Any, model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Arrays the extract stage stores besides attention: ``{layout file name: arrays}``."""
        return {}

    def explained(self, cfg: Any, data: dict[str, torch.Tensor], meta: dict[str, Any]) -> Explained:
        raise NotImplementedError

    def baseline(self, cfg: Any, data: dict[str, torch.Tensor]) -> float | torch.Tensor:
        """What a removed input value becomes (integrated gradients, deletion/insertion)."""
        return float(getattr(cfg.explain, "baseline", 0.0))

    def perturbation(self, cfg: Any, model: nn.Module, data: dict[str, torch.Tensor], meta: dict[str, Any],
                     explained: Explained) -> Perturbation:
        raise NotImplementedError

    def head_masks(self, cfg: Any, data: dict[str, torch.Tensor]) -> tuple[bool, torch.Tensor | None]:
        """``(causal, mask [N, L] of real tokens or None)`` for the head diagnostics."""
        return False, None

    def ground_truth(self, cfg: Any, lay: Any, model: nn.Module, data: dict[str, torch.Tensor],
                     meta: dict[str, Any], explained: Explained) -> dict[str, Any]:
        """Metrics against what the data know to be true, beyond the evidence items."""
        return {}

    def example_figure(self, data: dict[str, torch.Tensor], meta: dict[str, Any], i: int,
                       importance: dict[str, np.ndarray], title: str):
        """The figure of one explained test sample (importance of every method); None: none."""
        return None


class ClassifierExperiment(Experiment):
    """One label per sample, the predicted class is explained; items along dim 1 of
    ``x [N, T, ...]`` by default. Subclasses set ``name``, ``params``, ``item_name`` and
    implement ``prepare`` and ``model_spec``."""

    def fit(self, cfg, model, data, *, progress=False):
        from attnlab.training import fit_classifier

        history = fit_classifier(model, data["x_train"], data["y_train"], data["x_test"], data["y_test"],
                                 cfg.train, forward=self.forward, param_groups=self.param_groups(cfg, model),
                                 progress=progress)
        return history, final_metrics(history)

    def param_groups(self, cfg: Any, model: nn.Module) -> list[dict] | None:
        """Optimizer parameter groups for training (None: one group at ``train.lr``)."""
        return None

    def test_inputs(self, data):
        return data["x_test"]

    def extract_outputs(self, cfg, model, data):
        from attnlab.training import predict

        prob = predict(model, data["x_test"], forward=self.forward).softmax(-1)
        return {"predictions": {"y": data["y_test"].numpy(), "pred": prob.argmax(-1).numpy(),
                                "prob": prob.numpy().astype(np.float32)}}

    def items(self, cfg: Any, meta: dict[str, Any]) -> Items:
        """How attention and input attributions become per-item importance."""
        from attnlab.items import SequenceItems

        return SequenceItems(meta["n_items"], how=getattr(cfg.model, "pooling", "mean"))

    def explained(self, cfg, data, meta):
        """The test samples, or ``explain.samples`` of them evenly spread (:func:`spread_rows`)."""
        picked = Spread.of(len(data["x_test"]), getattr(cfg.explain, "samples", None))
        y = picked(data["y_test"])
        return Explained(x=picked(data["x_test"]), items=self.items(cfg, meta),
                         forward=lambda model, xb, rows: self.forward(model, xb), y=y,
                         evidence=picked(data["evidence_test"]).flatten(1) if "evidence_test" in data else None,
                         saved=picked.saved(y), rows=picked.rows)

    def baseline(self, cfg, data):
        if cfg.explain.baseline == "mean":
            return data["x_train"].float().mean(dim=(0, 1))       # per feature
        return float(cfg.explain.baseline)

    def perturbation(self, cfg, model, data, meta, explained):
        """Items along dim 1 of ``x`` are replaced whole by the baseline."""
        from attnlab.evaluate import sequence_masker

        return Perturbation(lambda inputs: self.forward(model, inputs), explained.x,
                            sequence_masker(self.baseline(cfg, data)))

    def example_figure(self, data, meta, i, importance, title):
        from attnlab.report import figures

        x = data["x_test"][i].numpy()
        evidence = data["evidence_test"][i].numpy() if "evidence_test" in data else None
        return figures.importance_bands(importance, title, self.item_name,
                                        x_tf=x if x.ndim == 2 else None, channels=meta.get("channels", ()),
                                        evidence=evidence)


def spread_rows(n_test: int, samples: int | None) -> np.ndarray | None:
    """The test samples explained and evaluated under ``explain.samples``: ``samples`` of the
    ``n_test`` evenly spread (test sets are often ordered by class or condition), or None
    (all of them) when ``samples`` is None or not below ``n_test``. Deletion/insertion re-run
    the model (methods + random) × 2 × ``evaluate.steps`` times per sample and the costly
    methods (value zeroing, knockout) once per item, hence the cap; extract and aggregate
    still read every test sample."""
    if samples is None or samples >= n_test:
        return None
    return np.unique(np.linspace(0, n_test - 1, samples).round().astype(np.int64))


@dataclass(frozen=True)
class Spread:
    """The explained test samples of :func:`spread_rows`: calling it on a per-sample tensor
    keeps their rows (all of them when ``rows`` is None); :meth:`saved` is what the explain
    stage stores beside the importance (``y``, when there are labels, and ``rows``)."""

    rows: np.ndarray | None

    @classmethod
    def of(cls, n_test: int, samples: int | None) -> "Spread":
        return cls(spread_rows(n_test, samples))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return values
        import torch

        return values[torch.from_numpy(self.rows)]

    def saved(self, y: torch.Tensor | None) -> dict[str, np.ndarray]:
        return ({} if y is None else {"y": y.numpy()}) | ({} if self.rows is None else {"rows": self.rows})


def final_metrics(history: Any) -> dict[str, float | int]:
    """The last epoch's row of a classifier's training history, as ``train/metrics.json`` holds it."""
    final = history.iloc[-1]
    return {"test_accuracy": float(final["test_accuracy"]), "test_macro_f1": float(final["test_macro_f1"]),
            "test_loss": float(final["test_loss"]), "train_accuracy": float(final["train_accuracy"]),
            "epochs": int(final["epoch"])}
