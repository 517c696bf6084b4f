"""Attention flow (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers"),
solved with :func:`scipy.sparse.csgraph.maximum_flow` (Dinic's algorithm)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow
from torch import Tensor
from tqdm import tqdm

from .rollout import (HeadFusion, check_flag, check_head_fusion, check_layers, check_values, compute_dtype,
                      prepared_layer)

__all__ = ["attention_flow", "FLOW_SCALE", "DEFAULT_MAX_PAIRS"]

#: Integer capacity units per unit of attention. scipy's solver takes int32
#: capacities; every capacity is ≤ 1 and everything leaving the source sums to 1, so
#: 2**30 leaves a factor 2 of headroom below 2**31 and a resolution of 2**-30 ≈ 9.3e-10.
FLOW_SCALE = 2**30

#: Default limit on the number of max-flow problems one call may solve (B·N² when L ≥ 3).
DEFAULT_MAX_PAIRS = 65_536

_PROGRESS_MIN_PAIRS = 4_096


@torch.no_grad()
def attention_flow(
    attentions: Sequence[Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    progress: bool | None = None,
) -> Tensor:
    """Attention flow of Abnar & Zuidema (2020), batched over samples.

    Each layer is prepared as in :func:`rollout` (heads fused, ``0.5·A + 0.5·I`` if
    ``residual``, rows renormalised to sum 1) into ``Â_l``. The layered graph has
    ``L+1`` layers of ``N`` nodes; node ``(l, i)`` has an edge to ``(l-1, j)`` of
    capacity ``Â_l[i, j]``. ``flow[b, i, j]`` is the maximum-flow value from top node
    ``(L, i)`` to input node ``(0, j)``; each row is then divided by its sum (rows
    summing to 0 stay 0).

    How it is computed (one max-flow problem per ``(b, i, j)``, no approximation):

    * only ``(L, i)`` is reachable from the source and only ``(0, j)`` drains into the
      sink, so the other nodes of the top and bottom layers are dropped. Each sample's
      graph is built **once**: a source ``S``, the ``L-1`` inner layers, a sink ``T``;
      per pair only the ``N`` capacities ``S → (L-1, k) = Â_L[i, k]`` and the ``N``
      capacities ``(1, k) → T = Â_1[k, j]`` are overwritten in place;
    * ``L = 1``: the flow is ``Â_1`` itself; ``L = 2``: the graph is ``N`` disjoint
      paths ``S → k → T``, so the flow is ``Σ_k min(Â_2[i, k], Â_1[k, j])`` in closed
      form; ``L ≥ 3``: Dinic's algorithm of :func:`scipy.sparse.csgraph.maximum_flow`.
      (A super-sink cannot replace the per-pair problems: it gives one value per
      source, not per pair; directed max flow has no Gomory–Hu tree to share work.)
    * scipy needs integer capacities: they are ``round(Â · 2**30)`` (:data:`FLOW_SCALE`),
      so every cut changes by at most ``2**-31`` per edge it cuts and a flow value is
      off from the real-valued max flow by ~1e-9 in practice — well below 1e-6 relative
      to networkx's float ``maximum_flow_value`` (checked in the tests).

    Cost: ``B·N²`` solver calls on graphs of ``(L-1)·N`` nodes and ``(L-2)·N²`` edges;
    each call is O(edges) of scipy bookkeeping plus Dinic: about 0.3 ms at ``N=32,
    L=4`` and 2–3 ms at ``N=128, L=6``, i.e. 30–50 s per sample at ``N=128, L=6`` (one
    core; scipy holds the GIL, so threads do not help). Calls needing more than
    ``max_pairs`` problems are refused with a ``ValueError`` before any work is done.

    Args:
        attentions: ``L ≥ 1`` tensors ``[B, H, N, N]`` or ``[B, N, N]`` (first layer first).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: model the skip connection as ``0.5·A + 0.5·I``.
        max_pairs: refuse inputs needing more than this many max-flow problems
            (``B·N²`` when ``L ≥ 3``, none otherwise); ``None`` lifts the limit.
        progress: show a tqdm bar; ``None`` (default) shows one on a terminal when at
            least 4096 problems are solved.

    Returns:
        ``[B, N, N]`` (row = output token, column = input token, rows sum to 1), in
        the inputs' floating dtype (at least float32), on their device.
    """
    layers, batch, n_tok = check_layers(attentions)
    check_head_fusion(head_fusion)
    check_flag(residual, "residual")
    check_values(layers)
    if max_pairs is not None and (
        isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0
    ):
        raise ValueError(f"max_pairs must be a non-negative int or None; got {max_pairs!r}")
    n_layers = len(layers)
    n_problems = batch * n_tok * n_tok if n_layers >= 3 else 0
    if max_pairs is not None and n_problems > max_pairs:
        raise ValueError(
            f"attention_flow would solve B·N² = {batch}·{n_tok}² = {n_problems} max-flow "
            f"problems (one per sample and token pair), each on a graph of "
            f"{(n_layers - 1) * n_tok} nodes and ~{(n_layers - 2) * n_tok**2} edges; that "
            f"exceeds max_pairs={max_pairs} (about 2 ms per problem at N=128, L=6). "
            "Pass fewer samples or tokens per call, or raise max_pairs (None = no limit)."
        )
    out_dtype = compute_dtype(layers)
    device = layers[0].device
    a_hat = [
        prepared_layer(attn, head_fusion, residual, torch.float64).cpu() for attn in layers
    ]  # Â_1 .. Â_L, each [B, N, N] float64

    if n_layers == 1:
        flow = a_hat[0]
    elif n_layers == 2:
        flow = _two_layer_flow(*a_hat)
    else:
        if progress is None:  # tqdm's disable=None: shown only on a terminal
            disable = None if n_problems >= _PROGRESS_MIN_PAIRS else True
        else:
            disable = not progress
        mats = [a.numpy() for a in a_hat]
        with tqdm(total=batch * n_tok, desc="attention_flow", unit="row", disable=disable) as bar:
            flow = torch.from_numpy(
                np.stack([_flow_one_sample([m[b] for m in mats], bar) for b in range(batch)])
            )
    row_sum = flow.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(flow.dtype).tiny)
    return (flow / row_sum).to(device=device, dtype=out_dtype)


def _two_layer_flow(a_1: Tensor, a_2: Tensor) -> Tensor:
    """``L = 2``: the paths ``(2, i) → (1, k) → (0, j)`` are disjoint, so the max flow
    is ``Σ_k min(Â_2[i, k], Â_1[k, j])``. ``[B, N, N]`` each; chunked over ``i``."""
    batch, n_tok, _ = a_1.shape
    step = max(1, 2**22 // (batch * n_tok * n_tok))
    chunks = [
        torch.minimum(a_2[:, i : i + step, :, None], a_1[:, None, :, :]).sum(dim=2)
        for i in range(0, n_tok, step)
    ]  # each [B, rows, N]
    return torch.cat(chunks, dim=1)


def _flow_one_sample(a_hat: list[np.ndarray], bar: tqdm) -> np.ndarray:
    """All-pairs max flow for one sample, ``L ≥ 3``. ``a_hat[l]`` is ``Â_{l+1}`` ``[N, N]``.

    Node ids: ``0`` = source; inner layer ``t = 0..L-2`` holds model layer ``L-1-t`` at
    ids ``1 + t·N + k``; the sink is ``1 + (L-1)·N``. Capacities in int32 units of
    :data:`FLOW_SCALE`. Returns the ``[N, N]`` flow values (float64, not normalised).
    """
    n_layers, n_tok = len(a_hat), a_hat[0].shape[0]
    caps = [np.rint(a * FLOW_SCALE).astype(np.int32) for a in a_hat]
    sink = 1 + (n_layers - 1) * n_tok

    row_counts = [np.array([n_tok])]
    indices = [np.arange(1, n_tok + 1)]
    data = [np.zeros(n_tok, dtype=np.int32)]  # source row, set per output token i
    for t in range(n_layers - 2):  # inner layer t → t+1 carries Â_{L-1-t}; zero edges dropped
        block = caps[n_layers - 2 - t]
        keep = block > 0
        row_counts.append(keep.sum(axis=1))
        indices.append(np.nonzero(keep)[1] + 1 + (t + 1) * n_tok)
        data.append(block[keep])
    row_counts += [np.ones(n_tok, dtype=np.int64), np.zeros(1, dtype=np.int64)]
    indices.append(np.full(n_tok, sink))
    data.append(np.zeros(n_tok, dtype=np.int32))  # (1, k) → sink rows, set per input token j
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_counts))])
    graph = csr_array(
        (np.concatenate(data), np.concatenate(indices).astype(np.int32), indptr.astype(np.int32)),
        shape=(sink + 1, sink + 1),
    )
    sink_edges = indptr[1 + (n_layers - 2) * n_tok : 1 + (n_layers - 1) * n_tok]

    source_caps = caps[n_layers - 1]  # [i, k] = S → (L-1, k) for output token i
    sink_caps = np.ascontiguousarray(caps[0].T)  # [j, k] = (1, k) → T for input token j
    flow = np.zeros((n_tok, n_tok))
    for i in range(n_tok):
        if not source_caps[i].any():
            bar.update(1)
            continue
        graph.data[:n_tok] = source_caps[i]
        for j in range(n_tok):
            if sink_caps[j].any():
                graph.data[sink_edges] = sink_caps[j]
                flow[i, j] = maximum_flow(graph, 0, sink).flow_value
        bar.update(1)
    return flow / FLOW_SCALE
