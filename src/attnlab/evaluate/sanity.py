"""Does an explanation depend on the model? The model-parameter randomisation test.

Adebayo et al. (2018), "Sanity checks for saliency maps": re-initialise the trained
model's weights block by block from the output back (**cascading**) and, separately,
one block at a time (**independent**); explain the same samples again and measure how
similar each explanation stays, as the Spearman rank correlation between the trained
and the randomised importance of every sample. A method whose map barely changes when
the whole model is random explains the input, not the model.

Blocks (:func:`randomisation_blocks`), found for any model without configuration:

* each attention layer: the element of an ``nn.ModuleList``/``nn.Sequential`` that
  holds a recordable attention module (a transformer layer), or the attention module's
  own parent where there is no such list;
* the remaining parameters, grouped by position in the forward pass: everything run
  between two attention layers (or before the first, after the last) is one block,
  e.g. the input embedding and the classifier head.

Blocks are ordered by their first call in one forward pass; the model's own
parameters (a class token, a position embedding: ``model-params``) count as its input side.
Re-initialising calls each module's ``reset_parameters`` (``_reset_parameters`` for
``nn.MultiheadAttention``), seeded; a parameter no module resets is drawn from
``N(0, std²)`` with the trained parameter's std (0.02 if that is zero).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    """A group of modules re-initialised together, named by their qualified names."""

    name: str
    modules: tuple[str, ...]
    layer: bool = False                 # an attention layer (reset entirely), else its modules' own parameters


def randomisation_blocks(model: nn.Module, run: Callable[[nn.Module], Any]) -> list[Block]:
    """The model's blocks from input to output (see the module docstring); ``run(model)``
    makes one forward pass (its output is ignored; it runs without gradients)."""
    from attnlab.capture import AttentionProbs, recordable_modules

    modules = dict(model.named_modules())
    parents = {child_name: name for name, m in modules.items()
               for child_name in (f"{name}.{c}" if name else c for c, _ in m.named_children())}

    def layer_of(name: str) -> str:
        """The enclosing list element of an attention module, else its parent."""
        if isinstance(modules[name], AttentionProbs):
            name = parents.get(name, "")
        walk = name
        while walk:
            up = parents.get(walk, "")
            if isinstance(modules[up], (nn.ModuleList, nn.Sequential)) and up != "":
                return walk
            walk = up
        return name

    layers = list(dict.fromkeys(layer_of(n) for n in recordable_modules(model)))
    layers = [n for n in layers if not any(_inside(n, other) for other in layers if other != n)]
    owners = [n for n, m in modules.items()
              if any(True for _ in m.parameters(recurse=False)) and not any(_inside(n, l) for l in layers)]
    order: dict[str, int] = {}

    def first_call(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            order.setdefault(name, len(order))
        return hook

    hooks = [modules[n].register_forward_pre_hook(first_call(n)) for n in dict.fromkeys(layers + owners) if n]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    order[""] = -1                                     # the model's own parameters: its input side
    called = sorted((n for n in dict.fromkeys(layers + owners) if n in order), key=order.__getitem__)
    blocks: list[Block] = []
    pending: list[str] = []
    for name in called:
        if name in layers:
            if pending:
                blocks.append(Block(_group_name(pending), tuple(pending)))
                pending = []
            blocks.append(Block(name, (name,), layer=True))
        else:
            pending.append(name)
    if pending:
        blocks.append(Block(_group_name(pending), tuple(pending)))
    return blocks


def _group_name(names: list[str]) -> str:
    """``embed`` for ``embed.features.0, embed.proj``; ``model-params/embed/position`` for
    the model's own parameters and two top-level modules."""
    own = [n for n in names if n]
    parts = [n.split(".") for n in own]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    labels = [".".join(common)] if common else list(dict.fromkeys(p[0] for p in parts))
    return "/".join((["model-params"] if "" in names else []) + labels)   # characters MLflow keys accept


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def randomise(model: nn.Module, blocks: Sequence[Block], *, seed: int) -> None:
    """Re-initialise every parameter of ``blocks`` in place (seeded; see module docstring).

    An attention layer is reset module by module; a module of the other blocks only
    its own parameters (it may hold layers, e.g. an encoder with a position embedding)."""
    modules = dict(model.named_modules())
    # the draws come from the generator of the parameters' device (CPU or CUDA: seeded
    # alike, different streams); manual_seed seeds every generator, all restored after
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        for block in blocks:
            for top in block.modules:
                inner = [m for n, m in modules.items() if _inside(n, top)] if block.layer else [modules[top]]
                for m in inner:
                    _reset(m)


def _reset(m: nn.Module) -> None:
    """``m``'s own parameters re-drawn: by its ``reset_parameters`` where that touches
    no other module's (a leaf module, or ``nn.MultiheadAttention`` with its out_proj),
    else from N(0, std²) with the parameter's std."""
    fn = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
    leaf = isinstance(m, nn.MultiheadAttention) or not any(True for c in m.children() for _ in c.parameters())
    if callable(fn) and leaf:
        fn()
        return
    for p in m.parameters(recurse=False):
        std = float(p.std()) if p.numel() > 1 else 0.0
        p.normal_(0.0, std if std > 0 and math.isfinite(std) else 0.02)


def rank_correlations(trained: torch.Tensor, randomised: torch.Tensor,
                      valid: torch.Tensor | None = None) -> np.ndarray:
    """Spearman's rho between the trained and randomised importance of each sample
    (``[N, n_items]`` each; only ``valid`` items). NaN where the trained importance of a
    sample is constant (nothing to rank); 0 where only the randomised one is constant.
    With fewer than 3 items, one rho across samples of the last item's share (a
    per-sample rank correlation of 2 items is always ±1), as a length-1 array; it is
    ranked by the log-ratio to the first item's share, which orders the samples the
    same way but keeps shares that float32 rounds to 1 apart."""
    from scipy.stats import spearmanr

    a, b = (t.detach().double().cpu().numpy() for t in (trained, randomised))      # scipy: host memory
    m = np.ones_like(a, dtype=bool) if valid is None else valid.cpu().numpy().astype(bool)
    if a.shape[1] < 3:                 # the log-ratio ranks as the share does, without float rounding to 1
        return np.array([_rho(*(np.log(v[:, -1].clip(1e-300)) - np.log(v[:, 0].clip(1e-300)) for v in (a, b)),
                              spearmanr)])
    return np.array([_rho(a[i][m[i]], b[i][m[i]], spearmanr) for i in range(len(a))])


def _rho(a: np.ndarray, b: np.ndarray, spearmanr: Callable) -> float:
    if a.size < 2 or np.all(a == a[0]):
        return math.nan
    if np.all(b == b[0]):
        return 0.0
    return float(spearmanr(a, b).statistic)


def sanity_check(model: nn.Module, explain: Callable[[nn.Module], Mapping[str, torch.Tensor]],
                 trained: Mapping[str, torch.Tensor], run: Callable[[nn.Module], Any], *,
                 valid: torch.Tensor | None = None, threshold: float = 0.5, independent: bool = True,
                 seed: int = 0) -> dict[str, Any]:
    """The randomisation test of every method of ``trained`` (``{method: [N, n_items]}``,
    the trained model's importance of the samples ``explain`` explains).

    ``explain(randomised_model)`` returns the same methods' importance on the same
    samples (for the same targets); ``run(model)`` is one forward pass (to order the
    blocks). ``model`` itself is left as it is (a copy is randomised).

    Returns (JSON-ready): ``blocks`` (input to output), ``cascading`` ``{method:
    {depth: mean |rho|}}`` (depth ``k``: the last ``k`` blocks random), ``independent``
    ``{method: {block: mean |rho|}}``, ``final`` (mean |rho| with every block random),
    ``passed`` (``final < threshold``; a method whose every rho is undefined does not
    pass), ``threshold``, ``samples`` and ``measure`` ("per sample", or "across
    samples" under 3 items)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"sanity_check: threshold={threshold}; expected a value in (0, 1]")
    blocks = randomisation_blocks(model, run)
    if not blocks:
        raise ValueError("sanity_check: the model has no parameters to randomise")
    methods = list(trained)

    def score(random_blocks: Sequence[Block], k: int) -> dict[str, float]:
        copy_ = copy.deepcopy(model)
        randomise(copy_, random_blocks, seed=seed + k)
        got = explain(copy_)
        return {m: _mean_abs(rank_correlations(trained[m], got[m], valid)) for m in methods}

    depth = len(blocks)
    cascading = {m: {} for m in methods}
    by_block = {m: {} for m in methods}
    for k in range(1, depth + 1):                      # the last k blocks random
        scores = score(blocks[depth - k:], k)
        for m in methods:
            cascading[m][str(k)] = scores[m]
        if k == 1:
            for m in methods:
                by_block[m][blocks[-1].name] = scores[m]
    if independent:
        for i, block in enumerate(blocks[:-1]):        # the last block alone is depth 1
            scores = score([block], depth + 1 + i)
            for m in methods:
                by_block[m][block.name] = scores[m]
    final = {m: cascading[m][str(depth)] for m in methods}
    n_items = next(iter(trained.values())).shape[1]
    return {"blocks": [b.name for b in blocks], "cascading": cascading,
            "independent": ({m: {b.name: by_block[m][b.name] for b in blocks} for m in methods}
                            if independent else {}),
            "final": final, "passed": {m: bool(final[m] < threshold) for m in methods},
            "threshold": threshold, "samples": int(next(iter(trained.values())).shape[0]),
            "measure": "per sample" if n_items >= 3 else "across samples"}


def _mean_abs(rho: np.ndarray) -> float:
    rho = rho[~np.isnan(rho)]
    return float(np.abs(rho).mean()) if rho.size else math.nan
