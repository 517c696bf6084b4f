"""Attention store size and read time: every query row vs the class token's rows only.

    .venv/bin/python benchmarks/bench_store.py

A ViT-B-shaped model (12 layers x 12 heads x 197 tokens: 196 patches + the class token)
whose attention is random softmax rows (logits ~ N(0, 2²), so the rows are peaky
like trained attention rather than uniform) is run through ``extract_attention``
twice over the same samples: once storing everything, once with ``rows="cls"``
(query row 0, all a class-token readout needs), both float16 and gzip as the
extract stage writes them. Real files are written and their sizes measured:

1. ``store_cls_rows_reduction``: bytes per sample, full / class-token rows
   (goal >= 50x; the raw arrays differ by 197x).
2. ``store_cls_read_speedup``: the time a later stage takes to stream the class-token
   rows of every layer from the reduced store, against taking the same rows out of
   the full store (which has to read and decompress every row): median of interleaved
   paired repeats (noisy under load; the ratio is what counts).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from attnlab.capture import AttentionProbs
from attnlab.store import AttentionReader, extract_attention
from harness import QUICK, emit, paired_ratio

LAYERS, HEADS, TOKENS = 12, 12, 197


class RandomAttention(nn.Module):
    """``LAYERS`` attention calls per forward, each softmax(random logits) ``[B, H, N, N]``
    through an ``AttentionProbs`` marker (the project's recording protocol). ``x [B]``
    holds each sample's seed, so a sample's maps do not depend on its batch."""

    def __init__(self):
        super().__init__()
        self.probs = nn.ModuleList(AttentionProbs() for _ in range(LAYERS))

    def forward(self, seeds: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for layer, marker in enumerate(self.probs):
            logits = torch.stack([torch.randn(HEADS, TOKENS, TOKENS, generator=torch.Generator().manual_seed(
                int(s) * 1000 + layer)) for s in seeds]) * 2.0
            total = total + marker(logits.softmax(-1)).sum()
        return total


def write(path: Path, n: int, batch: int, **selection) -> float:
    model = RandomAttention()
    seeds = torch.arange(n)
    t0 = time.perf_counter()
    assert extract_attention(model, seeds.split(batch), path, **selection) == n
    return time.perf_counter() - t0


def read_cls_rows(path: Path, batch: int) -> float:
    """What a class-token stage reads: row 0 of every layer, every sample, streamed."""
    total = 0.0
    with AttentionReader(path) as reader:
        for part in reader.batches(batch):
            total += sum(float(a[..., 0, :].sum()) for a in part)       # [b, H, Lk] per layer
    return total


def main() -> None:
    n, batch = (4, 2) if QUICK else (16, 4)
    raw = LAYERS * HEADS * TOKENS * TOKENS * 2                            # float16 bytes per sample
    with tempfile.TemporaryDirectory() as tmp:
        full, cls = Path(tmp) / "full.h5", Path(tmp) / "cls.h5"
        t_full = write(full, n, batch)
        t_cls = write(cls, n, batch, rows="cls")
        with AttentionReader(full) as a, AttentionReader(cls) as b:      # the same values, row 0
            for k in range(LAYERS):
                assert torch.equal(a.entry(k)[:][:, :, :1], b.entry(k)[:])
        per_full, per_cls = full.stat().st_size / n, cls.stat().st_size / n
        print(f"ViT-B shape: {LAYERS} layers x {HEADS} heads x {TOKENS} tokens, float16 + gzip, {n} samples "
              f"(raw float16: {raw / 2**20:.2f} MiB per sample)")
        print(f"  full store:         {per_full / 2**20:8.3f} MiB per sample (written in {t_full / n:.2f} s/sample); "
              f"10,000 images: {per_full * 1e4 / 1e9:.1f} GB")
        print(f"  class-token rows:   {per_cls / 2**10:8.1f} KiB per sample (written in {t_cls / n:.3f} s/sample); "
              f"10,000 images: {per_cls * 1e4 / 1e9:.2f} GB")
        emit("store_cls_rows_reduction", per_full / per_cls,
             f"{per_full / 2**20:.2f} MiB vs {per_cls / 2**10:.1f} KiB per sample")
        reps = 3 if QUICK else 7
        ratio, t_ours, t_ref = paired_ratio(lambda: read_cls_rows(cls, batch), lambda: read_cls_rows(full, batch),
                                            reps=reps, warmup=1)
        print(f"  reading the class-token rows of every layer: {t_ours / n * 1e3:.2f} ms/sample from the reduced "
              f"store, {t_ref / n * 1e3:.1f} ms/sample out of the full store (median of {reps} paired repeats)")
        emit("store_cls_read_speedup", 1.0 / ratio, f"{t_ref / n * 1e3:.1f} vs {t_ours / n * 1e3:.2f} ms/sample")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)       # stable timings on a shared machine; same for all variants
    t0 = time.perf_counter()
    main()
    print(f"(benchmark took {time.perf_counter() - t0:.0f} s)")
