"""Tests for attnlab.explain against independent references: literal numpy loops,
dense joint matrices built entry by entry (attention flow against networkx: test_flow.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.explain import attention_flow, grad_rollout, readout, rollout, spacetime_rollout

FUSIONS = ["mean", "max", "min"]


def softmax_attn(
    gen: torch.Generator, *shape: int, dtype=torch.float64, sharp: float = 2.0
) -> torch.Tensor:
    return (sharp * torch.randn(*shape, generator=gen, dtype=dtype)).softmax(-1)


# --------------------------------------------------------------------------- references


def ref_fuse(attn: np.ndarray, head_fusion: str) -> np.ndarray:
    """[H, N, M] → [N, M] with explicit loops (a [N, M] input is returned as is)."""
    if attn.ndim == 2:
        return attn.copy()
    n_heads, rows, cols = attn.shape
    out = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            vals = [attn[h, i, j] for h in range(n_heads)]
            if head_fusion == "mean":
                out[i, j] = sum(vals) / n_heads
            elif head_fusion == "max":
                out[i, j] = max(vals)
            else:
                out[i, j] = min(vals)
    return out


def ref_residual_renorm(a: np.ndarray, residual: bool, real: list[bool] | None = None):
    n = a.shape[0]
    real = real if real is not None else [True] * n
    a = a.copy()
    if residual:
        for i in range(n):
            for j in range(n):
                a[i, j] = 0.5 * a[i, j] + (0.5 if (i == j and real[i]) else 0.0)
    for i in range(n):
        s = sum(a[i, j] for j in range(n))
        if s > 0:
            for j in range(n):
                a[i, j] /= s
    return a


def ref_layer(attn, head_fusion, residual, discard_ratio=0.0, pad=None) -> np.ndarray:
    """One sample's layer, the rollout recipe written out literally."""
    a = ref_fuse(np.asarray(attn, dtype=np.float64), head_fusion)
    n = a.shape[0]
    real = [True] * n if pad is None else [not bool(p) for p in pad]
    for i in range(n):
        for j in range(n):
            if not (real[i] and real[j]):
                a[i, j] = 0.0
    if discard_ratio > 0:
        cands = [(i, j) for i in range(n) for j in range(n) if i != j and real[i] and real[j]]
        m = sum(real)
        k = math.floor(discard_ratio * m * (m - 1))
        order = sorted(range(len(cands)), key=lambda c: (a[cands[c]], c))
        for c in order[:k]:
            a[cands[c]] = 0.0
    return ref_residual_renorm(a, residual, real)


def ref_rollout(
    attentions, head_fusion="mean", residual=True, discard_ratio=0.0, padding_mask=None
):
    batch = attentions[0].shape[0]
    out = []
    for b in range(batch):
        pad = None if padding_mask is None else padding_mask[b].tolist()
        joint = None
        for attn in attentions:
            a_hat = ref_layer(attn[b].numpy(), head_fusion, residual, discard_ratio, pad)
            joint = a_hat if joint is None else a_hat @ joint
        out.append(joint)
    return np.stack(out)


# --------------------------------------------------------------------------- rollout


@pytest.mark.parametrize("head_fusion", FUSIONS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.9])
def test_rollout_matches_literal_loop(head_fusion, residual, discard_ratio):
    gen = torch.Generator().manual_seed(0)
    # heads differ per layer; the last layer comes already fused
    attns = [softmax_attn(gen, 3, h, 6, 6) for h in (4, 2, 3)] + [softmax_attn(gen, 3, 6, 6)]
    got = rollout(attns, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio)
    want = ref_rollout(attns, head_fusion, residual, discard_ratio)
    assert got.shape == (3, 6, 6) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("head_fusion", FUSIONS)
def test_rollout_float32_rows_sum_to_one(head_fusion):
    gen = torch.Generator().manual_seed(1)
    attns = [softmax_attn(gen, 4, 3, 17, 17, dtype=torch.float32) for _ in range(5)]
    got = rollout(attns, head_fusion=head_fusion, discard_ratio=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(-1), torch.ones(4, 17), atol=1e-5, rtol=0)
    assert (got >= 0).all()


def test_rollout_float16_storage_is_computed_in_float32():
    gen = torch.Generator().manual_seed(2)
    attns = [softmax_attn(gen, 2, 2, 5, 5) for _ in range(3)]
    got = rollout([a.half() for a in attns])
    assert got.dtype == torch.float32
    want = ref_rollout([a.half().double() for a in attns])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_rollout_all_zero_rows_stay_zero_and_do_not_disturb_other_rows():
    gen = torch.Generator().manual_seed(12)
    attns = [softmax_attn(gen, 2, 3, 5, 5) for _ in range(4)]
    attns[1][0, :, 2] = 0.0  # token 2 of sample 0 attends to nothing in layer 2
    attns[2][1, :, :, 3] = 0.0  # nobody attends to token 3 of sample 1 in layer 3
    got = rollout(attns, residual=False)
    want = ref_rollout(attns, residual=False)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    assert (rollout(attns[:2], residual=False)[0, 2] == 0).all()


def test_one_layer_without_residual_is_the_attention_itself():
    gen = torch.Generator().manual_seed(3)
    attn = softmax_attn(gen, 3, 1, 7, 7)
    torch.testing.assert_close(rollout([attn], residual=False), attn[:, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rollout([attn[:, 0]], residual=False), attn[:, 0])
    multi = softmax_attn(gen, 3, 4, 7, 7)
    torch.testing.assert_close(rollout([multi], residual=False), multi.mean(1))


def test_discard_never_zeroes_the_diagonal_and_drops_the_exact_count():
    gen = torch.Generator().manual_seed(4)
    n, ratio = 8, 0.95
    fused = torch.rand(2, n, n, generator=gen, dtype=torch.float64)
    fused.diagonal(dim1=-2, dim2=-1).fill_(1e-9)  # the smallest entries of every row
    got = rollout([fused], residual=False, discard_ratio=ratio)
    assert (got.diagonal(dim1=-2, dim2=-1) > 0).all()
    n_zero_offdiag = ((got == 0) & ~torch.eye(n, dtype=torch.bool)).sum(dim=(1, 2))
    assert n_zero_offdiag.tolist() == [math.floor(ratio * n * (n - 1))] * 2
    # the survivors are the largest off-diagonal entries
    for b in range(2):
        offdiag = fused[b][~torch.eye(n, dtype=torch.bool)]
        kept = got[b][~torch.eye(n, dtype=torch.bool)] > 0
        assert offdiag[kept].min() > offdiag[~kept].max()


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.4])
def test_rollout_padding_mask(residual, discard_ratio):
    gen = torch.Generator().manual_seed(5)
    batch, n = 3, 7
    attns = [softmax_attn(gen, batch, 2, n, n) for _ in range(3)]
    pad = torch.zeros(batch, n, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, [1, 6]] = True
    got = rollout(attns, residual=residual, discard_ratio=discard_ratio, padding_mask=pad)
    want = ref_rollout(attns, "mean", residual, discard_ratio, pad)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    for b in range(batch):
        real = ~pad[b]
        assert (got[b][pad[b]] == 0).all() and (got[b][:, pad[b]] == 0).all()
        row_sums = got[b][real].sum(-1)
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
        # identical to rolling out the attention of the real tokens alone
        alone = rollout(
            [a[b : b + 1][:, :, real][:, :, :, real] for a in attns],
            residual=residual,
            discard_ratio=discard_ratio,
        )[0]
        torch.testing.assert_close(got[b][real][:, real], alone)


# --------------------------------------------------------------------------- grad_rollout


def test_grad_rollout_matches_hand_loop():
    gen = torch.Generator().manual_seed(6)
    batch, n_heads, n = 2, 3, 5
    attns = [softmax_attn(gen, batch, n_heads, n, n) for _ in range(3)]
    grads = [
        torch.randn(batch, n_heads, n, n, generator=gen, dtype=torch.float64) for _ in range(3)
    ]
    got = grad_rollout(attns, grads)
    for b in range(batch):
        rel = np.eye(n)
        for attn, grad in zip(attns, grads):
            a_bar = np.zeros((n, n))
            for i in range(n):
                for j in range(n):
                    total = 0.0
                    for h in range(n_heads):
                        total += max(grad[b, h, i, j].item() * attn[b, h, i, j].item(), 0.0)
                    a_bar[i, j] = total / n_heads
            rel = rel + a_bar @ rel
        np.testing.assert_allclose(got[b].numpy(), rel, rtol=1e-12)


def test_grad_rollout_validates_pairing():
    a = [torch.rand(1, 2, 4, 4)] * 2
    with pytest.raises(ValueError, match="gradients"):
        grad_rollout(a, a[:1])
    with pytest.raises(ValueError, match=r"gradients\[1\]"):
        grad_rollout(a, [a[0], torch.rand(1, 3, 4, 4)])


# --------------------------------------------------------------------------- spacetime


def dense_spacetime_reference(space, time, head_fusion, residual):
    """Build the (1+F·P)² joint matrices with literal loops; return the cls row of
    B_L ⋯ B_1 over the patch columns, [B, F, P]."""
    batch, frames = space[0].shape[:2]
    patches = space[0].shape[-1] - 1
    n = 1 + frames * patches

    def idx(f, p):
        return 1 + f * patches + p

    out = np.zeros((batch, frames, patches))
    for b in range(batch):
        joint = np.eye(n)
        for s_attn, t_attn in zip(space, time):
            t_mat = np.zeros((n, n))
            t_mat[0, 0] = 1.0
            for p in range(patches):
                tau = ref_fuse(t_attn[b, p].numpy(), head_fusion)
                for f in range(frames):
                    for f2 in range(frames):
                        t_mat[idx(f, p), idx(f2, p)] = tau[f, f2]
            s_mat = np.zeros((n, n))
            for f in range(frames):
                sigma = ref_fuse(s_attn[b, f].numpy(), head_fusion)
                s_mat[0, 0] += sigma[0, 0] / frames
                for p2 in range(patches):
                    s_mat[0, idx(f, p2)] += sigma[0, 1 + p2] / frames
                for p in range(patches):
                    s_mat[idx(f, p), 0] = sigma[1 + p, 0]
                    for p2 in range(patches):
                        s_mat[idx(f, p), idx(f, p2)] = sigma[1 + p, 1 + p2]
            block = ref_residual_renorm(s_mat, residual) @ ref_residual_renorm(t_mat, residual)
            joint = block @ joint
        for f in range(frames):
            for p in range(patches):
                out[b, f, p] = joint[0, idx(f, p)]
    return out


@pytest.mark.parametrize(
    "batch,frames,patches,heads,blocks",
    [(1, 1, 1, 1, 1), (2, 3, 4, 2, 2), (3, 2, 5, 3, 3), (1, 4, 2, 1, 4), (2, 5, 1, 2, 2)],
)
@pytest.mark.parametrize("head_fusion", FUSIONS)
@pytest.mark.parametrize("residual", [True, False])
def test_spacetime_equals_dense_joint_rollout(
    batch, frames, patches, heads, blocks, head_fusion, residual
):
    gen = torch.Generator().manual_seed(7 + frames * 10 + patches)
    side = 1 + patches
    space = [softmax_attn(gen, batch, frames, heads, side, side) for _ in range(blocks)]
    time = [softmax_attn(gen, batch, patches, heads, frames, frames) for _ in range(blocks)]
    got = spacetime_rollout(space, time, head_fusion=head_fusion, residual=residual)
    want = dense_spacetime_reference(space, time, head_fusion, residual)
    assert got.shape == (batch, frames, patches)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-12)


def test_spacetime_accepts_fused_blocks_and_float32():
    gen = torch.Generator().manual_seed(8)
    space = [softmax_attn(gen, 2, 3, 2, 5, 5) for _ in range(2)]
    time = [softmax_attn(gen, 2, 4, 2, 3, 3) for _ in range(2)]
    want = spacetime_rollout(space, time)
    fused = spacetime_rollout([s.mean(2) for s in space], [t.mean(2) for t in time])
    torch.testing.assert_close(fused, want)
    f32 = spacetime_rollout([s.float() for s in space], [t.float() for t in time])
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want, atol=1e-6, rtol=1e-5)


def test_spacetime_validation():
    space = [torch.rand(2, 3, 1, 5, 5)]
    time = [torch.rand(2, 4, 1, 3, 3)]
    with pytest.raises(ValueError, match="space is empty"):
        spacetime_rollout([], [])
    with pytest.raises(ValueError, match="blocks"):
        spacetime_rollout(space * 2, time)
    with pytest.raises(ValueError, match=r"time\[0\]"):
        spacetime_rollout(space, [torch.rand(2, 5, 1, 3, 3)])
    with pytest.raises(ValueError, match=r"space\[1\]"):
        spacetime_rollout(space + [torch.rand(2, 3, 1, 6, 6)], time * 2)
    with pytest.raises(ValueError, match="head_fusion"):
        spacetime_rollout(space, time, head_fusion="sum")


# attention flow: tests/test_flow.py


# --------------------------------------------------------------------------- readout


def test_readout_variants():
    gen = torch.Generator().manual_seed(11)
    joint = torch.rand(3, 5, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(readout(joint), joint[:, 0])
    torch.testing.assert_close(readout(joint, "cls"), joint[:, 0])
    torch.testing.assert_close(readout(joint, 2), joint[:, 2])
    torch.testing.assert_close(readout(joint, -1), joint[:, 4])
    want_mean = np.zeros((3, 5))
    for b in range(3):
        for j in range(5):
            want_mean[b, j] = sum(joint[b, i, j].item() for i in range(5)) / 5
    np.testing.assert_allclose(readout(joint, "mean").numpy(), want_mean, rtol=1e-12)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True], [False] * 4 + [True]])
    got = readout(joint, "mean", padding_mask=pad)
    for b in range(3):
        rows = [i for i in range(5) if not pad[b, i]]
        want = [sum(joint[b, i, j].item() for i in rows) / len(rows) for j in range(5)]
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("how", [5, -6, "first", 1.0, True, None])
def test_readout_rejects_bad_how(how):
    with pytest.raises(ValueError, match="how"):
        readout(torch.rand(2, 5, 5), how)


def test_readout_rejects_bad_joint_and_mask():
    with pytest.raises(ValueError, match="joint"):
        readout(torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="padding_mask"):
        readout(torch.rand(2, 5, 5), "mean", padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        readout(torch.rand(2, 5, 5), "cls", padding_mask=torch.zeros(2, 5, dtype=torch.bool))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fn", [rollout, attention_flow])
def test_layer_list_validation(fn):
    with pytest.raises(ValueError, match="attentions is empty"):
        fn([])
    with pytest.raises(ValueError, match="list of per-layer tensors"):
        fn(torch.rand(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"attentions\[1\].*same batch and token count"):
        fn([torch.rand(1, 2, 4, 4), torch.rand(1, 2, 5, 5)])
    with pytest.raises(ValueError, match=r"attentions\[0\] must have shape"):
        fn([torch.rand(1, 2, 4, 5)])
    with pytest.raises(ValueError, match="'mean', 'max', 'min'"):
        fn([torch.rand(1, 2, 4, 4)], head_fusion="avg")


def test_inputs_that_require_grad_are_accepted_without_building_a_graph():
    attns = [torch.rand(2, 3, 5, 5, requires_grad=True).softmax(-1) for _ in range(3)]
    space = [torch.rand(2, 3, 2, 4, 4, requires_grad=True)]
    time = [torch.rand(2, 3, 2, 3, 3, requires_grad=True)]
    outs = [
        rollout(attns),
        attention_flow(attns),
        grad_rollout(attns, attns),
        spacetime_rollout(space, time),
    ]
    assert not any(out.requires_grad for out in outs)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True])
def test_rollout_rejects_bad_discard_ratio(ratio):
    with pytest.raises(ValueError, match="discard_ratio"):
        rollout([torch.rand(1, 2, 4, 4)], discard_ratio=ratio)


def test_rollout_rejects_bad_padding_mask():
    with pytest.raises(ValueError, match="padding_mask"):
        rollout([torch.rand(2, 2, 4, 4)], padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        rollout([torch.rand(2, 2, 4, 4)], padding_mask=torch.zeros(2, 4))


def test_readout_per_sample_rows_match_indexing():
    from attnlab.explain import readout

    joint = torch.rand(4, 6, 6)
    rows = torch.tensor([0, 5, 2, 3])
    out = readout(joint, rows)
    for b in range(4):
        assert torch.equal(out[b], joint[b, rows[b]])
    with pytest.raises(ValueError, match="outside"):
        readout(joint, torch.tensor([0, 6, 1, 1]))
    with pytest.raises(ValueError, match="int64"):
        readout(joint, torch.tensor([0, 1]))
