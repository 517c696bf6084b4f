"""ALTI: Aggregation of Layer-wise Token-to-token Interactions (Ferrando, Gállego &
Costa-jussà, 2022, "Measuring the Mixing of Contextual Information in the Transformer",
EMNLP 2022, arXiv:2203.04212).

An attention block — multi-head attention with its output projection and biases, the
residual connection and the layer norm — is written as a sum over input tokens: the
output of token ``i`` is ``y_i = Σ_j T_i(x_j) + ε_i``, where the *transformed vector*
``T_i(x_j)`` depends on input ``x_j`` alone (given the attention weights) and ``ε_i``
gathers the terms of no token. Token ``j`` contributes to ``y_i`` as much as
``T_i(x_j)`` is close to ``y_i`` in Manhattan (L1) distance; the per-layer matrices of
contributions are multiplied over the layers, as attention rollout multiplies attention.

Notation (paper §2–3, in the order it builds them; the equation numbers of the PDF are
not reproduced here because the text was not at hand to check them — the quantities are
named instead):

* multi-head attention: ``o_i = Σ_h W_O^h Σ_j α^h_ij v^h_j + b_O`` with the value vectors
  ``v^h_j = W_V^h x_j + b_V^h`` (``W_O^h``: head ``h``'s block of columns of the output
  projection);
* layer norm: ``LN(u) = γ ⊙ (u − mean(u)) / σ(u) + β`` with ``σ(u) = sqrt(var(u) + eps)``
  (biased variance, as ``nn.LayerNorm``), linearised per token: for the output token
  ``i`` the scale ``1/σ(ỹ_i)`` of the actual pre-norm vector ``ỹ_i`` is fixed, and
  ``u ↦ γ ⊙ (u − mean(u)) / σ(ỹ_i)`` is linear (the centering matrix ``L = I − 11ᵀ/d``
  then ``diag(γ)``), so it distributes over the sum of the block;
* **post-LN** block ``y_i = LN(x_i + o_i)`` (BERT, ``nn.TransformerEncoderLayer`` with
  ``norm_first=False``): the transformed vectors are
  ``T_i(x_j) = γ ⊙ L(Σ_h α^h_ij W_O^h v^h_j + δ_ij x_i) / σ(ỹ_i)`` — the residual enters
  only ``T_i(x_i)`` — and ``ε_i = γ ⊙ L b_O / σ(ỹ_i) + β`` (the output bias and the norm's
  shift belong to no token; the value bias ``b_V`` travels with its token's value vector,
  as in the authors' implementation, whose value vectors are the value projection's
  outputs);
* **pre-LN** block ``y_i = x_i + o_i`` with the attention on ``LN(x)`` (``norm_first=True``,
  the divided space-time blocks): the norm acts on each input token by itself, so it is
  exact, not linearised — ``v^h_j = W_V^h LN(x_j) + b_V^h`` is a function of ``x_j``
  alone — and ``T_i(x_j) = Σ_h α^h_ij W_O^h v^h_j + δ_ij x_i``, ``ε_i = b_O`` (as the
  authors' follow-up code treats pre-LN models: no norm after the sum, ``b_O`` apart);
* contributions (§3, "measuring" the interactions): with the Manhattan distance
  ``d_ij = ‖y_i − T_i(x_j)‖₁``,
  ``c_ij = max(0, ‖y_i‖₁ − d_ij) / Σ_k max(0, ‖y_i‖₁ − d_ik)``
  (a row whose every entry is 0 stays 0);
* aggregation (§3, ALTI): ``C = C^L · C^{L−1} ⋯ C^1`` — row ``i`` of ``C`` is how much each
  input token contributes to token ``i`` after the last block. The MLP after each
  attention block is not decomposed (it acts on each token by itself).

Functions here are pure maths on tensors: :func:`attention_probs`,
:func:`transformed_vectors`, :func:`contributions`, :func:`alti_rollout`; the model
side (reading the blocks' inputs out of one forward of a model) is :func:`alti_layers`
and :func:`block_contributions`, which hook the supported blocks for one forward and
remove the hooks afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from attnlab.capture import additive_mask

__all__ = ["BlockWeights", "block_weights", "attention_probs", "transformed_vectors", "contributions", "alti_rollout",
           "block_contributions", "alti_layers", "SUPPORTED"]

#: What the model side decomposes (the error of an unsupported model repeats it).
SUPPORTED = ("nn.TransformerEncoderLayer (post-LN and pre-LN), Hugging Face BERT-style attention "
             "(BertAttention: self-attention + dense/LayerNorm output) and the project's divided "
             "space-time blocks")

#: Entries of the [chunk, N, N, D] tensor of transformed vectors built at once (~128 MB in float32).
_CHUNK_ELEMENTS = 32 * 1024 * 1024


# --------------------------------------------------------------------------- the maths
@dataclass(frozen=True)
class BlockWeights:
    """The weights of one attention block (``D`` = model width, ``H`` heads of ``D/H``).

    ``w_q``, ``w_k``, ``w_v``: ``[D, D]`` (``nn.Linear`` layout: out × in), biases ``[D]``
    or None; ``w_o`` ``[D, D]`` the output projection, ``b_o`` ``[D]`` or None; ``scale``
    multiplies ``q·k``; ``norm`` = ``(γ [D] or None, β [D] or None, eps)`` the block's
    layer norm; ``norm_first`` says where it sits (see the module docstring)."""

    w_q: Tensor
    b_q: Tensor | None
    w_k: Tensor
    b_k: Tensor | None
    w_v: Tensor
    b_v: Tensor | None
    w_o: Tensor
    b_o: Tensor | None
    heads: int
    scale: float
    norm: tuple[Tensor | None, Tensor | None, float]
    norm_first: bool


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def _layer_norm(x: Tensor, norm: tuple[Tensor | None, Tensor | None, float]) -> Tensor:
    gamma, beta, eps = norm
    return torch.nn.functional.layer_norm(x, x.shape[-1:], None if gamma is None else gamma.to(x.dtype),
                                          None if beta is None else beta.to(x.dtype), eps)


def attention_probs(block: BlockWeights, x_bnd: Tensor, mask_add: Tensor | None = None) -> Tensor:
    """The block's attention weights ``α`` ``[B, H, N, N]`` (rows over keys) on its input
    ``x [B, N, D]`` (the layer-normed input for a pre-LN block is taken here);
    ``mask_add`` is added to the scores (``[B or 1, H or 1, N, N]``, ``-inf`` = masked)."""
    h = _layer_norm(x_bnd, block.norm) if block.norm_first else x_bnd
    b, n, d = h.shape
    split = lambda t: t.reshape(b, n, block.heads, d // block.heads).transpose(1, 2)  # noqa: E731  [B, H, N, Dh]
    q, k = split(_linear(h, block.w_q, block.b_q)), split(_linear(h, block.w_k, block.b_k))
    scores = (q * block.scale) @ k.transpose(-2, -1)                  # [B, H, N, N]
    if mask_add is not None:
        scores = scores + mask_add.to(scores.dtype)
    return scores.softmax(-1)


def _head_values(block: BlockWeights, x_bnd: Tensor) -> Tensor:
    """``W_O^h v^h_j`` ``[B, H, N, D]``: each head's value vector of each token through its
    block of the output projection (value bias included, output bias not)."""
    h = _layer_norm(x_bnd, block.norm) if block.norm_first else x_bnd
    b, n, d = h.shape
    dh = d // block.heads
    v = _linear(h, block.w_v, block.b_v).reshape(b, n, block.heads, dh)          # [B, N, H, Dh]
    w_o = block.w_o.to(h.dtype).reshape(d, block.heads, dh)                       # [D_out, H, Dh]
    return torch.einsum("bnhe,dhe->bhnd", v, w_o)


def transformed_vectors(block: BlockWeights, x_bnd: Tensor, probs_bhnn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The decomposition ``y_i = Σ_j T_i(x_j) + ε_i`` of one attention block.

    Args:
        block: the block's weights (:class:`BlockWeights`).
        x_bnd: the block's input ``[B, N, D]`` (the residual stream before the block).
        probs_bhnn: its attention weights ``[B, H, N, N]`` (:func:`attention_probs`).

    Returns:
        ``(T [B, N, N, D], eps [B, N, D], y [B, N, D])``: ``T[b, i, j] = T_i(x_j)``, the
        terms of no token ``ε_i``, and the block's output ``y = T.sum(2) + eps`` (the
        layer norm's output for a post-LN block, ``x + attention`` for a pre-LN one).
    """
    b, n, d = x_bnd.shape
    f = _head_values(block, x_bnd)                                                # [B, H, N, D]
    probs = probs_bhnn.to(f.dtype)
    b_o = (torch.zeros(d, dtype=f.dtype, device=f.device) if block.b_o is None else block.b_o.to(f.dtype))
    resid = x_bnd.to(f.dtype)
    if block.norm_first:
        eps = b_o.expand(b, n, d)
    else:
        # The linearised norm γ ⊙ L(·) / σ(ỹ_i) is applied before the sum over heads: L and
        # γ to each head's vector W_O^h v^h_j (and to x_i), 1/σ(ỹ_i) to the row i of α.
        gamma, beta, ln_eps = block.norm
        gamma = torch.ones(d, dtype=f.dtype, device=f.device) if gamma is None else gamma.to(f.dtype)
        pre = resid + torch.einsum("bhij,bhjd->bid", probs, f) + b_o             # ỹ = x + attention  [B, N, D]
        inv_sigma = (pre.var(-1, unbiased=False, keepdim=True) + ln_eps).rsqrt()  # 1/σ(ỹ_i)  [B, N, 1]
        centred = lambda v: (v - v.mean(-1, keepdim=True)) * gamma               # noqa: E731  γ ⊙ L v
        f, resid = centred(f), centred(resid) * inv_sigma
        probs = probs * inv_sigma[:, None]                                         # α^h_ij / σ(ỹ_i)
        eps = centred(b_o) * inv_sigma
        if beta is not None:
            eps = eps + beta.to(f.dtype)
    # T[b, i, j] = Σ_h probs[b, h, i, j] · f[b, h, j]: one [N_i, H] @ [H, D] product per (b, j)
    heads = probs.shape[1]
    t = torch.bmm(probs.permute(0, 3, 2, 1).reshape(b * n, n, heads), f.permute(0, 2, 1, 3).reshape(b * n, heads, d))
    t = t.reshape(b, n, n, d).transpose(1, 2).contiguous()                       # [B, N_i, N_j, D]
    diag = torch.arange(n, device=x_bnd.device)
    t[:, diag, diag] += resid                                                     # the residual: T_i(x_i) only
    return t, eps, t.sum(2) + eps


def contributions(t_bnnd: Tensor, y_bnd: Tensor) -> Tensor:
    """``c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁)``, rows normalised to sum 1 ``[B, N, N]``
    (a row of zeros stays zero)."""
    b, n, _, dim = t_bnnd.shape
    y = y_bnd.reshape(b * n, 1, dim)
    d = torch.cdist(y, t_bnnd.reshape(b * n, n, dim), p=1).reshape(b, n, n)
    # ‖y_i‖₁ by the same kernel, so that a token whose T_i(x_j) is 0 (a masked key) gets exactly 0
    norm_y = torch.cdist(y, torch.zeros_like(y), p=1).reshape(b, n, 1)
    c = (norm_y - d).clamp_min(0)
    return c / c.sum(-1, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)


def alti_rollout(layers: Sequence[Tensor]) -> Tensor:
    """``C^L ⋯ C^1`` ``[B, N, N]`` of per-layer contribution matrices ``C^l`` ``[B, N, N]``
    (first layer first): row ``i`` = each input token's contribution to token ``i``."""
    if isinstance(layers, Tensor) or not layers:
        raise ValueError("layers must be a non-empty list of per-layer [B, N, N] contribution matrices")
    joint = layers[0]
    for c in layers[1:]:
        if c.shape != joint.shape:
            raise ValueError(f"contribution matrices of shapes {tuple(joint.shape)} and {tuple(c.shape)}: "
                             "every layer needs the same [B, N, N]")
        joint = c @ joint
    return joint


def block_contributions(block: BlockWeights, x_bnd: Tensor, mask_add: Tensor | None = None,
                        out_check: Tensor | None = None, check: str = "attention", where: str = "") -> Tensor:
    """One block's contribution matrix ``[B, N, N]``, in batch chunks that keep the
    transformed vectors ``[chunk, N, N, D]`` to about 128 MB.

    ``out_check`` (optional, ``[B, N, D]``): what the model computed — its attention
    output ``o`` (``check="attention"``: an ``nn.MultiheadAttention``'s or a space-time
    stage's output, before residual and norm) or the block's output ``y``
    (``check="block"``: BERT's post-LN attention output); a decomposition that does not
    reproduce it raises ``ValueError`` naming ``where``."""
    b, n, d = x_bnd.shape
    x = x_bnd.float()
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * n * d))
    out = []
    for s in range(0, b, chunk):
        xs = x[s:s + chunk]
        m = None if mask_add is None else (mask_add if mask_add.shape[0] == 1 else mask_add[s:s + chunk])
        probs = attention_probs(block, xs, m)
        t, eps, y = transformed_vectors(block, xs, probs)
        if out_check is not None:
            _check_output(block, xs, probs, y, out_check[s:s + chunk].float(), check, where)
        out.append(contributions(t, y))
    return torch.cat(out)


def _check_output(block: BlockWeights, x: Tensor, probs: Tensor, y: Tensor, actual: Tensor, what: str,
                  where: str) -> None:
    """``actual`` is the model's own attention output ``o`` (``what="attention"``) or block
    output ``y`` (``"block"``); raise unless the decomposition gives the same."""
    if what == "block":
        expected = y
    else:                                     # o = W_O · (α · V) + b_O, recomputed from the weights
        h = _layer_norm(x, block.norm) if block.norm_first else x
        b, n, d = h.shape
        v = _linear(h, block.w_v, block.b_v).reshape(b, n, block.heads, d // block.heads).transpose(1, 2)
        expected = _linear((probs @ v).transpose(1, 2).reshape(b, n, d), block.w_o, block.b_o)
    if actual.shape != expected.shape:
        raise ValueError(f"alti: {where} gave an output of shape {tuple(actual.shape)}; the decomposition "
                         f"expected {tuple(expected.shape)}")
    if not expected.numel():
        return
    err = (expected - actual).abs().nan_to_num(0.0).max()
    tol = 1e-3 * (1.0 + actual.abs().nan_to_num(0.0).max())
    if bool(err > tol):
        raise ValueError(f"alti: the decomposition of {where} does not reproduce its output (max error "
                         f"{float(err):.3g}); supported: {SUPPORTED}")


# --------------------------------------------------------------------------- model side
def _mha_weights(mha: nn.MultiheadAttention, norm: nn.LayerNorm, norm_first: bool, where: str) -> BlockWeights:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"alti: {where} ({type(mha).__name__}) uses kdim/vdim, add_bias_kv or add_zero_attn; "
                         f"supported: {SUPPORTED} with plain self-attention")
    d = mha.embed_dim
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, bk, bv = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(d)
    return BlockWeights(wq, bq, wk, bk, wv, bv, mha.out_proj.weight, mha.out_proj.bias, mha.num_heads,
                        (d // mha.num_heads) ** -0.5, (norm.weight, norm.bias, norm.eps), norm_first)


def _encoder_layer_weights(layer: nn.TransformerEncoderLayer, where: str) -> BlockWeights:
    return _mha_weights(layer.self_attn, layer.norm1, layer.norm_first, where)


def block_weights(module: nn.Module) -> BlockWeights:
    """The :class:`BlockWeights` of an ``nn.TransformerEncoderLayer`` or of a Hugging Face
    BERT-style attention module (``BertAttention``: ``self`` + ``output``)."""
    if isinstance(module, nn.TransformerEncoderLayer):
        return _encoder_layer_weights(module, type(module).__name__)
    if _is_bert_attention(module):
        return _bert_weights(module)
    raise ValueError(f"alti: no block weights for {type(module).__qualname__}; supported: {SUPPORTED}")


def _bert_weights(attn: nn.Module) -> BlockWeights:
    sa, out = attn.self, attn.output
    heads = sa.num_attention_heads
    scale = getattr(sa, "scaling", sa.attention_head_size ** -0.5)
    ln = out.LayerNorm
    return BlockWeights(sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias, sa.value.weight, sa.value.bias,
                        out.dense.weight, out.dense.bias, heads, float(scale), (ln.weight, ln.bias, ln.eps), False)


def _spacetime_weights(attn: nn.Module, norm: nn.LayerNorm) -> BlockWeights:
    d = attn.proj.in_features
    w, bias = attn.qkv.weight, attn.qkv.bias
    (wq, wk, wv), (bq, bk, bv) = w.split(d), ((None,) * 3 if bias is None else bias.split(d))
    return BlockWeights(wq, bq, wk, bk, wv, bv, attn.proj.weight, attn.proj.bias, attn.nhead, float(attn.scale),
                        (norm.weight, norm.bias, norm.eps), True)


def _is_bert_attention(m: nn.Module) -> bool:
    sa, out = getattr(m, "self", None), getattr(m, "output", None)
    return (type(m).__module__.startswith("transformers.") and not getattr(m, "is_cross_attention", False)
            and all(isinstance(getattr(sa, a, None), nn.Linear) for a in ("query", "key", "value"))
            and isinstance(getattr(out, "dense", None), nn.Linear)
            and isinstance(getattr(out, "LayerNorm", None), nn.LayerNorm))


def _is_divided_block(m: nn.Module) -> bool:
    return (type(m).__name__ == "DividedBlock"
            and all(isinstance(getattr(m, a, None), nn.LayerNorm) for a in ("norm_time", "norm_space"))
            and all(isinstance(getattr(getattr(m, a, None), "qkv", None), nn.Linear)
                    for a in ("attn_time", "attn_space")))


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of the supported blocks (kind: ``encoder``, ``bert``,
    ``spacetime``); a ``ValueError`` naming the first attention module outside them."""
    blocks = []
    for name, m in model.named_modules():
        if any(name.startswith(b + ".") for b, _, _ in blocks):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            _encoder_layer_weights(m, name)      # refuses kdim/vdim, bias_kv, zero_attn now
            blocks.append((name, m, "encoder"))
        elif _is_bert_attention(m):
            blocks.append((name, m, "bert"))
        elif _is_divided_block(m):
            blocks.append((name, m, "spacetime"))
    from attnlab.capture import recordable_modules

    covered = lambda n: any(n.startswith(b + ".") or n == b for b, _, _ in blocks)  # noqa: E731
    others = [n for n in recordable_modules(model) if not covered(n)]
    others += [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and not covered(n)]
    if others:
        name = others[0]
        m = model.get_submodule(name)
        raise ValueError(f"alti has no rule for module {name!r} ({type(m).__module__}.{type(m).__qualname__}); "
                         f"supported: {SUPPORTED}")
    if not blocks:
        raise ValueError(f"alti found no attention block in {type(model).__qualname__}; supported: {SUPPORTED}")
    return blocks


def _encoder_mask(layer: nn.TransformerEncoderLayer, b: int, n: int, src_mask, padding, is_causal,
                  device) -> Tensor | None:
    """The scores' mask ``[B or 1, H or 1, N, N]`` of one ``nn.TransformerEncoderLayer`` call."""
    heads = layer.self_attn.num_heads
    total = None
    attn = additive_mask(src_mask, torch.float32)
    if attn is None and is_causal:
        attn = torch.full((n, n), float("-inf"), device=device).triu(1)
    if attn is not None:
        total = attn[None, None] if attn.dim() == 2 else attn.reshape(b, heads, n, n)
    pad = additive_mask(padding, torch.float32)
    if pad is not None:
        pad = pad[:, None, None, :]
        total = pad if total is None else total + pad
    return total


def _bert_mask(attn: nn.Module, mask, n: int, device) -> Tensor | None:
    if mask is not None and not isinstance(mask, Tensor):
        raise ValueError(f"alti: a Hugging Face attention mask of type {type(mask).__name__} (flex attention?) "
                         "is not supported; use attn_implementation 'sdpa' or 'eager'")
    total = additive_mask(mask, torch.float32, allowed_true=True)
    if total is not None and total.dim() == 2:                     # [B, N] of 1/0 kept as given
        total = total[:, None, None, :]
    if getattr(attn.self, "is_causal", False) and mask is None:
        total = torch.full((n, n), float("-inf"), device=device).triu(1)[None, None]
    return total


def alti_layers(model: nn.Module, run: Callable[[], Any]) -> list[Any]:
    """Per attention block call of one forward ``run()`` of ``model`` (in call order),
    its contribution matrix: ``[B, N, N]`` for an encoder layer or BERT attention, or
    ``("spacetime", space [B, F, 1+P, 1+P], time [B, P, F, F])`` for a divided
    space-time block (row ``i`` = output token, column ``j`` = input token).

    ``run`` calls the model (e.g. the experiment's forward on a batch); it runs once,
    in eval mode without gradients, with the MHA fast path off (so
    ``nn.TransformerEncoder`` hands each layer padded tensors, never nested ones), forward
    pre-hooks on the supported blocks reading their inputs and forward hooks reading their
    attention outputs, all removed afterwards (and the mode and fast-path switch
    restored): the model is left exactly as it was. Each block's decomposition is checked
    against the output the model computed.

    Raises ``ValueError`` (one line, naming the module) when ``model`` holds an attention
    module of another kind, or holds no supported block.
    """
    blocks = _blocks(model)
    calls: list[dict[str, Any]] = []
    handles = []

    def pre(name, module, kind):
        def hook(mod, args, kwargs):
            calls.append({"name": name, "module": module, "kind": kind, "args": args, "kwargs": kwargs})
        return hook

    def keep(key):
        def hook(mod, args, out):
            calls[-1][key] = out[0] if isinstance(out, tuple) else out
        return hook

    try:
        for name, module, kind in blocks:
            handles.append(module.register_forward_pre_hook(pre(name, module, kind), with_kwargs=True))
            if kind == "encoder":
                handles.append(module.self_attn.register_forward_hook(keep("out")))
            elif kind == "bert":
                handles.append(module.register_forward_hook(keep("out")))
            else:
                handles.append(module.attn_time.register_forward_hook(keep("out_time")))
                handles.append(module.attn_space.register_forward_hook(keep("out_space")))
        was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                run()
        finally:
            model.train(was_training)
            torch.backends.mha.set_fastpath_enabled(fastpath)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        return [_call_contributions(c) for c in calls]


def _arg(call: dict[str, Any], index: int, key: str, default=None):
    args, kwargs = call["args"], call["kwargs"]
    return args[index] if len(args) > index else kwargs.get(key, default)


def _call_contributions(call: dict[str, Any]) -> Any:
    name, module, kind = call["name"], call["module"], call["kind"]
    where = f"{name!r} ({type(module).__name__})"
    if kind == "encoder":
        x = _arg(call, 0, "src")
        if x.is_nested:
            raise ValueError(f"alti: {where} received a nested tensor; run the encoder with the fast path off")
        first = module.self_attn.batch_first
        x = x if first else x.transpose(0, 1)                                # [B, N, D]
        b, n, _ = x.shape
        mask = _encoder_mask(module, b, n, _arg(call, 1, "src_mask"), _arg(call, 2, "src_key_padding_mask"),
                             bool(_arg(call, 3, "is_causal", False)), x.device)
        out = call.get("out")
        out = None if out is None else (out if first else out.transpose(0, 1))
        return block_contributions(_encoder_layer_weights(module, where), x, mask, out, "attention", where)
    if kind == "bert":
        x = _arg(call, 0, "hidden_states")
        mask = _bert_mask(module, _arg(call, 1, "attention_mask"), x.shape[1], x.device)
        return block_contributions(_bert_weights(module), x, mask, call.get("out"), "block", where)
    # divided space-time block: time attention (patches over frames), then space attention
    cls, x = _arg(call, 0, "cls_b1d"), _arg(call, 1, "x_bfpd")               # [B, 1, D], [B, F, P, D]
    b, f, p, d = x.shape
    xt = x.transpose(1, 2).reshape(b * p, f, d)                               # [B·P, F, D]
    time = block_contributions(_spacetime_weights(module.attn_time, module.norm_time), xt,
                               out_check=call.get("out_time"), where=f"{where} time attention")
    xt = xt + call["out_time"]
    x = xt.reshape(b, p, f, d).transpose(1, 2)
    xs = torch.cat([cls.unsqueeze(1).expand(b, f, 1, d), x], dim=2).reshape(b * f, 1 + p, d)
    space = block_contributions(_spacetime_weights(module.attn_space, module.norm_space), xs,
                                out_check=call.get("out_space"), where=f"{where} space attention")
    return ("spacetime", space.reshape(b, f, 1 + p, 1 + p), time.reshape(b, p, f, f))
