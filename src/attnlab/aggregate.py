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

The aggregator is additive: shards (files, DDP ranks) are merged by summing
(:meth:`VocabAttention.merge`) and memory stays ``O(V² + one batch)`` however
long the stream is.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["VocabAttention"]

_FORMAT_VERSION = 1
_RANK_BY = ("lift", "mean", "sum", "count", "expected")
_MAX_EXACT_COUNT = 2 ** 53   # counts are kept in float64 (the real part of a complex table)
_PAIR_GROUPS = 4   # non-causal count/expected: rows grouped by their number of distinct ids


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


def _causal_pairs(tok_bn: torch.Tensor, valid_bn: torch.Tensor | None, attn_flat: torch.Tensor,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, _PairGroups]:
    """The pairs ``j <= i`` of every sequence: flat cells ``idx [B·T]``, weights
    ``[B, (H,) T]`` (``T = N(N+1)/2``) and one ``(cells, count + i·expected)`` group."""
    b, n = tok_bn.shape
    side = vocab_size + 1
    # Only the lower triangle j <= i is ever read; the number of valid keys of
    # query i is the number of valid positions up to i.
    pair_flat, query_of_pair, key_of_pair = _lower_triangle(n)  # [T], T = N(N+1)/2
    query_bt = query_of_pair.expand(b, -1)      # (gather beats index_select on dim 1)
    idx = torch.gather(tok_bn, 1, query_bt).mul_(side)
    idx = idx.add_(torch.gather(tok_bn, 1, key_of_pair.expand(b, -1))).reshape(-1)
    weight_sum = attn_flat.index_select(-1, pair_flat)          # [B, (H,) T]
    n_keys_bn = (torch.arange(1, n + 1).expand(b, n) if valid_bn is None
                 else valid_bn.cumsum(dim=1))
    # count + i·expected of each pair: 1 + i / (valid keys of its query)
    inv_keys_bn = torch.complex(torch.ones(b, n, dtype=torch.float64),
                                1.0 / n_keys_bn.clamp_min(1).to(torch.float64))
    return idx, weight_sum, [(idx, torch.gather(inv_keys_bn, 1, query_bt).reshape(-1))]


def _all_pairs(tok_bn: torch.Tensor, valid_bn: torch.Tensor | None, attn_flat: torch.Tensor,
               vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, _PairGroups]:
    """Every pair ``(i, j)`` of every sequence: flat cells ``idx [B·N·N]``, the weights
    ``attn_flat [B, (H,) N·N]`` themselves, and the count/expected groups of
    :func:`_histogram_pairs`."""
    side = vocab_size + 1
    idx = (tok_bn[:, :, None] * side + tok_bn[:, None, :]).reshape(-1)
    return idx, attn_flat, _histogram_pairs(tok_bn, valid_bn, vocab_size)


def _histogram_pairs(tok_bn: torch.Tensor, valid_bn: torch.Tensor | None, vocab_size: int) -> _PairGroups:
    """``(cells, count + i·expected)`` groups of the non-causal pairs, from each
    sequence's token histogram instead of its ``N²`` position pairs."""
    b, n = tok_bn.shape
    side = vocab_size + 1
    # Without causality every query of sequence b has the same n_b valid keys,
    # so count and expected only depend on each sequence's token histogram h_b:
    # count += h_b ⊗ h_b, expected += h_b ⊗ h_b / n_b, over distinct tokens.
    # Rows are padded to the largest number of distinct ids in the batch, and
    # masked positions share the sink id V (sorted last): group rows of similar
    # size and cut each group at its own largest count of real ids, so that
    # padding and sink pairs are mostly not scattered (those of the narrower
    # rows of a group still land in row/column V, zeroed after the scatter by
    # VocabAttention._clear_sink).
    tok_bu, mult_bu = _distinct_per_row(tok_bn, vocab_size)  # [B, U]
    n_valid_b = (torch.full((b,), n, dtype=torch.int64) if valid_bn is None
                 else valid_bn.sum(dim=1))
    real_b = (tok_bu < vocab_size).sum(dim=1)
    real_b, order = real_b.sort(descending=True, stable=True)
    mult_bu = mult_bu[order].to(torch.float64)
    tok_bu = tok_bu[order]
    # h_q · h_k · (1 + i / n_b): count in the real part, expected in the imaginary
    scale_bu = torch.complex(mult_bu, mult_bu / n_valid_b[order].clamp_min(1)[:, None].to(torch.float64))
    pair_groups = []
    step = -(-b // _PAIR_GROUPS)
    for start, u in zip(range(0, b, step), real_b[::step].tolist()):
        t, m, sc = (a[start:start + step, :u] for a in (tok_bu, mult_bu, scale_bu))
        pair_groups.append(((t[:, :, None] * side + t[:, None, :]).reshape(-1),
                            (sc[:, :, None] * m[:, None, :]).reshape(-1)))
    return pair_groups


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a torch.Tensor or array, got {type(x).__name__}") from exc


def _check_finite_pairs(attn: torch.Tensor, valid: torch.Tensor | None, causal: bool) -> None:
    """NaN/Inf are allowed only on the pairs that are never read (a masked query or key,
    or a key after the query when causal); raise ``ValueError`` counting the others."""
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


class VocabAttention:
    """Token x token aggregation of attention, streamed batch by batch.

    Args:
        vocab_size: ``V``; token ids must lie in ``[0, V)``.
        nhead: ``None`` (default) averages the heads of ``[B, H, N, N]`` attention
            into one ``[V, V]`` ``sum``. An integer ``H`` keeps one sum per head,
            ``sum [H, V, V]`` (``count`` and ``expected`` do not depend on the head
            and stay ``[V, V]``); ``update`` then requires ``[B, H, N, N]``.

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
    ``key_padding_mask`` (True = padding): pass ``~key_padding_mask``.

    Attributes (read-only numpy arrays; copy them before modifying):
        sum: ``[V, V]`` (or ``[H, V, V]``) float64, a live view of the running table.
        count: ``[V, V]`` int64, a snapshot (a new array on each access).
        expected: ``[V, V]`` float64, a live view of the running table.
        n_sequences: number of sequences seen (merged aggregators add up).
    """

    def __init__(self, vocab_size: int, nhead: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r}: expected a positive integer")
        if nhead is not None and (isinstance(nhead, bool) or not isinstance(nhead, (int, np.integer))
                                    or nhead < 1):
            raise ValueError(f"nhead={nhead!r}: expected None or a positive integer")
        self.vocab_size = int(vocab_size)
        self.nhead = None if nhead is None else int(nhead)
        self.n_sequences = 0
        # Tables are (V + 1) x (V + 1), flattened: id V collects every pair that has a
        # masked position, so masking costs O(B·N) instead of a selection over B·N·N
        # pairs. The extra row/column is zeroed after each update and never exposed.
        # count and expected always land on the same cells, so they share one complex
        # table (real = count, imaginary = expected): one scatter instead of two, with
        # both halves of a cell in one cache line. Counts stay exact integers in
        # float64 up to 2**53 pairs per cell.
        side = self.vocab_size + 1
        n_sum = 1 if self.nhead is None else self.nhead
        self._sum = torch.zeros(n_sum, side * side, dtype=torch.float64)
        self._count_expected = torch.zeros(side * side, dtype=torch.complex128)

    # ------------------------------------------------------------------ state
    def _square(self, flat: torch.Tensor | np.ndarray) -> np.ndarray:
        side = self.vocab_size + 1
        flat = flat.numpy() if isinstance(flat, torch.Tensor) else flat
        view = flat.reshape(*flat.shape[:-1], side, side)[..., :-1, :-1]
        view.flags.writeable = False
        return view

    @property
    def sum(self) -> np.ndarray:
        """``[V, V]`` float64 (``[H, V, V]`` with ``nhead``): Σ attention per token pair."""
        out = self._square(self._sum)
        return out[0] if self.nhead is None else out

    def _counts(self) -> np.ndarray:
        """``[V, V]`` float64 view of the counts (the complex table's real part)."""
        return self._square(self._count_expected.numpy().real)

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
        return self._square(self._count_expected.numpy().imag)

    def mean(self) -> np.ndarray:
        """``sum / count`` (``[V, V]`` or ``[H, V, V]``); NaN where ``count == 0``."""
        return self._ratio(self._counts())

    def lift(self) -> np.ndarray:
        """``sum / expected`` (``[V, V]`` or ``[H, V, V]``); NaN where ``count == 0``.

        1 = the query token gives the key token the attention uniform attention would;
        > 1 = more, < 1 = less.
        """
        return self._ratio(self.expected)

    def _ratio(self, denominator_vv: np.ndarray) -> np.ndarray:
        seen = self._counts() > 0
        num = self.sum
        out = np.full(num.shape, np.nan)
        np.divide(num, denominator_vv, out=out, where=np.broadcast_to(seen, num.shape))
        return out

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
        tok_bn, attn, valid_bn = self._check(tokens, attention, mask, causal)
        b, n = tok_bn.shape
        if b == 0 or n == 0:
            self.n_sequences += b
            return self
        if valid_bn is not None:
            tok_bn = torch.where(valid_bn, tok_bn, self.vocab_size)    # masked -> sink id V
        if self.nhead is None and attn.dim() == 4:
            # Average heads in the input precision (float16 is promoted to float32).
            attn = attn.mean(dim=1, dtype=torch.float32 if attn.dtype == torch.float16 else None)
        attn_flat = attn.reshape(*attn.shape[:-2], n * n)             # [B, (H,) N·N]
        pairs = _causal_pairs if causal else _all_pairs
        idx, weight_sum, pair_groups = pairs(tok_bn, valid_bn, attn_flat, self.vocab_size)
        self._add_sums(idx, weight_sum.to(torch.float64), b)
        for pair_idx, pair_count_expected in pair_groups:
            self._count_expected.scatter_add_(0, pair_idx, pair_count_expected)
        if valid_bn is not None:
            self._clear_sink()
        self.n_sequences += b
        return self

    def _add_sums(self, idx: torch.Tensor, weight_sum: torch.Tensor, b: int) -> None:
        """Scatter-add the float64 weights ``[B, (H,) P]`` into ``sum`` at the flat cells ``idx [B·P]``."""
        if self.nhead is None:
            self._sum[0].scatter_add_(0, idx, weight_sum.reshape(-1))
        else:
            side = self.vocab_size + 1
            head_offset = (torch.arange(self.nhead) * (side * side))[None, :, None]
            idx_h = (idx.view(b, 1, -1) + head_offset).reshape(-1)
            self._sum.view(-1).scatter_add_(0, idx_h, weight_sum.reshape(-1))

    def _clear_sink(self) -> None:
        """Everything involving a masked position went to row/column V: drop it."""
        side = self.vocab_size + 1
        for table in (self._sum, self._count_expected):
            square = table.view(-1, side, side)
            square[:, -1, :] = 0
            square[:, :, -1] = 0

    def _check(self, tokens: Any, attention: Any, mask: Any, causal: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
        if attn.numel() and not bool(torch.isfinite(attn).all()):
            _check_finite_pairs(attn, valid, causal)
        tok = tok.to(torch.int64)
        if tok.numel():
            checked = tok if valid is None else torch.where(valid, tok, 0)
            lo, hi = int(checked.min()), int(checked.max())
            if lo < 0 or hi >= self.vocab_size:
                bad_value = lo if lo < 0 else hi
                raise ValueError(f"tokens: id {bad_value} is outside [0, vocab_size={self.vocab_size})")
        return tok, attn, valid

    # ------------------------------------------------------------------ merge
    def all_reduce(self, group: Any = None) -> "VocabAttention":
        """Under ``torch.distributed``: sum the tables of every process of ``group`` into
        each process's aggregator, in place, as if :meth:`merge` had added the others'
        (each process aggregated its own sequences). Nothing to do in one process.
        Returns ``self``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        shapes: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(shapes, (self.vocab_size, self.nhead), group=group)
        if len(set(shapes)) > 1:
            raise ValueError(f"all_reduce: the processes' aggregators differ in (vocab_size, nhead): {shapes}")
        n = torch.tensor([float(self.n_sequences)], dtype=torch.float64)
        on_gpu = dist.get_backend(group) == "nccl"          # NCCL reduces CUDA tensors only
        for table in (self._sum, torch.view_as_real(self._count_expected), n):   # the complex table as real pairs
            shared = table.cuda() if on_gpu else table
            dist.all_reduce(shared, group=group)
            if on_gpu:
                table.copy_(shared)
        self.n_sequences = int(n.item())
        return self

    def merge(self, other: "VocabAttention") -> "VocabAttention":
        """Add ``other``'s tables into this one (shards, DDP ranks). Returns ``self``."""
        if not isinstance(other, VocabAttention):
            raise TypeError(f"merge: expected a VocabAttention, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"merge: vocab_size {other.vocab_size} != {self.vocab_size}")
        if other.nhead != self.nhead:
            raise ValueError(f"merge: nhead {other.nhead} != {self.nhead}")
        self._sum += other._sum
        self._count_expected += other._count_expected
        self.n_sequences += other.n_sequences
        return self

    def head_mean(self) -> "VocabAttention":
        """A head-averaged aggregator (``nhead=None``) with the same count/expected.

        Equal to streaming the same batches with heads averaged, since the per-head
        sums share their pairs.
        """
        out = VocabAttention(self.vocab_size)
        out._sum = self._sum.mean(dim=0, keepdim=True)
        out._count_expected = self._count_expected.clone()
        out.n_sequences = self.n_sequences
        return out

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (copies): ``sum``, ``count``, ``expected`` and metadata."""
        return {
            "format_version": np.asarray(_FORMAT_VERSION),
            "vocab_size": np.asarray(self.vocab_size),
            "nhead": np.asarray(-1 if self.nhead is None else self.nhead),
            "n_sequences": np.asarray(self.n_sequences),
            "sum": np.array(self.sum),
            "count": self.count.copy(),      # already a fresh array; copy() drops read-only
            "expected": np.array(self.expected),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "VocabAttention":
        """Inverse of :meth:`state_dict` (files saved before the heads key was named
        ``nhead`` call it ``n_heads``)."""
        if "n_heads" in state and "nhead" not in state:
            state = {**state, "nhead": state["n_heads"]}
        missing = {"vocab_size", "nhead", "sum", "count", "expected"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        version = int(np.asarray(state.get("format_version", _FORMAT_VERSION)))
        if version != _FORMAT_VERSION:
            raise ValueError(f"state: format_version {version} is not supported (expected {_FORMAT_VERSION})")
        nhead = int(np.asarray(state["nhead"]))
        out = cls(int(np.asarray(state["vocab_size"])), None if nhead < 0 else nhead)
        v = out.vocab_size
        sum_shape = (v, v) if out.nhead is None else (out.nhead, v, v)
        for key, shape in (("sum", sum_shape), ("count", (v, v)), ("expected", (v, v))):
            if tuple(np.shape(state[key])) != shape:
                raise ValueError(f"state: {key} has shape {list(np.shape(state[key]))}, expected {list(shape)}")
        side = v + 1
        sum_sq = out._sum.view(-1, side, side)
        sum_sq[:, :v, :v] = torch.as_tensor(np.asarray(state["sum"], dtype=np.float64)).reshape(-1, v, v)
        count = np.asarray(state["count"], dtype=np.int64)
        if count.size and (int(count.max()) > _MAX_EXACT_COUNT or int(count.min()) < 0):
            raise ValueError(f"state: count values must lie in [0, 2**53] to be kept exactly, "
                             f"got [{int(count.min())}, {int(count.max())}]")
        out._count_expected.view(side, side)[:v, :v] = torch.complex(
            torch.as_tensor(count.astype(np.float64)),
            torch.as_tensor(np.asarray(state["expected"], dtype=np.float64)))
        out.n_sequences = int(np.asarray(state.get("n_sequences", 0)))
        return out

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
    def load(cls, path: str | os.PathLike) -> "VocabAttention":
        """Read a file written by :meth:`save`."""
        with np.load(os.fspath(path), allow_pickle=False) as data:
            return cls.from_state_dict({k: data[k] for k in data.files})

    def __getstate__(self) -> dict[str, np.ndarray]:
        return self.state_dict()

    def __setstate__(self, state: dict[str, np.ndarray]) -> None:
        self.__dict__.update(VocabAttention.from_state_dict(state).__dict__)

    def __repr__(self) -> str:
        heads = "" if self.nhead is None else f", nhead={self.nhead}"
        return (f"VocabAttention(vocab_size={self.vocab_size}{heads}; "
                f"{self.n_sequences} sequences, {int(self._count_expected.real.sum())} pairs)")

    # ---------------------------------------------------------------- frames
    def to_frame(self, itos: Sequence[str] | Mapping[int, str] | Callable[[int], str] | None = None,
                 *, head: int | None = None) -> pd.DataFrame:
        """Long table of the token pairs with ``count > 0``.

        Columns: ``query_id, key_id, query_token, key_token, sum, count, expected,
        mean, lift``; per-head aggregators add a leading ``head`` column (one row per
        head and pair) unless ``head`` picks one head.

        Args:
            itos: id -> string (list, mapping or function); ``None`` uses ``str(id)``.
            head: with ``nhead``, keep only this head.
        """
        count_vv = self.count
        q_id, k_id = np.nonzero(count_vv)
        count = count_vv[q_id, k_id]
        expected = self.expected[q_id, k_id]
        names = self._names(itos, np.union1d(q_id, k_id))
        sums = self.sum
        if self.nhead is not None:
            if head is not None:
                if not (isinstance(head, (int, np.integer)) and 0 <= head < self.nhead):
                    raise ValueError(f"head={head!r}: expected an integer in [0, {self.nhead})")
                sums = sums[head]
            else:
                frames = [self._frame(q_id, k_id, sums[h][q_id, k_id], count, expected, names).assign(head=h)
                          for h in range(self.nhead)]
                out = pd.concat(frames, ignore_index=True)
                return out[["head", *out.columns[:-1]]]
        elif head is not None:
            raise ValueError(f"head={head!r}: this aggregator averages heads (nhead=None)")
        return self._frame(q_id, k_id, sums[q_id, k_id], count, expected, names)

    @staticmethod
    def _frame(q_id: np.ndarray, k_id: np.ndarray, s: np.ndarray, count: np.ndarray,
               expected: np.ndarray, names: dict[int, str]) -> pd.DataFrame:
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
                  head: int | None = None) -> pd.DataFrame:
        """The ``k`` token pairs with the largest ``by`` among pairs seen ``min_count`` times.

        ``by`` is one of ``lift`` (default), ``mean``, ``sum``, ``count``, ``expected``;
        ties are broken by larger count, then by ids. Columns as :meth:`to_frame`
        (per-head aggregators rank (head, pair) rows unless ``head`` is given).
        ``min_count`` guards lift and mean against pairs seen once or twice.
        """
        if by not in _RANK_BY:
            raise ValueError(f"by={by!r}: expected one of {list(_RANK_BY)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k={k!r}: expected a non-negative integer")
        frame = self.to_frame(itos, head=head)
        frame = frame[frame["count"] >= min_count]
        order = [by, "count", "query_id", "key_id"] if by != "count" else ["count", "query_id", "key_id"]
        ascending = [False, False, True, True] if by != "count" else [False, True, True]
        if "head" in frame.columns:
            order.append("head")
            ascending.append(True)
        return frame.sort_values(order, ascending=ascending, kind="stable").head(int(k)).reset_index(drop=True)
