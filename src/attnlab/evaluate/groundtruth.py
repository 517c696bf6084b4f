"""Scores of an importance map against planted evidence (ground truth).

On synthetic data whose label is caused by known items, an explanation should rank
those items first: :func:`evidence_auroc` measures the whole ranking, and
:func:`pointing_game` (Zhang et al., 2016, "Top-down neural attention by excitation
backprop") only the top item.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class AurocResult(NamedTuple):
    """``per_sample [B]`` (float64; NaN where a sample has only one class) and
    ``mean`` (over the samples where it is defined; NaN if none is)."""

    per_sample: torch.Tensor
    mean: float


def _check(importance: torch.Tensor, evidence: torch.Tensor, valid: torch.Tensor | None,
           who: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if importance.dim() != 2:
        raise ValueError(f"{who}: importance has shape {tuple(importance.shape)}, expected [B, n]")
    if evidence.shape != importance.shape:
        raise ValueError(f"{who}: evidence has shape {tuple(evidence.shape)}, "
                         f"expected {tuple(importance.shape)} like importance")
    if valid is None:
        valid = torch.ones_like(evidence, dtype=torch.bool)
    elif valid.shape != importance.shape:
        raise ValueError(f"{who}: valid has shape {tuple(valid.shape)}, "
                         f"expected {tuple(importance.shape)} like importance")
    score = importance.detach().double()
    valid = valid.to(score.device).bool()
    if not torch.isfinite(score[valid]).all():
        raise ValueError(f"{who}: importance has NaN or infinite values on valid items")
    return score, evidence.to(score.device).bool() & valid, valid


def evidence_auroc(importance: torch.Tensor, evidence: torch.Tensor, *,
                   valid: torch.Tensor | None = None) -> AurocResult:
    """Per-sample area under the ROC curve of ``importance`` as a detector of evidence.

    The probability that a random evidence item scores above a random non-evidence
    item, ties counting one half (the Mann–Whitney U statistic with mid-ranks; equal
    to ``sklearn.metrics.roc_auc_score(evidence[b], importance[b])``). 0.5 is chance.

    Args:
        importance: ``[B, n]`` scores, higher = more important.
        evidence: ``[B, n]`` bool, True on the planted evidence items.
        valid: optional ``[B, n]`` bool, False on items to ignore (padding).
    """
    score, pos, valid = _check(importance, evidence, valid, "evidence_auroc")
    # Mid-ranks among a sample's valid items: invalid items are pushed to +inf so
    # that they are never counted below or equal to a (finite) valid score.
    score = score.masked_fill(~valid, math.inf)
    ordered = score.sort(dim=1).values.contiguous()
    below = torch.searchsorted(ordered, score.contiguous(), right=False).double()
    below_or_equal = torch.searchsorted(ordered, score.contiguous(), right=True).double()
    midrank = (below + below_or_equal + 1.0) / 2.0                    # 1-based
    n_pos = pos.sum(dim=1).double()
    n_neg = (valid & ~pos).sum(dim=1).double()
    u = (midrank * pos).sum(dim=1) - n_pos * (n_pos + 1.0) / 2.0
    auc = u / (n_pos * n_neg)
    auc = torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, math.nan))
    defined = ~torch.isnan(auc)
    mean = auc[defined].mean().item() if defined.any() else math.nan
    return AurocResult(per_sample=auc, mean=mean)


def pointing_hits(importance: torch.Tensor, evidence: torch.Tensor, *,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample hit of the top-scored item on the evidence, ``[B]`` float64: 1 or 0,
    the share of evidence among tied top items, NaN for samples without (valid)
    evidence. :func:`pointing_game` is its mean; args as in :func:`evidence_auroc`."""
    score, pos, valid = _check(importance, evidence, valid, "pointing_game")
    score = score.masked_fill(~valid, -math.inf)
    top = (score == score.max(dim=1, keepdim=True).values) & valid   # [B, n]
    hit = (top & pos).sum(dim=1).double() / top.sum(dim=1).clamp_min(1).double()
    return torch.where(pos.any(dim=1), hit, torch.full_like(hit, math.nan))


def pointing_game(importance: torch.Tensor, evidence: torch.Tensor, *,
                  valid: torch.Tensor | None = None) -> float:
    """Hit rate of the top-scored item on the evidence.

    Only samples with at least one (valid) evidence item count; NaN if there are
    none. Ties: when several items share the top score, the sample scores the share
    of them that are evidence (the expected hit of a random tie-break), so a
    constant map earns chance, not a lucky or unlucky hit from item order.

    Args as in :func:`evidence_auroc`.
    """
    hit = pointing_hits(importance, evidence, valid=valid)
    counted = ~torch.isnan(hit)
    return hit[counted].mean().item() if counted.any() else math.nan
