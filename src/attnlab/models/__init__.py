"""Models of the attnlab experiments, and checkpoints that rebuild them.

A checkpoint stores the *factory* (``"module:callable"``) and its keyword arguments
next to the state dict, so ``load_checkpoint`` gives back the original module class.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab.models.encoder import EncoderClassifier, SinusoidalPosition

__all__ = ["EncoderClassifier", "SinusoidalPosition", "build_model", "save_checkpoint", "load_checkpoint"]


def build_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """``build_model("attnlab.models.encoder:EncoderClassifier", {...})``."""
    module_name, _, attr = factory.partition(":")
    if not attr:
        raise ValueError(f"factory={factory!r}: expected 'package.module:callable'")
    return getattr(importlib.import_module(module_name), attr)(**kwargs)


def save_checkpoint(path: str | Path, model: nn.Module, factory: str, kwargs: dict[str, Any]) -> None:
    torch.save({"factory": factory, "kwargs": kwargs, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild the model saved by :func:`save_checkpoint`, in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ckpt["factory"], ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
