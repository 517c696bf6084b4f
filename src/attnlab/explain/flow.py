"""Attention flow (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers"):
one maximum flow per (output token, input token) through the layered attention graph,
solved with :func:`scipy.sparse.csgraph.maximum_flow` (Dinic's algorithm) on pruned graphs
whose answers are certified against the full graph (see :class:`SampleFlow`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow
from torch import Tensor
from tqdm import tqdm

from .rollout import (HeadFusion, check_flag, check_head_fusion, check_layers, check_values, compute_dtype,
                      prepared_layer)

__all__ = ["attention_flow", "SampleFlow", "FLOW_SCALE", "DEFAULT_MAX_PAIRS", "PRUNE_LEVELS"]

#: Integer capacity units per unit of attention. scipy's solver takes int32 capacities;
#: every capacity is ≤ 1, so 2**30 leaves a factor 2 of headroom below 2**31 and a
#: resolution of 2**-30 ≈ 9.3e-10 per edge.
FLOW_SCALE = 2**30

#: Default limit on the number of max-flow problems one call may solve (``B·R·N`` for
#: ``R`` output rows when ``L ≥ 3``).
DEFAULT_MAX_PAIRS = 65_536

#: The pruned graphs tried before the full one: each keeps, in every row of the inner
#: layers, the largest weights until they hold this fraction of the row's mass.
PRUNE_LEVELS: tuple[float, ...] = (0.6, 0.8)

_PROGRESS_MIN_PAIRS = 4_096
_LEVEL_TRIALS = 8           # a pruned level is dropped for a sample once it has failed on
                            # more than half of at least this many problems
_COPY_EDGES = 2**16         # problems solved in one scipy call: copies of the graph up to this many edges
_KNOWN_CUTS = 8             # inner minimum cuts kept per row, tried on its later sinks before a search


@torch.no_grad()
def attention_flow(
    attentions: Sequence[Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
    rows: int | Sequence[int] | Tensor | None = None,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    progress: bool | None = None,
) -> Tensor:
    """Attention flow of Abnar & Zuidema (2020), batched over samples.

    Each layer is prepared as in :func:`rollout` (heads fused, ``0.5·A + 0.5·I`` if
    ``residual``, rows renormalised to sum 1) into ``Â_l``. The layered graph has
    ``L+1`` layers of ``N`` nodes; node ``(l, i)`` has an edge to ``(l-1, j)`` of
    capacity ``Â_l[i, j]``. ``flow[b, i, j]`` is the maximum-flow value from top node
    ``(L, i)`` to input node ``(0, j)``; each row is then divided by its sum (rows
    summing to 0 stay 0). ``rows`` computes only the rows a readout needs: the class
    token's row is ``rows=0`` (``N`` max-flow problems per sample instead of ``N²``).

    How it is computed (``L = 1``: ``Â_1``; ``L = 2``: the paths ``(2,i) → (1,k) →
    (0,j)`` are disjoint, so ``Σ_k min(Â_2[i,k], Â_1[k,j])`` in closed form; ``L ≥ 3``:
    one max flow per ``(b, i, j)``, see :class:`SampleFlow`): every value is the exact
    capacity of a cut that is minimum in the solver's integer graph, and it differs from
    the real-valued maximum flow by at most that cut's edge count × 2**-30 (measured
    bounds: ≈ 1e-7 at ``N = 197``, ≤ 5e-7 on a real model's attention); the tests check
    it against networkx's float ``maximum_flow_value``.

    Cost (one core, ``benchmarks/bench_flow.py``), for the class-token row (``rows=0``,
    197 problems) of a ViT-B-sized sample (``L = 12, N = 197``): about 5.5 s on a trained
    model's attention (all-MiniLM-L6-v2's, its 6 layers twice: the full graph is needed),
    0.3–0.8 s on synthetic softmax attention (pruned graphs suffice), about 6.5 s for the
    last position's row under causal attention. Every row (the ``"mean"`` readout) costs
    ``N`` times one row: at that size about 1 minute per sample on synthetic attention and
    about 18 minutes on trained attention, so all rows are practical up to about
    ``N = 128, L = 6`` (15 s synthetic). Calls needing more than ``max_pairs`` problems are
    refused with a ``ValueError`` before any work is done.

    Args:
        attentions: ``L ≥ 1`` tensors ``[B, H, N, N]`` or ``[B, N, N]`` (first layer first).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: model the skip connection as ``0.5·A + 0.5·I``.
        rows: which output tokens (rows of the result) to compute: ``None`` — all of
            them; an ``int`` — that row (negative counts from the end), result ``[B, N]``;
            a sequence of ``R`` ints — those rows, result ``[B, R, N]``; an int64 tensor
            ``[B]`` (one row per sample, result ``[B, N]``) or ``[B, R]`` (result
            ``[B, R, N]``).
        max_pairs: refuse inputs needing more than this many max-flow problems
            (``B·R·N`` when ``L ≥ 3``, none otherwise); ``None`` lifts the limit.
        progress: show a tqdm bar; ``None`` (default) shows one on a terminal when at
            least 4096 problems are solved.

    Returns:
        ``[B, N, N]`` (row = output token, column = input token, rows sum to 1), or the
        selected rows as described under ``rows``; in the inputs' floating dtype (at
        least float32), on their device.
    """
    layers, batch, n_tok = check_layers(attentions)
    check_head_fusion(head_fusion)
    check_flag(residual, "residual")
    check_values(layers)
    index, squeeze = _check_rows(rows, batch, n_tok)          # [B, R] int64, R = N when rows is None
    if max_pairs is not None and (
        isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0
    ):
        raise ValueError(f"max_pairs must be a non-negative int or None; got {max_pairs!r}")
    n_layers, n_rows = len(layers), index.shape[1]
    n_problems = batch * n_rows * n_tok if n_layers >= 3 else 0
    if max_pairs is not None and n_problems > max_pairs:
        raise ValueError(
            f"attention_flow would solve B·R·N = {batch}·{n_rows}·{n_tok} = {n_problems} max-flow "
            f"problems (one per sample, output row and input token), each on a graph of "
            f"{(n_layers - 1) * n_tok} nodes and up to {(n_layers - 2) * n_tok**2} edges; that "
            f"exceeds max_pairs={max_pairs} (at N=197, L=12 about 2 ms per problem on dense "
            "attention, 35 ms on causal attention). "
            "Pass fewer samples or rows (rows=0 for a class-token readout), or raise max_pairs "
            "(None = no limit)."
        )
    out_dtype = compute_dtype(layers)
    device = layers[0].device
    a_hat = [
        prepared_layer(attn, head_fusion, residual, torch.float64).cpu() for attn in layers
    ]  # Â_1 .. Â_L, each [B, N, N] float64
    gather = index[:, :, None].expand(batch, n_rows, n_tok)

    if n_layers == 1:
        flow = a_hat[0].gather(1, gather)
    elif n_layers == 2:
        flow = _two_layer_flow(a_hat[0], a_hat[1].gather(1, gather))
    else:
        if progress is None:  # tqdm's disable=None: shown only on a terminal
            disable = None if n_problems >= _PROGRESS_MIN_PAIRS else True
        else:
            disable = not progress
        mats = [a.numpy() for a in a_hat]
        with tqdm(total=batch * n_rows, desc="attention_flow", unit="row", disable=disable) as bar:
            flow = torch.from_numpy(np.stack([
                SampleFlow([m[b] for m in mats]).rows(index[b].tolist(), bar)[0] for b in range(batch)
            ]))
    row_sum = flow.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(flow.dtype).tiny)
    flow = (flow / row_sum).to(device=device, dtype=out_dtype)
    return flow[:, 0] if squeeze else flow


def _check_rows(rows: object, batch: int, n_tok: int) -> tuple[Tensor, bool]:
    """``rows`` → ``(index [B, R] int64 in 0..N-1, squeeze)``; ``squeeze`` when one row
    per sample was given as an ``int`` or a ``[B]`` tensor."""
    if rows is None:
        return torch.arange(n_tok, device="cpu").expand(batch, n_tok), False
    if isinstance(rows, Tensor):
        if rows.dtype != torch.int64 or rows.ndim not in (1, 2) or rows.shape[0] != batch:
            raise ValueError(f"rows as a tensor must be int64 [B={batch}] or [B={batch}, R]; "
                             f"got {rows.dtype} {tuple(rows.shape)}")
        index, squeeze = (rows[:, None], True) if rows.ndim == 1 else (rows, False)
        index = index.cpu()
        if ((index < -n_tok) | (index >= n_tok)).any():
            raise ValueError(f"rows holds token indices outside -{n_tok}..{n_tok - 1} (N={n_tok})")
        return index % n_tok, squeeze
    if isinstance(rows, int) and not isinstance(rows, bool):
        values, squeeze = [rows], True
    elif isinstance(rows, Sequence) and not isinstance(rows, str):
        values, squeeze = list(rows), False
    else:
        raise ValueError(f"rows must be None, an int, a sequence of ints or an int64 tensor; got {rows!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"rows must hold int token indices; got {value!r} in {rows!r}")
        if not -n_tok <= value < n_tok:
            raise ValueError(f"rows: token index {value} is out of range for N={n_tok} tokens")
    return (torch.tensor(values, dtype=torch.int64, device="cpu") % n_tok).expand(batch, len(values)), squeeze


def _two_layer_flow(a_1: Tensor, a_2_rows: Tensor) -> Tensor:
    """``L = 2``: the paths ``(2, i) → (1, k) → (0, j)`` are disjoint, so the max flow
    is ``Σ_k min(Â_2[i, k], Â_1[k, j])``. ``a_1`` ``[B, N, N]``, ``a_2_rows`` ``[B, R, N]``
    (the selected rows of ``Â_2``) → ``[B, R, N]``; chunked over the rows."""
    batch, n_rows, n_tok = a_2_rows.shape
    step = max(1, 2**22 // max(1, batch * n_tok * n_tok))
    chunks = [
        torch.minimum(a_2_rows[:, i : i + step, :, None], a_1[:, None, :, :]).sum(dim=2)
        for i in range(0, n_rows, step)
    ]  # each [B, rows, N]
    return torch.cat(chunks, dim=1)


@dataclass
class _Level:
    """One solver graph, built on first use: a source ``S`` (id 0), ``copies`` disjoint
    copies of the inner layers (one problem each) and one sink ``T`` (the last id)."""

    keep_mass: float | None                 # see SampleFlow._build; None = the full graph
    graph: csr_array | None = None          # int32 capacities; data[:copies·N] = source edges
    sink_edges: np.ndarray | None = None    # [copies, N] positions in graph.data of (1, k) → T
    copies: int = 1
    source_row: int = -1                    # the output token whose capacities the source edges hold
    tried: int = 0
    failed: int = 0

    @property
    def full(self) -> bool:
        return self.keep_mass is None

    @property
    def useful(self) -> bool:
        return self.full or self.tried < _LEVEL_TRIALS or 2 * self.failed <= self.tried


@dataclass
class SampleFlow:
    """All maximum flows from one top-layer token of one sample (``L ≥ 3``).

    ``a_hat[l]`` is ``Â_{l+1}`` ``[N, N]`` float64 (rows sum to 1 or 0). Only ``(L, i)``
    is reachable from the source and only ``(0, j)`` drains into the sink, so a problem's
    graph is a source ``S`` (edges ``S → (L-1, k)`` of capacity ``Â_L[i, k]``), the
    ``L-1`` inner layers and a sink ``T`` (edges ``(1, k) → T`` of capacity
    ``Â_1[k, j]``). Capacities are ``floor(Â · 2**30)`` (int32, as scipy needs). Up to
    :data:`_COPY_EDGES` edges' worth of problems (several sinks ``j``) are solved in one
    call as disjoint copies of the inner layers between one source and one sink: a
    maximum flow of the union is a maximum flow of every copy, read from the flow on that
    copy's source edges. The graphs are built once per sample; per call only the source
    and sink capacities change.

    Certificates, per problem (``v`` = the integer max flow, ``|·|`` = real capacity):

    * the integer flow is a flow of the **real** graph too (floor rounding never raises a
      capacity; a pruned edge carries 0), so ``v / 2**30 ≤`` the real max flow;
    * every cut's real capacity is ``≥`` the real max flow: the source's edges
      (``Σ_k Â_L[i, k]``), the sink's (``Σ_k Â_1[k, j]``) and, when neither is saturated,
      the minimum cut of the full integer graph (the nodes still reachable from ``S`` in
      its residual graph).

    The value returned is the least of those cut capacities; ``gap`` = value − lower
    bound bounds its error (≤ the cut's edge count × 2**-30). Pruning: problems are first
    solved on graphs that keep only each inner row's largest weights
    (:data:`PRUNE_LEVELS`). If such a flow already saturates the source's or the sink's
    edges, the bounds above meet within rounding and the problem is done; otherwise it
    goes to the next, fuller graph. On synthetic softmax attention the min cut sits at
    the source or the sink and the 60 % graph (3–20× fewer edges) is enough; a trained
    model's flows need nearly every edge, and a level that fails on most problems of a
    sample is skipped for the rest of it. A cut found inside the graph (the [CLS] row of a
    BERT, causal attention) is tried on the row's later sinks before a new search.
    """

    a_hat: list[np.ndarray]
    levels: list[_Level] = field(init=False)
    stats: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        n_layers, n_tok = len(self.a_hat), self.a_hat[0].shape[0]
        if n_layers < 3:
            raise ValueError(f"SampleFlow needs L >= 3 layers; got {n_layers}")
        self.n_tok = n_tok
        self.inner = (n_layers - 1) * n_tok                                # nodes of one copy
        self.caps = [np.floor(a * FLOW_SCALE).astype(np.int32) for a in self.a_hat]
        self.sink_real = self.a_hat[0].sum(axis=0)                       # [N] real cut at T, per j
        self.sink_int = self.caps[0].sum(axis=0, dtype=np.int64)          # the same in integer units
        self.sink_caps = np.ascontiguousarray(self.caps[0].T)             # [j, k] = (1, k) → T
        self.levels = [_Level(keep) for keep in (*PRUNE_LEVELS, None)]
        self.stats = {"solves": 0, "problems": 0, "pruned_ok": 0, "min_cut_search": 0, "residual_searches": 0,
                      "cuts_reused": 0}

    def _build(self, level: _Level) -> None:
        """``level``'s graph: per inner row the largest weights up to ``keep_mass`` of the
        row (``None``: every edge with a non-zero integer capacity), in as many copies as
        fit in :data:`_COPY_EDGES` edges."""
        n_layers, n_tok, inner = len(self.a_hat), self.n_tok, self.inner
        counts, indices, data = [], [], []
        for t in range(n_layers - 2):  # inner layer t → t+1 carries Â_{L-1-t}
            a, block = self.a_hat[n_layers - 2 - t], self.caps[n_layers - 2 - t]
            keep = block > 0
            if level.keep_mass is not None:
                keep &= _largest_until(a, level.keep_mass)
            counts.append(keep.sum(axis=1))
            indices.append(np.nonzero(keep)[1] + (t + 1) * n_tok)        # 0-based within the copy
            data.append(block[keep])
        edges = int(sum(c.sum() for c in counts))
        copies = level.copies = int(np.clip(_COPY_EDGES // max(1, edges + 2 * n_tok), 1, n_tok))
        sink = 1 + copies * inner
        shift = 1 + inner * np.arange(copies)                             # first node id of each copy
        # rows: S; copy c's inner rows (its layer-1 rows hold one edge each, to T); T
        one_counts = np.concatenate([*counts, np.ones(n_tok, dtype=np.int64)])
        one_indices = np.concatenate(indices)
        row_counts = np.concatenate([[copies * n_tok], np.tile(one_counts, copies), [0]])
        indptr = np.concatenate([[0], np.cumsum(row_counts)])
        col = [(shift[:, None] + np.arange(n_tok)[None, :]).ravel()]         # S → each copy's layer L-1
        per_copy = np.concatenate([one_indices, np.full(n_tok, -1)])    # -1 marks the edges to T
        cols = shift[:, None] + per_copy[None, :]
        cols[:, -n_tok:] = sink
        col.append(cols.ravel())
        caps = np.concatenate([np.concatenate(data), np.zeros(n_tok, dtype=np.int32)])
        graph = csr_array(
            (np.concatenate([np.zeros(copies * n_tok, dtype=np.int32), np.tile(caps, copies)]),
             np.concatenate(col).astype(np.int32), indptr.astype(np.int32)),
            shape=(sink + 1, sink + 1),
        )
        first = copies * n_tok + len(caps) * np.arange(copies)            # each copy's first edge
        level.graph = graph
        level.sink_edges = first[:, None] + (len(caps) - n_tok) + np.arange(n_tok)[None, :]

    def rows(self, rows: Sequence[int], bar: tqdm | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Max-flow values ``[R, N]`` from each ``(L, i)``, ``i`` in ``rows``, to every
        ``(0, j)`` (not normalised) and their error bounds ``[R, N]`` (value − a flow's
        value, both ≥ 0)."""
        values = np.zeros((len(rows), self.n_tok))
        gaps = np.zeros_like(values)
        for r, i in enumerate(rows):
            values[r], gaps[r] = self.row(i)
            if bar is not None:
                bar.update(1)
        return values, gaps

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rows` for one output token ``i``: ``([N], [N])``."""
        n_tok = self.n_tok
        values, lower = np.zeros(n_tok), np.zeros(n_tok)
        src_real = float(self.a_hat[-1][i].sum())
        if src_real == 0.0:
            return values, lower
        src_int = int(self.caps[-1][i].sum(dtype=np.int64))
        bound = np.minimum(src_real, self.sink_real)          # real capacity of the cheaper trivial cut
        target = np.minimum(src_int, self.sink_int)           # the same in integer units
        pending = np.flatnonzero(self.sink_real > 0)
        known: list[_Cut] = []                                # inner min cuts found for this row
        for level in self.levels:
            if level.graph is None and pending.size:
                self._build(level)
            failed = []
            for start in range(0, pending.size, level.copies):
                sinks = pending[start : start + level.copies]
                if not level.useful:
                    failed.append(pending[start:])
                    break
                flow, result = self._solve(level, i, sinks)
                done = flow >= target[sinks]                    # a trivial cut is saturated: bounds meet
                values[sinks[done]], lower[sinks[done]] = bound[sinks[done]], flow[done] / FLOW_SCALE
                level.tried += sinks.size
                level.failed += int((~done).sum())
                self.stats["pruned_ok"] += 0 if level.full else int(done.sum())
                if level.full and not done.all():           # the min cut is inside the graph
                    cut = self._inner_cuts(level, result, i, sinks, flow, ~done, known)
                    values[sinks[~done]] = np.minimum(bound[sinks[~done]], cut)
                    lower[sinks[~done]] = flow[~done] / FLOW_SCALE
                    self.stats["min_cut_search"] += int((~done).sum())
                failed.append(sinks[~done])
            pending = np.concatenate(failed) if failed else pending[:0]
        return values, values - lower

    def _solve(self, level: _Level, i: int, sinks: np.ndarray) -> tuple[np.ndarray, object]:
        """One scipy call for the problems ``(i, j)``, ``j`` in ``sinks`` (one copy each;
        unused copies get no source capacity). Returns each copy's integer flow value and
        scipy's result."""
        n_tok, copies = self.n_tok, level.copies
        graph = level.graph
        if level.source_row != i or sinks.size < copies:
            src = np.zeros((copies, n_tok), dtype=np.int32)
            src[: sinks.size] = self.caps[-1][i]
            graph.data[: copies * n_tok] = src.ravel()
            level.source_row = i if sinks.size == copies else -1
        graph.data[level.sink_edges[: sinks.size]] = self.sink_caps[sinks]
        result = maximum_flow(graph, 0, graph.shape[0] - 1)
        self.stats["solves"] += 1
        self.stats["problems"] += sinks.size
        out = np.asarray(result.flow.data[: copies * n_tok], dtype=np.int64).reshape(copies, n_tok)
        if result.flow.indptr[1] != copies * n_tok or out.sum() != result.flow_value:
            raise RuntimeError("scipy's maximum_flow result no longer lists the source's edges first, "
                               "in order; attnlab.explain.flow reads each copy's flow from them")
        return out.sum(axis=1)[: sinks.size], result

    def _inner_cuts(self, level: _Level, result, i: int, sinks: np.ndarray, flow: np.ndarray,
                    which: np.ndarray, known: list[_Cut]) -> np.ndarray:
        """Real capacities of minimum cuts of the full integer graph for the copies
        ``which`` (bool over ``sinks``), whose flows ``flow`` saturate neither trivial cut.

        A cut found for an earlier sink of the same row is reused when its integer
        capacity for this sink equals the integer max flow (then it is a minimum cut here
        too: max-flow min-cut). Otherwise the cut is the set of nodes reachable from ``S``
        in the residual graph after scipy's ``result`` (whose entries on reverse edges
        are the negated forward flows), and it joins ``known``."""
        out = np.zeros(int(which.sum()))
        search = []
        for slot, c in enumerate(np.flatnonzero(which)):
            j = sinks[c]
            match = next((cut for cut in known if cut.capacity_int(self.caps[0][:, j]) == flow[c]), None)
            if match is None:
                search.append((slot, c))
            else:
                out[slot] = match.capacity(self.a_hat[0][:, j])
                self.stats["cuts_reused"] += 1
        if not search:
            return out
        self.stats["residual_searches"] += 1
        residual = csr_array(level.graph - csr_array(result.flow))
        residual.data = (residual.data > 0).astype(np.int8)
        residual.eliminate_zeros()
        reached = np.zeros(level.graph.shape[0], dtype=bool)
        reached[breadth_first_order(residual, 0, directed=True, return_predecessors=False)] = True
        n_layers, n_tok, inner = len(self.a_hat), self.n_tok, self.inner
        for slot, c in search:
            side = reached[1 + c * inner : 1 + (c + 1) * inner].reshape(n_layers - 1, n_tok)  # [inner layer, k]
            cut = _Cut.of(side, self.a_hat, self.caps, i)
            out[slot] = cut.capacity(self.a_hat[0][:, sinks[c]])
            if len(known) < _KNOWN_CUTS:
                known.append(cut)
        return out


@dataclass
class _Cut:
    """The upper part of a cut of one row's graph: which nodes of the inner layers above
    layer 1 are on the source's side. For a sink ``j`` each layer-1 node ``k`` then
    joins the side that cuts less — the edges into it from the source's side of layer 2
    (``into[k]``) or its edge to ``T`` (``Â_1[k, j]``) — so the capacity is
    ``above + Σ_k min(into[k], Â_1[k, j])``, in real and in integer units."""

    above: float
    above_int: int
    into: np.ndarray            # [N] real capacity into each layer-1 node from the source's side
    into_int: np.ndarray        # [N] the same, integer

    @classmethod
    def of(cls, side: np.ndarray, a_hat: list[np.ndarray], caps: list[np.ndarray], i: int) -> "_Cut":
        """From ``side[t, k]``: node ``k`` of inner layer ``t`` (model layer ``L-1-t``) is
        on the source's side (the last row, layer 1, is not used)."""
        n_layers = len(a_hat)
        above = float(a_hat[-1][i][~side[0]].sum())                       # S → (L-1, k) outside
        above_int = int(caps[-1][i][~side[0]].sum(dtype=np.int64))
        for t in range(n_layers - 3):                                    # inner layer t → t+1, above layer 1
            crossing = np.ix_(side[t], ~side[t + 1])
            above += float(a_hat[n_layers - 2 - t][crossing].sum())
            above_int += int(caps[n_layers - 2 - t][crossing].sum(dtype=np.int64))
        return cls(above, above_int, a_hat[1][side[-2]].sum(axis=0), caps[1][side[-2]].sum(axis=0, dtype=np.int64))

    def capacity(self, into_sink: np.ndarray) -> float:
        """Real capacity for the sink whose edges ``(1, k) → T`` are ``into_sink`` ``[N]``."""
        return self.above + float(np.minimum(self.into, into_sink).sum())

    def capacity_int(self, into_sink: np.ndarray) -> int:
        return self.above_int + int(np.minimum(self.into_int, into_sink).sum(dtype=np.int64))


def _largest_until(a: np.ndarray, mass: float) -> np.ndarray:
    """``[N, N]`` bool: per row, the largest entries of ``a`` (ties by column) until their
    sum reaches ``mass`` × the row's sum (always at least the largest one)."""
    order = np.argsort(-a, axis=1, kind="stable")
    ranked = np.take_along_axis(a, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked                           # mass of the larger ones
    keep_ranked = before < mass * ranked.sum(axis=1, keepdims=True)
    keep_ranked[:, 0] = True
    keep = np.zeros_like(keep_ranked)
    np.put_along_axis(keep, order, keep_ranked, axis=1)
    return keep
