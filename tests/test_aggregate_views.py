"""The aggregate stage's streaming from the attention file equals one pass over the
attention recorded in memory, for every view (a layer, the layer mean, the rollout)."""
import numpy as np
import pytest
import torch

from attnlab import AttentionRecorder, VocabAttention, rollout
from attnlab.aggregate_views import aggregate_views
from attnlab.models.causal import CausalTransformerLM
from attnlab.store import extract_attention

V, N, L = 12, 23, 9


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    torch.manual_seed(0)
    model = CausalTransformerLM(V, max_len=L, d_model=16, nhead=2, num_layers=2, dim_feedforward=32).eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, V, (N, L), generator=g)
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (N,), generator=g)[:, None]
    path = tmp_path_factory.mktemp("agg") / "attention.h5"
    with torch.no_grad():
        extract_attention(model, ((tokens[i:i + 5], mask[i:i + 5]) for i in range(0, N, 5)), path)
        with AttentionRecorder(model) as rec:                    # the whole set at once, in memory
            model(tokens, mask)
    return path, tokens, mask, [a.half().float() for a in rec.attentions]   # stored as float16


def _same(a: VocabAttention, b: VocabAttention):
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_allclose(a.sum, b.sum, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.expected, b.expected, rtol=1e-12)


@pytest.mark.parametrize("attention, layers", [("layer", [0, -1]), ("mean", [0]), ("rollout", [0])])
def test_views_equal_one_pass_in_memory(stored, attention, layers):
    path, tokens, mask, atts = stored
    views = aggregate_views(path, tokens, mask, V, attention=attention, layers=layers, batch_size=4, causal=True)
    expected = {"layer": {"layer0": atts[0], "layer1": atts[1]}, "mean": {"mean": torch.stack(atts).mean(0)},
                "rollout": {"rollout": rollout(atts, mask=mask)}}[attention]
    assert list(views) == list(expected)
    for view, att in expected.items():
        agg, per_head = views[view]
        _same(agg, VocabAttention(V).update(tokens, att, mask=mask, causal=True))
        if attention == "rollout":
            assert per_head is None
        else:
            _same(per_head, VocabAttention(V, nhead=2).update(tokens, att, mask=mask, causal=True))


def test_a_layer_the_model_does_not_have_is_named(stored):
    path, tokens, mask, _ = stored
    with pytest.raises(ValueError, match=r"aggregate.layers: layer 2 does not exist; the model has 2 layers"):
        aggregate_views(path, tokens, mask, V, layers=[0, 2])
    with pytest.raises(ValueError, match="5 samples of attention|23 samples of attention for 5"):
        aggregate_views(path, tokens[:5], mask[:5], V)
