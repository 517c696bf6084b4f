"""Sequence classifier: per-item embedding -> nn.TransformerEncoder -> pooling -> classes.

The architecture people ask about (pose clips, sensor sequences): no class token and
mean pooling by default, optional sinusoidal positions and class token.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalPosition(nn.Module):
    """Adds the fixed sinusoidal encoding of Vaswani et al. to ``x [B, T, D]``."""

    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        return x_btd + self.pe[: x_btd.shape[1]]


class EncoderClassifier(nn.Module):
    """``x [B, T, F]`` -> logits ``[B, n_classes]``.

    ``embed`` maps each item's ``F`` features to ``d_model`` (a Linear layer unless a
    module is given, e.g. a per-frame CNN); then optional class token and positions,
    ``nn.TransformerEncoder`` (batch_first) and ``pooling`` ("mean" over unpadded items
    or "cls").
    """

    def __init__(self, in_features: int, n_classes: int, *, d_model: int = 32, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int = 64, dropout: float = 0.1,
                 pooling: str = "mean", positional: bool = False, norm_first: bool = False,
                 embed: nn.Module | None = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: expected 'mean' or 'cls'")
        self.pooling = pooling
        self.embed = embed if embed is not None else nn.Linear(in_features, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.position = SinusoidalPosition(d_model) if positional else None
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward_features(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded tokens ``[B, T(+1), D]``; ``padding_mask [B, T]`` is True at padding."""
        return self.encode(self.embed(x), padding_mask)

    def encode(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder on already embedded items ``h [B, T, D]`` (class token and positions
        added here) → ``[B, T(+1), D]``."""
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_zeros(h.shape[0], 1), padding_mask], dim=1)
        if self.position is not None:
            h = self.position(h)
        return self.encoder(h, src_key_padding_mask=padding_mask)

    def forward_head(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "cls":
            return self.head(h[:, 0])
        if padding_mask is None:
            return self.head(h.mean(dim=1))
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)    # [B, T, 1]
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, padding_mask), padding_mask)

    def forward_embedded(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from embedded items ``h [B, T, D]`` (= ``self.embed(x)``): ``forward``
        without the embedding, for tests that perturb whole items of a costly embedding."""
        return self.forward_head(self.encode(h, padding_mask), padding_mask)
