"""Norm-aware attention (Kobayashi et al. 2020): ``AttentionRecorder(keep_norms=True)``
and the ``norm`` / ``norm_rollout`` methods, against literal per-pair loops over the
modules' own weights: ``N_ij = ‖Σ_h α^h_ij W_O^h (W_V^h x_j + b_V^h)‖``."""
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import attnlab.capture as capture
import attnlab.models.spacetime as spacetime_module
from attnlab import AttentionProbs, AttentionRecorder, head_outputs
from attnlab.attribution import SequenceItems, SpaceTimeItems, attention_importance, explain_batch
from attnlab.explain import spacetime_rollout, split_spacetime
from attnlab.models.spacetime import DividedSpaceTimeTransformer

assert_close = torch.testing.assert_close


# ---------------------------------------------------------------- literal references
def literal_norms(alpha_bhqk, x_bsd, w_v, b_v, w_o, extra_values=()):
    """``N[b, i, j]`` by the definition, one pair at a time, in float64: key ``j < S``
    has value ``W_V x_j + b_V``; the keys after it have the (already projected)
    ``extra_values`` (``bias_v``, the zero key of ``add_zero_attn``)."""
    alpha, x = alpha_bhqk.double(), x_bsd.double()
    w_v, b_v, w_o = w_v.double(), b_v.double(), w_o.double()
    bsz, heads, lq, lk = alpha.shape
    d = w_o.shape[1] // heads
    out = torch.zeros(bsz, lq, lk, dtype=torch.float64)
    for b in range(bsz):
        for j in range(lk):
            s = x.shape[1]
            v = w_v @ x[b, j] + b_v if j < s else extra_values[j - s].double()
            for i in range(lq):
                vec = torch.zeros(w_o.shape[0], dtype=torch.float64)
                for h in range(heads):
                    vec += alpha[b, h, i, j] * (w_o[:, h * d:(h + 1) * d] @ v[h * d:(h + 1) * d])
                out[b, i, j] = vec.norm()
    return out.float()


def mha_value_weights(mha):
    e = mha.embed_dim
    w_v = mha.in_proj_weight[2 * e:] if mha._qkv_same_embed_dim else mha.v_proj_weight
    b_v = mha.in_proj_bias[2 * e:] if mha.in_proj_bias is not None else torch.zeros(e)
    return w_v.detach(), b_v.detach(), mha.out_proj.weight.detach()


def torch_probs(mha, query, key, value, **kw):
    """Torch's own per-head weights (eval mode: no dropout), ``[B, H, L, S]``."""
    with torch.no_grad():
        return mha(query, key, value, need_weights=True, average_attn_weights=False, **kw)[1]


def mha_reference(mha, query, key, value, **kw):
    """Literal norms of one MHA call, with torch's own probabilities."""
    alpha = torch_probs(mha, query, key, value, **kw)
    v_bse = value if mha.batch_first else value.transpose(0, 1)
    extra = []
    if mha.bias_v is not None:
        extra.append(mha.bias_v.detach().flatten())
    if mha.add_zero_attn:
        extra.append(torch.zeros(mha.embed_dim))
    return alpha, literal_norms(alpha, v_bse, *mha_value_weights(mha), extra_values=extra)


# ---------------------------------------------------------------- nn.MultiheadAttention
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias_kv,zero_attn", [(False, False), (True, False), (True, True)])
def test_mha_self_attention_matches_literal(batch_first, bias_kv, zero_attn):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=bias_kv,
                                add_zero_attn=zero_attn).eval()
    x_bld = torch.randn(3, 5, 8)
    x = x_bld if batch_first else x_bld.transpose(0, 1)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True                                  # sample 1: last two keys padded
    alpha, expected = mha_reference(mha, x, x, x, key_padding_mask=pad)
    with torch.no_grad():
        plain = mha(x, x, x, key_padding_mask=pad)[0]
        with AttentionRecorder(mha, keep_norms=True) as rec:
            out = mha(x, x, x, key_padding_mask=pad)[0]
    assert_close(out, plain, atol=1e-5, rtol=0)         # outputs unchanged
    assert_close(rec.attentions[0], alpha)              # probabilities unchanged
    lk = 5 + bias_kv + zero_attn
    assert len(rec.norms) == 1 and rec.norms[0].shape == (3, 5, lk) and rec.norms[0].dtype == torch.float32
    assert not rec.norms[0].requires_grad
    assert_close(rec.norms[0], expected, atol=1e-5, rtol=1e-4)
    assert torch.all(rec.norms[0][1, :, 3:5] == 0)      # masked keys contribute nothing


def test_mha_cross_attention_separate_projections_matches_literal():
    """kdim/vdim != embed_dim: separate q/k/v weights; query length != key length."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 4, kdim=3, vdim=6, batch_first=True).eval()
    assert not mha._qkv_same_embed_dim
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 7, 3), torch.randn(2, 7, 6)
    alpha, expected = mha_reference(mha, q, k, v)
    with torch.no_grad(), AttentionRecorder(mha, keep_norms=True) as rec:
        mha(q, k, v)
    assert rec.norms[0].shape == (2, 4, 7)
    assert_close(rec.attentions[0], alpha)
    assert_close(rec.norms[0], expected, atol=1e-5, rtol=1e-4)


def test_mha_fully_masked_row_stays_nan_like_the_probabilities():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    x = torch.randn(1, 3, 4)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True                                      # query 1 sees no key
    with torch.no_grad(), AttentionRecorder(mha, keep_norms=True) as rec:
        mha(x, x, x, attn_mask=mask)
    assert torch.isnan(rec.attentions[0][0, :, 1]).all() and torch.isnan(rec.norms[0][0, 1]).all()
    assert torch.isfinite(rec.norms[0][0, [0, 2]]).all()


def test_transformer_encoder_layers_match_literal():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    src = torch.randn(2, 6, 8)
    with torch.no_grad():
        plain = enc(src)
        inputs = [src, enc.layers[0](src)]               # each layer's self-attention input (post-norm)
        with AttentionRecorder(enc, keep_norms=True) as rec:
            out = enc(src)
    assert_close(out, plain, atol=1e-5, rtol=0)
    assert rec.names == ["layers.0.self_attn", "layers.1.self_attn"] and len(rec.norms) == 2
    for lay, h, norms, att in zip(enc.layers, inputs, rec.norms, rec.attentions):
        alpha, expected = mha_reference(lay.self_attn, h, h, h)
        assert_close(att, alpha, atol=1e-6, rtol=1e-5)
        assert_close(norms, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- AttentionProbs / spacetime model
def test_spacetime_model_matches_literal():
    torch.manual_seed(4)
    model = DividedSpaceTimeTransformer(3, frames=2, size=8, patch=4, d_model=8, nhead=2, num_layers=2).eval()
    clip = torch.randn(2, 2, 1, 8, 8)
    # own hooks: each SelfAttention's input and its marker's probabilities, in call order
    seen, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, spacetime_module.SelfAttention):
            handles.append(m.register_forward_pre_hook(lambda mod, args: seen.append([mod, args[0]])))
            handles.append(m.attn_probs.register_forward_hook(lambda mod, args, out: seen[-1].append(out)))
    try:
        with torch.no_grad():
            plain = model(clip)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), AttentionRecorder(model, keep_norms=True) as rec:
        out = model(clip)
    assert_close(out, plain, atol=0, rtol=0)             # numerics unchanged
    assert len(rec.norms) == len(seen) == 4
    for (mod, x, alpha), att, norms in zip(seen, rec.attentions, rec.norms):
        d = mod.proj.weight.shape[0]
        expected = literal_norms(alpha, x, mod.qkv.weight[2 * d:].detach(), mod.qkv.bias[2 * d:].detach(),
                                 mod.proj.weight.detach())
        assert_close(att, alpha, atol=0, rtol=0)
        assert norms.shape == alpha.shape[:1] + alpha.shape[2:]
        assert_close(norms, expected, atol=1e-5, rtol=1e-4)


def test_head_outputs_is_the_per_head_block_of_the_out_projection():
    torch.manual_seed(5)
    v, w = torch.randn(2, 3, 4, 5), torch.randn(7, 15)
    f = head_outputs(v, w)
    assert f.shape == (2, 3, 4, 7)
    for h in range(3):
        assert_close(f[:, h], v[:, h] @ w[:, 5 * h:5 * (h + 1)].T)
    # summed over heads: the out projection without its bias
    assert_close(f.sum(1), v.transpose(1, 2).reshape(2, 4, 15) @ w.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=re.escape("head_outputs: out_weight (7, 14) does not match 3 heads "
                                                   "of size 5: expected [E, 15]")):
        head_outputs(v, w[:, :14])


class Marked(nn.Module):
    """An attention module with an AttentionProbs marker; ``mode`` says what it passes."""

    def __init__(self, mode="none"):
        super().__init__()
        self.qkv, self.proj, self.attn_probs, self.mode = nn.Linear(4, 12), nn.Linear(4, 4), AttentionProbs(), mode

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 2).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
        if self.mode == "none":
            probs = self.attn_probs(probs)
        elif self.mode == "positional":
            probs = self.attn_probs(probs, head_outputs(v, self.proj.weight))
        else:                                           # wrong shape
            probs = self.attn_probs(probs, values=head_outputs(v, self.proj.weight)[:, :1])
        return self.proj((probs @ v).transpose(1, 2).reshape(b, n, 4))


def test_marker_values_positional_and_errors():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 4)
    model = Marked("positional")
    with torch.no_grad(), AttentionRecorder(model, keep_norms=True) as rec:
        model(x)
    d = 4
    assert_close(rec.norms[0], literal_norms(rec.attentions[0], x, model.qkv.weight[2 * d:].detach(),
                                             model.qkv.bias[2 * d:].detach(), model.proj.weight.detach()),
                 atol=1e-5, rtol=1e-4)

    none = Marked("none")
    with pytest.raises(ValueError, match="^" + re.escape(
            "AttentionProbs module 'attn_probs' was called without values, so keep_norms=True cannot "
            "compute its norms; pass each head's output-space values [B, H, Lk, E]: "
            "`self.attn_probs(probs, values=head_outputs(v_bhkd, out_proj.weight))` (attnlab.head_outputs)") + "$"):
        with AttentionRecorder(none, keep_norms=True):
            none(x)
    assert "forward" not in none.__dict__ and not none.attn_probs._forward_hooks   # restored

    bad = Marked("wrong")
    with pytest.raises(ValueError, match="^" + re.escape(
            "AttentionProbs module 'attn_probs' got values of shape (2, 1, 3, 4); expected [B, H, Lk, E] = "
            "[2, 2, 3, E] for probabilities (2, 2, 3, 3)") + "$"):
        with AttentionRecorder(bad, keep_norms=True):
            bad(x)

    with AttentionRecorder(none) as rec:               # without keep_norms a marker needs no values
        none(x)
    assert rec.norms == []


def test_keep_norms_must_be_a_bool():
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(TypeError, match="^" + re.escape("keep_norms must be True or False, got 1") + "$"):
        AttentionRecorder(mha, keep_norms=1)


def test_without_keep_norms_nothing_is_computed(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("norms computed without keep_norms")

    monkeypatch.setattr(capture, "_norms", boom)
    monkeypatch.setattr(capture, "head_outputs", boom)
    monkeypatch.setattr(spacetime_module, "head_outputs", boom)
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    st = DividedSpaceTimeTransformer(3, frames=2, size=8, patch=4, d_model=8, nhead=2, num_layers=1).eval()
    x = torch.randn(2, 3, 4)
    with torch.no_grad(), AttentionRecorder(mha) as rec:
        mha(x, x, x)
    assert rec.norms == [] and len(rec.attentions) == 1
    with torch.no_grad(), AttentionRecorder(st) as rec:
        st(torch.randn(1, 2, 1, 8, 8))
    assert rec.norms == [] and len(rec.attentions) == 2
    with torch.no_grad():
        st(torch.randn(1, 2, 1, 8, 8))                  # outside a recorder: no values either


def test_clear_forgets_norms():
    mha = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    x = torch.randn(1, 3, 4)
    with torch.no_grad(), AttentionRecorder(mha, keep_norms=True) as rec:
        mha(x, x, x)
        rec.clear()
        mha(x, x, x)
    assert len(rec.norms) == len(rec.attentions) == 1


ALL_ATTENTION_FUNCTIONS = {"eager": lambda *a: a[0]}


class HFLikeSelfAttention(nn.Module):
    """Recognised as a Hugging Face dispatch module exactly as transformers' own are (its
    class lives in ``transformers.models.*`` and its forward reads ``ALL_ATTENTION_FUNCTIONS``),
    without importing transformers (slow) in this file."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return ALL_ATTENTION_FUNCTIONS["eager"](x)


HFLikeSelfAttention.__module__ = "transformers.models.bert.modeling_bert"


def test_hugging_face_module_with_keep_norms_raises():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("attn", HFLikeSelfAttention())
    assert capture.recordable_modules(model) == ["attn"]
    with pytest.raises(ValueError, match="^" + re.escape(
            "keep_norms=True: module 'attn' (HFLikeSelfAttention) is a Hugging Face "
            "attention module, whose norms cannot be recorded; norms are recorded for nn.MultiheadAttention "
            "and AttentionProbs markers that pass values (pass modules=[...] to record only those)") + "$"):
        with AttentionRecorder(model, keep_norms=True):
            model(torch.randn(1, 4))
    assert "forward" not in model.attn.__dict__


# ---------------------------------------------------------------- methods
class Pooled(nn.Module):
    """A mean-pooled (or token-id) encoder classifier on nn.TransformerEncoder."""

    def __init__(self, tokens=False):
        super().__init__()
        self.embed = nn.Embedding(10, 8) if tokens else nn.Identity()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def literal_layer_maps(model, x):
    """Row-normalised literal norm maps of every layer ``[B, N, N]``."""
    maps, h = [], model.embed(x)
    with torch.no_grad():
        for lay in model.encoder.layers:
            _, n = mha_reference(lay.self_attn, h, h, h)
            maps.append(n / n.sum(-1, keepdim=True))
            h = lay(h)
    return maps


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("residual", [True, False])
def test_norm_methods_match_literal(tokens, residual):
    torch.manual_seed(8)
    model = Pooled(tokens).eval()
    b, n = 3, 5
    x = torch.randint(0, 10, (b, n)) if tokens else torch.randn(b, n, 8)
    maps = literal_layer_maps(model, x)
    joint = torch.eye(n).expand(b, n, n)
    for m in maps:                                      # R = Â_L ⋯ Â_1
        step = 0.5 * m + 0.5 * torch.eye(n) if residual else m
        joint = step @ joint
    options = SimpleNamespace(head_fusion="mean", residual=residual, discard_ratio=0.0, flow_max_pairs=None)
    imp, batch = explain_batch(["norm", "norm_rollout"], model, x, SequenceItems(n, "mean", token_ids=tokens),
                               options)
    assert batch.attentions is not None and len(batch.norms) == 3 and batch.gradients is None
    assert_close(imp["norm"], maps[-1].mean(1), atol=1e-5, rtol=1e-4)      # readout "mean": mean over rows
    assert_close(imp["norm_rollout"], joint.mean(1), atol=1e-5, rtol=1e-4)

    # an explained row (int), through attention_importance
    imp2, _ = attention_importance(model, x, n_items=n, methods=["norm", "norm_rollout"], how=2,
                                   residual=residual)
    assert_close(imp2["norm"], maps[-1][:, 2], atol=1e-5, rtol=1e-4)
    assert_close(imp2["norm_rollout"], joint[:, 2], atol=1e-5, rtol=1e-4)


def test_norm_methods_spacetime():
    torch.manual_seed(9)
    model = DividedSpaceTimeTransformer(3, frames=2, size=8, patch=4, d_model=8, nhead=2, num_layers=2).eval()
    clip = torch.randn(2, 2, 1, 8, 8)
    seen, handles = [], []
    for m in model.modules():
        if isinstance(m, spacetime_module.SelfAttention):
            handles.append(m.register_forward_pre_hook(lambda mod, args: seen.append([mod, args[0]])))
            handles.append(m.attn_probs.register_forward_hook(lambda mod, args, out: seen[-1].append(out)))
    try:
        with torch.no_grad():
            model(clip)
    finally:
        for h in handles:
            h.remove()
    maps = []
    for mod, x, alpha in seen:
        w = mod.qkv.weight.detach()
        nn_ = literal_norms(alpha, x, w[16:], mod.qkv.bias[16:].detach(), mod.proj.weight.detach())
        maps.append((nn_ / nn_.sum(-1, keepdim=True)).unsqueeze(1))
    space, time = split_spacetime(maps, frames=2, patches=4, blocks=2)
    items = SpaceTimeItems(8, patch=4, split=lambda e: split_spacetime(e, frames=2, patches=4, blocks=2))
    options = SimpleNamespace(head_fusion="mean", residual=True)
    imp, _ = explain_batch(["norm", "norm_rollout"], model, clip, items, options)
    # norm: the class-token row of the last space map, per frame, over the patches
    expected = space[-1][:, :, 0, 0, 1:].flatten(1)
    assert_close(imp["norm"], expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    rolled = spacetime_rollout(space, time, residual=True).flatten(1)
    assert_close(imp["norm_rollout"], rolled / rolled.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_norm_methods_registered_opt_in_and_accepted_by_params():
    from attnlab import methods
    from attnlab.config import Explain, SpaceTimeExplain, TokensExplain

    for name in ("norm", "norm_rollout"):
        m = methods.get(name)
        assert m.needs == {"norms"} and not m.default and set(m.items) == {"sequence", "tokens", "spacetime"}
        for kind in ("sequence", "tokens", "spacetime"):
            assert name in methods.names(kind) and name not in methods.names(kind, default_only=True)
    for section in (Explain, TokensExplain, SpaceTimeExplain):
        assert section(methods=["norm", "norm_rollout"]).methods == ["norm", "norm_rollout"]
    assert methods.get("norm").summary == ("Kobayashi et al. (2020): ‖Σ_h α f(x)‖, last layer, "
                                           "read out at the explained row")
