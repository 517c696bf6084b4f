"""attention_flow against networkx's float maximum flow on explicit layered graphs: every
layer count, head fusion and readout row, structured attention whose minimum cuts lie
inside the graph, and the error bound each value carries (attnlab.explain.flow)."""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from attnlab.attribution import attention_importance
from attnlab.capture import AttentionRecorder
from attnlab.explain import attention_flow
from attnlab.explain import flow as flow_module
from attnlab.explain.flow import FLOW_SCALE, SampleFlow
from attnlab.models import EncoderClassifier

# --------------------------------------------------------------------------- references


def softmax_attn(gen: torch.Generator, *shape: int, sharp: float = 2.0, mask: torch.Tensor | None = None):
    scores = sharp * torch.randn(*shape, generator=gen, dtype=torch.float64)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    return scores.softmax(-1)


def ref_layer(attn: np.ndarray, head_fusion: str = "mean", residual: bool = True) -> np.ndarray:
    """One sample's layer ``[H, N, N]`` (or fused ``[N, N]``) as the docstring states it:
    fuse heads, ``0.5·A + 0.5·I``, rows renormalised (zero rows stay zero)."""
    a = attn if attn.ndim == 2 else {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](attn, axis=0)
    if residual:
        a = 0.5 * a + 0.5 * np.eye(a.shape[0])
    sums = a.sum(axis=1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def layered_graph(a_hat: list[np.ndarray]) -> nx.DiGraph:
    """Nodes ``(l, t)`` for ``l = 0..L``; ``(l, i) → (l-1, j)`` of capacity ``Â_l[i, j]``."""
    n = a_hat[0].shape[0]
    graph = nx.DiGraph()
    graph.add_nodes_from((layer, t) for layer in range(len(a_hat) + 1) for t in range(n))
    for layer, a in enumerate(a_hat, start=1):
        for i in range(n):
            for j in range(n):
                graph.add_edge((layer, i), (layer - 1, j), capacity=float(a[i, j]))
    return graph


def networkx_values(a_hat: list[np.ndarray], rows) -> np.ndarray:
    """Unnormalised max-flow values ``[R, N]`` from ``(L, i)``, ``i`` in rows, to each ``(0, j)``."""
    graph, n_layers, n = layered_graph(a_hat), len(a_hat), a_hat[0].shape[0]
    return np.array([[nx.maximum_flow_value(graph, (n_layers, i), (0, j)) for j in range(n)] for i in rows])


def networkx_flow(attentions, head_fusion="mean", residual=True, rows=None) -> np.ndarray:
    """Row-normalised flow ``[B, R, N]``, one networkx call per (sample, row, column)."""
    batch, n = attentions[0].shape[0], attentions[0].shape[-1]
    rows = range(n) if rows is None else rows
    out = []
    for b in range(batch):
        a_hat = [ref_layer(attn[b].numpy(), head_fusion, residual) for attn in attentions]
        values = networkx_values(a_hat, rows)
        sums = values.sum(axis=1, keepdims=True)
        out.append(np.divide(values, sums, out=np.zeros_like(values), where=sums > 0))
    return np.stack(out)


# --------------------------------------------------------------------------- all rows


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("head_fusion,residual", [("mean", True), ("max", False), ("min", True)])
def test_attention_flow_matches_networkx(n_layers, head_fusion, residual):
    gen = torch.Generator().manual_seed(9 + n_layers)
    attns = [softmax_attn(gen, 2, 3, 6, 6, sharp=3.0) for _ in range(n_layers)]
    got = attention_flow(attns, head_fusion=head_fusion, residual=residual)
    want = networkx_flow(attns, head_fusion, residual)
    assert got.shape == (2, 6, 6) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("structure", ["causal", "blocks", "window"])
def test_structured_attention_with_inner_minimum_cuts_matches_networkx(structure):
    """Masks put the minimum cut inside the graph (no flow to future tokens, none across
    blocks): the solver then searches the full graph's cut."""
    n, gen = 7, torch.Generator().manual_seed(10)
    idx = torch.arange(n)
    mask = {"causal": idx[:, None] >= idx[None, :],
            "blocks": (idx[:, None] < 3) == (idx[None, :] < 3),
            "window": (idx[:, None] - idx[None, :]).abs() <= 1}[structure]
    attns = [softmax_attn(gen, 2, 2, n, n, sharp=3.0, mask=mask) for _ in range(4)]
    got = attention_flow(attns, residual=False)
    want = networkx_flow(attns, residual=False)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)
    if structure == "causal":
        assert (got.triu(1) == 0).all()                     # no flow to future tokens
    if structure == "blocks":
        assert (got[:, :3, 3:] == 0).all() and (got[:, 3:, :3] == 0).all()


def test_all_zero_rows_and_columns_give_zero_flow():
    gen = torch.Generator().manual_seed(12)
    attns = [softmax_attn(gen, 1, 2, 5, 5) for _ in range(3)]
    attns[2][:, :, 1] = 0.0                                 # top row 1 attends nowhere
    attns[0][:, :, :, 3] = 0.0                              # nothing attends to input token 3
    got = attention_flow(attns, residual=False)
    np.testing.assert_allclose(got.numpy(), networkx_flow(attns, residual=False), rtol=1e-6, atol=1e-9)
    assert (got[0, 1] == 0).all() and (got[0, :, 3] == 0).all()


# --------------------------------------------------------------------------- selected rows


@pytest.mark.parametrize("n_layers", [1, 2, 3, 5])
def test_rows_equal_networkx_rows(n_layers):
    gen = torch.Generator().manual_seed(20 + n_layers)
    batch, n = 2, 6
    attns = [softmax_attn(gen, batch, 2, n, n, sharp=2.5) for _ in range(n_layers)]
    full = networkx_flow(attns)                                        # [B, N, N]
    one = attention_flow(attns, rows=0)
    assert one.shape == (batch, n)
    np.testing.assert_allclose(one.numpy(), full[:, 0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(attention_flow(attns, rows=-1).numpy(), full[:, n - 1], rtol=1e-6, atol=1e-9)
    some = attention_flow(attns, rows=[4, 1, 4])
    assert some.shape == (batch, 3, n)
    np.testing.assert_allclose(some.numpy(), full[:, [4, 1, 4]], rtol=1e-6, atol=1e-9)
    per_sample = torch.tensor([3, 5])
    np.testing.assert_allclose(attention_flow(attns, rows=per_sample).numpy(),
                               np.stack([full[0, 3], full[1, 5]]), rtol=1e-6, atol=1e-9)
    pairs = torch.tensor([[0, 2], [5, 1]])
    np.testing.assert_allclose(attention_flow(attns, rows=pairs).numpy(),
                               np.stack([full[0, [0, 2]], full[1, [5, 1]]]), rtol=1e-6, atol=1e-9)


def test_one_row_of_a_deeper_wider_graph_matches_networkx():
    gen = torch.Generator().manual_seed(30)
    n, n_layers = 20, 6
    attns = [softmax_attn(gen, 1, 4, n, n, sharp=s) for s in (1.0, 2.0, 4.0, 1.0, 6.0, 2.0)]
    got = attention_flow(attns, rows=[0, 7])
    np.testing.assert_allclose(got.numpy(), networkx_flow(attns, rows=[0, 7]), rtol=1e-6, atol=1e-9)
    assert got.shape == (1, 2, n) and n_layers == len(attns)


# --------------------------------------------------------------------------- certificates


def _cases():
    """(name, Â list) for SampleFlow: dense, sharp, flat, no residual, causal, deep."""
    out, gen = [], torch.Generator().manual_seed(40)
    for k, (n, n_layers, sharp, residual, causal) in enumerate([
        (9, 3, 1.0, True, False), (10, 4, 4.0, True, False), (12, 5, 8.0, True, False),
        (8, 4, 0.3, True, False), (10, 4, 3.0, False, False), (9, 5, 6.0, False, False),
        (8, 4, 2.0, False, True), (12, 6, 3.0, True, True), (14, 4, 5.0, True, False),
    ]):
        idx = torch.arange(n)
        mask = idx[:, None] >= idx[None, :] if causal else None
        attns = [softmax_attn(gen, 3, n, n, sharp=sharp, mask=mask) for _ in range(n_layers)]
        out.append((f"case{k}", [ref_layer(a.numpy(), "mean", residual) for a in attns]))
    return out


@pytest.mark.parametrize("copy_edges", [flow_module._COPY_EDGES, 1])
def test_every_value_lies_within_its_certified_gap_of_networkx(copy_edges, monkeypatch):
    """Value = the real capacity of a cut, gap = value − an integer flow's value; the true
    max flow lies in between, so |value − networkx| ≤ gap. Across the cases every path is
    taken: answered on a pruned graph, after a fuller one, and by an inner cut of the full
    graph, searched or reused from an earlier sink; with several problems per solver call
    (the default) and one (``copy_edges=1``)."""
    monkeypatch.setattr(flow_module, "_COPY_EDGES", copy_edges)
    totals = {"problems": 0, "pruned_ok": 0, "min_cut_search": 0, "pruned_failed": 0, "full_ok": 0,
              "cuts_reused": 0}
    for name, a_hat in _cases():
        n = a_hat[0].shape[0]
        rows = [0, n // 2, n - 1]
        solver = SampleFlow(a_hat)
        values, gaps = solver.rows(rows)
        want = networkx_values(a_hat, rows)
        assert (gaps >= -1e-15).all(), name
        assert (np.abs(values - want) <= gaps + 1e-12).all(), (name, np.abs(values - want).max())
        # a gap is at most (edges in the cut) · 2**-30, at most every edge of the graph
        assert gaps.max() <= ((len(a_hat) - 2) * n * n + 2 * n) / FLOW_SCALE, name
        for key in ("problems", "pruned_ok", "min_cut_search", "cuts_reused"):
            totals[key] += solver.stats[key]
        totals["pruned_failed"] += sum(level.failed for level in solver.levels[:-1])
        totals["full_ok"] += solver.levels[-1].tried - solver.levels[-1].failed
    assert totals["pruned_ok"] > 0 and totals["min_cut_search"] > totals["cuts_reused"], totals
    if copy_edges == 1:                        # one problem per call: later sinks reuse earlier cuts
        assert totals["cuts_reused"] > 0, totals
    assert totals["pruned_failed"] > 0 and totals["full_ok"] > 0, totals    # fell back to fuller graphs
    assert totals["problems"] == totals["pruned_ok"] + totals["pruned_failed"] + totals["full_ok"] + \
        totals["min_cut_search"], totals


def test_the_integer_flow_never_exceeds_the_real_capacities():
    """Floor rounding: each integer capacity is ≤ the real one × 2**30, so the integer
    flow is a flow of the real graph (the lower bound of the certificate)."""
    gen = torch.Generator().manual_seed(50)
    a_hat = [ref_layer(softmax_attn(gen, 2, 6, 6).numpy()) for _ in range(4)]
    solver = SampleFlow(a_hat)
    for real, caps in zip(a_hat, solver.caps):
        assert (caps.astype(np.float64) <= real * FLOW_SCALE).all()
        assert (real * FLOW_SCALE - caps < 1).all()


# --------------------------------------------------------------------------- the registered method


def _encoder(pooling: str) -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(3, 4, d_model=8, nhead=2, num_layers=3, dim_feedforward=16,
                             dropout=0.0, pooling=pooling).eval()


@pytest.mark.parametrize("pooling,how", [("cls", "cls"), ("mean", 2), ("mean", "per-sample"), ("mean", "mean")])
def test_registered_flow_reads_out_only_the_rows_it_needs(pooling, how):
    model, x = _encoder(pooling), torch.randn(2, 5, 3)
    n_tok = 5 + (pooling == "cls")
    if how == "per-sample":
        how = torch.tensor([4, 1])
    with AttentionRecorder(model) as rec:
        model(x)
    attns = [a.detach().double() for a in rec.attentions]
    rows = {"cls": [0], "mean": list(range(n_tok))}.get(how, [2]) if not isinstance(how, torch.Tensor) else None
    if rows is None:
        full = networkx_flow(attns, rows=range(n_tok))
        want = np.stack([full[0, 4], full[1, 1]])
    else:
        want = networkx_flow(attns, rows=rows).mean(axis=1)           # one row, or the mean of all
    want = want[:, -5:] / want[:, -5:].sum(-1, keepdims=True)        # items: drop a class token's column
    one_row = 2 * n_tok                                              # B·N problems
    imp, _ = attention_importance(model, x, n_items=5, methods=["flow"], how=how,
                                  flow_max_pairs=one_row if how != "mean" else 2 * n_tok * n_tok)
    np.testing.assert_allclose(imp["flow"].numpy(), want, rtol=1e-4, atol=1e-6)
    if how == "mean":
        with pytest.raises(ValueError, match="max_pairs"):
            attention_importance(model, x, n_items=5, methods=["flow"], how=how, flow_max_pairs=one_row)


# --------------------------------------------------------------------------- arguments


def test_max_pairs_counts_the_selected_rows():
    attns = [torch.rand(2, 1, 10, 10).softmax(-1) for _ in range(3)]
    with pytest.raises(ValueError, match="max_pairs=100"):
        attention_flow(attns, max_pairs=100)                           # 2·10·10 problems
    assert attention_flow(attns, rows=[0, 1], max_pairs=40).shape == (2, 2, 10)
    with pytest.raises(ValueError, match=r"B·R·N = 2·2·10 = 40 .*max_pairs=39"):
        attention_flow(attns, rows=[0, 1], max_pairs=39)
    assert attention_flow(attns[:2], max_pairs=0).shape == (2, 10, 10)  # L ≤ 2 needs no solver
    with pytest.raises(ValueError, match="max_pairs"):
        attention_flow(attns, max_pairs=-1)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_flow(attns, head_fusion="median")


@pytest.mark.parametrize("rows,match", [
    (10, "out of range for N=10"), (-11, "out of range"), ([0, 12], "token index 12"),
    (1.0, "rows must be None"), (True, "rows must be None"), ("cls", "rows must be None"),
    ([0, 1.5], "int token indices"), ([True], "int token indices"),
    (torch.tensor([0.0, 1.0]), "int64"), (torch.tensor([0, 1, 2]), r"\[B=2\]"),
    (torch.tensor([[0], [10]]), "outside -10..9"),
])
def test_bad_rows_are_refused_with_the_reason(rows, match):
    attns = [torch.rand(2, 1, 10, 10).softmax(-1) for _ in range(3)]
    with pytest.raises(ValueError, match=match):
        attention_flow(attns, rows=rows)
