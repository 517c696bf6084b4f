"""The report of the ``fusion`` experiment: which stream the fusion weights point at."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from attnlab import io
from attnlab.report import figures
from attnlab.report.classifier import add_evaluation
from attnlab.report.html import HtmlReport


def write_fusion_report(experiment: Any, cfg: Any, root: Path, out: Path) -> Path:
    meta = io.read_json(root / "prepare" / "meta.json")
    trained = io.read_json(root / "train" / "metrics.json")
    metrics = io.read_json(root / "evaluate" / "metrics.json")
    mode, w = cfg.model.fusion, metrics["weights"]
    rep = HtmlReport(f"attnlab — {experiment.name} ({mode} fusion)")
    corrupt = ("no stream corrupted" if meta["corrupt_stream"] is None else
               f"the {meta['corrupt_stream']} stream corrupted ({meta['corrupt_mode']}) on "
               f"{meta['corrupt_fraction']:.0%} of the samples")
    rep.paragraph(f"Data: {meta['source']} ({meta['n_train']} training, {meta['n_test']} test digits), "
                  f"{corrupt}. Model: one CNN per stream ({' and '.join(f'{c} channels' for c in meta['channels'])}), "
                  f"projected to a common size and fused by the '{mode}' fusion, whose per-sample weights "
                  f"(rows sum to 1) are the explanation examined here.")
    rep.heading("Training")
    rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in trained.items()]))
    rep.figure(figures.training_curves(pd.read_csv(root / "train" / "history.csv")), "training_curves",
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
                      "the README (one MLflow run per mode).", css="ok" if found else "warn")
    for name, caption in (("weights_by_class", "Each stream's weight per class."),
                          ("weights_by_corruption", "Per-sample weights, split by which stream was corrupted.")):
        rep.image((root / "evaluate" / "results" / "figures" / f"{name}.png").read_bytes(), name, caption)
    add_evaluation(rep, root / "evaluate", "stream")
    return rep.write(out)
