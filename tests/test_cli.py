"""`attnlab explain` on a model a user wrote and trained elsewhere, through the real
console entry point; and one test per error, each leaving the output directory empty."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.cli import main
from attnlab.store import AttentionReader
from user_models import CLIP_MODEL

BIN = Path(sys.executable).parent

USER_MODEL = CLIP_MODEL + '''

def not_a_model():
    return "a string"
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """What a user brings: the model's file, its trained weights, clips and labels."""
    d = tmp_path_factory.mktemp("user")
    (d / "my_model.py").write_text(USER_MODEL)
    sys.path.insert(0, str(d))
    try:
        import my_model
    finally:
        sys.path.remove(str(d))
    torch.manual_seed(0)
    model = my_model.make_model()
    torch.save(model.state_dict(), d / "model.pt")
    g = torch.Generator().manual_seed(1)
    np.save(d / "clips.npy", torch.randn(10, 6, 1, 8, 8, generator=g).numpy())
    np.save(d / "labels.npy", torch.randint(0, 3, (10,), generator=g).numpy())
    return d, model.eval()


def _mha(mha, h):
    """Head-wise softmax(q k^T / sqrt(d_head)) from the module's own weights; h [T, B, d]."""
    t, b, d = h.shape
    q, k, _ = torch.nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    q, k = (z.reshape(t, b * mha.num_heads, -1).transpose(0, 1) for z in (q, k))
    a = (q @ k.transpose(1, 2) / math.sqrt(d // mha.num_heads)).softmax(-1)
    return a.view(b, mha.num_heads, t, t)


def test_explain_a_users_model_through_the_console_command(user, tmp_path):
    d, model = user
    out = tmp_path / "explained"
    proc = subprocess.run([str(BIN / "attnlab"), "explain", "--model", f"{d / 'my_model.py'}:make_model",
                           "--weights", str(d / "model.pt"), "--inputs", str(d / "clips.npy"),
                           "--labels", str(d / "labels.npy"), "--out", str(out), "--batch-size", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    assert "Is the explanation faithful?" in html and "http://" not in html

    # the recorded attention equals a recomputation from the weights, layer by layer
    clips = torch.from_numpy(np.load(d / "clips.npy"))
    with torch.no_grad():
        h = model.embed(clips).transpose(0, 1)
        expected = []
        for layer in model.encoder.layers:
            expected.append(_mha(layer.self_attn, h))
            h = layer(h)
    with AttentionReader(out / "attention.h5") as reader:
        assert reader.names == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
        for i, want in enumerate(expected):
            torch.testing.assert_close(reader.entry(i)[:], want, atol=2e-3, rtol=0)   # stored float16

    metrics = json.loads((out / "metrics.json").read_text())
    methods = set(metrics["methods"])
    assert {"raw", "rollout", "grad_rollout", "input_x_gradient"} <= methods
    assert set(metrics["faithfulness"]["deletion_auc"]) == methods | {"random"}
    assert all(0.0 <= v <= 1.0 for v in metrics["faithfulness"]["insertion_auc"].values())
    assert {"strongest_sink", "most_diffuse", "mean_entropy"} <= set(metrics["heads"])
    with torch.no_grad():
        pred = model(clips).argmax(-1)
    assert metrics["accuracy"] == pytest.approx(float((pred == torch.from_numpy(np.load(d / "labels.npy"))).float().mean()))
    importance = np.load(out / "importance.npz")
    assert importance["rollout"].shape == (10, 6) and np.array_equal(importance["target"], pred.numpy())

    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and "Is the explanation faithful?" in (out / "report.html").read_text()


def _kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a by a literal loop over pairs (no ties in these AUCs)."""
    n, score = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            score += int(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]))
    return score / (n * (n - 1) / 2)


def test_explain_runs_the_pipelines_evaluation_sanity_road_and_intervals(user, tmp_path):
    """`attnlab explain` runs the pipeline's own evaluate stage: the deletion AUC equals a
    literal deletion loop over the stored importance, its interval holds it, ROAD's rank
    correlation is Kendall's tau of the two AUC tables, and the sanity check's verdicts
    follow its threshold; the report shows all of them."""
    d, model = user
    out = tmp_path / "explained"
    assert main(["explain", "--model", f"{d / 'my_model.py'}:make_model", "--weights", str(d / "model.pt"),
                 "--inputs", str(d / "clips.npy"), "--labels", str(d / "labels.npy"), "--out", str(out),
                 "--batch-size", "4", "--methods", "raw", "rollout", "input_x_gradient"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    faith, imp = metrics["faithfulness"], np.load(out / "importance.npz")
    clips = torch.from_numpy(np.load(d / "clips.npy"))
    target = torch.from_numpy(imp["target"])
    n, n_items = clips.shape[:2]
    for method in ("raw", "rollout", "input_x_gradient"):
        aucs = []
        for b in range(n):                       # remove the most important items first, one at a time
            order = sorted(range(n_items), key=lambda i: (-float(imp[method][b, i]), i))
            probs = []
            for k in range(n_items + 1):
                x = clips[b:b + 1].clone()
                x[0, order[:k]] = 0.0            # the external kind's baseline: 0
                with torch.no_grad():
                    probs.append(float(model(x).double().softmax(-1)[0, target[b]]))
            aucs.append(sum((probs[k] + probs[k + 1]) / 2 / n_items for k in range(n_items)))
        assert faith["deletion_auc"][method] == pytest.approx(float(np.mean(aucs)), abs=1e-6)
        ci = faith["deletion_auc_ci"][method]
        assert ci["lo"] <= faith["deletion_auc"][method] <= ci["hi"]
        assert 0.0 <= faith["deletion_auc_vs_random"][method]["p"] <= 1.0

    road = metrics["road"]                       # float inputs: ROAD's imputation applies
    methods = list(faith["deletion_auc"])
    assert set(road["deletion_auc"]) == set(methods) == {"raw", "rollout", "input_x_gradient", "random"}
    assert road["rank_correlation"] == pytest.approx(
        _kendall_tau([faith["deletion_auc"][m] for m in methods], [road["deletion_auc"][m] for m in methods]))
    assert road["same_ranking"] == (sorted(methods, key=faith["deletion_auc"].get) ==
                                    sorted(methods, key=road["deletion_auc"].get))

    sanity = metrics["sanity"]
    assert set(sanity["final"]) == {"raw", "rollout", "input_x_gradient"} and sanity["samples"] == n
    assert sanity["passed"] == {m: v < sanity["threshold"] for m, v in sanity["final"].items()}
    assert sanity["blocks"] and all(set(v) == set(sanity["blocks"]) for v in sanity["independent"].values())

    html = (out / "report.html").read_text()
    for heading in ("Is the explanation faithful?", "Does the explanation depend on the model?", "ROAD",
                    "What the heads do"):
        assert heading in html, heading


def test_explain_without_labels_explains_the_prediction(user, tmp_path):
    d, model = user
    out = tmp_path / "explained"
    assert main(["explain", "--model", f"{d / 'my_model.py'}:make_model", "--weights", str(d / "model.pt"),
                 "--inputs", str(d / "clips.npy"), "--out", str(out), "--methods", "rollout"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy" not in metrics
    # no labels: head ablation measures the drop in confidence in the prediction, not in accuracy
    heads = pd.read_csv(out / "results" / "heads.csv")
    assert heads["prob_drop"].notna().all() and heads["accuracy_drop"].isna().all()
    assert metrics["heads"]["most_important"]["prob_drop"] == pytest.approx(heads["prob_drop"].max(), rel=1e-5)
    with torch.no_grad():
        pred = model(torch.from_numpy(np.load(d / "clips.npy"))).argmax(-1)
    assert np.array_equal(np.load(out / "importance.npz")["target"], pred.numpy())
    assert "No labels were given" in (out / "report.html").read_text()


def test_help_is_complete_and_shows_an_example():
    for argv in (["--help"], ["explain", "--help"], ["report", "--help"]):
        proc = subprocess.run([str(BIN / "attnlab"), *argv], capture_output=True, text=True)
        assert proc.returncode == 0 and "example:" in proc.stdout and "attnlab " in proc.stdout, argv
    explain_help = subprocess.run([str(BIN / "attnlab"), "explain", "--help"], capture_output=True, text=True).stdout
    for flag in ("--model", "--weights", "--inputs", "--labels", "--tokens", "--vocab", "--out", "--methods",
                 "--readout", "--batch-size"):
        assert flag in explain_help


NO_ATTENTION = '''
import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 8)
        self.attn = SelfAttention(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(self.proj(x)).mean(1))


def make_model():
    return Fused()
'''


@pytest.mark.parametrize("case", ["no_file", "no_factory", "not_a_module", "mismatch", "no_attention",
                                  "rejected", "labels", "nan", "rank", "long_line", "not_utf8", "unknown_tokens",
                                  "empty_tokens", "empty_array"])
def test_each_error_names_the_problem_and_writes_nothing(user, tmp_path, capsys, case):
    d, _ = user
    out = tmp_path / "out"
    (tmp_path / "fused.py").write_text(NO_ATTENTION)
    np.save(tmp_path / "seq.npy", np.zeros((4, 5, 2), dtype=np.float32))
    np.save(tmp_path / "three.npy", np.zeros(3, dtype=np.int64))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    np.save(tmp_path / "nan.npy", np.full((4, 5, 2), np.nan, dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 2), dtype=np.float32))
    (tmp_path / "vocab.txt").write_text("<pad>\n<unk>\nthe\ncat\n")
    (tmp_path / "long.txt").write_text("the cat\n" + "the " * 30_000 + "\n")
    (tmp_path / "latin1.txt").write_bytes("the cat\nthe caf\xe9\n".encode("latin-1"))
    (tmp_path / "unknown.txt").write_text("dog bird\nfish\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    tokens = lambda name: ["--model", model, "--tokens", str(tmp_path / name), "--vocab", str(tmp_path / "vocab.txt")]
    model, inputs = f"{d / 'my_model.py'}:make_model", ["--inputs", str(d / "clips.npy")]
    argv, expected = {
        "no_file": (["--model", f"{tmp_path / 'nowhere.py'}:make_model", *inputs],
                    f"no such file '{tmp_path / 'nowhere.py'}'"),
        "no_factory": (["--model", f"{d / 'my_model.py'}:build_it", *inputs],
                       f"{d / 'my_model.py'} has no callable 'build_it'"),
        "not_a_module": (["--model", f"{d / 'my_model.py'}:not_a_model", *inputs],
                         "the factory returned a str, expected a torch.nn.Module"),
        "mismatch": (["--model", model, "--weights", str(tmp_path / "other.pt"), *inputs],
                     "does not match the model: missing 'cnn.0.weight' (+"),
        "no_attention": (["--model", f"{tmp_path / 'fused.py'}:make_model", "--inputs", str(tmp_path / "seq.npy")],
                         "Fused has modules that look like attention but that no adapter records: "
                         "'attn' (SelfAttention"),
        "rejected": (["--model", model, "--inputs", str(tmp_path / "seq.npy")],
                     "the model rejected inputs of shape [4, 5, 2] (the first two samples): "),
        "labels": (["--model", model, *inputs, "--labels", str(tmp_path / "three.npy")],
                   "3 labels for 10 inputs"),
        "nan": (["--model", model, "--inputs", str(tmp_path / "nan.npy")], f"--inputs '{tmp_path / 'nan.npy'}': "
                "holds NaN or Inf"),
        "rank": (["--model", model, "--inputs", str(tmp_path / "flat.npy")],
                 "shape [4]; expected [N, items, ...] (samples, then the items explained"),
        "empty_array": (["--model", model, "--inputs", str(tmp_path / "empty.npy")], "empty array of shape (0, 5, 2)"),
        "long_line": (tokens("long.txt"), f"--tokens: {tmp_path / 'long.txt'}, line 2: longer than 100,000 "
                      "characters"),
        "not_utf8": (tokens("latin1.txt"), f"--tokens: {tmp_path / 'latin1.txt'}, line 2: not UTF-8 (byte 0xe9"),
        "unknown_tokens": (tokens("unknown.txt"), "none of its tokens is in the vocabulary (e.g. 'dog')"),
        "empty_tokens": (tokens("blank.txt"), f"--tokens: {tmp_path / 'blank.txt'}: no sequences"),
    }[case]
    assert main(["explain", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not out.exists() or not any(out.iterdir())
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())       # no temporary left either


TOKEN_MODEL = '''
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                             num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0).mean(1))


def make_model():
    return Tagger()
'''


def test_token_text_with_a_vocabulary_gives_the_vocabulary_matrices(tmp_path):
    from attnlab import AttentionRecorder, VocabAttention

    (tmp_path / "tagger.py").write_text(TOKEN_MODEL)
    (tmp_path / "vocab.txt").write_text("<pad>\n<unk>\nthe\ncat\nsat\non\nmat\n")
    (tmp_path / "text.txt").write_text("the cat sat\nthe mat\non the cat dog\n")       # 'dog' is unknown
    out = tmp_path / "out"
    assert main(["explain", "--model", f"{tmp_path / 'tagger.py'}:make_model", "--tokens", str(tmp_path / "text.txt"),
                 "--vocab", str(tmp_path / "vocab.txt"), "--out", str(out)]) == 0
    ids = torch.tensor([[2, 3, 4, 0], [2, 6, 0, 0], [5, 2, 3, 1]])                   # padded with <pad> = 0
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("tagger_again", tmp_path / "tagger.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make_model().eval()
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(ids)
    expected = VocabAttention(7).update(ids, rec.attentions[0], mask=ids != 0)
    got = VocabAttention.load(out / "vocab_layer0.npz")
    np.testing.assert_array_equal(got.count, expected.count)
    np.testing.assert_allclose(got.sum, expected.sum, atol=2e-3)                    # stored float16
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vocabulary"] == {"views": ["layer0"], "vocab_size": 7}
    assert "input_x_gradient" not in metrics["methods"]                              # token ids: no input gradients
    assert "Which token attends to which (layer0)" in (out / "report.html").read_text()


def test_own_model_example_runs_as_written(tmp_path):
    """docs/own-model.md's `attnlab explain` block, run verbatim by bash (tests/docblocks.py)
    in an empty directory whose `.venv` is this environment."""
    import docblocks

    docblocks.run_bash("own-model-explain", tmp_path)
    out = tmp_path / "byom" / "explained"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 20 and "accuracy" in metrics and "heads" in metrics
    assert (out / "report.html").is_file()
