"""The evaluate stage of a classification experiment.

Scores every explanation method of the explain stage (and a seeded random
baseline): deletion and insertion curves (faithfulness), AUROC and pointing game
against planted evidence where the data has it, and characterises every head
(entropy, sink/vertical score, locality, importance by ablation). Writes
``metrics.json`` (nested: faithfulness / evidence / heads) and, under ``results/``,
``deletion.csv`` and ``insertion.csv`` (mean curve per method), ``heads.csv`` and
``figures/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab import io
from attnlab.models import load_checkpoint


def best_head(frame: pd.DataFrame, column: str, largest: bool = True) -> dict[str, Any]:
    """The head with the largest (smallest) ``column``, as a small dict for metrics.json."""
    row = frame.loc[frame[column].idxmax() if largest else frame[column].idxmin()]
    return {"module": str(row["module"]), "entry": int(row["entry"]), "head": int(row["head"]),
            column: float(row[column])}


def head_summary(heads: pd.DataFrame) -> dict[str, Any]:
    summary = {"most_vertical": best_head(heads, "sink"), "most_diffuse": best_head(heads, "entropy"),
               "most_focused": best_head(heads, "entropy", largest=False),
               "mean_entropy": float(heads["entropy"].mean()), "mean_sink": float(heads["sink"].mean())}
    if "prob_drop" in heads and heads["prob_drop"].notna().any():
        summary["most_important"] = best_head(heads.dropna(subset=["prob_drop"]), "prob_drop")
    return summary


def head_table(reader, *, k: int | None, batch_size: int, causal: bool = False,
               padding: torch.Tensor | None = None) -> pd.DataFrame:
    """Entropy, sink score and locality of every recorded entry's heads, streamed from
    disk; ``padding [N, L]`` (True = padded) is sliced per batch."""
    from attnlab.evaluate import HeadStats

    stats, start = HeadStats(k=k, causal=causal), 0
    for batch in reader.batches(batch_size):
        stop = start + batch[0].shape[0]
        # factorised entries ([N, k, H, L, L], e.g. space-time) count each of their k maps
        stats.update([a.flatten(0, 1) if a.ndim == 5 else a for a in batch],
                     mask=None if padding is None else padding[start:stop])
        start = stop
    result = {key: value.numpy() for key, value in stats.result().items()}
    return pd.DataFrame([{"entry": e, "module": name, "head": h, **{key: float(v[e, h]) for key, v in result.items()}}
                         for e, name in enumerate(reader.names) for h in range(result["entropy"].shape[1])
                         if not np.isnan(result["entropy"][e, h])])


def ablation_module(model: torch.nn.Module, name: str) -> str | None:
    """The module whose heads :func:`~attnlab.evaluate.ablate_heads` zeroes for the
    recorded attention ``name``: itself if it has ``num_heads`` and ``out_proj``, else its
    parent if that has them (a recorded ``AttentionProbs`` marker), else None."""
    for candidate in (name, name.rpartition(".")[0]):
        module = model.get_submodule(candidate)
        if isinstance(getattr(module, "num_heads", None), int) and isinstance(
                getattr(module, "out_proj", None), torch.nn.Linear):
            return candidate
    return None


def perturbation_curves(fn: Any, x: torch.Tensor, importance: dict[str, torch.Tensor], masker: Any, *,
                        target: torch.Tensor, steps: int | None, batch_size: int,
                        forward_kwargs: dict[str, Any] | None = None,
                        ) -> tuple[dict[str, dict[str, float]], dict[str, pd.DataFrame]]:
    """Deletion and insertion curves of every method's importance:
    ``({"deletion_auc": {method: mean AUC}, "insertion_auc": {...}},
    {"deletion": mean curve per method (a column each, beside "fraction"), "insertion": ...})``."""
    from attnlab.evaluate import deletion_curve, insertion_curve

    aucs: dict[str, dict[str, float]] = {"deletion_auc": {}, "insertion_auc": {}}
    curves: dict[str, pd.DataFrame] = {}
    with torch.no_grad():
        for mode, curve_fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
            columns = {}
            for method, imp in importance.items():
                curve = curve_fn(fn, x, imp, masker, target=target, steps=steps, batch_size=batch_size,
                                 forward_kwargs=forward_kwargs)
                aucs[f"{mode}_auc"][method] = float(curve.auc.mean())
                columns["fraction"] = curve.fractions.numpy()
                columns[method] = curve.probs.mean(0).numpy()
            curves[mode] = pd.DataFrame(columns)
    return aucs, curves


def write_curves(curves: dict[str, pd.DataFrame], res: Path) -> None:
    """``deletion.csv``, ``insertion.csv`` (DVC plots) and ``figures/faithfulness.png`` under ``res``."""
    from attnlab.report import figures
    from attnlab.report.html import save_figure

    for mode, frame in curves.items():
        frame.to_csv(res / f"{mode}.csv", index=False, float_format="%.6g")
    save_figure(figures.faithfulness_curves(curves), res / "figures" / "faithfulness.png")


def evaluate_classifier(experiment: Any, cfg: Any, root: Path, out: Path, *, progress: bool = False) -> None:
    from attnlab.evaluate import evidence_auroc, head_importance, pointing_game, random_importance
    from attnlab.report import figures
    from attnlab.report.html import save_figure
    from attnlab.store import AttentionReader

    ev = cfg.evaluate
    res = out / "results"
    (res / "figures").mkdir(parents=True)
    data, meta = experiment.load_dataset(root / "prepare")
    model = load_checkpoint(root / "train" / "model.pt")
    y = data["y_test"]
    loaded = io.load_arrays(root / "explain" / "importance.npz")
    importance = {m: torch.from_numpy(v) for m, v in loaded.items() if m not in ("target", "y")}
    importance["random"] = random_importance(next(iter(importance.values())).shape, ev.seed).float()
    target = torch.from_numpy(loaded["target"])
    fn, x_items, masker = experiment.perturbation_inputs(cfg, model, data)

    aucs, curves = perturbation_curves(fn, x_items, importance, masker, target=target, steps=ev.steps,
                                       batch_size=ev.batch_size)
    write_curves(curves, res)
    metrics: dict[str, Any] = {"n_samples": len(y), "accuracy": float((target == y).float().mean()),
                               "faithfulness": aucs}

    if "evidence_test" in data:
        evidence = data["evidence_test"].flatten(1)
        metrics["evidence"] = {
            "auroc": {m: float(evidence_auroc(imp, evidence).mean) for m, imp in importance.items()},
            "pointing_game": {m: float(pointing_game(imp, evidence)) for m, imp in importance.items()}}

    with AttentionReader(root / "extract" / "attention.h5") as reader:
        names = list(reader.names)
        heads = head_table(reader, k=ev.sink_k, batch_size=ev.batch_size)
    # head ablation zeroes a head's slice of out_proj: the recorded module (an
    # nn.MultiheadAttention) or the attention module holding a recorded AttentionProbs
    ablatable = {n: a for n in dict.fromkeys(names) if (a := ablation_module(model, n)) is not None}
    modules = list(ablatable.values())
    if ev.ablation and modules:
        batches = [(x_items[i:i + ev.batch_size], y[i:i + ev.batch_size]) for i in range(0, len(y), ev.batch_size)]
        ablated = head_importance(model, batches, modules, forward=lambda _, inputs: fn(inputs), progress=progress)
        recorded = {a: n for n, a in ablatable.items()}
        drops = pd.DataFrame([{"module": recorded[name], "head": h, "accuracy_drop": float(ablated.accuracy_drop[l, h]),
                               "prob_drop": float(ablated.prob_drop[l, h])}
                              for l, name in enumerate(ablated.names)
                              for h in range(ablated.accuracy_drop.shape[1])
                              if not np.isnan(float(ablated.prob_drop[l, h]))])
        heads = heads.merge(drops, on=["module", "head"], how="left")
    heads.to_csv(res / "heads.csv", index=False, float_format="%.6g")
    metrics["heads"] = head_summary(heads)
    io.write_json(out / "metrics.json", metrics)

    columns = ["entropy", "sink", "locality_norm"] + (["prob_drop", "accuracy_drop"] if "prob_drop" in heads else [])
    save_figure(figures.head_heatmaps(heads, columns), res / "figures" / "heads.png")
