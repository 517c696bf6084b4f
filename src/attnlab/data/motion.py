"""BasicMotions: smartwatch accelerometer + gyroscope, 4 activities, 6 channels x 100 steps.

The real UEA dataset shipped inside the ``sktime`` package (40 train + 40 test
sequences); nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNELS = ("acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z")


@dataclass(frozen=True)
class SequenceSplit:
    """``x [N, T, F]`` float32, ``y [N]`` int64 class ids."""

    x: np.ndarray
    y: np.ndarray


def load_basic_motions(normalize: bool = True) -> tuple[SequenceSplit, SequenceSplit, list[str]]:
    """Train and test splits as ``[N, T=100, F=6]`` and the class names.

    With ``normalize``, each channel is standardised with the *training* split's
    mean and standard deviation.
    """
    from sktime.datasets import load_basic_motions as _load

    splits = {}
    for split in ("train", "test"):
        x, labels = _load(split=split, return_type="numpy3D")   # x [N, F, T]
        splits[split] = (np.ascontiguousarray(x.transpose(0, 2, 1), dtype=np.float32), labels.astype(str))
    classes = sorted(str(c) for c in set(splits["train"][1]))
    index = {c: i for i, c in enumerate(classes)}
    (xtr, ltr), (xte, lte) = splits["train"], splits["test"]
    if normalize:
        mean = xtr.mean(axis=(0, 1), keepdims=True)
        std = xtr.std(axis=(0, 1), keepdims=True) + 1e-6
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    to_ids = lambda labels: np.array([index[c] for c in labels], dtype=np.int64)  # noqa: E731
    return SequenceSplit(xtr.astype(np.float32), to_ids(ltr)), SequenceSplit(xte.astype(np.float32), to_ids(lte)), classes
