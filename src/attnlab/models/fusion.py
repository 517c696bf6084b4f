"""Two-stream classifier whose fusion reports how much it relied on each stream.

``appearance [B, 3, H, W]`` → :class:`StreamCNN` → ``[B, 48]`` → Linear → LayerNorm → ``x1 [B, d]``
``structure [B, 17, H, W]`` → :class:`StreamCNN` → ``[B, 24]`` → Linear → LayerNorm → ``x2 [B, d]``
→ fusion of the tokens ``[B, 2, d]`` → ``fused [B, d]`` and ``weights [B, 2]`` → head → logits.

The fusions (one small module each, all ``forward(tokens [B, S, d]) -> (fused [B, d],
weights [B, S])``, rows of ``weights`` summing to 1):

* :class:`SumFusion` — ``Σ_s x_s``; weights reported as uniform (``1/S``).
* :class:`ScalarFusion` — one learned logit per stream, softmax → ``Σ_s w_s x_s``.
* :class:`ConvexFusion` — ``w = sigmoid(θ)``; ``w x1 + (1 − w) x2`` (two streams only).
* :class:`ChannelFusion` — per-sample, per-channel gates: an MLP on the concatenated
  tokens gives ``[B, S, d]`` logits, softmax over the streams → ``Σ_s g_s ⊙ x_s``;
  a stream's weight is the mean of its gate over the channels.
* :class:`AttentionFusion` — a learned query attends over the stream tokens through
  ``nn.MultiheadAttention`` (so :class:`~attnlab.capture.AttentionRecorder` records it as
  ``[B, H, 1, S]``); the weights are its attention probabilities, averaged over heads.

Each projected token is layer-normalised (no affine) before fusion, so both streams
reach the fusion at the same scale: a stream cannot be silenced by shrinking its
projection, only by the fusion weights, which therefore mean what they say. Every
learned fusion starts at equal weights. There is no dropout: ``forward`` is a
deterministic function of the parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FUSIONS", "StreamCNN", "SumFusion", "ScalarFusion", "ConvexFusion", "ChannelFusion",
           "AttentionFusion", "TwoStreamClassifier"]

FUSIONS = ("sum", "scalar", "convex", "channel", "attention")


def _conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    # GroupNorm, not BatchNorm: a sample's features (and weights) never depend on its batch.
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1, c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class StreamCNN(nn.Module):
    """Backbone of one stream: ``[B, C, H, W]`` → ``[B, out_features]``.

    Three 3×3 conv blocks (``width``, ``2·width`` channels with 2×2 max pooling after
    each, then ``out_features``) and global average pooling. Any ``H, W`` ≥ 4.
    """

    def __init__(self, in_channels: int, out_features: int, width: int = 16):
        super().__init__()
        self.out_features = out_features
        self.blocks = nn.Sequential(
            _conv_block(in_channels, width, pool=True),         # [B, w, H/2, W/2]
            _conv_block(width, 2 * width, pool=True),           # [B, 2w, H/4, W/4]
            _conv_block(2 * width, out_features, pool=False),   # [B, F, H/4, W/4]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x_bchw)).flatten(1)        # [B, F]


class SumFusion(nn.Module):
    """``fused = Σ_s x_s``; weights ``1/S`` each (nothing is learned)."""

    def forward(self, tokens_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = tokens_bsd.shape
        return tokens_bsd.sum(1), tokens_bsd.new_full((b, s), 1.0 / s)


class ScalarFusion(nn.Module):
    """``w = softmax(logits)`` (one learned logit per stream, initially 0); ``fused = Σ_s w_s x_s``."""

    def __init__(self, n_streams: int = 2):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_streams))

    def forward(self, tokens_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_s = self.logits.softmax(0)                              # [S]
        fused = torch.einsum("s,bsd->bd", w_s, tokens_bsd)         # [B, d]
        return fused, w_s.expand(tokens_bsd.shape[0], -1)


class ConvexFusion(nn.Module):
    """``w = sigmoid(theta)`` (learned, initially 0 → 0.5); ``fused = w x1 + (1 − w) x2``."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(()))

    def forward(self, tokens_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens_bsd.shape[1] != 2:
            raise ValueError(f"ConvexFusion fuses exactly 2 streams, got {tokens_bsd.shape[1]}")
        w = torch.sigmoid(self.theta)
        fused = w * tokens_bsd[:, 0] + (1 - w) * tokens_bsd[:, 1]  # [B, d]
        w_s = torch.stack([w, 1 - w])                             # [2]
        return fused, w_s.expand(tokens_bsd.shape[0], -1)


class ChannelFusion(nn.Module):
    """Per-sample, per-channel gates over the streams.

    ``logits = fc2(relu(fc1(concat_s x_s)))`` reshaped ``[B, S, d]``; ``g = softmax over S``;
    ``fused = Σ_s g_s ⊙ x_s``; stream weight ``= mean_d g_s``. ``fc2`` starts at zero
    (all gates 1/S).
    """

    def __init__(self, d_model: int, n_streams: int = 2, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_model
        self.fc1 = nn.Linear(n_streams * d_model, hidden)
        self.fc2 = nn.Linear(hidden, n_streams * d_model)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def gates(self, tokens_bsd: torch.Tensor) -> torch.Tensor:
        """``[B, S, d]`` gates, summing to 1 over the streams."""
        b, s, d = tokens_bsd.shape
        logits = self.fc2(F.relu(self.fc1(tokens_bsd.reshape(b, s * d))))   # [B, S·d]
        return logits.view(b, s, d).softmax(1)

    def forward(self, tokens_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_bsd = self.gates(tokens_bsd)
        return (g_bsd * tokens_bsd).sum(1), g_bsd.mean(2)


class AttentionFusion(nn.Module):
    """A learned query (initially 0 → equal weights) attends over the stream tokens.

    ``fused, attn = mha(query [B, 1, d], tokens [B, S, d], tokens)``; the weights are
    ``attn [B, 1, S]`` averaged over heads. ``fused`` includes the MHA's output projection.
    """

    def __init__(self, d_model: int, nhead: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, d_model))
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)

    def forward(self, tokens_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_b1d = self.query.expand(tokens_bsd.shape[0], -1, -1)
        out_b1d, attn_b1s = self.attn(q_b1d, tokens_bsd, tokens_bsd, need_weights=True,
                                      average_attn_weights=True)
        return out_b1d[:, 0], attn_b1s[:, 0]


class TwoStreamClassifier(nn.Module):
    """Appearance (RGB-like) + structure (keypoint heatmaps) classifier with a learned fusion.

    Args:
        n_classes: number of classes ``C``.
        fusion: one of :data:`FUSIONS` (see the module docstring).
        appearance_channels, structure_channels: input channels of the two streams.
        d_model: common token size ``d`` after each stream's projection.
        nhead: heads of the ``attention`` fusion (must divide ``d_model``).

    ``forward(appearance [B, Ca, H, W], structure [B, Cs, H, W])`` → logits ``[B, C]``;
    :meth:`forward_with_weights` also returns ``weights [B, 2]`` (appearance, structure),
    the share the fusion gave each stream for each sample (rows sum to 1). Steps:
    :meth:`forward_features` → tokens ``[B, 2, d]``, :meth:`fuse` → ``([B, d], [B, 2])``,
    :meth:`forward_head` → logits.
    """

    def __init__(self, n_classes: int, *, fusion: str = "attention", appearance_channels: int = 3,
                 structure_channels: int = 17, d_model: int = 32, nhead: int = 1):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r}: expected one of {FUSIONS}")
        if n_classes < 1:
            raise ValueError(f"n_classes={n_classes}: expected >= 1")
        if d_model < 1 or d_model % nhead:
            raise ValueError(f"d_model={d_model}, nhead={nhead}: expected d_model >= 1 divisible by nhead")
        self.fusion_name = fusion
        self.channels = (appearance_channels, structure_channels)
        # Different feature sizes on purpose: the projections bring both to d.
        self.appearance = StreamCNN(appearance_channels, 48, width=16)
        self.structure = StreamCNN(structure_channels, 24, width=16)
        self.proj_appearance = nn.Linear(self.appearance.out_features, d_model)
        self.proj_structure = nn.Linear(self.structure.out_features, d_model)
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.fusion = {
            "sum": lambda: SumFusion(),
            "scalar": lambda: ScalarFusion(2),
            "convex": lambda: ConvexFusion(),
            "channel": lambda: ChannelFusion(d_model, 2),
            "attention": lambda: AttentionFusion(d_model, nhead),
        }[fusion]()
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, n_classes))

    def forward_features(self, appearance: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        """``[B, Ca, H, W]``, ``[B, Cs, H, W]`` → stream tokens ``[B, 2, d]`` (appearance first)."""
        x1 = self.proj_appearance(self.appearance(appearance))      # [B, d]
        x2 = self.proj_structure(self.structure(structure))         # [B, d]
        return self.norm(torch.stack([x1, x2], dim=1))              # [B, 2, d]

    def fuse(self, tokens_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 2, d]`` → ``(fused [B, d], weights [B, 2])``."""
        return self.fusion(tokens_bsd)

    def forward_head(self, fused_bd: torch.Tensor) -> torch.Tensor:
        return self.head(fused_bd)                                   # [B, C]

    def forward_with_weights(self, appearance: torch.Tensor,
                             structure: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ ``(logits [B, C], weights [B, 2])``; ``weights[:, 0]`` is the appearance stream's."""
        fused, weights = self.fuse(self.forward_features(appearance, structure))
        return self.forward_head(fused), weights

    def forward(self, appearance: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weights(appearance, structure)[0]

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams packed along the channels ``[B, Ca + Cs, H, W]`` -> ``(appearance, structure)``."""
        return x[:, :self.channels[0]], x[:, self.channels[0]:]

    def param_groups(self, lr: float, weight_decay: float = 0.0,
                     fusion_lr_scale: float = 10.0) -> list[dict]:
        """Optimizer parameter groups: everything at ``lr`` with ``weight_decay``, except the
        fusion's own parameters, at ``fusion_lr_scale · lr`` and without weight decay.

        Why: the backbones can also silence an uninformative stream (by mapping it to a
        constant), and once they have, nothing pushes the fusion weights any further;
        weight decay even pulls them back to equal. Giving the fusion a faster learning
        rate lets it take the decision first. ``torch.optim.AdamW(model.param_groups(3e-3, 1e-4))``.
        """
        fusion = list(self.fusion.parameters())
        ids = {id(p) for p in fusion}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if fusion:
            groups.append({"params": fusion, "lr": lr * fusion_lr_scale, "weight_decay": 0.0})
        return groups
