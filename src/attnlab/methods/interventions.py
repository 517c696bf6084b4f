"""Interventional explanation methods, registered in :mod:`attnlab.methods`: value
zeroing (Mohebbi et al., EACL 2023) and attention knockout (Geva et al., 2023).

Both run the model again with its attention probabilities edited through
:class:`~attnlab.capture.AttentionRecorder` (``edit=``); the maths is in
:mod:`attnlab.explain.interventions`. Importing this module registers them without
importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from attnlab.methods.registry import register

if TYPE_CHECKING:
    from torch import Tensor

    from attnlab.items import Batch


def _run(batch: Batch):
    return lambda: batch.logits(batch.x)


@register("value_zeroing", items=("sequence", "tokens"), needs=("reruns", "module"), default=False,
          unsupported={"video:hf_timesformer": "a Hugging Face TimeSformer layer holds two attentions, and value "
                                               "zeroing re-runs blocks of one self-attention only"},
          summary="value zeroing (Mohebbi et al., 2023): cosine distance of each token's block output when "
                  "another token's value vector is zeroed, rows normalised, rolled out over layers without a "
                  "residual term, read out at the explained row; cost: N re-runs of each block per sample "
                  "(N tokens), batched")
def _value_zeroing(batch: Batch) -> Tensor:
    from attnlab.explain.interventions import value_zeroing

    return value_zeroing(batch.model, _run(batch), batch.items.how)


@register("value_zeroing", items=("spacetime",))
def _value_zeroing_spacetime(batch: Batch) -> Tensor:
    # the joint 1+F·P tokens of each divided block (class token first, then frame-major
    # patches, the items' order); the class token's row of the rollout, its own column
    # dropped by the registry
    from attnlab.explain.interventions import value_zeroing

    return value_zeroing(batch.model, _run(batch), "cls")


@register("knockout", items=("sequence", "tokens", "spacetime"), needs=("reruns", "module"), default=False,
          summary="attention knockout (Geva et al., 2023): the drop of the explained logit when every attention "
                  "edge into the item is blocked in every layer and head (each query keeps its own diagonal "
                  "edge), clamped at 0 (items whose blocking raises the logit get 0); cost: one forward of the "
                  "batch per item, several items' copies of the batch at once")
def _knockout(batch: Batch) -> Tensor:
    from attnlab.explain.interventions import knockout_importance

    return knockout_importance(batch.model, _run(batch), batch.target, spacetime=batch.items.kind == "spacetime",
                               run_rows=batch.rows_logits).clamp_min(0)
