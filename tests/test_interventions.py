"""Value zeroing, attention knockout and the recorder's ``edit`` hook, against
independent references: hand-written forwards of the layers from their weights with
one value vector zeroed (a literal loop over tokens), forwards through
``nn.MultiheadAttention`` itself with ``-inf`` attention masks on the blocked edges,
and a literal loop over samples for the knockout diagnostic."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

from attnlab.capture import AttentionRecorder
from attnlab.explain import readout
from attnlab.explain.interventions import (block_edges, find_blocks, knockout_importance, value_zeroing,
                                           value_zeroing_maps)
from attnlab.models.causal import CausalTransformerLM
from attnlab.models.encoder import EncoderClassifier
from attnlab.models.spacetime import DividedSpaceTimeTransformer


def _encoder(pooling="mean", norm_first=False, seed=0):
    torch.manual_seed(seed)
    return EncoderClassifier(3, 4, d_model=16, nhead=2, num_layers=2, dim_feedforward=24, pooling=pooling,
                             norm_first=norm_first, positional=True).eval()


# --------------------------------------------------------------------------- hand forwards
def _mha(mha: nn.MultiheadAttention, h, *, zero=None, mask=None):
    """Self-attention from the weights; ``zero [B, L]`` True where the value vector is set to
    0 (all heads); ``mask`` additive ``[L, L]`` or ``[B, H, L, L]``."""
    b, n, d = h.shape
    heads = mha.num_heads
    q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    if zero is not None:
        v = v.masked_fill(zero[:, None, :, None], 0.0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return mha.out_proj(out)


def _layer(layer: nn.TransformerEncoderLayer, h, **kw):
    """``nn.TransformerEncoderLayer`` in eval mode, by hand."""
    ff = lambda t: layer.linear2(F.relu(layer.linear1(t)))  # noqa: E731
    if layer.norm_first:
        h = h + _mha(layer.self_attn, layer.norm1(h), **kw)
        return h + ff(layer.norm2(h))
    h = layer.norm1(h + _mha(layer.self_attn, h, **kw))
    return layer.norm2(h + ff(h))


def _distance(a, b):
    return (1 - F.cosine_similarity(a.double(), b.double(), dim=-1)).clamp_min(0).float()


def _literal_vz(layers, h, mask=None):
    """Per layer ``C[b, i, j]``: a literal loop over ``j``, one value vector zeroed at a time."""
    maps = []
    for layer in layers:
        ref = _layer(layer, h, mask=mask)
        n = h.shape[1]
        c = torch.zeros(h.shape[0], n, n)
        for j in range(n):
            zero = torch.zeros(h.shape[0], n, dtype=torch.bool)
            zero[:, j] = True
            c[:, :, j] = _distance(_layer(layer, h, zero=zero, mask=mask), ref)
        maps.append(c / c.sum(-1, keepdim=True))
        h = ref
    return maps


# --------------------------------------------------------------------------- the edit hook
@pytest.mark.parametrize("kind", ["mha", "probs"])
def test_identity_edit_changes_nothing(kind):
    """An edit returning its input: outputs and recorded attention bit for bit equal to
    the same (explicit) computation without edit."""
    if kind == "mha":
        model, x = _encoder("cls"), torch.randn(3, 6, 3)
        plain = dict(keep_norms=True)        # also forces the explicit path, without an edit
    else:
        torch.manual_seed(0)
        model, x = DividedSpaceTimeTransformer(3, frames=2, size=8, patch=4, d_model=16, nhead=2).eval(), \
            torch.randn(2, 2, 1, 8, 8)
        plain = {}
    seen = []
    with torch.no_grad():
        with AttentionRecorder(model, **plain) as a:
            out_a = model(x)
        with AttentionRecorder(model, edit=lambda n, c, p: seen.append((n, c)) or p) as b:
            out_b = model(x)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(p, q) for p, q in zip(a.attentions, b.attentions))
    assert [c for _, c in seen] == list(range(len(a.attentions))) and [n for n, _ in seen] == a.names


def test_edit_changes_the_output_and_is_removed():
    model, x = _encoder(), torch.randn(2, 5, 3)
    with torch.no_grad():
        before = model(x)
        with AttentionRecorder(model, edit=lambda n, c, p: torch.full_like(p, 1 / p.shape[-1])) as rec:
            uniform = model(x)
        after = model(x)
    assert not torch.allclose(uniform, before)
    assert_close(after, before)
    assert rec.attentions[0].std() > 0                     # recorded: the probabilities before the edit
    with pytest.raises(ValueError, match="expected a tensor shaped like probs"), torch.no_grad():
        with AttentionRecorder(model, edit=lambda n, c, p: p[..., :1]):
            model(x)
    with pytest.raises(TypeError, match="edit must be None or a callable"):
        AttentionRecorder(model, edit=3)


# --------------------------------------------------------------------------- value zeroing
@pytest.mark.parametrize("pooling,norm_first", [("mean", False), ("cls", True)])
def test_value_zeroing_equals_literal_loop(pooling, norm_first):
    model, x = _encoder(pooling, norm_first), torch.randn(3, 6, 3)
    with torch.no_grad():
        h = model.embed(x)
        if model.cls_token is not None:
            h = torch.cat([model.cls_token.expand(3, -1, -1), h], 1)
        h = model.position(h)
        expected = _literal_vz(model.encoder.layers, h)
    maps = value_zeroing_maps(model, lambda: model(x), memory=4000)   # several chunks
    assert len(maps) == 2
    for got, want in zip(maps, expected):
        assert_close(got, want, atol=2e-5, rtol=1e-4)
    joint = expected[1] @ expected[0]
    assert_close(value_zeroing(model, lambda: model(x), pooling), readout(joint, pooling), atol=2e-5, rtol=1e-4)


def test_value_zeroing_causal_padded_equals_literal_loop():
    torch.manual_seed(1)
    lm = CausalTransformerLM(11, d_model=16, nhead=2, max_len=7, dim_feedforward=16).eval()
    tok = torch.randint(0, 11, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    pos = torch.tensor([3, 6, 2])
    run = lambda: lm(tok, mask)[torch.arange(3), pos]  # noqa: E731
    with torch.no_grad():
        h = lm.embed(tok) + lm.position(torch.arange(7))
        additive = torch.full((7, 7), float("-inf")).triu(1)[None, None] + \
            torch.zeros(3, 7).masked_fill(~mask, float("-inf"))[:, None, None, :]
        expected = _literal_vz(lm.encoder.layers, h, mask=additive)
    maps = value_zeroing_maps(lm, run)
    for got, want in zip(maps, expected):
        assert_close(got, want.nan_to_num(0.0), atol=2e-5, rtol=1e-4)
    assert (maps[0][:, torch.arange(7)[:, None] < torch.arange(7)] == 0).all()      # the future: exactly 0
    assert_close(value_zeroing(lm, run, pos), readout(expected[1] @ expected[0], pos), atol=2e-5, rtol=1e-4)


def _sa_by_hand(attn, x, zero=None, mask=None):
    """attnlab's space-time ``SelfAttention`` from its weights (``zero [B', L]``: values set to 0)."""
    b, n, d = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.nhead, d // attn.nhead).permute(2, 0, 3, 1, 4).unbind(0)
    if zero is not None:
        v = v.masked_fill(zero[:, None, :, None], 0.0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    return attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


def _block_by_hand(block, cls, x, j=None, knock=None, space_mask=None):
    """A divided block by hand; ``j``: the joint token whose value is zeroed in both
    attentions; ``knock``: the joint token whose incoming edges get ``-inf``."""
    b, f, p, d = x.shape
    def masks(t):
        if t is None:
            return None, None
        zt = torch.zeros(b * p, f, dtype=torch.bool)
        zs = torch.zeros(b * f, 1 + p, dtype=torch.bool)
        if t == 0:
            zs[:, 0] = True
        else:
            ff, pp = divmod(t - 1, p)
            zt.view(b, p, f)[:, pp, ff] = True
            zs.view(b, f, 1 + p)[:, ff, 1 + pp] = True
        return zt, zs
    zt, zs = masks(j)
    kt, ks = masks(knock)
    add = lambda z, n: None if z is None else torch.where(  # noqa: E731
        z[:, None, None, :] & ~torch.eye(n, dtype=torch.bool)[None, None], float("-inf"), 0.0)
    xt = x.transpose(1, 2).reshape(b * p, f, d)
    xt = xt + _sa_by_hand(block.attn_time, block.norm_time(xt), zt, add(kt, f))
    x = xt.reshape(b, p, f, d).transpose(1, 2)
    xs = torch.cat([cls.unsqueeze(1).expand(b, f, 1, d), x], dim=2).reshape(b * f, 1 + p, d)
    smask = add(ks, 1 + p) if space_mask is None else space_mask
    xs = (xs + _sa_by_hand(block.attn_space, block.norm_space(xs), zs, smask)).reshape(b, f, 1 + p, d)
    tokens = torch.cat([xs[:, :, 0].mean(1, keepdim=True), xs[:, :, 1:].reshape(b, f * p, d)], 1)
    tokens = tokens + block.mlp(block.norm_mlp(tokens))
    return tokens[:, :1], tokens[:, 1:].reshape(b, f, p, d)


def _video():
    torch.manual_seed(2)
    return (DividedSpaceTimeTransformer(3, frames=2, size=8, patch=4, d_model=16, nhead=2).eval(),
            torch.randn(3, 2, 1, 8, 8))


def test_value_zeroing_spacetime_equals_literal_loop():
    model, x = _video()
    with torch.no_grad():
        xe = model.embed(x)
        cls = model.cls_token.expand(3, -1, -1)
        expected = []
        for block in model.blocks:
            ref = torch.cat([t.flatten(1, -2) for t in _block_by_hand(block, cls, xe)], 1)     # [B, 9, D]
            c = torch.zeros(3, 9, 9)
            for j in range(9):
                out = torch.cat([t.flatten(1, -2) for t in _block_by_hand(block, cls, xe, j=j)], 1)
                c[:, :, j] = _distance(out, ref)
            expected.append(c / c.sum(-1, keepdim=True))
            cls, xe = block(cls, xe)
    maps = value_zeroing_maps(model, lambda: model(x), memory=20000)
    for got, want in zip(maps, expected):
        assert_close(got, want, atol=2e-5, rtol=1e-4)
    from attnlab.methods import get

    imp = get("value_zeroing").compute["spacetime"](_batch(model, x, "spacetime"))
    assert_close(imp[:, 1:], (expected[1] @ expected[0])[:, 0, 1:], atol=2e-5, rtol=1e-4)


def _batch(model, x, kind, how="cls", target=None):
    from attnlab.items import Batch, SequenceItems, SpaceTimeItems

    items = (SpaceTimeItems(8, patch=4, split=model.split_attentions) if kind == "spacetime"
             else SequenceItems(x.shape[1], how=how, token_ids=kind == "tokens"))
    with torch.no_grad():
        target = model(x).argmax(-1) if target is None else target
    return Batch(x=x, target=target, items=items, logits=lambda inputs: model(inputs), options=None, model=model)


# --------------------------------------------------------------------------- knockout
def test_block_edges_is_softmax_with_minus_inf():
    scores = torch.randn(2, 3, 5, 5)
    blocked = torch.rand(5, 5) < 0.4
    blocked.fill_diagonal_(False)
    assert_close(block_edges(scores.softmax(-1), blocked),
                 scores.masked_fill(blocked, float("-inf")).softmax(-1))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_knockout_equals_hand_masked_forward(pooling):
    model, x = _encoder(pooling), torch.randn(3, 5, 3)
    with torch.no_grad():
        logits = model(x)
        target = logits.argmax(-1)
        h = model.embed(x)
        if model.cls_token is not None:
            h = torch.cat([model.cls_token.expand(3, -1, -1), h], 1)
        h = model.position(h)
        n = h.shape[1]
        want = torch.zeros(3, n)
        for j in range(n):
            mask = torch.zeros(n, n)
            mask[:, j] = float("-inf")
            mask[j, j] = 0.0
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                out = model.forward_head(model.encoder(h, mask=mask))      # nn.MultiheadAttention, masked
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
            want[:, j] = logits.gather(1, target[:, None])[:, 0] - out.gather(1, target[:, None])[:, 0]
    got = knockout_importance(model, lambda: model(x), target)
    assert_close(got, want, atol=1e-5, rtol=1e-4)
    for memory in (1, 1 << 26):          # copies of the batch, one token per copy: 1, then all tokens at once
        assert_close(knockout_importance(model, lambda: model(x), target, run_rows=lambda idx: model(x[idx]),
                                         memory=memory), want, atol=1e-5, rtol=1e-4)
    from attnlab.methods import get

    assert_close(get("knockout")(_batch(model, x, "sequence", pooling, target)),
                 _normalised(want.clamp_min(0)[:, 1:] if pooling == "cls" else want.clamp_min(0)))


def _normalised(r):
    return r / r.sum(-1, keepdim=True).clamp_min(1e-12)


def test_knockout_causal_equals_hand_masked_forward():
    torch.manual_seed(3)
    lm = CausalTransformerLM(11, d_model=16, nhead=2, max_len=6, dim_feedforward=16).eval()
    tok = torch.randint(0, 11, (4, 6))
    pos = torch.tensor([5, 2, 4, 1])
    run = lambda: lm(tok)[torch.arange(4), pos]  # noqa: E731
    with torch.no_grad():
        base = run()
        target = base.argmax(-1)
        h = lm.embed(tok) + lm.position(torch.arange(6))
        causal = nn.Transformer.generate_square_subsequent_mask(6)
        want = torch.zeros(4, 6)
        for j in range(6):
            mask = causal.clone()
            mask[:, j] = float("-inf")
            mask[j, j] = 0.0
            mask = torch.minimum(mask, causal)
            out = lm.head(lm.encoder(h, mask=mask))[torch.arange(4), pos]
            want[:, j] = base.gather(1, target[:, None])[:, 0] - out.gather(1, target[:, None])[:, 0]
    assert_close(knockout_importance(lm, run, target), want, atol=1e-5, rtol=1e-4)
    # copies of the batch: each copy's rows read their own explained position
    run_rows = lambda idx: lm(tok[idx])[torch.arange(len(idx)), pos[idx]]  # noqa: E731
    assert_close(knockout_importance(lm, run, target, run_rows=run_rows), want, atol=1e-5, rtol=1e-4)
    assert (want[torch.arange(6)[None] > pos[:, None]] == 0).all()       # after the explained row: no effect


def test_explain_batch_runs_knockout_on_copies_only_through_forward_rows():
    """A forward reading per-row data (the explained position) gives the same knockout through
    ``forward_rows`` (copies of the batch at once) as one forward per token without it."""
    from attnlab.attribution import explain_batch
    from attnlab.items import SequenceItems

    torch.manual_seed(3)
    lm = CausalTransformerLM(11, d_model=16, nhead=2, max_len=6, dim_feedforward=16).eval()
    tok = torch.randint(0, 11, (4, 6))
    pos = torch.tensor([5, 2, 4, 1])
    forward = lambda m, xb: m(xb)[torch.arange(len(xb)), pos]  # noqa: E731
    calls = []

    def forward_rows(m, xb, idx):
        calls.append(len(idx))
        return m(xb)[torch.arange(len(xb)), pos[idx]]

    items = SequenceItems(6, how=pos, token_ids=True)
    looped, batch = explain_batch(["knockout"], lm, tok, items, None, forward=forward)
    assert batch.rows_logits is None                     # a custom forward alone: no copies
    copied, _ = explain_batch(["knockout"], lm, tok, items, None, forward=forward, forward_rows=forward_rows)
    assert calls == [4 * 6]                              # every token's copy of the batch in one forward
    assert_close(copied["knockout"], looped["knockout"], atol=1e-6, rtol=1e-5)


def test_knockout_spacetime_equals_hand_masked_forward():
    model, x = _video()
    with torch.no_grad():
        logits = model(x)
        target = logits.argmax(-1)
        want = torch.zeros(3, 8)
        for item in range(8):
            xe, cls = model.embed(x), model.cls_token.expand(3, -1, -1)
            for block in model.blocks:
                cls, xe = _block_by_hand(block, cls, xe, knock=1 + item)
            out = model.forward_head(model.norm(torch.cat([cls, xe.flatten(1, 2)], 1)))
            want[:, item] = logits.gather(1, target[:, None])[:, 0] - out.gather(1, target[:, None])[:, 0]
    assert_close(knockout_importance(model, lambda: model(x), target, spacetime=True), want, atol=1e-5, rtol=1e-4)
    for memory in (1, 1 << 26):
        assert_close(knockout_importance(model, lambda: model(x), target, spacetime=True, memory=memory,
                                         run_rows=lambda idx: model(x[idx])), want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- models it refuses
def test_value_zeroing_refuses_unknown_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, h):
            return self.attn(h, h, h)[0]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])

        def forward(self, h):
            return self.layers[0](h).mean(1)

    with pytest.raises(ValueError, match=r"'layers.0' \(Block\).*not a block it can re-run"):
        find_blocks(Net())
    bare = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="not inside an element of an nn.ModuleList"):
        find_blocks(_Holder(bare))


class _Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn


def test_registered_for_the_attention_item_kinds():
    from attnlab.methods import get

    for name in ("value_zeroing", "knockout"):
        m = get(name)
        assert set(m.items) == {"sequence", "tokens", "spacetime"}
        assert "reruns" in m.needs and "cost:" in m.summary


# --------------------------------------------------------------------------- the diagnostic
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_knockout_diagnostic_equals_literal_loop_over_samples(pooling):
    from attnlab.evaluate.knockout import (knockout_drops, knockout_table, knockout_units, random_items,
                                           top_items)

    model, x = _encoder(pooling, seed=4), torch.randn(4, 5, 3)
    with torch.no_grad():
        target = model(x).argmax(-1)
    importance = torch.rand(4, 5)
    top = top_items(importance, 2)
    rand = random_items(4, 5, 2, seed=1)
    run = lambda: model(x)  # noqa: E731
    units, base = knockout_units(model, run)
    assert [(u["layer"], u["head"]) for u in units] == [(0, "all"), (0, 0), (0, 1), (1, "all"), (1, 0), (1, 1)]
    got = {name: knockout_drops(model, run, target, items, units, rows=pooling, n_items=5, base=base)
           for name, items in (("top", top), ("rand", rand))}
    offset = 1 if pooling == "cls" else 0
    for name, items in (("top", top), ("rand", rand)):
        want = torch.zeros(len(units), 4)
        for s in range(4):                                  # one sample at a time
            with torch.no_grad():
                h = model.embed(x[s:s + 1])
                if model.cls_token is not None:
                    h = torch.cat([model.cls_token, h], 1)
                h = model.position(h)
                n = h.shape[1]
                ref = model.forward_head(model.encoder(h))[0, target[s]]
                for u, unit in enumerate(units):
                    mask = torch.zeros(2, n, n)             # [H, N, N] for a batch of one
                    rows = [0] if pooling == "cls" else list(range(n))
                    for head in ([0, 1] if unit["head"] == "all" else [unit["head"]]):
                        for r in rows:
                            for key in (items[s] + offset).tolist():
                                if key != r:
                                    mask[head, r, key] = float("-inf")
                    out = h
                    torch.backends.mha.set_fastpath_enabled(False)
                    try:
                        for layer_index, layer in enumerate(model.encoder.layers):
                            out = layer(out, src_mask=mask if layer_index == unit["layer"] else None)
                    finally:
                        torch.backends.mha.set_fastpath_enabled(True)
                    want[u, s] = ref - model.forward_head(out)[0, target[s]]
        assert_close(got[name], want, atol=1e-5, rtol=1e-4)
    table = knockout_table(units, got["top"], got["rand"], resamples=50)
    assert_close(torch.tensor(table["topk"].to_numpy()), got["top"].double().mean(1))
    assert_close(torch.tensor(table["random"].to_numpy()), got["rand"].double().mean(1))
    assert (table["topk_lo"] <= table["topk"]).all() and (table["topk"] <= table["topk_hi"]).all()


def test_knockout_diagnostic_per_sample_rows_and_random_items_respect_valid():
    from attnlab.evaluate.knockout import knockout_drops, knockout_units, random_items

    valid = torch.tensor([[True, True, False, False, False]] * 3)
    assert set(random_items(3, 5, 2, valid=valid, seed=0).flatten().tolist()) == {0, 1}
    torch.manual_seed(5)
    lm = CausalTransformerLM(11, d_model=16, nhead=2, max_len=6, dim_feedforward=16).eval()
    tok = torch.randint(0, 11, (3, 6))
    pos = torch.tensor([4, 2, 5])
    run = lambda: lm(tok)[torch.arange(3), pos]  # noqa: E731
    units, base = knockout_units(lm, run)
    target = base.argmax(-1)
    items = torch.tensor([[0, 1], [1, 2], [3, 0]])
    got = knockout_drops(lm, run, target, items, units, rows=pos, n_items=6, base=base)
    with torch.no_grad():
        h = lm.embed(tok) + lm.position(torch.arange(6))
        causal = nn.Transformer.generate_square_subsequent_mask(6)
        for u, unit in enumerate(units):
            mask = causal.repeat(3 * 2, 1, 1).reshape(3, 2, 6, 6)
            for s in range(3):
                for head in ([0, 1] if unit["head"] == "all" else [unit["head"]]):
                    for key in items[s].tolist():
                        if key != pos[s]:
                            mask[s, head, pos[s], key] = float("-inf")
            out = h
            for i, layer in enumerate(lm.encoder.layers):
                out = layer(out, src_mask=(mask if i == unit["layer"] else causal[None, None].expand(3, 2, 6, 6))
                            .reshape(6, 6, 6))
            want = base.gather(1, target[:, None])[:, 0] - lm.head(out)[torch.arange(3), pos].gather(
                1, target[:, None])[:, 0]
            assert_close(got[u], want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- Hugging Face BERT
def _bert_layer(layer, h, pad, zero=None):
    """A ``BertLayer`` in eval mode from its weights; ``pad [B, L]`` True at padding keys."""
    sa = layer.attention.self
    b, n, d = h.shape
    heads = sa.num_attention_heads
    split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(sa.query(h)), split(sa.key(h)), split(sa.value(h))
    if zero is not None:
        v = v.masked_fill(zero[:, None, :, None], 0.0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    att = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
    inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(att))
    return layer.output.LayerNorm(layer.output.dense(inter) + att)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_value_zeroing_hugging_face_bert_equals_literal_loop(impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertModel._from_config(cfg, attn_implementation=impl).eval()
    ids = torch.randint(0, 30, (3, 6))
    attention_mask = torch.ones(3, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0
    run = lambda: model(input_ids=ids, attention_mask=attention_mask).last_hidden_state[:, 0]  # noqa: E731
    pad = attention_mask == 0
    with torch.no_grad():
        h = model.embeddings(input_ids=ids)
        expected = []
        for layer in model.encoder.layer:
            ref = _bert_layer(layer, h, pad)
            c = torch.zeros(3, 6, 6)
            for j in range(6):
                zero = torch.zeros(3, 6, dtype=torch.bool)
                zero[:, j] = True
                c[:, :, j] = _distance(_bert_layer(layer, h, pad, zero), ref)
            expected.append(c / c.sum(-1, keepdim=True))
            h = ref
    for got, want in zip(value_zeroing_maps(model, run), expected):
        assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert_close(value_zeroing(model, run, "cls"), readout(expected[1] @ expected[0], "cls"), atol=2e-5, rtol=1e-4)
    # knockout: the same layers with -inf on the edges into token j (each query keeps its own)
    with torch.no_grad():
        base = run()
    target = base.argmax(-1)
    want = torch.zeros(3, 6)
    with torch.no_grad():
        for j in range(6):
            h = model.embeddings(input_ids=ids)
            blocked = torch.zeros(6, 6, dtype=torch.bool)
            blocked[:, j] = True
            blocked[j, j] = False
            for layer in model.encoder.layer:
                h = _bert_layer_masked(layer, h, pad, blocked)
            want[:, j] = base.gather(1, target[:, None])[:, 0] - h[:, 0].gather(1, target[:, None])[:, 0]
    assert_close(knockout_importance(model, run, target), want, atol=1e-5, rtol=1e-4)
    run_rows = lambda idx: model(input_ids=ids[idx], attention_mask=attention_mask[idx]).last_hidden_state[:, 0]  # noqa: E731
    assert_close(knockout_importance(model, run, target, run_rows=run_rows), want, atol=1e-5, rtol=1e-4)


def _bert_layer_masked(layer, h, pad, blocked):
    sa = layer.attention.self
    b, n, d = h.shape
    heads = sa.num_attention_heads
    split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(sa.query(h)), split(sa.key(h)), split(sa.value(h))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(pad[:, None, None, :], float("-inf"))
    scores = scores.masked_fill(blocked, float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    att = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
    inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(att))
    return layer.output.LayerNorm(layer.output.dense(inter) + att)


# --------------------------------------------------------------------------- the knob
def test_knockout_knob_resolves_and_checks_its_method():
    from attnlab.config import ConfigError, parse_params

    def knockout(explain, evaluate=None):
        section = {"explain": explain} | ({"evaluate": {"knockout": evaluate}} if evaluate is not None else {})
        return parse_params({"experiments": ["motion"], "motion": section}).motion.evaluate.knockout

    k = knockout({"methods": ["raw", "rollout"]})
    assert (k.method, k.k, k.samples) == ("rollout", 3, 32)
    assert knockout({"methods": ["raw", "received"]}).method == "raw"
    assert knockout({"methods": ["raw", "rollout"]}, {"method": "raw", "samples": 0}).samples == 0
    with pytest.raises(ConfigError, match=r"motion\.evaluate\.knockout\.method: 'flow' is not among "
                                          r"motion\.explain\.methods \(raw, rollout\)"):
        knockout({"methods": ["raw", "rollout"]}, {"method": "flow"})


def test_knockout_diagnostic_spacetime_blocks_the_class_copies_rows():
    from attnlab.evaluate.knockout import knockout_drops, knockout_units

    model, x = _video()
    run = lambda: model(x)  # noqa: E731
    units, base = knockout_units(model, run, spacetime=True)
    assert [(u["layer"], u["head"], u["call"]) for u in units] == [
        (0, "all", 1), (0, 0, 1), (0, 1, 1), (1, "all", 3), (1, 0, 3), (1, 1, 3)]
    target = base.argmax(-1)
    items = torch.tensor([[0, 5], [7, 3], [2, 6]])           # item f·P + p, F=2, P=4
    got = knockout_drops(model, run, target, items, units, rows=None, n_items=8, base=base, spacetime=True)
    with torch.no_grad():
        for u, unit in enumerate(units):
            mask = torch.zeros(3, 2, 2, 5, 5)                # [B, F, H, 1+P, 1+P]
            for s in range(3):
                for item in items[s].tolist():
                    f, p = divmod(item, 4)
                    for head in ([0, 1] if unit["head"] == "all" else [unit["head"]]):
                        mask[s, f, head, 0, 1 + p] = float("-inf")
            xe, cls = model.embed(x), model.cls_token.expand(3, -1, -1)
            for i, block in enumerate(model.blocks):
                cls, xe = _block_by_hand(block, cls, xe, space_mask=mask.reshape(6, 2, 5, 5)
                                         if i == unit["layer"] else None)
            out = model.forward_head(model.norm(torch.cat([cls, xe.flatten(1, 2)], 1)))
            want = base.gather(1, target[:, None])[:, 0] - out.gather(1, target[:, None])[:, 0]
            assert_close(got[u], want, atol=1e-5, rtol=1e-4)


def test_value_zeroing_sequence_first_layout_equals_batch_first():
    torch.manual_seed(7)
    first = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    seq = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=False), 2,
                                enable_nested_tensor=False).eval()
    seq.load_state_dict(first.state_dict())
    x = torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 3:] = True
    a = value_zeroing_maps(first, lambda: first(x, src_key_padding_mask=pad))
    b = value_zeroing_maps(seq, lambda: seq(x.transpose(0, 1), src_key_padding_mask=pad))
    for p, q in zip(a, b):
        assert_close(p, q)
    assert (a[0][2, :, 3:] == 0).all()                       # padded keys: zeroing them changes nothing
