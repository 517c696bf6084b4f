"""AttentionRecorder against independent recomputations.

Every recorded map is compared with softmax(QKᵀ/√d + mask) computed here, head by head,
from the module's own weights and the real inputs of each call (captured with a plain
forward pre-hook); gradients with autograd through a hand-written forward pass.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnlab.capture import AttentionProbs, AttentionRecorder

D, H, T, B = 16, 4, 6, 3


# ---------------------------------------------------------------- independent reference
def capture_calls(model):
    """Record (name, args, kwargs) of every nn.MultiheadAttention call with pre-hooks."""
    calls, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            def pre(mod, args, kwargs, name=name):
                calls.append((name, args, dict(kwargs)))
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    return calls, handles


def additive(mask):
    """Documented mask semantics: bool True = not allowed (-inf), float = added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.where(mask, float("-inf"), 0.0)
    return mask.float()


def ref_attention(mha, query, key, value, key_padding_mask=None, attn_mask=None,
                  batch_first=None, **_):
    """Hand computation of MHA: (probs [B, H, L, S'], per-head values [B, S', d]).

    One head at a time, from the module's parameters, with the documented semantics of
    batch_first, kdim/vdim, bias_k/bias_v, add_zero_attn, attn_mask (2-D or [B*H,L,S])
    and key_padding_mask.
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query[None], key[None], value[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif not (mha.batch_first if batch_first is None else batch_first):
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    nb, L, E = query.shape
    S = key.shape[1]
    d = E // mha.num_heads
    if mha.in_proj_weight is not None:
        wq, wk, wv = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E], mha.in_proj_weight[2 * E:]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bias = mha.in_proj_bias if mha.in_proj_bias is not None else torch.zeros(3 * E)
    bq, bk, bv = bias[:E], bias[E:2 * E], bias[2 * E:]
    probs, values = [], []
    for h in range(mha.num_heads):
        sl = slice(h * d, (h + 1) * d)
        q = query @ wq[sl].T + bq[sl]                      # [B, L, d]
        k = key @ wk[sl].T + bk[sl]                        # [B, S, d]
        v = value @ wv[sl].T + bv[sl]
        extra = 0
        if mha.bias_k is not None:
            k = torch.cat([k, mha.bias_k[0, 0, sl].expand(nb, 1, d)], 1)
            v = torch.cat([v, mha.bias_v[0, 0, sl].expand(nb, 1, d)], 1)
            extra += 1
        if mha.add_zero_attn:
            k = torch.cat([k, torch.zeros(nb, 1, d)], 1)
            v = torch.cat([v, torch.zeros(nb, 1, d)], 1)
            extra += 1
        s = torch.einsum("bld,bsd->bls", q, k) / math.sqrt(d)
        m = torch.zeros(nb, L, S + extra)
        am = additive(attn_mask)
        if am is not None:
            if am.dim() == 2:
                m[:, :, :S] += am
            else:                                          # [B*H, L, S]: index b*H + h
                m[:, :, :S] += am.reshape(nb, mha.num_heads, L, S)[:, h]
        kp = additive(key_padding_mask)
        if kp is not None:
            m[:, :, :S] += kp[:, None, :]
        s = s + m
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        probs.append(e / e.sum(-1, keepdim=True))
        values.append(v)
    return torch.stack(probs, 1), values


def ref_output(mha, probs, values):
    """Batch-first MHA output [B, L, E] from hand probabilities [B, H, L, S']."""
    heads = [probs[:, h] @ values[h] for h in range(mha.num_heads)]
    out = torch.cat(heads, -1) @ mha.out_proj.weight.T
    return out if mha.out_proj.bias is None else out + mha.out_proj.bias


def ref_encoder(enc, x, mask=None, kpm=None):
    """Hand forward of nn.TransformerEncoder (relu, no dropout): (output, [probs])."""
    bf = enc.layers[0].self_attn.batch_first
    h = x if bf else x.transpose(0, 1)
    probs_all = []

    def sa(layer, z):
        p, vals = ref_attention(layer.self_attn, z, z, z, key_padding_mask=kpm, attn_mask=mask,
                                batch_first=True)
        probs_all.append(p)
        return ref_output(layer.self_attn, p, vals)

    def ln(norm, z):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    def ff(layer, z):
        return torch.relu(z @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias

    for layer in enc.layers:                               # h is batch-first here
        if layer.norm_first:
            h = h + sa(layer, ln(layer.norm1, h))
            h = h + ff(layer, ln(layer.norm2, h))
        else:
            h = ln(layer.norm1, h + sa(layer, h))
            h = ln(layer.norm2, h + ff(layer, h))
    return (h if bf else h.transpose(0, 1)), probs_all


def make_encoder(batch_first=True, norm_first=False, dropout=0.0, layers=2, nested=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 2 * D, dropout, batch_first=batch_first,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested and not norm_first)
    with torch.no_grad():                  # non-trivial biases and norms
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def make_masks(kind):
    """(mask, src_key_padding_mask, is_causal) for the encoder."""
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 5:] = True
    if kind == "none":
        return None, None, None
    if kind == "kpm_bool":
        return None, pad, None
    if kind == "kpm_float":
        return None, torch.zeros(B, T).masked_fill(pad, float("-inf")), None
    if kind == "mask_bool":
        m = torch.rand(T, T, generator=g) < 0.3
        m.fill_diagonal_(False)
        return m, None, None
    if kind == "mask_float":
        return torch.randn(T, T, generator=g), None, None
    if kind == "causal":
        return nn.Transformer.generate_square_subsequent_mask(T), None, True
    if kind == "causal_kpm":
        return nn.Transformer.generate_square_subsequent_mask(T), torch.zeros(B, T).masked_fill(pad, float("-inf")), True
    raise KeyError(kind)


MASKS = ["none", "kpm_bool", "kpm_float", "mask_bool", "mask_float", "causal", "causal_kpm"]


from helpers import assert_close, snapshot  # noqa: E402  (shared: tests/helpers.py)


# ---------------------------------------------------------------- nn.TransformerEncoder
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_probs_outputs_and_gradients(batch_first, norm_first, kind):
    enc = make_encoder(batch_first, norm_first)
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    mask, kpm, is_causal = make_masks(kind)
    kw = dict(mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
    keep = torch.ones(B, T, dtype=torch.bool) if kpm is None else kpm == 0
    keep_out = keep if batch_first else keep.T          # unpadded output positions

    for mode in ("eval_no_grad", "eval_inference", "train_grad"):
        enc.train(mode == "train_grad")
        if mode == "eval_no_grad":
            ctx = torch.no_grad()
        elif mode == "eval_inference":
            ctx = torch.inference_mode()
        else:
            ctx = torch.enable_grad()
        # Plain run, on torch's fast path where it takes it, except for finite additive
        # float masks: torch 2.13's fused encoder kernel mishandles those (NaN), so the
        # reference is its documented slow path.
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(kind != "mask_float")
        try:
            with ctx:
                plain = enc(x, **kw)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        calls, handles = capture_calls(enc)
        with ctx, AttentionRecorder(enc, keep_grad=(mode == "train_grad")) as rec:
            out = enc(x, **kw)
        for hd in handles:
            hd.remove()

        # outputs agree (the nested fast path zeroes padded positions: compare the rest)
        assert_close(out[keep_out], plain[keep_out])
        assert rec.names == [f"layers.{i}.self_attn" for i in range(2)]
        assert len(rec) == len(calls) == 2
        for i, ((name, args, kwargs), att, layer) in enumerate(zip(calls, rec.attentions, enc.layers)):
            assert name == rec.names[i]
            assert att.shape == (B, H, T, T) and not att.requires_grad
            with torch.no_grad():
                ref, _ = ref_attention(layer.self_attn, *args, **kwargs)
            assert_close(att, ref)
            # rows sum to 1, masked keys are exactly 0
            assert_close(att.sum(-1), torch.ones(B, H, T))
            if kpm is not None:
                assert (att.masked_select(~keep[:, None, None, :].expand_as(att)) == 0).all()
            if kind.startswith("causal"):
                assert (att.triu(1) == 0).all()

        if mode == "train_grad":
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
            (out * w).sum().backward()
            x_ref = x.clone().requires_grad_()
            ref_out, ref_probs = ref_encoder(enc, x_ref, mask=mask, kpm=kpm)
            assert_close(ref_out[keep_out], out.detach()[keep_out])
            ref_grads = torch.autograd.grad((ref_out * w).sum(), ref_probs)
            for g, rg in zip(rec.gradients, ref_grads):
                assert g.shape == (B, H, T, T)
                assert_close(g, rg, atol=1e-4)
            enc.zero_grad()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_train_mode_dropout_matches_unrecorded_run(batch_first, norm_first):
    """Same seed -> same dropout masks: the recorder draws torch's random numbers in
    torch's order and memory layout, so the outputs agree to float rounding."""
    enc = make_encoder(batch_first, norm_first, dropout=0.3).train()
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    _, kpm, _ = make_masks("kpm_bool")
    torch.manual_seed(7)
    plain = enc(x, src_key_padding_mask=kpm)
    torch.manual_seed(7)
    with AttentionRecorder(enc) as rec:
        out = enc(x, src_key_padding_mask=kpm)
    assert_close(out, plain)
    # recorded probabilities are pre-dropout: rows still sum to 1
    for att in rec.attentions:
        assert_close(att.sum(-1), torch.ones(B, H, T))
    # and dropout really was on
    torch.manual_seed(8)
    assert (enc(x, src_key_padding_mask=kpm) - plain).abs().max() > 1e-3


def test_frozen_model_gradients_and_eval_grad():
    """keep_grad works on a frozen eval model (no parameter requires grad)."""
    enc = make_encoder().eval()
    enc.requires_grad_(False)
    x = torch.randn(B, T, D)
    with AttentionRecorder(enc, keep_grad=True) as rec:
        out = enc(x)
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    ref_out, ref_probs = ref_encoder(enc, x.clone().requires_grad_())
    ref_grads = torch.autograd.grad((ref_out * w).sum(), ref_probs)
    for g, rg in zip(rec.gradients, ref_grads):
        assert_close(g, rg, atol=1e-4)


# ---------------------------------------------------------------- nn.TransformerDecoder
def test_decoder_self_and_cross_attention():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, H, 2 * D, 0.0, batch_first=True)
    dec = nn.TransformerDecoder(layer, 2).eval()
    tgt, memory = torch.randn(B, T, D), torch.randn(B, T + 2, D)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(T)
    mem_pad = torch.zeros(B, T + 2, dtype=torch.bool)
    mem_pad[1, -3:] = True
    kw = dict(tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    with torch.no_grad():
        plain = dec(tgt, memory, **kw)
        calls, handles = capture_calls(dec)
        with AttentionRecorder(dec) as rec:
            out = dec(tgt, memory, **kw)
        for hd in handles:
            hd.remove()
    assert_close(out, plain)
    assert rec.names == ["layers.0.self_attn", "layers.0.multihead_attn",
                         "layers.1.self_attn", "layers.1.multihead_attn"]
    modules = dict(dec.named_modules())
    for (name, args, kwargs), att in zip(calls, rec.attentions):
        ref, _ = ref_attention(modules[name], *args, **kwargs)
        assert_close(att, ref)
    assert rec.attentions[1].shape == (B, H, T, T + 2)
    assert (rec.attentions[1][1, :, :, -3:] == 0).all()


# ---------------------------------------------------------------- nn.MultiheadAttention
MHA_CASES = {
    "kdim_vdim": dict(kw=dict(kdim=8, vdim=12), S=5),
    "bias_kv": dict(kw=dict(add_bias_kv=True), S=5),
    "zero_attn": dict(kw=dict(add_zero_attn=True), S=5),
    "bias_kv_zero_attn_seq_first": dict(kw=dict(add_bias_kv=True, add_zero_attn=True, batch_first=False), S=5),
    "mask3d": dict(kw=dict(), S=5, mask3d=True),
    "no_bias": dict(kw=dict(bias=False), S=5),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_mha_direct(case, need_weights, average):
    spec = MHA_CASES[case]
    kw = dict(spec["kw"])
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=kw.pop("batch_first", True), **kw)
    if mha.in_proj_bias is not None:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
    L, S = 4, spec["S"]
    kd, vd = mha.kdim, mha.vdim
    bf = mha.batch_first
    q = torch.randn(B, L, D) if bf else torch.randn(L, B, D)
    k = torch.randn(B, S, kd) if bf else torch.randn(S, B, kd)
    v = torch.randn(B, S, vd) if bf else torch.randn(S, B, vd)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    attn_mask = (torch.rand(B * H, L, S) < 0.3) if spec.get("mask3d") else torch.rand(L, S) < 0.2
    attn_mask[..., 0] = False
    kw = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
              average_attn_weights=average)
    plain = mha(q, k, v, **kw)
    calls, handles = capture_calls(mha)
    with AttentionRecorder(mha, keep_grad=True) as rec:
        out = mha(q, k, v, **kw)
    handles[0].remove()
    assert_close(out[0], plain[0])
    if need_weights:
        assert_close(out[1], plain[1])
    else:
        assert out[1] is None and plain[1] is None
    assert rec.names == [""]
    ref, values = ref_attention(mha, *calls[0][1], **calls[0][2])
    extra = int(mha.bias_k is not None) + int(mha.add_zero_attn)
    assert rec.attentions[0].shape == (B, H, L, S + extra)
    assert_close(rec.attentions[0], ref)

    # gradient: d loss / d probs through the hand-written output
    w = torch.randn(out[0].shape)
    (out[0] * w).sum().backward()
    ref_out = ref_output(mha, ref, values)               # batch-first
    ref_out = ref_out if bf else ref_out.transpose(0, 1)
    assert_close(ref_out, out[0].detach())
    (ref_grad,) = torch.autograd.grad((ref_out * w).sum(), ref)
    assert_close(rec.gradients[0], ref_grad, atol=1e-4)


def test_mha_unbatched_and_dropout_seeded():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, dropout=0.4)
    x = torch.randn(5, D)                                # unbatched [L, E]
    for need_weights in (True, False):
        torch.manual_seed(3)
        plain = mha(x, x, x, need_weights=need_weights, average_attn_weights=False)
        torch.manual_seed(3)
        calls, handles = capture_calls(mha)
        with AttentionRecorder(mha) as rec:
            out = mha(x, x, x, need_weights=need_weights, average_attn_weights=False)
        handles[0].remove()
        assert_close(out[0], plain[0])
        if need_weights:                                 # post-dropout weights, as torch returns
            assert out[1].shape == (H, 5, 5)
            assert_close(out[1], plain[1])
        ref, _ = ref_attention(mha, *calls[0][1], **calls[0][2])
        assert rec.attentions[0].shape == (1, H, 5, 5)
        assert_close(rec.attentions[0], ref)


def test_fully_masked_rows_follow_torch():
    """A fully padded sample: torch's need_weights=False path (SDPA) yields 0, the
    need_weights=True path NaN; the recorder reproduces both."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(2, 4, D)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    for need_weights in (False, True):
        plain = mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)[0]
        with AttentionRecorder(mha) as rec:
            out = mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)[0]
        assert_close(out, plain)
        if not need_weights:
            assert (rec.attentions[0][1] == 0).all()


class Reuse(nn.Module):
    """One attention module called three times per forward."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.other = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        for _ in range(3):
            x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.other(x, x[:, :2], x[:, :2])[0]


def test_module_called_several_times():
    torch.manual_seed(0)
    model = Reuse()
    x = torch.randn(B, T, D)
    plain = model(x)
    calls, handles = capture_calls(model)
    with AttentionRecorder(model) as rec:
        out = model(x)
    for hd in handles:
        hd.remove()
    assert_close(out, plain)
    assert rec.names == ["attn", "attn", "attn", "other"]
    modules = dict(model.named_modules())
    for (name, args, kwargs), att in zip(calls, rec.attentions):
        assert_close(att, ref_attention(modules[name], *args, **kwargs)[0])
    by_name = rec.by_name()
    assert list(by_name) == ["attn", "other"] and len(by_name["attn"]) == 3
    assert by_name["other"][0].shape == (B, H, T, 2)
    rec.clear()
    assert len(rec) == 0 and rec.names == [] and rec.by_name() == {}


def test_modules_subset():
    torch.manual_seed(0)
    model = Reuse()
    with torch.no_grad(), AttentionRecorder(model, modules=["other"]) as rec:
        model(torch.randn(B, T, D))
    assert rec.names == ["other"]
    assert "forward" not in model.attn.__dict__


# ---------------------------------------------------------------- AttentionProbs protocol
class TinyAttention(nn.Module):
    """A project-style attention module using the AttentionProbs marker."""

    def __init__(self, dim=D, heads=H, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_probs = AttentionProbs()
        self.drop = nn.Dropout(dropout)

    def forward(self, x_btd):
        b, t, d = x_btd.shape
        q, k, v = self.qkv(x_btd).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        probs = self.attn_probs((q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1))
        return self.proj((self.drop(probs) @ v).transpose(1, 2).reshape(b, t, d))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tiny = TinyAttention()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        x = x + self.tiny(x)
        return x + self.mha(x, x, x, need_weights=False)[0]


def test_attention_probs_and_mha_together_with_gradients():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(B, T, D)
    with AttentionRecorder(model, keep_grad=True) as rec:
        out = model(x)
    assert rec.names == ["tiny.attn_probs", "mha"]
    w = torch.randn(out.shape)
    (out * w).sum().backward()

    # independent: hand-written forward of both blocks
    tiny = model.tiny
    wq, wk, wv = tiny.qkv.weight.split(D)
    bq, bk, bv = tiny.qkv.bias.split(D)
    d = D // H
    p1 = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        s = (x @ wq[sl].T + bq[sl]) @ (x @ wk[sl].T + bk[sl]).transpose(1, 2) / math.sqrt(d)
        p1.append(torch.exp(s) / torch.exp(s).sum(-1, keepdim=True))
    p1 = torch.stack(p1, 1)
    v1 = [x @ wv[h * d:(h + 1) * d].T + bv[h * d:(h + 1) * d] for h in range(H)]
    y = x + torch.cat([p1[:, h] @ v1[h] for h in range(H)], -1) @ tiny.proj.weight.T + tiny.proj.bias
    p2, v2 = ref_attention(model.mha, y, y, y)
    ref_out = y + ref_output(model.mha, p2, v2)
    assert_close(ref_out, out.detach())
    assert_close(rec.attentions[0], p1.detach())
    assert_close(rec.attentions[1], p2.detach())
    g1, g2 = torch.autograd.grad((ref_out * w).sum(), [p1, p2])
    assert_close(rec.gradients[0], g1, atol=1e-4)
    assert_close(rec.gradients[1], g2, atol=1e-4)


def test_gradient_errors():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(B, T, D)
    with AttentionRecorder(model) as rec:
        model(x)
    with pytest.raises(RuntimeError, match="keep_grad=True"):
        rec.gradients
    with AttentionRecorder(model, keep_grad=True) as rec:
        out = model(x)
    with pytest.raises(RuntimeError, match="backward"):
        rec.gradients
    out.sum().backward()
    assert len(rec.gradients) == 2
    with torch.no_grad(), AttentionRecorder(model, keep_grad=True) as rec:
        model(x)
    with pytest.raises(RuntimeError, match="autograd off"):
        rec.gradients


# ---------------------------------------------------------------- errors
def test_bad_module_names():
    model = Reuse()
    with pytest.raises(ValueError, match=r"'nope' is not a module of the model.*'attn', 'other'"):
        AttentionRecorder(model, modules=["nope"])
    with pytest.raises(ValueError, match=r"'attn.out_proj' is a NonDynamicallyQuantizableLinear, not an attention"):
        AttentionRecorder(model, modules=["attn.out_proj"])
    with pytest.raises(ValueError, match="no nn.MultiheadAttention"):
        AttentionRecorder(nn.Linear(2, 2))


class OverridingMHA(nn.MultiheadAttention):
    def forward(self, query, key, value, **kw):
        return super().forward(query, key, value, **kw)


class HoldsScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.ok = nn.MultiheadAttention(D, H)
        self.scripted = torch.jit.script(nn.MultiheadAttention(D, H))


def test_unrecordable_modules_raise_naming_them():
    model = nn.Sequential()
    model.add_module("bad", OverridingMHA(D, H))
    with pytest.raises(ValueError, match=r"'bad' is a OverridingMHA.*overrides forward"):
        AttentionRecorder(model)
    holder = HoldsScripted()
    with pytest.raises(ValueError, match=r"'scripted' is a TorchScript module"):
        AttentionRecorder(holder)
    with pytest.raises(ValueError, match=r"'scripted' is a TorchScript module"):
        AttentionRecorder(holder, modules=["scripted"])
    assert AttentionRecorder(holder, modules=["ok"])._targets[0][0] == "ok"
    with pytest.raises(ValueError, match="torch.compile"):
        AttentionRecorder(torch.compile(Reuse()))


def test_nested_recorders_on_same_model_raise_and_leave_model_clean():
    model = Reuse()
    before = snapshot(model)
    with AttentionRecorder(model) as outer:
        with pytest.raises(ValueError, match="already has a patched forward"):
            with AttentionRecorder(model):
                pass
        model(torch.randn(B, T, D))               # outer still records
    assert outer.names == ["attn"] * 3 + ["other"]
    assert snapshot(model) == before


# ---------------------------------------------------------------- restoration
@pytest.mark.parametrize("fastpath", [True, False])
def test_model_restored_exactly_also_after_exception(fastpath):
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        enc = make_encoder()
        model = nn.Sequential()
        model.add_module("enc", enc)
        model.add_module("tiny", TinyAttention())
        model.eval()
        x = torch.randn(B, T, D)
        _, kpm, _ = make_masks("kpm_bool")
        with torch.no_grad():
            before_out = model[1](model[0](x, src_key_padding_mask=kpm))
        before = snapshot(model)
        assert before[1] is fastpath

        with AttentionRecorder(model, keep_grad=True) as rec:
            assert torch.backends.mha.get_fastpath_enabled() is False
            model[1](model[0](x))
        assert len(rec) == 3
        assert snapshot(model) == before

        with pytest.raises(ZeroDivisionError):
            with AttentionRecorder(model):
                model[1](model[0](x))
                1 / 0
        assert snapshot(model) == before
        with torch.no_grad():
            after_out = model[1](model[0](x, src_key_padding_mask=kpm))
        torch.testing.assert_close(after_out, before_out, atol=0, rtol=0, equal_nan=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# ---------------------------------------------------------------- keeping only some layers, heads, rows
def sliced(probs_bhqk, heads, rows):
    """The selection written out head by head and row by row."""
    b, h, lq, lk = probs_bhqk.shape
    row_ids = [0] if rows == "cls" else list(range(lq)) if rows is None else [r % lq for r in rows]
    if heads == "mean":
        out = torch.zeros(b, 1, len(row_ids), lk)
        for k in range(h):
            out[:, 0] += probs_bhqk[:, k][:, row_ids] / h
        return out
    head_ids = list(range(h)) if heads is None else [x % h for x in heads]
    return torch.stack([torch.stack([probs_bhqk[:, k, r] for r in row_ids], 1) for k in head_ids], 1)


@pytest.mark.parametrize("layers, heads, rows", [
    (None, None, "cls"), ([-1], None, None), ([0, -1], [3, 1], [5, 0]), ([1], "mean", "cls"),
    ([2, -3], None, [-1])])
def test_selection_keeps_the_slices_of_the_hand_computed_maps(layers, heads, rows):
    enc = make_encoder(layers=3).eval()
    x = torch.randn(B, T, D)
    _, ref = ref_encoder(enc, x)
    plain = enc(x)
    with torch.no_grad(), AttentionRecorder(enc, layers=layers, heads=heads, rows=rows) as rec:
        out = enc(x)
    assert_close(out, plain)                             # the model computes what it always does
    kept = [0, 1, 2] if layers is None else sorted({i % 3 for i in layers})
    assert rec.calls == kept and rec.names == [f"layers.{i}.self_attn" for i in kept]
    for att, layer in zip(rec.attentions, kept):
        assert_close(att, sliced(ref[layer].detach(), heads, rows))


def test_negative_layers_hold_only_the_last_calls_and_restart_at_clear():
    torch.manual_seed(0)
    model = Reuse()                                      # 4 calls per forward: attn x3, other
    x = torch.randn(B, T, D)
    with torch.no_grad(), AttentionRecorder(model) as full:
        model(x)
    with torch.no_grad(), AttentionRecorder(model, layers=[-2, 0]) as rec:
        model(x)
        assert len(rec._attentions) <= 3                 # call 0 and the last two: never more held
        assert rec.calls == [0, 2] and rec.names == ["attn", "attn"]
        for got, want in zip(rec.attentions, [full.attentions[0], full.attentions[2]]):
            assert torch.equal(got, want)
        model(x)                                         # 8 calls since the block started
        assert rec.calls == [0, 6]
        rec.clear()
        model(x)
        assert rec.calls == [0, 2]


def test_selected_gradients_are_the_slices_of_the_full_gradients():
    enc = make_encoder(layers=2).train()
    x = torch.randn(B, T, D)
    w = torch.randn(B, T, D)
    with AttentionRecorder(enc, keep_grad=True, layers=[-1], heads=[2], rows="cls") as rec:
        (enc(x) * w).sum().backward()
    ref_out, ref_probs = ref_encoder(enc, x.clone().requires_grad_())
    ref_grads = torch.autograd.grad((ref_out * w).sum(), ref_probs)
    assert rec.calls == [1] and rec.gradients[0].shape == (B, 1, 1, T)
    assert_close(rec.gradients[0], ref_grads[1][:, 2:3, :1], atol=1e-4)
    assert_close(rec.attentions[0], ref_probs[1].detach()[:, 2:3, :1])


def test_selected_norms_are_the_rows_of_the_full_norms():
    enc = make_encoder(layers=2).eval()
    x = torch.randn(B, T, D)
    with torch.no_grad(), AttentionRecorder(enc, keep_norms=True) as full:
        enc(x)
    with torch.no_grad(), AttentionRecorder(enc, keep_norms=True, rows=[0, -1], layers=[1]) as rec:
        enc(x)
    assert len(rec.norms) == 1 and rec.norms[0].shape == (B, 2, T)
    assert torch.equal(rec.norms[0], full.norms[1][:, [0, T - 1]])


def test_selection_errors_name_the_setting():
    enc = make_encoder()
    with pytest.raises(ValueError, match=r"heads='mean' with keep_grad=True"):
        AttentionRecorder(enc, heads="mean", keep_grad=True)
    with pytest.raises(ValueError, match=r"heads=\[0\] with keep_norms=True"):
        AttentionRecorder(enc, heads=[0], keep_norms=True)
    with pytest.raises(ValueError, match=r"rows='first': expected 'all', 'cls' or a list of indices"):
        AttentionRecorder(enc, rows="first")
    with pytest.raises(ValueError, match=r"layers=\[True\]: expected 'all' or a non-empty list"):
        AttentionRecorder(enc, layers=[True])
    before = snapshot(enc)
    with pytest.raises(ValueError, match=r"rows: query row 9 does not exist in entry 'layers.0.self_attn', "
                                         r"which has 6 rows"):
        with torch.no_grad(), AttentionRecorder(enc, rows=[9]):
            enc(torch.randn(B, T, D))
    assert snapshot(enc) == before                       # restored after the error


# ---------------------------------------------------------------- fused kernel (fast path)
def count_fused(monkeypatch):
    """Count the calls of torch's fused MHA kernel (the recorder's fast path)."""
    calls = []
    kernel = torch._native_multi_head_attention

    def counting(*args, **kwargs):
        calls.append(args[10] if len(args) > 10 else kwargs.get("need_weights"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting)
    return calls


def fused_masks(kind, n_batch=B):
    """(attn_mask, key_padding_mask, is_causal) for a self-attention of length T."""
    pad = torch.zeros(n_batch, T, dtype=torch.bool)
    pad[0, 4:] = True
    pad[-1, 1] = True
    g = torch.Generator().manual_seed(3)
    causal = nn.Transformer.generate_square_subsequent_mask(T)          # float 0 / -inf
    if kind == "none":
        return None, None, False
    if kind == "kpm_bool":
        return None, pad, False
    if kind == "kpm_float":
        return None, torch.zeros(n_batch, T).masked_fill(pad, float("-inf")), False
    if kind == "mask_bool":
        m = torch.rand(T, T, generator=g) < 0.4
        m.fill_diagonal_(False)
        return m, None, False
    if kind == "mask_bool_3d":                                         # [B*H, L, L]
        m = torch.rand(n_batch * H, T, T, generator=g) < 0.4
        m[:, :, 0] = False                      # key 0 is never padded: no fully masked row
        return m, pad, False
    if kind == "causal":
        return causal, None, True
    if kind == "causal_kpm":
        return causal, pad, True
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["none", "kpm_bool", "kpm_float", "mask_bool", "mask_bool_3d", "causal",
                                  "causal_kpm"])
@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
def test_fused_kernel_used_and_equal_to_hand_softmax(monkeypatch, layout, kind):
    """Eval self-attention without grad: the recorder runs torch's fused kernel (once per
    call, with need_weights), its probabilities are softmax(QKᵀ/√d + mask) recomputed
    head by head from the weights, and the output is the unrecorded module's."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, dropout=0.1, batch_first=(layout == "batch_first")).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    n_batch = 1 if layout == "unbatched" else B
    attn_mask, kpm, is_causal = fused_masks(kind, n_batch)
    if layout == "unbatched":
        x = torch.randn(T, D)
        kpm = None if kpm is None else kpm[0]
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:H]
    else:
        x = torch.randn(B, T, D) if layout == "batch_first" else torch.randn(T, B, D)
    kw = dict(key_padding_mask=kpm, attn_mask=attn_mask, is_causal=is_causal)
    with torch.no_grad():
        plain, plain_w = mha(x, x, x, need_weights=True, average_attn_weights=False, **kw)
        plain_avg_out, _ = mha(x, x, x, need_weights=False, **kw)
        calls = count_fused(monkeypatch)
        with AttentionRecorder(mha) as rec:
            out, w = mha(x, x, x, need_weights=True, average_attn_weights=False, **kw)
            out2, w2 = mha(x, x, x, **kw)                          # averaged weights
            out3, w3 = mha(x, x, x, need_weights=False, **kw)
    assert calls == [True, True, True]                             # the fast path, every call
    ref, _ = ref_attention(mha, x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
    assert len(rec) == 3
    for att in rec.attentions:
        assert att.shape == (n_batch, H, T, T)
        assert_close(att, ref)
        assert_close(att.sum(-1), torch.ones(n_batch, H, T))
    if kpm is not None:
        keep = (kpm == 0 if kpm.dtype != torch.bool else ~kpm).reshape(n_batch, 1, 1, T)
        assert (rec.attentions[0].masked_select(~keep.expand_as(rec.attentions[0])) == 0).all()
    if kind.startswith("causal"):
        assert (rec.attentions[0].triu(1) == 0).all()
    for o in (out, out2, out3):
        torch.testing.assert_close(o, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(out3, plain_avg_out, rtol=0, atol=1e-5)
    assert w3 is None
    assert_close(w, plain_w)
    assert_close(w2, plain_w.mean(-3))


def _fallback_cases():
    """(name, setup) where the fused kernel cannot give what is asked: each returns
    (mha, (q, k, v), kwargs, recorder kwargs, grad on)."""
    def base(heads=H, **kw):
        torch.manual_seed(0)
        return nn.MultiheadAttention(D, heads, batch_first=True, **kw).eval()

    x = torch.randn(B, T, D)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1] = True                                                  # a fully masked batch row
    return {
        "finite_float_mask": lambda: (base(), (x, x, x), dict(attn_mask=torch.randn(T, T)), {}, False),
        "fully_masked_row": lambda: (base(), (x, x, x), dict(key_padding_mask=pad), {}, False),
        "cross_attention": lambda: (base(), (x, x.clone(), x.clone()), {}, {}, False),
        "keep_grad": lambda: (base(), (x, x, x), {}, dict(keep_grad=True), True),
        "keep_norms": lambda: (base(), (x, x, x), {}, dict(keep_norms=True), False),
        "train_dropout": lambda: (base(dropout=0.5).train(), (x, x, x), {}, {}, False),
        "grad_through_weights": lambda: (base(), (x, x, x), {}, {}, True),
        "bias_kv": lambda: (base(add_bias_kv=True), (x, x, x), {}, {}, False),
        "odd_heads": lambda: (base(heads=1), (x, x, x), {}, {}, False),     # as MHA's own fast path
    }


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_fused_kernel_not_used_where_it_cannot_apply(monkeypatch, case):
    """Where the fused kernel cannot give the probabilities (or the graph, or the values,
    or the semantics) the recorder computes explicitly; the maps stay the hand softmax."""
    mha, (q, k, v), kw, rec_kw, grad = _fallback_cases()[case]()
    calls = count_fused(monkeypatch)
    with torch.set_grad_enabled(grad), AttentionRecorder(mha, **rec_kw) as rec:
        out, _ = mha(q, k, v, **kw)
    assert calls == []
    ref, _ = ref_attention(mha, q, k, v, **kw)
    if case == "fully_masked_row":
        assert rec.attentions[0][1].isnan().all()                  # as torch's need_weights=True path
        assert_close(rec.attentions[0][[0, 2]], ref[[0, 2]])
    else:
        assert_close(rec.attentions[0], ref)


def test_fused_kernel_in_train_mode_without_dropout_and_grad(monkeypatch):
    """Training mode with dropout 0 under no_grad has nothing the kernel lacks: it is used."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True).train()
    x = torch.randn(B, T, D)
    calls = count_fused(monkeypatch)
    with torch.no_grad(), AttentionRecorder(mha) as rec:
        mha(x, x, x)
    assert calls == [True]
    assert_close(rec.attentions[0], ref_attention(mha, x, x, x)[0])
