"""Reading one relevance row out of a joint token×token matrix."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .rollout import real_tokens, values_look_valid

__all__ = ["readout"]


def readout(
    joint: Tensor,
    how: Literal["cls", "mean"] | int | Tensor = "cls",
    *,
    mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """One row of a joint relevance matrix ``[B, N, N]`` (row = output token, column =
    input token), as returned by :func:`rollout`, :func:`grad_rollout` or
    :func:`attention_flow`.

    Args:
        joint: ``[B, N, N]``.
        how: ``"cls"`` — row 0 (class-token models); ``"mean"`` — the mean over query
            rows (mean-pooled models); an ``int`` — that token's row (negative counts
            from the end, as in Python indexing); an int64 tensor ``[B]`` — one row per
            sample (e.g. the position whose next-token prediction is explained).
        mask: optional ``[B, N]`` bool, True = real token; only for ``"mean"``, which
            then averages over real query rows only (a sample with no real token gives
            a zero row).
        padding_mask: the same with torch's polarity (True = padded), instead of ``mask``.

    Returns:
        ``[B, N]``: relevance of every input token for the chosen output.
    """
    if not isinstance(joint, Tensor) or joint.ndim != 3 or joint.shape[1] != joint.shape[2]:
        shape = tuple(joint.shape) if isinstance(joint, Tensor) else type(joint).__name__
        raise ValueError(f"joint must be a tensor [B, N, N]; got {shape}")
    if not joint.is_floating_point():
        raise ValueError(f"joint must be floating point; got dtype {joint.dtype}")
    if not values_look_valid(joint, probabilities=False):     # one pass; details only on failure
        bad = int((~torch.isfinite(joint)).sum())
        raise ValueError(f"joint holds {bad} NaN or Inf value{'s' if bad > 1 else ''} (shape {tuple(joint.shape)}); "
                         "expected finite values")
    batch, n_tok, _ = joint.shape
    if (mask is not None or padding_mask is not None) and how != "mean":
        raise ValueError(f'mask / padding_mask are only used with how="mean"; got how={how!r}')
    if how == "cls":
        return joint[:, 0]
    if how == "mean":
        real = real_tokens(mask, padding_mask, batch, n_tok)
        if real is None:
            return joint.mean(dim=1)
        real = real.to(joint.device)
        weight = real.to(joint.dtype)
        count = weight.sum(dim=1, keepdim=True).clamp_min(1)
        return (weight[:, :, None] * joint).sum(dim=1) / count
    if isinstance(how, Tensor):
        if how.shape != (batch,) or how.dtype != torch.int64:
            raise ValueError(f"how as a tensor must be int64 [B={batch}]; got {how.dtype} {tuple(how.shape)}")
        if ((how < 0) | (how >= n_tok)).any():
            raise ValueError(f"how has rows outside 0..{n_tok - 1}")
        return joint[torch.arange(batch, device=joint.device), how.to(joint.device)]
    if isinstance(how, int) and not isinstance(how, bool):
        if not -n_tok <= how < n_tok:
            raise ValueError(f"how={how} is out of range for N={n_tok} tokens")
        return joint[:, how]
    raise ValueError(f'how must be "cls", "mean" or an int token index; got {how!r}')
