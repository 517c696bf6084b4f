"""The ``alti`` method: ALTI (Ferrando, Gállego & Costa-jussà, EMNLP 2022), registered in
:mod:`attnlab.methods`; the maths is :mod:`attnlab.explain.alti`.

Each attention block (attention with its output projection and biases, the residual,
the layer norm) is decomposed into token-to-token contributions (Manhattan distance of
each token's transformed vector to the block output, clamped at 0, rows normalised) and
the per-layer matrices are multiplied over the layers; the explained row is read out as
for rollout. The model is run once more (the experiment's own forward on the batch) with
hooks reading the blocks' inputs; the hooks are removed afterwards.

Models: ``nn.TransformerEncoderLayer`` stacks (post-LN and pre-LN, causal and padding
masks: the motion, frames and tokens kinds, and users' encoders of the external kind),
Hugging Face BERT-style encoders (the pretrained kind) and the project's divided
space-time blocks (the video kind, rolled out by ``spacetime_rollout`` without the
``0.5·A + 0.5·I`` residual, which the decomposition already holds). Any other attention
module (Hugging Face's TimeSformer, a custom attention) raises a one-line ``ValueError``
naming it when the method runs.

Importing this module does not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from attnlab.methods.registry import register

if TYPE_CHECKING:
    from torch import Tensor

    from attnlab.items import Batch

SUMMARY = ("ALTI (Ferrando et al., 2022): the attention block (attention, residual, layer norm) split into "
           "token-to-token contributions by L1 distance, rolled out over layers (>= 0 by construction); "
           "cost: one forward re-run + B·N²·D·H per layer")


def _layers(batch: Batch) -> list:
    from attnlab.explain.alti import alti_layers

    if batch.model is None:
        raise ValueError("method 'alti' reads the model's weights: batch.model is None")
    return alti_layers(batch.model, lambda: batch.logits(batch.x))


@register("alti", items=("sequence", "tokens"), needs=("reruns", "module"), summary=SUMMARY, default=False,
          unsupported={"video:hf_timesformer": "no ALTI rule for Hugging Face's TimeSformer attention "
                                               "(only nn.TransformerEncoderLayer, BERT and the project's blocks)"})
def _alti(batch: Batch) -> Tensor:
    from attnlab.explain import readout
    from attnlab.explain.alti import alti_rollout

    layers = _layers(batch)
    if any(isinstance(c, tuple) for c in layers):
        raise ValueError("method 'alti' on sequence/tokens items found divided space-time blocks in the model; "
                         "explain it with spacetime items")
    return readout(alti_rollout(layers), batch.items.how)


@register("alti", items=("spacetime",))
def _alti_spacetime(batch: Batch) -> Tensor:
    from attnlab.explain import spacetime_rollout

    layers = _layers(batch)
    if not all(isinstance(c, tuple) for c in layers):
        raise ValueError("method 'alti' on spacetime items needs divided space-time blocks "
                         "(the project's DividedBlock); the model has other attention blocks")
    space, time = [c[1] for c in layers], [c[2] for c in layers]
    # the decomposition holds the residual already: no 0.5·A + 0.5·I; rows sum to 1 (one "head")
    return spacetime_rollout(space, time, head_fusion="mean", residual=False)
