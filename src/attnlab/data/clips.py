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


def _check_at_least(*checks: tuple[str, int, int]) -> None:
    """Raise for the first ``(name, value, low)`` whose integer ``value`` is below ``low``."""
    for name, value, low in checks:
        if int(value) < low:
            raise ValueError(f"{name}={value!r}: expected an integer >= {low}")


def _scramble(pixels_mk64: np.ndarray, keys_mk64: np.ndarray) -> np.ndarray:
    """Each row of 64 pixels permuted by the argsort of its random keys (a scrambled digit)."""
    return np.take_along_axis(pixels_mk64, np.argsort(keys_mk64, axis=-1), axis=-1)


def _add_noise(canvas: np.ndarray, noise: float, rng_noise: np.random.Generator) -> None:
    """In place: i.i.d. Gaussian pixel noise of std ``noise`` (none drawn if 0)."""
    if noise > 0:
        canvas += noise * rng_noise.standard_normal(canvas.shape, dtype=np.float32)


def _as_tensors(canvas_nfss: np.ndarray, **arrays: np.ndarray) -> dict[str, torch.Tensor]:
    """The returned dict: ``x [n, frames, 1, S, S]`` from the canvas, then ``arrays`` in
    order, integer ones as int64."""
    out = {"x": torch.from_numpy(np.ascontiguousarray(canvas_nfss[:, :, None]))}
    for name, a in arrays.items():
        out[name] = torch.from_numpy(a if a.dtype == bool else a.astype(np.int64))
    return out


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
    _check_frame_args(n, frames, size, n_key, n_classes, distractor, distractor_repeat, scale)
    pools = split_indices(split, n_classes)
    rng, rng_noise = _rngs(seed, split)
    # The order of these draws is part of what a seed means: reordering them changes every clip.
    y, key_t, dis_t, dis_cls = _frame_schedule(rng, n, frames, n_key, n_classes, n_distractors,
                                               distractor_repeat)
    key_ids = _sample_from_pools(rng, pools, y, n_key, distinct=True)        # [n, n_key]
    dis_ids = _sample_from_pools(rng, pools, dis_cls.reshape(-1)).reshape(dis_cls.shape)
    positions = rng.integers(0, size - 8 * scale + 1, size=(n, frames, 2))
    scramble_keys = rng.random((*dis_t.shape, 64))                           # used by "noise"

    digit_ids, digit_classes, evidence = _frame_contents(frames, y, key_t, key_ids, dis_t, dis_ids,
                                                         dis_cls, distractor)
    positions = np.where(digit_ids[..., None] >= 0, positions, -1)
    canvas = _render_frames(digit_ids, positions, dis_t, scramble_keys if distractor == "noise" else None,
                            size, scale)
    _add_noise(canvas, noise, rng_noise)
    return _as_tensors(canvas, y=y, evidence=evidence, digit_classes=digit_classes,
                       digit_ids=digit_ids, positions=positions)


def _check_frame_args(n: int, frames: int, size: int, n_key: int, n_classes: int, distractor: str,
                      distractor_repeat: int, scale: int) -> None:
    """The argument checks of :func:`make_frame_clips` that need no random draw."""
    _check_at_least(("n", n, 0), ("frames", frames, 1), ("n_key", n_key, 1),
                    ("n_classes", n_classes, 2), ("scale", scale, 1),
                    ("distractor_repeat", distractor_repeat, 0))
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


def _frame_schedule(rng: np.random.Generator, n: int, frames: int, n_key: int, n_classes: int,
                    n_distractors: int | None, distractor_repeat: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw each clip's class ``y [n]``, its key times ``key_t [n, n_key]``, distractor
    times ``dis_t [n, k]`` and distractor classes ``dis_cls [n, k]``."""
    y = rng.integers(0, n_classes, size=n)                                   # [n]
    order = np.argsort(rng.random((n, frames)), axis=1)                      # random times
    k_max = min(frames - n_key, (n_classes - 1) * distractor_repeat)
    k = k_max if n_distractors is None else int(n_distractors)
    if not 0 <= k <= k_max:
        raise ValueError(f"n_distractors={n_distractors!r}: expected 0..{k_max} (at most "
                         f"frames - n_key and (n_classes - 1)·distractor_repeat) or None for the most")
    # multiset of the other classes, shuffled per clip: others[i] = classes != y[i]
    others = np.arange(n_classes - 1)[None, :] + (np.arange(n_classes - 1)[None, :] >= y[:, None])
    multiset = np.tile(others, (1, distractor_repeat))                       # [n, (C-1)·r]
    shuffle = np.argsort(rng.random(multiset.shape), axis=1)[:, :k]
    dis_cls = np.take_along_axis(multiset, shuffle, axis=1)                  # [n, k]
    return y, order[:, :n_key], order[:, n_key:n_key + k], dis_cls


def _frame_contents(frames: int, y: np.ndarray, key_t: np.ndarray, key_ids: np.ndarray,
                    dis_t: np.ndarray, dis_ids: np.ndarray, dis_cls: np.ndarray, distractor: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each frame shows, ``[n, frames]`` each: source ``digit_ids`` and
    ``digit_classes`` (-1: blank; class -1 also for scrambled blobs), and ``evidence``
    (True on the key frames)."""
    n = len(y)
    clip = np.arange(n)[:, None]
    digit_ids = np.full((n, frames), -1, dtype=np.int64)
    digit_classes = np.full((n, frames), -1, dtype=np.int64)
    digit_ids[clip, key_t] = key_ids
    digit_classes[clip, key_t] = y[:, None]
    if distractor != "none":
        digit_ids[clip, dis_t] = dis_ids
    if distractor == "digits":
        digit_classes[clip, dis_t] = dis_cls
    evidence = np.zeros((n, frames), dtype=bool)
    evidence[clip, key_t] = True
    return digit_ids, digit_classes, evidence


def _render_frames(digit_ids: np.ndarray, positions: np.ndarray, dis_t: np.ndarray,
                   scramble_keys: np.ndarray | None, size: int, scale: int) -> np.ndarray:
    """``[n, frames, size, size]`` float32: each frame's digit (none where ``digit_ids``
    is -1) pasted at its position; the distractor frames ``dis_t`` scrambled with
    ``scramble_keys [n, k, 64]`` unless it is None."""
    n, frames = digit_ids.shape
    images, _ = _digits()
    drawn = digit_ids >= 0
    src = images[np.where(drawn, digit_ids, 0)].reshape(n, frames, 64).copy()
    if scramble_keys is not None:
        clip = np.arange(n)[:, None]
        src[clip, dis_t] = _scramble(src[clip, dis_t], scramble_keys)
    canvas = np.zeros((n, frames, size, size), dtype=np.float32)
    ci, ti = np.nonzero(drawn)
    _paste(canvas, ci, ti, positions[ci, ti], _upsample(src[ci, ti].reshape(-1, 8, 8), scale),
           overlap=False)
    return canvas


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
    _check_video_args(n, frames, size, patch, n_classes, clutter, max_speed, scale)
    pools = split_indices(split, n_classes)
    rng, rng_noise = _rngs(seed, split)
    room = size - 8 * scale                                  # largest top-left coordinate
    # The order of these draws is part of what a seed means: reordering them changes every clip.
    y = rng.integers(0, n_classes, size=n)
    digit_ids = _sample_from_pools(rng, pools, y)[:, 0]                     # [n]
    direction, speed, positions = _trajectories(rng, n, frames, room, max_speed)
    clutter_ids = _sample_from_pools(rng, [np.concatenate(pools)], np.zeros(n, dtype=np.int64), clutter)
    clutter_pos = rng.integers(0, room + 1, size=(n, clutter, 2))
    clutter_keys = rng.random((n, clutter, 64))

    digit = _render_moving_digit(digit_ids, positions, size, scale)         # [n, frames, S, S]
    # the moving digit is drawn over the static clutter
    canvas = np.maximum(_render_clutter(clutter_ids, clutter_pos, clutter_keys, size, scale), digit)
    _add_noise(canvas, noise, rng_noise)
    return _as_tensors(canvas, y=y, direction=direction, speed=speed,
                       evidence=_patch_evidence(digit, patch), digit_ids=digit_ids,
                       positions=positions, clutter_ids=clutter_ids, clutter_positions=clutter_pos)


def _check_video_args(n: int, frames: int, size: int, patch: int, n_classes: int, clutter: int,
                      max_speed: int, scale: int) -> None:
    """The argument checks of :func:`make_video_clips`."""
    _check_at_least(("n", n, 0), ("frames", frames, 1), ("patch", patch, 1),
                    ("n_classes", n_classes, 2), ("scale", scale, 1),
                    ("clutter", clutter, 0), ("max_speed", max_speed, 1))
    if n_classes > 10:
        raise ValueError(f"n_classes={n_classes!r}: expected at most 10 (digits 0-9)")
    if size % patch:
        raise ValueError(f"patch={patch!r}: expected a divisor of size={size}")
    ds = 8 * scale
    travel = max_speed * (frames - 1)
    if size - ds < travel:
        raise ValueError(f"max_speed={max_speed!r}: the digit ({ds} px) travels up to {travel} px "
                         f"in {frames} frames, more than the canvas allows (size={size})")


def _trajectories(rng: np.random.Generator, n: int, frames: int, room: int, max_speed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw straight-line motions: ``direction [n]``, ``speed [n]`` and the top-left
    corners ``positions [n, frames, 2]``, all within ``0..room``."""
    direction = rng.integers(0, len(DIRECTIONS), size=n)
    speed = rng.integers(1, max_speed + 1, size=n)
    step = DIRECTIONS[direction] * speed[:, None]                           # [n, 2]
    span = step * (frames - 1)                                              # signed travel
    low = np.maximum(0, -span)                                              # [n, 2]
    high = room - np.maximum(0, span)                                       # inclusive
    start = low + (rng.random((n, 2)) * (high - low + 1)).astype(np.int64)
    return direction, speed, start[:, None, :] + np.arange(frames)[None, :, None] * step[:, None, :]


def _render_moving_digit(digit_ids: np.ndarray, positions: np.ndarray, size: int, scale: int
                         ) -> np.ndarray:
    """``[n, frames, size, size]`` float32: clip ``i``'s digit alone, at ``positions[i, t]``
    in frame ``t``."""
    n, frames, _ = positions.shape
    images, _ = _digits()
    digit = np.zeros((n, frames, size, size), dtype=np.float32)
    ci = np.repeat(np.arange(n), frames)
    ti = np.tile(np.arange(frames), n)
    img = _upsample(images[digit_ids], scale)                               # [n, ds, ds]
    _paste(digit, ci, ti, positions.reshape(-1, 2), np.repeat(img, frames, axis=0),
           overlap=False)
    return digit


def _patch_evidence(digit_nfss: np.ndarray, patch: int) -> np.ndarray:
    """``[n, frames, P]`` bool: True on the patches holding a non-zero digit pixel."""
    n, frames, size, _ = digit_nfss.shape
    grid = size // patch
    evidence = (digit_nfss > 0).reshape(n, frames, grid, patch, grid, patch).any(axis=(3, 5))
    return evidence.reshape(n, frames, grid * grid)


def _render_clutter(clutter_ids: np.ndarray, clutter_pos: np.ndarray, clutter_keys: np.ndarray,
                    size: int, scale: int) -> np.ndarray:
    """``[n, 1, size, size]`` float32: each clip's static scrambled digits, pixelwise max
    where they overlap."""
    n, clutter = clutter_ids.shape
    canvas = np.zeros((n, 1, size, size), dtype=np.float32)
    if clutter:
        images, _ = _digits()
        blobs = _scramble(images[clutter_ids].reshape(n, clutter, 64), clutter_keys)
        ci_c = np.repeat(np.arange(n), clutter)
        _paste(canvas, ci_c, np.zeros_like(ci_c), clutter_pos.reshape(-1, 2),
               _upsample(blobs.reshape(-1, 8, 8), scale))
    return canvas
