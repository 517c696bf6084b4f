"""Items: what an experiment's explanations rank, and what a method gets.

Item spaces (:class:`SequenceItems`, :class:`SpaceTimeItems`, :class:`StreamItems`) say
how attention and input attributions map to an experiment's items; :class:`Batch` is
everything a method of :mod:`attnlab.methods` may use for one batch; :func:`to_items`
turns a method's relevance into importance ``[B, n_items]`` (rows summing to 1).

A leaf of the package's layers: it imports only the maths below it (``evaluate``'s
input-attribution helpers), never the registry or the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

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
    method needs ``"norms"``). ``rows_logits(idx) -> [R, C]`` runs the model on the
    batch's rows ``idx`` (int64 ``[R]``, repeats allowed) as one batch, so a method that
    re-runs the model many times can run several copies of the batch at once; None when
    the forward cannot take other rows than the batch's own."""

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
    rows_logits: Callable[[Tensor], Tensor] | None = None
