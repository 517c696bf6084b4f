"""AttnLRP (method ``attnlrp``) against ``rollout`` on the same batch, measured in the same run.

Each ratio is t(attnlrp) / t(rollout), both through :func:`attnlab.attribution.explain_batch`
(what the explain stage runs): rollout records the attention in one forward and rolls it
out; attnlrp runs the model's forward with its relevance forward of every block (the
blocks' own forward runs too, without gradients, as the 1e-5 check) and one backward.
Medians of paired, interleaved repeats after warm-up, one intra-op thread, CPU seconds
(``harness.paired_ratio``), so other processes on the cores do not move the numbers.

* ``attnlrp_vs_rollout_motion``: the motion model (params.yaml sizes: d=32, 4 heads,
  2 layers, mean pooling) on B=32 sequences of 100 steps x 6 channels;
* ``attnlrp_vs_rollout_tokens``: the causal LM (d=64, 1 head, 2 layers, vocabulary 40)
  on B=64 sequences of 32 tokens, explained at their last real position;
* ``attnlrp_vs_rollout_minilm``: all-MiniLM-L6-v2 (6 layers x 12 heads, d=384) + a
  linear head on [CLS], B=16 sentences of 32 WordPiece ids (skipped when its wheel or
  transformers is missing).

Run: ``.venv/bin/python benchmarks/bench_lrp.py`` (about a minute).
"""
from __future__ import annotations

import torch

from harness import cpu_clock, emit, paired_ratio, reps, single_thread, skip

from attnlab.attribution import _Options, explain_batch
from attnlab.items import SequenceItems

OPTIONS = _Options("mean", True, 0.0, None)


def ratio(model, x, items, forward):
    target = forward(model.eval(), x).argmax(-1)
    run = lambda method: (lambda: explain_batch([method], model, x, items, OPTIONS, forward=forward,  # noqa: E731
                                                target=target))
    return paired_ratio(run("attnlrp"), run("rollout"), reps=reps(7, 3), warmup=1, clock=cpu_clock)


def motion() -> None:
    from attnlab.models.encoder import EncoderClassifier

    torch.manual_seed(0)
    model = EncoderClassifier(6, 4, d_model=32, nhead=4, num_layers=2, dim_feedforward=64)
    r, ours, ref = ratio(model, torch.randn(32, 100, 6), SequenceItems(100, "mean"), lambda m, xb: m(xb))
    emit("attnlrp_vs_rollout_motion", r, f"B=32 T=100 d=32 H=4 L=2: attnlrp {ours * 1e3:.1f} ms, rollout "
                                         f"{ref * 1e3:.1f} ms")


def tokens() -> None:
    from attnlab.models.causal import CausalTransformerLM

    torch.manual_seed(0)
    model = CausalTransformerLM(40, d_model=64, nhead=1, num_layers=2, dim_feedforward=128, dropout=0.0)
    ids = torch.randint(3, 40, (64, 32))
    mask = torch.ones(64, 32, dtype=torch.bool)
    lengths = torch.randint(8, 33, (64,))
    mask &= torch.arange(32)[None, :] < lengths[:, None]
    position = lengths - 1
    forward = lambda m, xb: m(xb, mask)[torch.arange(len(xb)), position]            # noqa: E731
    r, ours, ref = ratio(model, ids, SequenceItems(32, position, token_ids=True), forward)
    emit("attnlrp_vs_rollout_tokens", r, f"B=64 L=32 d=64 H=1 L=2: attnlrp {ours * 1e3:.1f} ms, rollout "
                                         f"{ref * 1e3:.1f} ms")


def minilm() -> None:
    try:
        from attnlab.models.pretrained import PretrainedClassifier
        model = PretrainedClassifier(5)
    except ImportError as err:
        skip("attnlrp_vs_rollout_minilm", str(err))
        return
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (16, 32))
    ids[:, 0] = 101
    mask = torch.ones(16, 32, dtype=torch.bool)
    mask[::2, 20:] = False
    forward = lambda m, xb: m(xb, mask)                                               # noqa: E731
    r, ours, ref = ratio(model, ids, SequenceItems(32, "cls", token_ids=True), forward)
    emit("attnlrp_vs_rollout_minilm", r, f"B=16 L=32 all-MiniLM-L6-v2 + head: attnlrp {ours * 1e3:.0f} ms, "
                                         f"rollout {ref * 1e3:.0f} ms")


if __name__ == "__main__":
    single_thread()
    motion()
    tokens()
    minilm()
