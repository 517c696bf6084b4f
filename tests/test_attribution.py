"""Per-item importance of the attention methods, against recomputation from the weights."""
import pytest
import torch

from attnlab.attribution import attention_importance, to_items
from attnlab.capture import AttentionRecorder
from attnlab.models import EncoderClassifier


def _model(layers=1, pooling="mean"):
    torch.manual_seed(0)
    return EncoderClassifier(3, 4, d_model=8, nhead=2, num_layers=layers, dim_feedforward=16,
                             dropout=0.0, pooling=pooling).eval()


def _first_layer_attention(model, x):
    """Head-mean attention of layer 0 recomputed with the module's own weights."""
    h = model.embed(x)
    if model.cls_token is not None:
        h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], 1)
    layer = model.encoder.layers[0]
    with torch.no_grad():
        _, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=True)
    return w                                                     # [B, N, N]


def test_raw_received_rollout_on_one_layer_equal_recomputed_attention():
    model, x = _model(), torch.randn(5, 7, 3)
    imp, target = attention_importance(model, x, n_items=7, methods=["raw", "received", "rollout"],
                                       residual=False)
    a = _first_layer_attention(model, x)
    expected = a.mean(1) / a.mean(1).sum(-1, keepdim=True)      # mean over queries
    torch.testing.assert_close(imp["raw"], expected)
    torch.testing.assert_close(imp["received"], expected)
    torch.testing.assert_close(imp["rollout"], expected)        # one layer, no residual: the attention
    torch.testing.assert_close(target, model(x).argmax(-1))
    for v in imp.values():
        torch.testing.assert_close(v.sum(-1), torch.ones(5))


def test_cls_models_read_the_class_row_and_drop_its_column():
    model, x = _model(pooling="cls"), torch.randn(4, 6, 3)
    imp, _ = attention_importance(model, x, n_items=6, methods=["raw"], how="cls")
    a = _first_layer_attention(model, x)[:, 0, 1:]
    torch.testing.assert_close(imp["raw"], a / a.sum(-1, keepdim=True))


def test_grad_rollout_follows_the_formula_without_identity():
    model, x = _model(layers=2), torch.randn(3, 5, 3)
    imp, target = attention_importance(model, x, n_items=5, methods=["grad_rollout"])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())   # model untouched
    with AttentionRecorder(model, keep_grad=True) as rec:
        logits = model(x)
        logits[torch.arange(3), target].sum().backward()
    # literal loop of Chefer et al.: R = I; R = R + mean_h(relu(g*a)) R
    expected = torch.zeros(3, 5)
    for b in range(3):
        r = torch.eye(5)
        for a, g in zip(rec.attentions, rec.gradients):
            abar = torch.zeros(5, 5)
            for h in range(a.shape[1]):
                abar += torch.clamp(g[b, h] * a[b, h], min=0) / a.shape[1]
            r = r + abar @ r
        row = (r - torch.eye(5)).mean(0)
        expected[b] = row / row.sum()
    torch.testing.assert_close(imp["grad_rollout"], expected, rtol=1e-4, atol=1e-6)


def test_flow_on_two_layers_is_the_closed_form():
    model, x = _model(layers=2), torch.randn(2, 4, 3)
    imp, _ = attention_importance(model, x, n_items=4, methods=["flow"], residual=False)
    with AttentionRecorder(model) as rec:
        model(x)
    a1, a2 = (a.mean(1) for a in rec.attentions)
    flow = torch.zeros(2, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                flow[b, i, j] = sum(min(a2[b, i, k], a1[b, k, j]) for k in range(4))
    flow = flow / flow.sum(-1, keepdim=True)
    row = flow.mean(1)
    torch.testing.assert_close(imp["flow"], row / row.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown method 'lime'"):
        attention_importance(_model(), torch.randn(1, 3, 3), n_items=3, methods=["lime"])
    with pytest.raises(ValueError, match="Linear has no nn.MultiheadAttention"):
        attention_importance(torch.nn.Linear(3, 2), torch.randn(1, 3), n_items=3, methods=["raw"])
    with pytest.raises(ValueError, match="method 'weights' is not defined for sequence items"):
        attention_importance(_model(), torch.randn(1, 3, 3), n_items=3, methods=["weights"])
    with pytest.raises(ValueError, match="expected 5 items"):
        to_items(torch.ones(2, 3), 5)
