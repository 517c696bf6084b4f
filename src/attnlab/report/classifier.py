"""The report of a sequence-classification experiment (``motion`` and friends)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab import io
from attnlab.layout import Layout
from attnlab.report import figures
from attnlab.report.html import HtmlReport


def methods_paragraph(methods: list[str], item: str) -> str:
    """One sentence per method, from the method registry."""
    from attnlab.methods import get

    return "; ".join(f"{m} = {get(m).summary}" for m in methods) + f"; random = {item}s ranked at random."


def write_classifier_report(experiment: Any, cfg: Any, lay: Layout) -> Path:
    from attnlab.store import AttentionReader

    meta = io.read_json(lay.meta)
    history = pd.read_csv(lay.history)
    metrics = io.read_json(lay.train_metrics)
    preds = io.load_arrays(lay.predictions)
    classes, item, n_items = meta["classes"], experiment.item_name, meta["n_items"]

    rep = HtmlReport(f"attnlab — {lay.root.name}" + (f" ({experiment.name})" if experiment.name != lay.root.name else ""))
    rep.paragraph(f"Data: {meta['source']} ({meta['n_train']} training, {meta['n_test']} test sequences, "
                  f"{n_items} {item}s each, classes: {', '.join(classes)}).")
    rep.heading("Training")
    rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()]))
    rep.figure(figures.training_curves(history), "training_curves", "Loss and accuracy per epoch.")

    examples = figures.pick_examples(preds["y"], cfg.report.examples)
    with AttentionReader(lay.attention) as reader:
        names = list(reader.names)
        samples = {i: [a.numpy() for a in reader.sample(i)] for i in examples}

    rep.heading("Attention per layer and head")
    rep.paragraph("Softmax probabilities before dropout, recorded from every attention call "
                  "(rows: layers, columns: heads; bright = high). Vertical stripes mean every query "
                  f"attends to the same {item}s. Factorised attention (one map per frame or per patch) "
                  "shows its first map.")
    for i in examples:
        label = f"sample {i}: true {classes[preds['y'][i]]}, predicted {classes[preds['pred'][i]]}"
        maps = [m[0] if m.ndim == 4 else m for m in samples[i]]
        for shape in dict.fromkeys(m.shape for m in maps):        # entries of one shape share a grid
            group = [k for k, m in enumerate(maps) if m.shape == shape]
            rep.figure(figures.head_grid(np.stack([maps[k] for k in group]), [names[k] for k in group],
                                         label, item), f"heads_sample{i}_{shape[-1]}", label)

    explained = io.load_arrays(lay.importance)
    methods = list(cfg.explain.methods)
    rep.heading(f"Which {item}s the model looks at")
    rep.paragraph(f"Importance of each {item} for the predicted class, by method: "
                  f"{methods_paragraph(methods, item)} Mean ± one standard deviation over the test samples of "
                  f"each class; the dotted line is uniform importance (1/{n_items}).")
    rep.figure(figures.importance_by_class({m: explained[m] for m in methods}, explained["y"], classes, item),
               "importance_by_class", "Per-class importance of every method (test set).")
    for png in sorted(lay.explain_figures.glob("*.png"), key=lambda p: int(p.stem[6:])):
        rep.image(png.read_bytes(), f"explain_{png.stem}", f"{png.stem}: every method's importance "
                  f"(each band scaled to its maximum).")
    add_evaluation(rep, lay, item)
    return rep.write(lay.dir("report"))


def method_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Methods ranked by deletion AUC (lower = more faithful), with every other score."""
    faith = metrics["faithfulness"]
    rows = []
    for method, deletion in faith["deletion_auc"].items():
        row = {"method": method, "deletion AUC (lower better)": deletion,
               "insertion AUC (higher better)": faith["insertion_auc"][method]}
        if "evidence" in metrics:
            row["evidence AUROC"] = metrics["evidence"]["auroc"][method]
            row["pointing game"] = metrics["evidence"]["pointing_game"][method]
        rows.append(row)
    return pd.DataFrame(rows).sort_values("deletion AUC (lower better)", kind="stable").reset_index(drop=True)


def heads_paragraph(heads: dict[str, Any]) -> str:
    v, d = heads["strongest_sink"], heads["most_diffuse"]
    text = (f"The head with the strongest sink is {v['module']} head {v['head']}: on average its queries put "
            f"{v['sink']:.0%} of their attention on the same few keys (its sink score; uniform attention would "
            f"give far less), which is what vertical stripes in its map mean. The most diffuse is "
            f"{d['module']} head {d['head']} (normalised entropy {d['entropy']:.2f}, 1 = uniform). ")
    if "most_important" in heads:
        m = heads["most_important"]
        text += (f"Zeroing {m['module']} head {m['head']} costs the most: the predicted class's probability "
                 f"drops by {m['prob_drop']:.3f} on average.")
    return text


def add_evaluation(rep: HtmlReport, lay: Layout, item: str) -> None:
    metrics = io.read_json(lay.metrics)
    add_faithfulness(rep, lay, metrics, item)
    if "heads" not in metrics:
        return
    rep.heading("What the heads do")
    rep.paragraph(heads_paragraph(metrics["heads"]))
    rep.image((lay.results / "figures" / "heads.png").read_bytes(), "heads",
              "Per head: normalised entropy (1 = uniform), sink score (share of attention on the top keys, "
              "averaged over queries: high = vertical stripes), locality (mean |i - j| / N), and the drop in "
              "the predicted class's probability / in accuracy when the head is zeroed.")


def add_faithfulness(rep: HtmlReport, lay: Layout, metrics: dict[str, Any], item: str) -> None:
    """The methods ranked by deletion AUC beside the random baseline, and the curves."""
    table = method_table(metrics)
    rep.heading("Is the explanation faithful?")
    rep.paragraph(f"Deletion: remove {item}s most important first and watch the probability of the explained "
                  f"class fall (a faithful method makes it fall fast: small area). Insertion: start from "
                  f"nothing and add {item}s most important first (large area is better). 'random' ranks "
                  "items at random: a method that does not beat it explains nothing.")
    rep.table(table)
    random = table.set_index("method").loc["random", "deletion AUC (lower better)"]
    beaten = [m for m, v in zip(table["method"], table["deletion AUC (lower better)"]) if m != "random" and v < random]
    failed = [m for m in table["method"] if m != "random" and m not in beaten]
    rep.paragraph(f"Beat the random baseline on deletion: {', '.join(beaten) or 'none'}. "
                  f"Did not: {', '.join(failed) or 'none'}.", css="warn" if failed else "ok")
    if "evidence" in metrics:
        rep.paragraph("Evidence AUROC: how well each method's importance separates the items that carry the "
                      "planted evidence from the others (0.5 = chance); pointing game: how often the top item "
                      "is evidence.")
    rep.image((lay.results / "figures" / "faithfulness.png").read_bytes(), "faithfulness",
              "Mean probability of the explained class along the deletion and insertion curves.")
