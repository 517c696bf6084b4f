"""The report of the ``fusion`` experiment: which stream the fusion weights point at."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from attnlab import io
from attnlab.layout import Layout
from attnlab.report import figures
from attnlab.report.classifier import add_evaluation
from attnlab.report.html import HtmlReport


def write_fusion_report(experiment: Any, cfg: Any, lay: Layout) -> Path:
    meta = io.read_json(lay.meta)
    trained = io.read_json(lay.train_metrics)
    metrics = io.read_json(lay.metrics)
    mode, w = cfg.model.fusion, metrics["weights"]
    rep = HtmlReport(f"attnlab — {lay.root.name} ({mode} fusion)")
    corrupt = ("no stream corrupted" if meta["corrupt_stream"] is None else
               f"the {meta['corrupt_stream']} stream corrupted ({meta['corrupt_mode']}) on "
               f"{meta['corrupt_fraction']:.0%} of the samples")
    rep.paragraph(f"Data: {meta['source']} ({meta['n_train']} training, {meta['n_test']} test digits), "
                  f"{corrupt}. Model: one CNN per stream ({' and '.join(f'{c} channels' for c in meta['channels'])}), "
                  f"projected to a common size and fused by the '{mode}' fusion, whose per-sample weights "
                  f"(rows sum to 1) are the explanation examined here.")
    rep.heading("Training")
    rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in trained.items()]))
    rep.figure(figures.training_curves(pd.read_csv(lay.history)), "training_curves",
               "Loss and accuracy per epoch.")

    rep.heading("Which stream does the fusion weigh?")
    rep.table(pd.DataFrame([{"samples": "all", **w["mean"]}] +
                           [{"samples": k.replace("_", " "), **v} for k, v in w.items()
                            if k.endswith(("_corrupted", "_clean"))]))
    if metrics["found_informative"] is None:
        rep.paragraph("No sample has exactly one stream corrupted, so there is no right answer to check.")
    else:
        found = metrics["found_informative"]
        rep.paragraph(f"With one stream uninformative, the '{mode}' fusion puts {w['informative']:.2f} of its "
                      f"weight on the informative stream: it {'DID' if found else 'did NOT'} find it "
                      f"(goal ≥ {metrics['goal']:.2f}). Compare the modes side by side with the sweep in "
                      "docs/pipeline.md, Sweeps (one MLflow run per mode).", css="ok" if found else "warn")
    stored = io.load_arrays(lay.stream_weights)
    preds = io.load_arrays(lay.predictions)
    rep.figure(figures.stream_weights_by_class(stored["weights"], preds["y"], meta["classes"], meta["streams"]),
               "weights_by_class", "Each stream's weight per class.")
    rep.figure(figures.stream_weights_by_corruption(stored["weights"], stored["corrupted"], meta["streams"]),
               "weights_by_corruption", "Per-sample weights, split by which stream was corrupted.")
    add_evaluation(rep, lay, "stream")
    return rep.write(lay.dir("report"))
