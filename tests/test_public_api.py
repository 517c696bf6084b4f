"""The names DESIGN.md promises are importable from the package root."""
import attnlab


def test_public_names():
    from attnlab import (AttentionRecorder, VocabAttention, attention_flow, grad_rollout,  # noqa: F401
                         readout, rollout, spacetime_rollout)
    for name in attnlab.__all__:
        assert getattr(attnlab, name).__module__.startswith("attnlab.")
