"""The report of the ``tokens`` experiment: a language model's vocabulary x vocabulary attention."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab import io
from attnlab.report import figures
from attnlab.report.classifier import add_faithfulness, heads_paragraph
from attnlab.report.html import HtmlReport


def gradient_paragraph(per_layer: dict[str, dict[str, float]]) -> str:
    """What the per-layer attention/gradient at the trigger says about grad_rollout's score."""
    layer, top = max(per_layer.items(), key=lambda kv: kv[1]["attention_at_evidence"])
    text = ("Attention, its gradient and grad_rollout's edge weight mean_h(max(∇A ⊙ A, 0)) (Chefer et al.) "
            "at the evidence (the trigger) in the explained row, per layer, beside their mean over the other keys "
            "at or before the position; 'dropped' = share of heads whose edge to the trigger gets weight 0. A key "
            "whose weight has a negative gradient is dropped however much attention it gets; softmax weights sum "
            "to 1, so the sign of one weight's gradient alone is not evidence of relevance. ")
    text += (f"Here layer {layer} gives the trigger {top['attention_at_evidence']:.2f} of its attention on "
             f"average, and {top['dropped_at_evidence']:.0%} of its heads' edges to it are dropped")
    return text + (": for most sequences grad_rollout keeps no direct edge from the explained token to the "
                   "trigger in that layer (relevance can still reach it through other tokens)."
                   if top["dropped_at_evidence"] > 0.5 else ".")


def write_tokens_report(experiment: Any, cfg: Any, root: Path, out: Path) -> Path:
    from attnlab.store import AttentionReader

    meta = io.read_json(root / "prepare" / "meta.json")
    metrics = io.read_json(root / "train" / "metrics.json")
    evaluated = io.read_json(root / "evaluate" / "metrics.json")
    e = cfg.explain
    rep = HtmlReport(f"attnlab — {experiment.name}")
    rep.paragraph(f"Data: {meta['source']} ({meta['n_train']} training, {meta['n_test']} test sequences of up to "
                  f"{meta['n_items']} tokens, vocabulary of {len(meta['vocab'])} tokens). Model: causal "
                  "nn.TransformerEncoder trained to predict the next token.")
    rep.heading("Training")
    rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()]))
    rep.figure(figures.training_curves(pd.read_csv(root / "train" / "history.csv")), "training_curves",
               "Next-token loss and accuracy per epoch.")

    rep.heading("Attention per layer and head")
    with AttentionReader(root / "extract" / "attention.h5") as reader:
        names = list(reader.names)
        for i in range(min(cfg.report.examples, len(reader))):
            maps = np.stack([a.numpy() for a in reader.sample(i)])
            rep.figure(figures.head_grid(maps, names, f"test sequence {i}", "token"), f"heads_seq{i}",
                       f"Causal attention of test sequence {i} (padding keys get 0).")

    source = {"layer": f"layer {e.layer}", "mean": "the mean of all layers", "rollout": "the attention rollout"}
    rep.heading("Which token attends to which")
    rep.paragraph(f"VocabAttention over the whole test set, fed with {source[e.attention]} (heads averaged). "
                  "For each (query token, key token) pair: the attention summed over every valid position pair "
                  "(causal: key at or before the query), how often the pair occurred, and the lift = attention "
                  "received / what uniform attention would have given (1 = no preference; corrects for "
                  f"frequent tokens). Top {e.top_k} pairs by lift among pairs seen at least {e.min_count} times:")
    rep.table(pd.read_csv(root / "explain" / "top_pairs.csv"))
    if "planted" in evaluated:
        planted = evaluated["planted"]
        true = ", ".join(f"{q}→{k}" for q, k in meta["true_pairs"])
        ok = planted["recall_at_k"] >= 0.9
        rep.paragraph(f"Planted pairs (query→key): {true}. Recall of these among the top {planted['k']} pairs "
                      f"by lift: {planted['recall_at_k']:.2f}" +
                      (f" (best single head: {planted['recall_at_k_best_head']:.2f})"
                       if "recall_at_k_best_head" in planted else "") +
                      (" — meets the 0.9 goal." if ok else " — BELOW the 0.9 goal."), css="ok" if ok else "warn")
    rep.image((root / "explain" / "figures" / "vocab_lift.png").read_bytes(), "vocab_lift",
              f"log2 lift among the {e.heatmap_tokens} most frequent tokens, rows and columns clustered "
              "(red: attended more than uniform; blank: too rare).")
    add_faithfulness(rep, root / "evaluate", evaluated, "token")
    rep.paragraph(f"Explained: one next-token prediction per test sequence ({evaluated['n_explained']} "
                  "sequences): " + ("the answer predicted at the first probe whose trigger is present; the "
                                    "evidence is the trigger's position." if "evidence" in evaluated else
                                    "the prediction after the last token.") +
                  " Only tokens at or before that position can matter (causal model); every method ranks the "
                  "later ones last, and a removed token becomes <unk>.")
    if "per_layer" in evaluated.get("evidence", {}):
        rep.paragraph(gradient_paragraph(evaluated["evidence"]["per_layer"]))
        rep.table(pd.DataFrame([{"layer": int(layer), **{k.replace("_", " "): v for k, v in values.items()}}
                                for layer, values in evaluated["evidence"]["per_layer"].items()])
                  .rename(columns={"dropped at evidence": "share dropped at evidence"}))
    rep.heading("What the heads do")
    rep.paragraph(heads_paragraph(evaluated["heads"]))
    rep.image((root / "evaluate" / "results" / "figures" / "heads.png").read_bytes(), "heads",
              "Per head, over real tokens only: normalised entropy (causal rows normalised by their number of "
              "keys), sink score, locality.")
    return rep.write(out)
