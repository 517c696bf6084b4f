"""Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

Also home of the per-layer preparation shared by the other explanation methods of
this package (input validation, head fusion, residual mixing, row renormalisation),
so that every method treats one layer's attention in exactly the same way.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

__all__ = ["rollout", "fuse_heads", "check_values", "HeadFusion", "HEAD_FUSIONS"]


# --------------------------------------------------------------------------- validation


def check_head_fusion(head_fusion: object) -> None:
    """Raise ``ValueError`` unless ``head_fusion`` is one of :data:`HEAD_FUSIONS`."""
    if not isinstance(head_fusion, str) or head_fusion not in HEAD_FUSIONS:
        raise ValueError(
            f"head_fusion must be one of {', '.join(map(repr, HEAD_FUSIONS))}; "
            f"got {head_fusion!r}"
        )


def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """Common floating dtype of ``tensors``, at least float32 (float16 storage is
    computed in float32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"attention tensors must be floating point; got dtype {dtype}")
    return dtype


def check_layers(attentions: object, name: str = "attentions") -> tuple[list[Tensor], int, int]:
    """Validate a per-layer list of attention tensors.

    Each entry must be ``[B, H, N, N]`` (heads not fused yet) or ``[B, N, N]`` (already
    fused), with the same ``B`` and ``N`` in every layer (``H`` may differ per layer).
    Returns ``(layers, B, N)``.
    """
    if isinstance(attentions, Tensor) or not isinstance(attentions, Sequence):
        raise ValueError(
            f"{name} must be a list of per-layer tensors [B, H, N, N] or [B, N, N]; "
            f"got {type(attentions).__name__}"
        )
    layers = list(attentions)
    if not layers:
        raise ValueError(f"{name} is empty: need at least one layer")
    batch = n_tok = -1
    for idx, attn in enumerate(layers):
        if not isinstance(attn, Tensor):
            raise ValueError(f"{name}[{idx}] must be a torch.Tensor; got {type(attn).__name__}")
        if attn.ndim not in (3, 4) or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(
                f"{name}[{idx}] must have shape [B, H, N, N] or [B, N, N]; "
                f"got {tuple(attn.shape)}"
            )
        if idx == 0:
            batch, n_tok = attn.shape[0], attn.shape[-1]
        elif attn.shape[0] != batch or attn.shape[-1] != n_tok:
            raise ValueError(
                f"{name}[{idx}] has shape {tuple(attn.shape)} but {name}[0] has "
                f"B={batch}, N={n_tok}: every layer needs the same batch and token count"
            )
    if n_tok == 0:
        raise ValueError(f"{name} have N=0 tokens")
    for idx, attn in enumerate(layers):
        if not attn.is_floating_point():
            raise ValueError(f"{name}[{idx}] must be floating point; got dtype {attn.dtype}")
    return layers, batch, n_tok


def check_flag(value: object, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool (a string like ``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")


def check_values(layers: Sequence[Tensor], name: str = "attentions", *, probabilities: bool = True,
                 real: Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the first tensor of ``layers`` that holds NaN or Inf
    or, with ``probabilities``, a negative entry (attention weights are softmax outputs).

    With ``real`` ``[B, N]`` (False = padded) only the entries between real tokens are
    checked (the others are zeroed, never read): each tensor is ``[B, ..., N, N]``.
    """
    for idx, attn in enumerate(layers):
        if attn.numel() == 0:
            continue
        if real is not None:
            pair = real[:, :, None] & real[:, None, :]                     # [B, N, N]
            attn = attn.masked_fill(~pair.view(pair.shape[0], *[1] * (attn.ndim - 3), *pair.shape[1:]), 0)
        finite = torch.isfinite(attn)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"{name}[{idx}] holds {bad} NaN or Inf value{'s' if bad > 1 else ''} "
                             f"(shape {tuple(attn.shape)}); expected finite values")
        if probabilities:
            low = float(attn.min())
            if low < 0:
                raise ValueError(f"{name}[{idx}] has negative entries (min {low:.4g}); expected "
                                 "attention probabilities >= 0 (softmax outputs)")


def real_tokens(mask: object, padding_mask: object, batch: int, n_tok: int) -> Tensor | None:
    """The real tokens ``[B, N]`` (bool) from the project's ``mask`` (True = real token)
    or torch's ``padding_mask`` (True = padded; kept as an alias); None when neither."""
    if mask is not None and padding_mask is not None:
        raise ValueError("give mask (True = real token) or padding_mask (True = padded), not both")
    if mask is not None:
        return check_padding_mask(mask, batch, n_tok, name="mask", meaning="True = real token")
    if padding_mask is not None:
        return ~check_padding_mask(padding_mask, batch, n_tok)
    return None


def check_padding_mask(padding_mask: object, batch: int, n_tok: int, *, name: str = "padding_mask",
                       meaning: str = "True = padded") -> Tensor:
    """Validate a bool mask ``[B, N]`` called ``name`` (0/1 integers are accepted); return it as bool."""
    if not isinstance(padding_mask, Tensor):
        raise ValueError(
            f"{name} must be a bool tensor [B, N]; got {type(padding_mask).__name__}"
        )
    if tuple(padding_mask.shape) != (batch, n_tok):
        raise ValueError(
            f"{name} must have shape [B, N] = {(batch, n_tok)}; "
            f"got {tuple(padding_mask.shape)}"
        )
    if padding_mask.dtype != torch.bool:
        if padding_mask.is_floating_point() or padding_mask.is_complex():
            raise ValueError(f"{name} must be bool ({meaning}); got {padding_mask.dtype}")
        padding_mask = padding_mask != 0
    return padding_mask


# --------------------------------------------------------------------------- one layer


def fuse_heads(attn: Tensor, head_fusion: str = "mean", dim: int = -3) -> Tensor:
    """The one head fusion of the project: ``mean`` / ``max`` / ``min`` over the heads
    dimension ``dim`` (``[B, H, N, N]`` -> ``[B, N, N]`` by default)."""
    check_head_fusion(head_fusion)
    if head_fusion == "mean":
        return attn.mean(dim)
    return attn.amax(dim) if head_fusion == "max" else attn.amin(dim)


def _fuse_scaled(attn: Tensor, head_fusion: str, dtype: torch.dtype) -> tuple[Tensor, int]:
    """:func:`fuse_heads` over ``[..., H, N, N]`` as rollout and flow use it: returns
    ``(fused, unit)``, a **fresh** tensor the caller may modify in place and the scale it
    is expressed in. For ``"mean"`` the heads are *summed* (``unit = H``): every later
    step (discard by rank, residual ``+ unit·I``, row renormalisation) is invariant to
    that common factor, and a sum saves one pass over the data.
    """
    if head_fusion == "mean":
        return attn.sum(dim=-3, dtype=dtype), attn.shape[-3]
    return fuse_heads(attn, head_fusion).to(dtype, copy=True), 1


def fused_layer(
    attn: Tensor, head_fusion: str, dtype: torch.dtype, fused_ndim: int = 3
) -> tuple[Tensor, int]:
    """``[B, H, N, N]`` or already fused ``[B, N, N]`` (``attn.ndim == fused_ndim``) →
    fresh ``([B, N, N], unit)`` (see :func:`_fuse_scaled`)."""
    if attn.ndim == fused_ndim:
        return attn.to(dtype, copy=True), 1
    return _fuse_scaled(attn, head_fusion, dtype)


def add_identity_(a: Tensor, unit: float, real: Tensor | None = None) -> Tensor:
    """In place on ``a`` ``[B, N, N]``: add ``unit`` to the diagonal (only on real tokens
    when ``real`` ``[B, N]`` is given). With ``unit`` the scale of ``a`` this is the
    residual ``0.5·A + 0.5·I`` up to a factor 0.5 that row renormalisation cancels."""
    diag = a.diagonal(dim1=-2, dim2=-1)
    if real is None:
        diag.add_(unit)
    else:
        diag.add_(real.to(a.dtype) * unit)
    return a


def renorm_rows_(a: Tensor) -> Tensor:
    """In place: divide every row (last dim) by its sum; all-zero rows stay zero."""
    row_sum = a.sum(dim=-1, keepdim=True)
    return a.div_(row_sum.clamp_min_(torch.finfo(a.dtype).tiny))


def discard_(a: Tensor, ratio: float, real: Tensor | None = None) -> Tensor:
    """In place on ``a`` ``[B, N, N]``: zero the ``floor(ratio · M)`` smallest entries of
    each sample, where the candidates are the ``M = m·(m-1)`` off-diagonal entries
    between real tokens (``m`` real tokens: ``N`` without ``real``). Ties go to the
    entry that comes first in row-major order. The diagonal is never zeroed.
    """
    batch, n_tok, _ = a.shape
    candidate = ~torch.eye(n_tok, dtype=torch.bool, device=a.device).expand(batch, n_tok, n_tok)
    if real is None:
        n_drop = torch.full((batch,), math.floor(ratio * n_tok * (n_tok - 1)), device=a.device)
    else:
        candidate = candidate & real[:, :, None] & real[:, None, :]
        m = real.sum(dim=1).to(torch.float64)
        n_drop = torch.floor(ratio * m * (m - 1))
    key = a.masked_fill(~candidate, math.inf).flatten(1)
    order = key.argsort(dim=1, stable=True)
    rank_dropped = torch.arange(key.shape[1], device=a.device)[None, :] < n_drop[:, None]
    drop = torch.zeros_like(rank_dropped).scatter_(1, order, rank_dropped)
    a.view(batch, -1).masked_fill_(drop, 0)
    return a


def unnormalised_layer(
    attn: Tensor,
    head_fusion: str,
    residual: bool,
    dtype: torch.dtype,
    discard_ratio: float = 0.0,
    real: Tensor | None = None,
    fused_ndim: int = 3,
) -> Tensor:
    """Steps 1–4 of :func:`rollout` for one layer, before the row renormalisation:
    ``[B, H, N, N]``/``[B, N, N]`` → fresh ``[B, N, N]``, proportional per row to the
    renormalised layer (the head *sum* stands for the mean, see :func:`_fuse_scaled`)."""
    a, unit = fused_layer(attn, head_fusion, dtype, fused_ndim)
    if real is not None:
        a.masked_fill_(~(real[:, :, None] & real[:, None, :]), 0.0)   # NaN there too (never read)
    if discard_ratio > 0.0:
        discard_(a, discard_ratio, real)
    if residual:
        add_identity_(a, unit, real)
    return a


def prepared_layer(
    attn: Tensor,
    head_fusion: str,
    residual: bool,
    dtype: torch.dtype,
    discard_ratio: float = 0.0,
    real: Tensor | None = None,
    fused_ndim: int = 3,
) -> Tensor:
    """One layer as rollout and flow use it: ``[B, H, N, N]``/``[B, N, N]`` → ``[B, N, N]``.

    Fuse heads; with ``real`` ``[B, N]`` (False = padded) zero padded rows and columns;
    zero the smallest ``discard_ratio`` fraction of entries (see :func:`discard_`);
    if ``residual`` mix ``0.5·A + 0.5·I`` (identity on real tokens only); renormalise
    rows to sum 1 (all-zero rows stay zero).
    """
    return renorm_rows_(
        unnormalised_layer(attn, head_fusion, residual, dtype, discard_ratio, real, fused_ndim)
    )


# --------------------------------------------------------------------------- rollout


@torch.no_grad()
def rollout(
    attentions: Sequence[Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
    discard_ratio: float = 0.0,
    mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention rollout of Abnar & Zuidema (2020), batched.

    For every layer ``l = 1..L`` (``attentions[0]`` is the first layer):

    1. fuse heads: ``A = mean_h`` / ``max_h`` / ``min_h`` of ``[B, H, N, N]``
       (a ``[B, N, N]`` input is taken as already fused);
    2. with a mask: zero the rows and columns of padded tokens;
    3. ``discard_ratio > 0``: per sample, zero the ``floor(discard_ratio · M)``
       smallest of the ``M = m(m-1)`` off-diagonal entries between the ``m`` real
       tokens (ties: first in row-major order). The diagonal is never zeroed;
    4. ``residual``: ``A = 0.5·A + 0.5·I`` (identity on real tokens only);
    5. renormalise rows to sum 1 (a row that is all zero stays zero).

    The result is ``Â_L ⋯ Â_2 Â_1``: row ``i`` is output token ``i`` (after the last
    layer), column ``j`` is input token ``j`` (before the first layer), and rows of real
    tokens sum to 1. Padded tokens neither send nor receive relevance: their rows and
    columns of the result are zero.

    Args:
        attentions: ``L ≥ 1`` tensors ``[B, H, N, N]`` or ``[B, N, N]``, row = query.
            Heads may differ per layer; ``B`` and ``N`` may not.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: model the skip connection as ``0.5·A + 0.5·I``.
        discard_ratio: fraction in ``[0, 1)`` of the smallest entries to zero per layer.
        mask: optional ``[B, N]`` bool, True = real token (the project's convention,
            as in ``VocabAttention.update``).
        padding_mask: the same as torch's ``key_padding_mask`` (True = padded), instead of ``mask``.

    Returns:
        ``[B, N, N]`` in the inputs' floating dtype (at least float32), on their device.
    """
    layers, batch, n_tok = check_layers(attentions)
    check_head_fusion(head_fusion)
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not (
        0.0 <= discard_ratio < 1.0
    ):
        raise ValueError(f"discard_ratio must be a number in [0, 1); got {discard_ratio!r}")
    check_flag(residual, "residual")
    real = real_tokens(mask, padding_mask, batch, n_tok)
    if real is not None:
        real = real.to(layers[0].device)
    check_values(layers, real=real)
    dtype = compute_dtype(layers)

    ratio = float(discard_ratio)
    first = prepared_layer(layers[0], head_fusion, residual, dtype, ratio, real)
    if len(layers) == 1:
        return first
    # The running product R = Â_l ⋯ Â_1 is kept as [R | 1] ([B, N, N+1]): one bmm with
    # the unnormalised layer M_l gives [M_l R | M_l 1], i.e. the product and the row sums
    # that renormalise it (Â_l R = diag(M_l 1)⁻¹ M_l R), saving a pass per layer.
    prod = torch.empty(batch, n_tok, n_tok + 1, dtype=dtype, device=first.device)
    prod[..., :n_tok] = first
    prod[..., n_tok] = 1.0
    spare = torch.empty_like(prod)
    tiny = torch.finfo(dtype).tiny
    for attn in layers[1:]:
        m_l = unnormalised_layer(attn, head_fusion, residual, dtype, ratio, real)
        torch.bmm(m_l, prod, out=spare)
        spare.div_(spare[..., n_tok:].clamp_min(tiny))  # all-zero rows stay zero
        spare[..., n_tok] = 1.0  # keep the ones column exact, also after all-zero rows
        prod, spare = spare, prod
    return prod[..., :n_tok].contiguous()
