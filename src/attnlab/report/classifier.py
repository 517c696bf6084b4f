"""The report of a sequence-classification experiment (``motion`` and friends)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab import io
from attnlab.report import figures
from attnlab.report.html import HtmlReport


def write_classifier_report(experiment: Any, cfg: Any, root: Path, out: Path) -> Path:
    from attnlab.store import AttentionReader

    meta = io.read_json(root / "prepare" / "meta.json")
    history = pd.read_csv(root / "train" / "history.csv")
    metrics = io.read_json(root / "train" / "metrics.json")
    preds = io.load_arrays(root / "extract" / "predictions.npz")
    classes, item, n_items = meta["classes"], experiment.item_name, meta["n_items"]

    rep = HtmlReport(f"attnlab — {experiment.name}")
    rep.paragraph(f"Data: {meta['source']} ({meta['n_train']} training, {meta['n_test']} test sequences, "
                  f"{n_items} {item}s each, classes: {', '.join(classes)}).")
    rep.heading("Training")
    rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()]))
    rep.figure(figures.training_curves(history), "training_curves", "Loss and accuracy per epoch.")

    examples = figures.pick_examples(preds["y"], cfg.report.examples)
    heads = {}
    with AttentionReader(root / "extract" / "attention.h5") as reader:
        names = list(reader.names)
        for i in examples:
            heads[i] = np.stack([a.numpy() for a in reader.sample(i)])

    rep.heading("Attention per layer and head")
    rep.paragraph("Softmax probabilities before dropout, recorded from every attention call "
                  "(rows: layers, columns: heads; bright = high). Vertical stripes mean every query "
                  f"attends to the same {item}s.")
    for i in examples:
        label = f"sample {i}: true {classes[preds['y'][i]]}, predicted {classes[preds['pred'][i]]}"
        rep.figure(figures.head_grid(heads[i], names, label, item), f"heads_sample{i}", label)

    explained = io.load_arrays(root / "explain" / "importance.npz")
    methods = [m for m in explained if m not in ("target", "y")]
    rep.heading(f"Which {item}s the model looks at")
    rep.paragraph(f"Importance of each {item} for the predicted class, by method: raw = last layer's "
                  "attention, received = attention each item receives (mean over layers, heads, queries), "
                  "rollout and flow = Abnar & Zuidema (2020), grad_rollout = Chefer et al. (2021). "
                  f"Mean ± one standard deviation over the test samples of each class; the dotted line is "
                  f"uniform importance (1/{n_items}).")
    rep.figure(figures.importance_by_class({m: explained[m] for m in methods}, explained["y"], classes, item),
               "importance_by_class", "Per-class importance of every method (test set).")
    for png in sorted((root / "explain" / "figures").glob("*.png"), key=lambda p: int(p.stem[6:])):
        rep.image(png.read_bytes(), f"explain_{png.stem}", f"{png.stem}: every method's importance "
                  f"(each band scaled to its maximum).")
    return rep.write(out)
