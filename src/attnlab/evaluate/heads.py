"""Head diagnostics from attention maps, and head ablation.

Diagnostics (one number per layer × head, streamed over batches by :class:`HeadStats`):

* ``entropy`` — entropy of each query's attention row divided by ``log`` of its
  number of valid keys: 1 for uniform attention, 0 for a one-hot row. Averaged over
  valid queries (rows with a single valid key, e.g. the first query under a causal
  mask, have no spread to measure and are skipped).
* ``sink`` — the "vertical stripes" score: the share of attention mass falling on
  the ``k`` keys with the largest column mass, averaged over queries, i.e. with
  ``c_j = mean_i A[i, j]`` over valid queries, ``sink = Σ top-k c_j``. Uniform
  attention over ``n`` keys gives ``k/n``; every query on the same key gives 1.
  ``k`` defaults to ``max(1, N // 20)`` for ``N`` keys. Averaged over samples.
* ``locality`` — attention-weighted mean distance ``Σ_j A[i, j]·|i − j|`` in items,
  averaged over valid queries: 0 on the diagonal, ``(n² − 1) / (3n)`` for uniform
  attention over ``n`` items. ``locality_norm`` divides each sample's value by its
  number of valid items ``n`` (uniform → ``(n² − 1) / (3n²)`` ≈ 1/3).

Ablation: :func:`ablate_heads` zeroes chosen heads of ``nn.MultiheadAttention``
modules by zeroing their input columns of ``out_proj.weight``; :func:`head_importance`
measures what each head is worth to the predictions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

_KEYS = ("entropy", "sink", "locality", "locality_norm")


def _layer_sums(attn_bhqk: torch.Tensor, real_bn: torch.Tensor | None, causal: bool,
                k: int | None) -> dict[str, Any]:
    """Sums ``[H]`` (float64) and their counts for one layer's batch of attention."""
    if attn_bhqk.dim() != 4 or attn_bhqk.shape[-1] != attn_bhqk.shape[-2]:
        raise ValueError(f"attention has shape {tuple(attn_bhqk.shape)}, expected [B, H, N, N]")
    b, _, n, _ = attn_bhqk.shape
    a = attn_bhqk.detach()
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    dev = a.device
    if real_bn is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=dev)
    else:
        if real_bn.shape != (b, n):
            raise ValueError(f"mask has shape {tuple(real_bn.shape)}, expected [B={b}, N={n}] "
                             "(True at real tokens)")
        valid = real_bn.to(dev).bool()
    key_ok = valid[:, None, :].expand(b, n, n)                        # [B, Nq, Nk]
    if causal:
        key_ok = key_ok & torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    pair_ok = key_ok & valid[:, :, None]                              # valid query too
    p = torch.where(pair_ok[:, None], a, torch.zeros((), dtype=a.dtype, device=dev))

    n_keys = key_ok.sum(dim=-1)                                       # [B, Nq]
    n_valid = valid.sum(dim=1)                                        # [B]

    ent_rows = valid & (n_keys > 1)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)                  # [B, H, Nq]
    entropy = entropy / torch.log(n_keys.clamp_min(2).to(p.dtype))[:, None]
    ent_sum = (entropy * ent_rows[:, None]).sum(dim=(0, 2))

    pos = torch.arange(n, device=dev)
    dist = (pos[:, None] - pos[None, :]).abs().to(p.dtype)           # [Nq, Nk]
    loc = (p * dist).sum(dim=-1)                                      # [B, H, Nq], 0 on invalid q
    loc_sum = loc.sum(dim=(0, 2))
    loc_norm_sum = (loc / n_valid.clamp_min(1)[:, None, None].to(p.dtype)).sum(dim=(0, 2))

    col = p.sum(dim=2) / n_valid.clamp_min(1)[:, None, None].to(p.dtype)   # [B, H, Nk]
    top_k = min(n, k if k is not None else max(1, n // 20))
    sink = col.topk(top_k, dim=-1).values.sum(dim=-1)                 # [B, H]
    has = n_valid > 0
    sink_sum = (sink * has[:, None]).sum(dim=0)

    return {
        "entropy": (ent_sum.double(), int(ent_rows.sum())),
        "sink": (sink_sum.double(), int(has.sum())),
        "locality": (loc_sum.double(), int(valid.sum())),
        "locality_norm": (loc_norm_sum.double(), int(valid.sum())),
    }


class HeadStats:
    """Streaming per-layer × per-head diagnostics (see the module docstring).

    >>> stats = HeadStats()
    >>> for x, real in loader:
    ...     with AttentionRecorder(model) as rec:
    ...         model(x, padding_mask=~real)
    ...     stats.update(rec.attentions, mask=real)
    >>> stats.result()["entropy"]          # [L, H]

    Args:
        k: number of top keys in the ``sink`` score (default ``max(1, N // 20)``).
        causal: queries only see keys ``j <= i``.

    Holds only ``O(L·H)`` sums; ``merge`` adds another accumulator (shards).
    """

    def __init__(self, *, k: int | None = None, causal: bool = False):
        if k is not None and k < 1:
            raise ValueError(f"k={k}: expected None or an int >= 1")
        self.k = k
        self.causal = causal
        self._sums: dict[str, torch.Tensor] | None = None      # name -> [L, H] float64
        self._counts: dict[str, torch.Tensor] | None = None    # name -> [L] int64

    def update(self, attentions: Sequence[torch.Tensor], *,
               mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
               padding_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> "HeadStats":
        """Add one batch: ``attentions`` is a list of ``[B, H, N, N]`` (one per layer);
        ``mask [B, N]`` (True at real tokens, False at padding: the project's one mask
        convention) applies to every layer, or give a list with one mask (or None) per layer;
        ``padding_mask`` is the same with torch's polarity (True at padding), instead."""
        if mask is not None and padding_mask is not None:
            raise ValueError("give mask (True = real token) or padding_mask (True = padded), not both")
        if padding_mask is not None:
            flip = lambda m: None if m is None else ~m.bool()  # noqa: E731
            mask = [flip(m) for m in padding_mask] if isinstance(padding_mask, (list, tuple)) else flip(padding_mask)
        attentions = list(attentions)
        if not attentions:
            raise ValueError("attentions is empty: expected one [B, H, N, N] tensor per layer")
        masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(attentions)
        if len(masks) != len(attentions):
            raise ValueError(f"mask is a list of {len(masks)}, expected one per layer "
                             f"({len(attentions)})")
        heads = {a.shape[1] for a in attentions}
        if len(heads) != 1:
            raise ValueError(f"layers have different head counts {sorted(heads)}")
        n_layers, nhead = len(attentions), heads.pop()
        if self._sums is None:
            self._sums = {key: torch.zeros(n_layers, nhead, dtype=torch.float64) for key in _KEYS}
            self._counts = {key: torch.zeros(n_layers, dtype=torch.int64) for key in _KEYS}
        elif self._sums["entropy"].shape != (n_layers, nhead):
            raise ValueError(f"got {n_layers} layers × {nhead} heads, but earlier batches had "
                             f"{tuple(self._sums['entropy'].shape)}")
        for layer, (attn, real) in enumerate(zip(attentions, masks)):
            for key, (total, count) in _layer_sums(attn, real, self.causal, self.k).items():
                self._sums[key][layer] += total.cpu()
                self._counts[key][layer] += count
        return self

    def merge(self, other: "HeadStats") -> "HeadStats":
        """Add the sums of ``other`` (same layers, heads, ``k`` and ``causal``)."""
        if (other.k, other.causal) != (self.k, self.causal):
            raise ValueError("cannot merge HeadStats with different k or causal")
        if other._sums is None:
            return self
        if self._sums is None:
            self._sums = {key: v.clone() for key, v in other._sums.items()}
            self._counts = {key: v.clone() for key, v in other._counts.items()}
            return self
        if other._sums["entropy"].shape != self._sums["entropy"].shape:
            raise ValueError("cannot merge HeadStats of different layer × head shapes")
        for key in _KEYS:
            self._sums[key] += other._sums[key]
            self._counts[key] += other._counts[key]
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """``{"entropy", "sink", "locality", "locality_norm"}`` → ``[L, H]`` float64
        (NaN where nothing was counted)."""
        if self._sums is None:
            raise ValueError("HeadStats.result() before any update()")
        out = {}
        for key in _KEYS:
            count = self._counts[key].double()[:, None]
            out[key] = torch.where(count > 0, self._sums[key] / count.clamp_min(1),
                                   torch.full_like(self._sums[key], math.nan))
        return out


def head_diagnostics(attentions: Sequence[torch.Tensor], *,
                     mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                     padding_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                     causal: bool = False, k: int | None = None) -> dict[str, torch.Tensor]:
    """Diagnostics of one batch of attention (list of ``[B, H, N, N]``, one per layer)
    → dict of ``[L, H]`` tensors; see :class:`HeadStats` to stream over batches."""
    return HeadStats(k=k, causal=causal).update(attentions, mask=mask, padding_mask=padding_mask).result()


# --------------------------------------------------------------------------- ablation

def _attention_module(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"ablate_heads: model has no submodule {name!r}") from err
    out_proj = getattr(module, "out_proj", None)
    if not isinstance(out_proj, nn.Linear) or not isinstance(getattr(module, "num_heads", None), int):
        raise TypeError(f"ablate_heads: {name!r} is a {type(module).__name__}; expected an "
                        "nn.MultiheadAttention (or a module with int num_heads and nn.Linear out_proj)")
    if out_proj.in_features % module.num_heads:
        raise ValueError(f"ablate_heads: {name!r}: out_proj.in_features={out_proj.in_features} "
                         f"is not divisible by num_heads={module.num_heads}")
    return module


@contextlib.contextmanager
def ablate_heads(model: nn.Module, heads: Mapping[str, Iterable[int]]) -> Iterator[nn.Module]:
    """Zero the outputs of chosen attention heads inside the ``with`` block.

    ``heads`` maps qualified module names (``"encoder.layers.0.self_attn"``) of
    ``nn.MultiheadAttention`` modules to head indices. Head ``h``'s contribution is
    removed exactly by zeroing columns ``h·d:(h+1)·d`` of ``out_proj.weight``
    (``d = embed_dim / num_heads``; the out_proj bias stays). Because weights, not
    code, change, it also holds in the fused eval fast path of
    ``nn.TransformerEncoderLayer``. The original weights are copied back in place on
    exit, also on exception.
    """
    plan = []
    for name, idx in heads.items():
        module = _attention_module(model, name)
        idx = sorted({int(h) for h in idx})
        bad = [h for h in idx if not 0 <= h < module.num_heads]
        if bad:
            raise ValueError(f"ablate_heads: {name!r} has {module.num_heads} heads; "
                             f"got head indices {bad}")
        plan.append((module.out_proj.weight, module.out_proj.in_features // module.num_heads, idx))
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for weight, dim, idx in plan:
                saved.append((weight, weight.detach().clone()))
                for h in idx:
                    weight[:, h * dim:(h + 1) * dim] = 0
        yield model
    finally:
        with torch.no_grad():
            for weight, original in reversed(saved):
                weight.copy_(original)


@dataclass(frozen=True)
class HeadImportance:
    """What zeroing each head alone costs, over a dataset.

    ``names [L]``: the modules; ``accuracy_drop [L, H]`` = accuracy − accuracy with
    the head zeroed (NaN without labels); ``prob_drop [L, H]`` = mean probability of
    the originally predicted class − the same mean with the head zeroed; NaN for
    heads beyond a module's ``num_heads``. ``accuracy`` and ``prob`` are the
    un-ablated values.
    """

    names: list[str]
    accuracy_drop: torch.Tensor
    prob_drop: torch.Tensor
    accuracy: float
    prob: float


def head_importance(model: nn.Module, batches: Iterable[Any], module_names: Sequence[str],
                    nhead: int | Sequence[int] | None = None, *,
                    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                    progress: bool = False) -> HeadImportance:
    """Drop in accuracy and in confidence when each head is zeroed alone.

    Args:
        model: the classifier (put it in eval mode first).
        batches: iterable of ``(inputs, labels)`` pairs (``labels [B]`` or None);
            read once — every head is ablated on each batch in turn.
        module_names: qualified names of the attention modules (the layers ``L``).
        nhead: heads per module (an int for all, or one per module); default each
            module's ``num_heads``.
        forward: ``forward(model, inputs) -> logits [B, C]``; default ``model(inputs)``.
        progress: show a tqdm bar over batches.
    """
    names = list(module_names)
    modules = [_attention_module(model, name) for name in names]
    per_module = _heads_per_module(names, modules, nhead)
    forward = forward or (lambda m, inputs: m(inputs))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="head importance")
    tally = _ImportanceTally(len(names), max(per_module, default=0))
    with torch.no_grad():
        for batch in batches:
            inputs, labels = _inputs_and_labels(batch)
            pred, labels = tally.add_base(forward(model, inputs), labels)
            for layer, (name, heads) in enumerate(zip(names, per_module)):
                for h in range(heads):
                    with ablate_heads(model, {name: [h]}):
                        q = forward(model, inputs).double().softmax(dim=-1)
                    tally.add_ablated(layer, h, q, pred, labels)
    return tally.result(names, per_module)


def _heads_per_module(names: list[str], modules: list[nn.Module],
                      nhead: int | Sequence[int] | None) -> list[int]:
    """``head_importance``'s ``nhead`` as one checked count per module."""
    if nhead is None:
        per_module = [m.num_heads for m in modules]
    elif isinstance(nhead, int):
        per_module = [nhead] * len(names)
    else:
        per_module = list(nhead)
        if len(per_module) != len(names):
            raise ValueError(f"nhead has {len(per_module)} entries, expected one per module "
                             f"({len(names)})")
    for name, module, h in zip(names, modules, per_module):
        if not 1 <= h <= module.num_heads:
            raise ValueError(f"nhead={h} for {name!r}, which has {module.num_heads} heads")
    return per_module


def _inputs_and_labels(batch: Any) -> tuple[Any, Any]:
    """Unpack one ``(inputs, labels)`` batch of ``head_importance``."""
    try:
        inputs, labels = batch
    except (TypeError, ValueError) as err:
        raise ValueError("head_importance: each batch must be an (inputs, labels) pair") from err
    return inputs, labels


class _ImportanceTally:
    """Running sums of :func:`head_importance`: samples seen, probability of the
    un-ablated prediction and correct predictions, un-ablated and with each head
    ``[L, H]`` zeroed."""

    def __init__(self, n_layers: int, max_heads: int):
        self.seen = self.labelled = 0
        self.base_correct = self.base_prob = 0.0
        self.correct_lh = torch.zeros(n_layers, max_heads, dtype=torch.float64)
        self.prob_lh = torch.zeros(n_layers, max_heads, dtype=torch.float64)

    def add_base(self, logits: torch.Tensor, labels: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add the un-ablated batch; returns its predictions ``[B]`` and labels (a tensor or None)."""
        p = logits.double().softmax(dim=-1)
        pred = p.argmax(dim=-1)
        self.seen += pred.shape[0]
        self.base_prob += p.gather(1, pred[:, None]).sum().item()
        if labels is not None:
            labels = torch.as_tensor(labels, device=pred.device)
            self.labelled += pred.shape[0]
            self.base_correct += (pred == labels).sum().item()
        return pred, labels

    def add_ablated(self, layer: int, head: int, q: torch.Tensor, pred: torch.Tensor,
                    labels: torch.Tensor | None) -> None:
        """Add the batch's probabilities ``q [B, C]`` with ``head`` of ``layer`` zeroed."""
        self.prob_lh[layer, head] += q.gather(1, pred[:, None]).sum().item()
        if labels is not None:
            self.correct_lh[layer, head] += (q.argmax(dim=-1) == labels).sum().item()

    def result(self, names: list[str], per_module: list[int]) -> HeadImportance:
        """Means over the samples, as drops from the un-ablated values (NaN past a module's heads)."""
        if self.seen == 0:
            raise ValueError("head_importance: batches was empty")
        max_heads = self.prob_lh.shape[1]
        heads_mask = torch.arange(max_heads)[None, :] < torch.tensor(per_module)[:, None]
        nan = torch.full_like(self.prob_lh, math.nan)
        base_p = self.base_prob / self.seen
        prob_drop = torch.where(heads_mask, base_p - self.prob_lh / self.seen, nan)
        if self.labelled == self.seen:
            base_acc = self.base_correct / self.seen
            acc_drop = torch.where(heads_mask, base_acc - self.correct_lh / self.seen, nan)
        elif self.labelled == 0:
            base_acc, acc_drop = math.nan, nan
        else:
            raise ValueError("head_importance: some batches have labels and some None")
        return HeadImportance(names=names, accuracy_drop=acc_drop, prob_drop=prob_drop,
                              accuracy=base_acc, prob=base_p)
