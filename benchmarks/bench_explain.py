"""attnlab.explain against the minimal work on the same tensors, measured in the same run.

Each ratio is t(ours) / t(reference): medians of paired, interleaved repeats after
warm-up (``harness.paired_ratio``), on one intra-op thread and in CPU seconds, so that
other processes sharing the cores do not move the numbers. The references do the least
any implementation must (no input checks, no residual, no renormalisation):

* ``rollout``: ``L=12, B=32, H=12, N=197`` (ViT-B/16) vs a head mean per layer plus the
  chain of ``L-1`` batched matmuls. Goal <= 1.1x.
* ``rollout_padded``: the same with a padding mask (sequences of N/2..N real tokens,
  right-padded, NaN in every padded entry) vs head mean, zeroing the padded rows/columns
  of the mean, matmul chain. Goal <= 1.1x.
* ``grad_rollout``: ``L=6``, same shapes, vs ``mean_h(max(∇A ⊙ A, 0))`` per layer and
  ``R + Ā R`` (baddbmm). Goal <= 1.25x.
* ``spacetime_rollout``: TimeSformer-B shapes ``L=12, B=4, F=8, P=196, H=12`` vs the head
  means of space and time attention and the class row's vector–matrix chain.
  Goal <= 1.25x.

attention_flow is benchmarked in bench_flow.py.

Run: ``.venv/bin/python benchmarks/bench_explain.py`` (about 1 minute; with
``ATTNLAB_BENCH_QUICK=1`` half the layers and fewer repeats: about 20 s of CPU).
"""
from __future__ import annotations

import torch

from harness import QUICK, cpu_clock, emit, paired_ratio, reps, single_thread

from attnlab.explain import grad_rollout, rollout, spacetime_rollout


def random_attention(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return (2.0 * torch.randn(*shape, generator=gen, dtype=dtype)).softmax(-1)


# --------------------------------------------------------------------------- references
def minimal_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """The least work any rollout must do: head mean per layer + L-1 bmm."""
    out = attentions[0].mean(1)
    for attn in attentions[1:]:
        out = torch.bmm(attn.mean(1), out)
    return out


def minimal_padded_rollout(attentions: list[torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """Head mean, padded rows/columns of the mean zeroed (they hold garbage), bmm chain."""
    pad = ~(real[:, :, None] & real[:, None, :])
    out = attentions[0].mean(1).masked_fill_(pad, 0.0)
    for attn in attentions[1:]:
        out = torch.bmm(attn.mean(1).masked_fill_(pad, 0.0), out)
    return out


def minimal_grad_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.: Ā = mean_h(max(∇A ⊙ A, 0)); R = I + Ā₁, then R = R + Ā R."""
    relevance = None
    for attn, grad in zip(attentions, gradients):
        a_bar = (grad * attn).clamp_min_(0).mean(1)
        if relevance is None:
            relevance = a_bar
            relevance.diagonal(dim1=-2, dim2=-1).add_(1)
        else:
            relevance = torch.baddbmm(relevance, a_bar, relevance)
    return relevance


def minimal_spacetime(space: list[torch.Tensor], time_: list[torch.Tensor]) -> torch.Tensor:
    """Head means of every block's space and time attention and the class row carried
    down the blocks with vector–matrix products (class copies averaged over frames)."""
    batch, frames, _, side, _ = space[0].shape
    v = torch.zeros(batch, frames, side)                    # [B, F, 1+P], the class row
    v[:, :, 0] = 1.0 / frames
    for s_attn, t_attn in zip(reversed(space), reversed(time_)):
        s_mean = s_attn.mean(2)                             # [B, F, 1+P, 1+P]
        t_mean = t_attn.mean(2)                             # [B, P, F, F]
        v = torch.matmul(v[:, :, None, :], s_mean).squeeze(2)
        cls = v[:, :, 0].mean(1, keepdim=True).expand(batch, frames)
        patches = torch.matmul(v[:, :, 1:].transpose(1, 2)[:, :, None, :], t_mean).squeeze(2)
        v = torch.cat([cls[:, :, None], patches.transpose(1, 2)], dim=2)
    return v[:, :, 1:]


# --------------------------------------------------------------------------- benchmarks
def bench_rollout() -> None:
    gen = torch.Generator().manual_seed(0)
    n_layers, batch, heads, n_tok = reps(12, 6), 32, 12, 197
    attns = [random_attention(gen, batch, heads, n_tok, n_tok) for _ in range(n_layers)]
    ratio, ours, ref = paired_ratio(lambda: rollout(attns), lambda: minimal_rollout(attns),
                                    reps=reps(11, 5), clock=cpu_clock)
    emit("rollout", ratio, f"L={n_layers} B={batch} H={heads} N={n_tok}: {ours * 1e3:.0f} ms vs head mean + "
                           f"bmm chain {ref * 1e3:.0f} ms (CPU, 1 thread)")

    if QUICK:                                              # not a quick goal
        return
    lengths = torch.randint(n_tok // 2, n_tok + 1, (batch,), generator=gen)     # right padding, 3/4 real on average
    real = torch.arange(n_tok)[None, :] < lengths[:, None]
    pad = ~(real[:, :, None] & real[:, None, :])[:, None]
    dirty = [a.masked_fill(pad, float("nan")) for a in attns[:6]]
    ratio, ours, ref = paired_ratio(lambda: rollout(dirty, mask=real), lambda: minimal_padded_rollout(dirty, real),
                                    reps=reps(11, 5), clock=cpu_clock)
    emit("rollout_padded", ratio, f"L={len(dirty)}, right padding, NaN in padded entries: {ours * 1e3:.0f} ms vs "
                                  f"{ref * 1e3:.0f} ms")


def bench_grad_rollout() -> None:
    gen = torch.Generator().manual_seed(3)
    n_layers, batch, heads, n_tok = reps(6, 3), 32, 12, 197
    attns = [random_attention(gen, batch, heads, n_tok, n_tok) for _ in range(n_layers)]
    grads = [torch.randn(batch, heads, n_tok, n_tok, generator=gen) for _ in range(n_layers)]
    ratio, ours, ref = paired_ratio(lambda: grad_rollout(attns, grads), lambda: minimal_grad_rollout(attns, grads),
                                    reps=reps(11, 5), clock=cpu_clock)
    emit("grad_rollout", ratio, f"L={n_layers} B={batch} H={heads} N={n_tok}: {ours * 1e3:.0f} ms vs "
                                f"{ref * 1e3:.0f} ms")


def bench_spacetime() -> None:
    gen = torch.Generator().manual_seed(4)
    n_blocks, batch, frames, patches, heads = reps(12, 6), 4, 8, 196, 12
    space = [random_attention(gen, batch, frames, heads, 1 + patches, 1 + patches) for _ in range(n_blocks)]
    time_ = [random_attention(gen, batch, patches, heads, frames, frames) for _ in range(n_blocks)]
    ratio, ours, ref = paired_ratio(lambda: spacetime_rollout(space, time_), lambda: minimal_spacetime(space, time_),
                                    reps=reps(11, 5), clock=cpu_clock)
    emit("spacetime_rollout", ratio, f"L={n_blocks} B={batch} F={frames} P={patches} H={heads}: "
                                     f"{ours * 1e3:.0f} ms vs {ref * 1e3:.0f} ms")


def main() -> None:
    single_thread()
    print(f"torch {torch.__version__}, 1 intra-op thread, CPU time{' (quick)' if QUICK else ''}", flush=True)
    with torch.no_grad():
        bench_rollout()
        bench_grad_rollout()
        bench_spacetime()


if __name__ == "__main__":
    main()
