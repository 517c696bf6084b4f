"""Per-frame CNN embedding + transformer encoder: the "pose clips" architecture.

``x [B, T, C, H, W]`` → :class:`FrameCNN` on every frame separately → ``[B, T, D]``
→ :class:`~attnlab.models.encoder.EncoderClassifier` (no class token, no positions,
mean pooling by default).
"""
from __future__ import annotations

import torch
from torch import nn

from attnlab.models.encoder import EncoderClassifier


def _conv_block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, pool: bool = False) -> nn.Sequential:
    # BatchNorm: with weak (clip-level) labels, GroupNorm or no norm sat at chance far
    # longer. In eval mode each frame's embedding depends on that frame alone; in train
    # mode the batch statistics are shared by the B·T frames.
    layers = [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class FrameCNN(nn.Module):
    """Small CNN applied to each frame independently: ``[B, T, C, H, W]`` → ``[B, T, D]``.

    A 4×4 stride-2 conv (``width`` channels, H/2), a 3×3 conv (``2·width``) + 2×2 max
    pool (H/4), a 3×3 conv (``4·width``), global max pooling (the evidence may be
    anywhere in the frame) and a Linear to ``d_model``. Cheap on purpose: it runs on
    every frame of every clip. Any ``H, W`` ≥ 4 works. In eval mode token ``t`` depends
    on frame ``t`` only (BatchNorm uses batch statistics in train mode).
    """

    def __init__(self, in_channels: int = 1, d_model: int = 32, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width, kernel=4, stride=2),
            _conv_block(width, 2 * width, pool=True),
            _conv_block(2 * width, 4 * width),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.proj = nn.Linear(4 * width, d_model)

    def forward(self, x_btchw: torch.Tensor) -> torch.Tensor:
        b, t = x_btchw.shape[:2]
        x = x_btchw.flatten(0, 1)                   # [B·T, C, H, W]
        x = self.features(x)                        # [B·T, 4w, H/4, W/4]
        x = self.pool(x).flatten(1)                 # [B·T, 4w]
        return self.proj(x).unflatten(0, (b, t))    # [B, T, D]


def frames_classifier(n_classes: int, *, d_model: int = 32, nhead: int = 4, num_layers: int = 2,
                      dim_feedforward: int = 64, dropout: float = 0.1, positional: bool = False,
                      pooling: str = "mean", norm_first: bool = False,
                      in_channels: int = 1) -> EncoderClassifier:
    """:class:`EncoderClassifier` over frames embedded by :class:`FrameCNN`.

    ``forward(x [B, T, C, H, W], padding_mask [B, T] | None)`` → logits ``[B, n_classes]``.
    The encoder sees ``T`` tokens (``1 + T`` with ``pooling="cls"``), one per frame in
    time order. ``norm_first=False`` is ``nn.TransformerEncoderLayer``'s default
    (post-norm), as in the models users ask about; it needs a learning-rate warm-up.
    """
    return EncoderClassifier(in_channels, n_classes, d_model=d_model, nhead=nhead,
                             num_layers=num_layers, dim_feedforward=dim_feedforward,
                             dropout=dropout, pooling=pooling, positional=positional, norm_first=norm_first,
                             embed=FrameCNN(in_channels, d_model))
