"""A model trained elsewhere: built from a factory the user names, its weights loaded
safely, checked against its inputs.

Every problem is an :class:`~attnlab.io.ExternalError` whose message names the bad value
and what was expected. Code is never resolved from a data file: the factory is the
user's own declaration (a command-line argument or a params value).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from attnlab.io import ExternalError

if TYPE_CHECKING:
    from attnlab.data.external import Inputs


def resolve_factory(spec: str, flag: str = "--model") -> Callable[..., Any]:
    """``"path/to/file.py:make_model"`` or ``"package.module:make_model"`` -> the callable.

    The factory is the user's own declaration (a command-line argument or a params
    value): code is never resolved from a data file such as a checkpoint."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ExternalError(f"{flag} {spec!r}: expected FILE.py:FACTORY or package.module:FACTORY")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ExternalError(f"{flag} {spec!r}: no such file {str(path)!r}")
        name = f"attnlab_user_model_{abs(hash(str(path)))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module            # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise ExternalError(f"{flag} {spec!r}: importing {str(path)!r} failed: "
                                f"{type(err).__name__}: {err}") from err
        tried = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ExternalError(f"{flag} {spec!r}: cannot import module {where!r}: {err}") from err
        tried = f"module {where!r}"
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExternalError(f"{flag} {spec!r}: {tried} has no callable {attr!r}")
    return factory


def build(spec: str, kwargs: dict[str, Any] | None = None, flag: str = "--model") -> nn.Module:
    """``factory(**kwargs)``, checked to be an ``nn.Module``; its output is read as logits
    (a Hugging Face ``ModelOutput``'s ``.logits``, a tuple's first element)."""
    factory = resolve_factory(spec, flag)
    try:
        model = factory(**(kwargs or {}))
    except Exception as err:
        raise ExternalError(f"{flag} {spec!r}: calling it with {kwargs or {}} failed: "
                            f"{type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ExternalError(f"{flag} {spec!r}: the factory returned a {type(model).__name__}, "
                            "expected a torch.nn.Module")
    model.register_forward_hook(_logits_only)
    return model


def _logits_only(module: nn.Module, args: Any, output: Any) -> Any:
    """Read a model's output as its logits: a Hugging Face ``ModelOutput`` (or anything
    with ``.logits``) gives ``.logits``, a tuple or list its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def load_weights(model: nn.Module, path: str | Path, flag: str = "--weights") -> nn.Module:
    """Load a state dict (``torch.save`` with ``weights_only`` loading, or safetensors)
    into ``model``. A pipeline checkpoint's ``state_dict`` is used; any factory named
    inside a file is ignored."""
    path = Path(path)
    if not path.is_file():
        raise ExternalError(f"{flag} {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExternalError(f"{flag} {str(path)!r}: not a readable state dict ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExternalError(f"{flag} {str(path)!r}: holds a {type(state).__name__}, expected a state dict")
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ExternalError(f"{flag} {str(path)!r} does not match the model: {k!r} has shape "
                            f"{list(getattr(state[k], 'shape', []))}, the model's {list(own[k].shape)} "
                            f"(+{len(wrong) - 1} more)")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {result.missing_keys[0]!r} (+{len(result.missing_keys) - 1} more)")
        if result.unexpected_keys:
            parts.append(f"unexpected {result.unexpected_keys[0]!r} (+{len(result.unexpected_keys) - 1} more)")
        raise ExternalError(f"{flag} {str(path)!r} does not match the model: {'; '.join(parts)}")
    return model


def check_model(model: nn.Module, data: Inputs) -> int:
    """The model takes the inputs (the first two samples) and returns logits ``[B, C]``,
    and the recorder sees its attention; returns ``C``."""
    from attnlab.capture import AttentionRecorder

    rows = data.rows(slice(0, 2))
    try:                                       # nothing it can record, or attention it cannot
        rec = AttentionRecorder(model).__enter__()
    except ValueError as err:
        raise ExternalError(str(err)) from None
    try:
        with torch.no_grad():
            logits = model(*rows)
    except Exception as err:
        rec.__exit__(type(err), err, err.__traceback__)
        shapes = ", ".join(str(list(a.shape)) for a in data.arrays)
        raise ExternalError(f"the model rejected inputs of shape {shapes} "
                            f"(the first two samples): {type(err).__name__}: {err}") from None
    try:
        rec.__exit__(None, None, None)
    except ValueError as err:                  # its attention modules never ran
        raise ExternalError(str(err)) from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ExternalError(f"the model returned {getattr(logits, 'shape', type(logits).__name__)}; expected "
                            "logits [B, classes] (a tensor, a tuple starting with one, or an output with .logits, "
                            "e.g. a Hugging Face ...ForSequenceClassification model)")
    return logits.shape[1]
