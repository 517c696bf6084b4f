"""spacetime_grad_rollout against the Chefer rule on explicit (1+F·P)² joint matrices."""
import itertools

import pytest
import torch

from attnlab.explain import spacetime_grad_rollout


def _joint_time(abar_pff, F, P):
    n = 1 + F * P
    m = torch.zeros(n, n, dtype=torch.float64)
    for f, p, f2 in itertools.product(range(F), range(P), range(F)):
        m[1 + f * P + p, 1 + f2 * P + p] = abar_pff[p, f, f2]
    return m                                     # class row stays zero: it skips time attention


def _joint_space(abar_fqq, F, P):
    n = 1 + F * P
    m = torch.zeros(n, n, dtype=torch.float64)
    for f in range(F):
        for p in range(P):
            m[1 + f * P + p, 0] = abar_fqq[f, 1 + p, 0]
            for p2 in range(P):
                m[1 + f * P + p, 1 + f * P + p2] = abar_fqq[f, 1 + p, 1 + p2]
        m[0, 0] += abar_fqq[f, 0, 0] / F
        for p2 in range(P):
            m[0, 1 + f * P + p2] = abar_fqq[f, 0, 1 + p2] / F
    return m


@pytest.mark.parametrize("B,F,P,H,L", [(1, 2, 3, 1, 1), (2, 3, 4, 2, 2), (2, 4, 2, 3, 3)])
def test_equals_dense_chefer_rule(B, F, P, H, L):
    g = torch.Generator().manual_seed(B * 100 + F * 10 + L)
    sm = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64).softmax(-1)  # noqa: E731
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    space = [sm(B, F, H, 1 + P, 1 + P) for _ in range(L)]
    time = [sm(B, P, H, F, F) for _ in range(L)]
    space_g = [rnd(B, F, H, 1 + P, 1 + P) for _ in range(L)]
    time_g = [rnd(B, P, H, F, F) for _ in range(L)]
    got = spacetime_grad_rollout(space, time, space_g, time_g)
    n = 1 + F * P
    for b in range(B):
        r = torch.eye(n, dtype=torch.float64)
        for l in range(L):                       # block l: time then space; R = (I+S)(I+T) R
            abar_t = sum(torch.clamp(time[l][b, :, h] * time_g[l][b, :, h], min=0) for h in range(H)) / H
            abar_s = sum(torch.clamp(space[l][b, :, h] * space_g[l][b, :, h], min=0) for h in range(H)) / H
            r = (torch.eye(n, dtype=torch.float64) + _joint_time(abar_t, F, P)) @ r
            r = (torch.eye(n, dtype=torch.float64) + _joint_space(abar_s, F, P)) @ r
        torch.testing.assert_close(got[b], r[0, 1:].reshape(F, P), rtol=1e-9, atol=1e-12)


def test_shapes_must_match():
    a = [torch.rand(1, 2, 1, 3, 3)]
    t = [torch.rand(1, 2, 1, 2, 2)]
    with pytest.raises(ValueError, match="space_grads"):
        spacetime_grad_rollout(a, t, [torch.rand(1, 2, 1, 3, 3)[:, :, 0]], t)
