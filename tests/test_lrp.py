"""AttnLRP (attnlab.explain.lrp, method ``attnlrp``) against independent references.

* each rule against a literal loop of its formula (not gradients);
* whole models (nn.TransformerEncoder classifiers: mean/cls pooling, post-/pre-norm,
  relu/gelu, batch_first or not; the causal LM with causal and padding masks; a tiny
  Hugging Face BERT with a linear head on [CLS]) against :class:`Tape`, a plain
  per-operation relevance propagation over the activations of a forward written here
  from the weights, in float64, with the rules as explicit formulas;
* conservation: without biases the input relevance plus the softmax deficits equals the
  explained logit; with biases, plus the biases' shares (both computed by the Tape).

``lxt`` (2.1, the authors' package) cannot be a test dependency: its BERT patch
(``lxt.efficient.models.bert``) imports ``transformers.modeling_attn_mask_utils`` and
``find_pruneable_heads_and_indices``, which transformers 5.x (we pin 5.24) no longer has,
and its requirements pull torchvision and bitsandbytes. So the Tape is the reference here;
where lxt is importable (``pip install --no-deps lxt==2.1``), the last test runs lxt's own
patched BERT, with small shims for the removed names, as the oracle.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import snapshot
from torch import nn

from attnlab.explain import lrp
from attnlab.explain.lrp import attnlrp
from attnlab.models.causal import CausalTransformerLM
from attnlab.models.encoder import EncoderClassifier

EPS = 1e-6


def stab(z, eps=EPS):
    return z + eps * (1.0 if z >= 0 else -1.0)


def grad_x_input(fn, *inputs, r_out):
    """Relevance at ``inputs`` of ``y = fn(*inputs)`` given the output relevance ``r_out``
    (gradient x input: the output's gradient is ``r_out / y``)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, r_out / y.detach())
    return [leaf.detach() * g for leaf, g in zip(leaves, grads)]


# ============================================================================ one rule each
def test_epsilon_rule_on_a_linear_layer_is_the_literal_formula():
    torch.manual_seed(0)
    x, w, b, r = torch.randn(5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), \
        torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    z = w @ x + b
    want = torch.zeros(5, dtype=torch.float64)
    for i in range(5):
        for j in range(3):
            want[i] += x[i] * w[j, i] * r[j] / stab(float(z[j]))
    (got,) = grad_x_input(lambda t: lrp.linear(t, w, b, EPS), x, r_out=r)
    torch.testing.assert_close(got, want)
    # the bias keeps Σ_j b_j R_j / stab(z_j): what the input does not get
    bias_share = sum(float(b[j] * r[j] / stab(float(z[j]))) for j in range(3))
    assert float(got.sum()) + bias_share == pytest.approx(float(r.sum()), abs=1e-5)


def test_identity_rule_passes_relevance_unchanged():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64) + 0.05
    r = torch.cos(x)
    for fn in (F.gelu, F.relu, F.silu):
        y = fn(x)
        keep = y.abs() > 1e-12           # relevance of a zero output is 0/0: not defined
        (got,) = grad_x_input(lambda t: lrp.identity_rule(fn, t), x, r_out=r)
        torch.testing.assert_close(got[keep], r[keep])


def test_softmax_rule_is_the_papers_formula_and_does_not_conserve():
    torch.manual_seed(1)
    x, r = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    s = torch.softmax(x, 0)
    want = torch.zeros(6, dtype=torch.float64)
    for i in range(6):
        want[i] = x[i] * (r[i] - s[i] * sum(r[j] for j in range(6)))
    (got,) = grad_x_input(lambda t: lrp.softmax(t, 0), x, r_out=r)
    torch.testing.assert_close(got, want)
    # the deficit is the linearisation's bias term: Σ R − Σ (x − Σ s x) R
    xbar = float((s * x).sum())
    assert float(r.sum() - got.sum()) == pytest.approx(float(r.sum() - ((x - xbar) * r).sum()))
    assert abs(float(r.sum() - got.sum())) > 1e-3


def test_uniform_rule_on_a_matmul_gives_half_to_each_operand():
    torch.manual_seed(2)
    a, v, r = (torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
               torch.randn(3, 2, dtype=torch.float64))
    o = a @ v
    want_a, want_v = torch.zeros_like(a), torch.zeros_like(v)
    for i in range(3):
        for k in range(4):
            for j in range(2):
                share = a[i, k] * v[k, j] * r[i, j] / (2 * stab(float(o[i, j])))
                want_a[i, k] += share
                want_v[k, j] += share
    got_a, got_v = grad_x_input(lambda p, q: lrp.matmul(p, q, EPS), a, v, r_out=r)
    torch.testing.assert_close(got_a, want_a)
    torch.testing.assert_close(got_v, want_v)
    assert float(got_a.sum() + got_v.sum()) == pytest.approx(float(r.sum()), rel=1e-4)
    # element-wise products likewise: R_a = R_b = R / 2 (up to ε)
    got_a, got_b = grad_x_input(lambda p, q: lrp.product(p, q, EPS), a, a.exp(), r_out=a.cos())
    torch.testing.assert_close(got_a, a.cos() / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_b, a.cos() / 2, atol=1e-5, rtol=0)


def test_epsilon_rule_on_an_addition():
    a, b, r = (torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64),
               torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64))
    want_a = torch.stack([a[i] * r[i] / stab(float(a[i] + b[i])) for i in range(3)])
    got_a, got_b = grad_x_input(lambda p, q: lrp.add(p, q, EPS), a, b, r_out=r)
    torch.testing.assert_close(got_a, want_a)
    torch.testing.assert_close(got_a + got_b, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_rule_is_the_epsilon_rule_of_the_normalisation_with_a_constant_std(bias):
    torch.manual_seed(3)
    d = 5
    x, w = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64) if bias else None
    r = torch.randn(d, dtype=torch.float64)
    sigma = math.sqrt(float(x.var(unbiased=False)) + 1e-5)
    y = F.layer_norm(x, (d,), w, b, 1e-5)
    want = torch.zeros(d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            m_ji = w[j] / sigma * ((1.0 if i == j else 0.0) - 1.0 / d)     # y_j = Σ_i m_ji x_i (+ b_j)
            want[i] += x[i] * m_ji * r[j] / stab(float(y[j]))
    (got,) = grad_x_input(lambda t: lrp.layer_norm(t, (d,), w, b, 1e-5, EPS), x, r_out=r)
    torch.testing.assert_close(got, want)
    if not bias:     # conserves (up to ε)
        assert float(got.sum()) == pytest.approx(float(r.sum()), abs=1e-5)


# ============================================================================ the Tape reference
class Tape:
    """A forward written from the weights (float64) that records every operation, and a
    relevance propagation that walks the record backwards applying each rule's formula.

    ``absorbed`` sums, per kind, the relevance the rules do not pass down: ``bias`` (the
    share of every bias), ``softmax`` (the softmax linearisation's bias term) and
    ``eps`` (what the stabilisers keep)."""

    def __init__(self, eps: float = EPS):
        self.ops, self.eps = [], eps

    def st(self, z):
        return z + self.eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)

    def _rec(self, kind, out, *args):
        self.ops.append((kind, out, args))
        return out

    # ---- forward operations
    def linear(self, x, w, b):
        w = w.detach().double()
        b = None if b is None else b.detach().double()
        return self._rec("linear", x @ w.T + (0 if b is None else b), x, w, b)

    def add(self, a, b):
        return self._rec("add", a + b, a, b)

    def act(self, fn, x):
        return self._rec("act", fn(x), x)

    def layer_norm(self, x, ln):
        d = x.shape[-1]
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
        w = ln.weight.detach().double() if ln.weight is not None else torch.ones(d, dtype=x.dtype)
        b = ln.bias.detach().double() if ln.bias is not None else None
        y = (x - x.mean(-1, keepdim=True)) / sigma * w + (0 if b is None else b)
        return self._rec("ln", y, x, sigma, w, b)

    def heads(self, x, h):          # [B, L, H·hd] -> [B, H, L, hd]
        b, length, d = x.shape
        return self._rec("view", x.reshape(b, length, h, d // h).transpose(1, 2), x)

    def merge(self, x):             # [B, H, L, hd] -> [B, L, H·hd]
        b, h, length, hd = x.shape
        return self._rec("view", x.transpose(1, 2).reshape(b, length, h * hd), x)

    def matmul(self, a, b):
        return self._rec("matmul", a @ b, a, b)

    def scale(self, x, c):
        return self._rec("scale", x * c, x)

    def softmax(self, x, masked):
        return self._rec("softmax", torch.softmax(x.masked_fill(masked, float("-inf")), -1), x, masked)

    def pool_mean(self, h, keep):   # h [B, T, D], keep [B, T] -> [B, D]
        keep = keep.double()
        return self._rec("mean", (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True), h, keep)

    def linmap(self, fn, *xs):
        """``fn(*xs)``: a bias-free linear map (reshape, concatenation, copies, means)."""
        return self._rec("linmap", fn(*xs), fn, *xs)

    def select(self, h, rows):      # h [B, T, D] -> h[b, rows[b]]
        return self._rec("select", h[torch.arange(len(h)), rows], h, rows)

    # ---- relevance propagation
    def propagate(self, out, r_out, leaf):
        rel = {id(out): r_out}
        absorbed = {"bias": 0.0, "softmax": 0.0, "eps": 0.0}
        n = len(r_out)

        def per_sample(t):          # leading dims are sample-major (B, or B·P, B·F)
            return t.reshape(n, -1).sum(1)

        def give(t, r):
            rel[id(t)] = rel[id(t)] + r if id(t) in rel else r

        for kind, y, args in reversed(self.ops):
            if id(y) not in rel:
                continue
            r = rel.pop(id(y))
            total = per_sample(r)
            if kind == "linear":                    # R_i = Σ_j x_i w_ji R_j / stab(z_j)
                x, w, b = args
                z = r / self.st(y)
                give(x, x * (z @ w))
                if b is not None:
                    absorbed["bias"] = absorbed["bias"] + per_sample(b * z)
                absorbed["eps"] = absorbed["eps"] + total - per_sample(y * z)
            elif kind == "add":
                a, b2 = args
                z = r / self.st(y)
                give(a, a * z)
                give(b2, b2 * z)
                absorbed["eps"] = absorbed["eps"] + total - per_sample(y * z)
            elif kind == "act":                     # identity rule
                give(args[0], r)
            elif kind == "ln":                      # y_j = Σ_i M_ji x_i + b_j, M = diag(w/σ)(I − 11ᵀ/D)
                x, sigma, w, b = args
                d = x.shape[-1]
                centre = torch.eye(d, dtype=x.dtype) - 1.0 / d
                m = (w[:, None] * centre) / sigma[..., None]            # [..., D(j), D(i)]
                z = r / self.st(y)
                give(x, x * torch.einsum("...ji,...j->...i", m, z))
                if b is not None:
                    absorbed["bias"] = absorbed["bias"] + per_sample(b * z)
                absorbed["eps"] = absorbed["eps"] + total - per_sample(y * z)
            elif kind == "view":
                x = args[0]
                give(x, r.transpose(1, 2).reshape(x.shape) if r.dim() == 4 else
                     r.reshape(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2))
            elif kind == "matmul":                  # uniform: R_a,ik = Σ_j a_ik b_kj R_ij / (2 stab(O_ij))
                a, b2 = args
                z = r / (2 * self.st(y))
                give(a, a * (z @ b2.transpose(-1, -2)))
                give(b2, b2 * (a.transpose(-1, -2) @ z))
                absorbed["eps"] = absorbed["eps"] + total - 2 * per_sample(y * z)
            elif kind == "scale":
                give(args[0], r)
            elif kind == "kt":
                give(args[0], r.transpose(-1, -2))
            elif kind == "softmax":                 # R_x,i = x_i (R_i − s_i Σ_j R_j), 0 where masked
                x, masked = args
                rx = (x * (r - y * r.sum(-1, keepdim=True))).masked_fill(masked, 0.0)
                give(x, rx)
                absorbed["softmax"] = absorbed["softmax"] + total - per_sample(rx)
            elif kind == "mean":
                h, keep = args
                give(h, h * keep[..., None] / keep.sum(1)[:, None, None] * (r / y)[:, None, :])
            elif kind == "linmap":                  # ε-rule (ε = 0) of y = M x: R_x = x ⊙ Mᵀ (R / y)
                fn, *xs = args
                _, transpose = torch.func.vjp(fn, *xs)       # Mᵀ of the linear map, by autograd
                for x, mt in zip(xs, transpose(torch.where(y == 0, 0.0, r / y))):
                    give(x, x * mt)
            elif kind == "select":
                h, rows = args
                full = torch.zeros_like(h)
                full[torch.arange(len(h)), rows] = r
                give(h, full)
        return rel[id(leaf)], absorbed

    # ---- blocks
    def attention(self, q, k, v, h, masked_bll):
        hd = q.shape[-1] // h
        q, k, v = self.heads(q, h), self.heads(k, h), self.heads(v, h)
        kt = self._rec("kt", k.transpose(-1, -2), k)
        scores = self.scale(self.matmul(q, kt), 1.0 / math.sqrt(hd))
        return self.merge(self.matmul(self.softmax(scores, masked_bll[:, None]), v))

    def encoder_layer(self, layer, x, masked_bll):
        mha = layer.self_attn
        d = x.shape[-1]
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        act = {F.relu: F.relu, F.gelu: F.gelu}[layer.activation]

        def sa(t):
            o = self.attention(self.linear(t, wq, bq), self.linear(t, wk, bk), self.linear(t, wv, bv),
                               mha.num_heads, masked_bll)
            return self.linear(o, mha.out_proj.weight, mha.out_proj.bias)

        def ff(t):
            return self.linear(self.act(act, self.linear(t, layer.linear1.weight, layer.linear1.bias)),
                               layer.linear2.weight, layer.linear2.bias)
        assert d == mha.embed_dim
        if layer.norm_first:
            x = self.add(x, sa(self.layer_norm(x, layer.norm1)))
            return self.add(x, ff(self.layer_norm(x, layer.norm2)))
        x = self.layer_norm(self.add(x, sa(x)), layer.norm1)
        return self.layer_norm(self.add(x, ff(x)), layer.norm2)

    def self_attention(self, att, x):           # attnlab.models.spacetime.SelfAttention
        wq, wk, wv = att.qkv.weight.chunk(3)
        bq, bk, bv = att.qkv.bias.chunk(3)
        o = self.attention(self.linear(x, wq, bq), self.linear(x, wk, bk), self.linear(x, wv, bv), att.nhead,
                           torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool))
        return self.linear(o, att.proj.weight, att.proj.bias)

    def divided_block(self, block, cls, x):
        b, f, p, d = x.shape
        xt = self.linmap(lambda t: t.transpose(1, 2).reshape(b * p, f, d), x)
        xt = self.add(xt, self.self_attention(block.attn_time, self.layer_norm(xt, block.norm_time)))
        xs = self.linmap(lambda c, t: torch.cat([c.unsqueeze(1).expand(b, f, 1, d),
                                                 t.reshape(b, p, f, d).transpose(1, 2)], 2).reshape(b * f, 1 + p, d),
                         cls, xt)
        xs = self.add(xs, self.self_attention(block.attn_space, self.layer_norm(xs, block.norm_space)))
        tokens = self.linmap(lambda t: torch.cat([t.reshape(b, f, 1 + p, d)[:, :, 0].mean(1, keepdim=True),
                                                  t.reshape(b, f, 1 + p, d)[:, :, 1:].reshape(b, f * p, d)], 1), xs)
        m = self.act(F.gelu, self.linear(self.layer_norm(tokens, block.norm_mlp), block.mlp.fc1.weight,
                                         block.mlp.fc1.bias))
        tokens = self.add(tokens, self.linear(m, block.mlp.fc2.weight, block.mlp.fc2.bias))
        return (self.linmap(lambda t: t[:, :1], tokens),
                self.linmap(lambda t: t[:, 1:].reshape(b, f, p, d), tokens))

    def bert_layer(self, layer, x, masked_bll):
        att, out1 = layer.attention.self, layer.attention.output
        ctx = self.attention(self.linear(x, att.query.weight, att.query.bias),
                             self.linear(x, att.key.weight, att.key.bias),
                             self.linear(x, att.value.weight, att.value.bias), att.num_attention_heads, masked_bll)
        a = self.layer_norm(self.add(self.linear(ctx, out1.dense.weight, out1.dense.bias), x), out1.LayerNorm)
        m = self.act(F.gelu, self.linear(a, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
        m = self.linear(m, layer.output.dense.weight, layer.output.dense.bias)
        return self.layer_norm(self.add(m, a), layer.output.LayerNorm)


# ============================================================================ whole models
def _explained(logits, target):
    """The output relevance: the explained logit of each row, 0 elsewhere ``[B, C]``."""
    onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return logits * onehot


def _causal_masked(masked_key_bl, causal):
    """``[B, L, L]``: True where query i may not attend key j."""
    length = masked_key_bl.shape[1]
    masked = masked_key_bl[:, None, :].expand(-1, length, -1).clone()
    if causal:
        masked |= torch.ones(length, length, dtype=torch.bool).triu(1)
    return masked


def tape_encoder(encoder, h0_bld, masked_bll, eps=EPS):
    """Tape forward of an nn.TransformerEncoder's layers (and final norm) on batch-first ``h0``."""
    tape = Tape(eps)
    x = h0_bld.detach().double()
    encoder = copy.deepcopy(encoder).requires_grad_(False)
    h = x
    for layer in encoder.layers:
        h = tape.encoder_layer(layer, h, masked_bll)
    if encoder.norm is not None:
        h = tape.layer_norm(h, encoder.norm)
    return tape, x, h


def reference_classifier(model: EncoderClassifier, x, padding, target, eps=EPS):
    """The Tape's ``(R [B, N, D], absorbed, logits)`` of an :class:`EncoderClassifier`."""
    with torch.no_grad():
        h0 = model.embed(x)
        if model.cls_token is not None:
            h0 = torch.cat([model.cls_token.expand(len(h0), -1, -1), h0], 1)
            padding = torch.cat([padding.new_zeros(len(h0), 1), padding], 1)
        if model.position is not None:
            h0 = model.position(h0)
    tape, leaf, h = tape_encoder(model.encoder, h0, _causal_masked(padding, False), eps)
    pooled = tape.select(h, torch.zeros(len(h), dtype=torch.long)) if model.cls_token is not None \
        else tape.pool_mean(h, ~padding)
    logits = tape.linear(pooled, model.head.weight, model.head.bias)
    rel, absorbed = tape.propagate(logits, _explained(logits, target), leaf)
    return rel, absorbed, logits


@pytest.mark.parametrize("pooling,norm_first,positional", [("mean", False, False), ("cls", False, True),
                                                           ("mean", True, True), ("cls", True, False)])
def test_encoder_classifier_equals_the_tape(pooling, norm_first, positional):
    torch.manual_seed(4)
    model = EncoderClassifier(5, 3, d_model=8, nhead=2, num_layers=2, dim_feedforward=12, pooling=pooling,
                              norm_first=norm_first, positional=positional).eval()
    x = torch.randn(3, 6, 5)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    target = torch.tensor([0, 2, 1])
    before = snapshot(model), copy.deepcopy(model.state_dict())
    rel = attnlrp(model, lambda: model(x, padding), target)
    want, _, logits = reference_classifier(model, x, padding, target)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits.float(), model(x, padding), atol=1e-5, rtol=1e-5)   # the Tape's forward is right
    assert snapshot(model) == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())


def test_gelu_layers_and_the_model_left_as_it_was():
    torch.manual_seed(5)
    model = EncoderClassifier(4, 2, d_model=8, nhead=2, dim_feedforward=8, pooling="cls")
    for layer in model.encoder.layers:      # gelu instead of relu
        layer.activation = F.gelu
        layer.activation_relu_or_gelu = 2
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 5, 4)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    target = torch.tensor([1, 0])
    with torch.no_grad():                   # the method turns gradients on itself
        rel = attnlrp(model, lambda: model(x, padding), target)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    want, _, _ = reference_classifier(model, x, padding, target)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


def test_causal_lm_with_causal_and_padding_masks_equals_the_tape():
    torch.manual_seed(6)
    model = CausalTransformerLM(11, d_model=8, nhead=2, num_layers=2, dim_feedforward=12, norm_first=True).eval()
    tokens = torch.randint(0, 11, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    position = torch.tensor([5, 2, 3])
    target = torch.tensor([4, 7, 1])
    rel = attnlrp(model, lambda: model(tokens, mask)[torch.arange(3), position], target)
    with torch.no_grad():
        h0 = model.embed(tokens) + model.position(torch.arange(6))
    tape, leaf, h = tape_encoder(model.encoder, h0, _causal_masked(~mask, True))
    logits = tape.linear(tape.select(h, position), model.head.weight, model.head.bias)
    want, _ = tape.propagate(logits, _explained(logits, target), leaf)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)
    later = torch.arange(6)[None, :] > position[:, None]
    assert bool((rel.sum(-1)[later] == 0).all())            # causal: nothing after the explained position


def test_a_users_batch_first_false_model_equals_the_tape():
    namespace: dict = {}
    from user_models import CLIP_MODEL
    exec(compile(CLIP_MODEL, "user_model.py", "exec"), namespace)
    torch.manual_seed(7)
    model = namespace["make_model"]().eval()
    clips = torch.randn(2, 4, 1, 6, 6)
    target = torch.tensor([2, 0])
    rel = attnlrp(model, lambda: model(clips), target)                      # batch-first [B, T, D]
    with torch.no_grad():
        h0 = model.embed(clips)
    tape, leaf, h = tape_encoder(model.encoder, h0, torch.zeros(2, 4, 4, dtype=torch.bool))
    logits = tape.linear(tape.pool_mean(h, torch.ones(2, 4, dtype=torch.bool)), model.head.weight, model.head.bias)
    want, _ = tape.propagate(logits, _explained(logits, target), leaf)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_on_its_own_equals_the_tape(batch_first):
    class Net(nn.Module):                       # as tests/test_external_kind.py's user model, with padding
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.head = nn.Linear(8, 3)

        def forward(self, x, padding):
            h = self.proj(x) if batch_first else self.proj(x).transpose(0, 1)
            out = self.attn(h, h, h, key_padding_mask=padding)[0]
            return self.head((out if batch_first else out.transpose(0, 1)).mean(1))

    torch.manual_seed(14)
    model = Net().eval()
    x, target = torch.randn(3, 5, 4), torch.tensor([0, 1, 2])
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[2, 3:] = True
    rel = attnlrp(model, lambda: model(x, padding), target)
    with torch.no_grad():
        h0 = model.proj(x)
    tape = Tape()
    leaf = h0.double()
    mha = model.attn
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    o = tape.attention(tape.linear(leaf, wq, bq), tape.linear(leaf, wk, bk), tape.linear(leaf, wv, bv), 2,
                       _causal_masked(padding, False))
    o = tape.linear(o, mha.out_proj.weight, mha.out_proj.bias)
    logits = tape.linear(tape.pool_mean(o, torch.ones(3, 5, dtype=torch.bool)), model.head.weight, model.head.bias)
    torch.testing.assert_close(logits.float(), model(x, padding), atol=1e-5, rtol=1e-5)
    want, _ = tape.propagate(logits, _explained(logits, target), leaf)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


def test_an_encoder_with_nested_tensors_enabled_and_padding_equals_the_tape():
    class Tagger(nn.Module):                    # torch's default enable_nested_tensor=True, a padding mask
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 8)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                                 num_layers=2)
            self.head = nn.Linear(8, 2)

        def forward(self, ids):
            return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0)[:, 0])

    torch.manual_seed(15)
    model = Tagger().eval()
    ids = torch.tensor([[2, 3, 4, 0], [2, 6, 0, 0], [5, 2, 3, 1]])
    target = torch.tensor([0, 1, 1])
    rel = attnlrp(model, lambda: model(ids), target)
    with torch.no_grad():
        h0 = model.embed(ids)
    tape, leaf, h = tape_encoder(model.encoder, h0, _causal_masked(ids == 0, False))
    logits = tape.linear(tape.select(h, torch.zeros(3, dtype=torch.long)), model.head.weight, model.head.bias)
    want, _ = tape.propagate(logits, _explained(logits, target), leaf)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


# ============================================================================ conservation
class Plain(nn.Module):
    """Linear embed -> nn.TransformerEncoder -> mean -> Linear, every bias on or off."""

    def __init__(self, bias: bool, d=8, activation="relu"):
        super().__init__()
        self.embed = nn.Linear(3, d, bias=bias)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True, bias=bias, activation=activation)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4, bias=bias)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _plain_reference(model, x, target):
    with torch.no_grad():
        h0 = model.embed(x)
    tape, leaf, h = tape_encoder(model.encoder, h0, torch.zeros(len(x), x.shape[1], x.shape[1], dtype=torch.bool))
    logits = tape.linear(tape.pool_mean(h, torch.ones(len(x), x.shape[1], dtype=torch.bool)),
                         model.head.weight, model.head.bias)
    rel, absorbed = tape.propagate(logits, _explained(logits, target), leaf)
    return rel, absorbed, logits.gather(1, target[:, None]).squeeze(1)


def test_conservation_without_biases():
    """Without biases every rule but the softmax conserves: Σ R_input = logit − Σ softmax
    deficits (tolerance 1e-4 absolute; the ε terms are below 1e-5)."""
    torch.manual_seed(8)
    model = Plain(bias=False).eval()
    x, target = torch.randn(4, 5, 3), torch.tensor([0, 1, 2, 3])
    rel = attnlrp(model, lambda: model(x), target)
    want, absorbed, logit = _plain_reference(model, x, target)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)
    assert absorbed["bias"] == 0.0                             # no bias was met
    assert float(absorbed["eps"].abs().max()) < 1e-5
    torch.testing.assert_close(rel.double().sum((1, 2)) + absorbed["softmax"], logit, atol=1e-4, rtol=0)
    assert float(absorbed["softmax"].abs().max()) > 1e-3       # the softmax rule does not conserve


def test_bias_deviation_is_the_biases_share_and_vanishes_with_zero_biases():
    torch.manual_seed(9)
    model = Plain(bias=True, activation="gelu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    x, target = torch.randn(4, 5, 3), torch.tensor([3, 2, 1, 0])
    rel = attnlrp(model, lambda: model(x), target)
    want, absorbed, logit = _plain_reference(model, x, target)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)
    total = rel.double().sum((1, 2))
    torch.testing.assert_close(total + absorbed["softmax"] + absorbed["bias"], logit, atol=1e-4, rtol=0)
    assert float(absorbed["bias"].abs().max()) > 1e-2          # the biases do take a share
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in zeroed.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    rel0 = attnlrp(zeroed, lambda: zeroed(x), target)
    _, absorbed0, logit0 = _plain_reference(zeroed, x, target)
    assert float(absorbed0["bias"].abs().max()) == 0.0
    torch.testing.assert_close(rel0.double().sum((1, 2)) + absorbed0["softmax"], logit0, atol=1e-4, rtol=0)


# ============================================================================ BERT
def tiny_bert_classifier():
    transformers = pytest.importorskip("transformers")
    from attnlab.models.pretrained import PretrainedClassifier

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, hidden_act="gelu")
    torch.manual_seed(10)
    model = PretrainedClassifier.__new__(PretrainedClassifier)     # its __init__ loads MiniLM's weights
    nn.Module.__init__(model)
    model.pooling = "cls"
    model.encoder = transformers.BertModel._from_config(cfg, attn_implementation="sdpa").eval()
    model.head = nn.Linear(16, 3)
    return model.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_bert_with_a_head_on_cls_equals_the_tape(padded):
    model = tiny_bert_classifier()
    ids = torch.randint(1, 40, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    if padded:
        mask[0, 5:] = False
        mask[2, 3:] = False
    target = torch.tensor([0, 1, 2])
    before = snapshot(model)
    rel = attnlrp(model, lambda: model(ids, mask), target)
    assert snapshot(model) == before
    with torch.no_grad():
        h0 = model.encoder.embeddings(input_ids=ids)
    tape = Tape()
    leaf = h = h0.double()
    masked = _causal_masked(~mask, False)
    for layer in model.encoder.encoder.layer:
        h = tape.bert_layer(layer, h, masked)
    logits = tape.linear(tape.select(h, torch.zeros(3, dtype=torch.long)), model.head.weight, model.head.bias)
    torch.testing.assert_close(logits.float(), model(ids, mask), atol=1e-5, rtol=1e-5)
    want, _ = tape.propagate(logits, _explained(logits, target), leaf)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


# ============================================================================ refusals and the method
def test_refuses_modules_without_a_rule_naming_them():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = Plain(bias=True)
            self.soft = nn.Softplus()

        def forward(self, x):
            return self.soft(self.plain(x))

    x, target = torch.randn(2, 4, 3), torch.tensor([0, 1])
    model = Head().eval()
    with pytest.raises(ValueError, match=r"module soft \(Softplus\)"):
        attnlrp(model, lambda: model(x), target)
    with pytest.raises(ValueError, match="no transformer block"):
        mlp = nn.Sequential(nn.Linear(3, 2))
        attnlrp(mlp, lambda: mlp(x).mean(1), target)
    seq2seq = nn.Transformer(8, 2, 1, 1, 16, batch_first=True)
    with pytest.raises(ValueError, match=r"decoder\.layers\.0 \(TransformerDecoderLayer\)"):
        attnlrp(seq2seq, lambda: seq2seq(torch.randn(2, 3, 8), torch.randn(2, 3, 8))[:, 0], target)
    odd = Plain(bias=True)
    for layer in odd.encoder.layers:
        layer.activation = F.elu
    with pytest.raises(ValueError, match=r"encoder\.layers\.0 .*activation"):
        attnlrp(odd, lambda: odd(x), target)

    class Shifted(nn.TransformerEncoderLayer):      # a forward the rules do not reproduce
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) + 1.0

    shifted = Plain(bias=True).eval()
    shifted.encoder.layers[0] = Shifted(8, 2, 16, dropout=0.0, batch_first=True)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0 \(Shifted\) differs"):
        attnlrp(shifted, lambda: shifted(x), target)
    # no hooks left behind after the errors, and gradients back on
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0
               for net in (model, odd, shifted) for m in net.modules())
    assert torch.is_grad_enabled()


def test_registered_method_on_a_class_token_model():
    from attnlab.attribution import attention_importance
    from attnlab.methods import check_experiment, get

    torch.manual_seed(11)
    model = EncoderClassifier(4, 3, d_model=8, nhead=2, dim_feedforward=8, pooling="cls").eval()
    x = torch.randn(5, 6, 4)
    imp, target = attention_importance(model, x, n_items=6, methods=["attnlrp"], how="cls")
    got = imp["attnlrp"]
    assert got.shape == (5, 6) and bool((got >= 0).all())
    torch.testing.assert_close(got.sum(1), torch.ones(5))
    want, _, _ = reference_classifier(model, x, torch.zeros(5, 6, dtype=torch.bool), target)
    items = want.sum(-1)[:, 1:].clamp_min(0)                 # class-token column dropped, negatives clamped
    torch.testing.assert_close(got.double(), items / items.sum(1, keepdim=True), atol=1e-4, rtol=1e-3)
    assert get("attnlrp").needs == {"reruns", "module"}
    assert set(get("attnlrp").items) == {"sequence", "tokens", "spacetime"}
    assert check_experiment(["attnlrp"], "video") == ["attnlrp"]


def test_divided_spacetime_model_equals_the_tape():
    from attnlab.models.spacetime import DividedSpaceTimeTransformer

    torch.manual_seed(12)
    model = DividedSpaceTimeTransformer(3, frames=3, size=8, patch=4, d_model=8, nhead=2, num_layers=2).eval()
    clips, target = torch.randn(2, 3, 1, 8, 8), torch.tensor([2, 0])
    rel = attnlrp(model, lambda: model(clips), target)                      # [B, F, P, D]
    with torch.no_grad():
        x0 = model.embed(clips)
    tape = Tape()
    leaf = x = x0.double()
    cls = model.cls_token.detach().double().expand(2, -1, -1)
    for block in model.blocks:
        cls, x = tape.divided_block(block, cls, x)
    tokens = tape.layer_norm(tape.linmap(lambda c, t: torch.cat([c, t.flatten(1, 2)], 1), cls, x), model.norm)
    logits = tape.linear(tape.select(tokens, torch.zeros(2, dtype=torch.long)), model.head.weight, model.head.bias)
    torch.testing.assert_close(logits.float(), model(clips), atol=1e-5, rtol=1e-5)
    want, _ = tape.propagate(logits, _explained(logits, target), leaf)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


def test_frames_model_equals_the_tape():
    from attnlab.models.frames import frames_classifier

    torch.manual_seed(13)
    model = frames_classifier(3, d_model=8, nhead=2, dim_feedforward=8).eval()
    clips, target = torch.randn(2, 5, 1, 8, 8), torch.tensor([1, 2])
    padding = torch.zeros(2, 5, dtype=torch.bool)
    rel = attnlrp(model, lambda: model(clips, padding), target)            # the CNN is before the relevance point
    want, _, _ = reference_classifier(model, clips, padding, target)
    torch.testing.assert_close(rel.double(), want, atol=2e-5, rtol=1e-4)


def test_refuses_a_video_model_without_rules():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.TimesformerConfig(image_size=8, patch_size=4, num_channels=1, num_frames=2, hidden_size=8,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = transformers.TimesformerModel(cfg).eval()
    clips = torch.randn(1, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="TimesformerModel has no transformer block"):
        attnlrp(model, lambda: model(clips).last_hidden_state[:, 0], torch.tensor([0]))


# ============================================================================ lxt, where it can run
LXT_ORACLE = r'''
import sys, types, torch
from torch import nn
import transformers, transformers.pytorch_utils as pu, transformers.utils as tu
# lxt 2.1's BERT patch was written for transformers 4.x: give it the names 5.x removed
shim = types.ModuleType("transformers.modeling_attn_mask_utils")
def prepare(mask, dtype, tgt_len=None):          # [B, S] (1 = real) -> additive [B, 1, L, S]
    keep = mask[:, None, None, :].to(dtype).expand(mask.shape[0], 1, tgt_len or mask.shape[1], mask.shape[1])
    return (1.0 - keep).masked_fill((1.0 - keep).bool(), torch.finfo(dtype).min)
shim._prepare_4d_attention_mask_for_sdpa = prepare
shim._prepare_4d_causal_attention_mask_for_sdpa = lambda *a, **k: None
sys.modules[shim.__name__] = shim
pu.find_pruneable_heads_and_indices = lambda *a, **k: None
for name in ("add_code_sample_docstrings", "add_start_docstrings", "add_start_docstrings_to_model_forward",
             "replace_return_docstrings"):
    if not hasattr(tu, name):
        setattr(tu, name, lambda *a, **k: (lambda f: f))
if not hasattr(tu, "get_torch_version"):
    tu.get_torch_version = lambda: torch.__version__
try:
    import torchvision  # noqa: F401
except ImportError:                               # lxt imports its ViT patch unconditionally
    vt = types.ModuleType("torchvision.models.vision_transformer")
    vt.nn, vt.F = nn, nn.functional
    tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    tvm.vision_transformer, tv.models = vt, tvm
    sys.modules.update({"torchvision": tv, "torchvision.models": tvm, "torchvision.models.vision_transformer": vt})
import transformers.models.bert.modeling_bert as mb
from attnlab.explain.lrp import attnlrp

class Clf(nn.Module):
    def __init__(self, enc, head):
        super().__init__()
        self.encoder, self.head = enc, head
    def forward(self, ids, mask):
        return self.head(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])

torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=32, hidden_act="gelu")
ours = transformers.BertModel._from_config(cfg, attn_implementation="sdpa").eval()
with torch.no_grad():
    for p in ours.parameters():
        p.add_(0.05 * torch.randn_like(p))
head = nn.Linear(32, 3)
ids = torch.randint(1, 50, (4, 9))
mask = torch.ones(4, 9, dtype=torch.long)
mask[1, 6:] = 0
mask[3, 4:] = 0
target = torch.tensor([0, 1, 2, 1])
model = Clf(ours, head).eval()
mine = attnlrp(model, lambda: model(ids, mask), target, eps=0.0)

from lxt.efficient import monkey_patch
monkey_patch(mb)
cfg.position_embedding_type = "absolute"
enc = mb.BertModel(cfg).eval()
enc.get_head_mask = lambda hm, n, *a, **k: [None] * n
enc.load_state_dict(ours.state_dict(), strict=False)
store = {}
def keep(module, args, out):
    out.retain_grad()
    store["E"] = out
enc.embeddings.register_forward_hook(keep)
for p in list(enc.parameters()) + list(head.parameters()):
    p.requires_grad_(False)
emb = enc.embeddings.word_embeddings(ids).detach().requires_grad_()
logits = head(enc(inputs_embeds=emb, attention_mask=mask).last_hidden_state[:, 0])
logits.gather(1, target[:, None]).sum().backward()
theirs = (store["E"] * store["E"].grad).detach()
print("MAXDIFF", float((mine - theirs).abs().max()), float(theirs.abs().max()))
'''


def test_equals_lxt_on_a_tiny_bert_where_lxt_imports(tmp_path):
    """The authors' ``lxt`` 2.1 as the oracle: its patched BERT (run in a subprocess: the
    patch changes classes process-wide) against ``attnlrp`` (ε = 0, as lxt) on the same
    weights, relevance at the encoder's input. lxt is not a requirement (its dependencies
    pull torchvision and bitsandbytes); install it with ``pip install --no-deps lxt==2.1``
    (or put its sdist on PYTHONPATH) to run this."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("lxt") is None:
        pytest.skip("lxt is not installed (pip install --no-deps lxt==2.1)")
    script = tmp_path / "lxt_oracle.py"
    script.write_text(LXT_ORACLE)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("MAXDIFF")]
    assert line, run.stderr[-2000:]
    diff, scale = map(float, line[0].split()[1:])
    assert diff <= 1e-5 * max(1.0, scale)
