"""The built-in explanation methods, registered in :mod:`attnlab.methods`.

Each function turns one :class:`~attnlab.attribution.Batch` into relevance
``[B, n_items]`` (or ``[B, tokens]`` / ``[B, F, P]``); the registry entry normalises it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnlab.attribution import Batch, attention_received
from attnlab.evaluate.baselines import input_x_gradient, integrated_gradients
from attnlab.explain import attention_flow, grad_rollout, readout, rollout, spacetime_grad_rollout, spacetime_rollout
from attnlab.explain.rollout import fuse_heads
from attnlab.methods import register


def _fuse(batch: Batch, attn: Tensor) -> Tensor:
    return fuse_heads(attn.float(), batch.options.head_fusion)


def _spacetime(batch: Batch, which: str = "attentions") -> tuple[list[Tensor], list[Tensor]]:
    return batch.items.split(getattr(batch, which))


@register("raw", items=("sequence", "tokens"), needs=("attention",),
          summary="the last layer's attention, heads fused, read out at the explained row")
def _raw(batch: Batch) -> Tensor:
    return readout(_fuse(batch, batch.attentions[-1]), batch.items.how)


@register("raw", items=("spacetime",))
def _raw_spacetime(batch: Batch) -> Tensor:
    # the last block's class-token space attention: its per-frame copies, each / F
    space, _ = _spacetime(batch)
    return fuse_heads(space[-1], batch.options.head_fusion, dim=2)[:, :, 0, 1:] / space[-1].shape[1]


@register("received", items=("sequence", "tokens"), needs=("attention",),
          summary="the attention each item receives, mean over layers, heads and queries")
def _received(batch: Batch) -> Tensor:
    return attention_received(batch.attentions)


@register("received", items=("spacetime",))
def _received_spacetime(batch: Batch) -> Tensor:
    space, _ = _spacetime(batch)
    fuse = lambda s: fuse_heads(s, batch.options.head_fusion, dim=2)  # noqa: E731
    return torch.stack([fuse(s)[..., 1:].mean(2) for s in space]).mean(0)


@register("rollout", items=("sequence", "tokens"), needs=("attention",),
          summary="attention rollout (Abnar & Zuidema, 2020)")
def _rollout(batch: Batch) -> Tensor:
    o = batch.options
    return readout(rollout(batch.attentions, head_fusion=o.head_fusion, residual=o.residual,
                           discard_ratio=o.discard_ratio), batch.items.how)


@register("rollout", items=("spacetime",))
def _rollout_spacetime(batch: Batch) -> Tensor:
    o = batch.options
    return spacetime_rollout(*_spacetime(batch), head_fusion=o.head_fusion, residual=o.residual)


@register("grad_rollout", items=("sequence", "tokens"), needs=("attention", "gradients"),
          summary="gradient-weighted rollout (Chefer et al., 2021), read out without its identity")
def _grad_rollout(batch: Batch) -> Tensor:
    # R = I + (relevance propagated through attention); the identity is every token's
    # own share and says nothing about the others, so it is removed before the readout
    # (with a class token, Chefer et al. read R[0, 1:], which excludes it the same way).
    joint = grad_rollout(batch.attentions, batch.gradients)
    return readout(joint - torch.eye(joint.shape[-1], dtype=joint.dtype, device=joint.device), batch.items.how)


@register("grad_rollout", items=("spacetime",))
def _grad_rollout_spacetime(batch: Batch) -> Tensor:
    return spacetime_grad_rollout(*_spacetime(batch), *_spacetime(batch, "gradients"))


@register("flow", items=("sequence", "tokens"), needs=("attention",),
          summary="attention flow: max-flow through the layer graph (Abnar & Zuidema, 2020)")
def _flow(batch: Batch) -> Tensor:
    o = batch.options
    return readout(attention_flow(batch.attentions, head_fusion=o.head_fusion, residual=o.residual,
                                  max_pairs=o.flow_max_pairs, progress=False), batch.items.how)


def _norm_maps(batch: Batch) -> list[Tensor]:
    """The recorded norm maps ``[B, Lq, Lk]`` as 1-head attention ``[B, 1, Lq, Lk]``,
    rows normalised to sum 1 (a stochastic matrix, like attention)."""
    return [(n / n.sum(-1, keepdim=True).clamp_min(1e-12)).float().unsqueeze(1) for n in batch.norms]


@register("norm", items=("sequence", "tokens"), needs=("norms",), default=False,
          summary="Kobayashi et al. (2020): ‖Σ_h α f(x)‖, last layer, read out at the explained row")
def _norm(batch: Batch) -> Tensor:
    return readout(_fuse(batch, _norm_maps(batch)[-1]), batch.items.how)


@register("norm", items=("spacetime",))
def _norm_spacetime(batch: Batch) -> Tensor:
    # as raw: the last block's class-token space row, its per-frame copies each / F
    space, _ = batch.items.split(_norm_maps(batch))
    return fuse_heads(space[-1], batch.options.head_fusion, dim=2)[:, :, 0, 1:] / space[-1].shape[1]


@register("norm_rollout", items=("sequence", "tokens"), needs=("norms",), default=False,
          summary="rollout of the norm-aware maps ‖Σ_h α f(x)‖ (Kobayashi et al., 2020), rows normalised")
def _norm_rollout(batch: Batch) -> Tensor:
    o = batch.options
    return readout(rollout(_norm_maps(batch), head_fusion=o.head_fusion, residual=o.residual,
                           discard_ratio=o.discard_ratio), batch.items.how)


@register("norm_rollout", items=("spacetime",))
def _norm_rollout_spacetime(batch: Batch) -> Tensor:
    o = batch.options
    return spacetime_rollout(*batch.items.split(_norm_maps(batch)), head_fusion=o.head_fusion,
                             residual=o.residual)


@register("input_x_gradient", items=("sequence", "spacetime", "streams"), needs=("reruns",),
          summary="input x gradient (Shrikumar et al., 2016), |.| summed per item")
def _input_x_gradient(batch: Batch) -> Tensor:
    return batch.items.group(input_x_gradient(batch.logits, batch.x, batch.target, patch=batch.items.patch))


@register("integrated_gradients", items=("sequence", "spacetime", "streams"), needs=("reruns",),
          summary="integrated gradients (Sundararajan et al., 2017), |.| summed per item")
def _integrated_gradients(batch: Batch) -> Tensor:
    base = batch.baseline
    if isinstance(base, Tensor):
        base = float(base) if base.dim() == 0 else base.expand_as(batch.x)
    return batch.items.group(integrated_gradients(batch.logits, batch.x, batch.target,
                                                  n_steps=batch.options.ig_steps, baseline=base,
                                                  patch=batch.items.patch))


@register("weights", items=("streams",), needs=("module",),
          summary="the fusion's own per-sample stream weights")
def _weights(batch: Batch) -> Tensor:
    with torch.no_grad():
        return batch.items.weights(batch.model, batch.x)
