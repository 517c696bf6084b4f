"""AttnLRP: layer-wise relevance propagation through transformers (Achtibat et al., ICML 2024).

Written here from the paper's rules (the ``lxt`` package implements them too, but LRP is
patented for commercial use; ``lxt`` only served to read the rules). Every rule is
written as *gradient x input* with a modified backward pass: a tensor ``t`` carries the
relevance ``R_t = t ⊙ g_t`` where ``g_t`` is its modified gradient, so the relevance of
the whole model is **one forward and one backward**, batched.

The rules (``ε`` stabilises denominators: ``stab(z) = z + ε·sign(z)``, sign(0) = +1):

* linear maps (:func:`linear`, ``y = W x + b``): ε-LRP, ``R_x,i = Σ_j x_i W_ji R_j / stab(y_j)``;
  in gradient form the output's gradient is scaled by ``y / stab(y)``. The bias keeps
  its share ``Σ_j b_j R_j / stab(y_j)`` (absorbed, not passed down);
* additions of two tensors (:func:`add`, residual connections): ε-LRP the same way;
* element-wise non-linearities (:func:`identity_rule`, ReLU/GELU/SiLU/tanh): the identity
  rule ``R_x = R_y`` (gradient ``g_x = g_y · y / stab(x)``);
* LayerNorm / RMSNorm (:func:`layer_norm`, :func:`rms_norm`): the paper's identity rule on
  the normalisation, which in gradient x input form is the division by the standard
  deviation held constant (detached); what is left is linear (centring, scale, affine)
  and gets ε-LRP, its bias absorbing its share;
* softmax (:func:`softmax`): ``R_x,i = x_i (R_i − s_i Σ_j R_j)`` with ``x`` the softmax input
  (Proposition 3.1 of the paper, the linearisation of the softmax at ``x`` without its
  bias term). In gradient form this is the softmax's own gradient, so nothing is
  modified. It does **not** conserve: the linearisation's bias term
  ``Σ_j R_j − Σ_i R_x,i = Σ_j R_j − Σ_i (x_i − x̄) R_i`` (``x̄ = Σ_i s_i x_i``) stays behind;
* products of two inputs (:func:`matmul` for ``Q·Kᵀ`` and ``A·V``, :func:`product`):
  the uniform rule, half of the (ε-stabilised) relevance to each operand, e.g.
  ``R_A,ik = Σ_j A_ik V_kj R_ij / (2·stab(O_ij))``; it conserves.

Conservation: without biases every rule but the softmax passes its relevance on whole
(up to the ``ε`` terms), so the input relevance sums to the explained logit minus the
softmax deficits; with biases, minus the biases' shares as well.

:func:`attnlrp` explains a model whose transformer is built of supported blocks
(``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` used on its own, Hugging Face
``BertLayer``, the project's divided space-time ``DividedBlock``): it runs the model's own
forward with temporary forward hooks that replace each block's output by a
relevance-propagating forward written from the block's own weights (checked against
the block's own output to 1e-5), and returns the relevance at the transformer's input
(the first block's input). Nothing is left on the model.
"""
from __future__ import annotations

import inspect
import math
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.capture import additive_mask

__all__ = ["attnlrp", "linear", "add", "product", "matmul", "softmax", "identity_rule", "layer_norm", "rms_norm",
           "mha_block", "multihead_attention", "encoder_layer", "bert_layer", "divided_block", "SUPPORTED", "EPS"]

#: The default stabiliser ε of the ε-rules.
EPS = 1e-6
#: What :func:`attnlrp` can explain, for its error messages.
SUPPORTED = ("nn.TransformerEncoderLayer (relu/gelu/silu, post- or pre-norm, batch_first or not, any masks), "
             "nn.MultiheadAttention on its own, transformers BertLayer (encoder, absolute positions), attnlab's "
             "DividedBlock (models/spacetime.py); outside them nn.Linear, nn.LayerNorm, nn.RMSNorm, "
             "nn.ReLU/GELU/SiLU/Tanh, nn.Dropout, nn.Identity")
#: The tolerance of the check "the relevance forward reproduces the module's own output".
CHECK_TOL = 1e-5


# ============================================================================ the rules
def _stab(z: Tensor, eps: float) -> Tensor:
    """``z + ε·sign(z)`` with sign(0) = +1: a denominator that is never 0."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a fixed ``factor``."""

    @staticmethod
    def forward(ctx, y: Tensor, factor: Tensor | float) -> Tensor:
        ctx.factor = factor
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _epsilon(y: Tensor, eps: float, share: float = 1.0) -> Tensor:
    """``y`` whose relevance ``R_y`` is passed to its inputs as ``share · y / stab(y) · R_y / y``:
    the ε-rule (``share = 1``) or the uniform rule (``share = 1/2``) on whatever computed ``y``."""
    if not y.requires_grad:
        return y
    if eps == 0.0:
        return y if share == 1.0 else _ScaleGrad.apply(y, share)
    # y / stab(y) = |y| / (|y| + ε) (sign(0) = +1 makes both 0 at y = 0): three kernels
    a = y.detach().abs()
    factor = a.div_(a + eps)
    return _ScaleGrad.apply(y, factor.mul_(share) if share != 1.0 else factor)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = EPS) -> Tensor:
    """``F.linear(x, weight, bias)`` ``[..., out]`` under the ε-rule."""
    return _epsilon(F.linear(x, weight, bias), eps)


def add(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """``a + b`` under the ε-rule: ``R_a = a · R / stab(a + b)`` (residual connections)."""
    return _epsilon(a + b, eps)


def product(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """``a ⊙ b`` under the uniform rule: half of ``R`` to each factor."""
    return _epsilon(a * b, eps, 0.5)


def matmul(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """``a @ b`` under the uniform rule: ``R_a,ik = Σ_j a_ik b_kj R_ij / (2·stab(O_ij))``, the same for ``b``."""
    return _epsilon(a @ b, eps, 0.5)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax under AttnLRP's rule ``R_x,i = x_i (R_i − s_i Σ_j R_j)``; in gradient x input
    form that is exactly the softmax's gradient, so this is ``torch.softmax``."""
    return torch.softmax(x, dim=dim)


class _IdentityRule(torch.autograd.Function):
    """``fn(x)`` element-wise; backward ``g_x = g_y · y / stab(x)`` (``R_x = R_y``)."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(y / _stab(x, eps))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None, None


def identity_rule(fn: Callable[[Tensor], Tensor], x: Tensor, eps: float = 1e-10) -> Tensor:
    """``fn(x)`` for an element-wise non-linearity ``fn`` under the identity rule ``R_x = R_y``."""
    if not x.requires_grad:
        return fn(x)
    return _IdentityRule.apply(x, fn, eps)


def layer_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, ln_eps: float,
               eps: float = EPS) -> Tensor:
    """``nn.LayerNorm`` over the last ``len(shape)`` dims with the standard deviation held
    constant (detached): the rest is linear in ``x`` and gets the ε-rule."""
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + ln_eps).detach()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return _epsilon(y, eps)


def rms_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, norm_eps: float | None,
             eps: float = EPS) -> Tensor:
    """``nn.RMSNorm`` with the root mean square held constant (detached)."""
    dims = tuple(range(-len(shape), 0))
    norm_eps = torch.finfo(x.dtype).eps if norm_eps is None else norm_eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + norm_eps).detach()
    if weight is not None:
        y = y * weight
    return _epsilon(y, eps)


# ============================================================================ blocks
def _attention(q_bhld: Tensor, k_bhsd: Tensor, v_bhsd: Tensor, scale: float, mask: Tensor | None,
               eps: float) -> Tensor:
    """``softmax(q kᵀ · scale + mask) v`` ``[B, H, L, hd]`` with the uniform rule on both products."""
    scores = matmul(q_bhld, k_bhsd.transpose(-1, -2), eps) * scale          # [B, H, L, S]
    if mask is not None:
        scores = scores + mask
    return matmul(softmax(scores), v_bhsd, eps)


def mha_block(mha: nn.MultiheadAttention, q_bld: Tensor, attn_mask: Tensor | None,
              key_padding_mask: Tensor | None, eps: float = EPS, k_bsd: Tensor | None = None,
              v_bsd: Tensor | None = None) -> Tensor:
    """``nn.MultiheadAttention`` on batch-first ``query [B, L, D]`` (``key``/``value``
    ``[B, S, ·]``, default: the query: self-attention) -> ``[B, L, D]``.

    ``attn_mask`` ``[L, S]`` or ``[B·H, L, S]`` and ``key_padding_mask [B, S]``: boolean
    (True = masked) or additive, as ``nn.MultiheadAttention`` takes them."""
    k_bsd = q_bld if k_bsd is None else k_bsd
    v_bsd = k_bsd if v_bsd is None else v_bsd
    b, length, d = q_bld.shape
    s_len = k_bsd.shape[1]
    h = mha.num_heads
    hd = d // h
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    if k_bsd is q_bld and v_bsd is q_bld and mha._qkv_same_embed_dim:      # one matmul, as torch does
        q, k, v = linear(q_bld, mha.in_proj_weight, mha.in_proj_bias, eps).chunk(3, dim=-1)
    else:
        q, k, v = linear(q_bld, w_q, b_q, eps), linear(k_bsd, w_k, b_k, eps), linear(v_bsd, w_v, b_v, eps)
    split = lambda t: t.reshape(b, t.shape[1], h, hd).transpose(1, 2)       # noqa: E731  [B, H, ·, hd]
    mask = None
    am = additive_mask(attn_mask, q_bld.dtype)
    if am is not None:
        mask = am.view(b, h, length, s_len) if am.dim() == 3 else am
    kpm = additive_mask(key_padding_mask, q_bld.dtype)
    if kpm is not None:
        kpm = kpm.view(b, 1, 1, s_len)
        mask = kpm if mask is None else mask + kpm
    out = _attention(split(q), split(k), split(v), 1.0 / math.sqrt(hd), mask, eps)
    out = out.transpose(1, 2).reshape(b, length, d)
    return linear(out, mha.out_proj.weight, mha.out_proj.bias, eps)


def check_mha(mha: nn.MultiheadAttention, name: str) -> None:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"attnlrp: {name} ({type(mha).__name__}) uses add_bias_kv or add_zero_attn, which have "
                         "no LRP rule here; supported: " + SUPPORTED)


def multihead_attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                        eps: float = EPS) -> Tensor:
    """A call of ``nn.MultiheadAttention`` used on its own (``[L, B, D]`` unless
    ``batch_first``): its ``attn_output`` with the AttnLRP rules."""
    bf = (lambda t: t) if mha.batch_first else (lambda t: t.transpose(0, 1))  # noqa: E731
    same_k, same_v = key is query, value is key
    q = bf(query)
    k = q if same_k else bf(key)
    v = k if same_v else bf(value)
    return bf(mha_block(mha, q, attn_mask, key_padding_mask, eps, k, v))


_ACTIVATIONS = {F.relu: F.relu, F.gelu: F.gelu, F.silu: F.silu}
_ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh)


def _activation_fn(act: Any, where: str) -> Callable[[Tensor], Tensor]:
    if act in _ACTIVATIONS or isinstance(act, _ACTIVATION_MODULES):
        return act
    raise ValueError(f"attnlrp: {where} has activation {act!r}, which has no LRP rule here; "
                     f"supported: relu, gelu, silu (functions or modules), nn.Tanh")


def _norm(module: nn.Module, x: Tensor, eps: float) -> Tensor:
    if isinstance(module, nn.LayerNorm):
        return layer_norm(x, tuple(module.normalized_shape), module.weight, module.bias, module.eps, eps)
    if isinstance(module, nn.RMSNorm):
        return rms_norm(x, tuple(module.normalized_shape), module.weight, module.eps, eps)
    raise ValueError(f"attnlrp: normalisation {type(module).__name__} has no LRP rule; supported: "
                     "nn.LayerNorm, nn.RMSNorm")


def check_encoder_layer(layer: nn.TransformerEncoderLayer, name: str) -> None:
    """A ``ValueError`` naming ``name`` when ``layer`` has a part without a rule here."""
    check_mha(layer.self_attn, f"{name}.self_attn")
    _activation_fn(layer.activation, f"{name} ({type(layer).__name__})")
    for part in ("norm1", "norm2"):
        module = getattr(layer, part)
        if not isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            raise ValueError(f"attnlrp: {name}.{part} ({type(module).__name__}) has no LRP rule; "
                             "supported: nn.LayerNorm, nn.RMSNorm")


def encoder_layer(layer: nn.TransformerEncoderLayer, x: Tensor, src_mask: Tensor | None = None,
                  src_key_padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """``nn.TransformerEncoderLayer`` (eval mode: no dropout) with the AttnLRP rules; ``x`` is
    ``[B, L, D]`` if ``layer.self_attn.batch_first`` else ``[L, B, D]``, and so is the result."""
    batch_first = layer.self_attn.batch_first
    h = x if batch_first else x.transpose(0, 1)
    act = layer.activation

    def sa(t: Tensor) -> Tensor:
        return mha_block(layer.self_attn, t, src_mask, src_key_padding_mask, eps)

    def ff(t: Tensor) -> Tensor:
        t = identity_rule(act, linear(t, layer.linear1.weight, layer.linear1.bias, eps))
        return linear(t, layer.linear2.weight, layer.linear2.bias, eps)

    if layer.norm_first:
        h = add(h, sa(_norm(layer.norm1, h, eps)), eps)
        h = add(h, ff(_norm(layer.norm2, h, eps)), eps)
    else:
        h = _norm(layer.norm1, add(h, sa(h), eps), eps)
        h = _norm(layer.norm2, add(h, ff(h), eps), eps)
    return h if batch_first else h.transpose(0, 1)


_BERT_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
              "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
              "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}


def check_bert_layer(layer: nn.Module, name: str) -> None:
    cfg = layer.attention.self.config
    problems = []
    if getattr(cfg, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        problems.append("is a decoder / has cross-attention")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={cfg.position_embedding_type!r}")
    if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in _BERT_ACTS:
        problems.append(f"hidden_act={cfg.hidden_act!r} (supported: {', '.join(_BERT_ACTS)})")
    if problems:
        raise ValueError(f"attnlrp: {name} ({type(layer).__name__}) {'; '.join(problems)}: no LRP rule here; "
                         "supported: " + SUPPORTED)


def bert_layer(layer: nn.Module, x_bld: Tensor, attention_mask: Tensor | None, eps: float = EPS) -> Tensor:
    """A Hugging Face ``BertLayer`` (encoder, eval mode) on ``x [B, L, D]`` with the AttnLRP
    rules. ``attention_mask`` is what ``BertModel`` hands its layers: None, a boolean
    ``[B, 1, L, L]`` (True = may attend) or an additive float mask."""
    att, sa_out = layer.attention.self, layer.attention.output
    b, length, d = x_bld.shape
    h, hd = att.num_attention_heads, att.attention_head_size
    split = lambda t: t.reshape(b, length, h, hd).transpose(1, 2)           # noqa: E731  [B, H, L, hd]
    q = split(linear(x_bld, att.query.weight, att.query.bias, eps))
    k = split(linear(x_bld, att.key.weight, att.key.bias, eps))
    v = split(linear(x_bld, att.value.weight, att.value.bias, eps))
    mask = additive_mask(attention_mask, x_bld.dtype, allowed_true=True)
    ctx = _attention(q, k, v, att.scaling, mask, eps).transpose(1, 2).reshape(b, length, h * hd)
    ln1 = sa_out.LayerNorm
    a = linear(ctx, sa_out.dense.weight, sa_out.dense.bias, eps)
    a = layer_norm(add(a, x_bld, eps), tuple(ln1.normalized_shape), ln1.weight, ln1.bias, ln1.eps, eps)
    act = _BERT_ACTS[att.config.hidden_act]
    m = identity_rule(act, linear(a, layer.intermediate.dense.weight, layer.intermediate.dense.bias, eps))
    out, ln2 = layer.output, layer.output.LayerNorm
    m = linear(m, out.dense.weight, out.dense.bias, eps)
    return layer_norm(add(m, a, eps), tuple(ln2.normalized_shape), ln2.weight, ln2.bias, ln2.eps, eps)


def _spacetime_block_type() -> type | None:
    module = sys.modules.get("attnlab.models.spacetime")
    return getattr(module, "DividedBlock", None) if module is not None else None


def _self_attention(att: nn.Module, x_bld: Tensor, eps: float) -> Tensor:
    """:class:`attnlab.models.spacetime.SelfAttention` (no mask) on ``x [B', L, D]``."""
    b, length, d = x_bld.shape
    h = att.nhead
    qkv = linear(x_bld, att.qkv.weight, att.qkv.bias, eps).reshape(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                  # [B', H, L, hd]
    out = _attention(q, k, v, att.scale, None, eps).transpose(1, 2).reshape(b, length, d)
    return linear(out, att.proj.weight, att.proj.bias, eps)


def check_divided_block(block: nn.Module, name: str) -> None:
    if not isinstance(block.mlp.act, _ACTIVATION_MODULES):
        raise ValueError(f"attnlrp: {name}.mlp.act ({type(block.mlp.act).__name__}) has no LRP rule here; "
                         "supported: " + SUPPORTED)
    for part in ("norm_time", "norm_space", "norm_mlp"):
        if not isinstance(getattr(block, part), (nn.LayerNorm, nn.RMSNorm)):
            raise ValueError(f"attnlrp: {name}.{part} ({type(getattr(block, part)).__name__}) has no LRP rule; "
                             "supported: nn.LayerNorm, nn.RMSNorm")


def divided_block(block: nn.Module, cls_b1d: Tensor, x_bfpd: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """:class:`attnlab.models.spacetime.DividedBlock` (pre-norm: time attention over the
    frames of each patch, space attention over each frame's class-token copy and
    patches, MLP) with the AttnLRP rules: ``(cls [B, 1, D], x [B, F, P, D])`` -> the same.
    The class token's per-frame copies and their mean over frames are linear (plain
    gradient: the copies' relevance sums back to the class token)."""
    b, f, p, d = x_bfpd.shape
    xt = x_bfpd.transpose(1, 2).reshape(b * p, f, d)
    xt = add(xt, _self_attention(block.attn_time, _norm(block.norm_time, xt, eps), eps), eps)
    x = xt.reshape(b, p, f, d).transpose(1, 2)
    xs = torch.cat([cls_b1d.unsqueeze(1).expand(b, f, 1, d), x], dim=2).reshape(b * f, 1 + p, d)
    xs = add(xs, _self_attention(block.attn_space, _norm(block.norm_space, xs, eps), eps), eps)
    xs = xs.reshape(b, f, 1 + p, d)
    tokens = torch.cat([xs[:, :, 0].mean(dim=1, keepdim=True), xs[:, :, 1:].reshape(b, f * p, d)], dim=1)
    mlp = block.mlp
    m = identity_rule(mlp.act.forward, linear(_norm(block.norm_mlp, tokens, eps), mlp.fc1.weight, mlp.fc1.bias, eps))
    tokens = add(tokens, linear(m, mlp.fc2.weight, mlp.fc2.bias, eps), eps)
    return tokens[:, :1], tokens[:, 1:].reshape(b, f, p, d)


# ============================================================================ the model
def _bert_layer_type() -> type | None:
    module = sys.modules.get("transformers.models.bert.modeling_bert")
    return getattr(module, "BertLayer", None) if module is not None else None


def _leaf_rule(module: nn.Module, eps: float) -> Callable[[Tensor], Tensor] | None:
    """The relevance forward of a supported module met outside the blocks (None: passes through)."""
    if isinstance(module, nn.Linear):
        return lambda x: linear(x, module.weight, module.bias, eps)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return lambda x: _norm(module, x, eps)
    if isinstance(module, _ACTIVATION_MODULES):
        return lambda x: identity_rule(module.forward, x)     # .forward: not through this session's hooks
    return None


_PASS_THROUGH = (nn.Dropout, nn.Identity)


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None) if not isinstance(out, (tuple, list)) else None


def _replace_first(out: Any, new: Tensor) -> Any:
    if isinstance(out, Tensor):
        return new
    return (new, *out[1:]) if isinstance(out, tuple) else [new, *out[1:]]


def _check(name: str, module: nn.Module, mine: Tensor, native: Tensor) -> None:
    """The relevance forward must reproduce the module's own output (to :data:`CHECK_TOL`)."""
    if mine.shape != native.shape:
        raise ValueError(f"attnlrp: the relevance forward of {name} ({type(module).__name__}) gives shape "
                         f"{tuple(mine.shape)}, the module {tuple(native.shape)}")
    scale = max(1.0, float(native.detach().abs().amax()))
    err = float((mine.detach() - native.detach()).abs().nan_to_num(0.0).amax()) if native.numel() else 0.0
    if err > CHECK_TOL * scale:
        raise ValueError(f"attnlrp: the relevance forward of {name} ({type(module).__name__}) differs from the "
                         f"module's own output by {err:.3g} (> {CHECK_TOL:g} x {scale:.3g}); its forward has a "
                         "part this rule set does not know")


class _Session:
    """The hooks of one :func:`attnlrp` call: the relevance point, the replaced outputs and
    the unsupported modules the explained logit depends on."""

    def __init__(self, model: nn.Module, eps: float):
        self.model, self.eps = model, eps
        self.h0: Tensor | None = None           # the transformer's input, a leaf requiring grad
        self.batch_first = True
        self.grad_modes: list[bool] = []
        self.reached: list[str] = []
        bert, divided = _bert_layer_type(), _spacetime_block_type()
        self.blocks: dict[nn.Module, str] = {}
        self.encoders: dict[nn.Module, str] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.TransformerDecoderLayer):      # its functional parts would go unruled
                raise ValueError(f"attnlrp: {name} ({type(m).__name__}) has no LRP rules here; supported: "
                                 + SUPPORTED)
            if isinstance(m, nn.TransformerEncoderLayer):
                check_encoder_layer(m, name)
                self.blocks[m] = name
            elif bert is not None and isinstance(m, bert):
                check_bert_layer(m, name)
                self.blocks[m] = name
            elif divided is not None and isinstance(m, divided):
                check_divided_block(m, name)
                self.blocks[m] = name
        inside = {id(sub) for blk in self.blocks for sub in blk.modules()}
        for name, m in model.named_modules():       # attention used on its own, outside those blocks
            if isinstance(m, nn.MultiheadAttention) and id(m) not in inside:
                check_mha(m, name)
                self.blocks[m] = name
            elif isinstance(m, nn.TransformerEncoder):
                self.encoders[m] = name
        if not self.blocks:
            raise ValueError(f"attnlrp: {type(model).__name__} has no transformer block with LRP rules here; "
                             "supported: " + SUPPORTED)
        inside = {id(sub) for blk in self.blocks for sub in blk.modules()}
        self.leaves = {m: n for n, m in model.named_modules()
                       if id(m) not in inside and not list(m.children())}

    # -- the relevance point: the input of the first encoder / block that runs
    def _start(self, x: Tensor, batch_first: bool, dims: int = 3) -> Tensor:
        if x.is_nested or x.dim() != dims:
            raise ValueError(f"attnlrp: the transformer's input has shape {tuple(x.shape)}; expected a batched "
                             + ("[B, L, D] (or [L, B, D])" if dims == 3 else "[B, F, P, D]") + " tensor")
        self.h0 = x.detach().requires_grad_(True)
        self.batch_first = batch_first
        return self.h0

    def encoder_pre(self, module, args, kwargs):
        if self.h0 is not None or not args:
            return None
        first = module.layers[0] if len(module.layers) else None
        bf = getattr(getattr(first, "self_attn", None), "batch_first", True)
        return (self._start(args[0], bf), *args[1:]), kwargs

    @staticmethod
    def _input_name(module: nn.Module) -> str:
        """The argument of a block's forward that carries the tokens (the relevance point)."""
        if isinstance(module, nn.TransformerEncoderLayer):
            return "src"
        if isinstance(module, nn.MultiheadAttention):
            return "query"
        return "x_bfpd" if _spacetime_block_type() is not None and isinstance(module, _spacetime_block_type()) \
            else "hidden_states"

    def block_pre(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        key = self._input_name(module)
        x = bound.arguments[key]
        if self.h0 is None:
            bf = getattr(module if isinstance(module, nn.MultiheadAttention) else getattr(module, "self_attn", None),
                         "batch_first", True)
            h0 = self._start(x, bf, dims=4 if key == "x_bfpd" else 3)
            for name in ("key", "value") if key == "query" else ():     # self-attention: the same tensor
                if bound.arguments.get(name) is x:
                    bound.arguments[name] = h0
            bound.arguments[key] = x = h0
            args, kwargs = bound.args, bound.kwargs
        if not x.requires_grad:
            return args, kwargs
        self.grad_modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)           # the module's own forward: a reference only
        return args, kwargs

    def block_post(self, module, args, kwargs, out):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        key = self._input_name(module)
        x = bound[key]
        if not x.requires_grad:
            return None
        torch.set_grad_enabled(self.grad_modes.pop())
        name = self.blocks[module]
        if key == "x_bfpd":
            mine = divided_block(module, bound["cls_b1d"], x, self.eps)
            for part, native in zip(mine, out):
                _check(name, module, part, native)
            return mine
        if key == "query":
            mine = multihead_attention(module, x, bound["key"], bound["value"], bound.get("key_padding_mask"),
                                       bound.get("attn_mask"), self.eps)
            _check(name, module, mine, out[0])
            return (mine, *out[1:])
        if isinstance(module, nn.TransformerEncoderLayer):
            mine = encoder_layer(module, x, bound.get("src_mask"), bound.get("src_key_padding_mask"), self.eps)
        else:
            if bound.get("encoder_hidden_states") is not None:
                raise ValueError(f"attnlrp: {name} ({type(module).__name__}) was called with cross-attention "
                                 "inputs, which have no LRP rule here")
            mine = bert_layer(module, x, bound.get("attention_mask"), self.eps)
        _check(name, module, mine, _first_tensor(out))
        return _replace_first(out, mine)

    # -- modules outside the blocks
    def leaf_pre(self, module, args):
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            self.grad_modes.append(torch.is_grad_enabled())
            torch.set_grad_enabled(False)
        return None

    def leaf_post(self, module, args, out):
        if not (args and isinstance(args[0], Tensor) and args[0].requires_grad):
            return None
        torch.set_grad_enabled(self.grad_modes.pop())
        mine = _leaf_rule(module, self.eps)(args[0])
        _check(self.leaves[module], module, mine, out)
        return mine

    def watch_post(self, module, args, out):
        t = _first_tensor(out)
        if isinstance(t, Tensor) and t.requires_grad:
            name = self.leaves[module]
            t.register_hook(lambda g, name=name, module=module: self._reached(name, module, g))
        return None

    def _reached(self, name: str, module: nn.Module, grad: Tensor) -> None:
        if bool((grad != 0).any()):
            self.reached.append(f"{name} ({type(module).__name__})")

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        try:
            for m in self.encoders:
                handles.append(m.register_forward_pre_hook(self.encoder_pre, with_kwargs=True))
            for m in self.blocks:
                handles.append(m.register_forward_pre_hook(self.block_pre, with_kwargs=True))
                handles.append(m.register_forward_hook(self.block_post, with_kwargs=True))
            for m in self.leaves:
                if _leaf_rule(m, self.eps) is not None:
                    handles.append(m.register_forward_pre_hook(self.leaf_pre))
                    handles.append(m.register_forward_hook(self.leaf_post))
                elif not isinstance(m, _PASS_THROUGH):
                    handles.append(m.register_forward_hook(self.watch_post))
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and parameters that need no gradient, restored afterwards (and the grad mode)."""
    was_training, grad_mode = model.training, torch.is_grad_enabled()
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_mode)
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)


def attnlrp(model: nn.Module, forward: Callable[[], Tensor], target: Tensor, *, eps: float = EPS) -> Tensor:
    """AttnLRP relevance of the explained logits at the transformer's input ``[B, L, D]``.

    Args:
        model: the model; its transformer blocks (``nn.TransformerEncoderLayer``,
            ``nn.MultiheadAttention`` outside them, Hugging Face ``BertLayer``,
            :class:`attnlab.models.spacetime.DividedBlock`) are found among its modules. Any other module that the
            explained logit depends on after the transformer's input must be an
            ``nn.Linear``, ``nn.LayerNorm``/``nn.RMSNorm``, ReLU/GELU/SiLU/Tanh module,
            ``nn.Dropout`` or ``nn.Identity``, else a ``ValueError`` names it. Operations
            written in the model's own forward code outside modules (pooling, slicing,
            adding positions) get their plain gradient, which is the ε-rule (ε = 0) for
            linear ones.
        forward: ``() -> logits [B, C]``, the model's own forward on the explained inputs.
        target: ``[B]`` int64, the explained class of each row; its logit is the relevance
            that is propagated (``R = logit``).
        eps: the stabiliser of the ε- and uniform rules.

    Returns:
        ``R [B, L, D]`` at the input of the first transformer block (the embedding output:
        class token, positions and embedding included), batch-first; ``[B, F, P, D]`` (the
        patches; the class token left out) for divided space-time blocks; ``R.sum()`` per row
        is the logit minus what biases and softmax linearisations absorb (see the module
        docstring). The model is left as it was: mode, ``requires_grad``, no hooks.
    """
    session = _Session(model, eps)
    with ExitStack() as stack:
        stack.enter_context(_frozen_eval(model))
        stack.enter_context(session.hooks())
        with torch.enable_grad():
            logits = forward()
            if session.h0 is None:
                raise ValueError(f"attnlrp: the forward of {type(model).__name__} ran none of its transformer "
                                 "blocks")
            if logits.dim() != 2 or target.shape != logits.shape[:1]:
                raise ValueError(f"attnlrp: logits {tuple(logits.shape)} and target {tuple(target.shape)}: "
                                 "expected [B, C] and [B]")
            explained = logits.gather(1, target.to(logits.device).long()[:, None])
            if not explained.requires_grad:
                raise ValueError(f"attnlrp: the explained logits of {type(model).__name__} do not depend on "
                                 "the transformer's input")
            (grad,) = torch.autograd.grad(explained.sum(), session.h0)
    if session.reached:
        raise ValueError(f"attnlrp: the explained logit depends on module {session.reached[0]}, which has no "
                         "LRP rule here; supported: " + SUPPORTED)
    rel = session.h0.detach() * grad
    return rel if session.batch_first else rel.transpose(0, 1)
