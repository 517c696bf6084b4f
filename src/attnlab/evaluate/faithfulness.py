"""Deletion and insertion curves: is an importance ranking faithful to the model?

Samek et al. (2017, "Evaluating the visualization of what a deep neural network has
learned") and Petsiuk et al. (2018, RISE): remove the items an explanation ranks
highest, one after another, and watch the probability of the explained class. A
faithful ranking makes it collapse early (small deletion AUC); inserting items into
an all-removed input in the same order makes it rise early (large insertion AUC).

Items are whatever an explanation scores: timesteps, frames, tokens, streams along
dim 1 of ``x [B, T, ...]``, or frames×patches of a video. The input is perturbed
through a *masker* ``masker(x [B, ...], keep [B, n_items] bool) -> x'`` that replaces
the items where ``keep`` is False by a baseline; :func:`sequence_masker` and
:func:`patch_masker` build the two common ones. A constant baseline makes inputs the
model never saw, and part of the probability drop measures that; :func:`road_masker`
(ROAD, Rong et al., 2022, "A consistent and efficient evaluation strategy for
attribution methods") imputes removed items from their kept neighbours plus noise
instead, and :func:`road_like` builds it for the items of a constant masker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

Masker = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``masker(x [B, ...], keep_bn [B, n_items] bool) -> x'`` with removed items replaced."""


def _fill_value(baseline: float | torch.Tensor | str, reference: torch.Tensor | None,
                mean_dims: tuple[int, ...], who: str) -> float | torch.Tensor:
    if isinstance(baseline, str):
        if baseline != "mean":
            raise ValueError(f"{who}: baseline={baseline!r}; expected a number, a tensor or 'mean'")
        if reference is None:
            raise ValueError(f"{who}: baseline='mean' needs reference=<tensor of inputs>")
        return reference.detach().float().mean(dim=mean_dims)
    if reference is not None:
        raise ValueError(f"{who}: reference is only used with baseline='mean'")
    return baseline.detach() if isinstance(baseline, torch.Tensor) else baseline


def _where_keep(keep: torch.Tensor, x: torch.Tensor, fill: float | torch.Tensor) -> torch.Tensor:
    fill_t = torch.as_tensor(fill, device=x.device).to(x.dtype)
    return torch.where(keep, x, fill_t)


def sequence_masker(baseline: float | torch.Tensor | str = 0.0, *,
                    reference: torch.Tensor | None = None) -> Masker:
    """Masker for items along dim 1: ``x [B, T, ...]``, ``keep [B, T]``.

    A removed item is replaced whole by ``baseline``: a number (e.g. 0, or a mask
    token id for integer token inputs ``[B, T]``), a tensor broadcastable to
    ``x.shape[2:]``, or ``"mean"`` — the per-feature mean of ``reference [N, T, ...]``
    over samples and items.
    """
    fill = _fill_value(baseline, reference, (0, 1), "sequence_masker")

    def masker(x: torch.Tensor, keep_bn: torch.Tensor) -> torch.Tensor:
        if keep_bn.shape != x.shape[:2]:
            raise ValueError(f"sequence_masker: keep has shape {tuple(keep_bn.shape)}, "
                             f"expected x.shape[:2] = {tuple(x.shape[:2])}")
        keep = keep_bn.view(*keep_bn.shape, *([1] * (x.dim() - 2)))
        return _where_keep(keep, x, fill)

    masker.layout = ("sequence",)              # read by road_like
    return masker


def patch_masker(frames: int, patch: int, size: int,
                 baseline: float | torch.Tensor | str = 0.0, *,
                 reference: torch.Tensor | None = None) -> Masker:
    """Masker for video ``x [B, F, C, S, S]`` whose items are patches.

    Items are the ``F·(S/patch)²`` non-overlapping ``patch×patch`` squares, in
    frame-major, then row-major order (item ``f·g² + r·g + c`` with ``g = S/patch``),
    the order of a ViT/TimeSformer patch grid. ``baseline``: a number, a tensor
    broadcastable to ``[C, S, S]``, or ``"mean"`` — the per-channel mean of
    ``reference [N, F, C, S, S]``.
    """
    if patch <= 0 or size % patch:
        raise ValueError(f"patch_masker: size={size} is not a positive multiple of patch={patch}")
    grid = size // patch
    n_items = frames * grid * grid
    fill = _fill_value(baseline, reference, (0, 1, 3, 4), "patch_masker")
    if isinstance(fill, torch.Tensor) and isinstance(baseline, str):
        fill = fill[:, None, None]                          # [C, 1, 1]

    def masker(x: torch.Tensor, keep_bn: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.dim() != 5 or x.shape[1] != frames or x.shape[-2:] != (size, size):
            raise ValueError(f"patch_masker: x has shape {tuple(x.shape)}, "
                             f"expected [B, {frames}, C, {size}, {size}]")
        if keep_bn.shape != (b, n_items):
            raise ValueError(f"patch_masker: keep has shape {tuple(keep_bn.shape)}, "
                             f"expected [{b}, {n_items}]")
        keep = (keep_bn.view(b, frames, grid, 1, grid, 1)
                .expand(b, frames, grid, patch, grid, patch)
                .reshape(b, frames, 1, size, size))        # broadcast over channels
        return _where_keep(keep, x, fill)

    masker.layout = ("patches", frames, patch, size)   # read by road_like
    return masker


def stream_masker(channels: Sequence[int], baseline: float | torch.Tensor = 0.0) -> Masker:
    """Masker for multi-stream inputs packed along dim 1: ``x [B, C, ...]`` whose items
    are consecutive channel groups (stream ``s`` has ``channels[s]`` channels, ``Σ = C``);
    ``keep [B, len(channels)]``. A removed stream's channels are replaced by ``baseline``
    (a number, or a tensor broadcastable to ``x.shape[1:]``)."""
    sizes = [int(c) for c in channels]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"stream_masker: channels={list(channels)!r}; expected positive channel counts")
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))   # [C] stream of each channel

    def masker(x: torch.Tensor, keep_bn: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != len(owner):
            raise ValueError(f"stream_masker: x has shape {tuple(x.shape)}, expected [B, {len(owner)}, ...]")
        if keep_bn.shape != (x.shape[0], len(sizes)):
            raise ValueError(f"stream_masker: keep has shape {tuple(keep_bn.shape)}, "
                             f"expected [{x.shape[0]}, {len(sizes)}]")
        keep = keep_bn[:, owner.to(keep_bn.device)].view(*x.shape[:2], *([1] * (x.dim() - 2)))
        return _where_keep(keep, x, baseline.detach() if isinstance(baseline, torch.Tensor) else baseline)

    return masker


def _interpolate(x_mtd: torch.Tensor, keep_mt: torch.Tensor, fill: float) -> torch.Tensor:
    """Removed items of ``x [M, T, D]`` (``keep [M, T]`` False) replaced by the linear
    interpolation between the nearest kept items before and after along ``T``; the
    nearest kept item where only one side has one; ``fill`` where none is kept."""
    m, t_len, _ = x_mtd.shape
    t = torch.arange(t_len, device=x_mtd.device).expand(m, t_len)
    left = torch.where(keep_mt, t, -1).cummax(dim=1).values                           # last kept <= t
    right = torch.where(keep_mt, t, t_len).flip(1).cummin(dim=1).values.flip(1)       # first kept >= t
    has_l, has_r = left >= 0, right < t_len
    l, r = left.clamp(0, t_len - 1), right.clamp(0, t_len - 1)
    x_l = x_mtd.gather(1, l[..., None].expand_as(x_mtd))
    x_r = x_mtd.gather(1, r[..., None].expand_as(x_mtd))
    w = ((t - l).to(x_mtd.dtype) / (r - l).clamp_min(1).to(x_mtd.dtype))[..., None]   # in [0, 1]
    both, only_l, only_r = (has_l & has_r)[..., None], has_l[..., None], has_r[..., None]
    fill_t = torch.tensor(fill, dtype=x_mtd.dtype, device=x_mtd.device)
    return torch.where(both, x_l + w * (x_r - x_l), torch.where(only_l, x_l, torch.where(only_r, x_r, fill_t)))


def road_masker(noise: float = 0.1, seed: int = 0, *, patches: tuple[int, int, int] | None = None,
                reference: torch.Tensor | None = None, fill: float = 0.0) -> Masker:
    """ROAD masker (Rong et al., 2022): a removed item is imputed by linear interpolation
    between the nearest kept items before and after it along the item axis, plus
    Gaussian noise; kept items are unchanged.

    Items are along dim 1 of a floating ``x [B, T, ...]`` (timesteps, frames, their
    embeddings), or, with ``patches=(frames, patch, size)``, the patches of a video
    ``x [B, F, C, S, S]`` in :func:`patch_masker`'s order. A video patch is interpolated
    **along frames at its own grid position**: a fixed position is what changes
    smoothly from frame to frame, whereas neighbours in the flattened patch order
    jump from one row's end to the next row's start and from a frame's last patch to
    the next frame's first, so interpolating along that order would mix unrelated
    image regions. Removed items with kept neighbours on one side only copy that
    neighbour; a sample with nothing kept gets ``fill`` (plus noise).

    Args:
        noise: standard deviation of the added noise: absolute, or, with ``reference``,
            as a fraction of ``reference.std()`` (e.g. the test inputs), so one value
            suits inputs of any scale.
        seed: seeds the noise generator, created once per masker: the same sequence of
            calls gives the same inputs.
        fill: the value where a sample keeps no item at all.
    """
    if noise < 0:
        raise ValueError(f"road_masker: noise={noise}; expected a standard deviation >= 0")
    std = noise * float(reference.detach().double().std()) if reference is not None else float(noise)
    gen = torch.Generator().manual_seed(seed)
    if patches is not None:
        frames, patch, size = patches
        if patch <= 0 or size % patch:
            raise ValueError(f"road_masker: size={size} is not a positive multiple of patch={patch}")
        grid = size // patch

    def masker(x: torch.Tensor, keep_bn: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"road_masker: x has dtype {x.dtype}; interpolation needs floating inputs "
                            "(token ids cannot be interpolated: use sequence_masker)")
        b = x.shape[0]
        if patches is None:
            if keep_bn.shape != x.shape[:2]:
                raise ValueError(f"road_masker: keep has shape {tuple(keep_bn.shape)}, "
                                 f"expected x.shape[:2] = {tuple(x.shape[:2])}")
            out = _interpolate(x.reshape(b, x.shape[1], -1), keep_bn, fill).view_as(x)
            removed = (~keep_bn).view(*keep_bn.shape, *([1] * (x.dim() - 2)))
        else:
            if x.dim() != 5 or x.shape[1] != frames or x.shape[-2:] != (size, size):
                raise ValueError(f"road_masker: x has shape {tuple(x.shape)}, "
                                 f"expected [B, {frames}, C, {size}, {size}]")
            if keep_bn.shape != (b, frames * grid * grid):
                raise ValueError(f"road_masker: keep has shape {tuple(keep_bn.shape)}, "
                                 f"expected [{b}, {frames * grid * grid}]")
            c = x.shape[2]
            # [B, F, C, g, p, g, p] -> one sequence over frames per (sample, grid row, grid column)
            seq = x.reshape(b, frames, c, grid, patch, grid, patch).permute(0, 3, 5, 1, 2, 4, 6)
            keep_seq = keep_bn.view(b, frames, grid, grid).permute(0, 2, 3, 1).reshape(-1, frames)
            imputed = _interpolate(seq.reshape(b * grid * grid, frames, -1), keep_seq, fill)
            out = (imputed.view(b, grid, grid, frames, c, patch, patch).permute(0, 3, 4, 1, 5, 2, 6)
                   .reshape(x.shape))
            removed = ~(keep_bn.view(b, frames, grid, 1, grid, 1)
                        .expand(b, frames, grid, patch, grid, patch).reshape(b, frames, 1, size, size))
        if std > 0:
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
            out = out + std * eps * removed
        return torch.where(removed, out, x)

    masker.layout = ("road",)
    return masker


def road_like(masker: Masker, *, noise: float = 0.1, seed: int = 0,
              reference: torch.Tensor | None = None) -> Masker | None:
    """The :func:`road_masker` over the same items as ``masker`` (one built by
    :func:`sequence_masker` or :func:`patch_masker`), or None when its items have no
    order to interpolate along (:func:`stream_masker`'s streams, a user's own masker).
    Other arguments as in :func:`road_masker`."""
    layout = getattr(masker, "layout", None)
    if layout == ("sequence",):
        return road_masker(noise, seed, reference=reference)
    if layout is not None and layout[0] == "patches":
        return road_masker(noise, seed, patches=tuple(layout[1:]), reference=reference)
    return None


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve for a batch.

    ``fractions [S]``: share of items removed (deletion) or inserted (insertion);
    ``probs [B, S]``: softmax probability of ``target`` at each fraction;
    ``auc [B]``: trapezoid area under ``probs`` over ``fractions``;
    ``target [B]``: the class tracked; ``mode``: ``"deletion"`` or ``"insertion"``.
    """

    fractions: torch.Tensor
    probs: torch.Tensor
    auc: torch.Tensor
    target: torch.Tensor
    mode: str


def as_target(target: int | torch.Tensor | None, logits_fn: Callable[[], torch.Tensor],
              batch: int, device: torch.device) -> torch.Tensor:
    """``target`` as a long tensor ``[B]``; ``None`` → the model's prediction."""
    if target is None:
        return logits_fn().argmax(dim=-1)
    t = torch.as_tensor(target, device=device).long()
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target has shape {tuple(t.shape)}, expected an int or [{batch}]")
    return t


def _batch_index(kw: Mapping[str, Any], idx: torch.Tensor, batch: int) -> dict[str, Any]:
    """Select rows ``idx`` of every tensor kwarg whose leading dim is the batch."""
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v)
            for k, v in kw.items()}


def _curve(mode: str, model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor,
           importance: torch.Tensor, masker: Masker, target, steps: int | None,
           batch_size: int, forward_kwargs: Mapping[str, Any] | None,
           valid: torch.Tensor | None = None) -> Curve:
    if importance.dim() != 2 or importance.shape[0] != x.shape[0]:
        raise ValueError(f"importance has shape {tuple(importance.shape)}, "
                         f"expected [B={x.shape[0]}, n_items]")
    if torch.isnan(importance).any():
        raise ValueError("importance contains NaN")
    if steps is not None and steps < 2:
        raise ValueError(f"steps={steps}: expected None or an int >= 2")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    b, n = importance.shape
    dev = x.device
    kw = dict(forward_kwargs or {})

    if steps is None:
        counts_cpu = torch.arange(n + 1)
    else:
        counts_cpu = torch.round(torch.linspace(0, 1, steps, dtype=torch.float64) * n).long()
    counts = counts_cpu.to(dev)
    fractions = counts.double() / n                                   # [S]

    if valid is not None and (valid.shape != importance.shape or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor shaped like importance {tuple(importance.shape)}, got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
    n_valid = torch.full((b,), n) if valid is None else valid.sum(1).cpu()     # the step bookkeeping is on the CPU
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if valid is None else valid.to(dev)

    # rank[b, i] = position of item i in the order of decreasing importance among the
    # valid items (stable sort: equal scores keep ascending item index; invalid last).
    score = importance.detach().double().to(dev).masked_fill(~valid, float("-inf"))
    order = torch.argsort(-score, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=dev).expand(b, n))
    n_steps = counts.numel()
    # Items that cannot matter are never removed (nor inserted: they stay as they are),
    # so once a sample's valid items are all touched its later steps are the same
    # input: each distinct (sample, valid items touched) pair is run once.
    touched_count = torch.minimum(counts_cpu[:, None], n_valid[None, :])      # [S, B]
    fresh = torch.ones(n_steps, b, dtype=torch.bool)
    fresh[1:] = touched_count[1:] != touched_count[:-1]
    pairs = fresh.reshape(-1).nonzero().squeeze(1).to(dev)                     # step-major
    fresh = fresh.to(dev)

    with torch.no_grad():
        tgt = as_target(target, lambda: model(x, **kw), b, dev)
        probs = torch.full((n_steps * b,), float("nan"), dtype=torch.float64, device=dev)
        # each chunk of fresh (step, sample) pairs is one model call
        for idx in pairs.split(batch_size):
            sample, step = idx % b, idx // b
            touched = (rank[sample] < counts[step, None]) & valid[sample]      # [m, n]
            keep = ~touched if mode == "deletion" else touched | ~valid[sample]
            logits = model(masker(x[sample], keep), **_batch_index(kw, sample, b))
            p = logits.double().softmax(dim=-1)
            probs[idx] = p.gather(1, tgt[sample, None]).squeeze(1)
    probs_sb = probs.view(n_steps, b)
    for s_ in range(1, n_steps):                       # a repeated input repeats its probability
        probs_sb[s_] = torch.where(fresh[s_], probs_sb[s_], probs_sb[s_ - 1])
    probs_bs = probs_sb.T.contiguous()
    auc = torch.trapezoid(probs_bs, fractions, dim=1)
    return Curve(fractions=fractions, probs=probs_bs, auc=auc, target=tgt, mode=mode)


def deletion_curve(model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor,
                   importance: torch.Tensor, masker: Masker, *,
                   target: int | torch.Tensor | None = None, steps: int | None = None,
                   batch_size: int = 256,
                   forward_kwargs: Mapping[str, Any] | None = None,
                   valid: torch.Tensor | None = None) -> Curve:
    """Probability of ``target`` as items are removed, most important first.

    Args:
        model: ``model(x, **forward_kwargs) -> logits [B, C]``; put it in eval mode
            first (this function does not change its mode).
        x: the inputs ``[B, ...]``.
        importance: ``[B, n_items]`` scores; higher = more important. Ties are
            broken by ascending item index.
        masker: ``masker(x, keep [B, n_items]) -> x'`` (see :func:`sequence_masker`).
        target: class to track, an int or ``[B]``; default the model's prediction
            on the unperturbed ``x``.
        steps: ``None`` evaluates every fraction ``0, 1/n, …, 1``; an int evaluates
            that many evenly spaced fractions (rounded to whole items).
        batch_size: perturbed inputs per model call.
        forward_kwargs: extra keyword arguments for the model; tensors whose first
            dim is ``B`` (e.g. ``padding_mask``) follow their sample.
        valid: ``[B, n_items]`` bool, the items that can matter at all (e.g. the
            tokens a causal model has seen at the explained position). Only they
            are ranked, removed or inserted; the others stay as they are in ``x``, and
            a step that touches no further valid item reuses the previous step's
            probability instead of running the model again. Default: every item.

    Returns:
        :class:`Curve` with ``fractions [S]``, ``probs [B, S]``, ``auc [B]`` (lower
        = more faithful), ``target [B]``.
    """
    return _curve("deletion", model, x, importance, masker, target, steps, batch_size,
                  forward_kwargs, valid)


def insertion_curve(model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor,
                    importance: torch.Tensor, masker: Masker, *,
                    target: int | torch.Tensor | None = None, steps: int | None = None,
                    batch_size: int = 256,
                    forward_kwargs: Mapping[str, Any] | None = None,
                    valid: torch.Tensor | None = None) -> Curve:
    """Probability of ``target`` as items are inserted into an all-removed input,
    most important first (higher AUC = more faithful). Arguments as in
    :func:`deletion_curve`; the default target is still the prediction on ``x``."""
    return _curve("insertion", model, x, importance, masker, target, steps, batch_size,
                  forward_kwargs, valid)


def random_importance(shape: tuple[int, int] | torch.Size, seed: int, *,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Random baseline: i.i.d. uniform scores ``[B, n_items]``, reproducible from ``seed``
    (drawn by a CPU generator, so the same on any ``device``; default: where drawn)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tuple(shape), generator=gen, dtype=torch.float64)
    return scores if device is None else scores.to(device)
