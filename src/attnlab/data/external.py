"""The inputs of a model trained elsewhere: ``.npy`` arrays (batch first, items along
dim 1) or token sequences with a vocabulary, labels and evidence masks, checked.

Every problem is an :class:`~attnlab.io.ExternalError` whose message names the file
(by the command-line flag or params key that gave it) and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from attnlab.io import DataError, ExternalError


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
