"""VocabAttention.update against the minimal scatter, naive Python loops, and in memory.

    python benchmarks/bench_aggregate.py

1. time of ``update`` (sum + count + expected) against the unavoidable work on the
   same batch: the head mean plus ONE float64 scatter-add of every position pair
   into a V x V table (goal <= 2x). Measured interleaved, batch by batch, as thread
   CPU time (torch on one thread, so all work is on this thread; other processes on
   the shared machine inflate wall time), and the median per-batch ratio is reported;
   the wall-time ratio is printed beside it.
2. against the naive answer, a Python b/i/j loop over position pairs written on the
   arrays as the question writes it (goal >= 100x); and, for reference only (the
   goal is not claimed against it), the same loop on nested lists, with no array
   call per pair.
   Both are timed (CPU time) on a few sequences, checked against an aggregator fed
   the same sequences, and extrapolated per valid position pair to the whole batch.
3. peak RSS of child processes streaming 10x more batches (goal: flat, ratio ~1).

Tokens are Zipf-distributed like text (the headline); uniform tokens, the worst
case for the per-sequence token histograms behind count/expected, are shown too.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from attnlab.aggregate import VocabAttention  # noqa: E402

V, B, H, N = 1000, 32, 4, 128


def make_batch(gen: torch.Generator, tokens: str = "zipf", padded: bool = True):
    """tokens [B, N], attention [B, H, N, N] (softmax over valid keys), mask [B, N]."""
    if tokens == "zipf":
        p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
        tok = torch.multinomial(p / p.sum(), B * N, replacement=True, generator=gen).view(B, N)
    else:
        tok = torch.randint(0, V, (B, N), generator=gen)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=gen) if padded else torch.full((B,), N)
    mask = torch.arange(N)[None, :] < lengths[:, None]
    logits = torch.randn(B, H, N, N, generator=gen)
    attn = logits.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    return tok, attn, mask


def minimal_scatter(table_vv: torch.Tensor, tok: torch.Tensor, attn: torch.Tensor) -> None:
    """The unavoidable work: head mean + one float64 scatter-add of every position pair."""
    idx = (tok[:, :, None] * V + tok[:, None, :]).reshape(-1)
    table_vv.scatter_add_(0, idx, attn.mean(dim=1).to(torch.float64).reshape(-1))


def naive_loop(tok: np.ndarray, attn: np.ndarray, mask: np.ndarray, tables) -> int:
    """The naive answer: a b/i/j loop indexing the arrays (head mean per pair); returns #pairs."""
    s, c, e = tables
    n_pairs = 0
    for b in range(tok.shape[0]):
        keys = np.flatnonzero(mask[b])
        for i in keys:
            for j in keys:
                q, k = tok[b, i], tok[b, j]
                s[q, k] += attn[b, :, i, j].mean()
                c[q, k] += 1
                e[q, k] += 1.0 / len(keys)
                n_pairs += 1
    return n_pairs


def list_loop(tok: list, attn: list, mask: list, tables) -> int:
    """The same loop on nested lists, no array call per pair; returns #pairs."""
    s, c, e = tables
    n_pairs = 0
    for b in range(len(tok)):
        keys = [j for j in range(N) if mask[b][j]]
        inv = 1.0 / len(keys)
        for i in keys:
            s_q, c_q, e_q, a_i, q = s[tok[b][i]], c[tok[b][i]], e[tok[b][i]], attn[b], i
            for j in keys:
                k = tok[b][j]
                s_q[k] += sum(a_i[h][q][j] for h in range(H)) / H
                c_q[k] += 1
                e_q[k] += inv
                n_pairs += 1
    return n_pairs


def time_vs_minimal(tokens: str, causal: bool = False, reps: int = 4, n_batches: int = 5):
    """Median per-batch ratios update / minimal, by thread CPU time and by wall time."""
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(gen, tokens) for _ in range(n_batches)]
    agg = VocabAttention(V)
    table = torch.zeros(V * V, dtype=torch.float64)
    for tok, attn, mask in batches[:2]:                      # warm-up
        agg.update(tok, attn, mask=mask, causal=causal)
        minimal_scatter(table, tok, attn)
    cpu = {"upd": [], "ref": []}
    wall = {"upd": [], "ref": []}
    for r in range(reps):
        for tok, attn, mask in batches:
            for name in (("upd", "ref") if r % 2 else ("ref", "upd")):
                c0, w0 = time.thread_time(), time.perf_counter()
                if name == "upd":
                    agg.update(tok, attn, mask=mask, causal=causal)
                else:
                    minimal_scatter(table, tok, attn)
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)

    def summary(t):
        ratio = np.median(np.asarray(t["upd"]) / np.asarray(t["ref"]))
        return float(ratio), float(np.median(t["upd"])), float(np.median(t["ref"]))
    return summary(cpu), summary(wall)


def child(n_batches: int) -> None:
    """Stream n_batches fresh batches through one aggregator; print peak RSS (KiB)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    agg = VocabAttention(V)
    for _ in range(n_batches):
        tok, attn, mask = make_batch(gen)
        agg.update(tok, attn, mask=mask)
        del tok, attn, mask
    assert agg.n_sequences == n_batches * B
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss_kib(n_batches: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", str(n_batches)],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.set_num_threads(1)
    print(f"VocabAttention: V={V}, B={B}, H={H}, N={N} ({B * N * N:,} position pairs per batch), "
          f"padded to lengths N/2..N, torch threads=1")

    (ratio, t_upd, t_ref), (wall_ratio, w_upd, w_ref) = time_vs_minimal("zipf")
    print(f"Zipf tokens: update {t_upd * 1e3:.2f} ms vs minimal scatter {t_ref * 1e3:.2f} ms CPU per batch "
          f"(wall {w_upd * 1e3:.2f} vs {w_ref * 1e3:.2f} ms = {wall_ratio:.2f}x)")
    print(f"vocab update vs minimal scatter: {ratio:.2f}x (goal <= 2x)")
    for label, tokens, causal in (("uniform tokens", "uniform", False), ("Zipf tokens, causal", "zipf", True)):
        (ratio_x, t_x, t_r), (wall_x, _, _) = time_vs_minimal(tokens, causal=causal, reps=2)
        print(f"  {label}: update {t_x * 1e3:.2f} ms vs minimal {t_r * 1e3:.2f} ms CPU = {ratio_x:.2f}x "
              f"(wall {wall_x:.2f}x)")

    # The loops on a few sequences, extrapolated per valid position pair; interleaved
    # with timed updates of the whole batch so that load drift hits both alike.
    gen = torch.Generator().manual_seed(2)
    tok, attn, mask = make_batch(gen)
    batch_pairs = int((mask.sum(1) ** 2).sum())
    n_seq = 4
    arrays = (tok.numpy(), attn.numpy(), mask.numpy())
    lists = (tok.tolist(), attn.tolist(), mask.tolist())
    truth = VocabAttention(V).update(tok[:n_seq], attn[:n_seq], mask=mask[:n_seq])
    agg = VocabAttention(V).update(tok, attn, mask=mask)
    for label, loop, data, new_table, goal in (
            ("naive loop on the arrays", naive_loop, arrays, lambda: np.zeros((V, V)), " (goal >= 100x)"),
            ("pure-Python list loop", list_loop, lists, lambda: [[0.0] * V for _ in range(V)],
             " (for reference)")):
        tables = tuple(new_table() for _ in range(3))
        loop_ns, vec_s, loop_pairs = [], [], 0
        for b in range(n_seq):
            t0 = time.thread_time()
            n_pairs = loop(*(d[b:b + 1] for d in data), tables)
            loop_ns.append((time.thread_time() - t0) / n_pairs)
            loop_pairs += n_pairs
            t0 = time.thread_time()
            agg.update(tok, attn, mask=mask)
            vec_s.append(time.thread_time() - t0)
        for name, table in zip(("sum", "count", "expected"), tables):
            if not np.allclose(np.asarray(table), getattr(truth, name), rtol=1e-5, atol=1e-6):
                raise SystemExit(f"{label}: its {name} table differs from VocabAttention on the same sequences")
        t_loop = float(np.median(loop_ns)) * batch_pairs
        t_vec = float(np.median(vec_s))
        print(f"{label}: {np.median(loop_ns) * 1e9:.0f} ns/pair (timed on {loop_pairs:,} pairs of {n_seq} "
              f"sequences), extrapolated to the batch's {batch_pairs:,} valid pairs = {t_loop:.2f} s; "
              f"update {t_vec * 1e3:.2f} ms")
        print(f"vocab update vs {label}: {t_loop / t_vec:.0f}x faster{goal}")

    # Peak memory while streaming 10x more batches.
    small, large = 8, 80
    rss_small, rss_large = peak_rss_kib(small), peak_rss_kib(large)
    print(f"peak RSS streaming {small} batches: {rss_small / 1024:.0f} MiB, {large} batches: "
          f"{rss_large / 1024:.0f} MiB (dataset attention {large * B * H * N * N * 4 / 2**30:.1f} GiB float32)")
    print(f"vocab peak memory {large}/{small} batches: {rss_large / rss_small:.2f}x (goal: flat, ~1x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
    else:
        main()
