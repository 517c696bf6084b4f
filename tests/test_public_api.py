"""The names DESIGN.md promises are importable from the package root."""
import attnlab


def test_public_names():
    from attnlab import (AttentionRecorder, VocabAttention, attention_flow, grad_rollout,  # noqa: F401
                         readout, rollout, spacetime_rollout)
    for name in attnlab.__all__:
        assert getattr(attnlab, name).__module__.startswith("attnlab.")


def test_library_example_runs_as_written():
    """docs/library.md's recorder block, executed verbatim (tests/docblocks.py); its results
    checked against a dense rollout and the aggregator's own invariants."""
    import numpy as np
    import torch

    import docblocks

    namespace = docblocks.run_python("library-recorder")
    b, n = namespace["tokens"].shape

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
    assert agg.count.sum() == b * n * n                     # every (query, key) pair of every sequence
    np.testing.assert_allclose(agg.expected.sum(), b * n)   # each query spreads 1 over its keys
