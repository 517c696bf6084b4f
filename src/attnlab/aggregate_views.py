"""Vocabulary x vocabulary aggregation of stored attention, streamed from disk.

:func:`aggregate_views` reads an attention file written by
:func:`~attnlab.store.extract_attention` one batch at a time (the model is never run)
and feeds :class:`~attnlab.aggregate.VocabAttention`: memory is one batch of attention
plus the tables (``V x V`` for small vocabularies, the token pairs seen for large ones),
whatever the number of sequences.
"""
from __future__ import annotations

import os
from typing import Literal, Sequence

import torch

from attnlab.aggregate import VocabAttention
from attnlab.explain import rollout
from attnlab.store import AttentionReader

View = tuple[VocabAttention, VocabAttention | None]


def aggregate_views(path: str | os.PathLike, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int, *,
                    attention: Literal["layer", "mean", "rollout"] = "layer", layers: Sequence[int] = (0,),
                    heads: bool = True, batch_size: int = 64, causal: bool = False,
                    samples: tuple[int, int] | None = None, progress: bool = False,
                    sparse: bool | None = None) -> dict[str, View]:
    """Aggregate the stored attention of ``tokens [N, L]`` (``mask [N, L]``: True = real
    token) into ``{view: (head mean, per head or None)}``.

    Views: with ``attention="layer"`` one per entry of ``layers`` (``"layer0"``, ...;
    negative indices count from the end), with ``"mean"`` the mean of all layers
    (``"mean"``; every layer must have the same heads), with ``"rollout"`` the attention
    rollout over the layers (``"rollout"``, no heads). ``heads`` adds one matrix per head.
    ``samples=(start, stop)`` aggregates only those samples (a torchrun process's block;
    the processes' tables are then summed, :meth:`VocabAttention.all_reduce`).
    ``sparse`` chooses the aggregators' layout (``None``: by size, so a 30k-50k vocabulary
    keeps only the pairs it sees; see :class:`~attnlab.aggregate.VocabAttention`).
    """
    with AttentionReader(path) as reader:
        n_layers = reader.num_layers           # recorded per forward; the store may hold fewer (extract.layers)
        if len(reader) != len(tokens):
            raise ValueError(f"{path}: {len(reader)} samples of attention for {len(tokens)} token sequences")
        if attention == "layer":
            bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
            if bad:
                raise ValueError(f"aggregate.layers: layer {bad[0]} does not exist; the model has {n_layers} "
                                 f"layers (0..{n_layers - 1}, or negative from the end)")
            picks = {f"layer{layer % n_layers}": reader.layers.index(layer % n_layers) if layer % n_layers in
                     reader.layers else None for layer in layers}
        elif attention in ("mean", "rollout"):
            picks = {attention: None}
        else:
            raise ValueError(f"attention={attention!r}; accepted: layer, mean, rollout")
        # VocabAttention takes whole [N, N] maps; refused, naming the extract knob, if not stored
        reader.require(f"aggregate.attention {attention!r}", layers=layers if attention == "layer" else "all",
                       rows="all", heads="each" if heads and attention != "rollout" else "any")
        entries = sorted(set(picks.values())) if attention == "layer" else None     # read only these
        views: dict[str, View] = {}
        for view, layer in picks.items():   # made before any sample: a block may be empty
            per_sample = reader.entry(layer or 0).shape[1:]         # [H, Lq, Lk]
            per_head = heads and attention != "rollout" and len(per_sample) == 3
            views[view] = (VocabAttention(vocab_size, sparse=sparse),
                           VocabAttention(vocab_size, nhead=per_sample[0], sparse=sparse) if per_head else None)
        first, last = samples or (0, len(reader))
        batches = reader.batches(batch_size, first, last, entries=entries)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="aggregate", total=-(-max(last - first, 0) // batch_size), unit="batch")
        start = first
        for batch in batches:
            stop = start + batch[0].shape[0]
            t, m = tokens[start:stop], mask[start:stop]
            for view, layer in picks.items():
                att = _view_attention(batch, attention, None if entries is None else entries.index(layer), m)
                agg, per_head = views[view]
                agg.update(t, att, mask=m, causal=causal)
                if per_head is not None:
                    per_head.update(t, att, mask=m, causal=causal)
            start = stop
    return views


def _view_attention(batch: list[torch.Tensor], attention: str, layer: int | None, mask: torch.Tensor) -> torch.Tensor:
    """One batch of the view's attention: ``[B, H, N, N]`` (layer, mean) or ``[B, N, N]`` (rollout)."""
    if attention == "layer":
        return batch[layer]
    if attention == "mean":
        if len({a.shape for a in batch}) != 1:
            raise ValueError("attention='mean' needs every layer to have the same shape; got "
                             f"{sorted({tuple(a.shape[1:]) for a in batch})}")
        return torch.stack(batch).mean(0)
    return rollout(batch, mask=mask)
