"""AttentionRecorder cost against the manual way, and extract_attention memory.

    .venv/bin/python benchmarks/bench_capture.py

1. Recording overhead: a recorded eval forward (no_grad) of an nn.TransformerEncoder
   against the manual way of getting the same maps: running the encoder's layers by
   hand with ``self_attn(..., need_weights=True, average_attn_weights=False)`` and
   collecting the weights (``capture``, goal <= 1.1x). Median of paired, interleaved
   repetitions, CPU time on one thread.
2. Streaming: peak RSS of extracting a dataset 10x larger than another to HDF5, each
   in its own child process (``extract_peak_memory_10x``, goal <= 1.2x; not in quick mode).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from harness import QUICK, cpu_clock, emit, paired_ratio
from harness import reps as harness_reps

from attnlab.capture import AttentionRecorder
from attnlab.store import extract_attention

B, T, D, HEADS, LAYERS = 32, 100, 64, 4, 4


def make_encoder(seq_len: int = T) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 4 * D, 0.1, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()


def manual_forward(enc: nn.TransformerEncoder, x: torch.Tensor):
    """The manual way: post-norm layers run by hand, asking each self_attn for its
    per-head weights. Returns (output, [B, H, T, T] per layer)."""
    weights = []
    for layer in enc.layers:
        a, w = layer.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
        weights.append(w)
        x = layer.norm1(x + layer.dropout1(a))
        x = layer.norm2(x + layer._ff_block(x))
    return x, weights


def bench_overhead(reps: int = 15) -> None:
    enc = make_encoder()
    x = torch.randn(B, T, D)

    def manual():
        manual_forward(enc, x)

    def recorded():
        with AttentionRecorder(enc) as rec:
            enc(x)
        assert len(rec) == LAYERS

    with torch.no_grad():
        with AttentionRecorder(enc) as rec:                   # same maps, same outputs
            out = enc(x)
        ref_out, ref_w = manual_forward(enc, x)
        err = max((a - b).abs().max().item() for a, b in zip(rec.attentions, ref_w))
        assert err < 1e-5 and (out - ref_out).abs().max() < 1e-4, err
        _, t_plain, _ = paired_ratio(lambda: enc(x), manual, reps=harness_reps(5, 3), clock=cpu_clock)
        ratio, t_rec, t_manual = paired_ratio(recorded, manual, reps=harness_reps(reps, 9), warmup=3,
                                              clock=cpu_clock)
    print(f"model: TransformerEncoder B={B} T={T} d={D} heads={HEADS} layers={LAYERS}, eval, no_grad, "
          f"{torch.get_num_threads()} thread, CPU time, medians of paired repeats")
    print(f"  plain forward (fast path, no maps): {t_plain * 1e3:.1f} ms")
    print(f"  manual need_weights=True loop:      {t_manual * 1e3:.1f} ms")
    print(f"  AttentionRecorder:                  {t_rec * 1e3:.1f} ms")
    emit("capture", ratio, f"AttentionRecorder {t_rec * 1e3:.1f} ms vs manual need_weights=True loop "
                           f"{t_manual * 1e3:.1f} ms")


# -------------------------------------------------------------------- memory
CHILD_T, CHILD_B = 50, 32


def rss_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(n_samples: int) -> None:
    """Extract ``n_samples`` generated on the fly; print samples, RSS after setup and
    peak RSS during extraction (KiB), file size. The peak is reset after setup
    (``/proc/self/clear_refs``), so importing torch does not mask the extraction."""
    enc = make_encoder(CHILD_T)

    def batches():
        g = torch.Generator().manual_seed(1)
        for start in range(0, n_samples, CHILD_B):
            yield torch.randn(min(CHILD_B, n_samples - start), CHILD_T, D, generator=g)

    try:
        Path("/proc/self/clear_refs").write_text("5")          # reset the peak (VmHWM)
        peak_of = lambda: rss_kib("VmHWM")
    except OSError:                                           # no reset: whole-process peak
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = rss_kib("VmRSS")                                   # torch + model, before any batch
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "att.h5"
        n = extract_attention(enc, batches(), path)
        size = path.stat().st_size
        peak = peak_of()
    print(n, base, peak, size)


def measure(n_samples: int) -> tuple[int, int, int, int]:
    out = subprocess.run([sys.executable, __file__, "--child", str(n_samples)],
                         check=True, capture_output=True, text=True).stdout.split()
    return tuple(int(v) for v in out)                         # type: ignore[return-value]


def bench_memory(small: int = 100) -> None:
    n1, base1, peak1, size1 = measure(small)
    n2, base2, peak2, size2 = measure(10 * small)
    attn_mb = lambda n: n * LAYERS * HEADS * CHILD_T * CHILD_T * 4 / 2**20   # float32 in memory
    print(f"extraction: T={CHILD_T}, batch {CHILD_B}, {LAYERS} layers x {HEADS} heads; child processes")
    print(f"  {n1:5d} samples: peak RSS {peak1 / 1024:.0f} MiB (after setup {base1 / 1024:.0f} MiB), "
          f"file {size1 / 2**20:.1f} MiB, all maps in float32 would be {attn_mb(n1):.0f} MiB")
    print(f"  {n2:5d} samples: peak RSS {peak2 / 1024:.0f} MiB (after setup {base2 / 1024:.0f} MiB), "
          f"file {size2 / 2**20:.1f} MiB, all maps in float32 would be {attn_mb(n2):.0f} MiB")
    print(f"  extraction's own memory (peak - after setup): "
          f"{(peak1 - base1) / 1024:.1f} -> {(peak2 - base2) / 1024:.1f} MiB")
    emit("extract_peak_memory_10x", peak2 / peak1, f"{n1} samples {peak1 / 1024:.0f} MiB, {n2} samples "
                                                   f"{peak2 / 1024:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)       # stable timings on a shared machine; same for all variants
    if args.child is not None:
        child(args.child)
    else:
        t0 = time.perf_counter()
        bench_overhead()
        if not QUICK:
            bench_memory()
        print(f"(benchmark took {time.perf_counter() - t0:.0f} s)")
