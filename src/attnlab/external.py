"""``attnlab explain``: a model trained elsewhere, run through the pipeline's own stages on
one directory.

:func:`explain_model` runs the stage functions of :mod:`attnlab.pipeline.stages` —
prepare, extract, aggregate, explain, evaluate, report — with the ``external`` experiment
kind on a model and inputs given in memory, writing every stage's files into one
directory (:class:`~attnlab.layout.DirectoryLayout`): the same recording, explanations,
faithfulness curves with intervals, ROAD, randomisation sanity check, head diagnostics,
vocabulary aggregation and report as ``dvc repro``, with no second copy of any of them.

Loading what the user brings lives below the pipeline: the model
(:mod:`attnlab.models.external`: :func:`build`, :func:`load_weights`, :func:`check_model`)
and the inputs (:mod:`attnlab.data.external`: :func:`load_inputs`...); their names are
importable from here as before. Every problem is an :class:`ExternalError` whose message
names the bad value and what was expected; :func:`explain_model` writes only through
:func:`~attnlab.io.atomic_dir`, so a failure leaves nothing behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from torch import nn

from attnlab.data.external import (CLI_FLAGS, Inputs, encode_tokens, load_evidence, load_inputs,  # noqa: F401
                                   load_vocab)
from attnlab.experiments.external import ExternalExperiment, prepared_inputs
from attnlab.experiments.external import ExternalExplain as Explain
from attnlab.schema import Aggregate, ClassifierEvaluate, Extract, Report, Section
from attnlab.io import DataError, ExternalError  # noqa: F401
from attnlab.models.external import build, check_model, load_weights, resolve_factory  # noqa: F401

#: The stages ``attnlab explain`` runs (no training: the model is given; no MLflow run).
STAGES = ("prepare", "extract", "aggregate", "explain", "evaluate", "report")
#: What ``explain_model`` keeps of the params it ran with, for ``attnlab report DIR``.
PARAMS_FILE = "params.json"


class GivenModel(Section):
    readout: Literal["mean", "cls"] | int = "mean"   # which attention rows explain the prediction
    causal: bool = False


class DirectoryParams(Section):
    """The params ``attnlab explain`` runs the stages with: the pipeline's sections of the
    ``external`` kind (their defaults), set from the command line's options."""

    model: GivenModel = GivenModel()
    extract: Extract = Extract()
    aggregate: Aggregate = Aggregate()
    explain: Explain = Explain()
    evaluate: ClassifierEvaluate = ClassifierEvaluate()
    report: Report = Report()


class GivenExperiment(ExternalExperiment):
    """The ``external`` kind on a model and inputs already in memory: ``prepare`` stores
    the inputs (labels optional), later stages use the model as given."""

    def __init__(self, model: nn.Module, data: Inputs, n_classes: int, reference: dict[str, Any]):
        self._model, self._data, self._n_classes, self._reference = model, data, n_classes, reference

    def prepare(self, cfg: Any):
        return prepared_inputs(self._data, self._n_classes, source="your inputs", reference=self._reference)

    def load_model(self, cfg: Any, lay: Any) -> nn.Module:
        return self._model.eval()


def _params(data: Inputs, methods: Sequence[str] | None, readout: str | int, batch_size: int) -> DirectoryParams:
    """The stages' params: the ``external`` kind's defaults, the options given, the token
    kind's methods for integer inputs (no input gradients) and for several inputs (input
    attributions cover the first input only), at most 20 points on the deletion/insertion
    curves; head ablation measures the drop in confidence, and in accuracy when there are labels."""
    import attnlab.methods as registry

    kind = "tokens" if data.token_ids or len(data.arrays) > 1 else "sequence"   # several inputs: attention methods
    chosen = list(methods) if methods is not None else registry.names(kind, default_only=True)
    try:
        registry.check(chosen, kind)
    except ValueError as err:
        raise ExternalError(f"--methods: {err}") from None
    n_items = data.arrays[0].shape[1]
    return DirectoryParams.model_validate({
        "model": {"readout": readout},
        "extract": {"batch_size": batch_size},
        "explain": {"methods": chosen, "batch_size": batch_size},
        "evaluate": {"steps": None if n_items <= 20 else 20, "batch_size": 4 * batch_size},
    })


def explain_model(model: nn.Module, data: Inputs, out: str | Path, *, methods: Sequence[str] | None = None,
                  readout: str | int = "mean", batch_size: int = 32, source: dict[str, Any] | None = None,
                  progress: bool = False) -> Path:
    """Run the pipeline's stages on ``model`` and ``data`` into directory ``out`` (replaced
    only if everything succeeds).

    It holds the files of those stages under their usual names: ``dataset.npz``,
    ``meta.json``, ``attention.h5``, ``predictions.npz``, ``importance.npz``,
    ``deletion.csv``/``insertion.csv``, ``metrics.json`` (faithfulness with intervals,
    ``road``, ``sanity``, ``heads``, ``accuracy`` with labels, plus ``inputs``, ``methods``,
    ``readout`` and ``vocabulary``), ``results/heads.csv`` and figures, ``report.html``,
    and with a vocabulary over token ids every layer's ``vocab_layer<l>.npz`` and
    ``top_pairs_layer<l>.csv``; ``params.json`` holds the params the stages ran with."""
    import attnlab.io as io
    from attnlab.layout import DirectoryLayout
    from attnlab.pipeline.stages import STAGE_FUNCTIONS

    if batch_size < 1:
        raise ExternalError(f"--batch-size {batch_size}: expected >= 1")
    model.eval()
    cfg = _params(data, methods, readout, batch_size)
    n_classes = check_model(model, data)
    if data.labels is not None and (int(data.labels.max()) >= n_classes or int(data.labels.min()) < 0):
        raise ExternalError(f"--labels: class ids {int(data.labels.min())}..{int(data.labels.max())}, "
                            f"but the model gives {n_classes} logits")
    reference = {"factory": (source or {}).get("model") or type(model).__name__, "kwargs": {},
                 "weights": (source or {}).get("weights"), "weights_sha256": None}
    exp = GivenExperiment(model, data, n_classes, reference)
    with io.atomic_dir(out) as tmp:
        lay = DirectoryLayout(tmp)
        for stage in STAGES:
            if stage == "aggregate":
                cfg = _aggregate_every_layer(cfg, data, lay)
            elif stage == "report":
                metrics = io.read_json(lay.metrics)
                summary = io.read_json(lay.aggregate_summary)
                metrics.update({"inputs": [list(a.shape) for a in data.arrays], "methods": list(cfg.explain.methods),
                                "readout": readout, **(source or {})})
                if summary["vocabulary"]:
                    metrics["vocabulary"] = {"views": summary["views"], "vocab_size": summary["vocab_size"]}
                io.write_json(lay.metrics, metrics)
                io.write_json(tmp / PARAMS_FILE, cfg.model_dump(mode="json"))
            STAGE_FUNCTIONS[stage](exp, cfg, lay, progress=progress)
    return Path(out)


def _aggregate_every_layer(cfg: DirectoryParams, data: Inputs, lay: Any) -> DirectoryParams:
    """With a vocabulary over token ids: aggregate every recorded layer (head mean and per
    head, top 20 pairs by lift), which needs attention over exactly the input tokens."""
    from attnlab.store import AttentionReader

    if data.vocab is None or not data.token_ids:
        return cfg
    n_tokens = data.arrays[0].shape[1]
    with AttentionReader(lay.attention) as reader:
        n_layers, shapes = len(reader.keys), {reader.entry(k).shape[-1] for k in reader.keys}
    if shapes != {n_tokens}:
        raise ExternalError(f"--vocab: the vocabulary aggregation needs attention over the {n_tokens} input "
                            f"tokens; the model's attention has {sorted(shapes)} positions (a class token?)")
    aggregate = cfg.aggregate.model_copy(update={"layers": list(range(n_layers)), "heads": True, "top_k": 20,
                                                 "min_count": 1})
    return cfg.model_copy(update={"aggregate": aggregate})


def write_directory_report(directory: str | Path) -> Path:
    """Render ``DIR/report.html`` again from the files :func:`explain_model` wrote
    (``attnlab report DIR``): the pipeline's report stage on that directory."""
    import attnlab.io as io
    from attnlab.layout import DirectoryLayout
    from attnlab.pipeline.stages import STAGE_FUNCTIONS

    directory = Path(directory)
    missing = [f for f in (PARAMS_FILE, "metrics.json", "importance.npz", "attention.h5", "deletion.csv", "meta.json")
               if not (directory / f).is_file()]
    if missing:
        raise ExternalError(f"{str(directory)!r} is not an 'attnlab explain' directory: no {missing[0]}")
    cfg = DirectoryParams.model_validate(io.read_json(directory / PARAMS_FILE))
    STAGE_FUNCTIONS["report"](ExternalExperiment(), cfg, DirectoryLayout(directory))
    return directory / "report.html"
