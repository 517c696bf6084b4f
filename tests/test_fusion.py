"""Two-stream digits and fusion models, checked against recomputations by hand."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from attnlab.capture import AttentionRecorder
from attnlab.data.fusion import make_two_stream
from attnlab.models.fusion import FUSIONS, TwoStreamClassifier

B, D = 5, 8


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def clean():
    return make_two_stream("train", seed=3)


def rows_bytes(x: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in x]


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_dtypes_and_labels(split, digits):
    data = make_two_stream(split, size=24, n_keypoints=5, seed=1)
    n = len(data["y"])
    assert 850 < n < 950
    assert data["appearance"].shape == (n, 3, 24, 24) and data["appearance"].dtype == torch.float32
    assert data["structure"].shape == (n, 5, 24, 24) and data["structure"].dtype == torch.float32
    assert data["y"].dtype == torch.int64 and data["index"].dtype == torch.int64
    assert data["corrupted"].shape == (n, 2) and data["corrupted"].dtype == torch.bool
    assert not data["corrupted"].any()
    assert data["keypoints"].shape == (n, 5, 2)
    assert data["y"].tolist() == digits.target[data["index"].numpy()].tolist()
    assert sorted(Counter(data["y"].tolist())) == list(range(10))


def test_train_and_test_images_are_disjoint_and_cover_the_digits(digits):
    tr, te = make_two_stream("train", seed=0), make_two_stream("test", seed=5)
    itr, ite = set(tr["index"].tolist()), set(te["index"].tolist())
    assert not itr & ite and len(itr | ite) == len(digits.images)
    train_pixels = {digits.images[i].tobytes() for i in itr}
    assert not any(digits.images[i].tobytes() in train_pixels for i in ite)
    assert torch.equal(make_two_stream("train", seed=9)["index"], tr["index"])   # split ignores seed


def test_deterministic_under_seed_without_touching_global_rngs(clean):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    again = make_two_stream("train", seed=3)
    other = make_two_stream("train", seed=4)
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)
    for key in clean:
        assert torch.equal(clean[key], again[key]), key
    assert not torch.equal(clean["appearance"], other["appearance"])
    assert not torch.equal(clean["structure"], other["structure"])          # other keypoint starts


def test_keypoint_heatmaps_peak_on_bright_pixels_of_the_digit(clean, digits):
    s = 16
    hm = clean["structure"]                                          # [N, K, S, S]
    n, k = hm.shape[:2]
    flat = hm.flatten(2).argmax(-1)                                  # [N, K]
    r, c = flat // s, flat % s
    assert torch.equal(torch.stack([r, c], -1), clean["keypoints"])
    assert torch.allclose(hm.amax((2, 3)), torch.ones(n, k))
    src = digits.images[clean["index"].numpy()]                      # [N, 8, 8], 0..16
    rows = np.arange(n)[:, None]
    assert (src[rows, (r * 8 // s).numpy(), (c * 8 // s).numpy()] >= 8).all()
    # raster order, all distinct (every digit has >= 13 bright pixels = 52 on the 16x16 grid)
    assert (flat[:, 1:] > flat[:, :-1]).all()


def test_keypoints_are_a_farthest_point_cover_of_the_strokes(clean, digits):
    # Farthest-point sampling guarantees: every stroke pixel lies within the smallest
    # distance between two chosen keypoints of some keypoint.
    s = 16
    for i in range(0, len(clean["y"]), 97):
        img = digits.images[int(clean["index"][i])]
        stroke = [(r, c) for r in range(s) for c in range(s) if img[r * 8 // s, c * 8 // s] >= 8]
        kp = [tuple(p) for p in clean["keypoints"][i].tolist()]
        assert set(kp) <= set(stroke)
        sep = min(math.dist(a, b) for j, a in enumerate(kp) for b in kp[j + 1:])
        cover = max(min(math.dist(p, q) for q in kp) for p in stroke)
        assert cover <= sep + 1e-9


@pytest.mark.parametrize("stream", ["appearance", "structure"])
@pytest.mark.parametrize("mode", ["noise", "shuffle"])
@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_corruption_changes_only_that_stream_on_the_recorded_samples(clean, stream, mode, fraction):
    bad = make_two_stream("train", corrupt_stream=stream, corrupt_fraction=fraction,
                          corrupt_mode=mode, seed=3)
    other = "structure" if stream == "appearance" else "appearance"
    col = ("appearance", "structure").index(stream)
    n = len(clean["y"])
    for key in (other, "y", "index", "keypoints"):
        assert torch.equal(bad[key], clean[key]), key
    assert not bad["corrupted"][:, 1 - col].any()
    marked = bad["corrupted"][:, col]
    assert int(marked.sum()) == round(fraction * n)
    changed = (bad[stream] != clean[stream]).flatten(1).any(1)
    if mode == "noise" or stream == "appearance":                   # every appearance row is unique
        assert torch.equal(changed, marked)
    else:                                                           # two digits may share keypoints
        assert not (changed & ~marked).any() and changed.sum() > 0.9 * marked.sum()
    if mode == "shuffle":
        # a permutation of the clean rows, each corrupted sample receiving another sample's
        assert Counter(rows_bytes(bad[stream])) == Counter(rows_bytes(clean[stream]))
        owners: dict[bytes, set[int]] = {}
        for j, key in enumerate(rows_bytes(clean[stream])):
            owners.setdefault(key, set()).add(j)
        for i in torch.nonzero(marked).flatten().tolist():
            assert owners[bad[stream][i].numpy().tobytes()] - {i}
    else:
        noise = bad[stream][marked]                                 # [M, C, S, S]
        ref = clean[stream]
        assert torch.allclose(noise.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=0.02)
        assert torch.allclose(noise.std((0, 2, 3)), ref.std((0, 2, 3)), rtol=0.05)


def test_data_arguments_are_validated():
    for kwargs, word in [(dict(split="val"), "split"), (dict(corrupt_stream="rgb"), "corrupt_stream"),
                         (dict(corrupt_mode="zero", corrupt_stream="structure"), "corrupt_mode"),
                         (dict(corrupt_fraction=1.5), "corrupt_fraction"), (dict(size=4), "size")]:
        with pytest.raises(ValueError, match=word):
            make_two_stream(**kwargs)


# --------------------------------------------------------------------------- models
def make_model(fusion: str, nhead: int = 1, seed: int = 0) -> TwoStreamClassifier:
    torch.manual_seed(seed)
    model = TwoStreamClassifier(4, fusion=fusion, appearance_channels=3, structure_channels=6,
                                d_model=D, nhead=nhead).eval()
    with torch.no_grad():                       # move every learned fusion off its symmetric start
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p))
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 12, 12, generator=g), torch.randn(B, 6, 12, 12, generator=g)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shapes_weights_are_distributions_and_forward_is_deterministic(fusion):
    model = make_model(fusion, nhead=2 if fusion == "attention" else 1)
    a, s = inputs()
    logits, w = model.forward_with_weights(a, s)
    assert logits.shape == (B, 4) and w.shape == (B, 2)
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(B))
    assert torch.equal(model(a, s), logits)
    model.train()
    assert torch.equal(model(a, s), model(a, s))
    assert model.appearance.out_features != model.structure.out_features


@pytest.mark.parametrize("fusion", FUSIONS)
def test_learned_fusions_start_at_equal_weights(fusion):
    torch.manual_seed(0)
    model = TwoStreamClassifier(4, fusion=fusion, structure_channels=6, d_model=D)
    _, w = model.forward_with_weights(*inputs())
    assert torch.allclose(w, torch.full((B, 2), 0.5))


@torch.no_grad()
def test_sum_fusion_adds_the_tokens_and_reports_halves():
    model = make_model("sum")
    x = model.forward_features(*inputs())                            # [B, 2, d]
    fused, w = model.fuse(x)
    assert torch.allclose(fused, x[:, 0] + x[:, 1]) and torch.equal(w, torch.full((B, 2), 0.5))


@torch.no_grad()
def test_scalar_fusion_matches_softmax_of_its_logits():
    model = make_model("scalar")
    x = model.forward_features(*inputs())
    fused, w = model.fuse(x)
    l0, l1 = model.fusion.logits.tolist()
    w0 = math.exp(l0) / (math.exp(l0) + math.exp(l1))
    assert torch.allclose(w, torch.tensor([[w0, 1 - w0]]).expand(B, 2))
    assert torch.allclose(fused, w0 * x[:, 0] + (1 - w0) * x[:, 1], atol=1e-6)


@torch.no_grad()
def test_convex_fusion_matches_sigmoid_of_its_scalar():
    model = make_model("convex")
    x = model.forward_features(*inputs())
    fused, w = model.fuse(x)
    w0 = 1 / (1 + math.exp(-model.fusion.theta.item()))
    assert torch.allclose(w, torch.tensor([[w0, 1 - w0]]).expand(B, 2))
    assert torch.allclose(fused, w0 * x[:, 0] + (1 - w0) * x[:, 1], atol=1e-6)


@torch.no_grad()
def test_channel_fusion_gates_recomputed_by_hand():
    model = make_model("channel")
    x = model.forward_features(*inputs())                            # [B, 2, d]
    fused, w = model.fuse(x)
    f = model.fusion
    for b in range(B):
        cat = torch.cat([x[b, 0], x[b, 1]])                          # [2d]
        h = (f.fc1.weight @ cat + f.fc1.bias).clamp(min=0)
        z = f.fc2.weight @ h + f.fc2.bias                            # [2d]: stream 0, then stream 1
        g0 = torch.tensor([1 / (1 + math.exp(z[D + j] - z[j])) for j in range(D)])
        assert torch.allclose(fused[b], g0 * x[b, 0] + (1 - g0) * x[b, 1], atol=1e-5)
        assert torch.allclose(w[b], torch.stack([g0.mean(), 1 - g0.mean()]), atol=1e-6)
    assert w.std(0).max() > 1e-4                                     # per-sample, not a constant


@pytest.mark.parametrize("nhead", [1, 2])
@torch.no_grad()
def test_attention_fusion_weights_are_the_query_key_softmax(nhead):
    model = make_model("attention", nhead=nhead)
    x = model.forward_features(*inputs())                            # [B, 2, d]
    fused, w = model.fuse(x)
    mha, hd = model.fusion.attn, D // nhead
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q = wq @ model.fusion.query[0, 0] + bq                           # [d]
    for b in range(B):
        probs, heads_out = [], []
        for h in range(nhead):
            sl = slice(h * hd, (h + 1) * hd)
            scores = [float(q[sl] @ (wk @ x[b, s] + bk)[sl]) / math.sqrt(hd) for s in range(2)]
            e = [math.exp(v - max(scores)) for v in scores]
            p = [v / sum(e) for v in e]
            probs.append(p)
            heads_out.append(sum(p[s] * (wv @ x[b, s] + bv)[sl] for s in range(2)))
        expect_w = torch.tensor(probs).mean(0)
        assert torch.allclose(w[b], expect_w, atol=1e-6)
        out = mha.out_proj.weight @ torch.cat(heads_out) + mha.out_proj.bias
        assert torch.allclose(fused[b], out, atol=1e-5)
    assert w.std(0).max() > 1e-4


def test_attention_recorder_sees_the_fusion_attention():
    model = make_model("attention", nhead=2)
    a, s = inputs()
    plain, w = model.forward_with_weights(a, s)
    with AttentionRecorder(model) as rec:
        logits = model(a, s)
    assert rec.names == ["fusion.attn"]
    assert rec.attentions[0].shape == (B, 2, 1, 2)
    assert torch.allclose(rec.attentions[0].mean(1)[:, 0], w, atol=1e-6)
    assert torch.allclose(logits, plain, atol=1e-5)


@pytest.mark.parametrize("fusion", ["scalar", "convex", "channel", "attention"])
def test_fusion_parameters_receive_gradient(fusion):
    model = make_model(fusion).train()
    torch.nn.functional.cross_entropy(model(*inputs()), torch.arange(B) % 4).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_param_groups_partition_the_parameters(fusion):
    model = make_model(fusion)
    groups = model.param_groups(1e-3, weight_decay=0.1, fusion_lr_scale=10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.1
    if fusion == "sum":
        assert len(groups) == 1
    else:
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.fusion.parameters()}
        assert groups[1]["lr"] == pytest.approx(1e-2) and groups[1]["weight_decay"] == 0.0
    torch.optim.AdamW(groups)


def test_model_arguments_are_validated():
    with pytest.raises(ValueError, match="fusion"):
        TwoStreamClassifier(3, fusion="gated")
    with pytest.raises(ValueError, match="nhead"):
        TwoStreamClassifier(3, d_model=10, nhead=4)


# --------------------------------------------------------------------------- the fusion experiment
def test_stream_masker_replaces_exactly_the_removed_streams_channels():
    from attnlab.evaluate import stream_masker

    x = torch.randn(4, 3 + 5, 6, 6)
    keep = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    out = stream_masker([3, 5], baseline=-7.0)(x, keep)
    for b in range(4):                                            # literal loop over samples and channels
        for c in range(8):
            stream = 0 if c < 3 else 1
            expected = x[b, c] if keep[b, stream] else torch.full_like(x[b, c], -7.0)
            assert torch.equal(out[b, c], expected)
    with pytest.raises(ValueError, match="keep has shape"):
        stream_masker([3, 5])(x, keep[:, :1])
    with pytest.raises(ValueError, match=r"expected \[B, 8"):
        stream_masker([3, 5])(x[:, :7], keep)


def test_stream_weight_summary_matches_a_literal_computation():
    from attnlab.evaluate.summaries import stream_weight_summary

    rng = np.random.default_rng(0)
    w1 = rng.random(50)
    weights = np.stack([w1, 1 - w1], axis=1)
    y = rng.integers(0, 3, 50)
    corrupted = np.zeros((50, 2), dtype=bool)
    corrupted[:20, 1] = True                                      # structure corrupted on 20 samples
    corrupted[20:25, 0] = True                                    # appearance on 5
    corrupted[25:27] = True                                       # both on 2 (no informative stream)
    s = stream_weight_summary(weights, y, corrupted, ["a", "b", "c"], ["appearance", "structure"])
    informative = [weights[i, 0] for i in range(20)] + [weights[i, 1] for i in range(20, 25)]
    assert s["informative"] == pytest.approx(sum(informative) / len(informative))
    assert s["mean"]["appearance"] == pytest.approx(w1.mean())
    assert s["per_class"]["b"]["structure"] == pytest.approx(np.mean([1 - w1[i] for i in range(50) if y[i] == 1]))
    rows = [i for i in range(50) if corrupted[i, 1]]
    assert s["structure_corrupted"]["appearance"] == pytest.approx(np.mean(w1[rows]))
    none = stream_weight_summary(weights, y, np.zeros((50, 2), dtype=bool), ["a", "b", "c"],
                                 ["appearance", "structure"])
    assert none["informative"] is None and "structure_corrupted" not in none


def test_fusion_experiment_forward_and_importance_use_the_two_streams():
    """The packed input is split into the model's two streams; every method gives each
    sample a weight per stream summing to 1, and 'weights' are the fusion's own."""
    from attnlab.attribution import explain_batch
    from attnlab.config import FusionParams
    from attnlab.experiments import get_experiment

    exp = get_experiment("fusion")
    torch.manual_seed(0)
    model = TwoStreamClassifier(10, fusion="channel", structure_channels=17).eval()
    data = make_two_stream("test", size=16, seed=0)
    a, s = data["appearance"][:6], data["structure"][:6]
    x = torch.cat([a, s], dim=1)
    torch.testing.assert_close(exp.forward(model, x), model(a, s))
    cfg = FusionParams.model_validate({"explain": {"ig_steps": 4}})
    items = exp.items(cfg, {"channels": [3, 17]})
    imp, batch = explain_batch(cfg.explain.methods, model, x, items, cfg.explain, forward=exp.forward)
    target = batch.target
    assert set(imp) == {"weights", "input_x_gradient", "integrated_gradients"}
    for v in imp.values():
        assert v.shape == (6, 2)
        torch.testing.assert_close(v.sum(1), torch.ones(6))
    torch.testing.assert_close(imp["weights"], model.forward_with_weights(a, s)[1])
    assert torch.equal(target, model(a, s).argmax(-1))
    groups = exp.param_groups(FusionParams(), model)
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.fusion.parameters()}


def test_weights_by_corruption_figure_is_reproducible_and_leaves_numpy_alone():
    """seaborn's strip-plot jitter draws from numpy's global generator: the figure must be
    the same bytes whatever that generator's state (so the report's DVC hash is stable),
    and the caller's state must be left as it was."""
    import io

    from attnlab.report.figures import stream_weights_by_corruption

    rng = np.random.default_rng(1)
    weights = rng.dirichlet([1.0, 1.0], size=30)
    corrupted = np.zeros((30, 2), bool)
    corrupted[:10, 0] = True
    pngs = []
    for state in (0, 12345):
        np.random.seed(state)
        before = np.random.get_state()[1].copy()
        fig = stream_weights_by_corruption(weights, corrupted, ["appearance", "structure"])
        np.testing.assert_array_equal(np.random.get_state()[1], before)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        pngs.append(buf.getvalue())
    assert pngs[0] == pngs[1]
