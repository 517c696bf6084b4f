"""Divided space-time transformer and the per-frame CNN classifier."""
import pytest
import torch

from attnlab.capture import AttentionProbs
from attnlab.models.encoder import EncoderClassifier
from attnlab.models.frames import FrameCNN, frames_classifier
from attnlab.models.spacetime import DividedSpaceTimeTransformer, split_attentions

B, F, S, PATCH, H, L = 3, 4, 16, 4, 2, 2
P = (S // PATCH) ** 2


def _model(**kw):
    torch.manual_seed(0)
    kw = dict(frames=F, size=S, patch=PATCH, d_model=16, nhead=H, num_layers=L) | kw
    return DividedSpaceTimeTransformer(5, **kw).eval()


def _record(model, x):
    """Own plain forward hooks on every AttentionProbs: (name, output) in call order."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, AttentionProbs):
            handles.append(module.register_forward_hook(
                lambda m, inp, out, name=name: calls.append((name, out.detach().clone()))))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, calls


@pytest.fixture
def clip():
    return torch.randn(B, F, 1, S, S, generator=torch.Generator().manual_seed(1))


def test_output_shapes(clip):
    model = _model()
    assert model(clip).shape == (B, 5)
    assert model.forward_features(clip).shape == (B, 1 + F * P, 16)


def test_recorded_calls_order_shapes_and_rows(clip):
    model = _model()
    _, calls = _record(model, clip)
    names = [n for n, _ in calls]
    assert names == [f"blocks.{i}.attn_{kind}.attn_probs" for i in range(L) for kind in ("time", "space")]
    for i, (_, a) in enumerate(calls):
        expected = (B * P, H, F, F) if i % 2 == 0 else (B * F, H, 1 + P, 1 + P)
        assert a.shape == expected
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
        assert torch.all(a >= 0)


def test_split_attentions_shapes_and_clip_layout(clip):
    """Entry b of the split batch equals the attention of clip b run on its own."""
    model = _model()
    _, calls = _record(model, clip)
    space, time = model.split_attentions([a for _, a in calls])
    assert len(space) == len(time) == L
    for s, t in zip(space, time):
        assert s.shape == (B, F, H, 1 + P, 1 + P) and t.shape == (B, P, H, F, F)
    for b in range(B):
        _, single = _record(model, clip[b:b + 1])
        s1, t1 = split_attentions([a for _, a in single])
        for layer in range(L):
            torch.testing.assert_close(space[layer][b], s1[layer][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(time[layer][b], t1[layer][0], atol=1e-5, rtol=1e-5)


def test_split_attentions_rejects_bad_input(clip):
    model = _model()
    _, calls = _record(model, clip)
    entries = [a for _, a in calls]
    with pytest.raises(ValueError, match="even"):
        split_attentions(entries[:-1])
    with pytest.raises(ValueError, match="same batch"):
        split_attentions([entries[0][:P], entries[1]])
    with pytest.raises(ValueError, match="expected 2"):
        _model(num_layers=1).split_attentions(entries)


def test_patch_tokens_are_row_major_per_frame(clip):
    """Changing pixels of grid cell (r, c) of frame f changes only embed token [f, r·G + c]."""
    model = _model()
    grid = S // PATCH
    base = model.embed(clip)                                      # [B, F, P, D]
    for f, r, c in [(0, 0, 1), (2, 3, 0), (3, 1, 2)]:
        x = clip.clone()
        x[:, f, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] += 1.0
        changed = (model.embed(x) - base).abs().amax(dim=(0, 3)) > 0   # [F, P]
        expected = torch.zeros(F, P, dtype=torch.bool)
        expected[f, r * grid + c] = True
        assert torch.equal(changed, expected)


def test_class_token_skips_time_attention(clip):
    model = _model()
    _, before = _record(model, clip)
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))
    _, after = _record(model, clip)
    torch.testing.assert_close(before[0][1], after[0][1])                 # layer-0 time: unchanged
    assert not torch.allclose(before[1][1], after[1][1])                  # layer-0 space: changed


def test_block_matches_literal_per_clip_loop():
    """DividedBlock against a loop over clips, patches and frames using its own parts:
    time attention per patch, space attention per frame with a class-token copy,
    class token = mean of its copies, then the MLP on every token."""
    model = _model()
    block = model.blocks[0]
    g = torch.Generator().manual_seed(2)
    cls = torch.randn(B, 1, 16, generator=g)
    x = torch.randn(B, F, P, 16, generator=g)
    with torch.no_grad():
        out_cls, out_x = block(cls, x)
        for b in range(B):
            xt = x[b].clone()                                         # [F, P, D]
            for p in range(P):
                seq = x[b, :, p][None]                                # [1, F, D]
                xt[:, p] = (seq + block.attn_time(block.norm_time(seq)))[0]
            copies, xs = [], xt.clone()
            for f in range(F):
                seq = torch.cat([cls[b], xt[f]])[None]                # [1, 1+P, D]
                y = (seq + block.attn_space(block.norm_space(seq)))[0]
                copies.append(y[0])
                xs[f] = y[1:]
            c = torch.stack(copies).mean(0)
            c = c + block.mlp(block.norm_mlp(c))
            xs = xs + block.mlp(block.norm_mlp(xs))
            torch.testing.assert_close(out_cls[b, 0], c, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out_x[b], xs, atol=1e-5, rtol=1e-5)


def test_train_mode_with_dropout_runs_and_backprops(clip):
    model = _model(dropout=0.2).train()
    model(clip).sum().backward()
    assert model.patch_embed.weight.grad is not None and model.cls_token.grad is not None


def test_rejects_wrong_frames_or_size(clip):
    with pytest.raises(ValueError, match="expected"):
        _model()(clip[:, :2])
    with pytest.raises(ValueError, match="patch="):
        DividedSpaceTimeTransformer(5, frames=F, size=S, patch=5)


# ---------------------------------------------------------------- frames model

def test_frames_classifier_shapes_and_switches():
    x = torch.randn(2, 6, 1, 32, 32)
    model = frames_classifier(7, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0).eval()
    assert isinstance(model, EncoderClassifier) and isinstance(model.embed, FrameCNN)
    assert model.cls_token is None and model.position is None and model.pooling == "mean"
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 6, 16)
    other = frames_classifier(7, d_model=16, nhead=2, num_layers=1, dim_feedforward=32,
                              dropout=0.0, pooling="cls", positional=True, in_channels=3).eval()
    assert other.cls_token is not None and other.position is not None
    x3 = torch.randn(2, 6, 3, 20, 20)
    assert other(x3).shape == (2, 7) and other.forward_features(x3).shape == (2, 7, 16)


def test_frame_cnn_is_applied_per_frame():
    torch.manual_seed(0)
    cnn = FrameCNN(1, 16).eval()
    x = torch.randn(2, 5, 1, 32, 32)
    base = cnn(x)
    assert base.shape == (2, 5, 16)
    for t in range(5):
        y = x.clone()
        y[1, t] = torch.randn(1, 32, 32)
        changed = (cnn(y) - base).abs().amax(-1) > 0                  # [B, T]
        expected = torch.zeros(2, 5, dtype=torch.bool)
        expected[1, t] = True
        assert torch.equal(changed, expected)
    # the same frame gives the same embedding whatever the clip around it
    torch.testing.assert_close(cnn(x[:, 2:3])[:, 0], base[:, 2])


@pytest.mark.parametrize("module", ["blocks.0.attn_time", "blocks.1.attn_space"])
def test_head_ablation_equals_zeroing_the_heads_output(clip, module):
    """ablate_heads on the model's own attention equals removing head h's slice of the
    per-head outputs before the projection (a pre-hook, independent of out_proj)."""
    from attnlab.evaluate import ablate_heads
    from attnlab.evaluate.summaries import ablation_module

    model, h = _model(), 1
    assert ablation_module(model, f"{module}.attn_probs") == module
    with torch.no_grad(), ablate_heads(model, {module: [h]}):
        ablated = model(clip)
    dh = 16 // H

    def zero_head(_, args):
        out = args[0].clone()
        out[..., h * dh:(h + 1) * dh] = 0
        return (out,)

    handle = model.get_submodule(module).proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = model(clip)
    finally:
        handle.remove()
    torch.testing.assert_close(ablated, expected)
    with torch.no_grad():
        assert not torch.allclose(model(clip), ablated)
