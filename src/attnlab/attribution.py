"""Explaining a batch with the methods of :mod:`attnlab.methods`.

:func:`explain_batch` records one batch (:func:`record_target`: one forward and
backward of the explained logit) and runs the methods on it;
:func:`attention_importance` runs the attention methods of the registry on a sequence
model in one call. The item spaces and :class:`Batch` live in :mod:`attnlab.items`
(their names are importable from here too).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from attnlab.capture import AttentionRecorder
from attnlab.devices import model_device, take_rows, to_device
from attnlab.items import (Batch, Items, SequenceItems, SpaceTimeItems, StreamItems,  # noqa: F401  (old names)
                           attention_received, to_items)


def record_target(model: nn.Module, x: torch.Tensor, *, target: torch.Tensor | None = None,
                  forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                  keep_grad: bool = True, keep_norms: bool = False) -> tuple:
    """One recorded forward in eval mode (and, with ``keep_grad``, the backward of the
    ``target`` logit, default the prediction): ``(attentions, gradients, target)``,
    and with ``keep_norms`` ``(attentions, gradients, target, norms)`` (the recorder's
    ``rec.norms``, norm-aware attention ``[B, Lq, Lk]`` per entry).

    The model's parameters are frozen meanwhile, so gradients reach the attention
    only and the model's ``.grad`` fields and mode are left as they were. ``x`` and
    ``target`` are moved to the model's device; what is returned is on it.
    """
    forward = forward or (lambda m, xb: m(xb))
    device = model_device(model)
    x, target = to_device(x, device), to_device(target, device)
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), AttentionRecorder(model, keep_grad=keep_grad, keep_norms=keep_norms) as rec:
            logits = forward(model, x)
            if target is None:
                target = logits.argmax(-1)
            if keep_grad:
                logits.gather(1, target[:, None]).sum().backward()
        recorded = rec.attentions, (rec.gradients if keep_grad else None), target.detach()
        return (*recorded, rec.norms) if keep_norms else recorded
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)


def explain_batch(methods: Sequence[str], model: nn.Module, x: Any, items: Items, options: Any, *,
                  forward: Callable[[nn.Module, Any], Tensor] | None = None,
                  target: Tensor | None = None, baseline: float | Tensor = 0.0,
                  forward_rows: Callable[[nn.Module, Any, Tensor], Tensor] | None = None,
                  ) -> tuple[dict[str, Tensor], Batch]:
    """Every method's importance ``{name: [B, n_items]}`` for the ``target`` logit
    (default: the model's prediction), and the :class:`Batch` they were computed from.

    The model runs once (recorded, with one backward when a method needs gradients, and
    norm-aware maps ``batch.norms`` when one needs norms);
    re-runs happen only inside methods that need them. Parameters are frozen and the
    mode restored meanwhile (see :func:`~attnlab.attribution.record_target`).
    ``x``, ``target`` and a tensor ``baseline`` are moved to the model's device, where
    the methods run and the importance is returned.

    ``forward_rows(model, inputs, idx)`` runs the model on ``inputs``, rows ``idx`` (int64
    ``[R]``, repeats allowed) of ``x``, for a ``forward`` that reads per-row data besides
    its inputs (a mask, an explained position); methods that re-run the model many times
    (knockout) then run several copies of the batch at once. By default only the default
    ``forward`` (``model(inputs)``) is run that way."""
    from attnlab.methods import check, get

    device = model_device(model)
    x, target, baseline = (to_device(t, device) for t in (x, target, baseline))
    entries = [get(m) for m in check(methods, items.kind)]
    needs = frozenset().union(*(m.needs for m in entries))
    if forward is None:
        forward = lambda m, xb: m(xb)                          # noqa: E731
        forward_rows = forward_rows or (lambda m, xb, idx: m(xb))
    atts = grads = norms = None
    if needs & {"attention", "gradients", "norms"}:
        atts, grads, target, *rest = record_target(model, x, target=target, forward=forward,
                                                   keep_grad="gradients" in needs, keep_norms="norms" in needs)
        norms = rest[0] if rest else None
    elif target is None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                target = forward(model, x).argmax(-1)
        finally:
            model.train(was_training)
    batch = Batch(x=x, target=target, items=items, logits=lambda inputs: forward(model, inputs),
                  options=options, model=model, attentions=atts, gradients=grads, baseline=baseline,
                  norms=norms, rows_logits=None if forward_rows is None else
                  (lambda idx: forward_rows(model, take_rows(x, idx), idx)))
    return {m.name: m(batch) for m in entries}, batch


def attention_importance(model: nn.Module, x: torch.Tensor, *, n_items: int,
                         methods: Sequence[str] | None = None, how: str | int | torch.Tensor = "mean",
                         head_fusion: str = "mean", residual: bool = True, discard_ratio: float = 0.0,
                         target: torch.Tensor | None = None, flow_max_pairs: int | None = None,
                         forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Importance ``{method: [B, n_items]}`` and the explained ``target [B]`` of the
    attention methods of :mod:`attnlab.methods` on a sequence model.

    ``how`` is the readout of the joint matrices: ``"mean"`` for mean-pooled models,
    ``"cls"`` for class-token models (the class token's own column is then dropped),
    or the explained row: an int, or an int64 ``[B]`` tensor of per-sample positions
    (a causal LM's next-token prediction at that position).
    ``methods`` default to every registered method that needs only attention (and gradients).
    """
    if methods is None:
        from attnlab.methods import registry

        methods = [m.name for m in registry().values()
                   if m.supports("sequence") and m.needs <= {"attention", "gradients"}]
    options = _Options(head_fusion, residual, discard_ratio, flow_max_pairs)
    imp, batch = explain_batch(methods, model, x, SequenceItems(n_items, how), options, forward=forward,
                               target=target)
    return imp, batch.target


class _Options(NamedTuple):
    """The explain options of :func:`attention_importance` (the pipeline passes its params section)."""

    head_fusion: str
    residual: bool
    discard_ratio: float
    flow_max_pairs: int | None
