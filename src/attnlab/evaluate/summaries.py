"""Summaries the evaluate stage writes, shared by every experiment: deletion/insertion
curves of every method, per-head tables, and fusion stream weights.

Pure computations on tensors, data frames and readers; :mod:`attnlab.pipeline.stages` writes
them to files and :mod:`attnlab.report` draws them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch


def stream_weight_summary(weights: np.ndarray, y: np.ndarray, corrupted: np.ndarray,
                          classes: Sequence[str], streams: Sequence[str]) -> dict[str, Any]:
    """Mean weight per stream: overall, per class, on samples where each stream is
    corrupted / clean, and on the informative stream (mean over samples with exactly
    one stream corrupted of the weight on the other one; None if there are none)."""
    out: dict[str, Any] = {"mean": {s: float(weights[:, i].mean()) for i, s in enumerate(streams)},
                           "per_class": {c: {s: float(weights[y == k, i].mean()) for i, s in enumerate(streams)}
                                         for k, c in enumerate(classes) if (y == k).any()}}
    for i, s in enumerate(streams):
        for state, rows in (("corrupted", corrupted[:, i]), ("clean", ~corrupted[:, i])):
            if rows.any():
                out.setdefault(f"{s}_{state}", {t: float(weights[rows, j].mean()) for j, t in enumerate(streams)})
    one = corrupted.sum(1) == 1
    informative = (~corrupted[one]).argmax(1)
    out["informative"] = float(weights[one][np.arange(one.sum()), informative].mean()) if one.any() else None
    return out


def best_head(frame: pd.DataFrame, column: str, largest: bool = True) -> dict[str, Any]:
    """The head with the largest (smallest) ``column``, as a small dict for metrics.json."""
    row = frame.loc[frame[column].idxmax() if largest else frame[column].idxmin()]
    return {"module": str(row["module"]), "entry": int(row["entry"]), "head": int(row["head"]),
            column: float(row[column])}


def head_summary(heads: pd.DataFrame) -> dict[str, Any]:
    summary = {"strongest_sink": best_head(heads, "sink"), "most_diffuse": best_head(heads, "entropy"),
               "most_focused": best_head(heads, "entropy", largest=False),
               "mean_entropy": float(heads["entropy"].mean()), "mean_sink": float(heads["sink"].mean())}
    if "prob_drop" in heads and heads["prob_drop"].notna().any():
        summary["most_important"] = best_head(heads.dropna(subset=["prob_drop"]), "prob_drop")
    return summary


def head_table(reader: Any, *, k: int | None, batch_size: int, causal: bool = False,
               mask: torch.Tensor | None = None) -> pd.DataFrame:
    """Entropy, sink score and locality of every recorded entry's heads, streamed from
    disk; ``mask [N, L]`` (True = real token) is sliced per batch."""
    from attnlab.evaluate import HeadStats

    stats, start = HeadStats(k=k, causal=causal), 0
    for batch in reader.batches(batch_size):
        stop = start + batch[0].shape[0]
        # factorised entries ([N, k, H, L, L], e.g. space-time) count each of their k maps
        stats.update([a.flatten(0, 1) if a.ndim == 5 else a for a in batch],
                     mask=None if mask is None else mask[start:stop])
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
                        forward_kwargs: dict[str, Any] | None = None, resamples: int | None = None,
                        seed: int = 0, alpha: float = 0.05, modes: Sequence[str] = ("deletion", "insertion"),
                        valid: torch.Tensor | None = None,
                        ) -> tuple[dict[str, dict[str, Any]], dict[str, pd.DataFrame]]:
    """Deletion and insertion curves of every method's importance:
    ``({"deletion_auc": {method: mean AUC}, "insertion_auc": {...}},
    {"deletion": mean curve per method (a column each, beside "fraction"), "insertion": ...})``.

    With ``resamples`` (and a ``"random"`` method among ``importance``), the first dict
    also holds, for each mode, ``"<mode>_auc_ci"``: ``{method: {"lo", "hi"}}``, the 95%
    bootstrap interval of the mean AUC over samples, and ``"<mode>_auc_vs_random"``:
    ``{method: {"p", "better", "n"}}``, the one-sided paired Wilcoxon test that the
    method beats random at level ``alpha`` (see :mod:`attnlab.evaluate.uncertainty`).
    ``modes``: the curves to compute (a subset of deletion and insertion); ``valid``:
    the items that can matter (see :func:`~attnlab.evaluate.deletion_curve`)."""
    from attnlab.evaluate import deletion_curve, insertion_curve
    from attnlab.evaluate.uncertainty import uncertainty

    unknown = set(modes) - {"deletion", "insertion"}
    if unknown or not modes:
        raise ValueError(f"perturbation_curves: modes={list(modes)!r}; expected 'deletion' and/or 'insertion'")
    aucs: dict[str, dict[str, Any]] = {f"{mode}_auc": {} for mode in modes}
    curves: dict[str, pd.DataFrame] = {}
    with torch.no_grad():
        for mode, curve_fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
            if mode not in modes:
                continue
            columns, per_sample = {}, {}
            for method, imp in importance.items():
                curve = curve_fn(fn, x, imp, masker, target=target, steps=steps, batch_size=batch_size,
                                 forward_kwargs=forward_kwargs, valid=valid)
                aucs[f"{mode}_auc"][method] = float(curve.auc.mean())
                per_sample[method] = curve.auc.cpu().numpy()          # the curves follow x's device
                columns["fraction"] = curve.fractions.cpu().numpy()
                columns[method] = curve.probs.mean(0).cpu().numpy()
            curves[mode] = pd.DataFrame(columns)
            if resamples is not None:
                aucs[f"{mode}_auc_ci"], aucs[f"{mode}_auc_vs_random"] = uncertainty(
                    per_sample, higher_is_better=mode == "insertion", resamples=resamples, seed=seed, alpha=alpha)
    return aucs, curves


def write_curves(curves: dict[str, pd.DataFrame], directory: str | Path) -> None:
    """``deletion.csv`` and ``insertion.csv`` in ``directory``, long form (``fraction,
    method, probability``): DVC's ``method_curves`` template draws a line per method."""
    for mode, frame in curves.items():
        frame.melt(id_vars="fraction", var_name="method", value_name="probability").to_csv(
            Path(directory) / f"{mode}.csv", index=False, float_format="%.6g")


def self_attention_only(path: str | Path) -> bool:
    """Whether every entry of an attention file is square (token x token) and holds
    every query row and each head; the head diagnostics need it (a fusion's learned
    query over two stream tokens is not square, nor is a store of the class-token rows
    only, ``extract.rows: cls``)."""
    from attnlab.store import AttentionReader

    with AttentionReader(path) as reader:
        held = reader.selection
        return held.rows == held.heads == "all" and all(
            reader.entry(k).shape[-1] == reader.entry(k).shape[-2] for k in reader.keys)
