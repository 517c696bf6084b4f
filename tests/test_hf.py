"""AttentionRecorder on Hugging Face models (BERT, RoBERTa, ViT, TimeSformer), the
space-time split of recorded entries, and the recorder's never-silent checks.

References are independent of the recorder: each attention module's forward is replaced
(inside the test, by hand) with a per-head computation from its own Linear weights, whose
probabilities stay in the graph, so ``torch.autograd.grad`` gives the reference gradients;
the hand forward must reproduce the library's output first. Models are built from small
configs with random weights (nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face adapters are tested with transformers "
                           "(pip install -r requirements-test.txt, as `make test` does)")

from attnlab import AttentionProbs, AttentionRecorder, spacetime_rollout, split_spacetime  # noqa: E402
from attnlab.capture import attention_lookalikes, recordable_modules  # noqa: E402
from attnlab.explain import spacetime_grad_rollout  # noqa: E402

B, L, D, H = 3, 7, 16, 4
FRAMES, SIZE, PATCH = 3, 8, 4
P = (SIZE // PATCH) ** 2


from helpers import assert_close, snapshot  # noqa: E402  (shared: tests/helpers.py)


# ---------------------------------------------------------------- hand references
def heads_attention(x_q, x_kv, w, b, heads, key_add=None):
    """Per head: ``softmax((x_q Wq_h + bq_h)(x_kv Wk_h + bk_h)ᵀ/√d + key_add)`` and its
    values; ``w``/``b`` are the (q, k, v) weights and biases. Returns (probs [B, H, Lq, S],
    context [B, Lq, H·d])."""
    d = w[0].shape[0] // heads
    scores, values = [], []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        q = x_q @ w[0][sl].T + b[0][sl]
        k = x_kv @ w[1][sl].T + b[1][sl]
        values.append(x_kv @ w[2][sl].T + b[2][sl])
        s = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores.append(s if key_add is None else s + key_add[:, None, :])
    s = torch.stack(scores, 1)                              # [B, H, Lq, S]
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    probs = e / e.sum(-1, keepdim=True)                     # the tensor the context is computed from
    if not probs.requires_grad and torch.is_grad_enabled():  # frozen model: differentiate from here
        probs = probs.detach().requires_grad_()
    return probs, torch.cat([probs[:, h] @ values[h] for h in range(heads)], -1)


def bert_hand(module, store, key_add):
    """Hand forward of a Bert/RobertaSelfAttention (query/key/value Linears)."""
    def forward(hidden_states, *args, **kwargs):
        w = (module.query.weight, module.key.weight, module.value.weight)
        b = (module.query.bias, module.key.bias, module.value.bias)
        p, ctx = heads_attention(hidden_states, hidden_states, w, b, module.num_attention_heads, key_add)
        store.append(p)
        return ctx, None
    return forward


def vit_hand(module, store, key_add):
    """Hand forward of a ViTAttention (q_proj/k_proj/v_proj, o_proj)."""
    def forward(hidden_states, *args, **kwargs):
        w = (module.q_proj.weight, module.k_proj.weight, module.v_proj.weight)
        b = (module.q_proj.bias, module.k_proj.bias, module.v_proj.bias)
        p, ctx = heads_attention(hidden_states, hidden_states, w, b, module.num_attention_heads)
        store.append(p)
        return module.o_proj(ctx), None
    return forward


def timesformer_hand(module, store, key_add):
    """Hand forward of a TimesformerSelfAttention (fused qkv: rows q, then k, then v)."""
    def forward(hidden_states, output_attentions=False):
        w, b = module.qkv.weight.chunk(3), module.qkv.bias.chunk(3)
        p, ctx = heads_attention(hidden_states, hidden_states, w, b, module.num_heads)
        store.append(p)
        return (ctx, p) if output_attentions else (ctx,)
    return forward


HAND = {"BertSelfAttention": bert_hand, "RobertaSelfAttention": bert_hand, "ViTAttention": vit_hand,
        "TimesformerSelfAttention": timesformer_hand}


@contextlib.contextmanager
def hand_attention(model, key_add=None):
    """Replace every attention module's forward by its hand computation (the test's own
    patch, undone on exit); yields the list of hand probabilities in call order."""
    store, patched = [], []
    for _, m in model.named_modules():
        if type(m).__name__ in HAND:
            m.forward = HAND[type(m).__name__](m, store, key_add)
            patched.append(m)
    assert patched
    try:
        yield store
    finally:
        for m in patched:
            del m.__dict__["forward"]


def check_against_hand(model, run, key_add, names, *, atol_grad=1e-4):
    """Plain output, hand output and probabilities (+ autograd gradients), recorded
    output, probabilities and gradients: all compared. Returns the recorder."""
    with torch.no_grad():
        plain = run(model)
    w = torch.randn(plain.shape, generator=torch.Generator().manual_seed(5))
    with hand_attention(model, key_add) as ref_probs:
        ref_out = run(model)
        ref_grads = torch.autograd.grad((ref_out * w).sum(), ref_probs)
    assert_close(ref_out.detach(), plain)                 # the hand forward is the module's maths
    before = snapshot(model)
    with AttentionRecorder(model, keep_grad=True) as rec:
        out = run(model)
    (out * w).sum().backward()
    model.zero_grad()
    assert snapshot(model) == before
    assert (out.detach() - plain).abs().max() <= 1e-5
    assert rec.names == names
    for att, ref, g, rg in zip(rec.attentions, ref_probs, rec.gradients, ref_grads):
        assert att.shape == ref.shape and g.shape == ref.shape
        assert_close(att, ref.detach())
        assert_close(g, rg, atol=atol_grad)
    return rec


# ---------------------------------------------------------------- BERT, RoBERTa
def text_model(family, impl, **extra):
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=40, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                      intermediate_size=2 * D, max_position_embeddings=16, **extra)
        model = transformers.BertModel._from_config(cfg, attn_implementation=impl)
    else:
        cfg = transformers.RobertaConfig(vocab_size=40, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                         intermediate_size=2 * D, max_position_embeddings=20, **extra)
        model = transformers.RobertaModel._from_config(cfg, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    with torch.no_grad():                                  # non-trivial biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def text_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_family_probs_outputs_gradients(family, impl):
    model = text_model(family, impl)
    ids, mask = text_inputs()
    key_add = torch.zeros(B, L).masked_fill(mask == 0, float("-inf"))
    rec = check_against_hand(model, lambda m: m(ids, attention_mask=mask).last_hidden_state, key_add,
                             [f"encoder.layer.{i}.attention.self" for i in range(2)])
    for att in rec.attentions:
        assert att.shape == (B, H, L, L)
        assert (att[0, :, :, 5:] == 0).all() and (att[2, :, :, 4:] == 0).all()   # padded keys
        assert_close(att.sum(-1), torch.ones(B, H, L))

    # the maps equal output_attentions=True of the same weights under eager
    eager = text_model(family, "eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        shown = eager(ids, attention_mask=mask, output_attentions=True).attentions
    for att, ref in zip(rec.attentions, shown):
        assert_close(att, ref)


def test_bert_train_mode_eager_dropout_is_reproduced_and_probs_are_pre_dropout():
    model = text_model("bert", "eager", attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0).train()
    ids, mask = text_inputs()
    torch.manual_seed(3)
    plain = model(ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(3)
    with AttentionRecorder(model) as rec:
        out = model(ids, attention_mask=mask).last_hidden_state
    assert_close(out, plain)
    for att in rec.attentions:                            # pre-dropout: rows still sum to 1
        assert_close(att.sum(-1), torch.ones(B, H, L))
    torch.manual_seed(4)
    assert (model(ids, attention_mask=mask).last_hidden_state - plain).abs().max() > 1e-3


def test_bert_cross_attention_and_causal_self_attention_sdpa():
    """A BERT decoder: causal self-attention (SDPA's is_causal or a mask) and cross-attention."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=D, num_hidden_layers=1, num_attention_heads=H,
                                  intermediate_size=2 * D, is_decoder=True, add_cross_attention=True)
    results = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = transformers.BertModel._from_config(cfg, attn_implementation=impl).eval()
        ids, enc = torch.randint(3, 40, (2, 5)), torch.randn(2, 6, D)
        with torch.no_grad():
            plain = model(ids, encoder_hidden_states=enc, use_cache=False).last_hidden_state
            with AttentionRecorder(model) as rec:
                out = model(ids, encoder_hidden_states=enc, use_cache=False).last_hidden_state
        assert (out - plain).abs().max() <= 1e-5
        assert rec.names == ["encoder.layer.0.attention.self", "encoder.layer.0.crossattention.self"]
        assert rec.attentions[0].shape == (2, H, 5, 5) and rec.attentions[1].shape == (2, H, 5, 6)
        assert (rec.attentions[0].triu(1) == 0).all()
        results[impl] = rec.attentions
    for a, b in zip(results["eager"], results["sdpa"]):
        assert_close(a, b)


# ---------------------------------------------------------------- ViT
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vit_probs_outputs_gradients(impl):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=SIZE, patch_size=PATCH, num_channels=1, hidden_size=D,
                                 num_hidden_layers=2, num_attention_heads=H, intermediate_size=2 * D)
    model = transformers.ViTModel._from_config(cfg, attn_implementation=impl).eval()
    x = torch.randn(B, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    names = [n for n, m in model.named_modules() if type(m).__name__ == "ViTAttention"]
    assert len(names) == 2
    rec = check_against_hand(model, lambda m: m(x).last_hidden_state, None, names)
    assert rec.attentions[0].shape == (B, H, 1 + P, 1 + P)
    eager = transformers.ViTModel._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        shown = eager(x, output_attentions=True).attentions
    for att, ref in zip(rec.attentions, shown):
        assert_close(att, ref)


# ---------------------------------------------------------------- TimeSformer
def timesformer(cls="TimesformerModel", layers=2):
    torch.manual_seed(0)
    cfg = transformers.TimesformerConfig(image_size=SIZE, patch_size=PATCH, num_channels=1, num_frames=FRAMES,
                                         hidden_size=D, num_hidden_layers=layers, num_attention_heads=H,
                                         intermediate_size=2 * D, attention_type="divided_space_time",
                                         num_labels=3)
    model = getattr(transformers, cls)._from_config(cfg).eval()
    with torch.no_grad():                                  # non-trivial positions and biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def clips(n=B, seed=2):
    return torch.randn(n, FRAMES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


TSF_NAMES = [f"encoder.layer.{i}.{kind}.attention" for i in range(2) for kind in ("temporal_attention", "attention")]


def test_timesformer_space_and_time_probs_outputs_gradients():
    model = timesformer()
    x = clips()
    rec = check_against_hand(model, lambda m: m(x).last_hidden_state, None, TSF_NAMES)
    for i, att in enumerate(rec.attentions):
        assert att.shape == ((B * P, H, FRAMES, FRAMES) if i % 2 == 0 else (B * FRAMES, H, 1 + P, 1 + P))
    # the spatial maps equal output_attentions=True (which returns only those)
    with torch.no_grad():
        shown = model(x, output_attentions=True).attentions
    assert len(shown) == 2
    for att, ref in zip(rec.attentions[1::2], shown):
        assert_close(att, ref)


def test_timesformer_time_rows_are_patches_row_major():
    """Changing the pixels of grid cell (r, c) of one frame of clip 1 changes the first
    block's time attention in row 1·P + r·G + c only (its input is the patch embedding)."""
    model = timesformer()
    x = clips()
    y = x.clone()
    grid = SIZE // PATCH
    r, c = 1, 0
    y[1, 2, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] += 1.0
    with torch.no_grad():
        with AttentionRecorder(model, modules=[TSF_NAMES[0]]) as rec_x:
            model(x)
        with AttentionRecorder(model, modules=[TSF_NAMES[0]]) as rec_y:
            model(y)
    changed = (rec_x.attentions[0] - rec_y.attentions[0]).abs().flatten(1).amax(1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [1 * P + r * grid + c]


def test_video_classifier_logits_and_frozen_gradients():
    """The classification model (as the pipeline builds it): logits unchanged, gradients
    of one logit on a frozen model equal autograd through the hand forward."""
    model = timesformer("TimesformerForVideoClassification").requires_grad_(False)
    x = clips()
    rec = check_against_hand(model, lambda m: m(x).logits, None, [f"timesformer.{n}" for n in TSF_NAMES])
    assert len(rec.gradients) == 4


# ---------------------------------------------------------------- space-time split and rollout
def dense_rollouts(space, time, space_g=None, time_g=None):
    """Joint (1+F·P)² matrices of each block, built entry by entry (token 0 = class,
    1 + f·P + p = patch p of frame f): rollout (0.5·M + 0.5·I, rows renormalised,
    R = S̃_L T̃_L ⋯ S̃_1 T̃_1) or, with gradients, Chefer's R = ∏ (I + Ā_S)(I + Ā_T).
    Returns R[cls, patches] as [B, F, P]."""
    b, f, _, n1, _ = space[0].shape
    p = n1 - 1
    n = 1 + f * p
    eye = torch.eye(n, dtype=torch.float64).expand(b, n, n)
    tok = lambda fi, pi: 1 + fi * p + pi  # noqa: E731
    r = eye.clone()
    for layer in range(len(space)):
        if space_g is None:
            s, t = space[layer].double().mean(2), time[layer].double().mean(2)
        else:
            s = (space[layer].double() * space_g[layer].double()).clamp_min(0).mean(2)
            t = (time[layer].double() * time_g[layer].double()).clamp_min(0).mean(2)
        mt = torch.zeros(b, n, n, dtype=torch.float64)
        ms = torch.zeros(b, n, n, dtype=torch.float64)
        if space_g is None:
            mt[:, 0, 0] = 1.0                                  # the class token skips time attention
        for fi in range(f):
            for pi in range(p):
                for fj in range(f):
                    mt[:, tok(fi, pi), tok(fj, pi)] = t[:, pi, fi, fj]
            for i in range(1 + p):
                for j in range(1 + p):
                    col = 0 if j == 0 else tok(fi, j - 1)
                    if i == 0:
                        ms[:, 0, col] += s[:, fi, 0, j] / f      # class row: mean over its frame copies
                    else:
                        ms[:, tok(fi, i - 1), col] = s[:, fi, i, j]
        if space_g is None:
            mt, ms = 0.5 * mt + 0.5 * eye, 0.5 * ms + 0.5 * eye
            mt, ms = mt / mt.sum(-1, keepdim=True), ms / ms.sum(-1, keepdim=True)
            r = ms @ mt @ r
        else:
            r = (eye + ms) @ (eye + mt) @ r
    return r[:, 0, 1:].reshape(b, f, p)


@pytest.mark.parametrize("arch", ["hf", "divided"])
def test_split_spacetime_feeds_the_rollouts_and_matches_dense(arch):
    if arch == "hf":
        model, names = timesformer("TimesformerForVideoClassification"), [f"timesformer.{n}" for n in TSF_NAMES]
        run = lambda xb: model(xb).logits  # noqa: E731
    else:
        from attnlab.models.spacetime import DividedSpaceTimeTransformer
        torch.manual_seed(0)
        model = DividedSpaceTimeTransformer(3, frames=FRAMES, size=SIZE, patch=PATCH, d_model=D, nhead=H,
                                            num_layers=2).eval()
        names = [f"blocks.{i}.attn_{k}.attn_probs" for i in range(2) for k in ("time", "space")]
        run = model
    x = clips()
    with AttentionRecorder(model, keep_grad=True) as rec:
        logits = run(x)
        logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
    assert rec.names == names
    space, time = split_spacetime(rec.attentions, frames=FRAMES, patches=P, blocks=2, names=rec.names)
    space_g, time_g = split_spacetime(rec.gradients, frames=FRAMES, patches=P, names=rec.names)
    assert [s.shape for s in space] == [(B, FRAMES, H, 1 + P, 1 + P)] * 2
    assert [t.shape for t in time] == [(B, P, H, FRAMES, FRAMES)] * 2
    # row b·P + p of a time entry is patch p of clip b; row b·F + f of a space entry is frame f
    for layer in range(2):
        for b in range(B):
            for p in range(P):
                assert torch.equal(time[layer][b, p], rec.attentions[2 * layer][b * P + p])
            for f in range(FRAMES):
                assert torch.equal(space[layer][b, f], rec.attentions[2 * layer + 1][b * FRAMES + f])
    got = spacetime_rollout(space, time)
    assert got.shape == (B, FRAMES, P)
    torch.testing.assert_close(got.double(), dense_rollouts(space, time), atol=1e-6, rtol=1e-5)
    got_g = spacetime_grad_rollout(space, time, space_g, time_g)
    torch.testing.assert_close(got_g.double(), dense_rollouts(space, time, space_g, time_g), atol=1e-6, rtol=1e-5)
    # one clip at a time gives the same split entries
    with torch.no_grad(), AttentionRecorder(model) as one:
        run(x[1:2])
    s1, t1 = split_spacetime(one.attentions, frames=FRAMES, patches=P)
    assert_close(s1[1][0], space[1][1])
    assert_close(t1[0][0], time[0][1])


def test_split_spacetime_checks_frames_patches_and_passes():
    model = timesformer()
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(clips())
    entries, names = rec.attentions, rec.names
    with pytest.raises(ValueError, match=r"entry 0 \('encoder.layer.0.temporal_attention.attention'\) has "
                                         r"shape \(12, 4, 3, 3\); expected \[B·P, H, F, F\] time attention with "
                                         r"frames F=4, patches P=4"):
        split_spacetime(entries, frames=4, patches=P, names=names)
    with pytest.raises(ValueError, match=r"entry 1 has shape \(9, 4, 5, 5\); expected \[B·F, H, 1\+P, 1\+P\] "
                                         r"space attention with frames F=3, patches P=9"):
        split_spacetime([entries[0][:9], entries[1]], frames=FRAMES, patches=9)
    with pytest.raises(ValueError, match="even"):
        split_spacetime(entries[:3], frames=FRAMES, patches=P)
    with pytest.raises(ValueError, match=r"expected 6 \(time and space of each of 3 blocks\)"):
        split_spacetime(entries, frames=FRAMES, patches=P, blocks=3)
    with pytest.raises(ValueError, match="same batch"):
        split_spacetime([entries[0][:P], entries[1]], frames=FRAMES, patches=P)
    with pytest.raises(ValueError, match=r"'encoder.layer.0.temporal_attention.attention' was recorded more "
                                         r"than once.*rec.clear\(\)"):
        split_spacetime(entries + entries, frames=FRAMES, patches=P, names=names + names)
    with pytest.raises(ValueError, match="frames=0: expected a positive int"):
        split_spacetime(entries, frames=0, patches=P)


# ---------------------------------------------------------------- restoration, never silent
def test_model_restored_on_exit_and_after_exception():
    for model, run in ((text_model("bert", "sdpa"), lambda m: m(*text_inputs()[:1]).last_hidden_state),
                       (timesformer(), lambda m: m(clips()).last_hidden_state)):
        with torch.no_grad():
            before_out = run(model)
        before = snapshot(model)
        assert before[2] == 0                                 # no torch function mode outside
        with AttentionRecorder(model) as rec:
            assert torch._C._len_torch_function_stack() == 1
            run(model)
        assert len(rec) > 0 and snapshot(model) == before
        with pytest.raises(ZeroDivisionError):
            with AttentionRecorder(model, keep_grad=True):
                run(model)
                1 / 0
        assert snapshot(model) == before
        with torch.no_grad():
            torch.testing.assert_close(run(model), before_out, atol=0, rtol=0)


class TokenMixer(nn.Module):
    """Not named like attention, no q/k/v attributes: SDPA called through an alias, so
    only the runtime check can see it."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(D, 3 * D)

    def forward(self, x):
        sdpa = getattr(F, "scaled_" + "dot_product_attention")
        q, k, v = self.proj_in(x).unflatten(-1, (3, H, D // H)).permute(2, 0, 3, 1, 4)
        return sdpa(q, k, v).transpose(1, 2).flatten(2)


class SdpaAttention(nn.Module):
    """A custom attention module calling F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, H, D // H)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class QKVAttention(nn.Module):
    """Attention-named, separate q/k/v Linears, an explicit softmax without a marker."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return (self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(D)).softmax(-1) @ self.v(x)


class Hybrid(nn.Module):
    def __init__(self, extra: nn.Module, name: str):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        self.add_module(name, extra)
        self.extra = name

    def forward(self, x):
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return x + getattr(self, self.extra)(x)


def test_sdpa_call_in_an_unrecorded_module_raises_naming_it():
    torch.manual_seed(0)
    model = Hybrid(TokenMixer(), "mixer")
    x = torch.randn(2, 5, D)
    assert attention_lookalikes(model) == []               # invisible to the structural check
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'mixer' \(TokenMixer\) calls scaled_dot_product_attention, "
                                         r"which never exposes the attention probabilities.*AttentionProbs"):
        with AttentionRecorder(model):
            model(x)
    assert snapshot(model) == before
    # SDPA outside the model, or with the modules chosen explicitly, is no concern of the recorder
    with torch.no_grad(), AttentionRecorder(model, modules=["mha"]) as rec:
        model(x)
        F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])
    assert rec.names == ["mha"]


def test_the_sdpa_watch_covers_every_module_but_torch_nn_and_attnlab_models():
    """Only torch.nn's layers and attnlab's own classes are known not to call SDPA
    unrecorded: a call from anything else raises wherever it sits (inside a torch.nn
    container, in a subclass of an attnlab model), and a model made only of known
    classes is recorded without a torch function mode on every op."""
    from attnlab.models.spacetime import DividedSpaceTimeTransformer

    class MixedVideo(DividedSpaceTimeTransformer):          # a user's subclass: watched
        def forward(self, x):
            F.scaled_dot_product_attention(*(torch.ones(1, 1, 2, 2),) * 3)
            return super().forward(x)

    def video(cls=DividedSpaceTimeTransformer):
        return cls(3, frames=2, size=8, patch=4, d_model=8, nhead=2, num_layers=1)

    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    seq = nn.Sequential(nn.MultiheadAttention(D, H, batch_first=True), nn.Sequential(nn.Identity(), TokenMixer()))
    seq.forward = lambda x: seq[1](x + seq[0](x, x, x)[0])
    with pytest.raises(ValueError, match=r"module '1\.1' \(TokenMixer\) calls scaled_dot_product_attention"):
        with AttentionRecorder(seq):
            seq(x)
    mixed = video(MixedVideo)
    with pytest.raises(ValueError, match=r"the model \(MixedVideo\) calls scaled_dot_product_attention"):
        with AttentionRecorder(mixed):
            mixed(torch.randn(1, 2, 1, 8, 8))

    modes = []
    known = nn.ModuleList([nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, batch_first=True), 2), video()])
    for module in known:
        module.register_forward_hook(lambda *_: modes.append(torch._C._len_torch_function_stack()))
    with torch.no_grad(), AttentionRecorder(known) as rec:
        known[0](x)
        known[1](torch.randn(1, 2, 1, 8, 8))
    assert modes == [0, 0] and len(rec.attentions) == 4      # 2 encoder layers, time + space


def test_attention_lookalikes_raise_on_entry_listing_them():
    model = Hybrid(SdpaAttention(), "attn")
    model.add_module("block", QKVAttention())
    assert attention_lookalikes(model) == ["attn (SdpaAttention: calls scaled_dot_product_attention)",
                                           "block (QKVAttention: projections q, k, v)"]
    with pytest.raises(ValueError, match=r"Hybrid has modules that look like attention but that no adapter records: "
                                         r"'attn' \(SdpaAttention: calls scaled_dot_product_attention\), 'block' "
                                         r"\(QKVAttention: projections q, k, v\); recordable modules: 'mha'.*"
                                         r"AttentionProbs"):
        AttentionRecorder(model)
    with pytest.raises(ValueError, match=r"'<model>' \(QKVAttention: projections q, k, v\)"):
        AttentionRecorder(QKVAttention())
    AttentionRecorder(model, modules=["mha"])               # chosen explicitly: fine

    # the same module with the marker is recordable; HF and project models have no lookalikes
    class Marked(QKVAttention):
        def __init__(self):
            super().__init__()
            self.attn_probs = AttentionProbs()

        def forward(self, x):
            scores = (self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(D))[:, None]     # one head
            return (self.attn_probs(scores.softmax(-1)) @ self.v(x)[:, None])[:, 0]

    marked = nn.Sequential(Marked())
    assert attention_lookalikes(marked) == [] and recordable_modules(marked) == ["0.attn_probs"]
    x = torch.randn(2, 5, D)
    with AttentionRecorder(marked) as rec:
        marked(x)
    assert rec.attentions[0].shape == (2, 1, 5, 5)
    assert attention_lookalikes(timesformer()) == [] and attention_lookalikes(text_model("bert", "sdpa")) == []


def test_hf_module_without_a_visible_softmax_raises():
    """An attention implementation that computes without softmax/SDPA (here: a custom one
    registered in transformers' interface, as flex_attention would be) cannot be recorded."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def exp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        e = torch.exp(query @ key.transpose(-2, -1) * scaling)
        return ((e / e.sum(-1, keepdim=True)) @ value).transpose(1, 2).contiguous(), None

    ALL_ATTENTION_FUNCTIONS["attnlab_test_exp"] = exp_attention
    try:
        model = text_model("bert", "eager")
        model.config._attn_implementation = "attnlab_test_exp"
        ids, _ = text_inputs()
        model(ids)                                          # runs outside a recorder
        with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self' \(BertSelfAttention, "
                                             r"attn_implementation='attnlab_test_exp'\) ran without a softmax or "
                                             r"scaled_dot_product_attention call"):
            with torch.no_grad(), AttentionRecorder(model):
                model(ids)
    finally:
        del ALL_ATTENTION_FUNCTIONS["attnlab_test_exp"]


def test_empty_recording_is_an_error():
    model = timesformer()
    with pytest.raises(ValueError, match=r"nothing was recorded: none of the recorded modules \('encoder.layer.0"):
        with AttentionRecorder(model):
            pass
    with AttentionRecorder(model) as rec:                  # cleared entries still count as recorded
        with torch.no_grad():
            model(clips())
        rec.clear()
    assert len(rec) == 0


# ---------------------------------------------------------------- the video pipeline on HF TimeSformer
def test_video_pipeline_with_hf_timesformer(tmp_path):
    """Every stage but track on tiny sizes with ``video.model.arch: hf_timesformer``."""
    import json
    from pathlib import Path

    import numpy as np
    import yaml

    from attnlab.pipeline import run

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["experiments"] = ["video"]
    v = params["video"]
    v["prepare"].update(n_train=48, n_test=12, frames=4, size=16, patch=8, scale=1)
    v["model"].update(arch="hf_timesformer", d_model=16, nhead=2)
    v["train"].update(epochs=1, batch_size=16)
    from attnlab import methods

    refused = [m for m in v["explain"]["methods"] if "video:hf_timesformer" in methods.get(m).unsupported]
    assert refused == ["alti", "attnlrp", "value_zeroing"]       # no rules for HF's layers (refused by params)
    v["explain"].update(ig_steps=2, examples=1, batch_size=8,     # no norms from HF modules (refused by params)
                        methods=[m for m in v["explain"]["methods"] if not m.startswith("norm") and m not in refused])
    v["evaluate"].update(steps=3)
    v["report"].update(examples=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["video", "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data")]
    for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report"):
        run(stage, argv, progress=False)
    root = tmp_path / "data" / "video"
    ckpt = torch.load(root / "train" / "model.pt", weights_only=True)
    assert ckpt["factory"] == "attnlab.models.hf_timesformer:HFTimesformerClassifier"
    with np.load(root / "explain" / "importance.npz") as imp:
        for method in v["explain"]["methods"]:
            assert imp[method].shape == (12, 4 * 4) and np.isfinite(imp[method]).all(), method
    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    assert metrics and (root / "report").is_dir()


def test_hugging_face_example_runs_as_written():
    """docs/library.md's Hugging Face block, verbatim (tests/docblocks.py); its rollout
    checked against the dense construction."""
    import docblocks

    torch.manual_seed(0)
    namespace = docblocks.run_python("library-hf-timesformer")
    rec, relevance = namespace["rec"], namespace["relevance"]
    assert len(rec) == 4 and relevance.shape == (2, 8, 16)
    torch.testing.assert_close(relevance.double(), dense_rollouts(namespace["space"], namespace["time"]),
                               atol=1e-6, rtol=1e-5)


HF_FACTORY = '''
import transformers


def make_model(attn_implementation="sdpa"):
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     attn_implementation=attn_implementation)
    return transformers.BertForSequenceClassification(config)
'''


def test_attnlab_explain_takes_a_hugging_face_model_through_a_factory(tmp_path):
    """`attnlab explain` on a BertForSequenceClassification (sdpa, the default) built by a
    factory, with no extra flag: its ModelOutput is read as logits, the stored attention
    equals `output_attentions=True` of the same weights under eager, and the report exists."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from attnlab.store import AttentionReader

    (tmp_path / "hf_model.py").write_text(HF_FACTORY)
    namespace: dict = {}
    exec(compile(HF_FACTORY, "hf_model", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["make_model"]()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    ids = torch.randint(1, 30, (6, 9))
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 0, 1, 2]))
    out = tmp_path / "out"
    proc = subprocess.run([str(Path(sys.executable).parent / "attnlab"), "explain", "--model",
                           f"{tmp_path / 'hf_model.py'}:make_model", "--weights", str(tmp_path / "weights.pt"),
                           "--inputs", str(tmp_path / "ids.npy"), "--labels", str(tmp_path / "labels.npy"),
                           "--readout", "cls", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    eager = namespace["make_model"]("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = eager.eval()(ids, output_attentions=True)
    with AttentionReader(out / "attention.h5") as reader:
        stored = [reader.entry(k)[:] for k in reader.keys]
    assert len(stored) == 2
    for got, want in zip(stored, reference.attentions):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)          # stored as float16
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(float((reference.logits.argmax(-1).numpy() ==
                                                       np.array([0, 1, 2, 0, 1, 2])).mean()))
    assert "rollout" in metrics["faithfulness"]["deletion_auc"] and "heads" in metrics
    assert (out / "report.html").is_file()
