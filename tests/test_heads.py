"""attnlab.evaluate.heads: diagnostics on hand-made patterns, head ablation.

References: closed forms for uniform / diagonal / single-column attention, a dense
per-head recomputation of nn.MultiheadAttention, and a hand-set model whose ablated
output is known (logits 0 → chance).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnlab.evaluate import HeadStats, ablate_heads, head_diagnostics, head_importance
from attnlab.models import EncoderClassifier
from test_evaluate import C, AttendsToItem, _inputs


def uniform(b, h, n):
    return torch.full((b, h, n, n), 1.0 / n)


def diagonal(b, h, n):
    return torch.eye(n).expand(b, h, n, n).clone()


def column(b, h, n, j):
    a = torch.zeros(b, h, n, n)
    a[..., j] = 1.0
    return a


def uniform_locality(n):
    """Mean |i - j| over all i, j in 0..n-1."""
    return (n * n - 1) / (3 * n)


N, KTOP = 10, 2


def test_closed_forms_of_uniform_diagonal_and_column():
    # layer 0: head 0 uniform, head 1 diagonal; layer 1: head 0 column 3, head 1 uniform
    layer0 = torch.cat([uniform(3, 1, N), diagonal(3, 1, N)], dim=1)
    layer1 = torch.cat([column(3, 1, N, 3), uniform(3, 1, N)], dim=1)
    out = head_diagnostics([layer0, layer1], k=KTOP)
    assert set(out) == {"entropy", "sink", "locality", "locality_norm"}
    assert all(v.shape == (2, 2) for v in out.values())
    col_loc = sum(abs(i - 3) for i in range(N)) / N
    expected = {
        "entropy": [[1.0, 0.0], [0.0, 1.0]],
        "sink": [[KTOP / N, KTOP / N], [1.0, KTOP / N]],
        "locality": [[uniform_locality(N), 0.0], [col_loc, uniform_locality(N)]],
        "locality_norm": [[uniform_locality(N) / N, 0.0], [col_loc / N, uniform_locality(N) / N]],
    }
    for key, value in expected.items():
        assert torch.allclose(out[key], torch.tensor(value, dtype=torch.float64), atol=1e-6), key


def test_default_k_and_half_precision():
    n = 40                                                  # default k = 40 // 20 = 2
    out = head_diagnostics([uniform(2, 1, n).half(), column(2, 1, n, 0).half()])
    assert out["sink"][0, 0].item() == pytest.approx(2 / n, abs=1e-3)
    assert out["sink"][1, 0].item() == pytest.approx(1.0, abs=1e-3)
    assert out["entropy"][0, 0].item() == pytest.approx(1.0, abs=1e-3)


def test_padding_mask_is_respected():
    n, valid = 6, [4, 6]
    real = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])      # True = real token
    attn = torch.zeros(2, 1, n, n)
    attn[0, :, :, :4] = 0.25                                # uniform over the 4 valid keys
    attn[0, :, 4:, :] = torch.rand(2, n).softmax(-1)        # padded queries: anything
    attn[1] = 1.0 / 6
    out = head_diagnostics([attn], mask=real, k=1)
    assert out["entropy"].item() == pytest.approx(1.0)
    loc = [uniform_locality(m) for m in valid]
    assert out["locality"].item() == pytest.approx((4 * loc[0] + 6 * loc[1]) / 10)
    assert out["locality_norm"].item() == pytest.approx((4 * loc[0] / 4 + 6 * loc[1] / 6) / 10)
    assert out["sink"].item() == pytest.approx((1 / 4 + 1 / 6) / 2)
    with pytest.raises(ValueError, match="mask"):
        head_diagnostics([attn], mask=real[:, :5])


def test_causal_uniform():
    n = 8
    attn = torch.tril(torch.ones(n, n))
    attn = (attn / attn.sum(-1, keepdim=True)).expand(2, 1, n, n)
    out = head_diagnostics([attn], causal=True)
    assert out["entropy"].item() == pytest.approx(1.0)              # query 0 (one key) skipped
    assert out["locality"].item() == pytest.approx(sum(i / 2 for i in range(n)) / n)


def test_streaming_pools_over_batches_and_merges():
    stats = HeadStats(k=KTOP)
    stats.update([uniform(2, 2, N)]).update([diagonal(1, 2, N)])
    out = stats.result()
    assert torch.allclose(out["entropy"], torch.full((1, 2), 2 / 3, dtype=torch.float64))
    assert torch.allclose(out["locality"],
                          torch.full((1, 2), 2 / 3 * uniform_locality(N), dtype=torch.float64))
    shard_a, shard_b = HeadStats(k=KTOP), HeadStats(k=KTOP)
    shard_a.update([uniform(2, 2, N)])
    shard_b.update([diagonal(1, 2, N)])
    merged = shard_a.merge(shard_b).result()
    for key in out:
        assert torch.allclose(merged[key], out[key])
    with pytest.raises(ValueError, match="layers"):
        stats.update([uniform(1, 2, N), uniform(1, 2, N)])
    with pytest.raises(ValueError, match="before any update"):
        HeadStats().result()


# ------------------------------------------------------------------ ablation

class Wrapper(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def dense_mha(mha: nn.MultiheadAttention, x: torch.Tensor, zero_heads=()) -> torch.Tensor:
    """nn.MultiheadAttention (batch_first, self-attention) recomputed head by head."""
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    q, k, v = (x @ mha.in_proj_weight.T + mha.in_proj_bias).split(e, dim=-1)
    heads = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        probs = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)).softmax(-1)
        out = probs @ v[..., sl]
        heads.append(torch.zeros_like(out) if i in zero_heads else out)
    return mha.out_proj(torch.cat(heads, dim=-1))


def test_ablation_matches_a_dense_recomputation_and_restores_weights():
    torch.manual_seed(0)
    model = Wrapper(nn.MultiheadAttention(12, 3, batch_first=True)).eval()
    x = torch.randn(2, 5, 12)
    original = model.attn.out_proj.weight.detach().clone()
    param = model.attn.out_proj.weight
    with torch.no_grad():
        assert torch.allclose(model(x), dense_mha(model.attn, x), atol=1e-5)
        with ablate_heads(model, {"attn": [0, 2]}):
            ablated = model(x)
        expected = dense_mha(model.attn, x, zero_heads=(0, 2))
    assert torch.allclose(ablated, expected, atol=1e-5)
    assert model.attn.out_proj.weight is param and torch.equal(param, original)

    with pytest.raises(RuntimeError, match="boom"):
        with ablate_heads(model, {"attn": [1]}):
            assert not torch.equal(param, original)
            raise RuntimeError("boom")
    assert torch.equal(param, original)
    with pytest.raises(ValueError, match="heads"):
        with ablate_heads(model, {"attn": [3]}):
            pass
    with pytest.raises(TypeError, match="MultiheadAttention"):
        with ablate_heads(nn.Sequential(nn.Linear(2, 2)), {"0": [0]}):
            pass
    assert torch.equal(param, original)


def test_ablating_an_unused_head_changes_nothing():
    torch.manual_seed(0)
    model = Wrapper(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    with torch.no_grad():
        model.attn.out_proj.weight[:, 4:] = 0.0                      # head 1 never reaches out
        x = torch.randn(3, 4, 8)
        base = model(x)
        with ablate_heads(model, {"attn": [1]}):
            assert torch.equal(model(x), base)
        with ablate_heads(model, {"attn": [0]}):
            assert not torch.allclose(model(x), base, atol=1e-3)


def test_ablation_in_the_transformer_encoder_fast_path():
    torch.manual_seed(0)
    model = EncoderClassifier(3, 4, d_model=16, nhead=4, num_layers=2, dim_feedforward=16,
                              dropout=0.0).eval()
    x = torch.randn(4, 6, 3)
    heads = {"encoder.layers.1.self_attn": [0, 3]}
    with torch.no_grad():
        base = model(x)
        with ablate_heads(model, heads):
            fast = model(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with ablate_heads(model, heads):
                slow = model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert not torch.allclose(fast, base, atol=1e-4)
    assert torch.allclose(model(x), base, atol=1e-6)


def test_head_importance_of_a_hand_set_model():
    model = AttendsToItem().eval()
    batches = [_inputs(16, seed=s) for s in (0, 1)]
    with torch.no_grad():
        preds = [model(x).argmax(-1) for x in batches]
        p_orig = torch.cat([model(x).double().softmax(-1).max(-1).values for x in batches])
    result = head_importance(model, list(zip(batches, preds)), ["attn"])
    assert result.names == ["attn"]
    assert result.accuracy_drop.shape == result.prob_drop.shape == (1, 2)
    assert result.accuracy == 1.0 and result.prob == pytest.approx(p_orig.mean().item())
    # head 1 (zero values) is unused
    assert abs(result.prob_drop[0, 1].item()) < 1e-9 and result.accuracy_drop[0, 1].item() == 0.0
    # head 0 carries everything: without it logits are 0, every class at 1/C, argmax = class 0
    pred = torch.cat(preds)
    assert result.prob_drop[0, 0].item() == pytest.approx(p_orig.mean().item() - 1 / C, abs=1e-6)
    assert result.accuracy_drop[0, 0].item() == pytest.approx(1.0 - (pred == 0).double().mean().item())

    unlabelled = head_importance(model, [(x, None) for x in batches], ["attn"], nhead=2)
    assert math.isnan(unlabelled.accuracy) and torch.isnan(unlabelled.accuracy_drop).all()
    assert torch.allclose(unlabelled.prob_drop, result.prob_drop)
