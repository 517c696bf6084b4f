"""Explaining a batch: what the methods of :mod:`attnlab.methods` see, and how their
relevance becomes items.

Item spaces (:class:`SequenceItems`, :class:`SpaceTimeItems`, :class:`StreamItems`) say
how attention and input attributions map to an experiment's items; :class:`Batch` is
what a method gets; :func:`explain_batch` records one batch (:func:`record_target`:
one forward and backward of the explained logit) and runs the methods on it.
:func:`attention_importance` runs the attention methods of the registry on a sequence
model in one call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from attnlab.capture import AttentionRecorder
from attnlab.devices import model_device, to_device
from attnlab.evaluate.baselines import attributions_to_items


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


@dataclass(frozen=True)
class SequenceItems:
    """Items along dim 1 of the input; ``how`` reads a joint token x token matrix out
    (``"mean"``, ``"cls"``, a token index, or an int64 ``[B]`` of per-sample rows)."""

    n_items: int
    how: str | int | Tensor = "mean"
    token_ids: bool = False                 # integer inputs: no input gradients
    patch = None                            # input attributions: items are dim 1

    @property
    def kind(self) -> str:
        return "tokens" if self.token_ids else "sequence"

    def rows(self, rows: slice) -> "SequenceItems":
        """The item space of samples ``rows`` (per-sample readout rows are sliced)."""
        return replace(self, how=self.how[rows]) if isinstance(self.how, Tensor) else self

    def group(self, rel: Tensor) -> Tensor:
        """Relevance per position along dim 1 ``[B, T]`` -> per item (the same here)."""
        return rel

    def from_input(self, attr: Tensor) -> Tensor:
        """An attribution shaped like the input ``[B, T, ...]`` -> ``[B, T]`` (summed per item)."""
        return attributions_to_items(attr, signed=True)


@dataclass(frozen=True)
class SpaceTimeItems:
    """The ``frames x patches`` items of a clip ``[B, F, C, S, S]`` (frame-major, patches
    row-major); ``split`` turns recorded entries into ``(space, time)`` lists."""

    n_items: int
    patch: int
    split: Callable[[Sequence[Tensor]], tuple[list[Tensor], list[Tensor]]]
    kind = "spacetime"

    def rows(self, rows: slice) -> "SpaceTimeItems":
        return self

    def group(self, rel: Tensor) -> Tensor:
        """Relevance already per patch ``[B, F·P]`` (or ``[B, F, P]``) stays as it is."""
        return rel

    def from_input(self, attr: Tensor) -> Tensor:
        """An attribution shaped like the clip ``[B, F, C, S, S]`` -> ``[B, F·P]`` (summed per patch)."""
        return attributions_to_items(attr, patch=self.patch, signed=True)


@dataclass(frozen=True)
class StreamItems:
    """Streams packed along the channels of ``x [B, C, ...]`` (stream ``s`` has
    ``channels[s]`` channels); ``weights(model, x)`` is the fusion's own ``[B, n_streams]``."""

    channels: tuple[int, ...]
    weights: Callable[[nn.Module, Tensor], Tensor]
    kind = "streams"
    patch = None

    @property
    def n_items(self) -> int:
        return len(self.channels)

    def rows(self, rows: slice) -> "StreamItems":
        return self

    def group(self, rel_bc: Tensor) -> Tensor:
        """Per-channel relevance ``[B, C]`` -> per stream ``[B, n_streams]``."""
        return torch.stack([part.sum(1) for part in rel_bc.split(list(self.channels), dim=1)], dim=1)

    def from_input(self, attr: Tensor) -> Tensor:
        """An attribution shaped like the packed input ``[B, C, ...]`` -> ``[B, n_streams]``."""
        return self.group(attributions_to_items(attr, signed=True))


Items = SequenceItems | SpaceTimeItems | StreamItems


# --------------------------------------------------------------------------- one batch
@dataclass
class Batch:
    """Everything a method may use for one batch of explained samples.

    ``logits(inputs) -> [B, C]`` re-runs the model on (perturbed) inputs; ``options``
    is the experiment's explain params section (``head_fusion``, ``residual``, ...);
    ``baseline`` is what a removed input value becomes (integrated gradients);
    ``norms`` are the recorder's norm-aware maps ``[B, Lq, Lk]`` per entry (when a
    method needs ``"norms"``)."""

    x: Any
    target: Tensor
    items: Items
    logits: Callable[[Any], Tensor]
    options: Any
    model: nn.Module | None = None
    attentions: list[Tensor] | None = None
    gradients: list[Tensor] | None = None
    baseline: float | Tensor = 0.0
    norms: list[Tensor] | None = None


def explain_batch(methods: Sequence[str], model: nn.Module, x: Any, items: Items, options: Any, *,
                  forward: Callable[[nn.Module, Any], Tensor] | None = None,
                  target: Tensor | None = None, baseline: float | Tensor = 0.0,
                  ) -> tuple[dict[str, Tensor], Batch]:
    """Every method's importance ``{name: [B, n_items]}`` for the ``target`` logit
    (default: the model's prediction), and the :class:`Batch` they were computed from.

    The model runs once (recorded, with one backward when a method needs gradients, and
    norm-aware maps ``batch.norms`` when one needs norms);
    re-runs happen only inside methods that need them. Parameters are frozen and the
    mode restored meanwhile (see :func:`~attnlab.attribution.record_target`).
    ``x``, ``target`` and a tensor ``baseline`` are moved to the model's device, where
    the methods run and the importance is returned."""
    from attnlab.methods import check, get

    device = model_device(model)
    x, target, baseline = (to_device(t, device) for t in (x, target, baseline))
    entries = [get(m) for m in check(methods, items.kind)]
    needs = frozenset().union(*(m.needs for m in entries))
    forward = forward or (lambda m, xb: m(xb))
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
                  norms=norms)
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
