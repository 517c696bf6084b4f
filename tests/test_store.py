"""Streaming extraction to HDF5 and reading back."""
from __future__ import annotations

import math

import h5py
import pytest
import torch
from torch import nn

from attnlab.capture import AttentionProbs, AttentionRecorder
from attnlab.store import AttentionReader, extract_attention

D, H, T = 8, 2, 5
FP16 = dict(atol=1e-3, rtol=0)          # float16 storage of values in [0, 1]


def make_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 16, 0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def in_memory(model, x, **kw):
    """Attention of every sample, computed in one go with the recorder."""
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x, **kw)
    return rec.names, rec.attentions


def test_round_trip_with_partial_last_batch(tmp_path):
    model = make_model()
    x = torch.randn(10, T, D)
    path = tmp_path / "att.h5"
    n = extract_attention(model, x.split(4), path)       # batches of 4, 4, 2
    assert n == 10
    names, expected = in_memory(model, x)

    with h5py.File(path) as f:                           # the documented layout
        assert list(f.attrs["names"]) == names == ["layers.0.self_attn", "layers.1.self_attn"]
        assert f.attrs["num_samples"] == 10
        ds = f["00.layers.0.self_attn"]
        assert ds.shape == (10, H, T, T) and ds.dtype == "float16"
        assert ds.chunks == (1, H, T, T) and ds.compression == "gzip"
        assert ds.maxshape == (None, H, T, T)

    with AttentionReader(path) as r:
        assert len(r) == 10 and r.names == names
        assert r.keys == ["00.layers.0.self_attn", "01.layers.1.self_attn"]
        for i in (0, 5, 9):
            for got, want in zip(r.sample(i), expected):
                assert got.dtype == torch.float32 and got.shape == (H, T, T)
                torch.testing.assert_close(got, want[i], **FP16)
        torch.testing.assert_close(r.entry(1)[3:7], expected[1][3:7], **FP16)
        torch.testing.assert_close(r.entry("00.layers.0.self_attn")[:], expected[0], **FP16)
        chunks = list(r.batches(3))
        assert [c[0].shape[0] for c in chunks] == [3, 3, 3, 1]
        for k in range(2):
            torch.testing.assert_close(torch.cat([c[k] for c in chunks]), expected[k], **FP16)
        with pytest.raises(IndexError):
            r.sample(10)


def test_forward_with_keyword_arguments_and_module_subset(tmp_path):
    model = make_model()
    x = torch.randn(6, T, D)
    pad = torch.zeros(6, T, dtype=torch.bool)
    pad[::2, 3:] = True
    batches = list(zip(x.split(4), pad.split(4)))
    n = extract_attention(model, batches, tmp_path / "a.h5", modules=["layers.1.self_attn"],
                          forward=lambda m, b: m(b[0], src_key_padding_mask=b[1]))
    assert n == 6
    names, expected = in_memory(model, x, src_key_padding_mask=pad)
    with AttentionReader(tmp_path / "a.h5") as r:
        assert r.names == ["layers.1.self_attn"]
        torch.testing.assert_close(r.entry(0)[:], expected[1], **FP16)
        assert (r.entry(0)[0][:, :, 3:] == 0).all()      # padded keys exactly 0


class FramewiseAttention(nn.Module):
    """Attention within each frame of ``x [B, F, P, D]``: probs are ``[B·F, H, P, P]``."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(D, 2 * D)
        self.attn_probs = AttentionProbs()

    def forward(self, x):
        b, f, p, d = x.shape
        q, k = self.qk(x.reshape(b * f, p, d)).reshape(b * f, p, 2, H, d // H).permute(2, 0, 3, 1, 4)
        return self.attn_probs((q @ k.transpose(-2, -1) / math.sqrt(d // H)).softmax(-1))


def test_factorised_entries_are_stored_per_sample(tmp_path):
    torch.manual_seed(0)
    model = FramewiseAttention()
    x = torch.randn(5, 3, 4, D)                          # 5 samples, 3 frames, 4 patches
    assert extract_attention(model, x.split(2), tmp_path / "f.h5") == 5
    with torch.no_grad():
        probs = model(x).reshape(5, 3, H, 4, 4)          # [B, F, H, P, P]
    with AttentionReader(tmp_path / "f.h5") as r:
        assert r.entry(0).shape == (5, 3, H, 4, 4)
        torch.testing.assert_close(r.sample(4)[0], probs[4], **FP16)


def test_failure_midway_leaves_no_file_and_keeps_existing_one(tmp_path):
    model = make_model()
    path = tmp_path / "att.h5"

    def failing():
        yield torch.randn(3, T, D)
        yield torch.randn(3, T, D)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        extract_attention(model, failing(), path)
    assert list(tmp_path.iterdir()) == []                # no output, no temp file

    path.write_bytes(b"previous results")
    with pytest.raises(RuntimeError, match="data loader broke"):
        extract_attention(model, failing(), path)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"previous results"


def test_shape_mismatch_names_entry_and_shapes(tmp_path):
    model = make_model()
    batches = [torch.randn(2, T, D), torch.randn(2, T + 1, D)]
    msg = r"'00.layers.0.self_attn'.*\(2, 6, 6\).*\(2, 5, 5\)"
    with pytest.raises(ValueError, match=msg):
        extract_attention(model, batches, tmp_path / "att.h5")
    assert list(tmp_path.iterdir()) == []


def test_bad_module_name_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="'nope'"):
        extract_attention(make_model(), [torch.randn(2, T, D)], tmp_path / "x.h5", modules=["nope"])
    assert list(tmp_path.iterdir()) == []
