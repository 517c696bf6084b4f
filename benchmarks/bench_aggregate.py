"""VocabAttention: update against the minimal scatter, sparse against dense, loops, memory.

    .venv/bin/python benchmarks/bench_aggregate.py
    ATTNLAB_BENCH_QUICK=1 .venv/bin/python benchmarks/bench_aggregate.py   # vocab_update only, a few seconds

1. ``vocab_update`` (goal <= 2x, quick): ``update`` (sum + count + expected, input checks
   included) against the unavoidable work on the same batch: the head mean plus ONE
   float64 scatter-add of every position pair into a V x V table. V=1000, B=32, H=4,
   N=128 padded to lengths N/2..N; four cases, Zipf and uniform tokens (the worst case
   for the per-sequence token histograms behind count/expected), causal and not; the
   reported ratio is the worst of the four. Timed batch by batch, interleaved, as thread
   CPU time (torch on one thread, so all work is on this thread; other processes on the
   shared machine inflate wall time); median per-batch ratio.
2. ``vocab_sparse_vs_dense`` (goal <= 1.5): the default ``tokens`` experiment's aggregate
   workload (params.yaml: vocabulary 40, 32 tokens, 1200 test sequences in batches of 64,
   causal, one head, a head-mean and a per-head aggregator) with ``sparse=True`` against
   ``sparse=False``, including reading the seen pairs at the end (the sparse layout's
   merge). Median of interleaved paired repeats (wall time).
3. ``vocab_vs_naive_loop`` (goal >= 100x): a Python b/i/j loop over position pairs written
   on the arrays as the question writes it, timed on a few sequences, checked against an
   aggregator fed the same sequences and extrapolated per valid position pair to the
   batch; the same loop on nested lists is printed for reference.
4. ``vocab_peak_memory_10x`` (goal <= 1.1): peak RSS of child processes streaming 10x more
   batches (flat: memory does not grow with the stream).
5. ``vocab_sparse_memory_vs_dense`` (goal <= 0.02): a 30,522-token vocabulary (BERT's) with
   Zipf tokens streamed through a sparse aggregator in a child process: the growth of its
   peak RSS (VmHWM) over the aggregation, divided by what the dense tables would take
   ((V+1)² x 24 bytes = 22 GB). Seconds per batch are printed beside it.
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
from harness import QUICK, emit, paired_ratio  # noqa: E402

V, B, H, N = 1000, 32, 4, 128
BERT_V = 30522


def make_batch(gen: torch.Generator, tokens: str = "zipf", padded: bool = True, *, vocab: int = V,
               b: int = B, h: int = H, n: int = N):
    """tokens [b, n], attention [b, h, n, n] (softmax over valid keys), mask [b, n]."""
    if tokens == "zipf":
        p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
        tok = torch.multinomial(p / p.sum(), b * n, replacement=True, generator=gen).view(b, n)
    else:
        tok = torch.randint(0, vocab, (b, n), generator=gen)
    lengths = torch.randint(n // 2, n + 1, (b,), generator=gen) if padded else torch.full((b,), n)
    mask = torch.arange(n)[None, :] < lengths[:, None]
    logits = torch.randn(b, h, n, n, generator=gen)
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


def bench_update(reps: int, n_batches: int) -> None:
    cases = {}
    for tokens in ("zipf", "uniform"):
        for causal in (False, True):
            (ratio, t_upd, t_ref), (wall_ratio, _, _) = time_vs_minimal(tokens, causal, reps, n_batches)
            label = f"{tokens}{', causal' if causal else ''}"
            cases[label] = ratio
            print(f"  {label}: update {t_upd * 1e3:.2f} ms vs minimal scatter {t_ref * 1e3:.2f} ms CPU per batch "
                  f"= {ratio:.2f}x (wall {wall_ratio:.2f}x)")
    worst = max(cases, key=cases.get)
    emit("vocab_update", cases[worst], f"worst case: {worst}; " + ", ".join(f"{k} {v:.2f}" for k, v in cases.items()))


def tokens_stream(sparse: bool, batches) -> None:
    """The tokens experiment's aggregate stage workload: head mean + per head, causal, then read."""
    aggs = [VocabAttention(40, sparse=sparse), VocabAttention(40, nhead=1, sparse=sparse)]
    for tok, attn, mask in batches:
        for agg in aggs:
            agg.update(tok, attn, mask=mask, causal=True)
    for agg in aggs:
        agg.pairs()


def bench_sparse_vs_dense() -> None:
    gen = torch.Generator().manual_seed(3)
    n_test, batch, length = 1200, 64, 32          # params.yaml tokens: n 6000 x test_fraction 0.2, max_len 32
    batches = [make_batch(gen, "uniform", vocab=40, b=min(batch, n_test - s), h=1, n=length)
               for s in range(0, n_test, batch)]
    ratio, t_sparse, t_dense = paired_ratio(lambda: tokens_stream(True, batches), lambda: tokens_stream(False, batches),
                                            reps=9)
    emit("vocab_sparse_vs_dense", ratio, f"tokens experiment shape: sparse {t_sparse * 1e3:.1f} ms vs dense "
         f"{t_dense * 1e3:.1f} ms for {n_test} sequences (wall, paired medians)")
    # for reference: the update benchmark's batches (V=1000) and a vocabulary too large for dense tables
    gen = torch.Generator().manual_seed(4)
    big = [make_batch(gen, "zipf") for _ in range(4)]

    def stream(sparse: bool, vocab: int = V) -> None:
        agg = VocabAttention(vocab, sparse=sparse)
        for tok, attn, mask in big:
            agg.update(tok, attn, mask=mask)
        agg.pairs()
    ratio, t_sparse, t_dense = paired_ratio(lambda: stream(True), lambda: stream(False), reps=5)
    print(f"  (reference) V={V}, Zipf, 4 batches of {B}x{N}: sparse {t_sparse * 1e3:.1f} ms vs dense "
          f"{t_dense * 1e3:.1f} ms = {ratio:.2f}x")
    gen = torch.Generator().manual_seed(5)
    bert = [make_batch(gen, "zipf", vocab=BERT_V) for _ in range(10)]
    agg = VocabAttention(BERT_V)
    table = torch.zeros(V * V, dtype=torch.float64)
    t_bert, t_min = [], []
    for k, (tok, attn, mask) in enumerate(bert):               # thread CPU time, after two warm-up batches
        t0 = time.thread_time()
        agg.update(tok, attn, mask=mask)
        t1 = time.thread_time()
        minimal_scatter(table, tok % V, attn)
        if k >= 2:
            t_bert.append(t1 - t0)
            t_min.append(time.thread_time() - t1)
    t0 = time.thread_time()
    n_pairs = len(agg.pairs()["count"])
    t_read = time.thread_time() - t0
    t_bert, t_min = float(np.mean(t_bert)), float(np.mean(t_min))
    print(f"  (reference) V={BERT_V} (sparse, automatic), Zipf: {t_bert * 1e3:.1f} ms per batch of {B}x{N} (CPU, "
          f"mean of 8), {t_bert / t_min:.1f}x the minimal scatter into a {V}x{V} table; reading the "
          f"{n_pairs:,} pairs seen {t_read * 1e3:.0f} ms")


def bench_loops() -> None:
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
    for label, loop, data, new_table, name in (
            ("naive loop on the arrays", naive_loop, arrays, lambda: np.zeros((V, V)), "vocab_vs_naive_loop"),
            ("pure-Python list loop", list_loop, lists, lambda: [[0.0] * V for _ in range(V)], None)):
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
        for stat, table in zip(("sum", "count", "expected"), tables):
            if not np.allclose(np.asarray(table), getattr(truth, stat), rtol=1e-5, atol=1e-6):
                raise SystemExit(f"{label}: its {stat} table differs from VocabAttention on the same sequences")
        t_loop = float(np.median(loop_ns)) * batch_pairs
        t_vec = float(np.median(vec_s))
        detail = (f"{np.median(loop_ns) * 1e9:.0f} ns/pair on {loop_pairs:,} pairs, extrapolated to the batch's "
                  f"{batch_pairs:,} valid pairs = {t_loop:.2f} s; update {t_vec * 1e3:.2f} ms")
        if name:
            emit(name, t_loop / t_vec, detail)
        else:
            print(f"  (reference) update vs {label}: {t_loop / t_vec:.0f}x faster ({detail})")


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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_bert(n_batches: int) -> None:
    """Stream n_batches Zipf batches over BERT's vocabulary into a sparse aggregator; print
    the VmHWM growth (KiB), seconds per batch and the number of token pairs seen."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(6)
    agg = VocabAttention(BERT_V)
    tok, attn, mask = make_batch(gen, "zipf", vocab=BERT_V)    # one batch exists before the reset
    agg.update(tok, attn, mask=mask)
    Path("/proc/self/clear_refs").write_text("5")             # reset the peak (VmHWM) to the current RSS
    base = _status_kib("VmHWM")
    seconds = 0.0
    for _ in range(n_batches - 1):
        tok, attn, mask = make_batch(gen, "zipf", vocab=BERT_V)
        t0 = time.thread_time()
        agg.update(tok, attn, mask=mask)
        seconds += time.thread_time() - t0
    agg.top_pairs(10, min_count=5)                               # reading: ranks every pair seen
    n_pairs = len(agg.pairs()["count"])
    seconds /= n_batches - 1
    print(_status_kib("VmHWM") - base, seconds, n_pairs)


def run_child(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1].split()


def bench_memory() -> None:
    small, large = 8, 80
    rss_small, rss_large = (int(run_child("--child", str(n))[0]) for n in (small, large))
    emit("vocab_peak_memory_10x", rss_large / rss_small,
         f"peak RSS streaming {small} batches {rss_small / 1024:.0f} MiB, {large} batches {rss_large / 1024:.0f} MiB "
         f"(the stream's attention: {large * B * H * N * N * 4 / 2**30:.1f} GiB float32)")
    n_batches = 40
    growth_kib, seconds, n_pairs = run_child("--child-bert", str(n_batches))
    dense = (BERT_V + 1) ** 2 * 24
    emit("vocab_sparse_memory_vs_dense", int(growth_kib) * 1024 / dense,
         f"V={BERT_V}, {n_batches} Zipf batches of {B}x{N}: peak RSS grew {int(growth_kib) / 1024:.0f} MiB for "
         f"{int(n_pairs):,} token pairs seen (dense tables: {dense / 2**30:.1f} GiB); {float(seconds) * 1e3:.0f} ms "
         "CPU per update")


def main() -> None:
    torch.set_num_threads(1)
    print(f"VocabAttention: V={V}, B={B}, H={H}, N={N} ({B * N * N:,} position pairs per batch), "
          f"padded to lengths N/2..N, torch threads=1" + (" [quick]" if QUICK else ""))
    if QUICK:
        bench_update(reps=3, n_batches=4)
        return
    bench_update(reps=4, n_batches=5)
    bench_sparse_vs_dense()
    bench_loops()
    bench_memory()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-bert", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
    elif args.child_bert:
        child_bert(args.child_bert)
    else:
        main()
