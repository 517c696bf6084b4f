"""Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

Also home of the per-layer preparation shared by the other explanation methods of
this package (input validation, head fusion, residual mixing, row renormalisation),
so that every method treats one layer's attention in exactly the same way.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from attnlab.io import compiled_kernel

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

__all__ = ["rollout", "fuse_heads", "check_values", "values_look_valid", "HeadFusion", "HEAD_FUSIONS"]


# --------------------------------------------------------------------------- validation


def check_head_fusion(head_fusion: object) -> None:
    """Raise ``ValueError`` unless ``head_fusion`` is one of :data:`HEAD_FUSIONS`."""
    if not isinstance(head_fusion, str) or head_fusion not in HEAD_FUSIONS:
        raise ValueError(
            f"head_fusion must be one of {', '.join(map(repr, HEAD_FUSIONS))}; "
            f"got {head_fusion!r}"
        )


def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """Common floating dtype of ``tensors``, at least float32 (float16 storage is
    computed in float32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"attention tensors must be floating point; got dtype {dtype}")
    return dtype


def check_layers(attentions: object, name: str = "attentions") -> tuple[list[Tensor], int, int]:
    """Validate a per-layer list of attention tensors.

    Each entry must be ``[B, H, N, N]`` (heads not fused yet) or ``[B, N, N]`` (already
    fused), with the same ``B`` and ``N`` in every layer (``H`` may differ per layer).
    Returns ``(layers, B, N)``.
    """
    if isinstance(attentions, Tensor) or not isinstance(attentions, Sequence):
        raise ValueError(
            f"{name} must be a list of per-layer tensors [B, H, N, N] or [B, N, N]; "
            f"got {type(attentions).__name__}"
        )
    layers = list(attentions)
    if not layers:
        raise ValueError(f"{name} is empty: need at least one layer")
    batch = n_tok = -1
    for idx, attn in enumerate(layers):
        if not isinstance(attn, Tensor):
            raise ValueError(f"{name}[{idx}] must be a torch.Tensor; got {type(attn).__name__}")
        if attn.ndim not in (3, 4) or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(
                f"{name}[{idx}] must have shape [B, H, N, N] or [B, N, N]; "
                f"got {tuple(attn.shape)}"
            )
        if idx == 0:
            batch, n_tok = attn.shape[0], attn.shape[-1]
        elif attn.shape[0] != batch or attn.shape[-1] != n_tok:
            raise ValueError(
                f"{name}[{idx}] has shape {tuple(attn.shape)} but {name}[0] has "
                f"B={batch}, N={n_tok}: every layer needs the same batch and token count"
            )
    if n_tok == 0:
        raise ValueError(f"{name} have N=0 tokens")
    for idx, attn in enumerate(layers):
        if not attn.is_floating_point():
            raise ValueError(f"{name}[{idx}] must be floating point; got dtype {attn.dtype}")
    return layers, batch, n_tok


def check_flag(value: object, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool (a string like ``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")


def check_values(layers: Sequence[Tensor], name: str = "attentions", *, probabilities: bool = True,
                 real: Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the first tensor of ``layers`` that holds NaN or Inf
    or, with ``probabilities``, a negative entry (attention weights are softmax outputs).

    With ``real`` ``[B, N]`` (False = padded) only the entries between real tokens are
    checked (the others are never read and may hold anything): each tensor is
    ``[B, ..., N, N]``.

    Cost: one reduction per tensor (:func:`values_look_valid`), no temporary of the
    input's size; only a tensor that fails it is examined again in detail (and, with
    ``real``, masked), to tell padded garbage from a real problem and to word the error.
    """
    for idx, attn in enumerate(layers):
        if not values_look_valid(attn, probabilities):
            explain_values(attn, f"{name}[{idx}]", probabilities=probabilities, real=real)


def values_look_valid(t: Tensor, probabilities: bool = True) -> bool:
    """One fused pass over ``t`` (``torch.aminmax``): True when every entry is finite and,
    with ``probabilities``, non-negative. NaN propagates into both extremes and ±Inf is
    an extreme, so the two numbers say everything. Empty tensors are valid."""
    if t.numel() == 0:
        return True
    low, high = (float(v) for v in torch.aminmax(t))
    return math.isfinite(low) and math.isfinite(high) and (low >= 0 or not probabilities)


def explain_values(attn: Tensor, label: str, *, probabilities: bool = True, real: Tensor | None = None) -> None:
    """The detailed (slow) check behind :func:`check_values`, run only on a tensor whose
    fast check failed: raise the ``ValueError`` that describes its first problem (NaN or
    Inf, then negative entries), looking only between real tokens when ``real`` is given;
    return quietly when the problem is confined to padded entries."""
    if real is not None:
        if real_entries_look_valid(attn, real, probabilities):      # the garbage is all in padding
            return
        pair = real[:, :, None] & real[:, None, :]                     # [B, N, N]
        attn = attn.masked_fill(~pair.view(pair.shape[0], *[1] * (attn.ndim - 3), *pair.shape[1:]), 0)
    finite = torch.isfinite(attn)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{label} holds {bad} NaN or Inf value{'s' if bad > 1 else ''} "
                         f"(shape {tuple(attn.shape)}); expected finite values")
    if probabilities:
        low = float(attn.min())
        if low < 0:
            raise ValueError(f"{label} has negative entries (min {low:.4g}); expected "
                             "attention probabilities >= 0 (softmax outputs)")


def real_entries_look_valid(attn: Tensor, real: Tensor, probabilities: bool = True) -> bool:
    """:func:`values_look_valid` on the entries between real tokens only, without a masked
    copy of ``attn`` ``[B, ..., N, N]``: per sample, one reduction over the block of its
    real tokens (a view when they are contiguous, e.g. right padding; else a copy of
    that block alone). ``real``: ``[B, N]`` bool."""
    for b in range(attn.shape[0]):
        idx = real[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo == idx.numel():
            block = attn[b][..., lo:hi, lo:hi]
        else:
            block = attn[b].index_select(-2, idx).index_select(-1, idx)
        if not values_look_valid(block, probabilities):
            return False
    return True


def real_tokens(mask: object, padding_mask: object, batch: int, n_tok: int) -> Tensor | None:
    """The real tokens ``[B, N]`` (bool) from the project's ``mask`` (True = real token)
    or torch's ``padding_mask`` (True = padded; kept as an alias); None when neither."""
    if mask is not None and padding_mask is not None:
        raise ValueError("give mask (True = real token) or padding_mask (True = padded), not both")
    if mask is not None:
        return check_padding_mask(mask, batch, n_tok, name="mask", meaning="True = real token")
    if padding_mask is not None:
        return ~check_padding_mask(padding_mask, batch, n_tok)
    return None


def check_padding_mask(padding_mask: object, batch: int, n_tok: int, *, name: str = "padding_mask",
                       meaning: str = "True = padded") -> Tensor:
    """Validate a bool mask ``[B, N]`` called ``name`` (0/1 integers are accepted); return it as bool."""
    if not isinstance(padding_mask, Tensor):
        raise ValueError(
            f"{name} must be a bool tensor [B, N]; got {type(padding_mask).__name__}"
        )
    if tuple(padding_mask.shape) != (batch, n_tok):
        raise ValueError(
            f"{name} must have shape [B, N] = {(batch, n_tok)}; "
            f"got {tuple(padding_mask.shape)}"
        )
    if padding_mask.dtype != torch.bool:
        if padding_mask.is_floating_point() or padding_mask.is_complex():
            raise ValueError(f"{name} must be bool ({meaning}); got {padding_mask.dtype}")
        padding_mask = padding_mask != 0
    return padding_mask


# --------------------------------------------------------------------------- one layer


def fuse_heads(attn: Tensor, head_fusion: str = "mean", dim: int = -3) -> Tensor:
    """The one head fusion of the project: ``mean`` / ``max`` / ``min`` over the heads
    dimension ``dim`` (``[B, H, N, N]`` -> ``[B, N, N]`` by default)."""
    check_head_fusion(head_fusion)
    if head_fusion == "mean":
        return attn.mean(dim)
    return attn.amax(dim) if head_fusion == "max" else attn.amin(dim)


def _fuse_scaled(attn: Tensor, head_fusion: str, dtype: torch.dtype) -> tuple[Tensor, int]:
    """:func:`fuse_heads` over ``[..., H, N, N]`` as rollout and flow use it: returns
    ``(fused, unit)``, a **fresh** tensor the caller may modify in place and the scale it
    is expressed in. For ``"mean"`` the heads are *summed* (``unit = H``): every later
    step (discard by rank, residual ``+ unit·I``, row renormalisation) is invariant to
    that common factor, and a sum saves one pass over the data.
    """
    if head_fusion == "mean":
        return attn.sum(dim=-3, dtype=dtype), attn.shape[-3]
    return fuse_heads(attn, head_fusion).to(dtype, copy=True), 1


def fused_layer(
    attn: Tensor, head_fusion: str, dtype: torch.dtype, fused_ndim: int = 3
) -> tuple[Tensor, int]:
    """``[B, H, N, N]`` or already fused ``[B, N, N]`` (``attn.ndim == fused_ndim``) →
    fresh ``([B, N, N], unit)`` (see :func:`_fuse_scaled`)."""
    if attn.ndim == fused_ndim:
        return attn.to(dtype, copy=True), 1
    return _fuse_scaled(attn, head_fusion, dtype)


#: Bytes of input fused per step by :func:`fused_layer_checked` without the compiled
#: kernel: small enough that the check re-reads the step from the cache, not from memory.
CHUNK_BYTES = 4 << 20

#: The version of _fused.c this code expects (its KERNEL_VERSION).
KERNEL_VERSION = 2
#: The compiled head sum + check (_fused.c; a build before version 2 has no VERSION);
#: None: torch's sum and a second, cached pass.
_fused = compiled_kernel("attnlab.explain._fused", KERNEL_VERSION, unversioned=1)
_FUSED_DTYPES = (torch.float32, torch.float64)
#: Inputs of at least this many entries are split across torch's intra-op threads.
_FUSED_THREADED = 1 << 22


def kernel_takes(attn: Tensor, head_fusion: str, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_layer_checked` fuses ``attn`` ``[..., H, n, n]`` with the
    compiled kernel: built, the mean, a contiguous float32/float64 CPU input in ``dtype``."""
    return (_fused is not None and head_fusion == "mean" and attn.dtype == dtype and dtype in _FUSED_DTYPES
            and attn.device.type == "cpu" and attn.is_contiguous() and attn.numel() > 0)


def _head_sum(x: Tensor, out: Tensor, ranges: list[tuple[int, int]] | None, row_sums: Tensor | None = None) -> bool:
    """``out = x.sum(1)`` for a contiguous CPU ``x`` ``[M, H, n, n]`` (and ``row_sums``
    ``[M, n]``, if given, its rows' sums) and whether every entry of ``x`` (with
    ``ranges``: of each sample's real block) is finite and >= 0, in one read of ``x``
    (``_fused.head_sum``; a -0.0 also answers False). Large inputs are split by samples
    across torch's intra-op threads (the kernel releases the GIL)."""
    m_count, heads, n = x.shape[0], x.shape[1], x.shape[-1]
    lo = hi = None
    if ranges is not None:
        bounds = np.asarray(ranges, dtype=np.int64).reshape(m_count, 2)
        lo, hi = np.ascontiguousarray(bounds[:, 0]), np.ascontiguousarray(bounds[:, 1])
    xs, outs = x.detach().numpy(), out.numpy()
    sums = None if row_sums is None else row_sums.view(m_count, n).numpy()
    threads = min(torch.get_num_threads(), m_count) if x.numel() >= _FUSED_THREADED else 1
    if threads <= 1:
        return _fused.head_sum(xs, outs, sums, heads, n, lo, hi, True)
    cuts = np.linspace(0, m_count, threads + 1).astype(int)
    results = [True] * threads

    def part(k: int) -> None:
        a, b = cuts[k], cuts[k + 1]
        results[k] = _fused.head_sum(xs[a:b], outs[a:b], None if sums is None else sums[a:b], heads, n,
                                     None if lo is None else lo[a:b], None if hi is None else hi[a:b], True)

    workers = [threading.Thread(target=part, args=(k,)) for k in range(1, threads)]
    for worker in workers:
        worker.start()
    part(0)
    for worker in workers:
        worker.join()
    return all(results)


def real_ranges(real: Tensor) -> list[tuple[int, int]] | None:
    """Per sample of ``real`` ``[B, N]``, the range ``(lo, hi)`` its real tokens fill, or
    None when some sample's real tokens are not one contiguous run (e.g. left or right
    padding gives ranges; a sample with none gives ``(0, 0)``)."""
    counts = real.sum(dim=1)
    first = torch.where(counts > 0, real.int().argmax(dim=1), 0)
    ranges = [(int(lo), int(lo) + int(n)) for lo, n in zip(first.tolist(), counts.tolist())]
    if not all(bool(real[b, lo:hi].all()) for b, (lo, hi) in enumerate(ranges) if hi > lo):
        return None
    return ranges


def _fuse_in_steps(x: Tensor, out: Tensor, head_fusion: str, dtype: torch.dtype,
                   ranges: list[tuple[int, int]] | None, row_sums: Tensor | None) -> bool:
    """:func:`fused_layer_checked` with torch's reductions: ``x`` ``[M, H, n, n]`` fused
    into ``out`` a few MiB at a time, each step's minimum taken while the step is still in
    the cache; True when every (``ranges``: real) entry is finite and >= 0."""
    side = x.shape[-2:]
    step = max(1, CHUNK_BYTES // (x[0].numel() * x.element_size()))
    lows = []
    for start in range(0, x.shape[0], step):
        chunk, dest = x[start:start + step], out[start:start + step]
        if head_fusion == "mean":
            torch.sum(chunk, dim=1, dtype=dtype, out=dest)
        elif head_fusion == "max":
            dest.copy_(chunk.amax(dim=1))
        else:
            dest.copy_(chunk.amin(dim=1))
        if row_sums is not None:
            torch.sum(dest, dim=-1, out=row_sums.view(-1, side[0])[start:start + step])
        parts = [chunk] if ranges is None else [chunk[i, :, lo:hi, lo:hi] for i, (lo, hi) in
                                                 enumerate(ranges[start:start + step]) if hi > lo]
        for part in parts:
            if head_fusion == "min":                               # min fusion hides +Inf: both ends
                lows.extend(torch.aminmax(part))
            else:                                                  # sum and max keep +Inf and NaN
                lows.append(part.amin())
    # every extreme finite (NaN, ±Inf) and the least >= 0 (negative entries)
    low, high = (float(v) for v in torch.aminmax(torch.stack(lows))) if lows else (0.0, 0.0)
    return math.isfinite(low) and math.isfinite(high) and low >= 0


def fused_layer_checked(
    attn: Tensor, head_fusion: str, dtype: torch.dtype, fused_ndim: int = 3,
    ranges: list[tuple[int, int]] | None = None, check_fused: bool = True, row_sums: Tensor | None = None,
) -> tuple[Tensor, int, bool]:
    """:func:`fused_layer` and the value check of :func:`check_values` in one sweep over
    the input: returns ``(fused, unit, looks_valid)``.

    On the CPU the mean of a float32/float64 input goes through the compiled kernel
    (``_fused.c``: each entry checked as it is loaded for the sum, one read of the input);
    otherwise (other fusions, other dtypes, no kernel built) the heads are fused a few MiB
    at a time and each step's minimum is taken while the step is still in the cache, so
    the input is read from memory once (a separate check would read all of it a second
    time, which costs as much as the head fusion itself). NaN, negative entries and -Inf
    show in the minimum; +Inf and NaN also reach the fused tensor (a sum, maximum keeps
    them), which is checked too (``H`` times smaller). ``looks_valid`` False means "run :func:`check_values` for the details": the
    problem may be confined to padded entries that are never read.

    ``ranges`` (from :func:`real_ranges`, input ``[B, H, N, N]``): check only the block of
    each sample's real tokens, so that garbage in padded entries passes without a second
    look (the fused tensor then holds it too -- mask it before use -- except from the
    kernel (:func:`kernel_takes`), which writes zeros there and takes ``row_sums`` over
    the real columns).

    ``check_fused=False`` leaves the fused tensor's +Inf/NaN to the caller, e.g. rollout,
    whose product turns any of them into NaN (0·NaN is NaN) and checks its result once.
    ``row_sums`` (``fused.shape[:-1]``): filled with the fused rows' sums, taken while
    each step is in the cache.
    """
    if attn.ndim == fused_ndim:
        fused = attn.to(dtype, copy=True)
        if row_sums is not None:
            torch.sum(fused, dim=-1, out=row_sums)
        return fused, 1, values_look_valid(fused)
    check_head_fusion(head_fusion)
    heads, side = attn.shape[-3], tuple(attn.shape[-2:])
    if attn.device.type != "cpu" or not attn.is_contiguous() or attn.numel() == 0:
        fused, unit = _fuse_scaled(attn, head_fusion, dtype)
        if row_sums is not None:
            torch.sum(fused, dim=-1, out=row_sums)
        return fused, unit, values_look_valid(attn)
    x = attn.view(-1, heads, *side)                                # [M, H, n, n]
    out = torch.empty((x.shape[0], *side), dtype=dtype, device=attn.device)
    if ranges is not None and (attn.ndim != 4 or len(ranges) != x.shape[0]):
        raise ValueError(f"ranges: one per sample of a [B, H, N, N] input; got {len(ranges)} for {tuple(attn.shape)}")
    if kernel_takes(attn, head_fusion, dtype):
        inputs_ok = _head_sum(x, out, ranges, row_sums)            # sum, rows' sums and check in one read
    else:
        inputs_ok = _fuse_in_steps(x, out, head_fusion, dtype, ranges, row_sums)
    if not check_fused:
        fused_ok = True
    elif ranges is None:
        fused_ok = values_look_valid(out)
    else:
        fused_ok = all(values_look_valid(out[i, lo:hi, lo:hi]) for i, (lo, hi) in enumerate(ranges) if hi > lo)
    looks_valid = inputs_ok and fused_ok
    fused = out.view(*attn.shape[:-3], *side)
    return fused, (heads if head_fusion == "mean" else 1), looks_valid


def add_identity_(a: Tensor, unit: float, real: Tensor | None = None) -> Tensor:
    """In place on ``a`` ``[B, N, N]``: add ``unit`` to the diagonal (only on real tokens
    when ``real`` ``[B, N]`` is given). With ``unit`` the scale of ``a`` this is the
    residual ``0.5·A + 0.5·I`` up to a factor 0.5 that row renormalisation cancels."""
    diag = a.diagonal(dim1=-2, dim2=-1)
    if real is None:
        diag.add_(unit)
    else:
        diag.add_(real.to(a.dtype) * unit)
    return a


def renorm_rows_(a: Tensor) -> Tensor:
    """In place: divide every row (last dim) by its sum; all-zero rows stay zero."""
    row_sum = a.sum(dim=-1, keepdim=True)
    return a.div_(row_sum.clamp_min_(torch.finfo(a.dtype).tiny))


def discard_(a: Tensor, ratio: float, real: Tensor | None = None) -> Tensor:
    """In place on ``a`` ``[B, N, N]``: zero the ``floor(ratio · M)`` smallest entries of
    each sample, where the candidates are the ``M = m·(m-1)`` off-diagonal entries
    between real tokens (``m`` real tokens: ``N`` without ``real``). Ties go to the
    entry that comes first in row-major order. The diagonal is never zeroed.
    """
    batch, n_tok, _ = a.shape
    candidate = ~torch.eye(n_tok, dtype=torch.bool, device=a.device).expand(batch, n_tok, n_tok)
    if real is None:
        n_drop = torch.full((batch,), math.floor(ratio * n_tok * (n_tok - 1)), device=a.device)
    else:
        candidate = candidate & real[:, :, None] & real[:, None, :]
        m = real.sum(dim=1).to(torch.float64)
        n_drop = torch.floor(ratio * m * (m - 1))
    key = a.masked_fill(~candidate, math.inf).flatten(1)
    order = key.argsort(dim=1, stable=True)
    rank_dropped = torch.arange(key.shape[1], device=a.device)[None, :] < n_drop[:, None]
    drop = torch.zeros_like(rank_dropped).scatter_(1, order, rank_dropped)
    a.view(batch, -1).masked_fill_(drop, 0)
    return a


def unnormalised_layer(
    attn: Tensor,
    head_fusion: str,
    residual: bool,
    dtype: torch.dtype,
    discard_ratio: float = 0.0,
    real: Tensor | None = None,
    fused_ndim: int = 3,
) -> Tensor:
    """Steps 1–4 of :func:`rollout` for one layer, before the row renormalisation:
    ``[B, H, N, N]``/``[B, N, N]`` → fresh ``[B, N, N]``, proportional per row to the
    renormalised layer (the head *sum* stands for the mean, see :func:`_fuse_scaled`)."""
    a, unit = fused_layer(attn, head_fusion, dtype, fused_ndim)
    return _finish_layer(a, unit, residual, discard_ratio, real)


def _finish_layer(a: Tensor, unit: float, residual: bool, discard_ratio: float, real: Tensor | None,
                  padded: Tensor | None = None) -> Tensor:
    """Steps 2–4 of :func:`rollout` in place on a fused ``[B, N, N]`` layer in scale ``unit``
    (``padded``: ``~(real[:, :, None] & real[:, None, :])``, if the caller has it already)."""
    if real is not None:
        if padded is None:
            padded = ~(real[:, :, None] & real[:, None, :])
        a.masked_fill_(padded, 0.0)   # NaN there too (never read)
    if discard_ratio > 0.0:
        discard_(a, discard_ratio, real)
    if residual:
        add_identity_(a, unit, real)
    return a


def prepared_layer(
    attn: Tensor,
    head_fusion: str,
    residual: bool,
    dtype: torch.dtype,
    discard_ratio: float = 0.0,
    real: Tensor | None = None,
    fused_ndim: int = 3,
) -> Tensor:
    """One layer as rollout and flow use it: ``[B, H, N, N]``/``[B, N, N]`` → ``[B, N, N]``.

    Fuse heads; with ``real`` ``[B, N]`` (False = padded) zero padded rows and columns;
    zero the smallest ``discard_ratio`` fraction of entries (see :func:`discard_`);
    if ``residual`` mix ``0.5·A + 0.5·I`` (identity on real tokens only); renormalise
    rows to sum 1 (all-zero rows stay zero).
    """
    return renorm_rows_(
        unnormalised_layer(attn, head_fusion, residual, dtype, discard_ratio, real, fused_ndim)
    )


# --------------------------------------------------------------------------- rollout


@torch.no_grad()
def rollout(
    attentions: Sequence[Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
    discard_ratio: float = 0.0,
    mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention rollout of Abnar & Zuidema (2020), batched.

    For every layer ``l = 1..L`` (``attentions[0]`` is the first layer):

    1. fuse heads: ``A = mean_h`` / ``max_h`` / ``min_h`` of ``[B, H, N, N]``
       (a ``[B, N, N]`` input is taken as already fused);
    2. with a mask: zero the rows and columns of padded tokens;
    3. ``discard_ratio > 0``: per sample, zero the ``floor(discard_ratio · M)``
       smallest of the ``M = m(m-1)`` off-diagonal entries between the ``m`` real
       tokens (ties: first in row-major order). The diagonal is never zeroed;
    4. ``residual``: ``A = 0.5·A + 0.5·I`` (identity on real tokens only);
    5. renormalise rows to sum 1 (a row that is all zero stays zero).

    The result is ``Â_L ⋯ Â_2 Â_1``: row ``i`` is output token ``i`` (after the last
    layer), column ``j`` is input token ``j`` (before the first layer), and rows of real
    tokens sum to 1. Padded tokens neither send nor receive relevance: their rows and
    columns of the result are zero.

    Args:
        attentions: ``L ≥ 1`` tensors ``[B, H, N, N]`` or ``[B, N, N]``, row = query.
            Heads may differ per layer; ``B`` and ``N`` may not.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: model the skip connection as ``0.5·A + 0.5·I``.
        discard_ratio: fraction in ``[0, 1)`` of the smallest entries to zero per layer.
        mask: optional ``[B, N]`` bool, True = real token (the project's convention,
            as in ``VocabAttention.update``).
        padding_mask: the same as torch's ``key_padding_mask`` (True = padded), instead of ``mask``.

    Returns:
        ``[B, N, N]`` in the inputs' floating dtype (at least float32), on their device.
    """
    layers, batch, n_tok = check_layers(attentions)
    check_head_fusion(head_fusion)
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not (
        0.0 <= discard_ratio < 1.0
    ):
        raise ValueError(f"discard_ratio must be a number in [0, 1); got {discard_ratio!r}")
    check_flag(residual, "residual")
    real = real_tokens(mask, padding_mask, batch, n_tok)
    if real is not None:
        real = real.to(layers[0].device)
    dtype = compute_dtype(layers)
    ratio = float(discard_ratio)
    # The values are checked while the heads are fused (fused_layer_checked: one read of
    # each input); only when that sweep sees NaN, Inf or a negative entry does
    # check_values look again, in detail, and raise -- unless the problem is confined to
    # padded entries, which are never read.
    suspicious = False
    ranges = real_ranges(real) if real is not None else None        # None: not contiguous runs
    padded = ~(real[:, :, None] & real[:, None, :]) if real is not None else None   # once, not per layer

    tiny = torch.finfo(dtype).tiny

    def layer(attn: Tensor) -> Tensor:
        """One layer fused, finished and renormalised (rows summing to 1)."""
        nonlocal suspicious
        # Without discarding, the rows' sums come with the fused heads (the residual adds
        # unit to each real row) -- with padding too when the kernel fuses, as it zeroes
        # padded rows and columns itself; otherwise they are taken after those steps.
        kernel_masks = ranges is not None and attn.ndim == 4 and kernel_takes(attn, head_fusion, dtype)
        sums = torch.empty(attn.shape[0], n_tok, dtype=dtype, device=attn.device) if (
            ratio == 0.0 and (real is None or kernel_masks)) else None
        a, unit, looks_valid = fused_layer_checked(attn, head_fusion, dtype, check_fused=False, row_sums=sums,
                                                   ranges=ranges if attn.ndim == 4 else None)
        suspicious |= not looks_valid
        if sums is None:
            return renorm_rows_(_finish_layer(a, unit, residual, ratio, real, padded))
        if residual:
            add_identity_(a, unit, real)
            sums += unit if real is None else unit * real.to(dtype)
        return a.div_(sums.clamp_min_(tiny)[..., None])           # all-zero rows stay zero

    # Each layer is renormalised and the product taken with plain bmm: its rows then sum
    # to 1 without being renormalised. (Carrying [R | 1] through the bmm to renormalise
    # the product instead took 3 % longer at ViT-B size.)
    prod = layer(layers[0])
    if len(layers) > 1:
        spare = torch.empty_like(prod)
        for attn in layers[1:]:
            torch.bmm(layer(attn), prod, out=spare)
            prod, spare = spare, prod
    # +Inf/NaN of a fused layer (not in the sweep's minimum) made the product NaN
    if suspicious or not values_look_valid(prod, probabilities=False):
        check_values(layers, real=real)
    return prod
