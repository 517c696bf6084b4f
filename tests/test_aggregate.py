"""VocabAttention against a literal triple loop over (sequence, query, key)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab import aggregate
from attnlab.aggregate import TableTooLarge, VocabAttention


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


LAYOUTS = ["dense", "sparse", "sparse-local"]


@pytest.fixture(params=LAYOUTS)
def sparse(request, monkeypatch):
    """The ``sparse=`` argument of each layout. ``sparse-local``: the sparse layout with
    every batch reduced over the ids it contains, cut down to single sequences (no
    per-batch vocabulary-sized buffer), and new pairs merged into the main arrays at once."""
    if request.param == "sparse-local":
        monkeypatch.setattr(aggregate, "_BYTES_PER_PAIR", 0)
        monkeypatch.setattr(aggregate, "_PENDING_MIN", 0)
    return request.param != "dense"


@pytest.fixture(params=["compiled", "torch"])
def pairs_kernel(request, monkeypatch):
    """The count/expected by the compiled loops (attnlab._vocab, _vocab.c) and by torch's
    gathers and scatter (the path without a C compiler)."""
    if request.param == "compiled" and aggregate._vocab is None:
        pytest.skip("attnlab._vocab was not built (no C compiler at pip install -e .); torch's path is tested alone")
    if request.param == "torch":
        monkeypatch.setattr(aggregate, "_vocab", None)
    return request.param


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_matches_triple_loop(causal, masked, per_head, sparse, pairs_kernel):
    rng = np.random.default_rng(7 + 2 * causal + 4 * masked + 8 * per_head)
    vocab_size, nhead = 6, 3
    agg = VocabAttention(vocab_size, nhead=nhead if per_head else None, sparse=sparse)
    assert agg.sparse is sparse
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
def test_three_dim_attention_and_larger_vocab(causal, masked, sparse, pairs_kernel):
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
    agg = VocabAttention(vocab_size, sparse=sparse).update(tokens, attention, mask=mask, causal=causal)
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


@pytest.mark.parametrize("right_sparse", [False, True])
def test_merge_of_shards_equals_one_pass(sparse, right_sparse):
    rng = np.random.default_rng(5)
    batches = [make_batch(rng, vocab_size=6) for _ in range(4)]
    for per_head in (None, 3):
        one = VocabAttention(6, nhead=per_head)
        left = VocabAttention(6, nhead=per_head, sparse=sparse)
        right = VocabAttention(6, nhead=per_head, sparse=right_sparse)   # layouts mix
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


def test_head_mean_of_per_head_equals_averaged_stream(sparse):
    rng = np.random.default_rng(9)
    per_head, averaged = VocabAttention(6, nhead=3, sparse=sparse), VocabAttention(6)
    for tokens, attention, mask in [make_batch(rng) for _ in range(2)]:
        per_head.update(tokens, attention, mask=mask)
        averaged.update(tokens, attention, mask=mask)
    collapsed = per_head.head_mean()
    assert collapsed.nhead is None and collapsed.sum.shape == (6, 6) and collapsed.sparse is sparse
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


def test_to_frame_and_top_pairs(sparse):
    itos = ["<pad>", "the", "cat", "sat"]
    tokens = torch.tensor([[1, 2, 3, 1], [2, 2, 3, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    rng = np.random.default_rng(1)
    attention = torch.as_tensor(rng.random((2, 4, 4)))
    agg = VocabAttention(4, sparse=sparse).update(tokens, attention, mask=mask)
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


def test_per_head_frame(sparse):
    rng = np.random.default_rng(8)
    tokens, attention, mask = make_batch(rng, nhead=2)
    agg = VocabAttention(6, nhead=2, sparse=sparse).update(tokens, attention, mask=mask)
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


# --------------------------------------------------------------------------- sparse layout
def dict_reference(tokens, attention, mask, causal, nhead):
    """The literal loop into dicts keyed by (query id, key id): {pair: (sum [H], count, expected)}."""
    tokens, attention = np.asarray(tokens).tolist(), np.asarray(attention, dtype=np.float64)
    valid = np.ones(np.shape(tokens), bool) if mask is None else np.asarray(mask, bool)
    out = {}
    for b, row in enumerate(tokens):
        for i in range(len(row)):
            keys = [j for j in range(len(row)) if valid[b, i] and valid[b, j] and (j <= i or not causal)]
            for j in keys:
                s, c, e = out.get((row[i], row[j]), (np.zeros(nhead), 0, 0.0))
                out[row[i], row[j]] = (s + attention[b, :, i, j], c + 1, e + 1.0 / len(keys))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_fifty_thousand_ids_equal_a_literal_loop(causal, monkeypatch, pairs_kernel):
    """A 50k vocabulary (dense tables would take 60 GB): the pairs seen, their per-head sums,
    counts and expected, top pairs and blocks, against a loop over position pairs, with
    batches that are cut in halves (many distinct ids) and merged into the sorted arrays."""
    monkeypatch.setattr(aggregate, "_PENDING_MIN", 8)        # pending pairs reach the main arrays too
    rng = np.random.default_rng(12 + causal)
    vocab_size, nhead, n_pos = 50_000, 2, 11
    ids = np.sort(rng.choice(vocab_size, 40, replace=False))
    ids[0], ids[-1] = 0, vocab_size - 1                       # both ends of the id range
    agg, mean = VocabAttention(vocab_size, nhead=nhead), VocabAttention(vocab_size)
    assert agg.sparse and mean.sparse                          # chosen by size
    reference = {}
    for seed in range(4):
        tokens = torch.as_tensor(ids[rng.integers(0, len(ids), size=(7, n_pos))])
        attention = torch.as_tensor(rng.random((7, nhead, n_pos, n_pos)))
        mask = torch.as_tensor(rng.random((7, n_pos)) > 0.2)
        mask[seed] = False
        agg.update(tokens, attention, mask=mask, causal=causal)
        mean.update(tokens, attention, mask=mask, causal=causal)
        for pair, (s, c, e) in dict_reference(tokens, attention, mask, causal, nhead).items():
            s0, c0, e0 = reference.get(pair, (0.0, 0, 0.0))
            reference[pair] = (s0 + s, c0 + c, e0 + e)
    pairs = agg.pairs()
    got = list(zip(pairs["query_id"].tolist(), pairs["key_id"].tolist()))
    assert got == sorted(reference)                            # every pair seen, once, sorted
    np.testing.assert_array_equal(pairs["count"], [reference[p][1] for p in got])
    np.testing.assert_allclose(pairs["sum"], np.array([reference[p][0] for p in got]).T, rtol=1e-12)
    np.testing.assert_allclose(pairs["expected"], [reference[p][2] for p in got], rtol=1e-12)
    np.testing.assert_allclose(mean.pairs()["sum"], pairs["sum"].mean(0), rtol=1e-12)
    # top pairs by lift among pairs seen at least twice, head 1, against sorting the loop's dict
    lift = {p: (s[1] / e, c) for p, (s, c, e) in reference.items() if c >= 2}
    best = sorted(lift, key=lambda p: (-lift[p][0], -lift[p][1], p))[:5]
    top = agg.top_pairs(5, min_count=2, head=1)
    assert list(zip(top["query_id"], top["key_id"])) == best
    np.testing.assert_allclose(top["lift"], [lift[p][0] for p in best], rtol=1e-12)
    # a block of the table, and the per-token pair counts, without [V, V]
    block_ids = [int(ids[3]), int(ids[0]), int(ids[-1])]
    block = agg.submatrix("count", block_ids)
    for r, q in enumerate(block_ids):
        for c, k in enumerate(block_ids):
            assert block[r, c] == reference.get((q, k), (0, 0, 0))[1]
    per_token = np.zeros(vocab_size, np.int64)
    for (q, k), (_, c, _) in reference.items():
        per_token[q] += c
        per_token[k] += c
    np.testing.assert_array_equal(agg.token_pair_counts(), per_token)


def test_dense_arrays_only_when_they_fit():
    big = VocabAttention(50_000)
    big.update(torch.tensor([[0, 49_999]]), torch.full((1, 2, 2), 0.5))
    with pytest.raises(TableTooLarge) as err:
        big.sum
    message = str(err.value)
    assert "\n" not in message and "[50000, 50000] float64" in message and "18.6 GiB" in message
    assert "pairs()" in message
    for read in (lambda: big.count, lambda: big.expected, big.mean, big.lift):
        with pytest.raises(TableTooLarge):
            read()
    with pytest.raises(TableTooLarge, match=r"sparse=False\): the dense tables need .* GiB"):
        VocabAttention(50_000, sparse=False)
    # a smaller limit is honoured too; and a small vocabulary is dense unless asked otherwise
    assert not VocabAttention(100).sparse and VocabAttention(100, sparse=True).sparse
    small = VocabAttention(100, sparse=True, max_dense_bytes=1000).update(torch.tensor([[1, 2]]), torch.rand(1, 2, 2))
    with pytest.raises(TableTooLarge, match=r"\[100, 100\] float64 array needs 78.1 KiB"):
        small.lift()
    with pytest.raises(ValueError, match="sparse='yes'"):
        VocabAttention(5, sparse="yes")


@pytest.mark.parametrize("nhead", [None, 2])
def test_sparse_save_load_and_pickle_round_trip(tmp_path, nhead):
    rng = np.random.default_rng(14)
    tokens, attention, mask = make_batch(rng, nhead=2)
    agg = VocabAttention(6, nhead=nhead, sparse=True).update(tokens, attention, mask=mask)
    dense = VocabAttention(6, nhead=nhead).update(tokens, attention, mask=mask)
    agg.save(tmp_path / "sparse.npz")
    dense.save(tmp_path / "dense.npz")
    state = dict(np.load(tmp_path / "sparse.npz"))
    assert int(state["format_version"]) == 2 and state["query_id"].shape == (int((dense.count > 0).sum()),)
    copies = [VocabAttention.load(tmp_path / "sparse.npz", sparse=True), pickle.loads(pickle.dumps(agg)),
              VocabAttention.load(tmp_path / "sparse.npz"),                  # small: loaded dense
              VocabAttention.load(tmp_path / "dense.npz", sparse=True)]      # a dense file, loaded sparse
    assert [c.sparse for c in copies] == [True, True, False, True]
    for copy in copies:
        assert (copy.vocab_size, copy.nhead, copy.n_sequences) == (6, nhead, 4)
        np.testing.assert_array_equal(copy.count, dense.count)
        np.testing.assert_allclose(copy.sum, dense.sum, rtol=1e-12)
        np.testing.assert_allclose(copy.expected, dense.expected, rtol=1e-12)
        copy.update(tokens, attention, mask=mask)    # still usable after loading
        np.testing.assert_array_equal(copy.count, 2 * dense.count)
    with pytest.raises(ValueError, match=r"count has shape \[3\], expected \[\d+\]"):
        VocabAttention.from_state_dict({**state, "count": state["count"][:3]})
    with pytest.raises(ValueError, match="distinct and sorted"):
        VocabAttention.from_state_dict({**state, "query_id": state["query_id"][::-1].copy(),
                                        "key_id": state["key_id"][::-1].copy()})
    too_many = state["count"].copy()
    too_many[0] = 2 ** 53 + 1
    with pytest.raises(ValueError, match="count values"):
        VocabAttention.from_state_dict({**state, "count": too_many})


def test_special_tokens_are_kept_and_easy_to_drop():
    itos = ["[PAD]", "[CLS]", "[SEP]", "the", "cat", "<", "[unused0]"]
    assert aggregate.special_token_ids(itos) == [0, 1, 2, 6]
    tokens = torch.tensor([[1, 3, 4, 5, 2, 0], [1, 4, 3, 2, 0, 0]])
    mask = tokens != 0                                        # padding excluded by the mask
    agg = VocabAttention(7, sparse=True).update(tokens, torch.rand(2, 6, 6), mask=mask)
    frame = agg.to_frame(itos)
    assert "[PAD]" not in set(frame["query_token"]) | set(frame["key_token"])
    assert {"[CLS]", "[SEP]"} <= set(frame["query_token"])   # kept ...
    for exclude in ("special", ["[CLS]", 2], [1, "[SEP]"]):   # ... and dropped on request
        kept = agg.to_frame(itos, exclude=exclude)
        assert not {"[CLS]", "[SEP]"} & (set(kept["query_token"]) | set(kept["key_token"]))
        assert len(kept) == int(((frame["query_id"] > 2) & (frame["key_id"] > 2)).sum())
        top = agg.top_pairs(100, itos=itos, exclude=exclude)
        assert len(top) == len(kept) and set(top["query_token"]) <= {"the", "cat", "<"}
    with pytest.raises(ValueError, match="'dog' is not in the vocabulary"):
        agg.to_frame(itos, exclude=["dog"])
    with pytest.raises(ValueError, match="needs itos"):
        agg.top_pairs(3, exclude="special")


def test_submatrix_equals_the_dense_table(sparse):
    rng = np.random.default_rng(15)
    agg = VocabAttention(6, nhead=3, sparse=sparse)
    for tokens, attention, mask in [make_batch(rng) for _ in range(2)]:
        agg.update(tokens, attention, mask=mask)
    rows, cols = [4, 0, 2], [5, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        for stat, table in (("sum", agg.sum), ("count", agg.count), ("expected", agg.expected),
                            ("mean", agg.mean()), ("lift", agg.lift())):
            np.testing.assert_array_equal(agg.submatrix(stat, rows, cols), table[..., rows, :][..., cols])
    np.testing.assert_array_equal(agg.submatrix("lift", rows, head=2), agg.lift()[2][np.ix_(rows, rows)])
    np.testing.assert_array_equal(agg.token_pair_counts(), agg.count.sum(0) + agg.count.sum(1))
    with pytest.raises(ValueError, match="distinct"):
        agg.submatrix("sum", [1, 1])
    with pytest.raises(ValueError, match="stat='median'"):
        agg.submatrix("median", [1])


def test_tokens_stage_shape_reads_equal_in_both_layouts():
    """Many batches of the tokens experiment's shape (vocabulary 40, 32 positions, causal):
    the sparse layout's buffer is flushed into the sorted arrays at each read, between updates."""
    rng = np.random.default_rng(16)
    dense, sparse = VocabAttention(40, nhead=1), VocabAttention(40, nhead=1, sparse=True)
    for step in range(5):
        tokens = torch.as_tensor(rng.integers(0, 40, size=(16, 32)))
        attention = torch.as_tensor(rng.random((16, 1, 32, 32)), dtype=torch.float32)
        mask = torch.arange(32)[None, :] < torch.as_tensor(rng.integers(1, 33, size=(16, 1)))
        for agg in (dense, sparse):
            agg.update(tokens, attention, mask=mask, causal=True)
        if step % 2:
            pd.testing.assert_frame_equal(sparse.to_frame(), dense.to_frame())
    pd.testing.assert_frame_equal(sparse.top_pairs(16, min_count=3), dense.top_pairs(16, min_count=3))


MEMORY_CHILD = """
import sys, time
from pathlib import Path
import torch
from attnlab.aggregate import VocabAttention

def hwm_kib():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")).split()[1])

torch.set_num_threads(1)
V, B, H, N = 30_522, 32, 4, 64
g = torch.Generator().manual_seed(0)
p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
def batch():
    tok = torch.multinomial(p / p.sum(), B * N, replacement=True, generator=g).view(B, N)
    mask = torch.arange(N)[None, :] < torch.randint(N // 2, N + 1, (B, 1), generator=g)
    return tok, torch.rand(B, H, N, N, generator=g).softmax(-1), mask
aggs = [VocabAttention(V), VocabAttention(V, nhead=H)]           # head mean and per head, as the stage
tok, attn, mask = batch()
for agg in aggs:
    agg.update(tok, attn, mask=mask)
Path("/proc/self/clear_refs").write_text("5")                    # peak := current
base = hwm_kib()
for _ in range(12):
    tok, attn, mask = batch()
    for agg in aggs:
        agg.update(tok, attn, mask=mask)
top = aggs[1].top_pairs(10, min_count=3, head=0)
print(hwm_kib() - base, len(aggs[0].pairs()["count"]), aggs[0].sparse, len(top))
"""


def test_thirty_thousand_ids_in_far_less_memory_than_dense(capsys):
    """BERT's 30,522 ids, Zipf-distributed like text, 416 sequences through a head-mean and a
    per-head aggregator (their dense tables would take 22 GB + 45 GB): the growth of the
    process's peak RSS (VmHWM, which sees torch's allocations) while aggregating and reading."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth_kib, n_pairs, is_sparse, n_top = out.stdout.split()
    growth = int(growth_kib) * 1024
    dense = (30_523 ** 2) * (24 + 48)
    with capsys.disabled():
        print(f"\n30,522 ids: peak RSS grew {growth / 2**20:.0f} MiB for {int(n_pairs):,} token pairs seen "
              f"(dense tables: {dense / 2**30:.0f} GiB)")
    assert is_sparse == "True" and int(n_top) == 10
    assert growth < 256 * 2 ** 20 and growth < dense / 200


ALL_REDUCE_CHILD = """
import sys
import numpy as np, torch, torch.distributed as dist
from attnlab.aggregate import VocabAttention
rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=world)
g = torch.Generator().manual_seed(rank)
tokens = torch.randint(0, 9, (5, 7), generator=g)
attention = torch.rand(5, 2, 7, 7, generator=g, dtype=torch.float64)
mask = torch.rand(5, 7, generator=g) > 0.2
np.savez(f"{out}/input{rank}.npz", tokens=tokens.numpy(), attention=attention.numpy(), mask=mask.numpy())
aggs = {"sparse": VocabAttention(9, nhead=2, sparse=True), "mixed": VocabAttention(9, nhead=2, sparse=rank == 1),
        "big": VocabAttention(40_000)}
for name, agg in aggs.items():
    agg.update(tokens * (4_000 if name == "big" else 1), attention, mask=mask, causal=True)
    agg.all_reduce()
    agg.save(f"{out}/{name}{rank}.npz")
dist.destroy_process_group()
"""


def test_all_reduce_of_sparse_and_mixed_layouts(tmp_path):
    """Two gloo processes: sparse aggregators (and a sparse one with a dense one) summed by
    all_reduce equal one aggregator fed both processes' sequences, in every process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", ALL_REDUCE_CHILD, str(r), "2", str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    inputs = [np.load(tmp_path / f"input{r}.npz") for r in range(2)]
    one = VocabAttention(9, nhead=2)
    for x in inputs:
        one.update(x["tokens"], x["attention"], mask=x["mask"], causal=True)
    for name in ("sparse", "mixed"):
        for rank in range(2):
            got = VocabAttention.load(tmp_path / f"{name}{rank}.npz")
            assert got.n_sequences == 10
            np.testing.assert_array_equal(got.count, one.count)
            np.testing.assert_allclose(got.sum, one.sum, rtol=1e-12)
            np.testing.assert_allclose(got.expected, one.expected, rtol=1e-12)
    big = [VocabAttention.load(tmp_path / f"big{rank}.npz") for rank in range(2)]
    for got in big:
        assert got.sparse and got.n_sequences == 10
        p, ref = got.pairs(), one.head_mean().pairs()
        np.testing.assert_array_equal(p["query_id"], ref["query_id"] * 4_000)
        np.testing.assert_array_equal(p["count"], ref["count"])
        np.testing.assert_allclose(p["sum"], ref["sum"], rtol=1e-12)


def test_merged_aggregator_does_not_follow_the_other(sparse):
    """After ``a.merge(b)``, updating ``b`` (or merging into it) leaves ``a`` as it was."""
    rng = np.random.default_rng(17)
    batches = [make_batch(rng) for _ in range(3)]
    a, b = VocabAttention(6, sparse=sparse), VocabAttention(6, sparse=True)
    b.update(*batches[0][:2], mask=batches[0][2])
    b.pairs()                                                  # b's pairs sit in its main arrays
    a.merge(b)
    before = a.count.copy(), a.sum.copy()
    b.update(*batches[1][:2], mask=batches[1][2])
    b.merge(VocabAttention(6).update(*batches[2][:2], mask=batches[2][2]))
    b.pairs()
    np.testing.assert_array_equal(a.count, before[0])
    np.testing.assert_array_equal(a.sum, before[1])


def test_heatmap_of_a_large_vocabulary_reads_only_its_block():
    """The report's clustered heatmap on a 50k vocabulary: the most frequent tokens (by
    pairs taken part in, computed here from the loop's counts), special tokens left out."""
    from attnlab.report import figures

    rng = np.random.default_rng(18)
    vocab_size = 50_000
    itos = ["[PAD]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(3, vocab_size)]
    ids = np.array([1, 2, 7, 11, 400, 9_000, 49_999])
    tokens = torch.as_tensor(ids[rng.integers(0, len(ids), size=(6, 9))])
    attention = torch.as_tensor(rng.random((6, 9, 9)))
    agg = VocabAttention(vocab_size).update(tokens, attention)
    per_token = {}
    for (q, k), (_, c, _) in dict_reference(tokens, attention[:, None], None, False, 1).items():
        per_token[q] = per_token.get(q, 0) + c
        per_token[k] = per_token.get(k, 0) + c
    expected = sorted((t for t in per_token if t > 2), key=lambda t: (-per_token[t], t))[:3]
    fig = figures.vocab_clustermap(agg, itos, 3)
    heatmap = next(ax for ax in fig.axes if ax.get_xlabel() == "key token")
    assert sorted(label.get_text() for label in heatmap.get_xticklabels()) == sorted(itos[t] for t in expected)
