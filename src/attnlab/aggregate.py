"""Streaming vocabulary x vocabulary aggregation of position x position attention.

Answers "how do I get a vocabulary x vocabulary importance matrix out of
position x position attention?": every valid (query position ``i``, key position
``j``) pair of every sequence adds its attention weight to the cell
``(tokens[b, i], tokens[b, j])`` of a ``[V, V]`` table. Three tables are kept:

- ``sum``       Σ attention[b, i, j] over the valid pairs that land in the cell;
- ``count``     how many valid position pairs landed in the cell;
- ``expected``  Σ 1 / (number of valid keys of query ``i``) over the same pairs, i.e.
                the ``sum`` that *uniform* attention would have produced.

``mean = sum / count`` is the average weight a query token gives a key token;
``lift = sum / expected`` divides out how often the two tokens co-occur, so a
frequent token does not look important merely because it is everywhere (lift 1 =
no more attention than uniform, lift 2 = twice as much).

Two layouts, chosen by size (or by ``sparse=``), with the same results:

- **dense**: the tables are ``[V, V]`` arrays (fast, ``O(V²)`` memory; small vocabularies);
- **sparse**: only the token pairs seen are kept, as sorted keys ``query·V + key`` with
  their values, so memory is ``O(distinct pairs seen + one batch)``: a 30k-50k
  vocabulary (BERT, GPT-2) works. Each batch is reduced in a small dense table over
  the ids it contains (relabelled ``0..U-1``; a batch whose ids are too many for that
  is cut in halves), then merged into the sorted arrays. Dense ``[V, V]`` arrays are
  built only when asked for (``sum``, ``count``, ``mean()``, ...) and only when they
  fit (:class:`TableTooLarge` otherwise, before allocating).

The aggregator is additive: shards (files, DDP ranks) are merged by summing
(:meth:`VocabAttention.merge`, :meth:`VocabAttention.all_reduce`), and memory does
not grow with the length of the stream beyond the pairs it has seen.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnlab.io import compiled_kernel

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["VocabAttention", "TableTooLarge", "AUTO_DENSE_BYTES", "MAX_DENSE_BYTES", "special_token_ids"]

_FORMAT_DENSE = 1      # state: [V, V] tables
_FORMAT_SPARSE = 2     # state: the seen pairs (query_id, key_id) and their values
_RANK_BY = ("lift", "mean", "sum", "count", "expected")
_MAX_EXACT_COUNT = 2 ** 53   # counts are kept in float64 (the real part of a complex table)
_PAIR_GROUPS = 4   # non-causal count/expected: rows grouped by their number of distinct ids

AUTO_DENSE_BYTES = 64 * 2 ** 20
"""``sparse=None`` keeps dense tables while they take at most this many bytes."""
MAX_DENSE_BYTES = 2 * 2 ** 30
"""Default ``max_dense_bytes``: the largest dense array one call may allocate."""
_BYTES_PER_PAIR = 96   # sparse: a batch is reduced in dense tables of at most this many bytes per pair
_PENDING_MIN = 1 << 16  # sparse: new pairs are merged into the main arrays once this many (or 1/4 of them)
_SPECIAL = re.compile(r"^(<[^<>\s]+>|\[[A-Za-z_][A-Za-z0-9_]*\])$")   # <pad>, <bos>, [CLS], [SEP], [unused0]

#: The version of _vocab.c this code expects (its KERNEL_VERSION).
KERNEL_VERSION = 2
#: The compiled count/expected loops (_vocab.c); None: torch's gathers and scatter.
_vocab = compiled_kernel("attnlab._vocab", KERNEL_VERSION)


class TableTooLarge(MemoryError):
    """A dense ``[V, V]`` array was asked for that is larger than ``max_dense_bytes``."""


def special_token_ids(itos: Sequence[str]) -> list[int]:
    """Ids of the tokens written like special tokens: ``<pad>``, ``<unk>``, ``<bos>``,
    ``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``, ``[unused0]`` (angle brackets around a word,
    or square brackets around an identifier)."""
    return [i for i, name in enumerate(itos) if _SPECIAL.match(str(name))]


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


# --------------------------------------------------------------------------- batch maths
@functools.lru_cache(maxsize=16)
def _lower_triangle(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat index ``i * n + j``, query ``i`` and key ``j`` of the pairs ``j <= i``."""
    i, j = torch.tril_indices(n, n)
    return i * n + j, i, j


@functools.lru_cache(maxsize=4)
def _ones(length: int) -> torch.Tensor:
    """A cached int64 vector of ones (scatter weights for counts; never written to)."""
    return torch.ones(length, dtype=torch.int64)


def _distinct_per_row(tok_bn: torch.Tensor, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of each row and their multiplicities.

    Returns ``tok_bu [B, U]`` (each row's distinct ids, padded with ``fill``) and
    ``mult_bu [B, U]`` (how often each occurs, 0 on padding), ``U`` = the largest
    number of distinct ids in a row.
    """
    b, n = tok_bn.shape
    sorted_bn, _ = tok_bn.sort(dim=1)
    starts = torch.ones_like(sorted_bn, dtype=torch.bool)
    starts[:, 1:] = sorted_bn[:, 1:] != sorted_bn[:, :-1]
    group_bn = starts.cumsum(dim=1) - 1                          # index of the distinct id
    u = int(group_bn[:, -1].max()) + 1
    mult_bu = torch.zeros(b, u, dtype=torch.int64).scatter_add_(1, group_bn, _ones(b * n).view(b, n))
    tok_bu = torch.full((b, u), fill, dtype=torch.int64).scatter_(1, group_bn, sorted_bn)
    return tok_bu, mult_bu


_PairGroups = list[tuple[torch.Tensor, torch.Tensor]]


@functools.lru_cache(maxsize=256)
def _upper_triangle(u: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of the cells ``q <= k`` of a ``u x u`` square, ``[1, u(u+1)/2]`` each."""
    q, k = torch.triu_indices(u, u)
    return q[None], k[None]


def _histogram_pairs(tok_bn: torch.Tensor, valid_bn: torch.Tensor | None, sink: int,
                     upper: bool = False) -> _PairGroups:
    """``(cells, count + i·expected)`` groups of the non-causal pairs, from each
    sequence's token histogram instead of its ``N²`` position pairs. ``upper``: only the
    cells ``query id <= key id`` (the contributions are symmetric; see ``_fold``)."""
    b, n = tok_bn.shape
    side = sink + 1
    # Without causality every query of sequence b has the same n_b valid keys,
    # so count and expected only depend on each sequence's token histogram h_b:
    # count += h_b ⊗ h_b, expected += h_b ⊗ h_b / n_b, over distinct tokens.
    # Rows are padded to the largest number of distinct ids in the batch, and
    # masked positions share the sink id (sorted last): group rows of similar
    # size and cut each group at its own largest count of real ids, so that
    # padding and sink pairs are mostly not scattered (those of the narrower
    # rows of a group still land in the sink row/column, never read).
    tok_bu, mult_bu = _distinct_per_row(tok_bn, sink)  # [B, U]
    n_valid_b = (torch.full((b,), n, dtype=torch.int64) if valid_bn is None
                 else valid_bn.sum(dim=1))
    real_b = (tok_bu < sink).sum(dim=1)
    real_b, order = real_b.sort(descending=True, stable=True)
    mult_bu = mult_bu[order].to(torch.float64)
    tok_bu = tok_bu[order]
    # h_q · h_k · (1 + i / n_b): count in the real part, expected in the imaginary
    inv_b = 1.0 / n_valid_b[order].clamp_min(1).to(torch.float64)
    pair_groups = []
    step = -(-b // _PAIR_GROUPS)
    for start, u in zip(range(0, b, step), real_b[::step].tolist()):
        t, m = tok_bu[start:start + step, :u], mult_bu[start:start + step, :u]
        inv = inv_b[start:start + step, None]
        if upper:
            # each row's ids are sorted, so the pairs q <= k of its histogram are the cells
            # query id <= key id: about half the scatter of the full outer product
            q, k = (ix.expand(len(t), -1) for ix in _upper_triangle(u))
            cells = torch.gather(t, 1, q).mul_(side).add_(torch.gather(t, 1, k))
            count = torch.gather(m, 1, q).mul_(torch.gather(m, 1, k))
        else:
            cells = t[:, :, None] * side + t[:, None, :]
            count = m[:, :, None] * m[:, None, :]
            inv = inv[:, :, None]
        pair_groups.append((cells.reshape(-1), torch.complex(count, count * inv).reshape(-1)))
    return pair_groups


def _scatter_batch(sum_t: torch.Tensor, ce_t: torch.Tensor, tok_bn: torch.Tensor, valid_bn: torch.Tensor | None,
                   weights: torch.Tensor, causal: bool, sym_t: torch.Tensor | None = None) -> None:
    """Add one batch into flat ``(S + 1) x (S + 1)`` tables, in place.

    ``sum_t [n_sum, (S+1)²]`` float64, ``ce_t [(S+1)²]`` complex128 (count + i·expected);
    ``tok_bn [B, N]`` ids in ``[0, S]`` where ``S`` (the sink) marks masked positions;
    ``weights [B, (H,) P]``: the attention of every pair (``P = N²``), or of the pairs
    ``j <= i`` in :func:`_lower_triangle` order when ``causal``. With a head dimension,
    ``sum_t`` has one row per head. ``sym_t`` (like ``ce_t``; non-causal only): receives the
    count/expected of the cells ``query id <= key id`` instead, to be folded into ``ce_t``
    (``ce += sym + symᵀ - diag(sym)``) before it is read.
    """
    b, n = tok_bn.shape
    side = math.isqrt(ce_t.shape[0])
    if causal:
        # Only the lower triangle j <= i is read; the number of valid keys of query i
        # is the number of valid positions up to i.
        _, query_of_pair, key_of_pair = _lower_triangle(n)          # [T], T = N(N+1)/2
        query_bt = query_of_pair.expand(b, -1)      # (gather beats index_select on dim 1)
        idx = torch.gather(tok_bn, 1, query_bt).mul_(side)
        idx = idx.add_(torch.gather(tok_bn, 1, key_of_pair.expand(b, -1))).reshape(-1)
        if _vocab is not None:
            # each row's valid pairs in one compiled loop (_vocab.c), masked pairs skipped
            _vocab.causal_pairs(torch.view_as_real(ce_t).numpy(), tok_bn.contiguous().numpy(), side)
            groups = []
        else:
            n_keys_bn = (torch.arange(1, n + 1).expand(b, n) if valid_bn is None
                         else valid_bn.cumsum(dim=1))
            # count + i·expected of each pair: 1 + i / (valid keys of its query)
            inv_keys_bn = torch.complex(torch.ones(b, n, dtype=torch.float64),
                                        1.0 / n_keys_bn.clamp_min(1).to(torch.float64))
            groups = [(idx, torch.gather(inv_keys_bn, 1, query_bt).reshape(-1))]
    else:
        idx = (tok_bn[:, :, None] * side + tok_bn[:, None, :]).reshape(-1)
        target = ce_t if sym_t is None else sym_t
        if _vocab is not None:
            # each sorted row's histogram pairs in one compiled loop (_vocab.c)
            _vocab.histogram_pairs(torch.view_as_real(target).numpy(), tok_bn.sort(dim=1).values.numpy(), side,
                                   sym_t is not None)
            groups = []
        else:
            groups = _histogram_pairs(tok_bn, valid_bn, side - 1, upper=sym_t is not None)
        ce_t = target
    w64 = weights.to(torch.float64)
    if w64.dim() == 2:
        sum_t[0].scatter_add_(0, idx, w64.reshape(-1))
    else:
        head_offset = (torch.arange(w64.shape[1]) * (side * side))[None, :, None]
        sum_t.view(-1).scatter_add_(0, (idx.view(b, 1, -1) + head_offset).reshape(-1), w64.reshape(-1))
    for pair_idx, pair_count_expected in groups:
        ce_t.scatter_add_(0, pair_idx, pair_count_expected)


def _pairs_per_sequence(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def _extract(sum_t: torch.Tensor, ce_t: torch.Tensor, vocab_size: int, ids: torch.Tensor | None = None,
             with_cells: bool = False) -> tuple[torch.Tensor, ...]:
    """The cells of flat ``(S + 1)²`` tables with ``count > 0`` outside the sink row and
    column (``S = side - 1``), as sorted global keys ``query·V + key`` ``[K]``, sums
    ``[n_sum, K]`` and count + i·expected ``[K]``. ``ids [S]`` maps table ids to token ids
    (increasing, so the keys stay sorted); ``None``: the table ids are the token ids.
    ``with_cells``: also return the flat cells ``[K]`` read."""
    side = math.isqrt(ce_t.shape[0])
    count = torch.view_as_real(ce_t)[:, 0].view(side, side)[:-1, :-1]   # without the sink
    q, k = count.nonzero(as_tuple=True)                                 # row-major: sorted
    cell = q * side + k
    if ids is not None:
        q, k = ids[q], ids[k]
    out = (q * vocab_size + k, sum_t[:, cell], ce_t[cell])
    return (*out, cell) if with_cells else out


_Entries = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # keys [K] sorted, sums [n_sum, K], ce [K]


def _empty_entries(n_sum: int) -> _Entries:
    return (torch.zeros(0, dtype=torch.int64), torch.zeros(n_sum, 0, dtype=torch.float64),
            torch.zeros(0, dtype=torch.complex128))


def _combine(parts: list[_Entries]) -> _Entries:
    """Sum entries of several parts (each with sorted unique keys) into sorted unique keys."""
    if len(parts) == 1:
        return parts[0]
    keys = torch.cat([p[0] for p in parts])
    uniq, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(parts[0][1].shape[0], len(uniq), dtype=torch.float64)
    sums.index_add_(1, inverse, torch.cat([p[1] for p in parts], dim=1))
    ce = torch.zeros(len(uniq), dtype=torch.complex128).index_add_(0, inverse, torch.cat([p[2] for p in parts]))
    return uniq, sums, ce


def _merge_entries(a: _Entries, b: _Entries) -> _Entries:
    """``a + b`` (both with sorted unique keys). ``a``'s arrays may be updated in place and
    reused; ``b``'s are only read."""
    a_keys, a_sums, a_ce = a
    b_keys, b_sums, b_ce = b
    if len(b_keys) == 0:
        return a
    if len(a_keys) == 0:
        return b_keys.clone(), b_sums.clone(), b_ce.clone()
    pos = torch.searchsorted(a_keys, b_keys)
    hit = a_keys[pos.clamp_max(len(a_keys) - 1)] == b_keys
    if bool(hit.all()):
        a_sums.index_add_(1, pos, b_sums)
        a_ce.index_add_(0, pos, b_ce)
        return a
    hit_pos = pos[hit]
    a_sums.index_add_(1, hit_pos, b_sums[:, hit])
    a_ce.index_add_(0, hit_pos, b_ce[hit])
    new = ~hit
    new_keys = b_keys[new]
    dest = pos[new] + torch.arange(len(new_keys))             # where each new key lands in the merged array
    total = len(a_keys) + len(new_keys)
    is_new = torch.zeros(total, dtype=torch.bool)
    is_new[dest] = True
    old_dest = (~is_new).nonzero().squeeze(1)
    keys = torch.empty(total, dtype=torch.int64)
    keys[old_dest], keys[dest] = a_keys, new_keys
    sums = torch.empty(a_sums.shape[0], total, dtype=torch.float64)
    sums[:, old_dest], sums[:, dest] = a_sums, b_sums[:, new]
    ce = torch.empty(total, dtype=torch.complex128)
    ce[old_dest], ce[dest] = a_ce, b_ce[new]
    return keys, sums, ce


class _SparseStore:
    """Sorted unique keys with their sums and count + i·expected: the main arrays, plus the
    batches added since they were last merged (each sorted and unique), summed together
    and merged into the main arrays once they hold a quarter as many pairs (or when read):
    a batch costs O(its pairs), and each merge is paid for by as many new pairs."""

    def __init__(self, n_sum: int):
        self.main = _empty_entries(n_sum)
        self.pending: list[_Entries] = []
        self.n_pending = 0

    def add(self, entries: _Entries) -> None:
        if len(entries[0]):
            self.pending.append(entries)
            self.n_pending += len(entries[0])
        if self.n_pending > max(len(self.main[0]) // 4, _PENDING_MIN):
            self.consolidate()

    def consolidate(self) -> _Entries:
        if self.pending:
            self.main = _merge_entries(self.main, _combine(self.pending))
            self.pending, self.n_pending = [], 0
        return self.main


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a torch.Tensor or array, got {type(x).__name__}") from exc


def _check_finite_pairs(attn: torch.Tensor, valid: torch.Tensor | None, causal: bool) -> None:
    """NaN/Inf are allowed only on the pairs that are never read (a masked query or key,
    or a key after the query when causal); raise ``ValueError`` counting the others.
    (Only called once a one-pass reduction has seen a NaN or Inf.)"""
    b, n = attn.shape[0], attn.shape[-1]
    read = torch.ones(b, n, n, dtype=torch.bool) if valid is None else valid[:, :, None] & valid[:, None, :]
    if causal:
        read &= torch.ones(n, n, dtype=torch.bool).tril()
    if attn.dim() == 4:
        read = read[:, None]
    bad = int((~torch.isfinite(attn) & read).sum())
    if bad:
        raise ValueError(f"attention: {bad} NaN or Inf value{'s' if bad > 1 else ''} on valid (query, key) pairs "
                         f"(shape {list(attn.shape)}); expected finite weights there (masked pairs may hold anything)")


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


class VocabAttention:
    """Token x token aggregation of attention, streamed batch by batch.

    Args:
        vocab_size: ``V``; token ids must lie in ``[0, V)``.
        nhead: ``None`` (default) averages the heads of ``[B, H, N, N]`` attention
            into one ``[V, V]`` ``sum``. An integer ``H`` keeps one sum per head,
            ``sum [H, V, V]`` (``count`` and ``expected`` do not depend on the head
            and stay ``[V, V]``); ``update`` then requires ``[B, H, N, N]``.
        sparse: ``None`` (default): dense tables while they take at most
            :data:`AUTO_DENSE_BYTES` (64 MiB: ``V`` up to ~1,300 with heads averaged,
            ~1,000 with 4 heads), sparse beyond. ``True``: keep only the pairs seen, memory
            ``O(distinct pairs + one batch)``. ``False``: dense ``[V, V]`` tables.
        max_dense_bytes: the largest dense array this aggregator builds (the tables
            with ``sparse=False``; ``sum``, ``mean()``, ... of a sparse one); beyond it
            :class:`TableTooLarge` is raised before allocating.

    Per layer: keep one aggregator per layer, e.g. with an
    :class:`~attnlab.AttentionRecorder`::

        aggs = [VocabAttention(V, nhead=H) for _ in range(n_layers)]
        for tokens, mask in loader:
            with AttentionRecorder(model) as rec:
                model(tokens, src_key_padding_mask=~mask)
            for agg, attn_bhnn in zip(aggs, rec.attentions):
                agg.update(tokens, attn_bhnn, mask=mask)

    Masks follow the *valid* convention: ``mask[b, i]`` is True (or 1) where position
    ``i`` holds a real token. This is the opposite of ``nn.MultiheadAttention``'s
    ``key_padding_mask`` (True = padding): pass ``~key_padding_mask``. Special tokens
    such as ``[CLS]``/``[SEP]`` are aggregated like any token; drop them when reading
    (``exclude="special"`` in :meth:`top_pairs` / :meth:`to_frame`).

    Attributes (read-only numpy arrays; copy them before modifying):
        sum: ``[V, V]`` (or ``[H, V, V]``) float64 (dense: a view of the running table;
            sparse: a new array, if it fits in ``max_dense_bytes``).
        count: ``[V, V]`` int64, a snapshot (a new array on each access).
        expected: ``[V, V]`` float64 (dense: a view of the running table, current as of
            the access; sparse: a new array).
        n_sequences: number of sequences seen (merged aggregators add up).
        sparse: which layout this aggregator uses.
    For large vocabularies read the seen pairs instead: :meth:`pairs`, :meth:`to_frame`,
    :meth:`top_pairs`, :meth:`submatrix`, :meth:`token_pair_counts`.
    """

    def __init__(self, vocab_size: int, nhead: int | None = None, *, sparse: bool | None = None,
                 max_dense_bytes: int = MAX_DENSE_BYTES):
        if not _positive_int(vocab_size):
            raise ValueError(f"vocab_size={vocab_size!r}: expected a positive integer")
        if nhead is not None and not _positive_int(nhead):
            raise ValueError(f"nhead={nhead!r}: expected None or a positive integer")
        if sparse not in (None, True, False):
            raise ValueError(f"sparse={sparse!r}: expected None (chosen by size), True or False")
        if not _positive_int(max_dense_bytes):
            raise ValueError(f"max_dense_bytes={max_dense_bytes!r}: expected a positive integer (bytes)")
        self.vocab_size = int(vocab_size)
        self.nhead = None if nhead is None else int(nhead)
        self.max_dense_bytes = int(max_dense_bytes)
        self.n_sequences = 0
        self._n_sum = 1 if self.nhead is None else self.nhead
        side = self.vocab_size + 1
        dense_bytes = side * side * (8 * self._n_sum + 32)   # sum, count + i·expected, its symmetric half
        if sparse is None:
            sparse = dense_bytes > AUTO_DENSE_BYTES
        if not sparse and dense_bytes > self.max_dense_bytes:
            raise TableTooLarge(f"VocabAttention(vocab_size={self.vocab_size}, nhead={self.nhead}, sparse=False): "
                                f"the dense tables need {_fmt_bytes(dense_bytes)}, more than max_dense_bytes="
                                f"{_fmt_bytes(self.max_dense_bytes)}; use sparse=True (or None)")
        self._sparse = bool(sparse)
        # Dense tables are (V + 1) x (V + 1), flattened: id V (the sink) collects every pair
        # that has a masked position, so masking costs O(B·N) instead of a selection over
        # B·N·N pairs; the sink row/column is never exposed. count and expected always land
        # on the same cells, so they share one complex table (real = count, imaginary =
        # expected): one scatter instead of two, both halves of a cell in one cache line.
        # Counts stay exact integers in float64 up to 2**53 pairs per cell.
        # Sparse: the same tables serve as a per-batch-sized buffer when (V + 1)² is at most
        # _BYTES_PER_PAIR x a batch's pairs (small vocabularies), flushed into the sorted
        # store when read; otherwise each batch is reduced over the ids it contains.
        # Non-causal count/expected are symmetric: their upper triangle accumulates in _sym
        # (allocated at the first non-causal update) and is folded in before any read.
        self._sum: torch.Tensor | None = None
        self._count_expected: torch.Tensor | None = None
        self._sym: torch.Tensor | None = None
        self._sym_dirty = False
        self._buffer_dirty = False
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None     # sparse: per-batch tables
        self._store = _SparseStore(self._n_sum) if self._sparse else None
        if not self._sparse:
            self._allocate_tables()

    def _allocate_tables(self) -> None:
        side = self.vocab_size + 1
        self._sum = torch.zeros(self._n_sum, side * side, dtype=torch.float64)
        self._count_expected = torch.zeros(side * side, dtype=torch.complex128)

    def _ce(self) -> torch.Tensor:
        """The flat count + i·expected table with the symmetric part folded in."""
        if self._sym_dirty:
            side = self.vocab_size + 1
            sym, ce = self._sym.view(side, side), self._count_expected.view(side, side)
            ce += sym
            ce += sym.T
            ce.diagonal().sub_(sym.diagonal())
            sym.zero_()
            ce[-1, :] = 0                  # the sink row/column collected pairs with masked positions
            ce[:, -1] = 0
            self._sym_dirty = False
        return self._count_expected

    def _sym_table(self, causal: bool) -> torch.Tensor | None:
        if causal:
            return None
        if self._sym is None:
            self._sym = torch.zeros_like(self._count_expected)
        self._sym_dirty = True
        return self._sym

    @property
    def sparse(self) -> bool:
        """True when only the seen pairs are kept (memory ``O(pairs)``, not ``O(V²)``)."""
        return self._sparse

    # ------------------------------------------------------------------ entries
    def _entries(self) -> _Entries:
        """Every pair with ``count > 0``: sorted keys ``query·V + key`` ``[K]``, sums
        ``[n_sum, K]``, count + i·expected ``[K]`` (sparse: the store's own arrays, not to
        be modified)."""
        if not self._sparse:
            return _extract(self._sum, self._ce(), self.vocab_size)
        if self._buffer_dirty:
            self._store.add(_extract(self._sum, self._ce(), self.vocab_size))
            self._sum.zero_()
            self._count_expected.zero_()
            self._buffer_dirty = False
        return self._store.consolidate()

    def pairs(self, head: int | None = None) -> dict[str, np.ndarray]:
        """The token pairs seen (``count > 0``), sorted by (query id, key id), as numpy arrays:
        ``query_id [K]``, ``key_id [K]``, ``sum [K]`` (``[H, K]`` per head unless ``head``
        picks one), ``count [K]`` int64, ``expected [K]`` float64. Memory ``O(K)``."""
        keys, sums, ce = self._entries()
        if head is not None:
            self._check_head(head)
            sums = sums[head]
        elif self.nhead is None:
            sums = sums[0]
        ce_np = torch.view_as_real(ce).numpy()
        keys_np = keys.numpy()
        return {"query_id": keys_np // self.vocab_size, "key_id": keys_np % self.vocab_size,
                "sum": sums.numpy().copy(), "count": ce_np[:, 0].astype(np.int64), "expected": ce_np[:, 1].copy()}

    def _check_head(self, head: Any) -> None:
        if self.nhead is None:
            raise ValueError(f"head={head!r}: this aggregator averages heads (nhead=None)")
        if not (isinstance(head, (int, np.integer)) and not isinstance(head, bool) and 0 <= head < self.nhead):
            raise ValueError(f"head={head!r}: expected an integer in [0, {self.nhead})")

    # ------------------------------------------------------------------ state
    def _square(self, flat: torch.Tensor | np.ndarray) -> np.ndarray:
        side = self.vocab_size + 1
        flat = flat.numpy() if isinstance(flat, torch.Tensor) else flat
        view = flat.reshape(*flat.shape[:-1], side, side)[..., :-1, :-1]
        view.flags.writeable = False
        return view

    def _dense(self, name: str, values: list[np.ndarray], keys: np.ndarray, fill: float,
               per_head: bool = False) -> np.ndarray:
        """A new ``[V, V]`` (``per_head``: ``[H, V, V]``) float64 array holding ``values[r]``
        at the flat ``keys`` and ``fill`` elsewhere, after checking it fits in ``max_dense_bytes``."""
        v = self.vocab_size
        n_rows = len(values)
        shape = [n_rows, v, v] if per_head else [v, v]
        need = n_rows * v * v * 8
        if need > self.max_dense_bytes:
            raise TableTooLarge(f"{name}: a dense {shape} float64 array needs {_fmt_bytes(need)}, more than "
                                f"max_dense_bytes={_fmt_bytes(self.max_dense_bytes)}; read the {len(keys):,} "
                                "seen pairs with pairs(), to_frame() or top_pairs(), or a block with submatrix()")
        out = np.full((n_rows, v * v), fill)
        for r in range(n_rows):
            out[r, keys] = values[r]
        out = out.reshape(shape)
        out.flags.writeable = False
        return out

    @property
    def sum(self) -> np.ndarray:
        """``[V, V]`` float64 (``[H, V, V]`` with ``nhead``): Σ attention per token pair."""
        if not self._sparse:
            out = self._square(self._sum)
            return out[0] if self.nhead is None else out
        keys, sums, _ = self._entries()
        return self._dense("sum", list(sums.numpy()), keys.numpy(), 0.0, self.nhead is not None)

    def _counts(self) -> np.ndarray:
        """``[V, V]`` float64 counts (dense: a view of the complex table's real part)."""
        if not self._sparse:
            return self._square(self._ce().numpy().real)
        keys, _, ce = self._entries()
        return self._dense("count", [ce.real.numpy()], keys.numpy(), 0.0)

    @property
    def count(self) -> np.ndarray:
        """``[V, V]`` int64: number of valid position pairs per token pair (a snapshot:
        counts are kept as float64, exact up to 2**53 per cell, and converted here)."""
        out = self._counts().astype(np.int64)
        out.flags.writeable = False
        return out

    @property
    def expected(self) -> np.ndarray:
        """``[V, V]`` float64: Σ 1 / (valid keys of the query) per token pair."""
        if not self._sparse:
            return self._square(self._ce().numpy().imag)
        keys, _, ce = self._entries()
        return self._dense("expected", [ce.imag.numpy()], keys.numpy(), 0.0)

    def mean(self) -> np.ndarray:
        """``sum / count`` (``[V, V]`` or ``[H, V, V]``); NaN where ``count == 0``."""
        return self._ratio("mean")

    def lift(self) -> np.ndarray:
        """``sum / expected`` (``[V, V]`` or ``[H, V, V]``); NaN where ``count == 0``.

        1 = the query token gives the key token the attention uniform attention would;
        > 1 = more, < 1 = less.
        """
        return self._ratio("lift")

    def _ratio(self, what: str) -> np.ndarray:
        if not self._sparse:
            seen = self._counts() > 0
            num = self.sum
            den = self._counts() if what == "mean" else self.expected
            out = np.full(num.shape, np.nan)
            np.divide(num, den, out=out, where=np.broadcast_to(seen, num.shape))
            return out
        keys, sums, ce = self._entries()
        den = ce.real if what == "mean" else ce.imag
        values = list((sums / den).numpy())
        return self._dense(f"{what}()", values, keys.numpy(), np.nan, self.nhead is not None)

    # ----------------------------------------------------------------- update
    def update(self, tokens: Any, attention: Any, mask: Any = None, causal: bool = False) -> "VocabAttention":
        """Add one batch.

        Args:
            tokens: ``[B, N]`` integer token ids in ``[0, V)`` (ids at masked positions
                are ignored and may be anything, e.g. ``-1``).
            attention: ``[B, N, N]`` or ``[B, H, N, N]`` (query x key) weights, any float
                dtype. Heads are averaged unless the aggregator has ``nhead``. Rows
                need not sum to 1 (rollout or gradient-weighted maps are fine); entries
                of invalid pairs are never read, so they may be NaN.
            mask: ``[B, N]`` bool (or 0/1), True = valid token, False = padding.
                ``None``: every position is valid.
            causal: also drop keys after the query (a valid pair needs ``j <= i``).

        Returns:
            ``self``.

        Raises:
            ValueError: shapes that do not fit together, token ids outside ``[0, V)``,
                mask values other than 0/1, head count different from ``nhead``, NaN or
                Inf attention on a valid pair.
            TypeError: non-integer tokens or non-float attention.
        """
        tok_bn, attn, valid_bn = self._check(tokens, attention, mask)
        b, n = tok_bn.shape
        if b == 0 or n == 0:
            self.n_sequences += b
            return self
        weights = attn
        if self.nhead is None and attn.dim() == 4:
            # Average heads in the input precision (float16 is promoted to float32).
            weights = attn.mean(dim=1, dtype=torch.float32 if attn.dtype == torch.float16 else None)
        weights = weights.reshape(*weights.shape[:-2], n * n)           # [B, (H,) N·N]
        if causal:
            weights = weights.index_select(-1, _lower_triangle(n)[0])   # [B, (H,) T], T = N(N+1)/2
        # One pass over what is read: NaN/Inf propagate into the min or the max (and into
        # the head mean); only then look at where they are.
        lo, hi = torch.aminmax(weights)
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            _check_finite_pairs(attn, valid_bn, causal)
        if valid_bn is not None:
            tok_bn = torch.where(valid_bn, tok_bn, self.vocab_size)    # masked -> sink id V
        if not self._sparse:
            _scatter_batch(self._sum, self._count_expected, tok_bn, valid_bn, weights, causal, self._sym_table(causal))
            if valid_bn is not None:
                self._clear_sink()
        else:
            self._update_sparse(tok_bn, valid_bn, weights, causal)
        self.n_sequences += b
        return self

    def _clear_sink(self) -> None:
        """Everything involving a masked position went to row/column V: drop it."""
        side = self.vocab_size + 1
        for table in (self._sum, self._count_expected):
            square = table.view(-1, side, side)
            square[:, -1, :] = 0
            square[:, :, -1] = 0

    def _update_sparse(self, tok_bn: torch.Tensor, valid_bn: torch.Tensor | None, weights: torch.Tensor,
                       causal: bool) -> None:
        b, n = tok_bn.shape
        side = self.vocab_size + 1
        fits = side * side * (8 * self._n_sum + 32) <= _BYTES_PER_PAIR * b * _pairs_per_sequence(n, causal)
        if self._sum is not None or fits:
            # A small vocabulary: the (V+1)² tables are no larger than a batch's pairs.
            if self._sum is None:
                self._allocate_tables()
            _scatter_batch(self._sum, self._count_expected, tok_bn, valid_bn, weights, causal,
                           self._sym_table(causal))
            self._buffer_dirty = True
            return
        parts: list[_Entries] = []
        self._reduce_local(tok_bn, valid_bn, weights, causal, parts)
        for part in parts:                 # summed with the other pending parts when merged
            self._store.add(part)

    def _reduce_local(self, tok_bn: torch.Tensor, valid_bn: torch.Tensor | None, weights: torch.Tensor,
                      causal: bool, parts: list[_Entries]) -> None:
        """Reduce sequences over the ids they contain: relabel them ``0..U-1`` (the sink
        id V, sorted last, becomes ``U``), scatter into ``(U+1)²`` tables, keep the
        nonzero cells. A block whose tables would exceed ``_BYTES_PER_PAIR`` bytes per
        pair is cut in halves (one sequence always fits: U <= N)."""
        b, n = tok_bn.shape
        ids, local_bn = torch.unique(tok_bn, return_inverse=True)       # sorted: the sink V last
        u = len(ids) - int(ids[-1] == self.vocab_size)
        side = u + 1
        if b > 1 and side * side * (8 * self._n_sum + 16) > _BYTES_PER_PAIR * b * _pairs_per_sequence(n, causal):
            half = b // 2
            for rows in (slice(0, half), slice(half, b)):
                self._reduce_local(tok_bn[rows], None if valid_bn is None else valid_bn[rows], weights[rows],
                                   causal, parts)
            return
        sum_t, ce_t = self._scratch_tables(side * side)
        _scatter_batch(sum_t, ce_t, local_bn, valid_bn, weights, causal)
        keys, sums, ce, cell = _extract(sum_t, ce_t, self.vocab_size, ids, with_cells=True)
        parts.append((keys, sums, ce))
        # leave the scratch tables zero: only the extracted cells and the sink row/column were written
        sum_t.index_fill_(1, cell, 0)
        ce_t.index_fill_(0, cell, 0)
        for table in (sum_t.view(-1, side, side), ce_t.view(side, side)[None]):
            table[:, -1, :] = 0
            table[:, :, -1] = 0

    def _scratch_tables(self, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed flat tables ``sum [n_sum, cells]`` and ``count + i·expected [cells]``, views of
        buffers kept between batches (their size is bounded by a batch's pairs) so that each
        batch pays neither the allocation nor the zeroing of its tables; callers re-zero the
        cells they wrote."""
        if self._scratch is None or self._scratch[1].shape[0] < cells:
            self._scratch = (torch.zeros(self._n_sum * cells, dtype=torch.float64),
                             torch.zeros(cells, dtype=torch.complex128))
        flat_sum, flat_ce = self._scratch
        return flat_sum[:self._n_sum * cells].view(self._n_sum, cells), flat_ce[:cells]

    def _check(self, tokens: Any, attention: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Shapes, dtypes, mask values and token ids (finiteness is checked in ``update``
        on the weights it reads)."""
        tok = _as_tensor(tokens, "tokens")
        attn = _as_tensor(attention, "attention")
        if tok.dim() != 2:
            raise ValueError(f"tokens: expected shape [B, N], got {list(tok.shape)}")
        if tok.dtype.is_floating_point or tok.dtype.is_complex or tok.dtype == torch.bool:
            raise TypeError(f"tokens: expected integer token ids, got dtype {tok.dtype}")
        b, n = tok.shape
        if not attn.dtype.is_floating_point:
            raise TypeError(f"attention: expected a float tensor, got dtype {attn.dtype}")
        if attn.dim() not in (3, 4) or attn.shape[0] != b or attn.shape[-2:] != (n, n):
            raise ValueError(f"attention: expected [B, N, N] or [B, H, N, N] with B={b}, N={n} "
                             f"(tokens {list(tok.shape)}), got {list(attn.shape)}")
        if self.nhead is not None and (attn.dim() != 4 or attn.shape[1] != self.nhead):
            raise ValueError(f"attention: this aggregator keeps nhead={self.nhead} per-head sums and "
                             f"needs [B, {self.nhead}, N, N], got {list(attn.shape)}")
        valid = None
        if mask is not None:
            m = _as_tensor(mask, "mask")
            if tuple(m.shape) != (b, n):
                raise ValueError(f"mask: expected shape [B, N] = {[b, n]} like tokens, got {list(m.shape)}")
            if m.dtype != torch.bool:
                bad = m[(m != 0) & (m != 1)]
                if bad.numel():
                    raise ValueError(f"mask: expected bool or 0/1 (True/1 = valid token), found {bad[0].item()}")
                m = m != 0
            valid = m
        tok = tok.to(torch.int64)
        if tok.numel():
            lo, hi = torch.aminmax(tok if valid is None else torch.where(valid, tok, 0))
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.vocab_size:
                bad_value = lo if lo < 0 else hi
                raise ValueError(f"tokens: id {bad_value} is outside [0, vocab_size={self.vocab_size})")
        return tok, attn, valid

    # ------------------------------------------------------------------ merge
    def _reset(self) -> None:
        if self._sparse:
            self._store = _SparseStore(self._n_sum)
            self._sum = self._count_expected = self._sym = None
            self._buffer_dirty = self._sym_dirty = False
        else:
            self._sum.zero_()
            self._ce().zero_()

    def _add_entries(self, entries: _Entries) -> None:
        if self._sparse:
            self._store.add(entries)
            return
        keys, sums, ce = entries
        v = self.vocab_size
        cell = keys // v * (v + 1) + keys % v
        self._sum.index_add_(1, cell, sums)
        self._count_expected.index_add_(0, cell, ce)

    def all_reduce(self, group: Any = None) -> "VocabAttention":
        """Under ``torch.distributed``: sum the tables of every process of ``group`` into
        each process's aggregator, in place, as if :meth:`merge` had added the others'
        (each process aggregated its own sequences). Nothing to do in one process.
        Dense aggregators all-reduce their tables; when any process is sparse, every
        process all-gathers the others' seen pairs and adds them. Returns ``self``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        world = dist.get_world_size(group)
        metas: list[Any] = [None] * world
        dist.all_gather_object(metas, (self.vocab_size, self.nhead, self._sparse), group=group)
        shapes = [meta[:2] for meta in metas]
        if len(set(shapes)) > 1:
            raise ValueError(f"all_reduce: the processes' aggregators differ in (vocab_size, nhead): {shapes}")
        on_gpu = dist.get_backend(group) == "nccl"          # NCCL reduces CUDA tensors only

        def reduce_(table: torch.Tensor) -> None:
            shared = table.cuda() if on_gpu else table
            dist.all_reduce(shared, group=group)
            if on_gpu:
                table.copy_(shared)

        n = torch.tensor([float(self.n_sequences)], dtype=torch.float64)
        reduce_(n)
        if not any(meta[2] for meta in metas):
            for table in (self._sum, torch.view_as_real(self._ce())):   # complex as real pairs
                reduce_(table)
            self.n_sequences = int(n.item())
            return self
        keys, sums, ce = self._entries()
        sizes: list[Any] = [None] * world
        dist.all_gather_object(sizes, len(keys), group=group)
        width = max(sizes)
        # one float64 buffer per process: key (exact below 2**53), sums, count, expected
        mine = torch.zeros(self._n_sum + 3, width, dtype=torch.float64)
        mine[0, :len(keys)] = keys.to(torch.float64)
        mine[1:1 + self._n_sum, :len(keys)] = sums
        mine[-2:, :len(keys)] = torch.view_as_real(ce).T
        if on_gpu:
            mine = mine.cuda()
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        self._reset()
        for size, theirs in zip(sizes, gathered):      # every process adds in the same order
            theirs = theirs.cpu()[:, :size]
            self._add_entries((theirs[0].to(torch.int64), theirs[1:1 + self._n_sum].contiguous(),
                               torch.complex(theirs[-2], theirs[-1])))
        self.n_sequences = int(n.item())
        return self

    def merge(self, other: "VocabAttention") -> "VocabAttention":
        """Add ``other``'s tables into this one (shards, DDP ranks; either layout).
        Returns ``self``."""
        if not isinstance(other, VocabAttention):
            raise TypeError(f"merge: expected a VocabAttention, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"merge: vocab_size {other.vocab_size} != {self.vocab_size}")
        if other.nhead != self.nhead:
            raise ValueError(f"merge: nhead {other.nhead} != {self.nhead}")
        if not self._sparse and not other._sparse:
            self._sum += other._sum
            self._count_expected += other._ce()
        else:   # copies: a sparse store keeps the arrays it is given, and other's may change
            self._add_entries(tuple(t.clone() for t in other._entries()))
        self.n_sequences += other.n_sequences
        return self

    def head_mean(self) -> "VocabAttention":
        """A head-averaged aggregator (``nhead=None``) with the same count/expected and layout.

        Equal to streaming the same batches with heads averaged, since the per-head
        sums share their pairs.
        """
        out = VocabAttention(self.vocab_size, sparse=self._sparse, max_dense_bytes=self.max_dense_bytes)
        if self._sparse:
            keys, sums, ce = self._entries()
            out._store.main = (keys.clone(), sums.mean(dim=0, keepdim=True), ce.clone())
        else:
            out._sum = self._sum.mean(dim=0, keepdim=True)
            out._count_expected = self._ce().clone()
        out.n_sequences = self.n_sequences
        return out

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (copies). Dense: ``sum``, ``count``, ``expected`` as ``[V, V]``
        tables (format 1). Sparse: the seen pairs, ``query_id``, ``key_id``, ``sum``
        (``[K]`` or ``[H, K]``), ``count``, ``expected`` (format 2). Plus metadata."""
        meta = {"vocab_size": np.asarray(self.vocab_size),
                "nhead": np.asarray(-1 if self.nhead is None else self.nhead),
                "n_sequences": np.asarray(self.n_sequences)}
        if not self._sparse:
            return {"format_version": np.asarray(_FORMAT_DENSE), **meta,
                    "sum": np.array(self.sum),
                    "count": self.count.copy(),      # already a fresh array; copy() drops read-only
                    "expected": np.array(self.expected)}
        return {"format_version": np.asarray(_FORMAT_SPARSE), **meta, **self.pairs()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, sparse: bool | None = None,
                        max_dense_bytes: int = MAX_DENSE_BYTES) -> "VocabAttention":
        """Inverse of :meth:`state_dict`, in either layout (``sparse`` as in the constructor:
        ``None`` chooses by size, whatever the state's layout). Files saved before the heads
        key was named ``nhead`` call it ``n_heads``."""
        if "n_heads" in state and "nhead" not in state:
            state = {**state, "nhead": state["n_heads"]}
        version = int(np.asarray(state.get("format_version", _FORMAT_DENSE)))
        if version not in (_FORMAT_DENSE, _FORMAT_SPARSE):
            raise ValueError(f"state: format_version {version} is not supported (expected {_FORMAT_DENSE} "
                             f"or {_FORMAT_SPARSE})")
        required = {"vocab_size", "nhead", "sum", "count", "expected"}
        if version == _FORMAT_SPARSE:
            required |= {"query_id", "key_id"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        nhead = int(np.asarray(state["nhead"]))
        out = cls(int(np.asarray(state["vocab_size"])), None if nhead < 0 else nhead, sparse=sparse,
                  max_dense_bytes=max_dense_bytes)
        out._add_entries(out._entries_from_dense(state) if version == _FORMAT_DENSE
                         else out._entries_from_pairs(state))
        out.n_sequences = int(np.asarray(state.get("n_sequences", 0)))
        return out

    def _check_counts(self, count: np.ndarray) -> None:
        if count.size and (int(count.max()) > _MAX_EXACT_COUNT or int(count.min()) < 0):
            raise ValueError(f"state: count values must lie in [0, 2**53] to be kept exactly, "
                             f"got [{int(count.min())}, {int(count.max())}]")

    def _entries_from_dense(self, state: Mapping[str, Any]) -> _Entries:
        v = self.vocab_size
        sum_shape = (v, v) if self.nhead is None else (self.nhead, v, v)
        for key, shape in (("sum", sum_shape), ("count", (v, v)), ("expected", (v, v))):
            if tuple(np.shape(state[key])) != shape:
                raise ValueError(f"state: {key} has shape {list(np.shape(state[key]))}, expected {list(shape)}")
        count = np.asarray(state["count"], dtype=np.int64)
        self._check_counts(count)
        flat = np.flatnonzero(count)
        sums = np.asarray(state["sum"], dtype=np.float64).reshape(self._n_sum, v * v)[:, flat]
        ce = torch.complex(torch.as_tensor(count.reshape(-1)[flat].astype(np.float64)),
                           torch.as_tensor(np.asarray(state["expected"], dtype=np.float64).reshape(-1)[flat]))
        return torch.as_tensor(flat.astype(np.int64)), torch.as_tensor(sums), ce

    def _entries_from_pairs(self, state: Mapping[str, Any]) -> _Entries:
        v = self.vocab_size
        q = np.asarray(state["query_id"])
        k_ids = np.asarray(state["key_id"])
        n_pairs = q.shape[0] if q.ndim == 1 else -1
        sum_shape = (n_pairs,) if self.nhead is None else (self.nhead, n_pairs)
        for key, shape in (("query_id", (n_pairs,)), ("key_id", (n_pairs,)), ("sum", sum_shape),
                           ("count", (n_pairs,)), ("expected", (n_pairs,))):
            if tuple(np.shape(state[key])) != shape:
                raise ValueError(f"state: {key} has shape {list(np.shape(state[key]))}, expected {list(shape)} "
                                 "(K = the number of pairs in query_id)")
        for key, ids in (("query_id", q), ("key_id", k_ids)):
            if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= v):
                raise ValueError(f"state: {key} must hold integer ids in [0, vocab_size={v})")
        count = np.asarray(state["count"], dtype=np.int64)
        self._check_counts(count)
        keys = q.astype(np.int64) * v + k_ids.astype(np.int64)
        if keys.size > 1 and not (np.diff(keys) > 0).all():
            raise ValueError("state: the pairs (query_id, key_id) must be distinct and sorted")
        sums = np.asarray(state["sum"], dtype=np.float64).reshape(self._n_sum, n_pairs)
        ce = torch.complex(torch.as_tensor(count.astype(np.float64)),
                           torch.as_tensor(np.asarray(state["expected"], dtype=np.float64)))
        return torch.as_tensor(keys), torch.as_tensor(sums.copy()), ce

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a compressed ``.npz`` file (written whole or not at all)."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"   # np.savez would append it anyway; keep the temp name predictable
        tmp = path + ".tmp.npz"
        try:
            np.savez_compressed(tmp, **self.state_dict())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, *, sparse: bool | None = None,
             max_dense_bytes: int = MAX_DENSE_BYTES) -> "VocabAttention":
        """Read a file written by :meth:`save` (either layout; ``sparse`` as in the constructor)."""
        with np.load(os.fspath(path), allow_pickle=False) as data:
            return cls.from_state_dict({k: data[k] for k in data.files}, sparse=sparse,
                                       max_dense_bytes=max_dense_bytes)

    def __getstate__(self) -> dict[str, np.ndarray]:
        return {**self.state_dict(), "max_dense_bytes": np.asarray(self.max_dense_bytes)}

    def __setstate__(self, state: dict[str, np.ndarray]) -> None:
        sparse = int(np.asarray(state.get("format_version", _FORMAT_DENSE))) == _FORMAT_SPARSE
        limit = int(np.asarray(state.get("max_dense_bytes", MAX_DENSE_BYTES)))
        self.__dict__.update(VocabAttention.from_state_dict(state, sparse=sparse, max_dense_bytes=limit).__dict__)

    def __repr__(self) -> str:
        heads = "" if self.nhead is None else f", nhead={self.nhead}"
        keys, _, ce = self._entries()
        return (f"VocabAttention(vocab_size={self.vocab_size}{heads}, sparse={self._sparse}; "
                f"{self.n_sequences} sequences, {int(ce.real.sum())} pairs over {len(keys)} token pairs)")

    # ---------------------------------------------------------------- reading
    def token_pair_counts(self) -> np.ndarray:
        """``[V]`` int64: for each token id, the valid pairs it takes part in, as the query
        plus as the key (``count.sum(1) + count.sum(0)`` without the ``[V, V]`` table)."""
        p = self.pairs()
        v = self.vocab_size
        weights = p["count"].astype(np.float64)
        total = np.bincount(p["query_id"], weights, minlength=v) + np.bincount(p["key_id"], weights, minlength=v)
        return total.astype(np.int64)

    def submatrix(self, stat: str, query_ids: Sequence[int] | np.ndarray,
                  key_ids: Sequence[int] | np.ndarray | None = None, *, head: int | None = None) -> np.ndarray:
        """One statistic on a block of the vocabulary: ``[len(query_ids), len(key_ids)]``
        (``[H, ...]`` for ``sum``/``mean``/``lift`` of a per-head aggregator unless ``head``
        picks one), without building the ``[V, V]`` table.

        ``stat`` is one of ``sum``, ``count``, ``expected``, ``mean``, ``lift``; unseen
        pairs hold 0 (NaN for ``mean`` and ``lift``). ``key_ids`` defaults to ``query_ids``.
        """
        if stat not in _RANK_BY:
            raise ValueError(f"stat={stat!r}: expected one of {list(_RANK_BY)}")
        rows = self._id_array(query_ids, "query_ids")
        cols = rows if key_ids is None else self._id_array(key_ids, "key_ids")
        p = self.pairs(head)
        v = self.vocab_size
        row_of, col_of = np.full(v, -1), np.full(v, -1)
        row_of[rows], col_of[cols] = np.arange(len(rows)), np.arange(len(cols))
        r, c = row_of[p["query_id"]], col_of[p["key_id"]]
        inside = (r >= 0) & (c >= 0)
        r, c = r[inside], c[inside]
        values = self._stat(stat, p["sum"], p["count"], p["expected"])
        per_head = values.ndim == 2
        fill = np.nan if stat in ("mean", "lift") else 0
        out = np.full(((values.shape[0],) if per_head else ()) + (len(rows), len(cols)), fill,
                      dtype=np.int64 if stat == "count" else np.float64)
        if per_head:
            out[:, r, c] = values[:, inside]
        else:
            out[r, c] = values[inside]
        return out

    def _id_array(self, ids: Any, name: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name}: expected a 1-d sequence of token ids, got shape {list(arr.shape)} "
                             f"dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"{name}: ids must lie in [0, vocab_size={self.vocab_size})")
        if len(np.unique(arr)) != len(arr):
            raise ValueError(f"{name}: ids must be distinct")
        return arr.astype(np.int64)

    @staticmethod
    def _stat(stat: str, s: np.ndarray, count: np.ndarray, expected: np.ndarray) -> np.ndarray:
        if stat == "sum":
            return s
        if stat == "count":
            return count
        if stat == "expected":
            return expected
        return s / count if stat == "mean" else s / expected

    def _excluded(self, exclude: Any, itos: Any) -> np.ndarray | None:
        """``[V]`` bool of the excluded ids: ``"special"`` (names like ``<pad>`` or ``[CLS]``,
        needs ``itos``), or ids and/or token strings (strings need ``itos``)."""
        if exclude is None:
            return None
        v = self.vocab_size
        out = np.zeros(v, dtype=bool)
        if isinstance(exclude, str):
            if exclude != "special":
                raise ValueError(f"exclude={exclude!r}: expected 'special' or a list of token ids / strings")
            if itos is None:
                raise ValueError("exclude='special' needs itos (the token strings)")
            out[[i for i in special_token_ids(self._all_names(itos)) if i < v]] = True
            return out
        lookup = None
        for item in exclude:
            if isinstance(item, str):
                if itos is None:
                    raise ValueError(f"exclude: token {item!r} given by name, but no itos to look it up")
                if lookup is None:
                    lookup = {name: i for i, name in enumerate(self._all_names(itos))}
                if item not in lookup:
                    raise ValueError(f"exclude: token {item!r} is not in the vocabulary")
                out[lookup[item]] = True
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < v:
                out[int(item)] = True
            else:
                raise ValueError(f"exclude: {item!r} is neither a token string nor an id in [0, {v})")
        return out

    def _all_names(self, itos: Any) -> list[str]:
        if callable(itos) and not isinstance(itos, (Mapping, Sequence)):
            return [str(itos(i)) for i in range(self.vocab_size)]
        if isinstance(itos, Mapping):
            return [str(itos.get(i, "")) for i in range(self.vocab_size)]
        return [str(name) for name in list(itos)[:self.vocab_size]]

    def to_frame(self, itos: Sequence[str] | Mapping[int, str] | Callable[[int], str] | None = None,
                 *, head: int | None = None, exclude: str | Iterable[int | str] | None = None) -> "pd.DataFrame":
        """Long table of the token pairs with ``count > 0``.

        Columns: ``query_id, key_id, query_token, key_token, sum, count, expected,
        mean, lift``; per-head aggregators add a leading ``head`` column (one row per
        head and pair) unless ``head`` picks one head. Rows are sorted by (query id, key id).

        Args:
            itos: id -> string (list, mapping or function); ``None`` uses ``str(id)``.
            head: with ``nhead``, keep only this head.
            exclude: drop the pairs involving these tokens: ``"special"`` (``<pad>``,
                ``[CLS]``, ``[SEP]``, ...: names in angle or square brackets), or a list of
                ids and/or token strings.
        """
        import pandas as pd

        p = self._filtered_pairs(itos, head, exclude)
        names = self._names(itos, np.union1d(p["query_id"], p["key_id"]))
        if p["sum"].ndim == 2:
            frames = [self._frame(p["query_id"], p["key_id"], p["sum"][h], p["count"], p["expected"], names)
                      .assign(head=h) for h in range(self.nhead)]
            out = pd.concat(frames, ignore_index=True)
            return out[["head", *out.columns[:-1]]]
        return self._frame(p["query_id"], p["key_id"], p["sum"], p["count"], p["expected"], names)

    def _filtered_pairs(self, itos: Any, head: int | None, exclude: Any) -> dict[str, np.ndarray]:
        dropped = self._excluded(exclude, itos)
        p = self.pairs(head)
        if dropped is not None:
            keep = ~(dropped[p["query_id"]] | dropped[p["key_id"]])
            p = {key: value[..., keep] for key, value in p.items()}
        return p

    @staticmethod
    def _frame(q_id: np.ndarray, k_id: np.ndarray, s: np.ndarray, count: np.ndarray,
               expected: np.ndarray, names: dict[int, str]) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "query_id": q_id, "key_id": k_id,
            "query_token": [names[i] for i in q_id.tolist()],
            "key_token": [names[i] for i in k_id.tolist()],
            "sum": s, "count": count, "expected": expected,
            "mean": s / count, "lift": s / expected,
        })

    def _names(self, itos: Any, ids: np.ndarray) -> dict[int, str]:
        if itos is None:
            return {i: str(i) for i in ids.tolist()}
        if callable(itos) and not isinstance(itos, (Mapping, Sequence)):
            return {i: str(itos(i)) for i in ids.tolist()}
        names = {}
        for i in ids.tolist():
            try:
                names[i] = str(itos[i])
            except (IndexError, KeyError):
                raise ValueError(f"itos: no string for token id {i} (vocab_size={self.vocab_size})") from None
        return names

    def top_pairs(self, k: int = 20, *, min_count: int = 1, by: str = "lift",
                  itos: Sequence[str] | Mapping[int, str] | Callable[[int], str] | None = None,
                  head: int | None = None, exclude: str | Iterable[int | str] | None = None) -> "pd.DataFrame":
        """The ``k`` token pairs with the largest ``by`` among pairs seen ``min_count`` times.

        ``by`` is one of ``lift`` (default), ``mean``, ``sum``, ``count``, ``expected``;
        ties are broken by larger count, then by ids. Columns as :meth:`to_frame`
        (per-head aggregators rank (head, pair) rows unless ``head`` is given).
        ``min_count`` guards lift and mean against pairs seen once or twice; ``exclude``
        drops pairs with special or listed tokens (as in :meth:`to_frame`). Cost
        ``O(pairs seen)``, strings only for the ``k`` rows returned: fine at 50k vocabularies.
        """
        if by not in _RANK_BY:
            raise ValueError(f"by={by!r}: expected one of {list(_RANK_BY)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k={k!r}: expected a non-negative integer")
        p = self._filtered_pairs(itos, head, exclude)
        eligible = p["count"] >= min_count
        p = {key: value[..., eligible] for key, value in p.items()}
        n_pairs = len(p["count"])
        per_head = p["sum"].ndim == 2
        n_rows = self.nhead if per_head else 1
        stat = self._stat(by, p["sum"], p["count"], p["expected"]).astype(np.float64)
        stat = np.broadcast_to(stat, (n_rows, n_pairs)).reshape(-1)          # (head, pair) rows, head-major
        pair = np.tile(np.arange(n_pairs), n_rows)
        head_of = np.repeat(np.arange(n_rows), n_pairs)
        count = p["count"][pair]
        rows = np.arange(len(stat))
        if k < len(stat):                                                   # candidates: ties with the k-th kept
            kth = np.partition(-stat, int(k) - 1)[int(k) - 1] if k else -np.inf
            rows = rows[-stat <= kth] if k else rows[:0]
        keys = [head_of[rows], p["key_id"][pair[rows]], p["query_id"][pair[rows]], -count[rows]]
        if by != "count":
            keys.append(-stat[rows])
        rows = rows[np.lexsort(keys)][:int(k)]
        pick, heads = pair[rows], head_of[rows]
        names = self._names(itos, np.union1d(p["query_id"][pick], p["key_id"][pick]))
        s = p["sum"][heads, pick] if per_head else p["sum"][pick]
        frame = self._frame(p["query_id"][pick], p["key_id"][pick], s, p["count"][pick], p["expected"][pick], names)
        if per_head:
            frame.insert(0, "head", heads)
        return frame.reset_index(drop=True)
