"""The report of the ``tokens`` experiment: a language model's vocabulary x vocabulary attention."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab import io
from attnlab.layout import Layout
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


def write_tokens_report(experiment: Any, cfg: Any, lay: Layout) -> Path:
    from attnlab.aggregate import VocabAttention
    from attnlab.report.classifier import methods_paragraph
    from attnlab.store import AttentionReader

    meta = io.read_json(lay.meta)
    metrics = io.read_json(lay.train_metrics)
    evaluated = io.read_json(lay.metrics)
    a, summary = cfg.aggregate, io.read_json(lay.aggregate_summary)
    view = summary["headline"]
    rep = HtmlReport(f"attnlab — {lay.root.name}" + (f" ({experiment.name})" if experiment.name != lay.root.name else ""))
    rep.paragraph(f"Data: {meta['source']} ({meta['n_train']} training, {meta['n_test']} test sequences of up to "
                  f"{meta['n_items']} tokens, vocabulary of {len(meta['vocab'])} tokens). Model: causal "
                  "nn.TransformerEncoder trained to predict the next token.")
    rep.heading("Training")
    rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()]))
    rep.figure(figures.training_curves(pd.read_csv(lay.history)), "training_curves",
               "Next-token loss and accuracy per epoch.")

    rep.heading("Attention per layer and head")
    with AttentionReader(lay.attention) as reader:
        names = list(reader.names)
        for i in range(min(cfg.report.examples, len(reader))):
            maps = np.stack([a.numpy() for a in reader.sample(i)])
            pages = figures.head_grid_pages(maps, names, f"test sequence {i}", "token")
            for p, fig in enumerate(pages):
                rep.figure(fig, f"heads_seq{i}" + (f"_{p}" if p else ""),
                           f"Causal attention of test sequence {i}: query tokens (rows) x key tokens (columns); "
                           "padding keys get 0" + (f"; page {p + 1} of {len(pages)}" if len(pages) > 1 else "") + ".")

    source = {"layer": f"layer {view.removeprefix('layer')}", "mean": "the mean of all layers",
              "rollout": "the attention rollout"}
    rep.heading("Which token attends to which")
    rep.paragraph(f"VocabAttention over the whole test set, fed with {source[a.attention]} (heads averaged). "
                  "For each (query token, key token) pair: the attention summed over every valid position pair "
                  "(causal: key at or before the query), how often the pair occurred, and the lift = attention "
                  "received / what uniform attention would have given (1 = no preference; corrects for "
                  f"frequent tokens). Top {a.top_k} pairs by lift among pairs seen at least {a.min_count} times"
                  + (f" (every view: {', '.join(summary['views'])}, per head too, in the aggregate stage's files):"
                     if len(summary["views"]) > 1 or summary["heads"] else ":"))
    rep.table(pd.read_csv(lay.vocab(view, kind="top_pairs")))
    if "planted" in evaluated:
        planted = evaluated["planted"]
        true = ", ".join(f"{q}→{k}" for q, k in meta["true_pairs"])
        ok = planted["recall_at_k"] >= 0.9
        rep.paragraph(f"Planted pairs (query→key): {true}. Recall of these among the top {planted['k']} pairs "
                      f"by lift: {planted['recall_at_k']:.2f}" +
                      (f" (best single head: {planted['recall_at_k_best_head']:.2f})"
                       if "recall_at_k_best_head" in planted else "") +
                      (" — meets the 0.9 goal." if ok else " — BELOW the 0.9 goal."), css="ok" if ok else "warn")
    n_tokens = cfg.report.heatmap_tokens
    rep.figure(figures.vocab_clustermap(VocabAttention.load(lay.vocab(view)), meta["vocab"], n_tokens,
                                        min_count=a.min_count), "vocab_lift",
               f"log2 lift among the {n_tokens} most frequent tokens (special tokens such as <bos> left out), "
               "rows and columns clustered (red: attended more than uniform; blank: too rare).")
    rep.paragraph(f"Importance of each token for the explained prediction, by method: "
                  f"{methods_paragraph(list(cfg.explain.methods), 'token')}")
    add_faithfulness(rep, lay, evaluated, "token")
    rep.paragraph(f"Explained: one next-token prediction per test sequence ({evaluated['n_samples']} "
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
    rep.image((lay.results / "figures" / "heads.png").read_bytes(), "heads",
              "Per head, over real tokens only: normalised entropy (causal rows normalised by their number of "
              "keys), sink score, locality.")
    return rep.write(lay.dir("report"))
