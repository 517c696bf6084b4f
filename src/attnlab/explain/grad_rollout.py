"""Gradient-weighted rollout (Chefer, Gur & Wolf, 2021, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .rollout import CHUNK_BYTES, check_layers, check_values, compute_dtype, values_look_valid

__all__ = ["grad_rollout"]


@torch.no_grad()
def grad_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Relevance of Chefer et al. (2021) for self-attention, batched.

    ``R = I``; then for every layer ``l = 1..L`` in order (``attentions[0]`` first)::

        Ā_l = mean_h( max(∇A_l ⊙ A_l, 0) )      # [B, N, N]
        R   = R + Ā_l · R

    Row ``i`` of ``R`` is the relevance of input token ``j`` (column) for output token
    ``i``; read the class token with ``readout(R, "cls")``. No renormalisation is done
    (the diagonal keeps the identity's 1 plus what the layers add).

    Args:
        attentions: ``L ≥ 1`` tensors ``[B, H, N, N]`` (or ``[B, N, N]``, one head).
        gradients: ``d loss / d attentions[l]``, same shapes, paired by position
            (``AttentionRecorder(model, keep_grad=True).gradients``).

    Returns:
        ``[B, N, N]`` in the inputs' floating dtype (at least float32), on their device.
    """
    layers, batch, n_tok = check_layers(attentions, "attentions")
    grads, _, _ = check_layers(gradients, "gradients")
    if len(grads) != len(layers):
        raise ValueError(
            f"gradients has {len(grads)} layers but attentions has {len(layers)}: "
            "they must be paired one to one"
        )
    for idx, (attn, grad) in enumerate(zip(layers, grads)):
        if attn.shape != grad.shape:
            raise ValueError(
                f"gradients[{idx}] has shape {tuple(grad.shape)} but attentions[{idx}] "
                f"has {tuple(attn.shape)}: they must match"
            )
    dtype = compute_dtype(layers + grads)

    # The values are checked while each layer's Ā is computed (_weighted_heads: one read
    # of each input); only if that sees NaN, Inf or a negative attention does
    # check_values look again, in detail, and raise.
    suspicious = False
    relevance: Tensor | None = None
    for attn, grad in zip(layers, grads):
        a_sum, heads, looks_valid = _weighted_heads(attn, grad, dtype)   # H·Ā, [B, N, N]
        suspicious |= not looks_valid
        if relevance is None:  # R = I + Ā·I
            relevance = a_sum.div_(heads)
            relevance.diagonal(dim1=-2, dim2=-1).add_(1)
        else:
            relevance = torch.baddbmm(relevance, a_sum, relevance, alpha=1.0 / heads)
    if suspicious:
        check_values(layers, "attentions")
        check_values(grads, "gradients", probabilities=False)
    assert relevance is not None
    return relevance


def _weighted_heads(attn: Tensor, grad: Tensor, dtype: torch.dtype) -> tuple[Tensor, int, bool]:
    """``Σ_h max(∇A ⊙ A, 0)`` ``[B, N, N]`` of one layer (``[B, H, N, N]``, or ``[B, N, N]``
    taken as one head), the number of heads ``H``, and whether the inputs look valid:
    ``A`` finite and >= 0, ``∇A`` finite.

    On the CPU this runs a few MiB of samples at a time: the product is formed in a
    small buffer that stays in the cache, where it is checked, clamped and summed over
    heads, so each input is read from memory once and nothing of the input's size is
    written. ``∇A ⊙ A`` shows every NaN/Inf of ``∇A`` when ``A`` is finite (Inf·0 is NaN),
    and the minimum of ``A`` shows its NaN, -Inf and negative entries (+Inf of ``A``
    shows in the product).
    """
    if attn.ndim == 3:
        attn, grad = attn[:, None], grad[:, None]
    batch, heads, n_q, n_k = attn.shape
    if attn.device.type != "cpu" or not (attn.is_contiguous() and grad.is_contiguous()) or attn.numel() == 0:
        cam = grad.to(dtype) * attn.to(dtype)
        looks_valid = values_look_valid(attn) and values_look_valid(cam, probabilities=False)
        return cam.clamp_min_(0).sum(dim=1), heads, looks_valid
    out = torch.empty(batch, n_q, n_k, dtype=dtype, device=attn.device)
    step = max(1, CHUNK_BYTES // (heads * n_q * n_k * torch.finfo(dtype).bits // 8))
    buf = torch.empty(min(step, batch), heads, n_q, n_k, dtype=dtype, device=attn.device)
    lows, ends = [], []
    for start in range(0, batch, step):
        a_c, g_c = attn[start:start + step], grad[start:start + step]
        cam = buf[: a_c.shape[0]]
        torch.mul(g_c, a_c, out=cam)
        lows.append(a_c.amin())
        ends.extend(torch.aminmax(cam))
        torch.sum(cam.clamp_min_(0), dim=1, out=out[start:start + step])
    low_a = float(torch.stack(lows).amin())
    extremes = torch.stack(ends).to(torch.float64)
    looks_valid = math.isfinite(low_a) and low_a >= 0 and bool(torch.isfinite(extremes).all())
    return out, heads, looks_valid
