"""The aggregate stage's memory: peak RSS when the test set is 10x larger.

The stage streams stored attention from disk into ``VocabAttention`` (one batch plus
the V x V tables), so its peak memory must not grow with the number of sequences.
Each size runs in a child process: extract the attention of a small causal LM on
random token sequences to HDF5 (not measured), then reset the peak and run
:func:`attnlab.aggregate_views.aggregate_views` as the stage does (every layer, per
head). Emits ``aggregate_stage_peak_memory_10x``: the peak RSS of 10x over 1x (goal: at
most 1.2x). Not part of the quick subset (``ATTNLAB_BENCH_QUICK=1``: nothing to do).
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_capture import rss_kib  # benchmarks/ is the script's directory
from harness import QUICK, emit

from attnlab.aggregate_views import aggregate_views
from attnlab.models.causal import CausalTransformerLM
from attnlab.store import extract_attention

V, L, BATCH = 500, 64, 64


def child(n: int) -> None:
    """Print samples, RSS before aggregation and peak RSS during it (KiB)."""
    torch.manual_seed(0)
    model = CausalTransformerLM(V, max_len=L, d_model=32, nhead=4, num_layers=2, dim_feedforward=64).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, V, (n, L), generator=g)
    mask = torch.rand(n, L, generator=g) < 0.9
    mask[:, 0] = True
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "attention.h5"
        batches = ((tokens[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, n, BATCH))
        with torch.no_grad():
            extract_attention(model, batches, path)
        Path("/proc/self/clear_refs").write_text("5")             # reset the peak (VmHWM)
        base = rss_kib("VmRSS")
        views = aggregate_views(path, tokens, mask, V, layers=[0, 1], heads=True, batch_size=BATCH, causal=True)
        assert views["layer0"][0].count.sum() > 0
        print(n, base, rss_kib("VmHWM"))


def measure(n: int) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True, capture_output=True,
                         text=True).stdout.split()
    return tuple(int(v) for v in out)                             # type: ignore[return-value]


def main(small: int = 400) -> None:
    (n1, base1, peak1), (n2, base2, peak2) = measure(small), measure(10 * small)
    print(f"aggregate: V={V}, L={L}, batch {BATCH}, 2 layers x 4 heads, per-layer and per-head tables")
    for n, base, peak in ((n1, base1, peak1), (n2, base2, peak2)):
        print(f"  {n:5d} sequences: peak RSS {peak / 1024:.0f} MiB (before aggregating {base / 1024:.0f} MiB)")
    emit("aggregate_stage_peak_memory_10x", peak2 / peak1, f"{n1} sequences {peak1 / 1024:.0f} MiB, {n2} sequences "
         f"{peak2 / 1024:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child is not None:
        child(args.child)
    elif QUICK:
        print("bench_aggregate_stage: not in the quick subset")
    else:
        main()
