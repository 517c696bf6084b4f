"""Where a model's inputs go: the model's device.

Every function that feeds a model (training, prediction, extraction, explanation) moves
its inputs to the model's device with :func:`to_device` right before the call, so the
data can stay where it was loaded (the CPU) and the maths after the model runs on
whatever device its tensors are on. Which device the pipeline puts the model on is the
params file's ``device`` (:func:`attnlab.config.resolve_device`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU when it has none."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it on ``device``: a tensor, or tuples, lists and
    dicts of them (nested); anything else is returned as it is. A tensor already there
    is returned itself (no copy)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def take_rows(x: torch.Tensor | tuple[torch.Tensor, ...], index: Any) -> Any:
    """Rows ``index`` (a slice, indices or a mask) of a model's input: a tensor, or a
    tuple of tensors indexed together (a multi-input model's arguments)."""
    return tuple(t[index] for t in x) if isinstance(x, tuple) else x[index]
