"""Rollout through divided space-time attention (TimeSformer: Bertasius, Wang &
Torresani, 2021, "Is Space-Time Attention All You Need for Video Understanding?"),
with the rollout rule of Abnar & Zuidema (2020)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .rollout import (
    HeadFusion,
    check_flag,
    check_head_fusion,
    add_identity_,
    check_values,
    compute_dtype,
    CHUNK_BYTES,
    fused_layer_checked,
    renorm_rows_,
    values_look_valid,
)

__all__ = ["spacetime_rollout", "spacetime_grad_rollout", "split_spacetime"]


def _check_blocks(
    space: object, time: object
) -> tuple[list[Tensor], list[Tensor], int, int, int]:
    """Validate the per-block lists; return ``(space, time, B, F, P)``."""
    for name, seq in (("space", space), ("time", time)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise ValueError(
                f"{name} must be a list of per-block tensors; got {type(seq).__name__}"
            )
    space, time = list(space), list(time)  # type: ignore[arg-type]
    if not space:
        raise ValueError("space is empty: need at least one block")
    if len(space) != len(time):
        raise ValueError(
            f"space has {len(space)} blocks but time has {len(time)}: one of each per block"
        )
    batch = frames = patches = -1
    for idx, (s, t) in enumerate(zip(space, time)):
        if (
            not isinstance(s, Tensor)
            or s.ndim not in (4, 5)
            or s.shape[-1] != s.shape[-2]
            or s.shape[-1] < 2
        ):
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"space[{idx}] must be [B, F, H, 1+P, 1+P] (or fused [B, F, 1+P, 1+P]) "
                f"with P ≥ 1; got {shape}"
            )
        if idx == 0:
            batch, frames, patches = s.shape[0], s.shape[1], s.shape[-1] - 1
        elif (s.shape[0], s.shape[1], s.shape[-1]) != (batch, frames, patches + 1):
            raise ValueError(
                f"space[{idx}] has shape {tuple(s.shape)} but space[0] has "
                f"B={batch}, F={frames}, P={patches}"
            )
        expected = (batch, patches, frames, frames)
        if (
            not isinstance(t, Tensor)
            or t.ndim not in (4, 5)
            or (t.shape[0], t.shape[1], t.shape[-2], t.shape[-1]) != expected
        ):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"time[{idx}] must be [B, P, H, F, F] (or fused [B, P, F, F]) with "
                f"B={batch}, P={patches}, F={frames} as in space; got {shape}"
            )
    for name, seq in (("space", space), ("time", time)):
        for idx, t in enumerate(seq):
            if not t.is_floating_point():
                raise ValueError(f"{name}[{idx}] must be floating point; got dtype {t.dtype}")
    return space, time, batch, frames, patches


@torch.no_grad()
def spacetime_rollout(
    space: Sequence[Tensor],
    time: Sequence[Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
) -> Tensor:
    """Class-token rollout through divided space-time attention, batched.

    Tokens: the class token ``cls`` and patch ``(f, p)`` of frame ``f`` (``F`` frames,
    ``P`` patches per frame). Block ``l`` (``space[0]``/``time[0]`` is the first) applies
    time attention, then space attention:

    * time: ``time[l]`` ``[B, P, H, F, F]`` — patch ``p`` attends over frames;
    * space: ``space[l]`` ``[B, F, H, 1+P, 1+P]`` — frame ``f`` attends over its own
      patches and over its copy of the class token (index 0). The class token skips
      time attention; after space attention it is the mean of its ``F`` per-frame copies.

    **Definition.** Fuse heads (``mean``/``max``/``min``) into ``τ_l[p]`` (``F×F``) and
    ``σ_l[f]`` (``(1+P)×(1+P)``). Over the ``1+F·P`` joint tokens define

    * the joint time matrix ``T_l``: row ``cls`` is ``e_cls``; row ``(f, p)`` has
      ``τ_l[p][f, f']`` in column ``(f', p)`` and zero elsewhere;
    * the joint space matrix ``S_l``: row ``(f, p)`` has ``σ_l[f][1+p, 0]`` in column
      ``cls`` and ``σ_l[f][1+p, 1+p']`` in column ``(f, p')``; row ``cls`` is the mean
      over ``f`` of frame ``f``'s row 0 mapped the same way (column ``cls`` gets
      ``mean_f σ_l[f][0, 0]``, column ``(f, p')`` gets ``σ_l[f][0, 1+p'] / F``);
    * ``T̃_l``, ``S̃_l``: if ``residual``, ``0.5·M + 0.5·I`` on the joint matrix; then
      every row renormalised to sum 1 (all-zero rows stay zero).

    With ``B_l = S̃_l · T̃_l`` the joint rollout is ``R = B_L ⋯ B_1`` and the result is
    ``R[cls, (f, p)]`` reshaped to ``[F, P]``: the relevance of each patch of each input
    frame for the class token after the last block. ``R[cls, cls]`` (relevance of the
    initial class embedding) is not returned, so an output sums to ``1 − R[cls, cls]``.
    Patch rows of ``S̃``/``T̃`` equal per-frame / per-patch residual-renormalised
    attention; the class row of ``S̃`` equals the mean of the per-frame renormalised
    rows whenever the fused rows sum to 1 (e.g. ``mean`` fusion of softmax outputs).

    Nothing of size ``(1+F·P)²`` is built: only the class row ``e_clsᵀ B_L ⋯ B_1`` is
    propagated, from the last block down, with batched matrix–vector products.

    Args:
        space: ``L ≥ 1`` tensors ``[B, F, H, 1+P, 1+P]`` (or fused ``[B, F, 1+P, 1+P]``).
        time: ``L`` tensors ``[B, P, H, F, F]`` (or fused ``[B, P, F, F]``).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: model skip connections as ``0.5·M + 0.5·I``.

    Returns:
        ``[B, F, P]`` in the inputs' floating dtype (at least float32), on their device.
    """
    space_l, time_l, batch, frames, patches = _check_blocks(space, time)
    check_head_fusion(head_fusion)
    check_flag(residual, "residual")
    dtype = compute_dtype(space_l + time_l)
    device = space_l[0].device
    tiny = torch.finfo(dtype).tiny
    # The values are checked while the heads are fused (fused_layer_checked: one read of
    # each input); check_values looks again, in detail, only if that sees a problem.
    suspicious = False

    # Row vector over joint tokens, split into its class entry and its patch entries.
    v_cls = torch.ones(batch, dtype=dtype, device=device)  # [B]
    v_patch = torch.zeros(batch, frames, patches, dtype=dtype, device=device)  # [B, F, P]
    for s_attn, t_attn in zip(reversed(space_l), reversed(time_l)):
        # ---- v ← v · S̃_l
        # fused heads and their rows' sums in one sweep; +Inf/NaN of sigma are left to the
        # final check (they make v NaN: 0·Inf and Inf/Inf are NaN). A few MiB of input at a
        # time, each step's product taken right after its heads are fused (at TimeSformer
        # size: 15 % less time in the product than after the whole block).
        sums = torch.empty(batch, frames, patches + 1, dtype=dtype, device=device)  # [B, F, 1+P]
        cls_rows = torch.empty_like(sums)  # [B, F, 1+P], frame f's class-copy row
        moved = torch.empty_like(sums)     # [B, F, 1+P]
        w = torch.empty_like(v_patch)      # [B, F, P]
        step = max(1, CHUNK_BYTES // max(1, s_attn[:1].numel() * s_attn.element_size()))
        for start in range(0, max(batch, 1), step):          # once for an empty batch too: it gives unit
            part = slice(start, start + step)
            sigma, unit, ok_s = fused_layer_checked(s_attn[part], head_fusion, dtype, fused_ndim=4,
                                                    check_fused=False, row_sums=sums[part])  # [b, F, 1+P, 1+P]
            suspicious |= not ok_s
            res = float(unit) if residual else 0.0
            cls_rows[part] = sigma[:, :, 0, :]
            # Patch rows [b, F, P, 1+P] (column 0 = cls, 1+p' = patch p'), left unnormalised:
            # v · diag(1/r) (M + res·I) = (v/r) · M + res · (v/r), with r the rows' sums
            # (residual included), so the matrix is read once, by the product.
            row_sum = sums[part, :, 1:] + res  # [b, F, P]
            w[part] = torch.where(row_sum > 0, v_patch[part] / row_sum.clamp_min(tiny), 0.0)  # all-zero rows stay zero
            moved[part] = torch.matmul(w[part, :, None, :], sigma[:, :, 1:, :]).squeeze(-2)
        norm = (sums[:, :, 0].mean(dim=1) + res).clamp_min(tiny)  # [B]
        s_cls_cls = (cls_rows[:, :, 0].mean(dim=1) + res) / norm  # [B]
        s_cls_patch = cls_rows[:, :, 1:] / (frames * norm[:, None, None])  # [B, F, P]
        new_cls = v_cls * s_cls_cls + moved[..., 0].sum(dim=1)
        new_patch = v_cls[:, None, None] * s_cls_patch + moved[..., 1:] + res * w  # [B, F, P]
        # ---- v ← v · T̃_l   (class entry passes through unchanged)
        tau, unit_t, ok_t = fused_layer_checked(t_attn, head_fusion, dtype, fused_ndim=4)  # [B, P, F, F]
        if residual:
            add_identity_(tau, unit_t)
        renorm_rows_(tau)
        suspicious |= not ok_t
        v_patch = torch.matmul(new_patch.transpose(1, 2)[:, :, None, :], tau).squeeze(-2)
        v_patch = v_patch.transpose(1, 2)  # [B, F, P]
        v_cls = new_cls
    # (the class entry too: +Inf in the first block's class rows only reaches v_cls)
    if suspicious or not (values_look_valid(v_patch, probabilities=False) and values_look_valid(v_cls, probabilities=False)):
        check_values(space_l, "space")
        check_values(time_l, "time")
    return v_patch.contiguous()


def spacetime_grad_rollout(
    space: Sequence[Tensor],
    time: Sequence[Tensor],
    space_grads: Sequence[Tensor],
    time_grads: Sequence[Tensor],
) -> Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021) through divided space-time attention.

    Per sub-layer the rule of :func:`~attnlab.explain.grad_rollout` is applied to the
    joint ``1+F·P`` token matrices of :func:`spacetime_rollout`: ``Ā = mean_h(max(∇A ⊙ A, 0))``
    fused per frame (space) or per patch (time), laid into the joint matrices ``Ā_T``
    (class row zero: the class token skips time attention) and ``Ā_S`` (class row the
    mean of its per-frame copies' rows), and ``R = ∏_l (I + Ā_S,l)(I + Ā_T,l)`` (last
    block on the left). Returns ``R[cls, (f, p)]`` as ``[B, F, P]``; like
    ``spacetime_rollout`` only the class row is propagated.

    Args:
        space, time: as in :func:`spacetime_rollout` (unfused ``[.., H, .., ..]``).
        space_grads, time_grads: the gradients of the same tensors.
    """
    space_l, time_l, batch, frames, patches = _check_blocks(space, time)
    space_g, time_g, *_ = _check_blocks(space_grads, time_grads)
    for name, att, grad in (("space", space_l, space_g), ("time", time_l, time_g)):
        for i, (a, g) in enumerate(zip(att, grad)):
            if a.ndim != 5 or a.shape != g.shape:
                raise ValueError(f"{name}[{i}] {tuple(a.shape)} and {name}_grads[{i}] {tuple(g.shape)}: "
                                 "expected equal unfused shapes (with a heads dimension)")
    for name, seq, probabilities in (("space", space_l, True), ("time", time_l, True),
                                     ("space_grads", space_g, False), ("time_grads", time_g, False)):
        check_values(seq, name, probabilities=probabilities)
    dtype = compute_dtype(space_l + time_l)
    weigh = lambda a, g: (a.to(dtype) * g.to(dtype)).clamp_min(0).mean(dim=-3)  # noqa: E731  mean over heads
    v_cls = torch.ones(batch, dtype=dtype, device=space_l[0].device)            # [B]
    v_patch = torch.zeros(batch, frames, patches, dtype=dtype, device=v_cls.device)  # [B, F, P]
    for s_a, s_g, t_a, t_g in zip(reversed(space_l), reversed(space_g), reversed(time_l), reversed(time_g)):
        sigma = weigh(s_a, s_g)                                    # [B, F, 1+P, 1+P]
        cls_rows, patch_rows = sigma[:, :, 0, :], sigma[:, :, 1:, :]
        # ---- v ← v · (I + Ā_S)
        new_cls = v_cls * (1 + cls_rows[:, :, 0].mean(dim=1)) + (v_patch * patch_rows[..., 0]).sum(dim=(1, 2))
        new_patch = (v_patch + v_cls[:, None, None] * cls_rows[:, :, 1:] / frames
                     + torch.matmul(v_patch[:, :, None, :], patch_rows[..., 1:]).squeeze(-2))
        # ---- v ← v · (I + Ā_T)   (class entry unchanged)
        tau = weigh(t_a, t_g)                                      # [B, P, F, F]
        moved = torch.matmul(new_patch.transpose(1, 2)[:, :, None, :], tau).squeeze(-2).transpose(1, 2)
        v_patch, v_cls = new_patch + moved, new_cls
    return v_patch.contiguous()


def split_spacetime(
    entries: Sequence[Tensor],
    *,
    frames: int,
    patches: int,
    blocks: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """A recorder's entries of one forward of a divided space-time model → the
    ``(space, time)`` lists of :func:`spacetime_rollout` / :func:`spacetime_grad_rollout`.

    Works on ``rec.attentions`` and, the same way, on ``rec.gradients``. Both divided
    space-time models record time attention, then space attention, block after block,
    batched the same way:

    * the project's :class:`~attnlab.models.spacetime.DividedSpaceTimeTransformer`
      (``blocks.{l}.attn_time.attn_probs``, ``blocks.{l}.attn_space.attn_probs``);
    * Hugging Face ``TimesformerModel`` / ``TimesformerForVideoClassification`` with
      ``attention_type="divided_space_time"`` (``….layer.{l}.temporal_attention.attention``,
      ``….layer.{l}.attention.attention``; ``P = (image_size / patch_size)²``,
      ``F = num_frames``). Its hidden states order the patches patch-major
      (``1 + p·F + f``), but its attention calls are batched exactly as below; the class
      token takes no part in time attention and, in space attention, each frame holds a
      copy of it at index 0 whose outputs are averaged over frames — the layout
      :func:`spacetime_rollout` defines. (Its ``output_attentions=True`` returns only the
      space entries; the recorder gets both.)

    Entries: ``time_l`` ``[B·P, H, F, F]`` (row ``b·P + p``: patch ``p`` of clip ``b``,
    patches row-major over the grid) and ``space_l`` ``[B·F, H, 1+P, 1+P]`` (row
    ``b·F + f``; index 0 is frame ``f``'s copy of the class token, ``1 + p`` patch ``p``).

    Args:
        entries: ``[time_0, space_0, time_1, space_1, ...]`` (one forward pass:
            call ``rec.clear()`` between batches).
        frames, patches: ``F`` and ``P`` the model was built for; every entry is checked.
        blocks: when given, the number of blocks the entries must hold.
        names: ``rec.names``, to name offending entries and to catch the entries of
            more than one forward pass (a module recorded twice).

    Returns:
        ``space``: ``L`` tensors ``[B, F, H, 1+P, 1+P]``; ``time``: ``L`` tensors ``[B, P, H, F, F]``.
    """
    if isinstance(entries, Tensor) or not isinstance(entries, Sequence):
        raise ValueError(f"entries must be a list of recorded tensors; got {type(entries).__name__}")
    for key, value in (("frames", frames), ("patches", patches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: expected a positive int")
    if names is not None:
        names = list(names)
        if len(names) != len(entries):
            raise ValueError(f"names has {len(names)} items for {len(entries)} entries; pass rec.names")
        repeated = [n for i, n in enumerate(names) if n in names[:i]]
        if repeated:
            raise ValueError(f"module {repeated[0]!r} was recorded more than once: entries of more than one "
                             "forward pass? call rec.clear() between batches")
    if len(entries) == 0 or len(entries) % 2:
        raise ValueError(f"entries: {len(entries)}, expected a non-zero even number (time then space "
                         "attention of each block)")
    if blocks is not None and len(entries) != 2 * blocks:
        raise ValueError(f"entries: {len(entries)}, expected {2 * blocks} (time and space of each of "
                         f"{blocks} blocks)")
    label = (lambda i: f"entry {i} ({names[i]!r})") if names else (lambda i: f"entry {i}")
    space, time = [], []
    batch = heads = None
    for layer in range(len(entries) // 2):
        i = 2 * layer
        t, s = entries[i], entries[i + 1]
        for j, a, (rows, side, what) in ((i, t, (patches, frames, "[B·P, H, F, F] time")),
                                         (i + 1, s, (frames, patches + 1, "[B·F, H, 1+P, 1+P] space"))):
            if not isinstance(a, Tensor) or a.ndim != 4 or a.shape[-2:] != (side, side) or a.shape[0] % rows:
                shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(f"{label(j)} has shape {shape}; expected {what} attention with "
                                 f"frames F={frames}, patches P={patches}")
        b_t, b_s = t.shape[0] // patches, s.shape[0] // frames
        if b_t != b_s or t.shape[1] != s.shape[1] or batch not in (None, b_t) or heads not in (None, t.shape[1]):
            raise ValueError(f"{label(i)} {tuple(t.shape)} and {label(i + 1)} {tuple(s.shape)} do not describe "
                             f"the same batch of clips and heads as the other blocks (F={frames}, P={patches})")
        batch, heads = b_t, t.shape[1]
        time.append(t.reshape(batch, patches, *t.shape[1:]))
        space.append(s.reshape(batch, frames, *s.shape[1:]))
    return space, time
