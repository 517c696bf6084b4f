"""attnlab: train attention models and find out what their attention means.

Public API (stable names; see DESIGN.md):
``AttentionRecorder`` records every attention call of a model; ``rollout``,
``grad_rollout``, ``attention_flow``, ``spacetime_rollout`` and ``readout`` turn the
recorded maps into explanations; ``VocabAttention`` aggregates token x token attention.
"""
from attnlab.aggregate import VocabAttention
from attnlab.capture import AttentionProbs, AttentionRecorder
from attnlab.explain import attention_flow, grad_rollout, readout, rollout, spacetime_rollout

__all__ = ["AttentionProbs", "AttentionRecorder", "VocabAttention", "attention_flow", "grad_rollout",
           "readout", "rollout", "spacetime_rollout"]
