"""Divided space-time attention (TimeSformer, Bertasius et al. 2021), small and explicit.

Token layout (used by :func:`split_attentions` and ``spacetime_rollout``): a clip
``x [B, F, C, S, S]`` is cut into ``P = (S/patch)²`` patches per frame, numbered
row-major over the ``G×G`` grid (``G = S/patch``): patch ``p`` is grid row ``p // G``,
column ``p % G``. Inside each block:

* **time attention** runs per patch over the frames: ``[B·P, H, F, F]`` (query/key
  index = frame). The class token takes no part in it.
* **space attention** runs per frame over ``1 + P`` tokens: index 0 is that frame's
  copy of the class token, index ``1 + p`` is patch ``p``: ``[B·F, H, 1+P, 1+P]``.
  Afterwards the class token's output is the mean over frames of its copies.

Both are recorded through :class:`~attnlab.capture.AttentionProbs`, time first, then
space, block after block. ``forward_features`` returns the tokens ``[B, 1 + F·P, D]``:
index 0 is the class token, index ``1 + f·P + p`` is patch ``p`` of frame ``f``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from attnlab.capture import AttentionProbs, head_outputs


class SelfAttention(nn.Module):
    """Multi-head self-attention ``[B', L, D]`` → ``[B', L, D]``; probabilities
    ``[B', H, L, L]`` pass through ``self.attn_probs`` before dropout, with each head's
    values through its block of ``proj`` (computed only when a recorder asks for norms)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"nhead={nhead!r}: expected a divisor of d_model={d_model}")
        self.nhead = nhead
        self.scale = (d_model // nhead) ** -0.5
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_probs = AttentionProbs()
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_drop = nn.Dropout(dropout)

    # nn.MultiheadAttention's names, so head ablation (evaluate.ablate_heads) applies
    @property
    def num_heads(self) -> int:
        return self.nhead

    @property
    def out_proj(self) -> nn.Linear:
        return self.proj

    def forward(self, x_bld: torch.Tensor) -> torch.Tensor:
        b, l, d = x_bld.shape
        qkv = self.qkv(x_bld).reshape(b, l, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # each [B', H, L, Dh]
        scores = (q * self.scale) @ k.transpose(-2, -1)          # [B', H, L, L]
        probs = self.attn_probs(scores.softmax(-1), values=lambda: head_outputs(v, self.proj.weight))
        out = self.attn_drop(probs) @ v                          # [B', H, L, Dh]
        out = out.transpose(1, 2).reshape(b, l, d)               # [B', L, D]
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DividedBlock(nn.Module):
    """Pre-norm block: time attention (patches only), space attention (class-token copy
    + patches, per frame), MLP (all tokens), each with a residual connection."""

    def __init__(self, d_model: int, nhead: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm_time = nn.LayerNorm(d_model)
        self.attn_time = SelfAttention(d_model, nhead, dropout)
        self.norm_space = nn.LayerNorm(d_model)
        self.attn_space = SelfAttention(d_model, nhead, dropout)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, int(d_model * mlp_ratio), dropout)

    def forward(self, cls_b1d: torch.Tensor, x_bfpd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, f, p, d = x_bfpd.shape
        # time: each patch attends over the frames
        xt = x_bfpd.transpose(1, 2).reshape(b * p, f, d)                    # [B·P, F, D]
        xt = xt + self.attn_time(self.norm_time(xt))
        x = xt.reshape(b, p, f, d).transpose(1, 2)                          # [B, F, P, D]
        # space: in each frame, the class-token copy and the patches attend to each other
        xs = torch.cat([cls_b1d.unsqueeze(1).expand(b, f, 1, d), x], dim=2)  # [B, F, 1+P, D]
        xs = xs.reshape(b * f, 1 + p, d)
        xs = (xs + self.attn_space(self.norm_space(xs))).reshape(b, f, 1 + p, d)
        cls = xs[:, :, 0].mean(dim=1, keepdim=True)                         # [B, 1, D]
        x = xs[:, :, 1:]                                                    # [B, F, P, D]
        # MLP on every token
        tokens = torch.cat([cls, x.reshape(b, f * p, d)], dim=1)           # [B, 1+F·P, D]
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens[:, :1], tokens[:, 1:].reshape(b, f, p, d)


class DividedSpaceTimeTransformer(nn.Module):
    """``x [B, F, C, S, S]`` → logits ``[B, n_classes]`` with divided space-time attention.

    Patch embedding (a ``patch``-strided conv per frame), learnable space (per patch) and
    time (per frame) position embeddings, a class token, ``num_layers`` of
    :class:`DividedBlock`, a final LayerNorm and a Linear head on the class token.
    """

    def __init__(self, n_classes: int, *, frames: int, size: int = 32, patch: int = 8,
                 in_channels: int = 1, d_model: int = 48, nhead: int = 4, num_layers: int = 2,
                 mlp_ratio: float = 2, dropout: float = 0.0):
        super().__init__()
        if size % patch:
            raise ValueError(f"patch={patch!r}: expected a divisor of size={size}")
        self.frames, self.size, self.patch = frames, size, patch
        self.grid = size // patch
        self.num_patches = self.grid ** 2
        self.patch_embed = nn.Conv2d(in_channels, d_model, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_space = nn.Parameter(torch.randn(1, 1, self.num_patches, d_model) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(1, frames, 1, d_model) * 0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DividedBlock(d_model, nhead, mlp_ratio, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def embed(self, x_bfchw: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions ``[B, F, P, D]``."""
        b, f = x_bfchw.shape[:2]
        if f != self.frames or x_bfchw.shape[-1] != self.size or x_bfchw.shape[-2] != self.size:
            raise ValueError(f"x of shape {tuple(x_bfchw.shape)}: expected [B, {self.frames}, C, "
                             f"{self.size}, {self.size}]")
        h = self.patch_embed(x_bfchw.flatten(0, 1))              # [B·F, D, G, G]
        h = h.flatten(2).transpose(1, 2).unflatten(0, (b, f))    # [B, F, P, D], row-major patches
        return self.pos_drop(h + self.pos_space + self.pos_time)

    def forward_features(self, x_bfchw: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + F·P, D]`` after the final norm (0: class token; ``1 + f·P + p``)."""
        x = self.embed(x_bfchw)                                  # [B, F, P, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)          # [B, 1, D]
        for block in self.blocks:
            cls, x = block(cls, x)
        tokens = torch.cat([cls, x.flatten(1, 2)], dim=1)        # [B, 1+F·P, D]
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens[:, 0])                           # [B, n_classes]

    def forward(self, x_bfchw: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x_bfchw))

    def split_attentions(self, attentions: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:func:`split_attentions`, checked against this model's blocks, frames and patches."""
        return split_attentions(attentions, blocks=len(self.blocks), frames=self.frames, patches=self.num_patches)


def split_attentions(attentions: Sequence[torch.Tensor], *, blocks: int | None = None, frames: int | None = None,
                     patches: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Recorder entries of one forward of a :class:`DividedSpaceTimeTransformer` on ``B``
    clips → ``(space, time)`` for ``spacetime_rollout``: :func:`attnlab.explain.split_spacetime`,
    with ``frames`` and ``patches`` read from the first block's entries when not given.

    ``attentions`` is in call order: ``[time_0, space_0, time_1, space_1, ...]`` with
    ``time_l [B·P, H, F, F]`` (row ``b·P + p``) and ``space_l [B·F, H, 1+P, 1+P]`` (row
    ``b·F + f``). Returns ``space`` = list over layers of ``[B, F, H, 1+P, 1+P]`` (index 0
    = class-token copy, ``1 + p`` = patch ``p`` row-major) and ``time`` = list over
    layers of ``[B, P, H, F, F]``. Works the same on the matching gradients.
    """
    from attnlab.explain.spacetime import split_spacetime

    if len(attentions) >= 2:
        frames = attentions[0].shape[-1] if frames is None else frames
        patches = attentions[1].shape[-1] - 1 if patches is None else patches
    return split_spacetime(attentions, frames=frames or 1, patches=patches or 1, blocks=blocks)
