"""The registry of explanation methods: one entry per method, one verb per entry.

An entry says what a method is called, what it needs (``attention``: the recorded
maps; ``gradients``: their gradients; ``norms``: the norm-aware maps
``‖Σ_h α f(x)‖`` of ``AttentionRecorder(..., keep_norms=True)``, recorded in the same
forward; ``reruns``: more forward/backward passes of the model; ``module``: the
model's own modules or weights), which item kinds it supports, and how it turns one
:class:`~attnlab.items.Batch` into importance ``[B, n_items]`` (rows sum to 1).
Params validation, the explain and evaluate stages, the report and the DVC plots take
the method list from here, so a new method is one :func:`register` call and nothing
else::

    from attnlab.methods import register

    @register("magnitude", items=("sequence", "spacetime", "streams"), needs=(),
              summary="|x| summed per item (ignores the model)", default=False)
    def magnitude(batch):
        return batch.items.from_input(batch.x.abs())

Item kinds (an experiment has one): ``sequence`` (items along dim 1 of a float input,
plus a leading class token when the model has one), ``tokens`` (the same over integer
token ids: no input gradients), ``spacetime`` (the ``F·P`` patches of a video under
divided space-time attention), ``streams`` (the channel groups of a multi-stream input).

* :mod:`attnlab.methods.registry` — :func:`register`, :func:`get`, :func:`names`,
  :func:`check`, entry-point plugins (group ``attnlab.methods``);
* :mod:`attnlab.methods.builtin` — the built-in methods, registered when this package
  is imported.

Importing this package does not import torch (each method imports its maths when it runs).
"""
from attnlab.methods import builtin  # noqa: F401  registers the built-in methods
from attnlab.methods import alti  # noqa: F401  registers alti (Ferrando et al., 2022)
from attnlab.methods import lrp  # noqa: F401  registers attnlrp (Achtibat et al., 2024)
from attnlab.methods import interventions  # noqa: F401  registers value_zeroing and knockout
from attnlab.methods.registry import (ITEM_KINDS, NEEDS, RESERVED, Method, check, check_experiment, get, names,
                                      register, registry, unregister)

__all__ = ["ITEM_KINDS", "NEEDS", "RESERVED", "Method", "check", "check_experiment", "get", "names", "register",
           "registry", "unregister"]
