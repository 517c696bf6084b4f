"""Causal next-token model: token embedding + positions -> causal nn.TransformerEncoder -> LM head.

The decoder-only language model people pair with "vocabulary × vocabulary attention"
questions, built from stock PyTorch parts so that ``AttentionRecorder`` sees plain
``nn.MultiheadAttention`` calls with a causal ``attn_mask`` and a ``key_padding_mask``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.models.encoder import SinusoidalPosition

__all__ = ["CausalTransformerLM", "lm_loss", "lm_metrics"]


class CausalTransformerLM(nn.Module):
    """``tokens [B, L]`` (+ ``mask [B, L]``, True = real token) -> logits ``[B, L, V]``.

    ``logits[:, i]`` scores the token at ``i + 1`` and depends on ``tokens[:, :i+1]``
    only. Rows must be right-padded (every row starts with a real token); a row that is
    all padding is allowed and gives finite, meaningless logits.

    Args:
        vocab_size: ``V``, including the specials.
        positional: ``"learned"`` (an embedding per position) or ``"sinusoidal"``.
        max_len: the longest ``L`` accepted.
        norm_first: pre-norm layers (then a final LayerNorm before the head).
    """

    def __init__(self, vocab_size: int, *, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, dropout: float = 0.1, max_len: int = 256,
                 positional: str = "learned", norm_first: bool = False):
        super().__init__()
        if positional not in ("learned", "sinusoidal"):
            raise ValueError(f"positional={positional!r}: expected 'learned' or 'sinusoidal'")
        if vocab_size < 1 or max_len < 1:
            raise ValueError(f"vocab_size={vocab_size}, max_len={max_len}: expected >= 1")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = (nn.Embedding(max_len, d_model) if positional == "learned"
                         else SinusoidalPosition(d_model, max_len))
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False,
                                             norm=nn.LayerNorm(d_model) if norm_first else None)
        self.head = nn.Linear(d_model, vocab_size)

    def forward_features(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, D]``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected [B, L]")
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"tokens has length {length} > max_len={self.max_len}")
        h = self.embed(tokens)                                             # [B, L, D]
        if isinstance(self.position, nn.Embedding):
            h = h + self.position(torch.arange(length, device=tokens.device))
        else:
            h = self.position(h)
        h = self.dropout(h)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=h.dtype)
        return self.encoder(h, mask=causal, src_key_padding_mask=self._padding(mask, tokens.shape, h.dtype),
                            is_causal=True)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)                                                # [B, L, V]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(tokens, mask))

    @staticmethod
    def _padding(mask: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive key padding mask ``[B, L]`` (same dtype as the causal mask).

        A query whose causal keys are all padding would get a row of -inf and NaN
        (NaN gradients too). Right padding leaves no such query except in rows that
        are all padding; those rows are left unmasked.
        """
        if mask is None:
            return None
        if mask.shape != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)} like tokens")
        mask = mask.bool()
        empty = ~mask.any(dim=1)                                           # [B] all padding
        if bool((~mask[:, 0] & ~empty).any()):
            raise ValueError("mask: rows must be right-padded (start with a real token) or be all padding")
        pad = ~mask & ~empty[:, None]
        return torch.zeros(shape, dtype=dtype, device=mask.device).masked_fill(pad, float("-inf"))


def _targets(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
             target_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[K, V]`` and target ids ``[K]`` of the scored next-token predictions:
    ``logits[:, i]`` against ``tokens[:, i+1]`` where both positions are real."""
    if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: "
                         f"expected [B, L, V] and [B, L]")
    valid = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
    if mask is not None:
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    if target_mask is not None:
        valid = valid & target_mask[:, 1:].bool()
    if not bool(valid.any()):
        raise ValueError("no next-token target: every target position is padding (or outside target_mask)")
    return logits[:, :-1][valid], tokens[:, 1:][valid]


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
            reduction: str = "mean") -> torch.Tensor:
    """Mean (or with ``reduction="sum"`` summed) next-token cross-entropy: ``logits[:, i]``
    predicts ``tokens[:, i+1]``; pairs touching padding (``mask`` False) are ignored."""
    scores, target = _targets(logits, tokens, mask, None)
    return F.cross_entropy(scores, target, reduction=reduction)


@torch.no_grad()
def lm_metrics(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
               target_mask: torch.Tensor | None = None) -> dict[str, float]:
    """``loss`` (mean next-token cross-entropy), ``perplexity`` (exp of it),
    ``accuracy`` (argmax hits) and ``n_tokens`` (scored targets, to weight batches).

    ``target_mask [B, L]`` restricts the scored targets to the positions where it is
    True (e.g. ``TokenData.rule_mask`` of planted data).
    """
    scores, target = _targets(logits, tokens, mask, target_mask)
    loss = F.cross_entropy(scores.float(), target).item()
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "accuracy": (scores.argmax(dim=-1) == target).double().mean().item(),
            "n_tokens": int(target.numel())}
