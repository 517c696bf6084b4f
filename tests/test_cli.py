"""`attnlab explain` on a model a user wrote and trained elsewhere, through the real
console entry point; and one test per error, each leaving the output directory empty."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.cli import main
from attnlab.store import AttentionReader

BIN = Path(sys.executable).parent

USER_MODEL = '''
import torch
from torch import nn


class ClipClassifier(nn.Module):
    """A CNN per frame, then nn.TransformerEncoder with batch_first=False, mean pooling."""

    def __init__(self, n_classes=3, d=16):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(16, d))
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def embed(self, clips):                       # [B, T, 1, H, W] -> [B, T, d]
        b, t = clips.shape[:2]
        return self.cnn(clips.flatten(0, 1)).view(b, t, -1)

    def forward(self, clips):
        h = self.encoder(self.embed(clips).transpose(0, 1))     # [T, B, d]
        return self.head(h.mean(0))


def make_model():
    return ClipClassifier()


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
                                  "rejected", "labels"])
def test_each_error_names_the_problem_and_writes_nothing(user, tmp_path, capsys, case):
    d, _ = user
    out = tmp_path / "out"
    (tmp_path / "fused.py").write_text(NO_ATTENTION)
    np.save(tmp_path / "seq.npy", np.zeros((4, 5, 2), dtype=np.float32))
    np.save(tmp_path / "three.npy", np.zeros(3, dtype=np.int64))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
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
                         "Fused has no nn.MultiheadAttention or AttentionProbs module to record; modules that "
                         "look like attention: attn (SelfAttention)"),
        "rejected": (["--model", model, "--inputs", str(tmp_path / "seq.npy")],
                     "the model rejected inputs of shape [4, 5, 2] (the first two samples): "),
        "labels": (["--model", model, *inputs, "--labels", str(tmp_path / "three.npy")],
                   "3 labels for 10 inputs"),
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


def test_readme_own_model_example_runs_as_written(tmp_path):
    """The README's 'Use it on your own model' block, run verbatim by bash in a copy of the
    project layout (its `. .venv/bin/activate` finds this environment)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use it on your own model"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("\n```\n")]
    (tmp_path / ".venv").symlink_to(BIN.parent)
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "byom" / "explained"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 20 and "accuracy" in metrics and "heads" in metrics
    assert (out / "report.html").is_file()
