"""The report of ``attnlab explain`` on a user's model, rendered from the files it wrote
(so ``attnlab report DIR`` can render it again)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from attnlab import io
from attnlab.report import figures
from attnlab.report.classifier import heads_paragraph, method_table, methods_paragraph, random_sentence
from attnlab.report.html import HtmlReport


def write_external_report(out: str | Path) -> Path:
    from attnlab.store import AttentionReader

    out = Path(out)
    metrics = io.read_json(out / "metrics.json")
    importance = io.load_arrays(out / "importance.npz")
    methods = metrics["methods"]
    rep = HtmlReport(f"attnlab — {metrics.get('model', 'your model')}")
    shapes = ", ".join(str(s) for s in metrics["inputs"])
    rep.paragraph(f"Model: {metrics.get('model', '?')} (weights: {metrics.get('weights') or 'as built'}). "
                  f"Inputs: {shapes}; {metrics['n_samples']} samples, items along dim 1 of the first input; "
                  f"readout: {metrics['readout']}." +
                  (f" Accuracy against the labels: {metrics['accuracy']:.3f}." if "accuracy" in metrics else ""))

    with AttentionReader(out / "attention.h5") as reader:
        names = list(reader.names)
        maps = [a.numpy() for a in reader.sample(0)]
    rep.heading("Attention per layer and head")
    rep.paragraph("Softmax probabilities before dropout of sample 0, recorded from every attention call "
                  "(rows: layers, columns: heads).")
    for shape in dict.fromkeys(m.shape for m in maps):
        group = [k for k, m in enumerate(maps) if m.shape == shape]
        pages = figures.head_grid_pages(np.stack([maps[k] for k in group]), [names[k] for k in group], "sample 0")
        for p, fig in enumerate(pages):
            rep.figure(fig, f"heads_{shape[-1]}" + (f"_{p}" if p else ""),
                       "Attention of sample 0: queries (rows) x keys (columns)"
                       + (f", page {p + 1} of {len(pages)}" if len(pages) > 1 else "") + ".")

    rep.heading("Which items the model looks at")
    rep.paragraph(f"Importance of each item for the predicted class, by method: {methods_paragraph(methods, 'item')}")
    target = importance["target"]
    classes = [str(c) for c in np.unique(target)]
    rep.figure(figures.importance_by_class({m: importance[m] for m in methods},
                                           np.searchsorted(np.unique(target), target), classes),
               "importance_by_class", "Mean importance per item, by predicted class.")

    rep.heading("Is the explanation faithful?")
    rep.paragraph("Deletion: remove items most important first and watch the probability of the predicted class "
                  "fall (lower area = more faithful); insertion: add them most important first (higher is better). "
                  "'random' ranks items at random.")
    rep.table(method_table({"faithfulness": metrics["faithfulness"]}))
    text, all_beat = random_sentence(metrics["faithfulness"], 0.05)     # the level attnlab explain tests at
    rep.paragraph(text, css="ok" if all_beat else "warn")
    curves = {mode: pd.read_csv(out / f"{mode}.csv").pivot(index="fraction", columns="method",
                                                           values="probability").reset_index()
              for mode in ("deletion", "insertion")}
    rep.figure(figures.faithfulness_curves(curves), "faithfulness", "Mean probability of the predicted class.")

    if "heads" in metrics:
        heads = pd.read_csv(out / "heads.csv")
        rep.heading("What the heads do")
        rep.paragraph(heads_paragraph(metrics["heads"]))
        rep.figure(figures.head_heatmaps(heads, ["entropy", "sink", "locality_norm"]), "head_diagnostics",
                   "Per head: normalised entropy (1 = uniform), sink score (high = vertical stripes), locality.")
    for view in metrics.get("vocabulary", {}).get("views", []):
        rep.heading(f"Which token attends to which ({view})")
        rep.table(pd.read_csv(out / f"top_pairs_{view}.csv"))
    return rep.write(out)
