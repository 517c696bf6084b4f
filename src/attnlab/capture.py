"""Recording attention probabilities from any PyTorch model."""
from __future__ import annotations

import torch
from torch import nn


class AttentionProbs(nn.Module):
    """Identity marker placed on attention probabilities, right after the softmax and
    before dropout: ``probs = self.attn_probs(scores.softmax(-1))``.

    This is the protocol through which the project's own attention modules (and a
    user's) are recorded by :class:`AttentionRecorder`. The input must be laid out
    ``[B, H, Lq, Lk]`` (for factorised attention, ``B`` is whatever the module batches
    over, e.g. ``batch·frames``). Outside a recorder it returns its input unchanged.
    """

    def forward(self, probs_bhqk: torch.Tensor) -> torch.Tensor:
        return probs_bhqk
