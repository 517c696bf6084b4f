"""Streaming attention extraction to HDF5, and reading it back.

File layout (one file per extraction):

* one dataset per stored entry (attention call), named ``"{call:02d}.{module}"``,
  e.g. ``"00.encoder.layers.0.self_attn"``; shape ``[N, H, Lq, Lk]`` (or
  ``[N, k, H, Lq, Lk]`` for a factorised module that batches over ``k·B`` rows, e.g.
  ``batch·frames``), gzip-compressed, one sample per chunk (a stage streams it with
  memory bounded by one batch), resizable along ``N``. ``H`` and ``Lq`` are those of
  the :class:`Selection`: the kept heads (1 for their mean) and the kept query rows;
* file attributes ``names`` (the module name of each stored entry, in call order),
  ``num_samples``, and what the file holds (:class:`Selection`, written since the
  selection options exist): ``layers``, ``heads``, ``rows`` (each ``"all"`` or the
  JSON of the setting, e.g. ``"cls"``, ``[0]``, ``"mean"``), ``dtype`` and
  ``num_layers`` (entries the model records per forward, stored or not);
* each dataset carries its ``module``, its ``call`` index (among all entries the model
  records, so layer numbers stay those of the model when only some are stored), and
  ``full_shape`` (the per-sample shape before selection).

A file without the selection attributes (written before they existed) reads as
"everything stored, float16". Memory stays bounded by one batch whatever the dataset size.
"""
from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from attnlab.capture import AttentionRecorder, take_heads_rows
from attnlab.devices import model_device, to_device
from attnlab.io import DataError
from attnlab.selection import MissingAttention, Selection, show

__all__ = ["AttentionReader", "MissingAttention", "Selection", "extract_attention", "merge_attention"]

#: Storage dtypes: name -> (HDF5 dtype on disk, torch dtype the values are rounded to).
#: bfloat16 has no HDF5 type: its 16 bits are stored as uint16 and viewed back on reading.
STORE_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "float16": ("float16", torch.float16), "float32": ("float32", torch.float32),
    "bfloat16": ("uint16", torch.bfloat16)}


def entry_key(call: int, name: str) -> str:
    """Dataset name of the ``call``-th recorded entry, made by module ``name``."""
    return f"{call:02d}.{name or '<model>'}"


def _batch_size(batch: Any) -> int:
    """Number of samples in a batch: dim 0 of its first tensor."""
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return batch.shape[0]
    if isinstance(batch, (tuple, list, dict)):
        for v in (batch.values() if isinstance(batch, dict) else batch):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
    raise TypeError(f"cannot tell the number of samples of a {type(batch).__name__} batch: "
                    "expected a tensor, or a tuple/list/dict whose first tensor is batch-first")


def _per_sample(att: torch.Tensor, n: int, key: str) -> torch.Tensor:
    """``[n·k, H, Lq, Lk]`` -> ``[n, H, Lq, Lk]`` (k = 1) or ``[n, k, H, Lq, Lk]``."""
    rows = att.shape[0]
    if rows == n:
        return att
    if rows % n:
        raise ValueError(f"entry {key!r} has {rows} rows for a batch of {n} samples; expected "
                         "a multiple of the batch size (batch-first attention)")
    return att.reshape(n, rows // n, *att.shape[1:])


def extract_attention(model: nn.Module, batches: Iterable[Any], path: str | os.PathLike, *,
                      modules: Iterable[str] | None = None,
                      forward: Callable[[nn.Module, Any], Any] | None = None,
                      layers: str | Iterable[int] = "all", heads: str | Iterable[int] = "all",
                      rows: str | Iterable[int] = "all", dtype: str = "float16",
                      progress: bool = False) -> int:
    """Run ``model`` over ``batches`` and stream the recorded attention maps to ``path``.

    Args:
        model: run under ``torch.no_grad`` in its current train/eval mode, on its device
            (each batch is moved there; what is stored goes to host memory whatever it is).
        batches: yields a tensor or a tuple of tensors, passed as ``model(*batch)``;
            their first tensor is batch-first (dim 0 counts the samples).
        path: the HDF5 file to write. It is written to a temporary file beside it and
            renamed at the end, so a failure leaves no partial output (and an existing
            file at ``path`` untouched).
        modules: the modules to record (names as in ``model.named_modules()``), default all.
        forward: ``forward(model, batch)`` runs one batch instead of ``model(*batch)``
            (keyword arguments, dict batches, seq-first models...).
        layers, heads, rows, dtype: what is stored of each entry (:class:`Selection`):
            e.g. ``rows="cls"`` keeps the class token's row ``[N, H, 1, Lk]``, 1/Lq of
            the bytes, ``heads="mean"`` the mean over heads, ``layers=[-1]`` the last
            call only. The file says what it holds (:attr:`AttentionReader.selection`).
        progress: show a tqdm progress bar.

    Returns:
        The number of samples written.

    Raises:
        ValueError: a bad selection (checked before any I/O, and against the first
            batch's entries); an entry's shape (or the number of entries) differs
            between batches.
    """
    path = Path(path)
    select = Selection(layers=layers, heads=heads, rows=rows, dtype=dtype)   # validates before any I/O
    recorder = AttentionRecorder(model, modules=modules)
    device = model_device(model)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        n_total = 0
        with h5py.File(tmp, "w") as f, torch.no_grad(), recorder as rec:
            keys: list[str] | None = None           # dataset names, set by the first batch
            picked: list[int] = []                  # call indices of the stored entries
            n_calls = 0
            if progress:
                from tqdm.auto import tqdm
                batches = tqdm(batches, desc=f"extract {path.name}", unit="batch")
            for batch in batches:
                rec.clear()
                batch = to_device(batch, device)
                if forward is not None:
                    forward(model, batch)
                else:
                    model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
                n = _batch_size(batch)
                if keys is None:
                    n_calls, picked = len(rec), select.pick_layers(len(rec))
                    keys = _create_datasets(f, rec, n, picked, select)
                _append(f, keys, rec, n, n_total, n_calls, picked, select)
                n_total += n
            f.attrs["names"] = [str(f[k].attrs["module"]) for k in keys or []]
            f.attrs["num_samples"] = n_total
            f.attrs["num_layers"] = n_calls
            for name, value in select.to_attrs().items():
                f.attrs[name] = value
        os.replace(tmp, path)
        return n_total
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and _disk_full(err):
            raise OSError(errno.ENOSPC, f"No space left on device while writing the attention file {path} "
                          "(its temporary file was removed)", str(path)) from err
        raise


def merge_attention(shards: Sequence[str | os.PathLike], path: str | os.PathLike, *, remove: bool = True) -> int:
    """Concatenate attention files written by :func:`extract_attention` over consecutive
    blocks of samples (e.g. one per torchrun process, in rank order) into one file at
    ``path``, as if one process had extracted them all: the same entries, samples in
    shard order, the same chunks (the compressed chunks are copied as they are, never
    decompressed) and the same attributes (what the file holds). The shards' entries
    must agree (module, call index, per-sample shape, dtype). Written to a temporary file and
    renamed; the shards are removed afterwards unless ``remove`` is False. Returns the
    number of samples."""
    path = Path(path)
    if not shards:
        raise ValueError("merge_attention: no shard to merge")
    sources = [h5py.File(p, "r") for p in shards]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        first = sources[0]
        keys = sorted(first.keys(), key=lambda k: int(first[k].attrs["call"]))
        ours = {k: (first[k].attrs["module"], first[k].shape[1:], str(first[k].dtype)) for k in keys}
        for f in sources[1:]:
            theirs = {k: (f[k].attrs["module"], f[k].shape[1:], str(f[k].dtype)) for k in f.keys()}
            if theirs != ours:
                raise ValueError(f"{f.filename}: its entries {sorted(theirs)} differ from {first.filename}'s "
                                 f"{sorted(ours)} (module, per-sample shape or dtype); shards must come from one "
                                 "model and one extract selection")
        n_total = sum(int(f.attrs["num_samples"]) for f in sources)
        with h5py.File(tmp, "w") as out:
            for key in keys:
                like = first[key]
                ds = out.create_dataset(key, shape=(n_total, *like.shape[1:]), maxshape=(None, *like.shape[1:]),
                                        dtype=like.dtype, chunks=like.chunks, compression=like.compression,
                                        compression_opts=like.compression_opts, track_times=False)
                for name, value in like.attrs.items():
                    ds.attrs[name] = value
                start = 0
                for f in sources:          # one sample per chunk: chunk i is sample i
                    src = f[key]
                    for i in range(src.shape[0]):
                        offset = (i,) + (0,) * (src.ndim - 1)
                        mask, chunk = src.id.read_direct_chunk(offset)
                        ds.id.write_direct_chunk((start + i,) + offset[1:], chunk, mask)
                    start += src.shape[0]
            for name, value in first.attrs.items():
                out.attrs[name] = value
            out.attrs["num_samples"] = n_total
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        for f in sources:
            f.close()
    if remove:
        for p in shards:
            os.unlink(p)
    return n_total


def _disk_full(err: OSError) -> bool:
    """A full disk: ``errno`` is ENOSPC, or HDF5's message says so (h5py's OSError
    carries no errno; HDF5 reports ``errno = 28`` in the text)."""
    return err.errno == errno.ENOSPC or "No space left on device" in str(err) or "errno = 28," in str(err)


def _create_datasets(f: h5py.File, rec: AttentionRecorder, n: int, picked: list[int],
                     select: Selection) -> list[str]:
    keys = []
    disk = STORE_DTYPES[select.dtype][0]
    for call in picked:
        name, att = rec.names[call], rec.attentions[call]
        key = entry_key(call, name)
        full = _per_sample(att, n, key)
        per_sample = take_heads_rows(full[:1], select.heads, select.rows, key).shape[1:]
        ds = f.create_dataset(key, shape=(0, *per_sample), maxshape=(None, *per_sample),
                              dtype=disk, chunks=(1, *per_sample), compression="gzip",
                              track_times=False)   # identical content -> identical bytes (DVC hashes)
        ds.attrs["module"] = name
        ds.attrs["call"] = call
        ds.attrs["full_shape"] = list(full.shape[1:])
        keys.append(key)
    return keys


def _append(f: h5py.File, keys: list[str], rec: AttentionRecorder, n: int, start: int, n_calls: int,
            picked: list[int], select: Selection) -> None:
    if len(rec) != n_calls:
        raise ValueError(f"batch starting at sample {start} recorded {len(rec)} attention calls, "
                         f"the first batch {n_calls}")
    _, as_dtype = STORE_DTYPES[select.dtype]
    for key, call in zip(keys, picked):
        name, att = rec.names[call], rec.attentions[call]
        ds = f[key]
        if name != ds.attrs["module"]:
            raise ValueError(f"entry {key!r}: batch starting at sample {start} recorded module "
                             f"{name!r} at this call index")
        att = _per_sample(att, n, key)
        full = tuple(int(s) for s in ds.attrs["full_shape"])
        if tuple(att.shape[1:]) != full:
            raise ValueError(f"entry {key!r}: batch starting at sample {start} has per-sample shape "
                             f"{tuple(att.shape[1:])}, earlier batches {full} "
                             "(pad sequences to a fixed length)")
        values = take_heads_rows(att, select.heads, select.rows, key).to(as_dtype).cpu()       # saved: to host memory, whatever the device
        ds.resize(start + n, axis=0)
        ds[start:start + n] = (values.view(torch.int16).numpy().view(np.uint16) if as_dtype == torch.bfloat16
                               else values.numpy())


class _Entry:
    """Sliceable view of one stored entry: ``entry[i0:i1]`` -> float32 tensor."""

    def __init__(self, ds: h5py.Dataset, path: Path, dtype: str):
        self._ds = ds
        self._path = path
        self._bfloat16 = dtype == "bfloat16"
        self.shape = tuple(ds.shape)
        self.name = str(ds.attrs["module"])
        self.call = int(ds.attrs["call"])
        #: the per-sample shape before selection (all heads and rows)
        self.full_shape = tuple(int(s) for s in ds.attrs["full_shape"]) if "full_shape" in ds.attrs else self.shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        try:
            values = self._ds[index]
        except OSError as err:                 # a damaged chunk: HDF5 cannot read or decompress it
            raise DataError(f"{self._path}: entry {self._ds.name.lstrip('/')!r}, samples {index}: cannot be read "
                            f"(the attention file is damaged; re-run the extract stage): {_first_line(err)}") from None
        if self._bfloat16:
            return torch.from_numpy(np.asarray(values).view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(np.asarray(values, dtype=np.float32))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class AttentionReader:
    """Read a file written by :func:`extract_attention`.

    ``with AttentionReader(path) as r:``

    * ``r.names``: module name of each stored entry; ``r.keys``: dataset names; ``len(r)``: N.
    * ``r.selection``: what the file holds (:class:`Selection`; everything for a file
      written before selections existed); ``r.layers``: the call index of each stored
      entry among ``r.num_layers`` recorded per forward.
    * ``r.sample(i)``: one float32 ``[H, Lq, Lk]`` tensor per stored entry.
    * ``r.entry(k)[i0:i1]``: float32 ``[i1 - i0, H, Lq, Lk]`` of entry ``k`` (its position
      among the stored entries, or its key); ``r.layer(l)``: the position of the model's
      layer ``l`` (call index, negative from the end), refusing one that is not stored.
    * ``r.batches(batch_size[, start, stop, entries=])``: yields lists (one per stored
      entry, or per position in ``entries``: only those are read) of float32 ``[b, H, Lq, Lk]``.
    * ``r.require(what, layers=, rows=, heads=)``: raise :class:`MissingAttention`,
      naming the ``extract`` knob, when the file lacks what ``what`` needs.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such attention file (run the extract stage first)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:                 # truncated, overwritten, or not HDF5 at all
            raise DataError(f"{self.path}: not a readable attention file (truncated or damaged; re-run the "
                            f"extract stage): {_first_line(err)}") from None
        try:
            attrs = self._file.attrs
            self.names: list[str] = [str(n) for n in attrs["names"]]
            self.num_samples = int(attrs["num_samples"])
            self.keys: list[str] = sorted(self._file.keys(), key=lambda k: int(self._file[k].attrs["call"]))
            shapes = {k: self._file[k].shape for k in self.keys}
            self.layers: list[int] = [int(self._file[k].attrs["call"]) for k in self.keys]
            self.num_layers = int(attrs["num_layers"]) if "num_layers" in attrs else len(self.keys)
            self.selection = Selection.from_attrs(attrs)
        except (KeyError, OSError, ValueError) as err:
            self._file.close()
            raise DataError(f"{self.path} is not an attention file written by extract_attention "
                            f"(missing or unreadable {err})") from None
        short = {k: n for k, n in shapes.items() if n[0] != self.num_samples}
        if short or len(self.names) != len(self.keys):
            self._file.close()
            what = (f"entry {next(iter(short))!r} holds {next(iter(short.values()))[0]} samples"
                    if short else f"{len(self.keys)} entries for {len(self.names)} names")
            raise DataError(f"{self.path}: {what}, the file says {self.num_samples} samples and "
                            f"{len(self.names)} entries (an incomplete write; re-run the extract stage)")

    def __enter__(self) -> "AttentionReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return self.num_samples

    @property
    def full(self) -> bool:
        """Every layer, head and query row of the recorded attention is stored."""
        return self.selection.full

    def entry(self, k: int | str) -> _Entry:
        key = self.keys[k] if isinstance(k, int) else k
        if key not in self.keys:
            raise KeyError(f"no entry {key!r}; entries: {self.keys}")
        return _Entry(self._file[key], self.path, self.selection.dtype)

    def layer(self, layer: int, what: str = "this stage") -> int:
        """The position among the stored entries of the model's entry ``layer`` (call
        index; negative counts from the end of all ``num_layers``). ``IndexError`` when
        the model has no such entry, :class:`MissingAttention` when it is not stored."""
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"{what}: layer {layer} does not exist; the model records {self.num_layers} attention "
                             f"calls (0..{self.num_layers - 1}, or negative from the end)")
        self.require(what, layers=[layer], rows=None)
        return self.layers.index(layer % self.num_layers)

    def require(self, what: str, *, layers: str | Iterable[int] | None = "all",
                rows: str | Iterable[int] | None = "all", heads: str = "any") -> None:
        """See :meth:`Selection.require`; the message starts with this file's path."""
        try:
            self.selection.require(what, layers=layers, rows=rows, heads=heads, num_layers=self.num_layers)
        except MissingAttention as err:
            raise MissingAttention(f"{self.path}: {err}") from None

    def sample(self, i: int) -> list[torch.Tensor]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return [self.entry(k)[i] for k in self.keys]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None, *,
                entries: Sequence[int] | None = None) -> Iterator[list[torch.Tensor]]:
        """Samples ``start`` to ``stop`` (default: all) in batches of ``batch_size``, of
        every stored entry or only those at the positions ``entries`` (the others are
        never read from disk)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        picked = range(len(self.keys)) if entries is None else entries
        views: Sequence[_Entry] = [self.entry(int(k)) for k in picked]
        for i in range(start, stop, batch_size):
            yield [e[i:min(i + batch_size, stop)] for e in views]

    def __repr__(self) -> str:
        held = "" if self.full else (f", layers {show(self.selection.layers)}, heads {show(self.selection.heads)}, "
                                     f"rows {show(self.selection.rows)}")
        return (f"AttentionReader({str(self.path)!r}, {len(self.keys)} entries, {self.num_samples} samples, "
                f"{self.selection.dtype}{held})")
