"""Several processes under torchrun (attnlab.distributed): the pipeline's train, extract and
aggregate as 2 processes on the CPU (gloo), against one process and against the maths
recomputed here from the stored weights and attention."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from attnlab import distributed
from attnlab.aggregate import VocabAttention
from attnlab.capture import AttentionRecorder
from attnlab.store import AttentionReader, extract_attention, merge_attention

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_blocks_cover_the_samples_in_order(world):
    for n in range(0, 11):
        blocks = [distributed.block(n, r, world) for r in range(world)]
        assert [i for start, stop in blocks for i in range(start, stop)] == list(range(n))
        sizes = [stop - start for start, stop in blocks]
        assert max(sizes) - min(sizes) <= 1


def _encoder(nhead: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(8, nhead, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_merged_shards_equal_one_extraction(tmp_path):
    model, x = _encoder(2), torch.randn(11, 5, 8)
    extract_attention(model, (x[i:i + 4] for i in range(0, 11, 4)), tmp_path / "one.h5")
    # two processes' blocks, in batches of their own
    shards = []
    for r, (start, stop) in enumerate([(0, 6), (6, 11)]):
        shards.append(tmp_path / f"shard{r}.h5")
        extract_attention(model, (x[i:min(i + 3, stop)] for i in range(start, stop, 3)), shards[-1])
    assert merge_attention(shards, tmp_path / "merged.h5") == 11
    assert not any(p.exists() for p in shards)                  # removed once merged
    with AttentionReader(tmp_path / "one.h5") as one, AttentionReader(tmp_path / "merged.h5") as merged:
        assert merged.names == one.names and merged.keys == one.keys and len(merged) == 11
        for key in one.keys:
            assert torch.equal(merged.entry(key)[:], one.entry(key)[:])
    with torch.no_grad(), AttentionRecorder(model) as rec:      # and the maths itself, in float16
        model(x)
    with AttentionReader(tmp_path / "merged.h5") as merged:
        for k, att in enumerate(rec.attentions):
            assert torch.allclose(merged.entry(k)[:], att.half().float(), atol=1e-3)


def test_merge_refuses_shards_of_different_models(tmp_path):
    x = torch.randn(4, 5, 8)
    extract_attention(_encoder(2), [x], tmp_path / "a.h5")
    extract_attention(_encoder(4), [x], tmp_path / "b.h5")
    with pytest.raises(ValueError, match="b.h5: its entries .* differ"):
        merge_attention([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists() and (tmp_path / "a.h5").exists()
    assert not list(tmp_path.glob(".out.h5.*"))                 # no temporary file left


def test_one_process_leaves_everything_alone():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    agg = VocabAttention(5)
    agg.update(torch.tensor([[1, 2, 3]]), torch.full((1, 3, 3), 1 / 3))
    before = agg.state_dict()
    agg.all_reduce()
    assert all(np.array_equal(before[k], v) for k, v in agg.state_dict().items())
    assert distributed.gather_rows(torch.arange(3), 3).tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- torchrun, end to end
def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A tiny tokens project whose train, extract and aggregate ran as 2 processes
    (ATTNLAB_NPROC=2, what `NPROC=2 make run` sets) and the rest as usual, up to track;
    and the same training in one process (data `single/`)."""
    repo = tmp_path_factory.mktemp("ddp")
    for name in ("stages",):
        (repo / name).mkdir()
        for f in (ROOT / name).glob("*.py"):
            (repo / name / f.name).write_text(f.read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"] = ["tokens"]
    t = params["tokens"]
    t["prepare"].update(n=240, max_len=12)
    t["model"].update(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.0)
    t["train"].update(epochs=3, batch_size=16)        # 192 training sequences: 12 steps an epoch
    t["extract"].update(batch_size=16)
    t["aggregate"].update(min_count=1, batch_size=8, layers=[0, 1])
    t["explain"].update(methods=["raw", "rollout"])
    t["evaluate"].update(sanity={"samples": 0, "threshold": 0.5, "independent": False})
    t["report"].update(heatmap_tokens=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "ATTNLAB_ROOT": str(repo)}
    env.pop("ATTNLAB_NPROC", None)
    py = str(BIN / "python")
    _run([py, "stages/prepare.py", "tokens"], repo, env)
    (repo / "single" / "tokens").mkdir(parents=True)
    _run(["cp", "-r", "data/tokens/prepare", "single/tokens/"], repo, env)
    logs = {}
    for stage in ("train", "extract", "aggregate"):
        logs[stage] = _run([py, f"stages/{stage}.py", "tokens"], repo, {**env, "ATTNLAB_NPROC": "2"}).stderr
    for stage in ("explain", "evaluate", "report", "track"):
        _run([py, f"stages/{stage}.py", "tokens"], repo, env)
    # the one-process reference training: not a state of the pipeline, so no live MLflow run
    _run([py, "stages/train.py", "tokens", "--data", "single"], repo, {**env, "ATTNLAB_LIVE": "0"})
    return repo, logs


def test_stages_ran_as_two_processes(two_processes):
    repo, logs = two_processes
    assert json.loads((repo / "data/tokens/train/metrics.json").read_text())["processes"] == 2
    for stage, log in logs.items():               # process 0 says so
        assert f"{stage}: 2 processes (torchrun, gloo)" in log, log


def test_one_set_of_outputs(two_processes):
    repo, _ = two_processes
    exp = repo / "data/tokens"
    assert sorted(p.name for p in exp.iterdir()) == [".timings", "aggregate", "evaluate", "explain", "extract",
                                                      "prepare", "report", "track", "train"]
    assert [p.name for p in (exp / "extract").iterdir()] == ["attention.h5"]     # shards merged and removed
    assert sorted(p.name for p in (exp / "train").iterdir()) == ["history.csv", "metrics.json", "model.pt"]
    assert not list(exp.glob("**/.*shard*")) and not list(exp.glob(".*.tmp*"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tokens").experiment_id])
    assert len(runs) == 1
    assert runs[0].info.run_id == json.loads((exp / "track/run.json").read_text())["run_id"]
    assert runs[0].data.metrics["final.processes"] == 2
    per_process = max(1, (os.cpu_count() or 1) // 2)            # the cores shared out
    for stage in ("train", "extract", "aggregate"):
        assert runs[0].data.tags[f"attnlab.stage.{stage}"].endswith(
            f", 2 processes x {per_process} thread{'s' if per_process > 1 else ''}")
    assert ", 1 process x " in runs[0].data.tags["attnlab.stage.explain"]


def test_attention_equals_one_process_recomputed_from_the_weights(two_processes):
    repo, _ = two_processes
    from attnlab.models import load_checkpoint

    data = np.load(repo / "data/tokens/prepare/dataset.npz")
    tokens, mask = torch.from_numpy(data["tokens_test"]), torch.from_numpy(data["mask_test"])
    model = load_checkpoint(repo / "data/tokens/train/model.pt")
    with torch.no_grad(), AttentionRecorder(model) as rec:      # one process, one batch
        model(tokens, mask)
    with AttentionReader(repo / "data/tokens/extract/attention.h5") as stored:
        assert len(stored) == len(tokens) and len(stored.keys) == len(rec.attentions) == 2
        for k, att in enumerate(rec.attentions):
            got = stored.entry(k)[:]
            finite = torch.isfinite(att)
            assert torch.equal(finite, torch.isfinite(got))
            assert torch.allclose(got[finite], att[finite], atol=1e-3)   # float16 storage


def test_aggregation_equals_one_pass(two_processes):
    repo, _ = two_processes
    data = np.load(repo / "data/tokens/prepare/dataset.npz")
    tokens, mask = torch.from_numpy(data["tokens_test"]), torch.from_numpy(data["mask_test"]).bool()
    vocab = len(json.loads((repo / "data/tokens/prepare/meta.json").read_text())["vocab"])
    with AttentionReader(repo / "data/tokens/extract/attention.h5") as stored:
        for layer in (0, 1):
            one = VocabAttention(vocab, nhead=2)                 # one pass over every sequence at once
            one.update(tokens, stored.entry(layer)[:], mask=mask, causal=True)
            saved = VocabAttention.load(repo / f"data/tokens/aggregate/vocab_layer{layer}_heads.npz")
            assert saved.n_sequences == one.n_sequences == len(tokens)
            assert np.array_equal(saved.count, one.count)
            np.testing.assert_allclose(saved.sum, one.sum, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(saved.expected, one.expected, rtol=1e-12, atol=1e-12)
            head_mean = VocabAttention.load(repo / f"data/tokens/aggregate/vocab_layer{layer}.npz")
            np.testing.assert_allclose(head_mean.sum, one.sum.mean(0), rtol=1e-12, atol=1e-12)


def test_training_matches_one_process(two_processes):
    """Each process takes its shard of every global batch and its share of the batch's
    mean loss, so without dropout 2 processes follow the one-process trajectory up to
    float rounding (Adam amplifies rounding only in near-zero gradients)."""
    repo, _ = two_processes
    import pandas as pd

    two = pd.read_csv(repo / "data/tokens/train/history.csv")
    one = pd.read_csv(repo / "single/tokens/train/history.csv")
    assert list(two.columns) == list(one.columns) and len(two) == len(one) == 3
    for col in ("train_loss", "test_loss", "test_perplexity"):
        np.testing.assert_allclose(two[col], one[col], rtol=1e-4)
    for col in ("train_accuracy", "test_accuracy"):
        np.testing.assert_allclose(two[col], one[col], atol=2e-3)
    # and not trivially: training moved the loss
    assert one["test_loss"].iloc[-1] < one["test_loss"].iloc[0] or one["train_loss"].iloc[-1] < one["train_loss"].iloc[0]
