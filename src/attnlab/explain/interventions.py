"""Interventions on attention probabilities: value zeroing and attention knockout.

Both change the post-softmax probabilities of chosen attention calls through the
``edit`` hook of :class:`~attnlab.capture.AttentionRecorder` and measure what changes:

* **Value zeroing** (Mohebbi, Zuidema, Chrupała & Alishahi, EACL 2023, "Quantifying
  Context Mixing in Transformers"): in layer ``l``, token ``j``'s value vector is set to
  zero in every head, which is exactly zeroing column ``j`` of that layer's probabilities
  without renormalising (``Σ_k α_ik v'_k`` with ``v'_j = 0``). ``C_l[i, j]`` is the
  cosine distance between token ``i``'s output of the block (attention, residual,
  norms, feed-forward) with and without it, rows normalised to sum 1
  (:func:`value_zeroing_maps`); the maps are rolled out over layers like attention
  (:func:`value_zeroing`), without the ``0.5·I`` residual term since the block output
  already contains the residual.
* **Attention knockout** (Geva, Bastings, Filippova & Globerson, 2023, "Dissecting
  Recall of Factual Associations in Auto-Regressive Language Models"): chosen edges
  ``i → j`` are blocked, i.e. ``-inf`` added to their scores before the softmax, which
  is the same as zeroing those probabilities and renormalising each row
  (:func:`block_edges`); the change of the explained logit measures what the blocked
  attention carried (:func:`knockout_importance`).

Blocks (for value zeroing, which re-runs one block at a time from its recorded input):
the block of an attention module is its nearest enclosing module that is an element
of an ``nn.ModuleList``/``nn.Sequential`` (``encoder.layers.0``, ``blocks.1``,
``encoder.layer.3``). Re-runnable blocks: ``nn.TransformerEncoderLayer``, the
divided space-time block of :mod:`attnlab.models.spacetime` (time then space
attention through ``AttentionProbs``, called as ``block(cls, x)``) and Hugging Face
layers holding one self-attention module (BERT/RoBERTa/ViT-style). The re-run
replicates the block's input ``R`` times (``R`` columns ``j`` at once) in chunks that
keep about :data:`MEMORY_BUDGET` float elements alive.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.capture import AttentionRecorder, recordable_modules
from attnlab.devices import model_device

__all__ = ["block_edges", "zero_keys", "find_blocks", "value_zeroing_maps", "value_zeroing",
           "knockout_importance", "MEMORY_BUDGET"]

#: float elements a replicated block re-run may hold at once (about 256 MB in float32)
MEMORY_BUDGET = 1 << 26

Run = Callable[[], Tensor]


# --------------------------------------------------------------------------- edits
def zero_keys(probs_bhqk: Tensor, keep_bk: Tensor) -> Tensor:
    """Value zeroing of keys: ``probs [B, H, Lq, Lk] · keep [B, Lk]`` broadcast over heads
    and queries (``keep`` 0 at the zeroed keys, 1 elsewhere); rows are not renormalised."""
    return probs_bhqk * keep_bk.to(probs_bhqk.dtype)[:, None, None, :]


def block_edges(probs: Tensor, blocked: Tensor) -> Tensor:
    """Attention knockout: the probabilities ``[..., Lq, Lk]`` with the ``blocked`` edges
    (bool, broadcastable to ``probs``) set to 0 and each row renormalised to sum to what
    it summed to before — the softmax of the scores with ``-inf`` on the blocked edges.
    A row whose every unblocked edge has probability 0 is left as it was (nothing to
    renormalise onto; callers keep each query's own diagonal edge, so self-attention
    rows never empty)."""
    kept = probs.masked_fill(blocked, 0.0)
    before = probs.sum(-1, keepdim=True)
    after = kept.sum(-1, keepdim=True)
    return torch.where(after > 0, kept * (before / after.clamp_min(torch.finfo(probs.dtype).tiny)), probs)


# --------------------------------------------------------------------------- blocks
def _is_divided_block(block: nn.Module) -> bool:
    """The divided space-time block of :mod:`attnlab.models.spacetime` (by its parts: this
    layer may not import the models)."""
    return (isinstance(getattr(block, "attn_time", None), nn.Module)
            and isinstance(getattr(block, "attn_space", None), nn.Module)
            and list(inspect.signature(block.forward).parameters)[:2] == ["cls_b1d", "x_bfpd"])


def _block_kind(name: str, block: nn.Module, attention: list[str]) -> str:
    if isinstance(block, nn.TransformerEncoderLayer):
        return "encoder_layer"
    if _is_divided_block(block):
        return "divided"
    if type(block).__module__.startswith("transformers.models.") and len(attention) == 1:
        return "hf"
    raise ValueError(f"value zeroing: module {name!r} ({type(block).__name__}) holds the attention module(s) "
                     f"{', '.join(map(repr, attention))} but is not a block it can re-run; supported: "
                     "nn.TransformerEncoderLayer, attnlab's divided space-time block and Hugging Face layers with "
                     "one self-attention module (BERT/RoBERTa/ViT-style)")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str, list[str]]]:
    """``[(block name, block, kind, [its recordable attention modules])]`` in module order:
    the block of each attention module is its nearest enclosing element of an
    ``nn.ModuleList``/``nn.Sequential``; ``kind`` is ``"encoder_layer"``, ``"divided"``
    or ``"hf"``. ``ValueError`` naming the module when an attention module has no such
    block or its block is not one value zeroing can re-run."""
    mods = dict(model.named_modules())
    blocks: dict[str, list[str]] = {}
    for att in recordable_modules(model):
        parts = att.split(".")
        found = None
        for cut in range(len(parts) - 1, 0, -1):
            parent = mods[".".join(parts[:cut - 1])]
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                found = ".".join(parts[:cut])
                break
        if found is None:
            raise ValueError(f"value zeroing: attention module {att!r} ({type(mods[att]).__name__}) is not inside an "
                             "element of an nn.ModuleList/nn.Sequential (a layer stack), so it has no block to "
                             "re-run; supported: nn.TransformerEncoder layers, attnlab's divided space-time blocks, "
                             "Hugging Face encoder layers")
        blocks.setdefault(found, []).append(att)
    return [(n, mods[n], _block_kind(n, mods[n], atts), atts) for n, atts in blocks.items()]


def _cat(t: Tensor, copies: int, dim: int = 0) -> Tensor:
    """``copies`` copies of ``t`` along ``dim``, copy-major (copy ``r`` holds rows ``r·B .. r·B+B-1``)."""
    return t if copies == 1 else torch.cat([t] * copies, dim=dim)


class _Replay:
    """One recorded call of a block: re-runs it on ``R`` copies of its input, each copy
    with its own joint-token columns zeroed, and returns the tokens' outputs ``[R, B, N, D]``."""

    def __init__(self, name: str, block: nn.Module, kind: str, attention: list[str], model: nn.Module,
                 args: tuple, kwargs: dict):
        self.name, self.block, self.kind, self.attention, self.model = name, block, kind, attention, model
        self.args, self.kwargs = args, kwargs
        if kind == "encoder_layer":
            bound = inspect.signature(block.forward).bind(*args, **kwargs)
            self.kwargs = dict(bound.arguments)
            self.args = ()
            self.batch_dim = 0 if block.self_attn.batch_first else 1
            self.batch = self.kwargs["src"].shape[self.batch_dim]
        else:
            self.batch = args[0].shape[0] if args else next(v for v in kwargs.values()
                                                            if isinstance(v, Tensor)).shape[0]
        self.frames = self.patches = None
        if kind == "divided":
            self.frames, self.patches = args[1].shape[1], args[1].shape[2]

    def _inputs(self, copies: int) -> tuple[tuple, dict]:
        b = self.batch
        if self.kind == "encoder_layer":
            kw = dict(self.kwargs)
            kw["src"] = _cat(kw["src"], copies, self.batch_dim)
            if kw.get("src_key_padding_mask") is not None:
                kw["src_key_padding_mask"] = _cat(kw["src_key_padding_mask"], copies)
            if isinstance(kw.get("src_mask"), Tensor) and kw["src_mask"].dim() == 3:   # [B·H, L, L]
                kw["src_mask"] = _cat(kw["src_mask"], copies)
            return (), kw
        rep = (lambda v: _cat(v, copies) if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == b else v)
        return tuple(rep(a) for a in self.args), {k: rep(v) for k, v in self.kwargs.items()}

    def _tokens(self, out: Any, copies: int) -> Tensor:
        b = self.batch
        if self.kind == "divided":
            cls, x = out
            tokens = torch.cat([cls, x.flatten(1, 2)], dim=1)            # [R·B, 1+F·P, D]
        else:
            tokens = out[0] if isinstance(out, (tuple, list)) else out
            if self.kind == "encoder_layer" and self.batch_dim == 1:
                tokens = tokens.transpose(0, 1)                           # [L, R·B, D] -> [R·B, L, D]
        return tokens.reshape(copies, b, *tokens.shape[1:])

    def _edit(self, keep_rn: Tensor) -> Callable[[str, int, Tensor], Tensor]:
        """The recorder edit zeroing, in copy ``r``, the joint tokens where ``keep_rn[r]`` is 0."""
        copies, b = keep_rn.shape[0], self.batch
        if self.kind != "divided":
            def edit(name: str, call: int, probs: Tensor) -> Tensor:
                if probs.shape[-1] != keep_rn.shape[1]:
                    raise ValueError(f"value zeroing: {name!r} attends over {probs.shape[-1]} keys but its block "
                                     f"{self.name!r} has {keep_rn.shape[1]} tokens (extra key columns such as "
                                     "add_bias_kv are not supported)")
                p = probs.reshape(copies, b, *probs.shape[1:])           # [R, B, H, Lq, Lk]
                return (p * keep_rn.to(p.dtype)[:, None, None, None, :]).reshape(probs.shape)
            return edit
        f, n_p = self.frames, self.patches
        patches = keep_rn[:, 1:].reshape(copies, f, n_p)                 # [R, F, P]
        keep_time = patches.transpose(1, 2)                              # [R, P, F]: key frame f of patch p
        keep_space = torch.cat([keep_rn[:, :1, None].expand(copies, f, 1), patches], dim=2)   # [R, F, 1+P]

        def edit(name: str, call: int, probs: Tensor) -> Tensor:
            keep, groups = (keep_time, n_p) if call % 2 == 0 else (keep_space, f)
            p = probs.reshape(copies, b, groups, *probs.shape[1:])      # [R, B, P|F, H, Lq, Lk]
            return (p * keep.to(p.dtype)[:, None, :, None, None, :]).reshape(probs.shape)
        return edit

    def run(self, keep_rn: Tensor) -> Tensor:
        """Outputs ``[R, B, N, D]`` of the block with copy ``r``'s zeroed tokens (``keep_rn [R, N]``)."""
        copies = keep_rn.shape[0]
        args, kwargs = self._inputs(copies)
        with AttentionRecorder(self.model, modules=self.attention, layers=[0], edit=self._edit(keep_rn)):
            out = self.block(*args, **kwargs)
        return self._tokens(out, copies)


def _capture_blocks(model: nn.Module, run: Run) -> list[_Replay]:
    """Every call of a block during ``run()``, with its inputs, in call order."""
    blocks = find_blocks(model)
    calls: list[_Replay] = []
    handles = []
    for name, block, kind, atts in blocks:
        def hook(module, args, kwargs, name=name, block=block, kind=kind, atts=atts):
            calls.append(_Replay(name, block, kind, atts, model, args, kwargs))
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        # recorded, as the explained forward is: the same (non-fused) path, no nested tensors
        with AttentionRecorder(model, layers=[0]):
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


@torch.no_grad()
def value_zeroing_maps(model: nn.Module, run: Run, *, memory: int = MEMORY_BUDGET) -> list[Tensor]:
    """Value-zeroing maps of one batch, one ``[B, N, N]`` per block call (in call order):
    ``C[b, i, j]`` = cosine distance between token ``i``'s block output with token ``j``'s
    value vector zeroed (in every head and every attention of the block) and without,
    rows normalised to sum 1 (all-zero rows stay zero). Each block is re-run from the
    input it received during ``run()`` (one forward of the batch, e.g.
    ``lambda: model(x)``), so layer ``l``'s map is independent of the others.

    ``N`` is the block's token count: the sequence (with its class token, if any) for
    encoder layers, the joint ``1 + F·P`` tokens (class token first, then frame-major
    patches) for the divided space-time block, where token ``j``'s value is zeroed in
    its time attention (``j = (f, p)``: key frame ``f`` of patch ``p``) and space
    attention (key ``1+p`` of frame ``f``; the class token: key 0 of every frame).

    Cost: ``N`` re-runs of each block per sample (``R`` at once, see :data:`MEMORY_BUDGET`).
    The model runs in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        replays = _capture_blocks(model, run)
        maps = []
        for rp in replays:
            ref = rp.run(torch.ones(1, 1, device=model_device(model)).expand(1, _n_tokens(rp)))[0]   # [B, N, D]
            n_tok = ref.shape[1]
            per_copy = ref.numel() * 16 + _attention_numel(rp) * 4
            chunk = max(1, min(n_tok, memory // max(per_copy, 1)))
            dist = ref.new_zeros(ref.shape[0], n_tok, n_tok)                                 # [B, N(i), N(j)]
            for start in range(0, n_tok, chunk):
                cols = torch.arange(start, min(start + chunk, n_tok), device=ref.device)
                keep = torch.ones(len(cols), n_tok, device=ref.device)
                keep[torch.arange(len(cols), device=ref.device), cols] = 0
                out = rp.run(keep)                                                           # [R, B, N, D]
                # in float64: 1 - cos of nearly parallel float32 vectors would lose most digits
                d = (1 - F.cosine_similarity(out.double(), ref[None].double(), dim=-1)).clamp_min(0).to(dist.dtype)
                d = torch.where((out != ref[None]).any(-1), d, 0.0)                          # unchanged: exactly 0
                dist[:, :, start:start + len(cols)] = d.permute(1, 2, 0)
            maps.append(dist / dist.sum(-1, keepdim=True).clamp_min(torch.finfo(dist.dtype).tiny))
        return maps
    finally:
        model.train(was_training)


def _n_tokens(rp: _Replay) -> int:
    if rp.kind == "divided":
        return 1 + rp.frames * rp.patches
    if rp.kind == "encoder_layer":
        return rp.kwargs["src"].shape[1 - rp.batch_dim]
    first = rp.args[0] if rp.args else next(v for v in rp.kwargs.values() if isinstance(v, Tensor))
    return first.shape[1]


def _attention_numel(rp: _Replay) -> int:
    """Float elements of the block's attention probabilities per copy of the batch (one re-run)."""
    n = _n_tokens(rp)
    heads = max([getattr(m, "num_heads", 0) or getattr(m, "nhead", 0) or 8
                 for m in (rp.block.get_submodule(a[len(rp.name) + 1:]) for a in rp.attention)] + [8])
    if rp.kind == "divided":
        f, p = rp.frames, rp.patches
        return rp.batch * heads * (p * f * f + f * (1 + p) ** 2) * 3
    return rp.batch * heads * n * n * 3


def value_zeroing(model: nn.Module, run: Run, how: str | int | Tensor, *, memory: int = MEMORY_BUDGET) -> Tensor:
    """Value zeroing rolled out over the blocks and read out: ``[B, N]`` relevance of each
    input token for the explained output (``how``: ``"cls"``, ``"mean"``, a token index or
    int64 ``[B]`` rows; see :func:`~attnlab.explain.readout`).
    ``R = C_L ⋯ C_1`` over the maps of :func:`value_zeroing_maps` (no residual term)."""
    from .readout import readout
    from .rollout import rollout

    return readout(rollout(value_zeroing_maps(model, run, memory=memory), residual=False), how)


# --------------------------------------------------------------------------- knockout
RunRows = Callable[[Tensor], Tensor]


@torch.no_grad()
def knockout_importance(model: nn.Module, run: Run, target: Tensor, *, spacetime: bool = False,
                        run_rows: RunRows | None = None, memory: int = MEMORY_BUDGET) -> Tensor:
    """Attention knockout of every token: ``[B, N]`` (``[B, F·P]`` with ``spacetime``), the drop of the explained
    logit ``run()[b, target[b]]`` when every attention edge into token ``j`` from another query is blocked in
    every layer (and head), each query's own diagonal edge kept (:func:`block_edges`). Negative drops
    (blocking raises the logit) are returned as they are.

    Sequence models: every recorded call must be self-attention over the same ``N``
    tokens. Divided space-time models (calls alternate time ``[B·P, H, F, F]`` and space
    ``[B·F, H, 1+P, 1+P]``, as :func:`~attnlab.explain.split_spacetime` reads them): item
    ``(f, p)`` loses its key frame ``f`` in patch ``p``'s time attention and its key
    ``1 + p`` in frame ``f``'s space attention (the class token's copies included).

    ``run_rows(idx)``: the logits of the batch's rows ``idx`` (int64 ``[R]``, repeats
    allowed) run as one batch of ``R`` inputs, e.g. ``lambda idx: model(x[idx])``. With
    it, ``C`` tokens are knocked out at once on ``C`` copies of the batch (copy ``c``
    blocks its own token; ``C`` keeps about ``memory`` float elements of attention alive);
    without it, one forward of the batch per token.

    Cost: ``N`` (or ``F·P``) forwards of the batch. The model runs in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with AttentionRecorder(model) as rec:
            base = run()
        target = target.to(base.device)
        b = base.shape[0]
        base = base.gather(1, target[:, None])[:, 0]
        shapes = [a.shape for a in rec.attentions]
        del rec
        if not spacetime:
            n_tok = shapes[0][-1]
            bad = [s for s in shapes if s[-1] != n_tok or s[-2] != n_tok]
            if bad:
                raise ValueError(f"knockout: attention calls of shapes {sorted({tuple(s) for s in shapes})}; "
                                 "expected self-attention over the same tokens in every call")
            items, grid = n_tok, None
        else:
            if len(shapes) % 2:
                raise ValueError(f"knockout: {len(shapes)} attention calls; a divided space-time model makes "
                                 "two per block (time, then space)")
            grid = shapes[0][-1], shapes[1][-1] - 1     # frames, patches: time [B·P, H, F, F], space [B·F, H, 1+P, 1+P]
            items = grid[0] * grid[1]
        per_copy = 4 * sum(int(torch.Size(s).numel()) for s in shapes)
        chunk = 1 if run_rows is None else max(1, min(items, memory // max(per_copy, 1)))
        rows = torch.arange(b, device=base.device)
        drops = []
        for start in range(0, items, chunk):
            tokens = torch.arange(start, min(start + chunk, items), device=base.device)
            with AttentionRecorder(model, layers=[0], edit=_knockout_edit(tokens, b, grid)):
                out = run() if run_rows is None else run_rows(rows.repeat(len(tokens)))   # copy-major
            kept = out.gather(1, target.repeat(len(tokens))[:, None])[:, 0].reshape(len(tokens), b)
            drops.append(base[None] - kept)
        return torch.cat(drops).T.contiguous()
    finally:
        model.train(was_training)


def _knockout_edit(tokens: Tensor, batch: int, grid: tuple[int, int] | None) -> Callable[[str, int, Tensor], Tensor]:
    """The edit blocking, in copy ``c`` of the batch (``len(tokens)`` copies, copy-major), every edge into
    token ``tokens[c]`` except its own diagonal one."""
    copies = len(tokens)
    masks: dict[tuple, Tensor] = {}            # one per call kind and device: every layer blocks the same edges

    def blocked_of(probs: Tensor, groups: int, group: Tensor, key: Tensor) -> Tensor:
        """``[C, 1, groups, 1, n, n]``: in copy ``c``, group ``group[c]``'s column ``key[c]`` (not its diagonal)."""
        n = probs.shape[-1]
        cached = masks.get((groups, n, probs.device))
        if cached is None:
            c = torch.arange(copies, device=probs.device)
            group, key = group.to(probs.device), key.to(probs.device)
            m = torch.zeros(copies, groups, n, n, dtype=torch.bool, device=probs.device)
            m[c, group, :, key] = True
            m[c, group, key, key] = False
            masks[groups, n, probs.device] = cached = m[:, None, :, None]
        return cached

    if grid is None:
        def sequence(name: str, call: int, probs: Tensor) -> Tensor:
            shaped = probs.reshape(copies, batch, 1, *probs.shape[1:])             # [C, B, 1, H, n, n]
            return block_edges(shaped, blocked_of(probs, 1, torch.zeros_like(tokens), tokens)).reshape(probs.shape)
        return sequence
    frames, patches = grid
    f, p = tokens // patches, tokens % patches

    def divided(name: str, call: int, probs: Tensor) -> Tensor:
        if call % 2 == 0:                                       # time [C·B·P, H, F, F]: patch p, key frame f
            groups, group, key = patches, p, f
        else:                                                   # space [C·B·F, H, 1+P, 1+P]: frame f, key 1+p
            groups, group, key = frames, f, 1 + p
        shaped = probs.reshape(copies, batch, groups, *probs.shape[1:])            # [C, B, groups, H, n, n]
        return block_edges(shaped, blocked_of(probs, groups, group, key)).reshape(probs.shape)

    return divided
