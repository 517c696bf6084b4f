"""The compiled head sum + input check (src/attnlab/explain/_fused.c) against torch: the
sum against ``x.sum(1)``, the verdict against a literal check of the judged entries, at
every kind of position (aligned blocks, partial blocks, row tails, outside a sample's
real block), and rollout / space-time rollout with and without the kernel."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from attnlab import rollout, spacetime_rollout

R = sys.modules["attnlab.explain.rollout"]
needs_kernel = pytest.mark.skipif(R._fused is None, reason="attnlab.explain._fused was not built (no C compiler "
                                                           "at pip install -e .); torch's path is tested alone")


def _probs(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).softmax(-1).to(dtype)


def literal_verdict(x: torch.Tensor, ranges, check_negative: bool) -> bool:
    """Every judged entry (row and column in the sample's [lo, hi)) finite and, with
    check_negative, with a clear sign bit (so -0.0 fails, as the kernel documents)."""
    for m in range(x.shape[0]):
        lo, hi = ranges[m] if ranges is not None else (0, x.shape[-1])
        block = x[m, :, lo:hi, lo:hi]
        if not bool(torch.isfinite(block).all()):
            return False
        if check_negative and bool(torch.signbit(block).any()):
            return False
    return True


def expected_sum(x: torch.Tensor, ranges) -> torch.Tensor:
    """x.sum(1), with ``ranges`` zero wherever the row or the column is padded (a dense
    construction: the block of each sample's real tokens copied into zeros)."""
    full = x.sum(1)
    if ranges is None:
        return full
    out = torch.zeros_like(full)
    for m, (lo, hi) in enumerate(ranges):
        out[m, lo:hi, lo:hi] = full[m, lo:hi, lo:hi]
    return out


def kernel(x, ranges=None, check_negative=True, avx2=False):
    out = torch.empty(x.shape[0], *x.shape[2:], dtype=x.dtype)
    lo = hi = None
    if ranges is not None:
        lo = np.array([r[0] for r in ranges], dtype=np.int64)
        hi = np.array([r[1] for r in ranges], dtype=np.int64)
    sums = torch.empty(x.shape[0], x.shape[-1], dtype=x.dtype)
    ok = R._fused.head_sum(x.numpy(), out.numpy(), sums.numpy(), x.shape[1], x.shape[-1], lo, hi, check_negative,
                           avx2)
    if bool(torch.isfinite(out).all()):
        torch.testing.assert_close(sums, out.sum(-1), rtol=1e-6, atol=1e-6)     # the rows' sums, with the sum
    return out, ok


# the 16-byte code, and the 32-byte one compiled for AVX2 (chosen at run time on CPUs that have it)
VECTORS = [False, pytest.param(True, marks=pytest.mark.skipif(
    R._fused is None or not getattr(R._fused, "AVX2", 0), reason="this CPU has no AVX2 (or no kernel was built)"))]


@needs_kernel
@pytest.mark.parametrize("avx2", VECTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 4, 8, 9, 16, 17, 33, 37])
def test_the_sum_is_torchs_head_sum(dtype, n, avx2):
    x = _probs(3, 5, n, n, dtype=dtype)
    out, ok = kernel(x, avx2=avx2)
    assert ok
    torch.testing.assert_close(out, x.sum(1), rtol=0, atol=4 * torch.finfo(dtype).eps)


@needs_kernel
@pytest.mark.parametrize("avx2", VECTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_bad_value_at_every_position_is_judged_as_a_literal_check_would(dtype, avx2):
    """n=21 with float32 rows split into blocks of 4 or 8 (2 or 4 for float64) and a tail; the real
    block [3, 18) of sample 1 starts and ends inside blocks; sample 0 is checked whole,
    sample 2 has no real token. The sum is the real block's, zero elsewhere."""
    n, ranges = 21, [(0, 21), (3, 18), (0, 0)]
    base = _probs(3, 2, n, n, dtype=dtype)
    positions = [(m, h, i, j) for m in range(3) for h in (0, 1) for i in (0, 2, 3, 10, 17, 18, 20)
                 for j in (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 18, 19, 20)]
    for value in (float("nan"), float("inf"), float("-inf"), -1e-30, -0.0, 0.0):
        for check_negative in (True, False):
            for pos in positions:
                x = base.clone()
                x[pos] = value
                out, ok = kernel(x, ranges, check_negative, avx2)
                assert ok == literal_verdict(x, ranges, check_negative), (value, check_negative, pos)
                # the sum of the real block, zeros around it: garbage in padded entries never reaches it
                torch.testing.assert_close(out, expected_sum(x, ranges), rtol=0, atol=1e-6, equal_nan=True)


@needs_kernel
def test_bad_buffers_are_refused_naming_what_was_expected():
    x = _probs(2, 3, 4, 4)
    out = np.empty((2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"x and out must both be float32 or both float64; got f and d"):
        R._fused.head_sum(x.numpy(), np.empty((2, 4, 4)), None, 3, 4, None, None, True)
    with pytest.raises(ValueError, match=r"out has 96 bytes; \[2, 4, 4\] needs 128"):
        R._fused.head_sum(x.numpy(), np.empty((2, 3, 4), dtype=np.float32), None, 3, 4, None, None, True)
    with pytest.raises(ValueError, match=r"row_sums must be \[2, 4\] of x's type \(32 bytes\); got 64 bytes of format d"):
        R._fused.head_sum(x.numpy(), out, np.empty((2, 4)), 3, 4, None, None, True)
    with pytest.raises(ValueError, match=r"lo and hi must be int64 buffers of 2 entries"):
        R._fused.head_sum(x.numpy(), out, None, 3, 4, np.zeros(2, np.int32), None, True)
    with pytest.raises(ValueError, match=r"x must be a C-contiguous buffer"):
        R._fused.head_sum(x.numpy().transpose(0, 1, 3, 2), out, None, 3, 4, None, None, True)


@needs_kernel
def test_a_large_input_split_across_threads_gives_the_one_thread_result(monkeypatch):
    x = _probs(10, 3, 12, 12)
    ranges = [(0, 12)] * 5 + [(2, 9)] * 5
    monkeypatch.setattr(R, "_FUSED_THREADED", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for r in (None, ranges):
            out, sums = torch.empty(10, 12, 12), torch.empty(10, 12)
            assert R._head_sum(x, out, r, sums)
            torch.testing.assert_close(out, expected_sum(x, r), rtol=0, atol=1e-6)
            torch.testing.assert_close(sums, expected_sum(x, r).sum(-1), rtol=1e-6, atol=1e-6)
            bad = x.clone()
            bad[9, 2, 8, 8] = -1.0                                    # in the last thread's share
            assert not R._head_sum(bad, torch.empty(10, 12, 12), r)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_rollout_and_spacetime_rollout_agree_with_and_without_the_kernel(path, monkeypatch):
    if path == "compiled" and R._fused is None:
        pytest.skip("attnlab.explain._fused was not built")
    layers = [_probs(4, 3, 11, 11, seed=s) for s in range(3)]
    real = torch.ones(4, 11, dtype=torch.bool)
    real[1, 8:] = False
    real[2, :2] = False
    space = [_probs(2, 3, 2, 5, 5, seed=7 + s) for s in range(2)]
    time_ = [_probs(2, 4, 2, 3, 3, seed=9 + s) for s in range(2)]
    expected = (rollout(layers), rollout(layers, mask=real), spacetime_rollout(space, time_))
    monkeypatch.setattr(R, "_fused", R._fused if path == "compiled" else None)
    # the reference: each layer's head mean, residual, row renormalisation, the product (a dense construction)
    prod = None
    for a in layers:
        m = 0.5 * a.mean(1) + 0.5 * torch.eye(11)
        m = m / m.sum(-1, keepdim=True)
        prod = m if prod is None else m @ prod
    torch.testing.assert_close(rollout(layers), prod, rtol=1e-5, atol=1e-6)
    for got, want in zip((rollout(layers), rollout(layers, mask=real), spacetime_rollout(space, time_)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_an_empty_batch_gives_an_empty_result(path, monkeypatch):
    if path == "compiled" and R._fused is None:
        pytest.skip("attnlab.explain._fused was not built")
    monkeypatch.setattr(R, "_fused", R._fused if path == "compiled" else None)
    assert rollout([_probs(0, 2, 4, 4)] * 2).shape == (0, 4, 4)
    assert rollout([_probs(0, 2, 4, 4)] * 2, mask=torch.ones(0, 4, dtype=torch.bool)).shape == (0, 4, 4)
    assert spacetime_rollout([_probs(0, 2, 3, 5, 5)], [_probs(0, 4, 3, 2, 2)]).shape == (0, 2, 4)
