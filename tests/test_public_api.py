"""The names DESIGN.md promises are importable from the package root."""
import attnlab


def test_public_names():
    from attnlab import (AttentionRecorder, VocabAttention, attention_flow, grad_rollout,  # noqa: F401
                         readout, rollout, spacetime_rollout)
    for name in attnlab.__all__:
        assert getattr(attnlab, name).__module__.startswith("attnlab.")


def test_readme_library_example_runs_as_written():
    """The README's library snippet, executed verbatim on a small mean-pooled encoder;
    its results checked against a dense rollout and the aggregator's own invariants."""
    import re
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    library = readme[readme.index("## Library"):]
    snippet = re.search(r"```python\n(.*?)```", library, re.S).group(1)

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    torch.manual_seed(0)
    vocab_size, b, n = 5, 4, 6
    namespace = {"model": Pooled().eval(), "x": torch.randn(b, n, 8), "vocab_size": vocab_size,
                 "tokens": torch.randint(0, vocab_size, (b, n)), "real_tokens": torch.ones(b, n, dtype=torch.bool)}
    exec(compile(snippet, "README.md", "exec"), namespace)

    rec, importance = namespace["rec"], namespace["importance"]
    assert len(rec.attentions) == len(rec.gradients) == 2 and rec.attentions[0].shape == (b, 2, n, n)
    # rollout of two layers, dense: (0.5 A2 + 0.5 I)(0.5 A1 + 0.5 I), rows renormalised, mean over queries
    eye = torch.eye(n)
    a1, a2 = (0.5 * a.mean(1) + 0.5 * eye for a in rec.attentions)
    joint = (a2 / a2.sum(-1, keepdim=True)) @ (a1 / a1.sum(-1, keepdim=True))
    torch.testing.assert_close(importance, joint.mean(1))
    # Chefer et al.: R = I + Ā1, then R += Ā2 R, with Ā = mean_h(max(∇A ⊙ A, 0))
    c1, c2 = ((g * a).clamp_min(0).mean(1) for a, g in zip(rec.attentions, rec.gradients))
    r = eye + c1
    torch.testing.assert_close(namespace["relevance"], (r + c2 @ r).mean(1))
    agg = namespace["agg"]
    assert agg.count.sum() == b * n * (n + 1) // 2          # causal pairs j <= i
    np.testing.assert_allclose(agg.expected.sum(), b * n)   # each query spreads 1 over its keys
