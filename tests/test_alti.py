"""ALTI (Ferrando et al., 2022): :mod:`attnlab.explain.alti` and the ``alti`` method.

References, independent of the code under test: each layer's own forward (torch's
``nn.MultiheadAttention`` / ``nn.LayerNorm``, Hugging Face's ``BertAttention``, the
project's space-time block), per-(i, j) loops of the paper's formulas written plainly
here, literal matrix products, and dense joint matrices for the space-time rollout.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab.explain import readout, spacetime_rollout
from attnlab.explain.alti import (alti_layers, alti_rollout, attention_probs, block_weights, contributions,
                                  transformed_vectors)
from helpers import snapshot

B, N, D, H = 3, 6, 16, 4


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial biases and layer-norm parameters (fresh ones are 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def masks(kind: str):
    """``(attn_mask [N, N] or None, key_padding_mask [B, N] bool or None, is_causal)``."""
    if kind == "none":
        return None, None, False
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 5:] = True
    if kind == "padding":
        return None, pad, False
    return nn.Transformer.generate_square_subsequent_mask(N), pad, True


def layer_block_output(layer: nn.TransformerEncoderLayer, x, attn_mask, pad, is_causal):
    """The attention block's output by the layer's own modules: post-LN ``norm1(x + sa(x))``,
    pre-LN ``x + sa(norm1(x))`` (batch-first ``[B, N, D]`` in and out)."""
    first = layer.self_attn.batch_first
    xin = x if first else x.transpose(0, 1)
    h = layer.norm1(xin) if layer.norm_first else xin
    sa, probs = layer.self_attn(h, h, h, attn_mask=attn_mask, key_padding_mask=pad, need_weights=True,
                                average_attn_weights=False)
    y = xin + sa if layer.norm_first else layer.norm1(xin + sa)
    return (y if first else y.transpose(0, 1)), probs


def additive(attn_mask, pad):
    total = torch.zeros(B, 1, N, N)
    if attn_mask is not None:
        total = total + attn_mask
    if pad is not None:
        total = total.masked_fill(pad[:, None, None, :], float("-inf"))
    return total


# ------------------------------------------------------------------ the decomposition
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformed_vectors_sum_to_the_encoder_layers_output(norm_first, mask, batch_first):
    torch.manual_seed(1)
    layer = perturbed(nn.TransformerEncoderLayer(D, H, 2 * D, dropout=0.1, batch_first=batch_first,
                                                 norm_first=norm_first))
    x = torch.randn(B, N, D)
    attn_mask, pad, causal = masks(mask)
    with torch.no_grad():
        y_ref, probs_ref = layer_block_output(layer, x, attn_mask, pad, causal)
        block = block_weights(layer)
        probs = attention_probs(block, x, additive(attn_mask, pad))
        torch.testing.assert_close(probs, probs_ref, atol=1e-6, rtol=1e-5)
        t, eps, y = transformed_vectors(block, x, probs)
    assert t.shape == (B, N, N, D) and eps.shape == (B, N, D)
    torch.testing.assert_close(t.sum(2) + eps, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    if mask != "none":                      # a masked key transforms into nothing (j != i)
        blocked = torch.isinf(additive(attn_mask, pad))[:, 0] & ~torch.eye(N, dtype=torch.bool)
        assert t[blocked].abs().max() == 0


def test_each_transformed_vector_against_a_literal_loop_post_ln():
    """T_i(x_j) = γ ⊙ L(Σ_h α^h_ij W_O^h (W_V^h x_j + b_V^h) + δ_ij x_i) / σ(ỹ_i), per (i, j)."""
    torch.manual_seed(2)
    layer = perturbed(nn.TransformerEncoderLayer(D, H, 2 * D, batch_first=True), seed=3)
    x = torch.randn(1, N, D)
    mha, ln = layer.self_attn, layer.norm1
    dh = D // H
    with torch.no_grad():
        _, alpha = mha(x, x, x, need_weights=True, average_attn_weights=False)       # [1, H, N, N]
        t, eps, _ = transformed_vectors(block_weights(layer), x, alpha)
        w_v, b_v = mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:]
        w_o, b_o = mha.out_proj.weight, mha.out_proj.bias
        pre = x[0] + mha(x, x, x, need_weights=False)[0][0]                          # ỹ  [N, D]
        for i in range(N):
            sigma = torch.sqrt(((pre[i] - pre[i].mean()) ** 2).mean() + ln.eps)
            for j in range(N):
                theta = torch.zeros(D)
                for h in range(H):
                    v = w_v[h * dh:(h + 1) * dh] @ x[0, j] + b_v[h * dh:(h + 1) * dh]
                    theta += alpha[0, h, i, j] * (w_o[:, h * dh:(h + 1) * dh] @ v)
                if i == j:
                    theta += x[0, i]
                expected = ln.weight * (theta - theta.mean()) / sigma
                torch.testing.assert_close(t[0, i, j], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(eps[0, i], ln.weight * (b_o - b_o.mean()) / sigma + ln.bias,
                                       atol=1e-5, rtol=1e-5)


transformers = None
try:
    import transformers  # noqa: F811
except ImportError:         # pragma: no cover - the HF test is skipped
    pass


@pytest.mark.skipif(transformers is None, reason="needs transformers (requirements-test.txt)")
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformed_vectors_sum_to_a_bert_attention_output(impl):
    """A tiny random BERT (offline): BertSelfAttention + BertSelfOutput (dense, LayerNorm(h + x))."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                  intermediate_size=2 * D, max_position_embeddings=16)
    model = perturbed(transformers.BertModel._from_config(cfg, attn_implementation=impl), seed=5)
    ids = torch.randint(3, 40, (B, N))
    keep = torch.ones(B, N, dtype=torch.long)
    keep[0, 4:] = 0
    seen = []
    attn = model.encoder.layer[1].attention
    hook = attn.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=keep)
    finally:
        hook.remove()
    (args, kwargs), = seen
    hidden, mask = args[0], args[1]
    with torch.no_grad():
        y_ref = attn(hidden, mask)[0]                            # Hugging Face's own forward
        scores_mask = torch.zeros(B, 1, 1, N).masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
        block = block_weights(attn)
        t, eps, _ = transformed_vectors(block, hidden, attention_probs(block, hidden, scores_mask))
    torch.testing.assert_close(t.sum(2) + eps, y_ref, atol=1e-5, rtol=1e-5)
    # and through the model: the per-layer matrices of one forward (mask read from the call)
    layers = alti_layers(model, lambda: model(input_ids=ids, attention_mask=keep))
    assert len(layers) == 2 and all(c.shape == (B, N, N) for c in layers)
    assert layers[1][0, :4, 4:].abs().max() == 0                 # padded keys give real tokens nothing


# ------------------------------------------------------------------ contributions, rollout
def test_contributions_against_a_literal_loop():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 4, 4, 5, generator=g)
    y = t.sum(2) + 0.1 * torch.randn(2, 4, 5, generator=g)
    t[0, 1, 3] = 0.0                                               # a token that gives nothing
    t[1, 2, 0] = 40.0                                              # far from y: clamped to 0
    c = contributions(t, y)
    ref = torch.zeros(2, 4, 4)
    for b in range(2):
        for i in range(4):
            norm_y = sum(abs(float(v)) for v in y[b, i])
            raw = []
            for j in range(4):
                dist = sum(abs(float(y[b, i, k] - t[b, i, j, k])) for k in range(5))
                raw.append(max(0.0, -dist + norm_y))
            for j in range(4):
                ref[b, i, j] = raw[j] / sum(raw)
    torch.testing.assert_close(c, ref, atol=1e-6, rtol=1e-5)
    assert c[0, 1, 3] == 0 and c[1, 2, 0] == 0


def test_rollout_is_the_literal_matrix_product():
    g = torch.Generator().manual_seed(6)
    layers = [torch.rand(2, 4, 4, generator=g) for _ in range(3)]
    joint = alti_rollout(layers)
    ref = torch.zeros(2, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):                                     # (C3 · C2 · C1)[i, j]
                ref[b, i, j] = sum(float(layers[2][b, i, k]) * float(layers[1][b, k, m]) * float(layers[0][b, m, j])
                                   for k in range(4) for m in range(4))
    torch.testing.assert_close(joint, ref, atol=1e-6, rtol=1e-5)


class Encoder(nn.Module):
    """A user's encoder: Linear -> nn.TransformerEncoder -> mean pooling -> classes."""

    def __init__(self, norm_first: bool, layers: int = 3):
        super().__init__()
        self.embed = nn.Linear(5, D)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 2 * D, batch_first=True,
                                                                        norm_first=norm_first),
                                             layers, enable_nested_tensor=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x, pad=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=pad).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_method_equals_the_product_of_per_layer_literal_contributions(norm_first):
    """The registered method end to end vs. each layer's block re-run by torch (inputs taken
    layer by layer), contributions by the paper's loop, and the literal product."""
    from attnlab.attribution import explain_batch
    from attnlab.items import SequenceItems
    from types import SimpleNamespace

    torch.manual_seed(7)
    model = perturbed(Encoder(norm_first), seed=8)
    x = torch.randn(B, N, 5)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, 5:] = True
    fwd = lambda m, xb: m(xb, pad)                                   # noqa: E731
    imp, _ = explain_batch(["alti"], model, x, SequenceItems(N, "mean"), SimpleNamespace(), forward=fwd)
    # reference: walk the layers by hand
    with torch.no_grad():
        h = model.embed(x)
        per_layer = []
        for layer in model.encoder.layers:
            y, _ = layer_block_output(layer, h, None, pad, False)
            block = block_weights(layer)
            t, eps, _ = transformed_vectors(block, h, attention_probs(block, h, additive(None, pad)))
            torch.testing.assert_close(t.sum(2) + eps, y, atol=1e-5, rtol=1e-5)
            c = torch.zeros(B, N, N)
            for b in range(B):
                for i in range(N):
                    row = [max(0.0, float(y[b, i].abs().sum() - (y[b, i] - t[b, i, j]).abs().sum())) for j in range(N)]
                    for j in range(N):
                        c[b, i, j] = row[j] / sum(row)
            per_layer.append(c)
            h = layer(h, src_key_padding_mask=pad)
    joint = per_layer[0]
    for c in per_layer[1:]:
        joint = torch.einsum("bik,bkj->bij", c, joint)
    expected = joint.mean(1)
    torch.testing.assert_close(imp["alti"], expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_the_model_is_left_exactly_as_it_was():
    torch.manual_seed(9)
    model = perturbed(Encoder(False), seed=1).train()
    before = snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(B, N, 5)
    layers = alti_layers(model, lambda: model(x))
    assert len(layers) == 3 and model.training
    assert snapshot(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_causal_lm_rows_see_only_the_past_and_padding_gives_nothing():
    from attnlab.attribution import explain_batch
    from attnlab.items import SequenceItems
    from attnlab.models.causal import CausalTransformerLM
    from types import SimpleNamespace

    for norm_first in (False, True):
        torch.manual_seed(10)
        model = perturbed(CausalTransformerLM(12, d_model=D, nhead=H, num_layers=2, max_len=N,
                                              norm_first=norm_first), seed=2)
        tokens = torch.randint(0, 12, (B, N))
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, 3:] = False
        layers = alti_layers(model, lambda: model(tokens, mask))
        joint = alti_rollout(layers)
        assert torch.all(joint.triu(1) == 0)                              # causal: nothing from the future
        assert joint[1, :3, 3:].abs().max() == 0                          # padding gives real tokens nothing
        torch.testing.assert_close(joint.sum(-1), torch.ones(B, N))
        position = torch.tensor([5, 2, 4])
        options = SimpleNamespace(head_fusion="mean", residual=True, discard_ratio=0.0)
        imp, _ = explain_batch(["alti"], model, tokens, SequenceItems(N, position, token_ids=True), options,
                               forward=lambda m, xb: m(xb, mask)[torch.arange(B), position])
        rel = readout(joint, position)
        torch.testing.assert_close(imp["alti"], rel / rel.sum(-1, keepdim=True))
        assert torch.all(imp["alti"] >= 0)


# ------------------------------------------------------------------ space-time
def test_spacetime_blocks_decompose_exactly_and_roll_out_densely():
    from attnlab.attribution import explain_batch
    from attnlab.items import SpaceTimeItems
    from attnlab.models.spacetime import DividedSpaceTimeTransformer
    from types import SimpleNamespace

    torch.manual_seed(11)
    frames, patches = 3, 4
    model = perturbed(DividedSpaceTimeTransformer(3, frames=frames, size=8, patch=4, d_model=8, nhead=2,
                                                  num_layers=2), seed=4)
    clip = torch.randn(2, frames, 1, 8, 8)
    layers = alti_layers(model, lambda: model(clip))
    assert len(layers) == 2 and all(c[0] == "spacetime" for c in layers)
    # dense reference: joint (1 + F·P)² matrices, token 0 = class, 1 + f·P + p = patch p of frame f
    n = 1 + frames * patches
    joint = torch.eye(n).expand(2, n, n)
    for _, space, time in layers:
        t_mat = torch.zeros(2, n, n)
        s_mat = torch.zeros(2, n, n)
        t_mat[:, 0, 0] = 1
        for f in range(frames):
            for p in range(patches):
                for f2 in range(frames):
                    t_mat[:, 1 + f * patches + p, 1 + f2 * patches + p] = time[:, p, f, f2]
                s_mat[:, 1 + f * patches + p, 0] = space[:, f, 1 + p, 0]
                for p2 in range(patches):
                    s_mat[:, 1 + f * patches + p, 1 + f * patches + p2] = space[:, f, 1 + p, 1 + p2]
                # the class token: the mean over frames of its per-frame copies' rows
                s_mat[:, 0, 1 + f * patches + p] = space[:, f, 0, 1 + p] / frames
            s_mat[:, 0, 0] += space[:, f, 0, 0] / frames
        joint = s_mat @ t_mat @ joint
    expected = joint[:, 0, 1:]
    items = SpaceTimeItems(frames * patches, patch=4, split=None)
    imp, _ = explain_batch(["alti"], model, clip, items, SimpleNamespace(head_fusion="mean", residual=True))
    torch.testing.assert_close(imp["alti"], expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(spacetime_rollout([s for _, s, _ in layers], [t for _, _, t in layers],
                                                 residual=False).flatten(1), expected, atol=1e-5, rtol=1e-4)


def test_spacetime_stage_sums_to_the_stage_output():
    from attnlab.explain.alti import _spacetime_weights
    from attnlab.models.spacetime import DividedBlock

    torch.manual_seed(12)
    blk = perturbed(DividedBlock(8, 2), seed=6)
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        ref = x + blk.attn_time(blk.norm_time(x))
        w = _spacetime_weights(blk.attn_time, blk.norm_time)
        t, eps, _ = transformed_vectors(w, x, attention_probs(w, x))
    torch.testing.assert_close(t.sum(2) + eps, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ refusals and registry
class OwnAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


def test_models_without_a_rule_are_refused_in_one_line():
    model = OwnAttention().eval()
    with pytest.raises(ValueError, match=r"^alti has no rule for module 'attn' \(torch\.nn\.modules\.activation"
                                         r"\.MultiheadAttention\); supported: nn\.TransformerEncoderLayer") as err:
        alti_layers(model, lambda: model(torch.randn(1, 3, D)))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^alti found no attention block in Linear"):
        alti_layers(nn.Linear(3, 3), lambda: None)
    odd = nn.TransformerEncoderLayer(D, H, batch_first=True)
    odd.self_attn = nn.MultiheadAttention(D, H, batch_first=True, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        alti_layers(odd, lambda: None)


@pytest.mark.skipif(transformers is None, reason="needs transformers (requirements-test.txt)")
def test_hugging_face_timesformer_is_refused():
    cfg = transformers.TimesformerConfig(image_size=8, patch_size=4, num_channels=1, num_frames=2, hidden_size=8,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = transformers.TimesformerModel._from_config(cfg).eval()
    with pytest.raises(ValueError, match=r"^alti has no rule for module '.*' \(transformers\.models\.timesformer"):
        alti_layers(model, lambda: None)


def test_registered_for_every_attention_item_kind_with_reruns_and_module():
    from attnlab import methods

    m = methods.get("alti")
    assert m.needs == {"reruns", "module"} and not m.default          # listed by the experiments that run it
    assert set(m.items) == {"sequence", "tokens", "spacetime"} and set(m.unsupported) == {"video:hf_timesformer"}
    assert m.summary.endswith("cost: one forward re-run + B·N²·D·H per layer")
    for kind in ("motion", "frames", "tokens", "video", "pretrained", "external"):
        assert methods.check_experiment(["alti"], kind) == ["alti"]
