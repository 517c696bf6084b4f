"""The built-in explanation methods, registered in :mod:`attnlab.methods`.

Each function turns one :class:`~attnlab.items.Batch` into relevance
``[B, n_items]`` (or ``[B, tokens]`` / ``[B, F, P]``); the registry entry normalises it.

Importing this module registers the methods (names, needs, item kinds, summaries)
without importing torch: the maths each one runs is imported when it is called, so
params validation, which reads the registry, stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from attnlab.methods.registry import register

if TYPE_CHECKING:
    from torch import Tensor

    from attnlab.items import Batch


def _fuse_heads(attn: Tensor, head_fusion: str, dim: int = -3) -> Tensor:
    from attnlab.explain.rollout import fuse_heads

    return fuse_heads(attn, head_fusion, dim=dim)


def _fuse(batch: Batch, attn: Tensor) -> Tensor:
    return _fuse_heads(attn.float(), batch.options.head_fusion)


def _spacetime(batch: Batch, which: str = "attentions") -> tuple[list[Tensor], list[Tensor]]:
    return batch.items.split(getattr(batch, which))


@register("raw", items=("sequence", "tokens"), needs=("attention",),
          summary="the last layer's attention, heads fused, read out at the explained row")
def _raw(batch: Batch) -> Tensor:
    from attnlab.explain import readout

    return readout(_fuse(batch, batch.attentions[-1]), batch.items.how)


@register("raw", items=("spacetime",))
def _raw_spacetime(batch: Batch) -> Tensor:
    # the last block's class-token space attention: its per-frame copies, each / F
    space, _ = _spacetime(batch)
    return _fuse_heads(space[-1], batch.options.head_fusion, dim=2)[:, :, 0, 1:] / space[-1].shape[1]


@register("received", items=("sequence", "tokens"), needs=("attention",),
          summary="the attention each item receives, mean over layers, heads and queries")
def _received(batch: Batch) -> Tensor:
    from attnlab.items import attention_received

    return attention_received(batch.attentions)


@register("received", items=("spacetime",))
def _received_spacetime(batch: Batch) -> Tensor:
    import torch

    space, _ = _spacetime(batch)
    fuse = lambda s: _fuse_heads(s, batch.options.head_fusion, dim=2)  # noqa: E731
    return torch.stack([fuse(s)[..., 1:].mean(2) for s in space]).mean(0)


@register("rollout", items=("sequence", "tokens"), needs=("attention",),
          summary="attention rollout (Abnar & Zuidema, 2020)")
def _rollout(batch: Batch) -> Tensor:
    from attnlab.explain import readout, rollout

    o = batch.options
    return readout(rollout(batch.attentions, head_fusion=o.head_fusion, residual=o.residual,
                           discard_ratio=o.discard_ratio), batch.items.how)


@register("rollout", items=("spacetime",))
def _rollout_spacetime(batch: Batch) -> Tensor:
    from attnlab.explain import spacetime_rollout

    o = batch.options
    return spacetime_rollout(*_spacetime(batch), head_fusion=o.head_fusion, residual=o.residual)


@register("grad_rollout", items=("sequence", "tokens"), needs=("attention", "gradients"),
          summary="gradient-weighted rollout (Chefer et al., 2021), read out without its identity")
def _grad_rollout(batch: Batch) -> Tensor:
    import torch

    from attnlab.explain import grad_rollout, readout

    # R = I + (relevance propagated through attention); the identity is every token's
    # own share and says nothing about the others, so it is removed before the readout
    # (with a class token, Chefer et al. read R[0, 1:], which excludes it the same way).
    joint = grad_rollout(batch.attentions, batch.gradients)
    return readout(joint - torch.eye(joint.shape[-1], dtype=joint.dtype, device=joint.device), batch.items.how)


@register("grad_rollout", items=("spacetime",))
def _grad_rollout_spacetime(batch: Batch) -> Tensor:
    from attnlab.explain import spacetime_grad_rollout

    return spacetime_grad_rollout(*_spacetime(batch), *_spacetime(batch, "gradients"))


@register("flow", items=("sequence", "tokens"), needs=("attention",),
          summary="attention flow: max-flow through the layer graph (Abnar & Zuidema, 2020)")
def _flow(batch: Batch) -> Tensor:
    from attnlab.explain import attention_flow, readout

    o, how = batch.options, batch.items.how
    options = dict(head_fusion=o.head_fusion, residual=o.residual, max_pairs=o.flow_max_pairs, progress=False)
    if isinstance(how, str) and how == "mean":      # every row is needed: B·N² max-flow problems
        return readout(attention_flow(batch.attentions, **options), how)
    # one row per sample (the class token's, a given position): B·N problems
    return attention_flow(batch.attentions, rows=0 if isinstance(how, str) and how == "cls" else how, **options)


def _norm_maps(batch: Batch) -> list[Tensor]:
    """The recorded norm maps ``[B, Lq, Lk]`` as 1-head attention ``[B, 1, Lq, Lk]``,
    rows normalised to sum 1 (a stochastic matrix, like attention)."""
    return [(n / n.sum(-1, keepdim=True).clamp_min(1e-12)).float().unsqueeze(1) for n in batch.norms]


@register("norm", items=("sequence", "tokens"), needs=("norms",), default=False,
          summary="Kobayashi et al. (2020): ‖Σ_h α f(x)‖, last layer, read out at the explained row")
def _norm(batch: Batch) -> Tensor:
    from attnlab.explain import readout

    return readout(_fuse(batch, _norm_maps(batch)[-1]), batch.items.how)


@register("norm", items=("spacetime",))
def _norm_spacetime(batch: Batch) -> Tensor:
    # as raw: the last block's class-token space row, its per-frame copies each / F
    space, _ = batch.items.split(_norm_maps(batch))
    return _fuse_heads(space[-1], batch.options.head_fusion, dim=2)[:, :, 0, 1:] / space[-1].shape[1]


@register("norm_rollout", items=("sequence", "tokens"), needs=("norms",), default=False,
          summary="rollout of the norm-aware maps ‖Σ_h α f(x)‖ (Kobayashi et al., 2020), rows normalised")
def _norm_rollout(batch: Batch) -> Tensor:
    from attnlab.explain import readout, rollout

    o = batch.options
    return readout(rollout(_norm_maps(batch), head_fusion=o.head_fusion, residual=o.residual,
                           discard_ratio=o.discard_ratio), batch.items.how)


@register("norm_rollout", items=("spacetime",))
def _norm_rollout_spacetime(batch: Batch) -> Tensor:
    from attnlab.explain import spacetime_rollout

    o = batch.options
    return spacetime_rollout(*batch.items.split(_norm_maps(batch)), head_fusion=o.head_fusion,
                             residual=o.residual)


@register("input_x_gradient", items=("sequence", "spacetime", "streams"), needs=("reruns",),
          summary="input x gradient (Shrikumar et al., 2016), |.| summed per item")
def _input_x_gradient(batch: Batch) -> Tensor:
    from attnlab.evaluate.baselines import input_x_gradient

    return batch.items.group(input_x_gradient(batch.logits, batch.x, batch.target, patch=batch.items.patch))


@register("integrated_gradients", items=("sequence", "spacetime", "streams"), needs=("reruns",),
          summary="integrated gradients (Sundararajan et al., 2017), |.| summed per item")
def _integrated_gradients(batch: Batch) -> Tensor:
    from torch import Tensor

    from attnlab.evaluate.baselines import integrated_gradients

    base = batch.baseline
    if isinstance(base, Tensor):
        base = float(base) if base.dim() == 0 else base.expand_as(batch.x)
    return batch.items.group(integrated_gradients(batch.logits, batch.x, batch.target,
                                                  n_steps=batch.options.ig_steps, baseline=base,
                                                  patch=batch.items.patch))


@register("weights", items=("streams",), needs=("module",),
          summary="the fusion's own per-sample stream weights")
def _weights(batch: Batch) -> Tensor:
    import torch

    with torch.no_grad():
        return batch.items.weights(batch.model, batch.x)
