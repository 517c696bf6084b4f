"""A model trained elsewhere: build it from a factory the user names, load its weights
safely, read its inputs, and explain it with the same machinery as the pipeline.

Every problem is an :class:`ExternalError` whose message names the bad value and what
was expected; :func:`explain_model` writes into a directory only through
:func:`~attnlab.io.atomic_dir`, so a failure leaves nothing behind.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from attnlab.io import DataError


class ExternalError(DataError):
    """A user's model, weights or data cannot be used; the message says why (a pipeline
    stage prints it as one line and exits with status 2, writing nothing)."""


# --------------------------------------------------------------------------- the model
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


# --------------------------------------------------------------------------- the data
@dataclass
class Inputs:
    """The model's inputs, batch-first: one array or several (``model(*arrays)``)."""

    arrays: list[torch.Tensor]
    labels: torch.Tensor | None = None
    vocab: list[str] | None = None

    def __len__(self) -> int:
        return len(self.arrays[0])

    @property
    def token_ids(self) -> bool:
        return not torch.is_floating_point(self.arrays[0])

    def rows(self, sl: slice) -> tuple[torch.Tensor, ...]:
        return tuple(a[sl] for a in self.arrays)


def _load_array(path: str | Path, flag: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ExternalError(f"{flag} {str(path)!r}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ExternalError(f"{flag} {str(path)!r}: not a .npy array ({type(err).__name__}: {err})") from err
    if isinstance(array, np.lib.npyio.NpzFile):
        raise ExternalError(f"{flag} {str(path)!r}: an .npz archive; give one .npy array per {flag}")
    if array.ndim < 1 or len(array) == 0:
        raise ExternalError(f"{flag} {str(path)!r}: empty array of shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ExternalError(f"{flag} {str(path)!r}: holds NaN or Inf")
    return array


def load_vocab(path: str | Path, flag: str = "--vocab") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ExternalError(f"{flag} {str(path)!r}: no such file")
    try:
        vocab = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ExternalError(f"{flag} {str(path)!r}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    vocab = vocab[:-1] if vocab and vocab[-1] == "" else vocab
    if not vocab or len(set(vocab)) != len(vocab):
        raise ExternalError(f"{flag} {str(path)!r}: expected one distinct token per line (line i = token id i)")
    return vocab


def encode_tokens(path: str | Path, vocab: list[str], flag: str = "--tokens") -> torch.Tensor:
    """A text file, one sequence per line of whitespace-separated tokens -> ids ``[N, L]``
    padded with ``<pad>`` (unknown tokens become ``<unk>``; both must be in the vocabulary).
    The file is read by :func:`attnlab.data.tokens.read_token_lines` (UTF-8, bounded lines)."""
    from attnlab.data.tokens import read_token_lines

    index = {t: i for i, t in enumerate(vocab)}
    for special in ("<pad>", "<unk>"):
        if special not in index:
            raise ExternalError(f"{flag} needs {special!r} in the vocabulary ({path})")
    try:
        lines = read_token_lines(path, what=flag)
    except DataError as err:
        raise ExternalError(str(err)) from None
    if not any(t in index for line in lines for t in line):
        raise ExternalError(f"{flag} {str(path)!r}: none of its tokens is in the vocabulary "
                            f"(e.g. {lines[0][0]!r}); is it the vocabulary the model was trained with?")
    width = max(map(len, lines))
    ids = torch.full((len(lines), width), index["<pad>"], dtype=torch.long)
    for i, line in enumerate(lines):
        ids[i, :len(line)] = torch.tensor([index.get(t, index["<unk>"]) for t in line])
    return ids


CLI_FLAGS = {"inputs": "--inputs", "labels": "--labels", "tokens": "--tokens", "vocab": "--vocab"}


def load_inputs(inputs: Sequence[str], labels: str | None = None, tokens: str | None = None,
                vocab: str | None = None, *, flags: dict[str, str] = CLI_FLAGS) -> Inputs:
    """The inputs (``.npy`` arrays, or token sequences with a vocabulary) and labels,
    checked; ``flags`` are the names the messages give them (command-line flags, or
    params keys)."""
    if bool(inputs) == bool(tokens):
        raise ExternalError(f"give the inputs as {flags['inputs']} X.npy (one or more) or as {flags['tokens']} "
                            "T.txt with a vocabulary, not both and not neither")
    itos = load_vocab(vocab, flags["vocab"]) if vocab else None
    if tokens:
        if itos is None:
            raise ExternalError(f"{flags['tokens']} needs {flags['vocab']} V.txt (one token per line)")
        arrays = [encode_tokens(tokens, itos, flags["tokens"])]
    else:
        arrays = [torch.from_numpy(_load_array(p, flags["inputs"])) for p in inputs]
        if arrays[0].ndim < 2:
            raise ExternalError(f"{flags['inputs']} {inputs[0]!r}: shape {list(arrays[0].shape)}; expected "
                                "[N, items, ...] (samples, then the items explained: timesteps, frames, tokens)")
        lengths = {len(a) for a in arrays}
        if len(lengths) != 1:
            raise ExternalError(f"{flags['inputs']}: the arrays hold {sorted(lengths)} samples; expected the same number")
        arrays = [a.float() if a.dtype in (torch.float16, torch.float64) else a for a in arrays]
    if itos is not None and not torch.is_floating_point(arrays[0]) and int(arrays[0].max()) >= len(itos):
        raise ExternalError(f"{flags['vocab']} has {len(itos)} tokens but the inputs hold id {int(arrays[0].max())}")
    y = None
    if labels:
        y = torch.from_numpy(_load_array(labels, flags["labels"]))
        if y.ndim != 1 or y.dtype.is_floating_point:
            raise ExternalError(f"{flags['labels']} {labels!r}: expected integer class ids [N], "
                                f"got {y.dtype} {tuple(y.shape)}")
        if len(y) != len(arrays[0]):
            raise ExternalError(f"{flags['labels']} {labels!r}: {len(y)} labels for {len(arrays[0])} inputs")
        y = y.long()
    return Inputs(arrays, y, itos)


def load_evidence(path: str | Path, data: Inputs, flag: str = "--evidence") -> torch.Tensor:
    """A boolean ``[N, items]`` array marking the items that carry the evidence."""
    evidence = _load_array(path, flag)
    n, n_items = len(data), data.arrays[0].shape[1]
    if evidence.dtype != np.bool_ or evidence.shape != (n, n_items):
        raise ExternalError(f"{flag} {str(path)!r}: expected a bool array [{n}, {n_items}] (samples x items), "
                            f"got {evidence.dtype} {evidence.shape}")
    return torch.from_numpy(evidence)


# --------------------------------------------------------------------------- explaining it
def _options(methods: Sequence[str] | None, kind: str) -> Any:
    """The explain params of the pipeline's schema (one default per knob), for ``kind`` items."""
    from attnlab import config

    section = config.Explain if kind == "sequence" else config.TokensExplain
    try:
        return section.model_validate({} if methods is None else {"methods": list(methods)})
    except Exception as err:                   # pydantic's ValidationError: its first message
        errors = getattr(err, "errors", lambda: [{"msg": str(err)}])()
        raise ExternalError(f"--methods: {errors[0]['msg'].removeprefix('Value error, ')}") from None


def explain_model(model: nn.Module, data: Inputs, out: str | Path, *, methods: Sequence[str] | None = None,
                  readout: str | int = "mean", batch_size: int = 32, source: dict[str, Any] | None = None,
                  progress: bool = False) -> Path:
    """Record, explain, evaluate and report ``model`` on ``data`` into directory ``out``
    (replaced only if everything succeeds): ``attention.h5``, ``importance.npz``,
    ``deletion.csv``/``insertion.csv``, ``heads.csv``, ``metrics.json``, ``report.html``
    and, with a vocabulary over token ids, ``vocab_layer<l>.npz`` and ``top_pairs_layer<l>.csv``."""
    from attnlab import io
    from attnlab.report.external import write_external_report

    if batch_size < 1:
        raise ExternalError(f"--batch-size {batch_size}: expected >= 1")
    model.eval()
    single = len(data.arrays) == 1
    kind = "sequence" if single and not data.token_ids else "tokens"
    options = _options(methods, kind)
    check_model(model, data)
    with io.atomic_dir(out) as tmp:
        _record(model, data, tmp / "attention.h5", batch_size, progress)
        importance, target = _explain(model, data, options, readout, batch_size, kind, progress)
        io.save_arrays(tmp / "importance.npz", target=target.numpy(), **({} if data.labels is None else
                                                                         {"y": data.labels.numpy()}),
                       **{m: v.numpy() for m, v in importance.items()})
        metrics = {"n_samples": len(data), "inputs": [list(a.shape) for a in data.arrays],
                   "methods": list(options.methods), "readout": readout, **(source or {})}
        if data.labels is not None:
            metrics["accuracy"] = float((target == data.labels).float().mean())
        metrics["faithfulness"] = _faithfulness(model, data, importance, target, batch_size, tmp)
        heads = _heads(tmp / "attention.h5", batch_size, tmp)
        if heads is not None:
            metrics["heads"] = heads
        if data.vocab is not None and data.token_ids:
            metrics["vocabulary"] = _vocabulary(tmp / "attention.h5", data, batch_size, tmp)
        io.write_json(tmp / "metrics.json", metrics)
        write_external_report(tmp)
    return Path(out)


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


def _record(model: nn.Module, data: Inputs, path: Path, batch_size: int, progress: bool) -> None:
    from attnlab.store import extract_attention

    batches = (data.rows(slice(i, i + batch_size)) for i in range(0, len(data), batch_size))
    extract_attention(model, batches, path, forward=lambda m, b: m(*b), progress=progress)


def _explain(model: nn.Module, data: Inputs, options: Any, readout: str | int, batch_size: int, kind: str,
             progress: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from tqdm.auto import tqdm

    from attnlab.attribution import SequenceItems, explain_batch

    items = SequenceItems(data.arrays[0].shape[1], how=readout, token_ids=kind == "tokens")
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in options.methods}
    targets = []
    for i in tqdm(range(0, len(data), batch_size), desc="explain", disable=not progress):
        rows = data.rows(slice(i, i + batch_size))
        x = rows[0] if len(rows) == 1 else rows
        imp, batch = explain_batch(options.methods, model, x, items, options,
                                   forward=(lambda m, xb: m(xb)) if len(rows) == 1 else (lambda m, xb: m(*xb)))
        for m in options.methods:
            parts[m].append(imp[m])
        targets.append(batch.target)
    return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(targets)


def _faithfulness(model: nn.Module, data: Inputs, importance: dict[str, torch.Tensor], target: torch.Tensor,
                  batch_size: int, out: Path) -> dict[str, dict[str, Any]]:
    """Deletion/insertion over the items (dim 1 of the first input) beside a random baseline,
    with 95% bootstrap intervals and the paired test against random at 0.05 (the library
    defaults); a removed item becomes 0 (or ``<unk>`` for token ids with a vocabulary)."""
    from attnlab.evaluate import random_importance, sequence_masker
    from attnlab.evaluate.summaries import perturbation_curves
    from attnlab.workflow import write_curves

    fill = data.vocab.index("<unk>") if data.token_ids and data.vocab and "<unk>" in data.vocab else 0.0
    rest = {f"input{i}": a for i, a in enumerate(data.arrays[1:], start=1)}
    scored = dict(importance) | {"random": random_importance(next(iter(importance.values())).shape, 0).float()}
    n_items = data.arrays[0].shape[1]
    aucs, curves = perturbation_curves(lambda x, **kw: model(x, *kw.values()), data.arrays[0], scored,
                                       sequence_masker(fill), target=target,
                                       steps=None if n_items <= 20 else 20, batch_size=4 * batch_size,
                                       forward_kwargs=rest or None, resamples=1000, seed=0, alpha=0.05)
    write_curves(curves, out)
    return aucs


def _heads(path: Path, batch_size: int, out: Path) -> dict[str, Any] | None:
    from attnlab.evaluate.summaries import head_summary, head_table
    from attnlab.store import AttentionReader
    from attnlab.workflow import self_attention_only

    if not self_attention_only(path):
        return None                          # cross-attention: no token x token map to characterise
    with AttentionReader(path) as reader:
        heads = head_table(reader, k=None, batch_size=batch_size)
    heads.to_csv(out / "heads.csv", index=False, float_format="%.6g")
    return head_summary(heads)


def _vocabulary(path: Path, data: Inputs, batch_size: int, out: Path) -> dict[str, Any]:
    """Token x token attention of every layer (head mean and per head), and its top pairs."""
    from attnlab.aggregate_views import aggregate_views
    from attnlab.store import AttentionReader

    ids = data.arrays[0]
    with AttentionReader(path) as reader:
        n_layers, shapes = len(reader.keys), {reader.entry(k).shape[-1] for k in reader.keys}
    if shapes != {ids.shape[1]}:
        raise ExternalError(f"--vocab: the vocabulary aggregation needs attention over the {ids.shape[1]} input "
                            f"tokens; the model's attention has {sorted(shapes)} positions (a class token?)")
    mask = ids != data.vocab.index("<pad>") if "<pad>" in data.vocab else torch.ones_like(ids, dtype=torch.bool)
    views = aggregate_views(path, ids, mask, len(data.vocab), layers=list(range(n_layers)), batch_size=batch_size)
    for view, (agg, per_head) in views.items():
        agg.save(out / f"vocab_{view}.npz")
        per_head.save(out / f"vocab_{view}_heads.npz")
        agg.top_pairs(20, itos=data.vocab).to_csv(out / f"top_pairs_{view}.csv", index=False)
    return {"views": list(views), "vocab_size": len(data.vocab)}
