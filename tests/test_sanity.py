"""The model-parameter randomisation test (attnlab.evaluate.sanity) on hand-built models
whose answer is known, against literal recomputations."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from attnlab.attribution import SequenceItems, explain_batch
from attnlab.evaluate.sanity import rank_correlations, randomisation_blocks, randomise, sanity_check
from attnlab.methods import register, unregister


class Net(nn.Module):
    """embed -> 2 transformer layers -> mean pool -> head, with a class-free own parameter."""

    def __init__(self, d: int = 16, n_items: int = 12):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n_items, d) * 0.1)
        self.embed = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


OPTIONS = SimpleNamespace(head_fusion="mean", residual=True, discard_ratio=0.0, flow_max_pairs=None, ig_steps=16)


@pytest.fixture
def magnitude():
    @register("magnitude_t", items=("sequence",), needs=(), summary="|x| summed per item (ignores the model)",
              default=False)
    def _magnitude(batch):
        return batch.x.abs().sum(-1)

    yield "magnitude_t"
    unregister("magnitude_t")


def _explainer(x, methods, target):
    def explain(model):
        imp, _ = explain_batch(methods, model, x, SequenceItems(x.shape[1]), OPTIONS, target=target)
        return imp
    return explain


def test_blocks_are_the_layers_and_the_groups_between_them_in_call_order():
    torch.manual_seed(0)
    net = Net()
    blocks = randomisation_blocks(net, lambda m: m(torch.randn(2, 12, 3)))
    assert [b.name for b in blocks] == ["model-params/embed", "encoder.layers.0", "encoder.layers.1", "head"]
    assert [b.layer for b in blocks] == [False, True, True, False]


def test_randomise_changes_exactly_the_parameters_of_the_chosen_blocks():
    torch.manual_seed(0)
    net = Net()
    blocks = randomisation_blocks(net, lambda m: m(torch.randn(2, 12, 3)))
    with torch.no_grad():                      # a "trained" state unlike any initialisation
        for p in net.parameters():
            p.add_(0.37)
    before = {n: p.clone() for n, p in net.named_parameters()}
    randomise(net, blocks[-2:], seed=3)        # cascading depth 2: the last layer and the head
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if n.startswith(("encoder.layers.1.", "head."))}
    assert changed == expected
    randomise(net, blocks[:1], seed=3)         # the model's own parameter and the embedding
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected | {"pos", "embed.weight", "embed.bias"}


def _literal_spearman(a, b):
    """1 - 6 sum d^2 / (n (n^2 - 1)) on ranks (no ties)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    n = len(a)
    return 1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))


def test_rank_correlations_match_the_closed_form_with_valid_masks_and_degenerate_rows():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 9, generator=g), torch.rand(5, 9, generator=g)
    valid = torch.ones(5, 9, dtype=torch.bool)
    valid[1, 6:] = False
    rho = rank_correlations(a, b, valid)
    for i in range(5):
        m = valid[i].numpy()
        assert rho[i] == pytest.approx(_literal_spearman(a[i].numpy()[m], b[i].numpy()[m]), abs=1e-12)
    const = a.clone()
    const[2] = 0.5
    assert math.isnan(rank_correlations(const, b)[2])          # nothing to rank in the trained map
    assert rank_correlations(a, const)[2] == 0.0               # the randomised map lost every ranking
    # two items (shares summing to 1): one rho across samples, of the second item's share
    sa, sb = torch.rand(8, generator=g), torch.rand(8, generator=g)
    two = rank_correlations(torch.stack([1 - sa, sa], 1), torch.stack([1 - sb, sb], 1))
    assert two.shape == (1,) and two[0] == pytest.approx(_literal_spearman(sa.numpy(), sb.numpy()))
    # shares float32 rounds to 1 (the other stream ~1e-18) are still told apart
    tiny = torch.tensor([3e-18, 1e-15, 2e-20, 5e-16], dtype=torch.float32)
    saturated = torch.stack([1 - tiny, tiny], 1)
    assert bool((saturated[:, 0] == 1).all())
    assert rank_correlations(saturated, saturated)[0] == pytest.approx(1.0)
    assert rank_correlations(saturated, saturated.flip(0))[0] == pytest.approx(
        _literal_spearman(tiny.numpy(), tiny.flip(0).numpy()))


def test_a_model_ignoring_explanation_fails_and_a_gradient_based_one_passes(magnitude):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(24, 12, 3)
    methods = [magnitude, "input_x_gradient", "integrated_gradients", "rollout"]
    trained, batch = explain_batch(methods, net, x, SequenceItems(12), OPTIONS)
    state = {n: p.clone() for n, p in net.state_dict().items()}
    res = sanity_check(net, _explainer(x, methods, batch.target), trained, lambda m: m(x[:2]), threshold=0.5)
    assert all(torch.equal(state[n], p) for n, p in net.state_dict().items())    # the model is untouched
    assert res["blocks"] == ["model-params/embed", "encoder.layers.0", "encoder.layers.1", "head"]
    # the magnitude map is the same function of x whatever the weights: rho = 1 at every depth
    assert all(v == pytest.approx(1.0) for v in res["cascading"][magnitude].values())
    assert res["passed"][magnitude] is False
    for m in ("input_x_gradient", "integrated_gradients"):
        assert res["final"][m] < 0.5 and res["passed"][m] is True, (m, res["final"][m])
    # attention is computed before the head: re-initialising the head alone leaves it unchanged
    assert res["cascading"]["rollout"]["1"] == pytest.approx(1.0)
    assert res["independent"]["rollout"]["head"] == pytest.approx(1.0)
    assert res["independent"]["rollout"]["encoder.layers.0"] < 1.0


def test_the_curve_is_a_recomputation_from_randomised_weights(magnitude):
    """Depth k of the cascading curve equals explaining a copy whose last k blocks are
    re-initialised with the documented seed (seed + k), computed here by hand."""
    import copy

    torch.manual_seed(1)
    net = Net().eval()
    x = torch.randn(6, 12, 3)
    methods = ["input_x_gradient"]
    trained, batch = explain_batch(methods, net, x, SequenceItems(12), OPTIONS)
    res = sanity_check(net, _explainer(x, methods, batch.target), trained, lambda m: m(x[:2]),
                       independent=False, seed=7)
    blocks = randomisation_blocks(net, lambda m: m(x[:2]))
    for k in range(1, len(blocks) + 1):
        other = copy.deepcopy(net)
        randomise(other, blocks[len(blocks) - k:], seed=7 + k)
        got, _ = explain_batch(methods, other, x, SequenceItems(12), OPTIONS, target=batch.target)
        rho = [_literal_spearman(trained["input_x_gradient"][i].numpy(), got["input_x_gradient"][i].numpy())
               for i in range(6)]
        assert res["cascading"]["input_x_gradient"][str(k)] == pytest.approx(float(np.mean(np.abs(rho))), abs=1e-9)
    assert res["independent"] == {}


def test_bad_threshold_is_named():
    net = Net()
    with pytest.raises(ValueError, match=r"sanity_check: threshold=1.5; expected a value in \(0, 1\]"):
        sanity_check(net, lambda m: {}, {"a": torch.zeros(1, 12)}, lambda m: m(torch.zeros(1, 12, 3)),
                     threshold=1.5)
