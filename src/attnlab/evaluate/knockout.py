"""Knockout as a diagnostic: does the attention an explanation points at carry the prediction?

For each attention layer (each recorded call) and, where it has several heads, for each
head and for all heads together, the explained row(s) lose their attention edges to the
top-``k`` items of an explanation method — blocked as in attention knockout (Geva et al.,
2023): ``-inf`` on those scores, i.e. zeroed and the rows renormalised
(:func:`~attnlab.explain.interventions.block_edges`) — in that layer/head only, and the
drop of the explained logit is measured; the same with ``k`` random items of each
sample as the reference. Means over samples with bootstrap 95% intervals and the paired
one-sided Wilcoxon test of "top-k drops more than random"
(:mod:`attnlab.evaluate.uncertainty`).

Explained rows: the class token's (``"cls"``), every row (``"mean"``: mean-pooled
models), or one row per sample (an int64 ``[B]`` of positions: causal models). Item
``i`` is token ``i`` (``i + 1`` when the model has a leading class token: one more token
than items). Divided space-time models: the layers are the blocks' space attentions,
the explained row is each frame's copy of the class token (which takes no part in time
attention), item ``(f, p)`` is key ``1 + p`` of frame ``f``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnlab.capture import AttentionRecorder
from attnlab.explain.interventions import block_edges

__all__ = ["knockout_units", "knockout_drops", "top_items", "random_items", "knockout_table"]


def top_items(importance: Tensor, k: int) -> Tensor:
    """The ``k`` most important items of each sample ``[S, k]`` (int64) of ``importance [S, n]``."""
    return importance.topk(min(k, importance.shape[1]), dim=1).indices


def random_items(n_samples: int, n_items: int, k: int, *, valid: Tensor | None = None, seed: int = 0) -> Tensor:
    """``k`` distinct items per sample ``[S, k]`` drawn uniformly (seeded) among the ``valid
    [S, n]`` ones (all when None; a sample with fewer valid items repeats its draws' order
    onto invalid ones last)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(n_samples, n_items, generator=gen)
    if valid is not None:
        keys = keys.masked_fill(~valid.cpu(), -1.0)
    return keys.topk(min(k, n_items), dim=1).indices


def knockout_units(model: nn.Module, run: Callable[[], Tensor], *, spacetime: bool = False
                   ) -> tuple[list[dict[str, Any]], Tensor]:
    """The units knocked out, ``[{"layer", "module", "head", "call"}]`` (``head`` is
    ``"all"`` or a head index), and the unedited logits ``run()`` ``[B, C]``: per recorded
    call (space calls only, for ``spacetime``), all heads, then each head if it has several."""
    with torch.no_grad(), AttentionRecorder(model) as rec:
        logits = run()
    units = []
    calls = [c for c in range(len(rec.attentions)) if not spacetime or c % 2 == 1]
    for layer, call in enumerate(calls):
        heads = rec.attentions[call].shape[1]
        for head in ["all"] + (list(range(heads)) if heads > 1 else []):
            units.append({"layer": layer, "module": rec.names[call], "head": head, "call": call})
    return units, logits


def knockout_drops(model: nn.Module, run: Callable[[], Tensor], target: Tensor, items: Tensor, units: list[dict],
                   *, rows: str | int | Tensor, n_items: int, base: Tensor, spacetime: bool = False) -> Tensor:
    """Drops ``[U, B]`` of the explained logit ``base[b, target[b]] - run()[b, target[b]]``
    with, in unit ``u`` only, the edges from the explained ``rows`` to ``items [B, k]``
    (item indices) blocked (each query keeps its own diagonal edge)."""
    target = target.to(base.device)
    ref = base.gather(1, target[:, None])[:, 0]
    out = []
    with torch.no_grad():
        for unit in units:
            edit = _edit(unit, items, rows=rows, n_items=n_items, spacetime=spacetime)
            with AttentionRecorder(model, layers=[0], edit=edit):
                logits = run()
            out.append(ref - logits.gather(1, target[:, None])[:, 0])
    return torch.stack(out)


def _edit(unit: dict, items: Tensor, *, rows, n_items: int, spacetime: bool):
    call, head = unit["call"], unit["head"]

    def edit(name: str, c: int, probs: Tensor) -> Tensor:
        if c != call:
            return probs
        b = items.shape[0]
        keys = items.to(probs.device)
        if spacetime:                                   # [B·F, H, 1+P, 1+P]: frame f, row 0, key 1+p
            groups, n = probs.shape[0] // b, probs.shape[-1]
            patches = n - 1
            blocked = torch.zeros(b, groups, n, n, dtype=torch.bool, device=probs.device)
            frame, patch = keys // patches, keys % patches
            bi = torch.arange(b, device=probs.device)[:, None].expand_as(keys)
            blocked[bi, frame, 0, 1 + patch] = True
            blocked = blocked.reshape(b * groups, 1, n, n)
        else:                                           # [B, H, N, N]
            n = probs.shape[-1]
            tokens = keys + (n - n_items)               # a leading class token shifts the items by one
            key_mask = torch.zeros(b, n, dtype=torch.bool, device=probs.device)
            key_mask.scatter_(1, tokens, True)
            row_mask = _row_mask(rows, b, n, probs.device)
            blocked = (row_mask[:, :, None] & key_mask[:, None, :]
                       & ~torch.eye(n, dtype=torch.bool, device=probs.device))[:, None]    # [B, 1, N, N]
        if head != "all":
            only = torch.zeros(probs.shape[1], dtype=torch.bool, device=probs.device)
            only[head] = True
            blocked = blocked & only[None, :, None, None]
        return block_edges(probs, blocked)

    return edit


def _row_mask(rows, b: int, n: int, device) -> Tensor:
    """``[B, N]`` True at the explained query rows."""
    mask = torch.zeros(b, n, dtype=torch.bool, device=device)
    if isinstance(rows, str):
        if rows == "cls":
            mask[:, 0] = True
        elif rows == "mean":
            mask[:] = True
        else:
            raise ValueError(f"rows={rows!r}: expected 'cls', 'mean', an int or an int64 [B] tensor")
    elif isinstance(rows, Tensor):
        mask[torch.arange(b, device=device), rows.to(device)] = True
    else:
        mask[:, rows] = True
    return mask


def knockout_table(units: list[dict], top: Any, rand: Any, *, resamples: int = 1000, seed: int = 0,
                   alpha: float = 0.05):
    """One row per unit: ``layer, module, head``, the mean drop of the explained logit
    with the top-k edges blocked (``topk``, ``topk_lo``, ``topk_hi``: 95% bootstrap interval
    over samples) and with k random edges (``random``, ``random_lo``, ``random_hi``), and
    the one-sided paired Wilcoxon ``p`` of "top-k drops more than random" (``carries``:
    ``p < alpha``). ``top``, ``rand``: ``[U, S]`` per-sample drops."""
    import pandas as pd

    from attnlab.evaluate.uncertainty import uncertainty

    top, rand = np.asarray(top, dtype=np.float64), np.asarray(rand, dtype=np.float64)
    rows = []
    for u, unit in enumerate(units):
        ci, tests = uncertainty({"topk": top[u], "random": rand[u]}, higher_is_better=True, resamples=resamples,
                                seed=seed, alpha=alpha)
        rows.append({"layer": unit["layer"], "module": unit["module"], "head": unit["head"],
                     "topk": float(top[u].mean()), "topk_lo": ci["topk"]["lo"], "topk_hi": ci["topk"]["hi"],
                     "random": float(rand[u].mean()), "random_lo": ci["random"]["lo"],
                     "random_hi": ci["random"]["hi"], "p": tests["topk"]["p"],
                     "carries": bool(tests["topk"]["better"])})
    return pd.DataFrame(rows)
