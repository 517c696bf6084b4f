"""Explanations computed from recorded attention: pure, batched functions on tensors.

* :func:`rollout` — attention rollout (Abnar & Zuidema, 2020)
* :func:`attention_flow` — attention flow, max-flow through the layer graph (same paper)
* :func:`grad_rollout` — gradient-weighted relevance (Chefer, Gur & Wolf, 2021)
* :func:`spacetime_rollout` — rollout through divided space-time attention (TimeSformer)
* :func:`split_spacetime` — a recorder's space-time entries → the ``(space, time)`` lists
* :func:`readout` — one row (class token, mean, or a token) of a joint ``[B, N, N]`` matrix
"""
from .flow import attention_flow
from .grad_rollout import grad_rollout
from .readout import readout
from .rollout import rollout
from .spacetime import spacetime_grad_rollout, spacetime_rollout, split_spacetime

__all__ = ["rollout", "grad_rollout", "attention_flow", "spacetime_rollout", "spacetime_grad_rollout",
           "split_spacetime", "readout"]
