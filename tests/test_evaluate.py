"""attnlab.evaluate: faithfulness curves, ground-truth scores, captum baselines.

References are independent: closed forms from hand-set models, literal per-sample
loops, numpy's trapezoid and sklearn's roc_auc_score.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from attnlab.evaluate import (attributions_to_items, deletion_curve, evidence_auroc,
                              input_x_gradient, insertion_curve, integrated_gradients,
                              patch_masker, pointing_game, random_importance, sequence_masker)
from attnlab.models import EncoderClassifier

T, F, C, K = 6, 4, 3, 2          # items, features per item, classes, the one item that matters


class LinearOnItem(nn.Module):
    """logits = W · x[:, k]: only item k matters; a zeroed item k gives logits 0 (chance)."""

    def __init__(self, k: int = K):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(3.0 * torch.randn(C, F, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.k] @ self.weight.T


class AttendsToItem(nn.Module):
    """A 2-head nn.MultiheadAttention with hand-set weights: a fixed query attends
    (score 50 vs 0) to item ``k`` through a one-hot position code that the model adds
    itself; head 0's values copy the item's features, head 1's values are zero
    (an unused head whose out_proj columns are nonzero). Logits = readout of the
    attention output, all biases zero: item k zeroed → logits ≈ 0 → chance."""

    n_heads = 2

    def __init__(self, k: int = K):
        super().__init__()
        e = F + T                                           # features + one-hot position
        d = e // self.n_heads
        gen = torch.Generator().manual_seed(2)
        self.attn = nn.MultiheadAttention(e, self.n_heads, batch_first=True, dropout=0.0)
        w_q, w_k, w_v = torch.zeros(e, e), torch.zeros(e, e), torch.zeros(e, e)
        w_q[0, 0] = 1.0                                     # head 0, dim 0 reads query[0] = 1
        w_k[0, F + k] = 50.0 * math.sqrt(d)                 # ... against key position k
        w_q[d:, :] = torch.randn(e - d, e, generator=gen)   # head 1 attends somewhere
        w_k[d:, :] = torch.randn(e - d, e, generator=gen)
        w_v[:F, :F] = torch.eye(F)                          # head 0 value = the features
        w_out = torch.zeros(e, e)
        w_out[:F, :F] = torch.eye(F)
        w_out[:, d:] = torch.randn(e, e - d, generator=gen)  # head 1 columns nonzero
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(torch.cat([w_q, w_k, w_v]))
            self.attn.in_proj_bias.zero_()
            self.attn.out_proj.weight.copy_(w_out)
            self.attn.out_proj.bias.zero_()
        self.register_buffer("query", torch.eye(e)[None, :1])            # [1, 1, E]
        self.register_buffer("position", torch.eye(T))                   # [T, T]
        self.readout = nn.Linear(e, C, bias=False)
        with torch.no_grad():
            self.readout.weight.copy_(torch.zeros(C, e))
            self.readout.weight[:, :F] = 3.0 * torch.randn(C, F, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.cat([x, self.position.expand(b, -1, -1)], dim=-1)      # [B, T, E]
        out, _ = self.attn(self.query.expand(b, -1, -1), h, h, need_weights=False)
        return self.readout(out[:, 0])


def _inputs(b: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, T, F, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ faithfulness, hand models

@pytest.mark.parametrize("model_cls", [LinearOnItem, AttendsToItem])
def test_deletion_collapses_after_the_item_the_model_reads(model_cls):
    model = model_cls().eval()
    x = _inputs()
    masker = sequence_masker(0.0)
    one_hot = torch.zeros(x.shape[0], T)
    one_hot[:, K] = 1.0
    sensible = {
        "input_x_gradient": input_x_gradient(model, x),
        "integrated_gradients": integrated_gradients(model, x, n_steps=16),
        "ranks_k_first": one_hot,
    }
    chance = 1.0 / C
    for name, imp in sensible.items():
        assert imp.shape == (x.shape[0], T), name
        assert (imp.argmax(dim=1) == K).all(), name
        curve = deletion_curve(model, x, imp, masker)
        assert torch.allclose(curve.fractions, torch.arange(T + 1, dtype=torch.float64) / T)
        assert curve.probs[:, 0].mean() > chance + 0.3, name          # confident at first
        assert torch.allclose(curve.probs[:, 1:], torch.full_like(curve.probs[:, 1:], chance),
                              atol=1e-6), name                        # chance from 1/n on
        ins = insertion_curve(model, x, imp, masker)
        assert torch.allclose(ins.probs[:, 0], torch.full_like(ins.probs[:, 0], chance), atol=1e-6)
        assert torch.allclose(ins.probs[:, 1], curve.probs[:, 0], atol=1e-5), name  # back at once
        assert (ins.auc > curve.auc).all(), name

    rnd = random_importance((x.shape[0], T), seed=0)
    rnd_del = deletion_curve(model, x, rnd, masker)
    sens_del = deletion_curve(model, x, one_hot, masker)
    assert rnd_del.probs[:, 1].mean() > chance + 0.2                  # no collapse on average
    assert rnd_del.auc.mean() > sens_del.auc.mean() + 0.1
    rnd_ins = insertion_curve(model, x, rnd, masker)
    assert rnd_ins.probs[:, 1].mean() < sens_del.probs[:, 0].mean() - 0.2


def _literal_curve(model, x, imp, mode, fill, steps=None, target=None, kwargs_b=None):
    """One perturbed sample per model call, items removed in a Python-sorted order."""
    b, n = imp.shape
    counts = list(range(n + 1)) if steps is None else [round(s / (steps - 1) * n) for s in range(steps)]
    probs = np.zeros((b, len(counts)))
    for i in range(b):
        kw = {} if kwargs_b is None else {k: v[i:i + 1] for k, v in kwargs_b.items()}
        with torch.no_grad():
            t = int(model(x[i:i + 1], **kw).argmax()) if target is None else target
        order = sorted(range(n), key=lambda j: (-float(imp[i, j]), j))
        for s, c in enumerate(counts):
            xi = x[i:i + 1].clone()
            chosen = order[:c] if mode == "deletion" else order[c:]    # items set to baseline
            for j in chosen:
                fill(xi, j)
            with torch.no_grad():
                probs[i, s] = model(xi, **kw).double().softmax(-1)[0, t].item()
    return np.array(counts) / n, probs


def _fill_item(xi, j):
    xi[0, j] = 0.0


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("steps,target", [(None, None), (4, 1)])
def test_curves_match_a_literal_loop_with_ties_and_padding(mode, steps, target):
    torch.manual_seed(0)
    b, n = 5, 7
    model = EncoderClassifier(3, 4, d_model=16, nhead=2, num_layers=1, dim_feedforward=16,
                              dropout=0.0).eval()
    x = torch.randn(b, n, 3)
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[1, -2:] = True
    imp = torch.randint(0, 3, (b, n)).float()                         # many ties
    fn = deletion_curve if mode == "deletion" else insertion_curve
    curve = fn(model, x, imp, sequence_masker(0.0), target=target, steps=steps, batch_size=7,
               forward_kwargs={"padding_mask": padding})
    fractions, probs = _literal_curve(model, x, imp, mode, _fill_item, steps, target,
                                      {"padding_mask": padding})
    np.testing.assert_allclose(curve.fractions.numpy(), fractions)
    np.testing.assert_allclose(curve.probs.numpy(), probs, atol=1e-5)
    np.testing.assert_allclose(curve.auc.numpy(), np.trapezoid(probs, fractions, axis=1), atol=1e-5)


def test_patch_masker_curve_matches_a_literal_loop():
    torch.manual_seed(0)
    b, frames, ch, size, patch = 3, 2, 3, 4, 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(frames * ch * size * size, 5))
    x = torch.randn(b, frames, ch, size, size)
    grid = size // patch
    imp = torch.randn(b, frames * grid * grid)

    def fill(xi, j):                                                  # item j -> frame, row, col
        f, r, c = j // (grid * grid), (j % (grid * grid)) // grid, j % grid
        xi[0, f, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0.5

    curve = deletion_curve(model, x, imp, patch_masker(frames, patch, size, baseline=0.5),
                           batch_size=5)
    _, probs = _literal_curve(model, x, imp, "deletion", fill)
    np.testing.assert_allclose(curve.probs.numpy(), probs, atol=1e-6)


def test_sequence_masker_mean_baseline():
    ref = torch.randn(10, T, F)
    x = torch.randn(2, T, F)
    keep = torch.rand(2, T) > 0.5
    out = sequence_masker("mean", reference=ref)(x, keep)
    mean = ref.mean(dim=(0, 1))
    for i in range(2):
        for j in range(T):
            assert torch.allclose(out[i, j], x[i, j] if keep[i, j] else mean)


def test_random_importance_is_seeded():
    a, b = random_importance((4, 9), seed=3), random_importance((4, 9), seed=3)
    assert a.shape == (4, 9) and torch.equal(a, b)
    assert not torch.equal(a, random_importance((4, 9), seed=4))


def test_bad_arguments_name_the_problem():
    model, x = LinearOnItem(), _inputs(4)
    with pytest.raises(ValueError, match="importance"):
        deletion_curve(model, x, torch.zeros(4, T + 1)[:, :, None], sequence_masker())
    with pytest.raises(ValueError, match="steps"):
        deletion_curve(model, x, torch.zeros(4, T), sequence_masker(), steps=1)
    with pytest.raises(ValueError, match="baseline"):
        sequence_masker("median")
    with pytest.raises(ValueError, match="patch"):
        patch_masker(2, 3, 8)


# ------------------------------------------------------------------ captum baselines

def test_input_x_gradient_of_a_linear_model_is_the_closed_form():
    model, x = LinearOnItem(), _inputs(8)
    target = torch.arange(8) % C
    got = input_x_gradient(model, x, target)
    expected = torch.zeros(8, T)
    expected[:, K] = (x[:, K] * model.weight.detach()[target]).abs().sum(dim=1)
    assert torch.allclose(got, expected, atol=1e-6)
    signed = input_x_gradient(model, x, target, signed=True)
    assert torch.allclose(signed[:, K], (x[:, K] * model.weight.detach()[target]).sum(dim=1), atol=1e-6)


def test_integrated_gradients_completeness_with_padding_kwargs():
    torch.manual_seed(0)
    model = EncoderClassifier(3, 4, d_model=16, nhead=2, num_layers=1, dim_feedforward=16,
                              dropout=0.0).eval()
    x = torch.randn(3, 5, 3)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -1] = True
    kw = {"padding_mask": padding}
    items = integrated_gradients(model, x, 2, n_steps=64, signed=True, forward_kwargs=kw)
    with torch.no_grad():
        gap = model(x, **kw)[:, 2] - model(torch.zeros_like(x), **kw)[:, 2]
    assert items.shape == (3, 5)
    assert torch.allclose(items.sum(dim=1), gap, atol=1e-3)
    assert (integrated_gradients(model, x, 2, n_steps=8, forward_kwargs=kw) >= 0).all()


def test_patch_items_follow_the_masker_order():
    torch.manual_seed(0)
    b, frames, ch, size, patch = 2, 2, 3, 4, 2
    weight = torch.randn(5, frames * ch * size * size)
    model = lambda v: v.flatten(1) @ weight.T                        # noqa: E731
    x = torch.randn(b, frames, ch, size, size)
    got = input_x_gradient(model, x, 0, patch=patch)
    contrib = (x * weight[0].view(frames, ch, size, size)).abs()      # [B, F, C, S, S]
    grid = size // patch
    expected = torch.zeros(b, frames * grid * grid)
    for j in range(frames * grid * grid):
        f, r, c = j // (grid * grid), (j % (grid * grid)) // grid, j % grid
        expected[:, j] = contrib[:, f, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].sum((1, 2, 3))
    assert torch.allclose(got, expected, atol=1e-5)
    assert attributions_to_items(torch.ones(2, 3)).shape == (2, 3)   # plain [B, T] inputs


# ------------------------------------------------------------------ ground truth

@pytest.mark.parametrize("tied", [False, True])
def test_evidence_auroc_matches_sklearn(tied):
    gen = torch.Generator().manual_seed(0)
    b, n = 20, 15
    imp = torch.randint(0, 4, (b, n), generator=gen).float() if tied else torch.randn(b, n, generator=gen)
    evidence = torch.rand(b, n, generator=gen) < 0.3
    evidence[0] = False                                                # one class only -> NaN
    evidence[1] = True
    evidence[2, :2] = True
    result = evidence_auroc(imp, evidence)
    expected = [roc_auc_score(evidence[i].numpy(), imp[i].numpy()) if 0 < evidence[i].sum() < n
                else math.nan for i in range(b)]
    np.testing.assert_allclose(result.per_sample.numpy(), expected, atol=1e-12)
    assert math.isnan(result.per_sample[0]) and math.isnan(result.per_sample[1])
    assert result.mean == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_evidence_auroc_ignores_invalid_items():
    gen = torch.Generator().manual_seed(1)
    b, n = 6, 12
    imp = torch.randint(0, 3, (b, n), generator=gen).float()
    evidence = torch.rand(b, n, generator=gen) < 0.4
    evidence[:, 0], evidence[:, 1] = True, False
    valid = torch.rand(b, n, generator=gen) < 0.7
    valid[:, :2] = True
    imp[~valid] = float("nan")                                         # ignored, not read
    got = evidence_auroc(imp, evidence, valid=valid).per_sample
    for i in range(b):
        v = valid[i]
        assert got[i].item() == pytest.approx(roc_auc_score(evidence[i][v].numpy(), imp[i][v].numpy()))


def test_pointing_game_hand_cases():
    imp = torch.tensor([[0.1, 0.9, 0.3, 0.0],     # top item 1 is evidence -> hit
                        [0.8, 0.1, 0.3, 0.0],     # top item 0 is not -> miss
                        [0.5, 0.5, 0.1, 0.0],     # tie between 0 (no) and 1 (yes) -> 1/2
                        [0.2, 0.2, 0.2, 0.2],     # constant map, 1 of 4 evidence -> 1/4
                        [0.9, 0.1, 0.1, 0.1]])    # no evidence -> not counted
    evidence = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]],
                            dtype=torch.bool)
    assert pointing_game(imp, evidence) == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)
    valid = torch.ones_like(evidence)
    valid[1, 0] = False                           # padding holds the top score: item 2 wins
    assert pointing_game(imp, evidence, valid=valid) == pytest.approx((1 + 1 + 0.5 + 0.25) / 4)
    assert math.isnan(pointing_game(imp[4:], evidence[4:]))


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curves_with_valid_items_run_each_distinct_input_once_and_match_the_full_curves(mode):
    """A causal readout at position p sees items 0..p only: with ``valid`` marking them,
    the curves equal a literal loop over every step (items after p removed or not, the
    output is the same), and the model runs once per distinct (sample, valid items
    touched) pair instead of once per (sample, step)."""
    torch.manual_seed(1)
    b, n, steps = 6, 8, 9
    w = torch.randn(3, 4)

    position = torch.tensor([1, 7, 3, 0, 5, 2])

    def model(x, position):
        causal = torch.arange(n)[None, :, None] <= position[:, None, None]
        return (x * causal).sum(1).tanh() @ w                      # only items <= position count

    calls = []

    def counted(x, position):
        calls.append(len(x))
        return model(x, position)

    x = torch.randn(b, n, 3)
    valid = torch.arange(n)[None, :] <= position[:, None]
    imp = torch.rand(b, n).masked_fill(~valid, -1.0)
    fn = deletion_curve if mode == "deletion" else insertion_curve
    curve = fn(counted, x, imp, sequence_masker(0.0), steps=steps, batch_size=4,
               forward_kwargs={"position": position}, valid=valid)
    fractions, probs = _literal_curve(model, x, imp, mode, _fill_item, steps,
                                      kwargs_b={"position": position})
    np.testing.assert_allclose(curve.fractions.numpy(), fractions)
    np.testing.assert_allclose(curve.probs.numpy(), probs, atol=1e-9)
    counts = torch.round(torch.linspace(0, 1, steps, dtype=torch.float64) * n).long()
    distinct = sum(len(set(torch.minimum(counts, v).tolist())) for v in valid.sum(1))
    assert sum(calls) == b + distinct < b + b * steps               # b: the default target's forward
    with pytest.raises(ValueError, match="valid must be a bool tensor shaped like importance"):
        fn(model, x, imp, sequence_masker(0.0), steps=steps, forward_kwargs={"position": position},
           valid=valid.float())
