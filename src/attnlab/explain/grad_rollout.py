"""Gradient-weighted rollout (Chefer, Gur & Wolf, 2021, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .rollout import check_layers, check_values, compute_dtype

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
    check_values(layers, "attentions")
    check_values(grads, "gradients", probabilities=False)
    dtype = compute_dtype(layers + grads)

    relevance: Tensor | None = None
    for attn, grad in zip(layers, grads):
        cam = (grad.to(dtype) * attn.to(dtype)).clamp_min_(0)
        a_bar = cam.mean(dim=1) if cam.ndim == 4 else cam  # [B, N, N]
        if relevance is None:  # R = I + Ā·I
            relevance = a_bar
            relevance.diagonal(dim1=-2, dim2=-1).add_(1)
        else:
            relevance = torch.baddbmm(relevance, a_bar, relevance)
    assert relevance is not None
    return relevance
