"""Benchmark attnlab.explain against naive references, measured in the same run.

1. rollout (L=12, B=32, H=12, N=197) vs the minimal work on the same tensors: a head
   mean per layer plus the bare chain of L-1 batched matmuls. Goal: ≤ 1.25×.
2. attention_flow (N=32, L=4, B=1) vs networkx Edmonds–Karp, one max flow per (i, j)
   pair on a layered DiGraph built once and reused. Goal: ≥ 20× faster, same values.
3. attention_flow at N=128, L=6, one sample (time, or the refusal message).

Run: ``.venv/bin/python benchmarks/bench_explain.py`` (about 1–2 minutes on 2 cores).
"""
from __future__ import annotations

import statistics
import time

import networkx as nx
import numpy as np
import torch
from networkx.algorithms.flow import edmonds_karp

from attnlab.explain import attention_flow, rollout


def random_attention(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return (2.0 * torch.randn(*shape, generator=gen, dtype=dtype)).softmax(-1)


def minimal_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """The least work any rollout must do: head mean per layer + L-1 bmm."""
    out = attentions[0].mean(1)
    for attn in attentions[1:]:
        out = torch.bmm(attn.mean(1), out)
    return out


def bench_rollout(reps: int = 11) -> None:
    gen = torch.Generator().manual_seed(0)
    n_layers, batch, heads, n_tok = 12, 32, 12, 197
    attns = [random_attention(gen, batch, heads, n_tok, n_tok) for _ in range(n_layers)]
    rollout(attns), minimal_rollout(attns)  # warm-up
    pairs = []
    for rep in range(reps):
        # back to back, alternating which goes first, so load changes hit both alike
        runs = {}
        for name in (("ours", "min") if rep % 2 == 0 else ("min", "ours")):
            t0 = time.perf_counter()
            rollout(attns) if name == "ours" else minimal_rollout(attns)
            runs[name] = time.perf_counter() - t0
        pairs.append((runs["ours"], runs["min"]))
    ratio = statistics.median(o / m for o, m in pairs)
    best_ours, best_min = min(o for o, _ in pairs), min(m for _, m in pairs)
    print(
        f"[rollout] L={n_layers} B={batch} H={heads} N={n_tok}: rollout "
        f"{statistics.median(o for o, _ in pairs) * 1e3:.0f} ms, head-mean + bmm chain "
        f"{statistics.median(m for _, m in pairs) * 1e3:.0f} ms (medians of {reps}) -> "
        f"ratio {ratio:.2f}x (median of paired ratios; best-of ratio "
        f"{best_ours / best_min:.2f}x) (goal <= 1.25x)"
    )


def naive_flow_graph(attentions: list[torch.Tensor]) -> nx.DiGraph:
    """What a user would build: L+1 layers of N nodes, capacities = residual-mixed,
    head-averaged, row-normalised attention (sample 0)."""
    n_tok = attentions[0].shape[-1]
    graph = nx.DiGraph()
    for layer, attn in enumerate(attentions, start=1):
        a = 0.5 * attn[0].double().mean(0) + 0.5 * torch.eye(n_tok, dtype=torch.float64)
        a = (a / a.sum(-1, keepdim=True)).tolist()
        for i in range(n_tok):
            for j in range(n_tok):
                graph.add_edge((layer, i), (layer - 1, j), capacity=a[i][j])
    return graph


def bench_flow_vs_networkx(budget_s: float = 20.0) -> None:
    gen = torch.Generator().manual_seed(1)
    n_layers, n_tok = 4, 32
    attns = [random_attention(gen, 1, 4, n_tok, n_tok) for _ in range(n_layers)]
    t0 = time.perf_counter()
    ours = attention_flow(attns)[0].double().numpy()
    t_ours = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    rows = rng.permutation(n_tok)
    t0 = time.perf_counter()
    graph = naive_flow_graph(attns)
    ref = {}
    for i in rows:  # whole rows, so they can be row-normalised like ours
        flows = np.array(
            [
                edmonds_karp(graph, (n_layers, int(i)), (0, j)).graph["flow_value"]
                for j in range(n_tok)
            ]
        )
        ref[int(i)] = flows / flows.sum()
        if time.perf_counter() - t0 > budget_s:
            break
    t_done = time.perf_counter() - t0
    n_pairs = len(ref) * n_tok
    t_nx = t_done * n_tok / len(ref)
    how = (
        "all pairs"
        if len(ref) == n_tok
        else f"timed on {n_pairs} of {n_tok * n_tok} pairs ({len(ref)} random rows), extrapolated"
    )
    diff = max(np.abs(ours[i] - ref[i]).max() for i in ref)
    print(
        f"[flow] N={n_tok} L={n_layers} B=1: attention_flow {t_ours:.2f} s, networkx "
        f"edmonds_karp per pair {t_nx:.1f} s ({how}) -> {t_nx / t_ours:.0f}x faster "
        f"(goal >= 20x); max |diff| on compared rows {diff:.1e}"
    )


def bench_flow_large() -> None:
    gen = torch.Generator().manual_seed(2)
    n_layers, n_tok = 6, 128
    attns = [random_attention(gen, 1, 4, n_tok, n_tok) for _ in range(n_layers)]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = attention_flow(attns, progress=False)
    except ValueError as err:
        print(f"[flow] N={n_tok} L={n_layers} B=1: refused: {err}")
        return
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"[flow] N={n_tok} L={n_layers} B=1: attention_flow {dt:.1f} s wall, {cpu:.1f} s CPU "
        f"({n_tok * n_tok} max-flow problems, {dt / n_tok**2 * 1e3:.2f} ms each); "
        f"rows sum to 1 within {float((out.sum(-1) - 1).abs().max()):.1e}"
    )


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_rollout()
    bench_flow_vs_networkx()
    bench_flow_large()


if __name__ == "__main__":
    main()
