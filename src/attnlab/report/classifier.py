"""The report of a sequence-classification experiment (``motion`` and friends)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab import io
from attnlab.report import figures
from attnlab.report.html import HtmlReport


def attention_received(attn_list: list[torch.Tensor], n_items: int) -> torch.Tensor:
    """Per-item importance ``[B, n_items]``: the attention each key receives, averaged
    over heads, queries and layers. A leading class token (``Lk = n_items + 1``) is
    dropped and the rest renormalised to sum 1."""
    received = torch.stack([a.mean(dim=(1, 2)) for a in attn_list]).mean(0)   # [B, Lk]
    if received.shape[-1] == n_items + 1:
        received = received[:, 1:]
    return received / received.sum(-1, keepdim=True)


def pick_examples(y: np.ndarray, k: int) -> list[int]:
    """Up to ``k`` sample indices, cycling over classes so each class is shown."""
    by_class = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < min(k, len(y)):
        for rows in by_class:
            if rows and len(picked) < k:
                picked.append(int(rows.pop(0)))
    return sorted(picked)


def write_classifier_report(experiment: Any, cfg: Any, root: Path, out: Path) -> Path:
    from attnlab.store import AttentionReader

    meta = io.read_json(root / "prepare" / "meta.json")
    data = io.load_arrays(root / "prepare" / "dataset.npz")
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

    examples = pick_examples(preds["y"], cfg.report.examples)
    importance, heads = [], {}
    with AttentionReader(root / "extract" / "attention.h5") as reader:
        names = list(reader.names)
        start = 0
        for batch in reader.batches(64):
            importance.append(attention_received(batch, n_items))
            for i in range(batch[0].shape[0]):
                if start + i in examples:
                    heads[start + i] = np.stack([a[i].numpy() for a in batch])
            start += batch[0].shape[0]
    importance = torch.cat(importance).numpy()

    rep.heading("Attention per layer and head")
    rep.paragraph("Softmax probabilities before dropout, recorded from every attention call "
                  "(rows: layers, columns: heads; bright = high). Vertical stripes mean every query "
                  f"attends to the same {item}s.")
    for i in examples:
        label = f"sample {i}: true {classes[preds['y'][i]]}, predicted {classes[preds['pred'][i]]}"
        rep.figure(figures.head_grid(heads[i], names, label, item), f"heads_sample{i}", label)

    rep.heading(f"Which {item}s the model looks at")
    rep.paragraph(f"Importance of each {item}: the attention it receives, averaged over heads, queries "
                  f"and layers (the dotted line is uniform attention, 1/{n_items}).")
    rep.figure(figures.importance_by_class(importance, preds["y"], classes, item,
                                           "attention received, per class (test set)"),
               "importance_by_class", "Mean ± one standard deviation over the test samples of each class.")
    if "channels" in meta:
        for i in examples:
            rep.figure(figures.sequence_with_importance(data["x_test"][i], importance[i], meta["channels"],
                                                        f"sample {i} ({classes[preds['y'][i]]})"),
                       f"sequence_sample{i}", "Sensor channels with the attention received beneath.")
    return rep.write(out)
