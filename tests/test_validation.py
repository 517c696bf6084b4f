"""The public functions refuse bad input at their boundary, saying what they got and what
they expected: shapes, dtypes and values (NaN/Inf, negative probabilities)."""
import re

import numpy as np
import pytest
import torch

from attnlab import VocabAttention, attention_flow, grad_rollout, readout, rollout, spacetime_rollout
from attnlab.explain import spacetime_grad_rollout


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def head_sum_path(request, monkeypatch):
    """Every test twice: with the compiled head sum + check (attnlab.explain._fused) and
    with torch's sum and second pass, the path taken when no C compiler built it."""
    import sys
    module = sys.modules["attnlab.explain.rollout"]
    if request.param == "compiled" and module._fused is None:
        pytest.skip("attnlab.explain._fused was not built (no C compiler at pip install -e .)")
    if request.param == "torch":
        monkeypatch.setattr(module, "_fused", None)
    return request.param


def _probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g).softmax(-1)


A = _probs(2, 2, 4, 4)                          # [B, H, N, N]
NAN = A.clone()
NAN[1, 0, 2, 3] = float("nan")
INF = A.clone()
INF[0, 1, 0, 0] = float("inf")
NEG = A.clone()
NEG[0, 0, 1, 2] = -0.25
S, T = _probs(2, 3, 2, 5, 5), _probs(2, 4, 2, 3, 3)   # space [B, F, H, 1+P, 1+P], time [B, P, H, F, F]


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


CASES = [   # (call, exact message)
    ("rollout NaN", lambda: rollout([A, NAN]),
     "attentions[1] holds 1 NaN or Inf value (shape (2, 2, 4, 4)); expected finite values"),
    ("rollout Inf", lambda: rollout([INF]),
     "attentions[0] holds 1 NaN or Inf value (shape (2, 2, 4, 4)); expected finite values"),
    ("rollout negative", lambda: rollout([A, A, NEG]),
     "attentions[2] has negative entries (min -0.25); expected attention probabilities >= 0 (softmax outputs)"),
    ("rollout integer dtype", lambda: rollout([torch.ones(2, 4, 4, dtype=torch.int64)]),
     "attentions[0] must be floating point; got dtype torch.int64"),
    ("rollout wrong rank", lambda: rollout([A[0, 0]]),
     "attentions[0] must have shape [B, H, N, N] or [B, N, N]; got (4, 4)"),
    ("rollout not square", lambda: rollout([A[..., :3]]),
     "attentions[0] must have shape [B, H, N, N] or [B, N, N]; got (2, 2, 4, 3)"),
    ("rollout residual string", lambda: rollout([A], residual="no"), "residual must be True or False; got 'no'"),
    ("rollout discard_ratio", lambda: rollout([A], discard_ratio=1.0),
     "discard_ratio must be a number in [0, 1); got 1.0"),
    ("grad_rollout NaN gradient", lambda: grad_rollout([A], [NAN]),
     "gradients[0] holds 1 NaN or Inf value (shape (2, 2, 4, 4)); expected finite values"),
    ("grad_rollout negative attention", lambda: grad_rollout([NEG], [A]),
     "attentions[0] has negative entries (min -0.25); expected attention probabilities >= 0 (softmax outputs)"),
    ("grad_rollout shapes", lambda: grad_rollout([A], [A[:, :1]]),
     "gradients[0] has shape (2, 1, 4, 4) but attentions[0] has (2, 2, 4, 4): they must match"),
    ("flow NaN", lambda: attention_flow([A, NAN]),
     "attentions[1] holds 1 NaN or Inf value (shape (2, 2, 4, 4)); expected finite values"),
    ("flow negative", lambda: attention_flow([NEG, A, A]),
     "attentions[0] has negative entries (min -0.25); expected attention probabilities >= 0 (softmax outputs)"),
    ("spacetime NaN time", lambda: spacetime_rollout([S], [_with(T, (0, 0, 0, 0, 0), float("nan"))]),
     "time[0] holds 1 NaN or Inf value (shape (2, 4, 2, 3, 3)); expected finite values"),
    ("spacetime negative space", lambda: spacetime_rollout([S, _with(S, (1, 2, 1, 0, 4), -1.0)], [T, T]),
     "space[1] has negative entries (min -1); expected attention probabilities >= 0 (softmax outputs)"),
    ("spacetime integer", lambda: spacetime_rollout([S], [T.to(torch.int32)]),
     "time[0] must be floating point; got dtype torch.int32"),
    ("spacetime time shape", lambda: spacetime_rollout([S], [T[:, :3]]),
     "time[0] must be [B, P, H, F, F] (or fused [B, P, F, F]) with B=2, P=4, F=3 as in space; got (2, 3, 2, 3, 3)"),
    ("spacetime grads Inf", lambda: spacetime_grad_rollout([S], [T], [_with(S, (0, 0, 0, 0, 0), float("inf"))], [T]),
     "space_grads[0] holds 1 NaN or Inf value (shape (2, 3, 2, 5, 5)); expected finite values"),
    ("readout NaN", lambda: readout(NAN[:, 0]),
     "joint holds 1 NaN or Inf value (shape (2, 4, 4)); expected finite values"),
    ("readout integer", lambda: readout(torch.ones(2, 4, 4, dtype=torch.int64), "mean"),
     "joint must be floating point; got dtype torch.int64"),
    ("readout rank", lambda: readout(A), "joint must be a tensor [B, N, N]; got (2, 2, 4, 4)"),
    ("readout index", lambda: readout(A[:, 0], 4), "how=4 is out of range for N=4 tokens"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_what_was_got_and_expected(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_padded_entries_may_hold_anything():
    """Entries involving padded tokens are never read (rollout zeroes them): NaN there is
    accepted, and the result equals the one with those entries zeroed."""
    real = torch.tensor([[True, True, True, False], [True, True, False, False]])
    pair = (real[:, :, None] & real[:, None, :])[:, None]
    dirty = A.masked_fill(~pair, float("nan"))
    clean = A.masked_fill(~pair, 0.0)
    torch.testing.assert_close(rollout([dirty, dirty], mask=real), rollout([clean, clean], mask=real))
    with pytest.raises(ValueError, match=re.escape("attentions[0] holds 1 NaN")):
        rollout([_with(dirty, (0, 0, 0, 1), float("nan")), dirty], mask=real)


@pytest.mark.parametrize("real", [
    [[True, True, True, False], [False, True, True, True]],      # right and left padding (one run each)
    [[True, False, True, True], [True, True, False, True]],      # holes: the detailed fallback
], ids=["runs", "holes"])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_padded_garbage_passes_and_real_problems_raise_for_any_mask(real, fusion):
    """Whatever the mask's shape and the head fusion: NaN/Inf/negative garbage in padded
    entries is accepted (same result as zeros there), the same in a real entry raises."""
    real = torch.tensor(real)
    pair = (real[:, :, None] & real[:, None, :])[:, None].expand_as(A)
    for garbage in (float("nan"), float("inf"), -5.0):
        dirty = A.masked_fill(~pair, garbage)
        clean = A.masked_fill(~pair, 0.0)
        torch.testing.assert_close(rollout([dirty, dirty], mask=real, head_fusion=fusion),
                                   rollout([clean, clean], mask=real, head_fusion=fusion))
    b, q, k = [int(i) for i in pair[:, 0].nonzero()[-1]]              # a real (query, key) entry
    for bad, message in ((float("nan"), "attentions[1] holds 1 NaN"), (float("inf"), "attentions[1] holds 1 NaN"),
                         (-0.5, "attentions[1] has negative entries (min -0.5)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            rollout([A, _with(A, (b, 1, q, k), bad)], mask=real, head_fusion=fusion)


def test_a_negative_entry_is_found_even_when_the_head_mean_hides_it():
    """The check looks at every entry, not at the fused layer: -0.1 in head 0 with 0.9 in
    head 1 averages to a valid 0.4, and still raises; so does +Inf under min fusion, which
    the minimum over heads would hide."""
    hidden = A.clone()
    hidden[0, 0, 1, 2], hidden[0, 1, 1, 2] = -0.1, 0.9
    assert float(hidden.mean(1).min()) >= 0
    for call in (lambda: rollout([hidden]), lambda: rollout([A, hidden], head_fusion="max"),
                 lambda: grad_rollout([hidden], [A]), lambda: attention_flow([hidden])):
        with pytest.raises(ValueError, match=re.escape("has negative entries (min -0.1)")):
            call()
    with pytest.raises(ValueError, match=re.escape("attentions[0] holds 1 NaN or Inf value")):
        rollout([_with(A, (1, 0, 2, 2), float("inf"))], head_fusion="min")
    s_hidden = S.clone()
    s_hidden[1, 2, 0, 3, 1], s_hidden[1, 2, 1, 3, 1] = -0.1, 0.9
    with pytest.raises(ValueError, match=re.escape("space[0] has negative entries (min -0.1)")):
        spacetime_rollout([s_hidden], [T])


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("where", [(0, 1, 0, 0, 0), (1, 2, 1, 0, 3), (1, 0, 0, 2, 0), (0, 2, 1, 4, 4)],
                         ids=["cls-cls", "cls-patch", "patch-cls", "patch-patch"])
def test_spacetime_finds_inf_anywhere_in_space_attention(where, fusion):
    """+Inf is not in the sweep's minimum: spacetime_rollout finds it through its result
    (0·Inf and Inf/Inf are NaN), wherever it sits in the class/patch rows, in any block."""
    for block in (0, 1):
        space = [S, S]
        space[block] = _with(S, where, float("inf"))
        with pytest.raises(ValueError, match=re.escape(f"space[{block}] holds 1 NaN or Inf value")):
            spacetime_rollout(space, [T, T], head_fusion=fusion)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_one_pass_check_sees_every_position_of_a_large_input(dtype, monkeypatch):
    """The check runs step by step with the head fusion (a few samples per step): a bad
    value in the first, a middle or the last sample (an uneven last step) is found, in
    every dtype, by rollout and grad_rollout alike."""
    import sys
    sample_bytes = 12 * 16 * 16 * 4
    for module in ("attnlab.explain.rollout", "attnlab.explain.grad_rollout"):
        monkeypatch.setattr(sys.modules[module], "CHUNK_BYTES", 4 * sample_bytes)   # steps of 4 (float32)
    big = _probs(9, 12, 16, 16).to(dtype)
    rollout([big, big])                                                # valid: no error
    for b in (0, 4, 8):
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match=r"attentions\[1\] (holds 1 NaN|has negative)"):
                rollout([big, _with(big, (b, 11, 15, 0), bad)])
            with pytest.raises(ValueError, match=r"gradients\[0\] holds 1 NaN"):
                grad_rollout([big], [_with(big, (b, 11, 15, 0), bad if bad != -1.0 else float("-inf"))])


# --------------------------------------------------------------------------- VocabAttention.update
TOKENS = torch.tensor([[1, 2, 3, 0], [2, 2, 1, 3]])
MASK = torch.tensor([[True, True, True, False], [True, True, True, True]])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"attention": _with(A, (1, 0, 0, 1), float("nan"))}, ValueError,
     "attention: 1 NaN or Inf value on valid (query, key) pairs (shape [2, 2, 4, 4]); expected finite weights "
     "there (masked pairs may hold anything)"),
    ({"attention": _with(A, (0, 0, 1, 1), float("inf"))[:, 0]}, ValueError,
     "attention: 1 NaN or Inf value on valid (query, key) pairs (shape [2, 4, 4]); expected finite weights "
     "there (masked pairs may hold anything)"),
    ({"attention": A.to(torch.int64)}, TypeError, "attention: expected a float tensor, got dtype torch.int64"),
    ({"attention": A[:, :, :3]}, ValueError,
     "attention: expected [B, N, N] or [B, H, N, N] with B=2, N=4 (tokens [2, 4]), got [2, 2, 3, 4]"),
    ({"tokens": TOKENS.float()}, TypeError, "tokens: expected integer token ids, got dtype torch.float32"),
    ({"tokens": TOKENS[0]}, ValueError, "tokens: expected shape [B, N], got [4]"),
    ({"tokens": TOKENS + 2}, ValueError, "tokens: id 5 is outside [0, vocab_size=4)"),
    ({"mask": MASK.int() * 2}, ValueError, "mask: expected bool or 0/1 (True/1 = valid token), found 2"),
    ({"mask": MASK[:, :3]}, ValueError, "mask: expected shape [B, N] = [2, 4] like tokens, got [2, 3]"),
])
def test_vocab_update_refuses_bad_input(kwargs, error, message):
    agg = VocabAttention(4)
    args = {"tokens": TOKENS, "attention": A, "mask": MASK} | kwargs
    with pytest.raises(error) as err:
        agg.update(**args)
    assert str(err.value) == message
    assert agg.n_sequences == 0 and not agg.sum.any() and not agg.count.any()    # nothing half-added


def test_vocab_update_ignores_nan_on_pairs_it_never_reads():
    """NaN where the key is masked or (causal) after the query: accepted, and the tables
    equal a literal loop over the valid pairs."""
    attn = A.mean(1)
    dirty = attn.clone()
    dirty[0, :, 3] = float("nan")                        # key 3 of sample 0 is masked
    dirty[1].masked_fill_(torch.ones(4, 4, dtype=torch.bool).triu(1), float("nan"))   # future keys
    agg = VocabAttention(4).update(TOKENS, dirty, mask=MASK, causal=True)
    expected = np.zeros((4, 4))
    for b in range(2):
        for i in range(4):
            for j in range(i + 1):
                if MASK[b, i] and MASK[b, j]:
                    expected[TOKENS[b, i], TOKENS[b, j]] += float(attn[b, i, j])
    np.testing.assert_allclose(agg.sum, expected, rtol=1e-6)


class _Marked(torch.nn.Module):
    """Passes whatever it is given through an AttentionProbs marker."""

    def __init__(self):
        super().__init__()
        from attnlab import AttentionProbs

        self.probs = AttentionProbs()

    def forward(self, x):
        return self.probs(x)


@pytest.mark.parametrize("kwargs, given, error, message", [
    ({"keep_grad": "yes"}, None, TypeError, "keep_grad must be True or False, got 'yes'"),
    ({"modules": 3}, None, TypeError, "modules must be a module name or an iterable of names (as in "
                                      "model.named_modules()), got 3"),
    ({"modules": ["probs", 1]}, None, TypeError, "got ('probs', 1)"),
    ({"modules": ["nothere"]}, None, ValueError, "modules: 'nothere' is not a module of the model; "
                                                 "recordable modules: 'probs'"),
    ({}, torch.ones(2, 3, 3), ValueError, "AttentionProbs module 'probs' got torch.Size([2, 3, 3]) torch.float32; "
                                          "expected a floating-point [B, H, Lq, Lk] tensor"),
    ({}, torch.ones(1, 1, 3, 3, dtype=torch.long), ValueError, "got torch.Size([1, 1, 3, 3]) torch.int64; expected"),
])
def test_attention_recorder_refuses_bad_arguments(kwargs, given, error, message):
    from attnlab import AttentionRecorder

    model = _Marked()
    with pytest.raises(error, match=re.escape(message)):
        with AttentionRecorder(model, **kwargs):
            model(given)
    assert not model.probs._forward_hooks                               # nothing left behind


def test_attention_recorder_takes_module_names_from_a_generator():
    from attnlab import AttentionRecorder

    model = _Marked()
    with AttentionRecorder(model, modules=(n for n in ["probs"])) as rec:
        model(torch.full((1, 1, 2, 2), 0.5))
    assert rec.names == ["probs"]
