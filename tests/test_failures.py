"""Damaged files on disk and a full disk: a clear error naming the file, and no partial
output (the stage's temporary directory is removed, nothing replaces the old output)."""
import errno
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from attnlab import pipeline, store
from attnlab.io import DataError
from attnlab.models import EncoderClassifier, save_checkpoint
from attnlab.store import AttentionReader, extract_attention

ROOT = Path(__file__).resolve().parents[1]


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def _store(path, n=12, batch=4):
    x = torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(1))
    extract_attention(_Attn().eval(), [x[i:i + batch] for i in range(0, n, batch)], path)
    return path


# --------------------------------------------------------------------------- the attention store
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_store_names_the_file(tmp_path, keep):
    path = _store(tmp_path / "attention.h5")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(DataError) as err:
        AttentionReader(path)
    text = str(err.value)
    assert text.startswith(f"{path}: not a readable attention file (truncated or damaged; re-run the extract "
                           f"stage): ")
    assert f"truncated file: eof = {int(len(data) * keep)}" in text and "\n" not in text


def test_store_with_an_incomplete_entry_is_refused(tmp_path):
    """A file whose entry holds fewer samples than it claims (an interrupted writer
    that did not use extract_attention's rename) is refused, not read short."""
    path = _store(tmp_path / "attention.h5")
    with h5py.File(path, "r+") as f:
        key = sorted(f.keys())[0]
        f[key].resize(7, axis=0)
    with pytest.raises(DataError) as err:
        AttentionReader(path)
    assert str(err.value) == (f"{path}: entry {key!r} holds 7 samples, the file says 12 samples and 1 entries "
                              "(an incomplete write; re-run the extract stage)")


def test_missing_or_foreign_store(tmp_path):
    with pytest.raises(DataError) as err:
        AttentionReader(tmp_path / "nope.h5")
    assert str(err.value) == f"{tmp_path / 'nope.h5'}: no such attention file (run the extract stage first)"
    (tmp_path / "text.h5").write_text("not hdf5\n")
    with pytest.raises(DataError, match="not a readable attention file"):
        AttentionReader(tmp_path / "text.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(DataError, match=r"is not an attention file written by extract_attention \(missing"):
        AttentionReader(tmp_path / "empty.h5")


def test_extract_attention_disk_full_leaves_nothing(tmp_path, monkeypatch):
    """The second batch's write fails with ENOSPC: no file at the path, no temporary file
    beside it, an existing file untouched, and an OSError with errno ENOSPC naming it."""
    path = tmp_path / "attention.h5"
    path.write_bytes(b"old output")
    real, calls = store._append, []

    def append(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("Can't write data (file write failed: time = now, filename = 'x', file descriptor = 3, "
                          "errno = 28, error message = 'No space left on device', buf = 0x1, total write size = 8)")
        return real(*args)

    monkeypatch.setattr(store, "_append", append)
    x = torch.randn(8, 5, 8)
    with pytest.raises(OSError) as err:
        extract_attention(_Attn().eval(), [x[:4], x[4:]], path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert str(path) in str(err.value) and "temporary file was removed" in str(err.value)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.h5"] and path.read_bytes() == b"old output"


# --------------------------------------------------------------------------- through the stages
def _motion_inputs(data):
    """What the extract stage of the motion kind reads: a dataset and a trained checkpoint."""
    (data / "motion" / "prepare").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    np.savez(data / "motion" / "prepare" / "dataset.npz", x_test=torch.randn(20, 6, 3, generator=g).numpy(),
             y_test=np.arange(20) % 2)
    (data / "motion" / "prepare" / "meta.json").write_text(json.dumps({"classes": ["a", "b"]}))
    (data / "motion" / "train").mkdir()
    kwargs = {"in_features": 3, "n_classes": 2, "d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16}
    save_checkpoint(data / "motion" / "train" / "model.pt", EncoderClassifier(**kwargs),
                    "attnlab.models.encoder:EncoderClassifier", kwargs)


def _disk_full_in_append(monkeypatch):
    real, calls = store._append, []

    def append(*args):
        calls.append(1)
        if len(calls) == 2:                    # the second batch (extract.batch_size = 16 of 20)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(store, "_append", append)


def _disk_full_in_save_arrays(monkeypatch):
    from attnlab import io

    def save_arrays(path, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "save_arrays", save_arrays)


@pytest.mark.parametrize("where, written", [(_disk_full_in_append, "attention.h5"),
                                            (_disk_full_in_save_arrays, "predictions.npz")],
                         ids=["attention", "predictions"])
def test_extract_stage_on_a_full_disk_writes_nothing(tmp_path, monkeypatch, capsys, where, written):
    data = tmp_path / "data"
    _motion_inputs(data)
    (data / "motion" / "extract").mkdir()
    (data / "motion" / "extract" / "old.txt").write_text("the previous output")
    where(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        pipeline.run("extract", ["motion", "--params", str(ROOT / "params.yaml"), "--data", str(data)],
                     progress=False)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: no space left on device: the 'extract' stage of {data / 'motion'} stopped while writing "
        f"{written} and wrote nothing (its temporary directory was removed); free some space and re-run"]
    assert sorted(p.name for p in (data / "motion").iterdir()) == ["extract", "prepare", "train"]
    assert [p.name for p in (data / "motion" / "extract").iterdir()] == ["old.txt"]      # untouched


def test_aggregate_stage_on_a_truncated_store_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data" / "tokens"
    (data / "prepare").mkdir(parents=True)
    tokens = np.arange(24).reshape(4, 6) % 5
    np.savez(data / "prepare" / "dataset.npz", tokens_test=tokens, mask_test=np.ones_like(tokens, dtype=bool))
    (data / "prepare" / "meta.json").write_text(json.dumps({"vocab": [f"t{i}" for i in range(5)]}))
    (data / "extract").mkdir()
    path = _store(data / "extract" / "attention.h5", n=4)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SystemExit) as exit_:
        pipeline.run("aggregate", ["tokens", "--params", str(ROOT / "params.yaml"), "--data", str(tmp_path / "data")],
                     progress=False)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not a readable attention file (truncated")
    assert sorted(p.name for p in data.iterdir()) == ["extract", "prepare"]
