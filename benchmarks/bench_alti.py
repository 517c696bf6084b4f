"""The ``alti`` method's cost relative to ``rollout`` on the same batch of the same model.

Each ratio is t(alti) / t(rollout), both run as the explain stage runs them
(``attribution.explain_batch`` with one method: rollout records one forward's attention
and rolls it out; alti re-runs the forward with hooks reading each block's input and
decomposes every block into transformed vectors ``[B, N, N, D]``). Medians of paired,
interleaved repeats after warm-up (``harness.paired_ratio``), on one intra-op thread in
CPU seconds, so other processes sharing the cores do not move the numbers much.

* ``alti_vs_rollout_motion``: the motion experiment's model (per-timestep Linear ->
  2 post-LN ``nn.TransformerEncoderLayer`` d=32 H=4 -> mean pooling), B=16 clips of
  T=100 steps, 6 channels.
* ``alti_vs_rollout_tokens``: the tokens experiment's causal LM (d=64, H=1, 2 layers),
  B=64 right-padded sequences of L=32, next-token logit at each sample's last position.
* ``alti_vs_rollout_minilm``: a BERT of all-MiniLM-L6-v2's shape (6 layers, 12 heads,
  hidden 384, random weights, built offline) + a linear head on [CLS], B=32 sentences of
  40 word pieces, ``sdpa`` attention. Skipped without ``transformers``.

Run: ``.venv/bin/python benchmarks/bench_alti.py`` (about a minute; ``ATTNLAB_BENCH_QUICK=1``
fewer repeats).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from harness import cpu_clock, emit, paired_ratio, reps, single_thread, skip

from attnlab.attribution import explain_batch
from attnlab.items import SequenceItems

OPTIONS = SimpleNamespace(head_fusion="mean", residual=True, discard_ratio=0.0, flow_max_pairs=None)


def ratio(name: str, model: nn.Module, x, items, forward, detail: str) -> None:
    run = lambda method: explain_batch([method], model, x, items, OPTIONS, forward=forward)  # noqa: E731
    value, ours, ref = paired_ratio(lambda: run("alti"), lambda: run("rollout"), reps=reps(9, 3), clock=cpu_clock)
    emit(name, value, f"{detail}: {ours * 1e3:.0f} ms vs rollout {ref * 1e3:.0f} ms (CPU, 1 thread)")


def motion() -> None:
    from attnlab.models.encoder import EncoderClassifier

    torch.manual_seed(0)
    model = EncoderClassifier(6, 4, d_model=32, nhead=4, num_layers=2, dim_feedforward=64).eval()
    x = torch.randn(16, 100, 6)
    ratio("alti_vs_rollout_motion", model, x, SequenceItems(100, "mean"), None, "B=16 T=100 d=32 H=4 L=2")


def tokens() -> None:
    from attnlab.models.causal import CausalTransformerLM

    torch.manual_seed(0)
    model = CausalTransformerLM(40, d_model=64, nhead=1, num_layers=2, dim_feedforward=128, max_len=32).eval()
    tok = torch.randint(3, 40, (64, 32))
    mask = torch.ones(64, 32, dtype=torch.bool)
    lengths = torch.randint(8, 33, (64,))
    mask &= torch.arange(32)[None] < lengths[:, None]
    position = lengths - 1
    rows = torch.arange(64)
    forward = lambda m, xb: m(xb, mask)[rows, position]  # noqa: E731
    ratio("alti_vs_rollout_tokens", model, tok, SequenceItems(32, position, token_ids=True), forward,
          "B=64 L=32 d=64 H=1 layers=2, right padding, causal")


def minilm() -> None:
    try:
        import transformers
    except ImportError:
        skip("alti_vs_rollout_minilm", "transformers is not installed (requirements-test.txt)")
        return
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=512)
    encoder = transformers.BertModel._from_config(cfg, attn_implementation="sdpa").eval()

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = encoder, nn.Linear(384, 10)

        def forward(self, ids, mask):
            return self.head(self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state[:, 0])

    model = Classifier().eval()
    ids = torch.randint(1000, 30522, (32, 40))
    mask = torch.arange(40)[None] < torch.randint(12, 41, (32,))[:, None]
    ratio("alti_vs_rollout_minilm", model, ids, SequenceItems(40, "cls", token_ids=True),
          lambda m, xb: m(xb, mask), "MiniLM-L6 shape (L=6 H=12 d=384, random weights) B=32 N=40, sdpa")


if __name__ == "__main__":
    single_thread()
    motion()
    tokens()
    minilm()
