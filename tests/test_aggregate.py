"""VocabAttention against a literal triple loop over (sequence, query, key)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.aggregate import VocabAttention


def loop_reference(tokens, attention, mask, causal, vocab_size, per_head):
    """Pure-Python b/i/j loops: sum [H or 1, V, V], count [V, V], expected [V, V]."""
    tokens = np.asarray(tokens).tolist()
    attention = np.asarray(attention, dtype=np.float64)
    n_seq, n_pos = len(tokens), len(tokens[0])
    valid = [[True] * n_pos for _ in range(n_seq)] if mask is None else np.asarray(mask).astype(bool).tolist()
    nhead = attention.shape[1] if attention.ndim == 4 else 1
    n_sum = nhead if per_head else 1
    sums = np.zeros((n_sum, vocab_size, vocab_size))
    count = np.zeros((vocab_size, vocab_size), dtype=np.int64)
    expected = np.zeros((vocab_size, vocab_size))
    for b in range(n_seq):
        for i in range(n_pos):
            if not valid[b][i]:
                continue
            keys = [j for j in range(n_pos) if valid[b][j] and (not causal or j <= i)]
            for j in keys:
                q, k = tokens[b][i], tokens[b][j]
                count[q, k] += 1
                expected[q, k] += 1.0 / len(keys)
                if attention.ndim == 3:
                    sums[0, q, k] += attention[b, i, j]
                elif per_head:
                    for h in range(nhead):
                        sums[h, q, k] += attention[b, h, i, j]
                else:
                    sums[0, q, k] += sum(attention[b, h, i, j] for h in range(nhead)) / nhead
    return (sums if per_head else sums[0]), count, expected


def ratio(num, den, count):
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    seen = np.broadcast_to(count > 0, out.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[seen] = np.broadcast_to(num / den, out.shape)[seen]
    return out


def make_batch(rng, n_seq=4, n_pos=9, nhead=3, vocab_size=6, masked=True, dtype=torch.float64):
    tokens = torch.as_tensor(rng.integers(0, vocab_size, size=(n_seq, n_pos)))
    # Rows deliberately do not sum to 1 (rollout-like inputs are accepted).
    attention = torch.as_tensor(rng.random((n_seq, nhead, n_pos, n_pos)), dtype=dtype)
    mask = None
    if masked:
        mask = torch.as_tensor(rng.random((n_seq, n_pos)) > 0.3)
        mask[0] = True                # full row
        mask[1, 5:] = False           # trailing padding
        mask[2] = False               # a sequence with nothing valid
        mask[3, 0] = False            # a hole at the start
    return tokens, attention, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_matches_triple_loop(causal, masked, per_head):
    rng = np.random.default_rng(7 + 2 * causal + 4 * masked + 8 * per_head)
    vocab_size, nhead = 6, 3
    agg = VocabAttention(vocab_size, nhead=nhead if per_head else None)
    batches = [make_batch(rng, vocab_size=vocab_size, nhead=nhead, masked=masked) for _ in range(3)]
    for tokens, attention, mask in batches:
        assert agg.update(tokens, attention, mask=mask, causal=causal) is agg

    ref_sum = np.zeros((nhead, vocab_size, vocab_size) if per_head else (vocab_size, vocab_size))
    ref_count = np.zeros((vocab_size, vocab_size), dtype=np.int64)
    ref_expected = np.zeros((vocab_size, vocab_size))
    for tokens, attention, mask in batches:
        s, c, e = loop_reference(tokens, attention, mask, causal, vocab_size, per_head)
        ref_sum += s
        ref_count += c
        ref_expected += e

    assert agg.sum.dtype == np.float64 and agg.expected.dtype == np.float64
    assert agg.count.dtype == np.int64
    assert agg.sum.shape == ref_sum.shape
    np.testing.assert_array_equal(agg.count, ref_count)
    np.testing.assert_allclose(agg.sum, ref_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(agg.expected, ref_expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(agg.mean(), ratio(ref_sum, ref_count.astype(float), ref_count),
                               rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(agg.lift(), ratio(ref_sum, ref_expected, ref_count), rtol=1e-12, equal_nan=True)
    assert agg.n_sequences == 12


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_three_dim_attention_and_larger_vocab(causal, masked):
    # 13 sequences (masked: of very different lengths, 0 to 17 valid positions, with
    # holes), so that rows grouped by their number of distinct ids are cut at different
    # widths, and groups hold several rows.
    rng = np.random.default_rng(3)
    vocab_size, n_seq = 40, 13
    tokens = torch.as_tensor(rng.integers(0, vocab_size, size=(n_seq, 17)))
    attention = torch.as_tensor(rng.random((n_seq, 17, 17)))
    lengths = torch.as_tensor(rng.permutation(np.linspace(0, 17, n_seq).round().astype(int)))
    mask = (torch.arange(17)[None, :] < lengths[:, None]) & torch.as_tensor(rng.random((n_seq, 17)) > 0.2)
    if not masked:
        mask = None
    agg = VocabAttention(vocab_size).update(tokens, attention, mask=mask, causal=causal)
    s, c, e = loop_reference(tokens, attention, mask, causal, vocab_size, per_head=False)
    np.testing.assert_array_equal(agg.count, c)
    np.testing.assert_allclose(agg.sum, s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(agg.expected, e, rtol=1e-12, atol=1e-12)


def test_nan_where_count_is_zero():
    agg = VocabAttention(5)
    agg.update(torch.tensor([[0, 1, 1]]), torch.full((1, 3, 3), 0.25))
    seen = agg.count > 0
    assert seen.sum() == 4                       # (0,0) (0,1) (1,0) (1,1)
    assert np.isnan(agg.mean()[~seen]).all() and np.isnan(agg.lift()[~seen]).all()
    assert np.isfinite(agg.mean()[seen]).all() and np.isfinite(agg.lift()[seen]).all()
    empty = VocabAttention(3)
    assert np.isnan(empty.mean()).all() and np.isnan(empty.lift()).all()


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_attention_has_lift_one(causal):
    """Uniform attention over the valid keys is what `expected` describes: lift == 1."""
    rng = np.random.default_rng(11)
    tokens = torch.as_tensor(rng.integers(0, 8, size=(6, 12)))
    mask = torch.as_tensor(rng.random((6, 12)) > 0.25)
    pair = mask[:, :, None] & mask[:, None, :]
    if causal:
        pair &= torch.ones(12, 12, dtype=torch.bool).tril()
    uniform = pair.double() / pair.sum(-1, keepdim=True).clamp_min(1)
    agg = VocabAttention(8).update(tokens, uniform[:, None].expand(-1, 4, -1, -1), mask=mask, causal=causal)
    seen = agg.count > 0
    np.testing.assert_allclose(agg.lift()[seen], 1.0, rtol=1e-12)
    # Each valid query spreads exactly one unit of attention.
    assert agg.sum.sum() == pytest.approx(int(mask.sum()))
    assert agg.expected.sum() == pytest.approx(int(mask.sum()))


def test_merge_of_shards_equals_one_pass():
    rng = np.random.default_rng(5)
    batches = [make_batch(rng, vocab_size=6) for _ in range(4)]
    for per_head in (None, 3):
        one = VocabAttention(6, nhead=per_head)
        left, right = VocabAttention(6, nhead=per_head), VocabAttention(6, nhead=per_head)
        for k, (tokens, attention, mask) in enumerate(batches):
            one.update(tokens, attention, mask=mask, causal=True)
            (left if k % 2 else right).update(tokens, attention, mask=mask, causal=True)
        assert left.merge(right) is left
        np.testing.assert_array_equal(left.count, one.count)
        np.testing.assert_allclose(left.sum, one.sum, rtol=1e-12)
        np.testing.assert_allclose(left.expected, one.expected, rtol=1e-12)
        assert left.n_sequences == one.n_sequences


def test_merge_rejects_mismatch():
    with pytest.raises(ValueError, match="vocab_size 4 != 5"):
        VocabAttention(5).merge(VocabAttention(4))
    with pytest.raises(ValueError, match="nhead"):
        VocabAttention(5).merge(VocabAttention(5, nhead=2))
    with pytest.raises(TypeError, match="VocabAttention"):
        VocabAttention(5).merge(np.zeros((5, 5)))


def test_head_mean_of_per_head_equals_averaged_stream():
    rng = np.random.default_rng(9)
    per_head, averaged = VocabAttention(6, nhead=3), VocabAttention(6)
    for tokens, attention, mask in [make_batch(rng) for _ in range(2)]:
        per_head.update(tokens, attention, mask=mask)
        averaged.update(tokens, attention, mask=mask)
    collapsed = per_head.head_mean()
    assert collapsed.nhead is None and collapsed.sum.shape == (6, 6)
    np.testing.assert_allclose(collapsed.sum, averaged.sum, rtol=1e-12)
    np.testing.assert_array_equal(collapsed.count, averaged.count)
    np.testing.assert_allclose(per_head.mean(), per_head.sum / np.where(per_head.count > 0, per_head.count, np.nan))


def test_accepts_numpy_float16_and_01_masks():
    rng = np.random.default_rng(2)
    tokens, attention, mask = make_batch(rng, dtype=torch.float32)
    exact = VocabAttention(6).update(tokens, attention, mask=mask)
    from_numpy = VocabAttention(6).update(tokens.numpy().astype(np.int32), attention.numpy(),
                                          mask=mask.numpy().astype(np.uint8))
    np.testing.assert_array_equal(from_numpy.count, exact.count)
    np.testing.assert_allclose(from_numpy.sum, exact.sum, rtol=1e-12)
    half = VocabAttention(6).update(tokens, attention.half(), mask=mask.long())
    np.testing.assert_array_equal(half.count, exact.count)
    np.testing.assert_allclose(half.sum, exact.sum, rtol=2e-3)


def test_masked_positions_are_never_read():
    tokens = torch.tensor([[2, 0, -1, 99]])               # padding ids may be anything
    mask = torch.tensor([[True, True, False, False]])
    attention = torch.full((1, 4, 4), float("nan"))
    attention[0, :2, :2] = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    agg = VocabAttention(3).update(tokens, attention, mask=mask)
    expected_sum = np.zeros((3, 3))
    expected_sum[2, 2], expected_sum[2, 0], expected_sum[0, 2], expected_sum[0, 0] = 0.7, 0.3, 0.4, 0.6
    np.testing.assert_allclose(agg.sum, expected_sum)
    assert agg.count.sum() == 4 and np.isfinite(agg.sum).all()


def test_rejects_bad_inputs():
    agg = VocabAttention(4, nhead=None)
    ok_tokens, ok_attn = torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, 3)
    with pytest.raises(ValueError, match="id 4 is outside"):
        agg.update(torch.tensor([[0, 4, 1], [0, 0, 0]]), ok_attn)
    with pytest.raises(ValueError, match="id -2 is outside"):
        agg.update(torch.tensor([[0, -2, 1], [0, 0, 0]]), ok_attn)
    with pytest.raises(ValueError, match=r"got \[2, 3, 4\]"):
        agg.update(ok_tokens, torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"B=2, N=3"):
        agg.update(ok_tokens, torch.rand(3, 3, 3))
    with pytest.raises(ValueError, match=r"tokens: expected shape \[B, N\], got \[6\]"):
        agg.update(torch.zeros(6, dtype=torch.long), ok_attn)
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, N\] = \[2, 3\].*got \[2, 4\]"):
        agg.update(ok_tokens, ok_attn, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        agg.update(ok_tokens, ok_attn, mask=torch.full((2, 3), 2))
    with pytest.raises(TypeError, match="integer token ids"):
        agg.update(ok_tokens.float(), ok_attn)
    with pytest.raises(TypeError, match="float"):
        agg.update(ok_tokens, torch.ones(2, 3, 3, dtype=torch.long))
    per_head = VocabAttention(4, nhead=2)
    with pytest.raises(ValueError, match=r"nhead=2.*got \[2, 3, 3, 3\]"):
        per_head.update(ok_tokens, torch.rand(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"nhead=2.*got \[2, 3, 3\]"):
        per_head.update(ok_tokens, ok_attn)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            VocabAttention(bad)
    with pytest.raises(ValueError, match="nhead"):
        VocabAttention(3, nhead=0)
    assert agg.count.sum() == 0 and agg.n_sequences == 0    # failed updates change nothing


def test_empty_batch_is_a_no_op():
    agg = VocabAttention(3)
    agg.update(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 2, 4, 4))
    agg.update(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 0), causal=True)
    assert agg.count.sum() == 0 and agg.n_sequences == 2


def test_views_are_read_only():
    agg = VocabAttention(3).update(torch.tensor([[0, 1]]), torch.rand(1, 2, 2))
    with pytest.raises(ValueError):
        agg.sum[0, 0] = 1.0
    with pytest.raises(ValueError):
        agg.count[0, 0] = 1
    with pytest.raises(ValueError):
        agg.expected[0, 0] = 1.0


@pytest.mark.parametrize("nhead", [None, 2])
def test_save_load_and_pickle_round_trip(tmp_path, nhead):
    rng = np.random.default_rng(4)
    tokens, attention, mask = make_batch(rng, nhead=2)
    agg = VocabAttention(6, nhead=nhead).update(tokens, attention, mask=mask, causal=True)
    agg.save(tmp_path / "vocab.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.npz"]
    for copy in (VocabAttention.load(tmp_path / "vocab.npz"), pickle.loads(pickle.dumps(agg)),
                 VocabAttention.from_state_dict(agg.state_dict())):
        assert (copy.vocab_size, copy.nhead, copy.n_sequences) == (6, nhead, agg.n_sequences)
        np.testing.assert_array_equal(copy.sum, agg.sum)
        np.testing.assert_array_equal(copy.count, agg.count)
        np.testing.assert_array_equal(copy.expected, agg.expected)
        copy.update(tokens, attention, mask=mask)    # still usable after loading
    with pytest.raises(ValueError, match="count has shape"):
        VocabAttention.from_state_dict({**agg.state_dict(), "count": np.zeros((5, 5))})
    # counts are kept in float64: one that float64 cannot hold exactly is refused, not rounded
    too_many = np.array(agg.count)
    too_many[0, 0] = 2 ** 53 + 1
    with pytest.raises(ValueError, match="count values"):
        VocabAttention.from_state_dict({**agg.state_dict(), "count": too_many})
    exact = np.array(agg.count)
    exact[0, 0] = 2 ** 53
    assert VocabAttention.from_state_dict({**agg.state_dict(), "count": exact}).count[0, 0] == 2 ** 53


def test_to_frame_and_top_pairs():
    itos = ["<pad>", "the", "cat", "sat"]
    tokens = torch.tensor([[1, 2, 3, 1], [2, 2, 3, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    rng = np.random.default_rng(1)
    attention = torch.as_tensor(rng.random((2, 4, 4)))
    agg = VocabAttention(4).update(tokens, attention, mask=mask)
    frame = agg.to_frame(itos)
    assert list(frame.columns) == ["query_id", "key_id", "query_token", "key_token",
                                   "sum", "count", "expected", "mean", "lift"]
    assert len(frame) == int((agg.count > 0).sum()) and (frame["count"] > 0).all()
    for row in frame.itertuples():
        assert (row.query_token, row.key_token) == (itos[row.query_id], itos[row.key_id])
        assert row.sum == agg.sum[row.query_id, row.key_id]
        assert row.count == agg.count[row.query_id, row.key_id]
        assert row.lift == pytest.approx(agg.lift()[row.query_id, row.key_id])
        assert row.mean == pytest.approx(agg.mean()[row.query_id, row.key_id])
    assert "<pad>" not in set(frame["query_token"])       # id 0 only ever sat on padding

    top = agg.top_pairs(3, min_count=2, itos=itos)
    assert len(top) <= 3 and (top["count"] >= 2).all()
    eligible = frame[frame["count"] >= 2].sort_values("lift", ascending=False)
    np.testing.assert_allclose(top["lift"], eligible["lift"].head(3))
    by_count = agg.top_pairs(2, by="count")
    assert by_count["count"].tolist() == sorted(frame["count"], reverse=True)[:2]
    with pytest.raises(ValueError, match="by='bogus'"):
        agg.top_pairs(3, by="bogus")
    with pytest.raises(ValueError, match="no string for token id 3"):
        agg.to_frame(["<pad>", "the", "cat"])
    assert agg.to_frame()["query_token"].map(int).equals(agg.to_frame()["query_id"])


def test_per_head_frame():
    rng = np.random.default_rng(8)
    tokens, attention, mask = make_batch(rng, nhead=2)
    agg = VocabAttention(6, nhead=2).update(tokens, attention, mask=mask)
    frame = agg.to_frame()
    n_pairs = int((agg.count > 0).sum())
    assert frame.columns[0] == "head" and len(frame) == 2 * n_pairs
    head1 = agg.to_frame(head=1)
    assert "head" not in head1.columns and len(head1) == n_pairs
    np.testing.assert_allclose(head1["sum"], agg.sum[1][head1["query_id"], head1["key_id"]])
    pd.testing.assert_series_equal(frame[frame["head"] == 1]["sum"].reset_index(drop=True), head1["sum"])
    top = agg.top_pairs(4, head=0)
    assert len(top) == 4 and top["lift"].is_monotonic_decreasing
    with pytest.raises(ValueError, match="head=5"):
        agg.to_frame(head=5)
