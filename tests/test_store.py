"""Streaming extraction to HDF5 and reading back."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
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


# --------------------------------------------------------------------------- what is stored (Selection)
from attnlab.aggregate_views import aggregate_views          # noqa: E402
from attnlab.store import MissingAttention, Selection, merge_attention   # noqa: E402

H4, T4 = 4, 6


def make_model4():
    """3 layers × 4 heads over 6 tokens: enough to tell layers, heads and rows apart."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, H4, 32, 0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()


def literal_take(att_bhqk, heads, rows):
    """The selection written out with loops: ``[B, H', Lq', Lk]``."""
    b, h, lq, lk = att_bhqk.shape
    head_ids = list(range(h)) if heads == "all" else [x % h for x in heads] if heads != "mean" else None
    row_ids = list(range(lq)) if rows == "all" else [0] if rows == "cls" else [r % lq for r in rows]
    out = torch.zeros(b, 1 if head_ids is None else len(head_ids), len(row_ids), lk)
    for i in range(b):
        for r, q in enumerate(row_ids):
            if head_ids is None:
                total = torch.zeros(lk)
                for hh in range(h):
                    total += att_bhqk[i, hh, q]
                out[i, 0, r] = total / h
            else:
                for k, hh in enumerate(head_ids):
                    out[i, k, r] = att_bhqk[i, hh, q]
    return out


@pytest.mark.parametrize("layers, heads, rows", [
    ("all", "all", "cls"), ("all", [2, 0], "all"), ("all", "mean", "all"), ([-1], "all", "all"),
    ([0, 2], "mean", "cls"), ([1], [-1], [5, 2])])
def test_reduced_store_equals_the_slice_of_a_full_recording(tmp_path, layers, heads, rows):
    model = make_model4()
    x = torch.randn(7, T4, 16)
    path = tmp_path / "reduced.h5"
    assert extract_attention(model, x.split(3), path, layers=layers, heads=heads, rows=rows) == 7
    names, full = in_memory(model, x)
    kept = [0, 1, 2] if layers == "all" else sorted(l % 3 for l in layers)
    with AttentionReader(path) as r:
        assert r.layers == kept and r.num_layers == 3 and r.names == [names[l] for l in kept]
        assert r.selection == Selection(layers=layers, heads=heads, rows=rows) and not r.full
        for pos, l in enumerate(kept):
            want = literal_take(full[l], heads, rows)
            assert r.entry(pos).shape == (7, *want.shape[1:])
            assert r.entry(pos).full_shape == (H4, T4, T4) and r.entry(pos).call == l
            torch.testing.assert_close(r.entry(pos)[:], want, **FP16)
        with h5py.File(path) as f:                       # the file says what it holds
            assert f.attrs["num_layers"] == 3 and f.attrs["dtype"] == "float16"
            assert Selection.from_attrs(f.attrs) == Selection(layers=layers, heads=heads, rows=rows)


def test_class_token_rows_are_one_row_of_the_full_store_and_that_much_smaller(tmp_path):
    model = make_model4()
    x = torch.randn(20, T4, 16)
    extract_attention(model, x.split(8), tmp_path / "full.h5")
    extract_attention(model, x.split(8), tmp_path / "cls.h5", rows="cls")
    with AttentionReader(tmp_path / "full.h5") as full, AttentionReader(tmp_path / "cls.h5") as cls:
        assert full.full and cls.selection.row_indices == (0,)
        for k in range(3):                               # bit-identical float16 values
            assert torch.equal(cls.entry(k)[:], full.entry(k)[:][:, :, :1])
    def data_bytes(p):
        with h5py.File(p) as f:
            return sum(f[k].id.get_storage_size() for k in f.keys())
    assert data_bytes(tmp_path / "full.h5") > 3 * data_bytes(tmp_path / "cls.h5")


@pytest.mark.parametrize("dtype, torch_dtype, disk", [("float32", torch.float32, "float32"),
                                                      ("bfloat16", torch.bfloat16, "uint16")])
def test_dtypes_round_like_torch(tmp_path, dtype, torch_dtype, disk):
    model = make_model4()
    x = torch.randn(5, T4, 16)
    extract_attention(model, x.split(2), tmp_path / "a.h5", dtype=dtype, heads=[1])
    _, full = in_memory(model, x)
    with AttentionReader(tmp_path / "a.h5") as r:
        assert r.selection.dtype == dtype
        for k in range(3):
            got = r.entry(k)[:]
            assert got.dtype == torch.float32
            assert torch.equal(got, full[k][:, 1:2].to(torch_dtype).float())      # exactly torch's rounding
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["00.layers.0.self_attn"].dtype == disk


def test_store_written_before_selections_reads_as_everything(tmp_path):
    model = make_model4()
    x = torch.randn(4, T4, 16)
    path = tmp_path / "old.h5"
    extract_attention(model, [x], path)
    with h5py.File(path, "a") as f:                      # strip what older versions did not write
        for name in ("layers", "heads", "rows", "dtype", "num_layers"):
            del f.attrs[name]
        for key in f.keys():
            del f[key].attrs["full_shape"]
    with AttentionReader(path) as r:
        assert r.full and r.selection == Selection() and r.selection.dtype == "float16"
        assert r.num_layers == 3 and r.layers == [0, 1, 2] and r.entry(1).full_shape == (H4, T4, T4)
        r.require("aggregate.attention 'rollout'", rows="all", heads="all")       # holds everything
        assert r.layer(-1) == 2


def test_refusals_name_what_is_needed_and_the_extract_knob(tmp_path):
    model = make_model4()
    x = torch.randn(4, T4, 16)
    extract_attention(model, [x], tmp_path / "cls.h5", rows="cls", layers=[0, -1])
    extract_attention(model, [x], tmp_path / "mean.h5", heads="mean")
    with AttentionReader(tmp_path / "cls.h5") as r:
        with pytest.raises(MissingAttention, match=r"cls\.h5: aggregate\.attention 'rollout' needs every query row "
                                                   r"of every layer; the store holds query rows \[0\] "
                                                   r"\(extract\.rows: cls\); set extract\.rows: all$"):
            r.require("aggregate.attention 'rollout'")
        r.require("a class-token readout of the last layer", layers=[-1], rows=[0])      # stored: no error
        assert r.layer(-1) == 1 and r.layer(2) == 1 and r.layer(0) == 0
        with pytest.raises(MissingAttention, match=r"report needs layer 1; the store holds layers "
                                                   r"\[0, -1\] \(extract\.layers: \[0, -1\]\); set extract\.layers: "
                                                   r"all \(or a list including \[1\]\)$"):
            r.layer(1, "report")
        with pytest.raises(IndexError, match="layer 3 does not exist; the model records 3"):
            r.layer(3)
    with AttentionReader(tmp_path / "mean.h5") as r:
        with pytest.raises(MissingAttention, match=r"head by head; the store holds the mean over heads "
                                                   r"\(extract\.heads: mean\); set extract\.heads: all$"):
            r.require("aggregate.heads", layers=[0], heads="each")
        r.require("aggregate.attention 'rollout'")                                   # the head mean is enough


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows="first"), r"rows='first': expected 'all', 'cls' or a list of indices"),
    (dict(heads=[0, 0]), r"heads=\[0, 0\]: index 0 is listed twice"),
    (dict(layers=[]), r"layers=\[\]: expected 'all' or a non-empty list of integer indices"),
    (dict(dtype="int8"), r"dtype='int8': expected one of float16, float32, bfloat16"),
    (dict(layers=[3]), r"layers: entry 3 does not exist; the model records 3 attention calls"),
    (dict(heads=[4]), r"heads: head 4 does not exist in entry '00.layers.0.self_attn', which has 4 heads"),
    (dict(rows=[-7]), r"rows: query row -7 does not exist in entry '00.layers.0.self_attn', which has 6 rows"),
])
def test_bad_selections_name_the_setting_and_leave_no_file(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract_attention(make_model4(), [torch.randn(2, T4, 16)], tmp_path / "x.h5", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_merged_shards_keep_what_the_store_holds(tmp_path):
    model = make_model4()
    x = torch.randn(9, T4, 16)
    sel = dict(layers=[-1], heads="mean", rows="cls", dtype="bfloat16")
    extract_attention(model, x.split(4), tmp_path / "one.h5", **sel)
    extract_attention(model, x[:5].split(4), tmp_path / "s0.h5", **sel)
    extract_attention(model, x[5:].split(4), tmp_path / "s1.h5", **sel)
    merge_attention([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "merged.h5")
    with AttentionReader(tmp_path / "one.h5") as one, AttentionReader(tmp_path / "merged.h5") as merged:
        assert merged.selection == one.selection == Selection(**sel)
        assert merged.layers == [2] and merged.num_layers == 3 and len(merged) == 9
        assert torch.equal(merged.entry(0)[:], one.entry(0)[:])


def test_batches_of_chosen_entries(tmp_path):
    model = make_model4()
    x = torch.randn(7, T4, 16)
    extract_attention(model, [x], tmp_path / "a.h5")
    _, full = in_memory(model, x)
    with AttentionReader(tmp_path / "a.h5") as r:
        parts = list(r.batches(3, entries=[2]))
        assert [len(p) for p in parts] == [1, 1, 1]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), full[2], **FP16)


def test_aggregation_of_a_layer_subset_store_uses_the_models_layer_numbers(tmp_path):
    torch.manual_seed(3)
    emb = nn.Embedding(9, 16)
    model = make_model4()
    tokens = torch.randint(0, 9, (10, T4))
    mask = torch.ones(10, T4, dtype=torch.bool)
    batches = [emb(tokens[i:i + 4]).detach() for i in range(0, 10, 4)]
    extract_attention(model, batches, tmp_path / "full.h5")
    extract_attention(model, batches, tmp_path / "last.h5", layers=[2])
    want = aggregate_views(tmp_path / "full.h5", tokens, mask, 9, layers=[2])["layer2"]
    got = aggregate_views(tmp_path / "last.h5", tokens, mask, 9, layers=[-1])["layer2"]
    for ours, theirs in zip(got, want):                  # head mean, per head: the same float16 inputs
        np.testing.assert_array_equal(np.array(ours.sum), np.array(theirs.sum))
    with pytest.raises(MissingAttention, match=r"aggregate\.attention 'layer' needs every query row of layer 0, "
                                               r"head by head; the store holds layers \[2\] \(extract\.layers: "
                                               r"\[2\]\); set extract\.layers: all \(or a list including \[0\]\)$"):
        aggregate_views(tmp_path / "last.h5", tokens, mask, 9, layers=[0])


def test_params_refuse_an_aggregation_the_store_will_not_hold():
    import yaml

    from attnlab.config import ConfigError, parse_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["tokens"]["extract"] = {**(params["tokens"].get("extract") or {}), "rows": "cls"}
    with pytest.raises(ConfigError, match=r"tokens: aggregate\.attention 'layer' needs every query row of layer 0, "
                                          r"head by head; the store holds query rows \[0\] \(extract\.rows: cls\); "
                                          r"set extract\.rows: all$"):
        parse_params(params)
    params["tokens"]["extract"].update(rows="all", layers=[0, -1])
    parse_params(params)                                 # layer 0 is stored, with every row and head
    params["tokens"]["extract"].update(layers="all", heads="mean")
    params["tokens"]["aggregate"] = {**params["tokens"]["aggregate"], "attention": "rollout"}
    with pytest.raises(ConfigError, match=r"tokens: evaluate \(its head diagnostics, in the report\) needs every "
                                          r"query row, every head; the store holds the mean over heads \(extract\.heads: mean\); set "
                                          r"extract\.heads: all$"):
        parse_params(params)                             # the rollout would do with the head mean; the report not
    params["tokens"]["extract"].update(heads="all")
    params["motion"]["extract"] = {"rows": "cls", "layers": [-1], "dtype": "bfloat16"}   # nothing aggregated
    assert parse_params(params).motion.extract.selection() == Selection(layers=[-1], rows="cls", dtype="bfloat16")


# --------------------------------------------------------------------------- stages on a reduced store
def test_stages_run_on_a_class_token_store(tmp_path):
    """A class-token motion model whose extract keeps only the class token's rows, in
    bfloat16: the store holds [N, H, 1, 1+T] per layer, equal to those rows of the
    trained model's recorded attention; explain (which re-runs the model, so every
    method stays available), evaluate (without the head diagnostics, which need whole
    maps) and the report run on it."""
    import json

    import yaml

    from attnlab.config import load_params
    from attnlab.experiments import get_experiment
    from attnlab.layout import Layout
    from attnlab.pipeline import run
    from attnlab.pipeline.stages import load_dataset

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["experiments"], params["device"] = ["motion"], "cpu"
    m = params["motion"]
    m["model"].update(pooling="cls", d_model=16, nhead=2, num_layers=2, dim_feedforward=32)
    m["train"].update(epochs=2)
    m["extract"].update(rows="cls", dtype="bfloat16")
    m["explain"].update(methods=["raw", "rollout", "grad_rollout"], examples=1)
    m["evaluate"].update(steps=3, resamples=20, ablation=False, debiased=False,
                         sanity={"samples": 2, "threshold": 0.5, "independent": False})
    m["report"].update(examples=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["motion", "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data")]
    for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report"):
        run(stage, argv, progress=False)
    out = tmp_path / "data" / "motion"

    exp, cfg, lay = get_experiment("motion"), load_params(tmp_path / "params.yaml").motion, Layout(out)
    data, _ = load_dataset(lay)
    model = exp.load_model(cfg, lay)
    x = exp.test_inputs(data)
    with torch.no_grad(), AttentionRecorder(model) as rec:
        exp.forward(model, x)
    with AttentionReader(out / "extract" / "attention.h5") as r:
        assert r.selection == Selection(rows="cls", dtype="bfloat16") and r.num_layers == 2
        n, steps = len(x), x.shape[1]
        for k, att in enumerate(rec.attentions):
            assert r.entry(k).shape == (n, 2, 1, steps + 1)
            assert torch.equal(r.entry(k)[:], att[:, :, :1].to(torch.bfloat16).float())
    importance = np.load(out / "explain" / "importance.npz")
    assert {"raw", "rollout", "grad_rollout"} <= set(importance.files)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert set(metrics["faithfulness"]["deletion_auc"]) == {"raw", "rollout", "grad_rollout", "random"}
    assert "heads" not in metrics                        # head diagnostics need every query row
    assert "Attention per layer and head" in (out / "report" / "report.html").read_text()
