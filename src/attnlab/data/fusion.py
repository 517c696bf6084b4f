"""Two views of the same handwritten digit, for two-stream fusion experiments.

Built from the real 8×8 digits of ``sklearn.datasets.load_digits`` (1797 images, shipped
with scikit-learn; nothing is downloaded):

* ``appearance [N, 3, S, S]``: the digit upsampled (bilinear) to ``S × S`` and drawn in a
  random foreground colour on a random background colour, plus a little pixel noise
  (the "RGB" stream);
* ``structure [N, K, S, S]``: ``K`` keypoint heatmaps (the "pose" stream). The keypoints
  are ``K`` points spread along the strokes by farthest-point sampling over the bright
  pixels of the digit (source value ≥ 8 of 16), started from a random stroke pixel (so
  each seed gives a slightly different, equally valid set: a noisy "keypoint detector"),
  listed in raster order; channel ``k`` holds a unit-height Gaussian (σ = ``S / 16``
  pixels) centred on keypoint ``k``.

Either stream can be made uninformative on a fraction of the samples (``corrupted``
records which), to check whether a fusion model learns to rely on the other stream.

Train and test come from two fixed, disjoint, class-stratified halves of the images
(whatever ``seed``), so test accuracy is measured on digits never seen in training.
Randomness comes from ``numpy.random.default_rng`` streams derived from ``seed``; the
appearance, structure and corruption draws use separate streams, so corrupting one
stream leaves the other bit-identical.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["STREAMS", "make_two_stream", "digit_split"]

STREAMS = ("appearance", "structure")
_SPLITS = ("train", "test")
_MODES = ("noise", "shuffle")
_SPLIT_SEED = 20240607        # fixed: the train/test halves never depend on `seed`
_BRIGHT = 8.0                 # a source pixel (0..16) at least this bright is on a stroke
_NOISE_STD = 0.05             # pixel noise of the appearance stream


def digit_split(split: str) -> np.ndarray:
    """Row indices into ``load_digits().images`` of one half: ``"train"`` or ``"test"``.

    Per class, a fixed random half of the images (the first ``ceil(n/2)`` of a seeded
    permutation) is ``train`` and the rest ``test``; indices are returned sorted.
    """
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}: expected one of {_SPLITS}")
    from sklearn.datasets import load_digits

    return _split_rows(load_digits().target, split)


def _split_rows(target: np.ndarray, split: str) -> np.ndarray:
    rng = np.random.default_rng(_SPLIT_SEED)
    halves = {"train": [], "test": []}
    for c in np.unique(target):
        rows = rng.permutation(np.flatnonzero(target == c))
        cut = (len(rows) + 1) // 2
        halves["train"].append(rows[:cut])
        halves["test"].append(rows[cut:])
    return np.sort(np.concatenate(halves[split]))


def make_two_stream(split: str = "train", *, size: int = 16, n_keypoints: int = 17,
                    corrupt_stream: str | None = None, corrupt_fraction: float = 1.0,
                    corrupt_mode: str = "noise", seed: int = 0) -> dict[str, torch.Tensor]:
    """Appearance and keypoint-heatmap views of the digits of one split.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint halves of the images, see :func:`digit_split`).
        size: side ``S`` of both streams' images (≥ 8).
        n_keypoints: ``K``, number of heatmap channels of the structure stream.
        corrupt_stream: ``None``, ``"appearance"`` or ``"structure"``: the stream made
            uninformative on ``corrupt_fraction`` of the samples.
        corrupt_fraction: in ``[0, 1]``; exactly ``round(fraction · N)`` samples are
            corrupted, chosen at random.
        corrupt_mode: ``"noise"`` replaces the stream of a corrupted sample with Gaussian
            noise whose per-channel mean and std match the stream's over the whole split
            (so nothing about the sample survives); ``"shuffle"`` gives each corrupted
            sample the stream of another corrupted sample (one random cycle through them),
            so the stream's values are only permuted (same marginal distribution) but no
            longer belong to the label.
        seed: seeds every random draw (colours, noise, keypoint starts, which samples are
            corrupted, the noise, the permutation).

    Returns:
        dict with
        ``appearance`` float32 ``[N, 3, S, S]``, ``structure`` float32 ``[N, K, S, S]``,
        ``y`` int64 ``[N]`` digit class,
        ``corrupted`` bool ``[N, 2]`` (columns ``(appearance, structure)``),
        ``index`` int64 ``[N]`` row of each sample in ``load_digits().images``,
        ``keypoints`` int64 ``[N, K, 2]`` (row, col) pixel of each keypoint in the
        ``S × S`` image (of the uncorrupted structure stream).

    Raises:
        ValueError: an argument outside its accepted values (the message names it).
    """
    _check_two_stream_args(split, size, n_keypoints, corrupt_stream, corrupt_fraction, corrupt_mode)
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = _split_rows(digits.target, split)
    images = digits.images[index].astype(np.float32)                 # [N, 8, 8], 0..16
    y = digits.target[index].astype(np.int64)
    rng_app, rng_kp, rng_cor = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    appearance = _render_appearance(images, size, rng_app)           # [N, 3, S, S]
    keypoints = _keypoints(images >= _BRIGHT, size, n_keypoints, rng_kp)  # [N, K, 2]
    structure = _heatmaps(keypoints, size, sigma=size / 16)          # [N, K, S, S]
    corrupted = np.zeros((len(index), len(STREAMS)), dtype=bool)
    if corrupt_stream is not None:
        stream = appearance if corrupt_stream == "appearance" else structure
        rows = _corrupt(stream, corrupt_fraction, corrupt_mode, rng_cor)
        corrupted[rows, STREAMS.index(corrupt_stream)] = True

    return {
        "appearance": torch.from_numpy(appearance),
        "structure": torch.from_numpy(structure),
        "y": torch.from_numpy(y),
        "corrupted": torch.from_numpy(corrupted),
        "index": torch.from_numpy(index.astype(np.int64)),
        "keypoints": torch.from_numpy(keypoints),
    }


def _check_two_stream_args(split: str, size: int, n_keypoints: int, corrupt_stream: str | None,
                           corrupt_fraction: float, corrupt_mode: str) -> None:
    """The argument checks of :func:`make_two_stream`."""
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}: expected one of {_SPLITS}")
    if size < 8:
        raise ValueError(f"size={size}: expected >= 8")
    if n_keypoints < 1:
        raise ValueError(f"n_keypoints={n_keypoints}: expected >= 1")
    if corrupt_stream is not None and corrupt_stream not in STREAMS:
        raise ValueError(f"corrupt_stream={corrupt_stream!r}: expected None or one of {STREAMS}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"corrupt_fraction={corrupt_fraction}: expected a number in [0, 1]")
    if corrupt_mode not in _MODES:
        raise ValueError(f"corrupt_mode={corrupt_mode!r}: expected one of {_MODES}")


def _corrupt(stream: np.ndarray, fraction: float, mode: str, rng: np.random.Generator) -> np.ndarray:
    """In place: make ``round(fraction · N)`` random samples of ``stream [N, C, S, S]``
    uninformative (``mode`` as ``corrupt_mode`` of :func:`make_two_stream`); returns
    their rows, sorted."""
    n = len(stream)
    m = int(round(fraction * n))
    rows = np.sort(rng.permutation(n)[:m])
    if mode == "shuffle" and m == 1:
        raise ValueError(f"corrupt_fraction={fraction}: corrupt_mode='shuffle' needs "
                         f"at least 2 corrupted samples, got 1 of {n}")
    if mode == "noise":
        mean = stream.mean(axis=(0, 2, 3), keepdims=True)           # [1, C, 1, 1]
        std = stream.std(axis=(0, 2, 3), keepdims=True)
        noise = rng.standard_normal((m,) + stream.shape[1:], dtype=np.float32)
        stream[rows] = mean + std * noise
    elif m > 1:
        cycle = rng.permutation(rows)                                # one cycle: no fixed point
        stream[cycle] = stream[np.roll(cycle, -1)]
    return rows


def _render_appearance(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``[N, 8, 8]`` (0..16) → ``[N, 3, S, S]``: a random foreground colour (each channel in
    [0.5, 1]) on a random background colour ([0, 0.3]), bilinear, plus pixel noise."""
    n = len(images)
    ink = F.interpolate(torch.from_numpy(images / 16.0)[:, None], size=(size, size),
                        mode="bilinear", align_corners=False).numpy()    # [N, 1, S, S] in [0, 1]
    fg = rng.uniform(0.5, 1.0, size=(n, 3, 1, 1)).astype(np.float32)
    bg = rng.uniform(0.0, 0.3, size=(n, 3, 1, 1)).astype(np.float32)
    noise = _NOISE_STD * rng.standard_normal((n, 3, size, size), dtype=np.float32)
    return (bg + (fg - bg) * ink + noise).astype(np.float32)


def _keypoints(bright: np.ndarray, size: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Farthest-point sampling of ``k`` pixels of the ``S × S`` grid whose source pixel is
    bright, started from a random such pixel (ties of the farthest distance go to the
    first in raster order); returned in raster order.

    ``bright [N, 8, 8]`` bool → ``[N, k, 2]`` int64 (row, col). With fewer than ``k``
    candidate pixels, points repeat.
    """
    n = len(bright)
    src = (np.arange(size) * bright.shape[1]) // size                  # S-grid → source row/col
    cand = bright[:, src[:, None], src[None, :]].reshape(n, size * size)  # [N, S·S]
    rc = np.stack(np.divmod(np.arange(size * size), size), axis=-1).astype(np.float64)  # [S·S, 2]
    d2_all = ((rc[:, None] - rc[None]) ** 2).sum(-1)                 # [S·S, S·S]
    chosen = np.empty((n, k), dtype=np.int64)
    chosen[:, 0] = np.where(cand, rng.random(cand.shape), -1.0).argmax(1)  # a random candidate
    nearest = np.where(cand, d2_all[chosen[:, 0]], -1.0)             # [N, S·S]; -1 off the strokes
    for j in range(1, k):
        chosen[:, j] = nearest.argmax(1)
        nearest = np.where(cand, np.minimum(nearest, d2_all[chosen[:, j]]), -1.0)
    chosen.sort(axis=1)                                              # raster order
    return np.stack(np.divmod(chosen, size), axis=-1)               # [N, k, 2]


def _heatmaps(keypoints: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """``[N, K, 2]`` pixel keypoints → ``[N, K, S, S]`` unit-height Gaussians."""
    grid = np.arange(size, dtype=np.float32)
    dr = grid[None, None, :] - keypoints[..., 0:1].astype(np.float32)  # [N, K, S]
    dc = grid[None, None, :] - keypoints[..., 1:2].astype(np.float32)
    g = np.exp(-(dr[..., :, None] ** 2 + dc[..., None, :] ** 2) / (2 * sigma ** 2))
    return g.astype(np.float32)
