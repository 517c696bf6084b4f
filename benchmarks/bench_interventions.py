"""Value zeroing's and attention knockout's cost relative to ``rollout`` on the same batch.

Each ratio is t(method) / t(rollout), both run as the explain stage runs them
(``attribution.explain_batch`` with one method: rollout records one forward's attention
and rolls it out; value zeroing re-runs every block from its recorded input once per
token, ``R`` tokens at a time on a replicated batch; knockout runs the whole model once
per item with that item's incoming edges blocked). Medians of paired, interleaved
repeats after warm-up (``harness.paired_ratio``), on one intra-op thread in CPU seconds,
so other processes sharing the cores move the numbers little (they are still noisy
under load).

* ``*_motion``: the motion experiment's model (per-timestep Linear -> 2 post-LN
  ``nn.TransformerEncoderLayer`` d=32 H=4 -> mean pooling), B=16 clips of T=100 steps.
* ``*_tokens``: the tokens experiment's causal LM (d=64, H=1, 2 layers), B=64
  right-padded sequences of L=32, next-token logit at each sample's last position.
* ``*_video``: the video experiment's divided space-time model (F=8 frames of 32x32,
  patch 8: P=16, d=48, H=4, 2 blocks), B=32 clips (1 + F·P = 129 joint tokens).

Run: ``.venv/bin/python benchmarks/bench_interventions.py`` (a few minutes;
``ATTNLAB_BENCH_QUICK=1`` fewer repeats).
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
from torch import nn

from harness import cpu_clock, emit, paired_ratio, reps, single_thread

from attnlab.attribution import explain_batch
from attnlab.items import SequenceItems, SpaceTimeItems

OPTIONS = SimpleNamespace(head_fusion="mean", residual=True, discard_ratio=0.0, flow_max_pairs=None)


def ratios(experiment: str, model: nn.Module, x, items, forward, detail: str) -> None:
    run = lambda method: explain_batch([method], model, x, items, OPTIONS, forward=forward)  # noqa: E731
    for method in ("value_zeroing", "knockout"):
        value, ours, ref = paired_ratio(lambda: run(method), lambda: run("rollout"), reps=reps(3, 1), warmup=1,
                                        clock=cpu_clock)
        emit(f"{method}_vs_rollout_{experiment}", value,
             f"{detail}: {ours * 1e3:.0f} ms vs rollout {ref * 1e3:.0f} ms (CPU, 1 thread)")


def motion() -> None:
    from attnlab.models.encoder import EncoderClassifier

    torch.manual_seed(0)
    model = EncoderClassifier(6, 4, d_model=32, nhead=4, num_layers=2, dim_feedforward=64).eval()
    ratios("motion", model, torch.randn(16, 100, 6), SequenceItems(100, "mean"), None, "B=16 T=100 d=32 H=4 L=2")


def tokens() -> None:
    from attnlab.models.causal import CausalTransformerLM

    torch.manual_seed(0)
    model = CausalTransformerLM(40, d_model=64, nhead=1, num_layers=2, dim_feedforward=128, max_len=32).eval()
    tok = torch.randint(3, 40, (64, 32))
    lengths = torch.randint(8, 33, (64,))
    mask = torch.arange(32)[None] < lengths[:, None]
    position, rows = lengths - 1, torch.arange(64)
    forward = lambda m, xb: m(xb, mask)[rows, position]  # noqa: E731
    ratios("tokens", model, tok, SequenceItems(32, position, token_ids=True), forward,
           "B=64 L=32 d=64 H=1 layers=2, right padding, causal")


def video() -> None:
    from attnlab.explain import split_spacetime
    from attnlab.models.spacetime import DividedSpaceTimeTransformer

    torch.manual_seed(0)
    model = DividedSpaceTimeTransformer(10, frames=8, size=32, patch=8, d_model=48, nhead=4, num_layers=2).eval()
    items = SpaceTimeItems(8 * 16, patch=8, split=partial(split_spacetime, blocks=2, frames=8, patches=16))
    ratios("video", model, torch.randn(32, 8, 1, 32, 32), items, None, "B=32 F=8 P=16 d=48 H=4 blocks=2")


if __name__ == "__main__":
    single_thread()
    motion()
    tokens()
    video()
