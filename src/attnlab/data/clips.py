"""Clips of real handwritten digits with planted evidence.

Both generators draw the 8×8 digits of :func:`sklearn.datasets.load_digits` (shipped
with scikit-learn, works offline), upsample them by nearest neighbour (``scale``,
default 2 → 16×16, intensities in [0, 1]) and paste them on ``size×size`` canvases.
Because upsampling is nearest-neighbour and positions are integers, the pixels a digit
covers are known exactly, and the evidence masks are computed from them.

* :func:`make_frame_clips` — weakly supervised clips: the label is decided by a few
  key frames among distractors (the ``frames`` experiment: CNN per frame → transformer).
* :func:`make_video_clips` — one digit moving in a straight line (the ``video``
  experiment: divided space-time attention); evidence per frame and patch.

Train and test clips draw from disjoint halves of the 1797 source images
(``split="train"|"test"``; within each class its images, in dataset order, alternate
between ``train`` and ``test``), so test accuracy is honest. Everything is
deterministic under ``seed`` (``numpy.random.default_rng``; no global state); the seed
is combined with the split, and the random structure of a clip (labels, frames,
positions, source images) does not depend on ``noise``, ``distractor`` or ``clutter``,
so regenerating with ``noise=0`` reproduces the same clips without noise.

All outputs are torch tensors in a dict.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SPLITS = ("train", "test")
DISTRACTORS = ("digits", "noise", "none")
# Motion directions of make_video_clips as (d_row, d_col) per frame step, rows pointing
# down: 0=E, 1=NE, 2=N, 3=NW, 4=W, 5=SW, 6=S, 7=SE (counter-clockwise from east).
DIRECTIONS = np.array([(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)],
                      dtype=np.int64)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """``images [1797, 8, 8]`` float32 in [0, 1] and ``target [1797]`` int64 (read-only)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    target = d.target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def split_indices(split: str, n_classes: int = 10) -> list[np.ndarray]:
    """Source-image indices (into ``load_digits``) of each class ``0..n_classes-1`` in
    ``split``: a class's images, in dataset order, alternate train, test, train, ..."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    _, target = _digits()
    pools = []
    for c in range(n_classes):
        idx = np.flatnonzero(target == c)
        pools.append(idx[SPLITS.index(split)::2])
    return pools


def _rngs(seed: int, split: str) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the clip structure and for the pixel noise."""
    ss = np.random.SeedSequence([int(seed), SPLITS.index(split)])
    s_struct, s_noise = ss.spawn(2)
    return np.random.default_rng(s_struct), np.random.default_rng(s_noise)


def _sample_from_pools(rng: np.random.Generator, pools: list[np.ndarray], cls: np.ndarray,
                       k: int = 1, distinct: bool = False) -> np.ndarray:
    """``k`` source ids of class ``cls[i]`` for each ``i`` → ``[len(cls), k]``; without
    repetition within a row if ``distinct``."""
    sizes = np.array([len(p) for p in pools])
    table = np.full((len(pools), sizes.max()), -1, dtype=np.int64)
    for c, p in enumerate(pools):
        table[c, : len(p)] = p
    if distinct:
        keys = rng.random((len(cls), sizes.max()))
        keys[np.arange(sizes.max())[None, :] >= sizes[cls][:, None]] = np.inf
        rank = np.argsort(keys, axis=1)[:, :k]               # [n, k] distinct ranks
    else:
        rank = (rng.random((len(cls), k)) * sizes[cls][:, None]).astype(np.int64)
    return table[cls[:, None], rank]


def _upsample(img_mhw: np.ndarray, scale: int) -> np.ndarray:
    return img_mhw.repeat(scale, axis=1).repeat(scale, axis=2)


def _paste(canvas_nfss: np.ndarray, clip: np.ndarray, frame: np.ndarray, pos_m2: np.ndarray,
           img_mhw: np.ndarray, overlap: bool = True) -> None:
    """``canvas[clip[m], frame[m], r:r+h, c:c+w] = max(canvas, img[m])`` for every ``m``
    (plain assignment, faster, when ``overlap`` is False: one image per (clip, frame))."""
    m, h, w = img_mhw.shape
    if m == 0:
        return
    rows = pos_m2[:, 0, None, None] + np.arange(h)[None, :, None]    # [m, h, 1]
    cols = pos_m2[:, 1, None, None] + np.arange(w)[None, None, :]    # [m, 1, w]
    index = (clip[:, None, None], frame[:, None, None], rows, cols)
    if overlap:
        np.maximum.at(canvas_nfss, index, img_mhw)
    else:
        canvas_nfss[index] = img_mhw


def _check(name: str, value: int, low: int) -> None:
    if int(value) < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low}")


def make_frame_clips(n: int, *, frames: int = 24, size: int = 32, n_key: int = 3,
                     n_classes: int = 10, distractor: str = "digits", n_distractors: int | None = 4,
                     distractor_repeat: int = 1, noise: float = 0.2, scale: int = 2, split: str = "train",
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Clips whose class is decided by ``n_key`` key frames hidden among distractors.

    Rule (per clip):

    * the class ``y`` is uniform over ``0..n_classes-1``;
    * ``n_key`` **key frames**, at distinct random times, each show a digit of class
      ``y``, each a different source image;
    * ``distractor="digits"``: ``k = n_distractors`` other frames (at random non-key
      times) each show a digit of a class ≠ ``y``, every such class in at most
      ``distractor_repeat`` (< ``n_key``) frames: their classes are the first ``k``
      entries of a random shuffle of the multiset {each class ≠ y, ``distractor_repeat``
      times} (source images drawn with replacement). ``n_distractors=None`` takes the
      most allowed, ``min(frames - n_key, (n_classes - 1) · distractor_repeat)``. So
      ``y`` is the **unique class shown more than ``distractor_repeat`` times** (exactly
      ``n_key`` times): the label is the repeated digit. With the defaults (24 frames,
      3 key, 4 distractors shown once each, 17 blank frames) a frame holding a digit is
      a key frame with probability 3/7: no single frame decides the clip, the model
      must compare frames;
    * ``distractor="noise"``: the same ``k`` frames instead show a *scrambled* digit
      (the 64 pixels of a random source image permuted) — the easy variant;
    * ``distractor="none"``: those frames stay blank;
    * remaining frames are blank; every digit (or blob) sits at a uniformly random
      integer position fully inside the canvas; i.i.d. Gaussian noise of std ``noise``
      is added to every pixel of every frame.

    Returns a dict of tensors:

    * ``x`` float32 ``[n, frames, 1, size, size]``; ``y`` int64 ``[n]``;
    * ``evidence`` bool ``[n, frames]``: True exactly on the key frames;
    * ``digit_classes`` int64 ``[n, frames]``: class of the digit shown (-1: blank or
      scrambled blob);
    * ``digit_ids`` int64 ``[n, frames]``: index into ``load_digits`` of the source
      image drawn (also for scrambled blobs; -1: blank);
    * ``positions`` int64 ``[n, frames, 2]``: top-left (row, col) of what was drawn
      (-1: blank); it covers ``8·scale`` × ``8·scale`` pixels.
    """
    for name, value, low in (("n", n, 0), ("frames", frames, 1), ("n_key", n_key, 1),
                             ("n_classes", n_classes, 2), ("scale", scale, 1),
                             ("distractor_repeat", distractor_repeat, 0)):
        _check(name, value, low)
    if distractor not in DISTRACTORS:
        raise ValueError(f"distractor={distractor!r}: expected one of {DISTRACTORS}")
    if n_classes > 10:
        raise ValueError(f"n_classes={n_classes!r}: expected at most 10 (digits 0-9)")
    if n_key > frames:
        raise ValueError(f"n_key={n_key!r}: expected at most frames={frames}")
    if distractor_repeat >= n_key:
        raise ValueError(f"distractor_repeat={distractor_repeat!r}: expected < n_key={n_key} "
                         "so that the key class is the unique most repeated one")
    ds = 8 * scale
    if size < ds:
        raise ValueError(f"size={size!r}: expected >= 8·scale = {ds}")
    pools = split_indices(split, n_classes)
    rng, rng_noise = _rngs(seed, split)
    images, _ = _digits()
    ar = np.arange(n)

    y = rng.integers(0, n_classes, size=n)                                   # [n]
    order = np.argsort(rng.random((n, frames)), axis=1)                      # random times
    key_t = order[:, :n_key]                                                 # [n, n_key]
    k_max = min(frames - n_key, (n_classes - 1) * distractor_repeat)
    k = k_max if n_distractors is None else int(n_distractors)
    if not 0 <= k <= k_max:
        raise ValueError(f"n_distractors={n_distractors!r}: expected 0..{k_max} (at most "
                         f"frames - n_key and (n_classes - 1)·distractor_repeat) or None for the most")
    dis_t = order[:, n_key:n_key + k]                                        # [n, k]
    # multiset of the other classes, shuffled per clip: others[i] = classes != y[i]
    others = np.arange(n_classes - 1)[None, :] + (np.arange(n_classes - 1)[None, :] >= y[:, None])
    multiset = np.tile(others, (1, distractor_repeat))                       # [n, (C-1)·r]
    shuffle = np.argsort(rng.random(multiset.shape), axis=1)[:, :k]
    dis_cls = np.take_along_axis(multiset, shuffle, axis=1)                  # [n, k]

    key_ids = _sample_from_pools(rng, pools, y, n_key, distinct=True)        # [n, n_key]
    dis_ids = _sample_from_pools(rng, pools, dis_cls.reshape(-1)).reshape(n, k)
    positions = rng.integers(0, size - ds + 1, size=(n, frames, 2))
    scramble_keys = rng.random((n, k, 64))                                   # used by "noise"

    digit_ids = np.full((n, frames), -1, dtype=np.int64)
    digit_classes = np.full((n, frames), -1, dtype=np.int64)
    digit_ids[ar[:, None], key_t] = key_ids
    digit_classes[ar[:, None], key_t] = y[:, None]
    if distractor != "none":
        digit_ids[ar[:, None], dis_t] = dis_ids
    if distractor == "digits":
        digit_classes[ar[:, None], dis_t] = dis_cls
    drawn = digit_ids >= 0
    positions = np.where(drawn[..., None], positions, -1)
    evidence = np.zeros((n, frames), dtype=bool)
    evidence[ar[:, None], key_t] = True

    src = images[np.where(drawn, digit_ids, 0)].reshape(n, frames, 64).copy()
    if distractor == "noise":
        perm = np.argsort(scramble_keys, axis=2)                             # [n, k, 64]
        blobs = np.take_along_axis(src[ar[:, None], dis_t], perm, axis=2)
        src[ar[:, None], dis_t] = blobs
    canvas = np.zeros((n, frames, size, size), dtype=np.float32)
    ci, ti = np.nonzero(drawn)
    _paste(canvas, ci, ti, positions[ci, ti], _upsample(src[ci, ti].reshape(-1, 8, 8), scale),
           overlap=False)
    if noise > 0:
        canvas += noise * rng_noise.standard_normal(canvas.shape, dtype=np.float32)
    return {
        "x": torch.from_numpy(canvas[:, :, None]),
        "y": torch.from_numpy(y.astype(np.int64)),
        "evidence": torch.from_numpy(evidence),
        "digit_classes": torch.from_numpy(digit_classes),
        "digit_ids": torch.from_numpy(digit_ids),
        "positions": torch.from_numpy(positions.astype(np.int64)),
    }


def make_video_clips(n: int, *, frames: int = 8, size: int = 32, patch: int = 8,
                     n_classes: int = 10, noise: float = 0.2, clutter: int = 0,
                     max_speed: int = 2, scale: int = 2, split: str = "train",
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """One real digit moving in a straight line; label = its class.

    Per clip: class ``y`` uniform over ``0..n_classes-1``, one source image of that
    class, a direction ``0..7`` (:data:`DIRECTIONS`: E, NE, N, NW, W, SW, S, SE; one
    step moves ``speed`` pixels along each non-zero axis) and a speed uniform in
    ``1..max_speed`` pixels per frame; the start is uniform among the positions that
    keep the whole trajectory inside the canvas. ``clutter`` static scrambled digits
    (the pixels of random source images permuted) sit at random places in every frame;
    the moving digit is drawn over them (pixelwise max). i.i.d. Gaussian noise of std
    ``noise`` is added everywhere.

    Patches are the ``patch×patch`` cells of the canvas, numbered row-major over the
    ``(size/patch)×(size/patch)`` grid: patch ``p`` covers rows
    ``(p // G)·patch ...`` and columns ``(p % G)·patch ...`` with ``G = size // patch``.

    Returns a dict of tensors:

    * ``x`` float32 ``[n, frames, 1, size, size]``; ``y`` int64 ``[n]``;
    * ``direction`` int64 ``[n]``; ``speed`` int64 ``[n]``;
    * ``evidence`` bool ``[n, frames, P]``, ``P = G²``: True on the patches containing at
      least one non-zero pixel of the moving digit in that frame (clutter excluded);
    * ``digit_ids`` int64 ``[n]`` (index into ``load_digits``);
    * ``positions`` int64 ``[n, frames, 2]``: top-left (row, col) of the digit;
    * ``clutter_ids`` int64 ``[n, clutter]``, ``clutter_positions`` int64 ``[n, clutter, 2]``.
    """
    for name, value, low in (("n", n, 0), ("frames", frames, 1), ("patch", patch, 1),
                             ("n_classes", n_classes, 2), ("scale", scale, 1),
                             ("clutter", clutter, 0), ("max_speed", max_speed, 1)):
        _check(name, value, low)
    if n_classes > 10:
        raise ValueError(f"n_classes={n_classes!r}: expected at most 10 (digits 0-9)")
    if size % patch:
        raise ValueError(f"patch={patch!r}: expected a divisor of size={size}")
    ds = 8 * scale
    travel = max_speed * (frames - 1)
    if size - ds < travel:
        raise ValueError(f"max_speed={max_speed!r}: the digit ({ds} px) travels up to {travel} px "
                         f"in {frames} frames, more than the canvas allows (size={size})")
    pools = split_indices(split, n_classes)
    rng, rng_noise = _rngs(seed, split)
    all_pools = [np.concatenate(pools)]
    images, _ = _digits()
    grid = size // patch

    y = rng.integers(0, n_classes, size=n)
    digit_ids = _sample_from_pools(rng, pools, y)[:, 0]                     # [n]
    direction = rng.integers(0, len(DIRECTIONS), size=n)
    speed = rng.integers(1, max_speed + 1, size=n)
    step = DIRECTIONS[direction] * speed[:, None]                           # [n, 2]
    span = step * (frames - 1)                                              # signed travel
    low = np.maximum(0, -span)                                              # [n, 2]
    high = size - ds - np.maximum(0, span)                                  # inclusive
    start = low + (rng.random((n, 2)) * (high - low + 1)).astype(np.int64)
    positions = start[:, None, :] + np.arange(frames)[None, :, None] * step[:, None, :]
    clutter_ids = _sample_from_pools(rng, all_pools, np.zeros(n, dtype=np.int64), clutter)
    clutter_pos = rng.integers(0, size - ds + 1, size=(n, clutter, 2))
    clutter_perm = np.argsort(rng.random((n, clutter, 64)), axis=2)

    # moving digit alone, then its patches
    digit = np.zeros((n, frames, size, size), dtype=np.float32)
    ci = np.repeat(np.arange(n), frames)
    ti = np.tile(np.arange(frames), n)
    img = _upsample(images[digit_ids], scale)                               # [n, ds, ds]
    _paste(digit, ci, ti, positions.reshape(-1, 2), np.repeat(img, frames, axis=0),
           overlap=False)
    evidence = (digit > 0).reshape(n, frames, grid, patch, grid, patch).any(axis=(3, 5))
    evidence = evidence.reshape(n, frames, grid * grid)

    canvas = np.zeros((n, 1, size, size), dtype=np.float32)
    if clutter:
        blobs = np.take_along_axis(images[clutter_ids].reshape(n, clutter, 64), clutter_perm, axis=2)
        ci_c = np.repeat(np.arange(n), clutter)
        _paste(canvas, ci_c, np.zeros_like(ci_c), clutter_pos.reshape(-1, 2),
               _upsample(blobs.reshape(-1, 8, 8), scale))
    canvas = np.maximum(canvas, digit)                                      # [n, frames, S, S]
    if noise > 0:
        canvas += noise * rng_noise.standard_normal(canvas.shape, dtype=np.float32)
    return {
        "x": torch.from_numpy(np.ascontiguousarray(canvas[:, :, None])),
        "y": torch.from_numpy(y.astype(np.int64)),
        "direction": torch.from_numpy(direction.astype(np.int64)),
        "speed": torch.from_numpy(speed.astype(np.int64)),
        "evidence": torch.from_numpy(evidence),
        "digit_ids": torch.from_numpy(digit_ids.astype(np.int64)),
        "positions": torch.from_numpy(positions.astype(np.int64)),
        "clutter_ids": torch.from_numpy(clutter_ids.astype(np.int64)),
        "clutter_positions": torch.from_numpy(clutter_pos.astype(np.int64)),
    }
