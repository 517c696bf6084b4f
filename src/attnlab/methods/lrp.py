"""AttnLRP (Achtibat et al., ICML 2024), registered in :mod:`attnlab.methods` as ``attnlrp``.

The rules and the relevance-propagating forward of each supported block are in
:mod:`attnlab.explain.lrp`; this module only registers the method (no torch import
here: params validation reads the registry).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from attnlab.methods.registry import register

if TYPE_CHECKING:
    from torch import Tensor

    from attnlab.items import Batch

@register("attnlrp", items=("sequence", "tokens", "spacetime"), needs=("reruns", "module"), default=False,
          unsupported={"video:hf_timesformer": "no LRP rules for Hugging Face's TimeSformer layers (only "
                                               "nn.TransformerEncoderLayer, BERT and the project's blocks)"},
          summary="AttnLRP (Achtibat et al., 2024): LRP of the explained logit to the transformer's input "
                  "(ε-rule on linear maps and residuals, identity rule on norms and activations, the softmax "
                  "rule, the uniform rule on Q·Kᵀ and A·V), summed over the embedding per item, negative "
                  "relevance clamped to 0; cost: one forward and one backward per batch")
def _attnlrp(batch: Batch) -> Tensor:
    from attnlab.explain.lrp import attnlrp

    # [B, L, D] (sequence, tokens: a class token's row included) or [B, F, P, D] (spacetime)
    rel = attnlrp(batch.model, lambda: batch.logits(batch.x), batch.target)
    # signed evidence per item; the deletion curves rank by "most for the logit", so the
    # items that speak against it (negative relevance) are ranked with the irrelevant ones
    return rel.sum(-1).clamp_min(0.0)
