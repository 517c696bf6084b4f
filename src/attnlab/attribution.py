"""Per-item importance of every attention-based method for one batch.

Joins :class:`~attnlab.capture.AttentionRecorder` (one forward + one backward) and
the explanation engine: each method gives ``[B, n_items]``, rows summing to 1, for
the class the model predicts (or a given target).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from attnlab.capture import AttentionRecorder
from attnlab.explain import attention_flow, grad_rollout, readout, rollout

ATTENTION_METHODS = ("raw", "received", "rollout", "grad_rollout", "flow")


def attention_received(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, Lk]``: the attention each key receives, averaged over heads, queries and layers."""
    return torch.stack([a.float().mean(dim=(1, 2)) for a in attentions]).mean(0)


def to_items(relevance: torch.Tensor, n_items: int) -> torch.Tensor:
    """Drop a leading class-token column (``N = n_items + 1``) and renormalise rows to 1."""
    if relevance.shape[-1] == n_items + 1:
        relevance = relevance[:, 1:]
    elif relevance.shape[-1] != n_items:
        raise ValueError(f"relevance has {relevance.shape[-1]} tokens; expected {n_items} items "
                         f"(or {n_items + 1} with a class token)")
    return relevance / relevance.sum(-1, keepdim=True).clamp_min(1e-12)


def record_target(model: nn.Module, x: torch.Tensor, *, target: torch.Tensor | None = None,
                  forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                  keep_grad: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
    """One recorded forward in eval mode (and, with ``keep_grad``, the backward of the
    ``target`` logit, default the prediction): ``(attentions, gradients, target)``.

    The model's parameters are frozen meanwhile, so gradients reach the attention
    only and the model's ``.grad`` fields and mode are left as they were.
    """
    forward = forward or (lambda m, xb: m(xb))
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), AttentionRecorder(model, keep_grad=keep_grad) as rec:
            logits = forward(model, x)
            if target is None:
                target = logits.argmax(-1)
            if keep_grad:
                logits.gather(1, target[:, None]).sum().backward()
        return rec.attentions, (rec.gradients if keep_grad else None), target.detach()
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)


def _check_methods(methods: Sequence[str]) -> None:
    unknown = sorted(set(methods) - set(ATTENTION_METHODS))
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; accepted: {', '.join(ATTENTION_METHODS)}")


def attention_importance(model: nn.Module, x: torch.Tensor, *, n_items: int,
                         methods: Sequence[str] = ATTENTION_METHODS, how: str | int | torch.Tensor = "mean",
                         head_fusion: str = "mean", residual: bool = True, discard_ratio: float = 0.0,
                         target: torch.Tensor | None = None, flow_max_pairs: int | None = None,
                         forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Importance ``{method: [B, n_items]}`` and the explained ``target [B]``.

    ``how`` is the readout of the joint matrices: ``"mean"`` for mean-pooled models,
    ``"cls"`` for class-token models (the class token's own column is then dropped),
    or the explained row: an int, or an int64 ``[B]`` tensor of per-sample positions
    (a causal LM's next-token prediction at that position).
    ``raw`` is the last layer's head-fused attention, ``received`` the column mean
    over layers, ``rollout``/``flow`` as in Abnar & Zuidema (2020), ``grad_rollout``
    as in Chefer et al. (2021) with gradients of the target logit (read out without
    its identity term).
    """
    _check_methods(methods)        # before the forward and backward pass, not after
    atts, grads, target = record_target(model, x, target=target, forward=forward,
                                        keep_grad="grad_rollout" in methods)
    return importance_from_records(atts, grads, n_items=n_items, methods=methods, how=how,
                                   head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio,
                                   flow_max_pairs=flow_max_pairs), target


def importance_from_records(atts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None, *, n_items: int,
                            methods: Sequence[str], how: str | int | torch.Tensor = "mean",
                            head_fusion: str = "mean", residual: bool = True, discard_ratio: float = 0.0,
                            flow_max_pairs: int | None = None) -> dict[str, torch.Tensor]:
    """The methods of :func:`attention_importance` on attentions (and, for
    ``grad_rollout``, gradients) already recorded by :func:`record_target`."""
    _check_methods(methods)
    if not atts:
        raise ValueError("no attention was recorded; nothing to explain")
    if "grad_rollout" in methods and grads is None:
        raise ValueError("grad_rollout needs the gradients: record with keep_grad=True")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion]
    out: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "raw":
            rel = readout(fuse(atts[-1].float()), how)
        elif method == "received":
            rel = attention_received(atts)
        elif method == "rollout":
            rel = readout(rollout(atts, head_fusion=head_fusion, residual=residual,
                                  discard_ratio=discard_ratio), how)
        elif method == "grad_rollout":
            # R = I + (relevance propagated through attention); the identity is every
            # token's own share and says nothing about the others, so it is removed
            # before the readout (with a class token, Chefer et al. read R[0, 1:], which
            # excludes it the same way).
            joint = grad_rollout(atts, grads)
            rel = readout(joint - torch.eye(joint.shape[-1], dtype=joint.dtype), how)
        else:  # flow
            rel = readout(attention_flow(atts, head_fusion=head_fusion, residual=residual,
                                         max_pairs=flow_max_pairs, progress=False), how)
        out[method] = to_items(rel.detach().float(), n_items)
    return out
