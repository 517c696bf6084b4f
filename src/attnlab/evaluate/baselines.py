"""Non-attention attributions (captum), reduced to one score per item.

These are the reference explanations that attention-based ones are compared with in
the faithfulness and ground-truth scores:

* :func:`input_x_gradient` — Shrikumar et al. (2016), ``x ⊙ ∂f_target/∂x``;
* :func:`integrated_gradients` — Sundararajan et al. (2017), path integral of the
  gradient from a baseline to ``x``, times ``x − baseline``.

Both return ``[B, n_items]``: the attribution summed over every non-item dim. By
default the **absolute** values are summed (``signed=False``): an item whose
features push the prediction both ways still matters, and the deletion curve and
evidence AUROC ask "which items matter", not "which way". ``signed=True`` sums the
signed values (then, for IG, the items add up to ``f(x) − f(baseline)``).

Items are along dim 1 of ``x [B, T, ...]``, or, with ``patch=P``, the ``P×P`` patches
of a video ``x [B, F, C, S, S]`` in the order of
:func:`attnlab.evaluate.faithfulness.patch_masker`. Inputs must be floating point
(for token ids, attribute to the embeddings instead).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from attnlab.evaluate.faithfulness import as_target


def attributions_to_items(attr: torch.Tensor, *, patch: int | None = None,
                          signed: bool = False) -> torch.Tensor:
    """Reduce an attribution shaped like the input to ``[B, n_items]``."""
    a = attr if signed else attr.abs()
    if patch is None:
        if a.dim() < 2:
            raise ValueError(f"attribution has shape {tuple(a.shape)}, expected [B, T, ...]")
        return a.reshape(a.shape[0], a.shape[1], -1).sum(dim=2)
    if a.dim() != 5 or a.shape[-1] % patch or a.shape[-2] % patch:
        raise ValueError(f"attribution has shape {tuple(a.shape)}, expected [B, F, C, S, S] "
                         f"with S a multiple of patch={patch}")
    b, f, c, h, w = a.shape
    a = a.reshape(b, f, c, h // patch, patch, w // patch, patch).sum(dim=(2, 4, 6))
    return a.reshape(b, -1)                                  # frame-major, row-major


def _wrap(model: nn.Module | Callable[..., torch.Tensor],
          forward_kwargs: Mapping[str, Any] | None) -> tuple[Callable[..., torch.Tensor], tuple]:
    """A forward function taking kwargs positionally, so that captum expands batched
    tensors (e.g. ``padding_mask``) alongside the inputs."""
    keys = list((forward_kwargs or {}).keys())
    values = tuple((forward_kwargs or {}).values())

    def forward(inputs: torch.Tensor, *args: Any) -> torch.Tensor:
        return model(inputs, **dict(zip(keys, args)))

    return forward, values


def _check_input(x: torch.Tensor, who: str) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"{who}: x has dtype {x.dtype}; gradients need a floating input "
                        "(attribute to the embeddings for token ids)")


def input_x_gradient(model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor,
                     target: int | torch.Tensor | None = None, *, patch: int | None = None,
                     signed: bool = False,
                     forward_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Input × gradient of the ``target`` logit, per item → ``[B, n_items]``.

    ``target``: int or ``[B]``; default the model's prediction. ``forward_kwargs``
    are passed to the model (batched tensors are fine). See the module docstring for
    ``patch`` and ``signed``.
    """
    from captum.attr import InputXGradient

    _check_input(x, "input_x_gradient")
    forward, extra = _wrap(model, forward_kwargs)
    with torch.no_grad():
        tgt = as_target(target, lambda: forward(x, *extra), x.shape[0], x.device)
    inputs = x.detach().clone().requires_grad_(True)      # a leaf of our own; x is untouched
    attr = InputXGradient(forward).attribute(inputs, target=tgt,
                                             additional_forward_args=extra or None)
    return attributions_to_items(attr.detach(), patch=patch, signed=signed)


def integrated_gradients(model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor,
                         target: int | torch.Tensor | None = None, n_steps: int = 32,
                         baseline: float | torch.Tensor = 0.0, *, patch: int | None = None,
                         signed: bool = False, internal_batch_size: int | None = None,
                         forward_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Integrated gradients of the ``target`` logit from ``baseline``, per item →
    ``[B, n_items]``.

    ``baseline``: a number or a tensor shaped like ``x`` (use the masker's baseline,
    so "removed" means the same here and in the deletion curve). ``n_steps``:
    Gauss–Legendre points; ``internal_batch_size`` bounds memory (inputs per
    forward). Other arguments as in :func:`input_x_gradient`.
    """
    from captum.attr import IntegratedGradients

    _check_input(x, "integrated_gradients")
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps}: expected >= 1")
    forward, extra = _wrap(model, forward_kwargs)
    with torch.no_grad():
        tgt = as_target(target, lambda: forward(x, *extra), x.shape[0], x.device)
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.detach().to(x).expand_as(x).contiguous()
    attr = IntegratedGradients(forward).attribute(
        x.detach(), baselines=baseline, target=tgt, additional_forward_args=extra or None,
        n_steps=n_steps, internal_batch_size=internal_batch_size)
    return attributions_to_items(attr.detach(), patch=patch, signed=signed)
