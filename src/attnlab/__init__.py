"""attnlab: train attention models and find out what their attention means.

Public API (stable names; see docs/design.md and docs/api.md):
``AttentionRecorder`` records every attention call of a model; ``rollout``,
``grad_rollout``, ``attention_flow``, ``spacetime_rollout`` and ``readout`` turn the
recorded maps into explanations (``split_spacetime`` turns a divided space-time
model's entries into what ``spacetime_rollout`` takes); ``VocabAttention`` aggregates token x token attention.
``AttentionProbs`` is the marker a model's own attention modules call on their
probabilities (``head_outputs`` gives the per-head values it takes for
``AttentionRecorder(..., keep_norms=True)``).

Masks: ``mask`` is always a ``[B, N]`` bool that is True at real tokens (torch's
``padding_mask``, True at padding, is accepted by ``rollout`` and ``readout`` as well).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnlab.aggregate import VocabAttention
    from attnlab.capture import AttentionProbs, AttentionRecorder, head_outputs
    from attnlab.explain import (attention_flow, grad_rollout, readout, rollout, spacetime_rollout,
                                 split_spacetime)

#: Public name -> the module defining it. Loaded on first use (PEP 562), so that
#: ``import attnlab.config`` or a stage process does not pay for torch, pandas and
#: scipy before it needs them; ``from attnlab import rollout`` works as ever.
_PUBLIC = {"VocabAttention": "attnlab.aggregate", "AttentionProbs": "attnlab.capture",
           "AttentionRecorder": "attnlab.capture", "head_outputs": "attnlab.capture",
           **{name: "attnlab.explain" for name in ("attention_flow", "grad_rollout", "readout", "rollout",
                                                   "spacetime_rollout", "split_spacetime")}}

__all__ = ["AttentionProbs", "AttentionRecorder", "VocabAttention", "attention_flow", "grad_rollout",
           "head_outputs", "readout", "rollout", "spacetime_rollout", "split_spacetime"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
