"""The compiled count/expected loops of VocabAttention (src/attnlab/_vocab.c) against a
literal loop over position pairs, and their refusals. (VocabAttention with and without it:
tests/test_aggregate.py, fixture ``pairs_kernel``.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab import aggregate

needs_kernel = pytest.mark.skipif(aggregate._vocab is None, reason="attnlab._vocab was not built (no C compiler at "
                                                                   "pip install -e .); VocabAttention uses torch's path")


def literal_tables(tokens: np.ndarray, side: int, upper: bool = False, causal: bool = False) -> np.ndarray:
    """count + i·expected [side, side] by a loop over every (query, key) position pair of
    each row; ids below the sink (side - 1) are valid; ``upper``: only cells q <= k;
    ``causal``: only keys at or before the query."""
    table = np.zeros((side, side), np.complex128)
    for row in tokens.tolist():
        for i, q in enumerate(row):
            keys = [k for j, k in enumerate(row) if k != side - 1 and (j <= i or not causal)]
            for k in keys:
                if q != side - 1 and (not upper or q <= k):
                    table[q, k] += 1 + 1j / len(keys)
    return table


def sorted_rows(rng, rows: int, n: int, side: int) -> np.ndarray:
    """Rows of ids in [0, side - 2] with a random number of trailing sinks, each sorted."""
    tokens = rng.integers(0, side - 1, size=(rows, n))
    lengths = rng.integers(0, n + 1, size=rows)
    lengths[0], lengths[-1] = n, 0                             # a full row and an empty one
    tokens[np.arange(n)[None, :] >= lengths[:, None]] = side - 1
    return np.sort(tokens, axis=1)


@needs_kernel
@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("side", [2, 7, 301])
def test_pairs_equal_a_loop_over_positions(side, upper):
    rng = np.random.default_rng(side + upper)
    tokens = sorted_rows(rng, 9, 23, side)
    start = rng.random((side, side)) + 1j * rng.random((side, side))      # added to, not overwritten
    table = torch.as_tensor(start.copy()).reshape(-1)
    aggregate._vocab.histogram_pairs(torch.view_as_real(table).numpy(), tokens, side, upper)
    got = table.numpy().reshape(side, side) - start
    want = literal_tables(tokens, side, upper)
    np.testing.assert_allclose(got.real, want.real, rtol=0, atol=1e-9)    # integer counts
    np.testing.assert_allclose(got.imag, want.imag, rtol=1e-12, atol=1e-12)
    assert not got[-1].any() and not got[:, -1].any()                     # the sink is never written


@needs_kernel
@pytest.mark.parametrize("side", [2, 7, 301])
def test_causal_pairs_equal_a_loop_over_positions(side):
    rng = np.random.default_rng(side)
    tokens = rng.integers(0, side, size=(9, 23))                # the sink anywhere (masked positions)
    tokens[0], tokens[1] = 0, side - 1                          # one id only; nothing valid
    start = rng.random((side, side)) + 1j * rng.random((side, side))
    table = torch.as_tensor(start.copy()).reshape(-1)
    aggregate._vocab.causal_pairs(torch.view_as_real(table).numpy(), tokens, side)
    got = table.numpy().reshape(side, side) - start
    want = literal_tables(tokens, side, causal=True)
    np.testing.assert_allclose(got.real, want.real, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.imag, want.imag, rtol=1e-12, atol=1e-12)
    assert not got[-1].any() and not got[:, -1].any()


@needs_kernel
@pytest.mark.parametrize("row", [[0, 1, 5, 2], [3, -1, 0, 4]])
def test_causal_rows_with_ids_out_of_range_are_refused(row):
    tokens = np.array([[4, 1, 0, 1], row], dtype=np.int64)
    table = torch.zeros(25, dtype=torch.complex128)
    with pytest.raises(ValueError, match=r"causal_pairs: tokens row 1 has an id outside \[0, 4\]"):
        aggregate._vocab.causal_pairs(torch.view_as_real(table).numpy(), tokens, 5)


@needs_kernel
@pytest.mark.parametrize("row, why", [
    ([0, 2, 1, 4], "not sorted"),
    ([0, 1, 4, 2], "an id after the sink"),
    ([0, 1, 5, 5], "an id above the sink"),
    ([-1, 0, 1, 4], "a negative id"),
])
def test_bad_rows_are_refused_naming_the_row(row, why):
    side = 5
    tokens = np.array([[0, 1, 1, 4], row], dtype=np.int64)
    table = torch.zeros(side * side, dtype=torch.complex128)
    with pytest.raises(ValueError, match=r"tokens row 1 is not sorted ascending with ids in \[0, 4\]"):
        aggregate._vocab.histogram_pairs(torch.view_as_real(table).numpy(), tokens, side, False)


@needs_kernel
def test_bad_buffers_are_refused_with_what_was_expected():
    tokens = np.zeros((2, 3), np.int64)
    table = torch.view_as_real(torch.zeros(16, dtype=torch.complex128)).numpy()
    with pytest.raises(ValueError, match=r"ce must be float64 \[side\^2, 2\] = 400 bytes for side 5; got 256 bytes"):
        aggregate._vocab.histogram_pairs(table, tokens, 5, False)
    with pytest.raises(ValueError, match=r"causal_pairs: ce must be float64 \[side\^2, 2\] = 400 bytes"):
        aggregate._vocab.causal_pairs(table, tokens, 5)
    with pytest.raises(ValueError, match=r"ce must be float64 .* of format f"):
        aggregate._vocab.histogram_pairs(np.zeros(32, np.float32), tokens, 4, False)
    with pytest.raises(ValueError, match=r"tokens must be int64 \[B, N\]; got format i, 2 dimensions"):
        aggregate._vocab.histogram_pairs(table, tokens.astype(np.int32), 4, False)
    with pytest.raises(ValueError, match=r"tokens must be int64 \[B, N\]; got format [lq], 1 dimensions"):
        aggregate._vocab.histogram_pairs(table, tokens[0], 4, False)
    with pytest.raises(ValueError, match="ce must be a C-contiguous writable buffer"):
        aggregate._vocab.histogram_pairs(bytes(256), tokens, 4, False)
