"""Property tests (Hypothesis) over the maths: what must hold for *every* valid input,
not just the hand-picked ones of the unit tests.

- rollout: rows of real tokens sum to 1, padded rows and columns are 0, whatever the
  attention, the mask and what the padded entries hold;
- VocabAttention: the tables do not depend on how the stream is cut into batches or
  shards, nor on the layout (dense or sparse) of each aggregator merged (and equal a
  literal loop over the valid pairs);
- spacetime_rollout: permuting the patches (or the frames) of every block the same way
  permutes the result the same way;
- readout and the deletion curve: permuting the samples of a batch permutes the results
  (and each sample's result equals one computed for that sample alone).

Shapes are tiny and the maths runs in float64, so tolerances are ~1e-12. Examples are
derandomized (the same ones on every run, nothing written to disk); to explore further,
raise ``max_examples`` locally.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from attnlab import VocabAttention, readout, rollout, spacetime_rollout
from attnlab.evaluate.faithfulness import deletion_curve, sequence_masker

PROPERTY = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
TOL = dict(rtol=1e-12, atol=1e-12)


def _array(draw, shape, lo=-4.0, hi=4.0):
    """float64 array of ``shape``; values in [lo, hi], each drawn on its own (``fill=nothing``:
    Hypothesis would otherwise fill most of an array with one value, hiding mix-ups)."""
    return draw(hnp.arrays(np.float64, shape, elements=st.floats(lo, hi, allow_nan=False, width=64),
                           fill=st.nothing()))


def _softmax(logits: np.ndarray, keys: np.ndarray | None = None) -> torch.Tensor:
    """Softmax over the last axis (only over ``keys`` where given; 0 on the others)."""
    z = torch.from_numpy(logits)
    if keys is not None:
        z = z.masked_fill(~torch.from_numpy(keys), -torch.inf)
    return torch.nan_to_num(z.softmax(-1), nan=0.0)      # a row without a key: all zero


def _permutation(draw, n: int) -> torch.Tensor:
    return torch.tensor(draw(st.permutations(range(n))), dtype=torch.int64)


# --------------------------------------------------------------------------- rollout
@st.composite
def rollout_inputs(draw):
    b, n, layers = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    real = draw(hnp.arrays(np.bool_, (b, n)))
    junk = draw(st.sampled_from([0.0, 1e3, float("nan")]))     # what padded entries hold: never read
    attentions = []
    for _ in range(layers):
        heads = draw(st.integers(1, 3))
        attn = _softmax(_array(draw, (b, heads, n, n)), keys=np.broadcast_to(real[:, None, None, :], (b, heads, n, n)).copy())
        pad = ~torch.from_numpy(real[:, :, None] & real[:, None, :])[:, None]
        attentions.append(attn.masked_fill(pad, junk))
    options = dict(head_fusion=draw(st.sampled_from(["mean", "max", "min"])), residual=draw(st.booleans()),
                   discard_ratio=draw(st.sampled_from([0.0, 0.3, 0.9])))
    return attentions, torch.from_numpy(real), options


@PROPERTY
@given(rollout_inputs())
def test_rollout_rows_of_real_tokens_sum_to_one(case):
    attentions, real, options = case
    joint = rollout(attentions, mask=real, **options)
    assert joint.dtype == torch.float64 and not joint.isnan().any()
    torch.testing.assert_close(joint.sum(-1), real.double(), **TOL)      # 1 on real rows, 0 on padded ones
    assert (joint >= 0).all()
    assert (joint[~real[:, :, None].expand_as(joint)] == 0).all()       # padded rows...
    assert (joint[~real[:, None, :].expand_as(joint)] == 0).all()       # ...and columns are zero


@PROPERTY
@given(rollout_inputs())
def test_rollout_without_mask_is_row_stochastic(case):
    attentions, real, options = case
    full = [torch.nan_to_num(a, nan=0.5).abs() + 1e-3 for a in attentions]      # every entry positive
    joint = rollout(full, **options)
    torch.testing.assert_close(joint.sum(-1), torch.ones(joint.shape[:2], dtype=torch.float64), **TOL)


# --------------------------------------------------------------------------- VocabAttention
@st.composite
def token_stream(draw):
    s, n, v = draw(st.integers(1, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    heads = draw(st.integers(1, 3))
    tokens = draw(hnp.arrays(np.int64, (s, n), elements=st.integers(0, v - 1)))
    mask = draw(st.none() | hnp.arrays(np.bool_, (s, n)))
    attn = _array(draw, (s, heads, n, n), 0.0, 1.0)        # any non-negative weights (rows need not sum to 1)
    cuts = sorted(draw(st.sets(st.integers(1, s - 1), max_size=s - 1)) if s > 1 else set())
    bounds = list(zip([0, *cuts], [*cuts, s]))
    shards = draw(st.lists(st.integers(0, 2), min_size=len(bounds), max_size=len(bounds)))
    return dict(tokens=tokens, mask=mask, attn=attn, v=v, heads=heads, causal=draw(st.booleans()),
                per_head=draw(st.booleans()), bounds=bounds, shards=shards, trim=draw(st.booleans()),
                layouts=draw(st.lists(st.booleans(), min_size=5, max_size=5)))   # sparse=? per aggregator


def _literal_tables(tokens, attn, mask, v, causal, per_head):
    """sum / count / expected by a loop over every valid (query, key) pair."""
    s, heads, n, _ = attn.shape
    valid = np.ones((s, n), bool) if mask is None else mask
    total = np.zeros((heads, v, v)) if per_head else np.zeros((v, v))
    count, expected = np.zeros((v, v), np.int64), np.zeros((v, v))
    for b in range(s):
        for i in range(n):
            keys = [j for j in range(n) if valid[b, i] and valid[b, j] and (j <= i or not causal)]
            for j in keys:
                q, k = tokens[b, i], tokens[b, j]
                if per_head:
                    total[:, q, k] += attn[b, :, i, j]
                else:
                    total[q, k] += attn[b, :, i, j].mean()
                count[q, k] += 1
                expected[q, k] += 1.0 / len(keys)
    return total, count, expected


def _feed(agg, tokens, attn, mask, causal, trim):
    """One update; with ``trim``, first cut the trailing positions no sequence of the batch uses."""
    if trim and mask is not None:
        used = np.flatnonzero(mask.any(axis=0))
        n = int(used[-1]) + 1 if used.size else 0
        tokens, attn, mask = tokens[:, :n], attn[:, :, :n, :n], mask[:, :n]
    agg.update(torch.from_numpy(tokens), torch.from_numpy(attn),
               mask=None if mask is None else torch.from_numpy(mask), causal=causal)


@PROPERTY
@given(token_stream())
def test_vocab_attention_does_not_depend_on_batches_or_shards(case):
    c = case
    nhead = c["heads"] if c["per_head"] else None
    # each aggregator draws its layout (dense [V, V] tables or sparse sorted pairs): merges mix them
    one_pass = VocabAttention(c["v"], nhead=nhead, sparse=c["layouts"][0])
    _feed(one_pass, c["tokens"], c["attn"], c["mask"], c["causal"], trim=False)

    total, count, expected = _literal_tables(c["tokens"], c["attn"], c["mask"], c["v"], c["causal"], c["per_head"])
    np.testing.assert_array_equal(one_pass.count, count)
    np.testing.assert_allclose(one_pass.sum, total, **TOL)
    np.testing.assert_allclose(one_pass.expected, expected, **TOL)

    shards = [VocabAttention(c["v"], nhead=nhead, sparse=sparse) for sparse in c["layouts"][1:4]]
    for (lo, hi), shard in zip(c["bounds"], c["shards"]):
        _feed(shards[shard], c["tokens"][lo:hi], c["attn"][lo:hi],
              None if c["mask"] is None else c["mask"][lo:hi], c["causal"], c["trim"])
    merged = VocabAttention(c["v"], nhead=nhead, sparse=c["layouts"][4])
    for shard in reversed(shards):
        merged.merge(shard)
    assert merged.n_sequences == one_pass.n_sequences == len(c["tokens"])
    np.testing.assert_array_equal(merged.count, one_pass.count)
    np.testing.assert_allclose(merged.sum, one_pass.sum, **TOL)
    np.testing.assert_allclose(merged.expected, one_pass.expected, **TOL)
    np.testing.assert_allclose(merged.lift(), one_pass.lift(), **TOL)      # NaN in the same cells
    np.testing.assert_allclose(merged.mean(), one_pass.mean(), **TOL)


# --------------------------------------------------------------------------- spacetime_rollout
@st.composite
def spacetime_inputs(draw):
    b, f, p, blocks = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                       draw(st.integers(1, 2)))
    heads = draw(st.integers(1, 2))
    space = [_softmax(_array(draw, (b, f, heads, 1 + p, 1 + p))) for _ in range(blocks)]
    time = [_softmax(_array(draw, (b, p, heads, f, f))) for _ in range(blocks)]
    options = dict(head_fusion=draw(st.sampled_from(["mean", "max", "min"])), residual=draw(st.booleans()))
    return space, time, options, _permutation(draw, p), _permutation(draw, f)


@PROPERTY
@given(spacetime_inputs())
def test_spacetime_rollout_is_equivariant_under_patch_permutations(case):
    space, time, options, perm, _ = case
    out = spacetime_rollout(space, time, **options)                          # [B, F, P]
    tok = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + perm])            # class token stays at 0
    space_p = [s[..., tok, :][..., tok] for s in space]                      # new patch q = old patch perm[q]
    time_p = [t[:, perm] for t in time]
    torch.testing.assert_close(spacetime_rollout(space_p, time_p, **options), out[:, :, perm], **TOL)


@PROPERTY
@given(spacetime_inputs())
def test_spacetime_rollout_is_equivariant_under_frame_permutations(case):
    space, time, options, _, perm = case
    out = spacetime_rollout(space, time, **options)
    space_p = [s[:, perm] for s in space]
    time_p = [t[..., perm, :][..., perm] for t in time]
    torch.testing.assert_close(spacetime_rollout(space_p, time_p, **options), out[:, perm], **TOL)


# --------------------------------------------------------------------------- readout
@st.composite
def readout_inputs(draw):
    b, n = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    joint = torch.from_numpy(_array(draw, (b, n, n), 0.0, 1.0))
    how = draw(st.sampled_from(["cls", "mean", "int", "tensor"]))
    mask = None
    if how == "mean":
        mask = draw(st.none() | hnp.arrays(np.bool_, (b, n)).map(torch.from_numpy))
    elif how == "int":
        how = draw(st.integers(-n, n - 1))
    elif how == "tensor":
        how = torch.tensor(draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b)), dtype=torch.int64)
    return joint, how, mask, _permutation(draw, b)


def _readout_one(joint_nn, how, real):
    """One sample's row, literally."""
    if how == "cls":
        return joint_nn[0]
    if how == "mean":
        rows = joint_nn if real is None else joint_nn[real]
        return rows.mean(0) if len(rows) else torch.zeros(joint_nn.shape[1], dtype=joint_nn.dtype)
    return joint_nn[int(how)]


@PROPERTY
@given(readout_inputs())
def test_readout_follows_the_samples(case):
    joint, how, mask, perm = case
    out = readout(joint, how, mask=mask)
    how_p = how[perm] if isinstance(how, torch.Tensor) else how
    torch.testing.assert_close(readout(joint[perm], how_p, mask=None if mask is None else mask[perm]),
                               out[perm], **TOL)
    each = [_readout_one(joint[b], how[b] if isinstance(how, torch.Tensor) else how,
                         None if mask is None else mask[b]) for b in range(len(joint))]
    torch.testing.assert_close(out, torch.stack(each), **TOL)


# --------------------------------------------------------------------------- deletion curve
class _Linear(nn.Module):
    """A per-sample model (no batch statistics): logits = W · flatten(x)."""

    def __init__(self, t, d, classes, seed):
        super().__init__()
        self.w = nn.Parameter(torch.randn(t * d, classes, generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w


@st.composite
def curve_inputs(draw):
    b, t, d, classes = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 2)), draw(st.integers(2, 3))
    x = torch.from_numpy(_array(draw, (b, t, d), -2.0, 2.0))
    # few distinct scores: ties are common and must be broken by item index, per sample
    importance = torch.tensor(draw(st.lists(st.lists(st.integers(0, 3), min_size=t, max_size=t),
                                            min_size=b, max_size=b)), dtype=torch.float64)
    target = draw(st.none() | st.lists(st.integers(0, classes - 1), min_size=b, max_size=b).map(torch.tensor))
    steps = draw(st.none() | st.integers(2, 5))
    batch_size = draw(st.integers(1, 7))                     # chunks cut across samples and steps
    return _Linear(t, d, classes, draw(st.integers(0, 3))), x, importance, target, steps, batch_size, \
        _permutation(draw, b)


def _deletion_one(model, x_td, importance_t, target, steps):
    """One sample's deletion curve, literally: remove the k most important items (ties:
    lower index first) for each k of the curve and read the target's probability."""
    t = len(importance_t)
    order = sorted(range(t), key=lambda i: (-float(importance_t[i]), i))
    ks = range(t + 1) if steps is None else [round(s * t / (steps - 1)) for s in range(steps)]
    if target is None:
        target = int(model(x_td[None]).argmax())
    probs = []
    for k in ks:
        x = x_td.clone()
        x[order[:k]] = 0.0
        probs.append(float(model(x[None]).softmax(-1)[0, target]))
    return torch.tensor(probs, dtype=torch.float64)


@PROPERTY
@given(curve_inputs())
def test_deletion_curve_follows_the_samples(case):
    model, x, importance, target, steps, batch_size, perm = case
    run = lambda x, imp, tgt: deletion_curve(model, x, imp, sequence_masker(0.0), target=tgt,  # noqa: E731
                                             steps=steps, batch_size=batch_size)
    with torch.no_grad():
        curve = run(x, importance, target)
        permuted = run(x[perm], importance[perm], None if target is None else target[perm])
        each = torch.stack([_deletion_one(model, x[b], importance[b], None if target is None else int(target[b]),
                                          steps) for b in range(len(x))])
    torch.testing.assert_close(permuted.fractions, curve.fractions, rtol=0, atol=0)
    assert torch.equal(permuted.target, curve.target[perm])
    torch.testing.assert_close(permuted.probs, curve.probs[perm], **TOL)
    torch.testing.assert_close(permuted.auc, curve.auc[perm], **TOL)
    torch.testing.assert_close(curve.probs, each, **TOL)
