"""``external``: a classifier trained elsewhere, explained by the pipeline.

Its params section names a factory, the weights and the data files (all inside the
directory ``externals`` gives the instance, which ``dvc.yaml`` watches). There is no
training: ``prepare`` checks the files, the model and that the recorder sees its
attention, and stores the inputs as the pipeline's test set; every later stage builds
the model from the declared factory and weights (never from a checkpoint), so the
rest of the pipeline — extract, aggregate (token inputs with a vocabulary), explain,
evaluate, report, track — is the one every experiment runs.

Items are along dim 1 of the first input (``[N, T, C]``, ``[N, T, C, H, W]``, token ids
``[N, L]``); further inputs are passed along unchanged (``model(x, x1, ...)``).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from attnlab import methods as method_registry
from attnlab.experiments.base import ClassifierExperiment, Explained, Perturbation, Prepared, Spread
from attnlab.schema import Aggregate, ClassifierEvaluate, Explain, Extract, Report, Section, aggregate_fits_store

if TYPE_CHECKING:
    import torch
    from torch import nn


# --------------------------------------------------------------------------- params
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


# --------------------------------------------------------------------------- the kind
#: The names the messages about the data files give them: their params keys.
FLAGS = {key: f"prepare.{key}" for key in ("inputs", "labels", "tokens", "vocab")}


def _reference(cfg: ExternalParams) -> dict[str, Any]:
    """What identifies the model: the factory, its arguments, the weights file and its digest."""
    from attnlab.io import hash_file

    m = cfg.model
    return {"factory": m.factory, "kwargs": m.kwargs, "weights": m.weights,
            "weights_sha256": hash_file(hashlib.sha256(), m.weights).hexdigest() if m.weights else None}



def prepared_inputs(data: Any, n_classes: int, *, source: str, reference: dict[str, Any],
                    evidence: torch.Tensor | None = None) -> Prepared:
    """A user's inputs (:class:`~attnlab.data.external.Inputs`) as the pipeline's test set:
    ``x_test`` (or ``tokens_test`` and ``mask_test`` with a vocabulary), further inputs
    ``x_test_1``..., ``y_test`` when there are labels, ``evidence_test`` ``[N, items]``."""
    first, rest = data.arrays[0], data.arrays[1:]
    arrays: dict[str, np.ndarray] = {} if data.labels is None else {"y_test": data.labels.numpy()}
    if data.vocab is not None:
        arrays["tokens_test"] = first.numpy()
        arrays["mask_test"] = (first != data.vocab.index("<pad>")).numpy()
    else:
        arrays["x_test"] = first.numpy()
    arrays.update({f"x_test_{i}": a.numpy() for i, a in enumerate(rest, start=1)})
    if evidence is not None:
        arrays["evidence_test"] = evidence.numpy()
    meta = {"source": source, "classes": [str(c) for c in range(n_classes)], "n_test": len(data),
            "n_items": int(first.shape[1]), "inputs": [list(a.shape) for a in data.arrays], "model": reference}
    if data.vocab is not None:
        meta["vocab"] = data.vocab
    return Prepared(arrays, meta)


class ExternalExperiment(ClassifierExperiment):
    name = "external"
    params = ExternalParams
    order = 60
    item_name = "item"

    # ------------------------------------------------------------------ the model
    def load_model(self, cfg: ExternalParams, lay: Any) -> nn.Module:
        """The user's factory (declared in params) with the user's weights, in eval mode."""
        from attnlab.models.external import build, load_weights

        m = cfg.model
        model = build(m.factory, m.kwargs, flag="model.factory")
        if m.weights:
            load_weights(model, m.weights, flag="model.weights")
        return model.eval()

    def model_reference(self, cfg: ExternalParams, lay: Any) -> dict[str, Any]:
        """The reference ``prepare`` stored in ``meta.json`` (the weights are hashed once)."""
        from attnlab.io import read_json

        return read_json(lay.meta)["model"]

    # ------------------------------------------------------------------ the data
    def prepare(self, cfg: ExternalParams) -> Prepared:
        from attnlab.data.external import load_evidence, load_inputs
        from attnlab.models.external import check_model

        p = cfg.prepare
        data = load_inputs(p.inputs, labels=p.labels, tokens=p.tokens, vocab=p.vocab, flags=FLAGS)
        n_classes = check_model(self.load_model(cfg, None), data)
        if int(data.labels.max()) >= n_classes or int(data.labels.min()) < 0:
            from attnlab.io import ExternalError

            raise ExternalError(f"prepare.labels {p.labels!r}: class ids {int(data.labels.min())}.."
                                f"{int(data.labels.max())}, but the model gives {n_classes} logits")
        evidence = load_evidence(p.evidence, data, "prepare.evidence") if p.evidence else None
        return prepared_inputs(data, n_classes, source=f"your files ({', '.join(p.files())})",
                               reference=_reference(cfg), evidence=evidence)

    def _rest(self, data: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [data[k] for k in sorted((k for k in data if k.startswith("x_test_")), key=lambda k: int(k[7:]))]

    def _first(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        return data["tokens_test"] if "tokens_test" in data else data["x_test"]

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(*batch) if isinstance(batch, tuple) else model(batch)

    def test_inputs(self, data):
        rest = self._rest(data)
        return (self._first(data), *rest) if rest else self._first(data)

    def extract_outputs(self, cfg, model, data):
        from attnlab.training import predict

        prob = predict(model, self.test_inputs(data), forward=self.forward).softmax(-1)
        labels = {"y": data["y_test"].numpy()} if "y_test" in data else {}     # attnlab explain: optional
        return {"predictions": {**labels, "pred": prob.argmax(-1).numpy(), "prob": prob.numpy().astype(np.float32)}}

    # ------------------------------------------------------------------ explaining it
    def explained(self, cfg, data, meta):
        tokens = "tokens_test" in data
        x = self._first(data)
        from attnlab.items import SequenceItems

        picked = Spread.of(len(x), cfg.explain.samples)
        x, rest = picked(x), [picked(r) for r in self._rest(data)]
        y = picked(data["y_test"]) if "y_test" in data else None
        return Explained(x=x, items=SequenceItems(meta["n_items"], how=cfg.model.readout, token_ids=tokens),
                         forward=lambda model, xb, rows: model(xb, *(r[rows].to(xb.device) for r in rest)),
                         y=y, evidence=picked(data["evidence_test"]) if "evidence_test" in data else None,
                         valid=picked(data["mask_test"]) if tokens else None, saved=picked.saved(y), rows=picked.rows)

    def baseline(self, cfg, data):
        if "tokens_test" in data:
            return float(cfg.explain.baseline)
        if cfg.explain.baseline == "mean":     # nothing is trained here: the mean of the given inputs
            return data["x_test"].float().mean(dim=(0, 1))
        return float(cfg.explain.baseline)

    def perturbation(self, cfg, model, data, meta, explained):
        """Items along dim 1 of the first input are replaced whole by the baseline
        (token ids by ``<unk>``); further inputs stay as they are."""
        from attnlab.evaluate import sequence_masker

        fill = meta["vocab"].index("<unk>") if "vocab" in meta else self.baseline(cfg, data)
        rest = {f"input{i}": r for i, r in enumerate(self._rest(data), start=1)}
        return Perturbation(lambda x, **kw: model(x, *kw.values()), explained.x, sequence_masker(fill),
                            forward_kwargs=rest or None)

    def head_masks(self, cfg, data):
        return cfg.model.causal, data.get("mask_test")

    def example_figure(self, data, meta, i, importance, title):
        from attnlab.report import figures

        x = data["x_test"][i].numpy() if "x_test" in data else None
        evidence = data["evidence_test"][i].numpy() if "evidence_test" in data else None
        return figures.importance_bands(importance, title, self.item_name,
                                        x_tf=x if x is not None and x.ndim == 2 else None, evidence=evidence)
