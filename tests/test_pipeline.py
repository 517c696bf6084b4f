"""End to end: the real dvc.yaml and stages on a tiny configuration, in a temporary
git + DVC repository, with MLflow runs checked in the project's SQLite store."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from stagetrace.check import load_traces, missing_traces, tracer_env, uncovered
from user_models import CLIP_MODEL

ROOT = Path(__file__).resolve().parents[1]
# the fixture runs the whole tiny pipeline (under the stage tracer) before the first test
pytestmark = pytest.mark.timeout(1800)
BIN = Path(sys.executable).parent

# Two models "trained elsewhere", written as a user would: CLIP_MODEL (a CNN per frame
# then nn.TransformerEncoder, batch_first=False, no class token) on clips, and a token
# classifier around a batch-first nn.MultiheadAttention; the weights are random.
TOKEN_MODEL = """
from torch import nn


class TokenClassifier(nn.Module):
    def __init__(self, vocab_size, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, ids):
        h = self.embed(ids)
        out, _ = self.attn(h, h, h, key_padding_mask=ids == 0)
        return self.head(out.mean(1))
"""


def _write_external_models(repo: Path) -> dict:
    """The user's files in clipnet/ and tokennet/ (committed, so queued experiments see them), and their params sections."""
    import torch

    rng = np.random.default_rng(0)
    (repo / "clipnet").mkdir()
    (repo / "clipnet" / "my_model.py").write_text(CLIP_MODEL)
    np.save(repo / "clipnet" / "clips.npy", rng.random((12, 5, 1, 8, 8), dtype=np.float32))
    np.save(repo / "clipnet" / "labels.npy", rng.integers(0, 3, 12))
    evidence = np.zeros((12, 5), bool)
    evidence[:, 1] = True
    np.save(repo / "clipnet" / "evidence.npy", evidence)
    (repo / "tokennet").mkdir()
    (repo / "tokennet" / "model.py").write_text(TOKEN_MODEL)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(10)]
    (repo / "tokennet" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    lines = [" ".join(f"w{j}" for j in rng.integers(0, 10, rng.integers(3, 9))) for _ in range(30)]
    (repo / "tokennet" / "texts.txt").write_text("\n".join(lines) + "\n")
    np.save(repo / "tokennet" / "labels.npy", rng.integers(0, 2, 30))
    namespace: dict = {}
    for directory, source, factory, kwargs in (("clipnet", CLIP_MODEL, "make_model", {}),
                                                ("tokennet", TOKEN_MODEL, "TokenClassifier", {"vocab_size": 12})):
        exec(compile(source, directory, "exec"), namespace)
        torch.manual_seed(0)
        torch.save(namespace[factory](**kwargs).state_dict(), repo / directory / "model.pt")
    stages = {"extract": {}, "aggregate": {"min_count": 1}, "explain": {"ig_steps": 2, "examples": 1},
              "evaluate": {"steps": 3}, "report": {"examples": 1}}
    return {
        "clipnet": {"kind": "external", "model": {"factory": "clipnet/my_model.py:make_model", "weights": "clipnet/model.pt"},
                    "prepare": {"inputs": ["clipnet/clips.npy"], "labels": "clipnet/labels.npy",
                                "evidence": "clipnet/evidence.npy"}, **copy.deepcopy(stages)},
        "tokennet": {"kind": "external", "model": {"factory": "tokennet/model.py:TokenClassifier",
                                                   "kwargs": {"vocab_size": 12}, "weights": "tokennet/model.pt"},
                     "prepare": {"tokens": "tokennet/texts.txt", "vocab": "tokennet/vocab.txt",
                                 "labels": "tokennet/labels.npy"}, **copy.deepcopy(stages)}}


def _run(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("proj")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "Makefile"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "src", ".dvc"):   # .dvc: config (analytics off) and the plot template
        shutil.copytree(ROOT / name, repo / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tmp", "cache"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"] = ["motion", "tokens", "frames", "video", "fusion"]
    for name in ("frames", "video"):
        params[name]["prepare"].update(n_train=64, n_test=16)
        params[name]["train"].update(epochs=1)
        params[name]["explain"].update(ig_steps=2, examples=1)
        params[name]["evaluate"].update(steps=3)
        params[name]["evaluate"]["sanity"]["samples"] = 4    # every method explained again per randomised block
    params["fusion"]["train"].update(epochs=1)
    params["fusion"]["explain"].update(ig_steps=2)
    params["tokens"]["prepare"].update(n=300, max_len=16)
    params["tokens"]["model"].update(d_model=16, nhead=2, num_layers=2, dim_feedforward=32)
    params["tokens"]["train"].update(epochs=1)
    params["tokens"]["aggregate"].update(min_count=1)
    params["tokens"]["report"].update(heatmap_tokens=10)
    params["motion"]["model"].update(d_model=16, nhead=2, num_layers=2, dim_feedforward=32)
    params["motion"]["train"].update(epochs=3, batch_size=20)
    params["motion"]["report"]["examples"] = 2
    params["motion"]["explain"].update(ig_steps=4, examples=2)
    params["motion"]["evaluate"].update(steps=5)
    # a second instance of the motion kind, side by side: its own section, outputs and MLflow experiment
    params["motion_cls"] = {"kind": "motion", **copy.deepcopy(params["motion"])}
    params["motion_cls"]["model"]["pooling"] = "cls"
    params["motion_cls"]["explain"]["methods"] = ["raw", "rollout"]
    params["motion_cls"]["evaluate"]["ablation"] = False
    params["experiments"].append("motion_cls")
    # two user models trained elsewhere (kind: external), each watched through its directory
    params.update(_write_external_models(repo))
    params["externals"] = {"clipnet": "clipnet", "tokennet": "tokennet"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ATTNLAB_ROOT", None)
    env["PYTHONPATH"] = str(repo / "src")     # the copy's code, not the editable install's
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny project"], repo, env)
    _run([sys.executable, "-c", "from attnlab.tracking import init_store; init_store()"], repo, env)
    # the first repro runs every stage under the tracer (tests/stagetrace): what each
    # reads and runs is checked against its deps in test_every_stage_declares_what_it_uses
    traces = tmp_path_factory.mktemp("traces")
    _run(["dvc", "repro"], repo, tracer_env(traces, src=repo / "src", base=env))
    return repo, env, traces


def _runs(repo, experiment="motion"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def _stale(repo, env):
    """The stages `dvc status` lists as changed."""
    status = _run(["dvc", "status"], repo, env).stdout
    return {line.rstrip(":").strip() for line in status.splitlines() if line.rstrip().endswith(":")
            and not line.startswith("\t")}, status


def test_repro_produces_every_output(project):
    repo, env, _ = project
    data = repo / "data" / "motion"
    metrics = json.loads((data / "train" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_macro_f1" in metrics
    history = (data / "train" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 1 + 3
    import h5py
    with h5py.File(data / "extract" / "attention.h5") as f:
        shapes = sorted({f[k].shape for k in f})
        dtypes = {f[k].dtype for k in f}
    assert shapes == [(40, 2, 100, 100)] and len(list(data.glob("extract/attention.h5"))) == 1
    assert {str(d) for d in dtypes} == {"float16"}
    explained = np.load(data / "explain" / "importance.npz")
    methods = {"raw", "received", "rollout", "grad_rollout", "flow", "alti", "attnlrp", "value_zeroing", "knockout",
               "input_x_gradient", "integrated_gradients"}
    assert set(explained.files) == methods | {"target", "y"}
    for m in methods:
        assert explained[m].shape == (40, 100)
        np.testing.assert_allclose(explained[m].sum(1), 1.0, rtol=1e-4)
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert set(evaluated["faithfulness"]["deletion_auc"]) == methods | {"random"}
    assert {"strongest_sink", "most_important"} <= set(evaluated["heads"])
    assert (data / "evaluate" / "deletion.csv").read_text().startswith("fraction,")
    html = (data / "report" / "report.html").read_text()
    assert "Is the explanation faithful?" in html and "the strongest sink" in html
    assert html.count("data:image/png;base64,") >= 4
    assert "http://" not in html and "https://" not in html        # opens offline
    status = _run(["dvc", "status"], repo, env).stdout
    assert "up to date" in status


def test_every_stage_declares_what_it_uses(project):
    """Every stage of every experiment, traced during the first `dvc repro`: each project
    file it read and each project source file whose code it ran is covered by its deps
    in dvc.yaml, so `dvc repro` never skips a stale stage."""
    repo, _, traces = project
    found = load_traces(traces)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert missing_traces(found, repo / "dvc.yaml", params["experiments"], params["externals"]) == []
    assert len(found) == 8 * len(params["experiments"]) + 7 * len(params["externals"]) + 1     # + index
    assert uncovered(found, repo / "dvc.yaml", externals=params["externals"]) == []


def test_index_page_covers_every_experiment_and_is_logged_to_each_run(project):
    """The index stage, after every track stage: one page linking every experiment's
    report, logged to each experiment's run, and nothing written under data/ (its own
    dependency: `dvc status` stays clean, see test_repro_produces_every_output)."""
    repo, env, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    page = (repo / "reports" / "index.html").read_text()
    assert sorted(p.name for p in (repo / "reports").iterdir()) == ["index.html"]
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for name in [*params["experiments"], *params["externals"]]:
        assert f'href="../data/{name}/report/report.html"' in page, name
        client, _ = _runs(repo, name)
        run_id = json.loads((repo / "data" / name / "track" / "run.json").read_text())["run_id"]
        assert [a.path for a in client.list_artifacts(run_id, "index")] == ["index/index.html"], name
        assert run_id in page
    assert not list((repo / "data").glob("*/.timings/index.json")) and not (repo / "data" / "index").exists()


def test_editing_library_code_makes_its_stages_stale(project):
    """A library file only the aggregate stage runs: editing it makes aggregate@tokens
    (and only the stages that run it) stale in `dvc status`; undoing the edit makes
    the pipeline up to date again."""
    repo, env, _ = project
    path = repo / "src" / "attnlab" / "aggregate_views.py"
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        stale, status = _stale(repo, env)
    finally:
        path.write_text(original)
    assert "aggregate@tokens" in stale, status
    assert not any(s.startswith(("train@", "prepare@", "explain@")) for s in stale), status
    assert "up to date" in _run(["dvc", "status"], repo, env).stdout


def test_two_instances_of_one_kind_run_side_by_side(project):
    """motion and motion_cls (kind: motion, class-token pooling) through the real dvc.yaml:
    two MLflow experiments, each run with its own params, and separate outputs."""
    repo, env, _ = project
    _, motion = _runs(repo, "motion")
    _, motion_cls = _runs(repo, "motion_cls")
    assert len(motion_cls) == 1 and len(motion) >= 1
    assert motion_cls[0].data.params["model.pooling"] == "cls" and motion_cls[0].data.params["kind"] == "motion"
    assert {r.data.params["model.pooling"] for r in motion} == {"mean"} and "kind" not in motion[0].data.params
    evaluated = json.loads((repo / "data" / "motion_cls" / "evaluate" / "metrics.json").read_text())
    assert set(evaluated["faithfulness"]["deletion_auc"]) == {"raw", "rollout", "random"}
    import h5py
    with h5py.File(repo / "data" / "motion_cls" / "extract" / "attention.h5") as f:
        assert {f[k].shape for k in f} == {(40, 2, 101, 101)}            # the class token is a position
    assert "attnlab — motion_cls (motion)" in (repo / "data" / "motion_cls" / "report" / "report.html").read_text()


def test_tokens_vocab_attention_outputs(project):
    repo, env, _ = project
    data = repo / "data" / "tokens"
    from attnlab.aggregate import VocabAttention
    meta = json.loads((data / "prepare" / "meta.json").read_text())
    summary = json.loads((data / "aggregate" / "summary.json").read_text())
    assert summary["views"] == ["layer0"] and summary["headline"] == "layer0"
    agg = VocabAttention.load(data / "aggregate" / "vocab_layer0.npz")
    assert agg.sum.shape == (len(meta["vocab"]),) * 2
    pad = meta["vocab"].index("<pad>")
    assert agg.count[pad].sum() == 0 and agg.count[:, pad].sum() == 0      # padding never counted
    top = (data / "aggregate" / "top_pairs_layer0.csv").read_text().splitlines()
    assert top[0].startswith("query_id,key_id,query_token,key_token")
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= evaluated["planted"]["recall_at_k"] <= 1.0
    assert {"raw", "rollout", "random"} <= set(evaluated["faithfulness"]["deletion_auc"])
    assert "rollout" in evaluated["evidence"]["auroc"]
    assert (data / "evaluate" / "deletion.csv").read_text().startswith("fraction,method,probability")
    assert "Which token attends to which" in (data / "report" / "report.html").read_text()
    for name in ("motion", "frames", "video", "fusion"):       # no vocabulary: nothing aggregated, and said so
        assert json.loads((repo / "data" / name / "aggregate" / "summary.json").read_text())["vocabulary"] is False


def test_external_models_run_through_the_pipeline(project):
    """Two user models (kind: external) through the real dvc.yaml: the recorded attention
    of the clip model equals a recomputation from its weights, the evaluation holds every
    method's faithfulness and evidence scores, the token model's attention is aggregated
    over its vocabulary, and each is one MLflow run whose model is logged by reference."""
    import hashlib

    import h5py
    import torch

    repo, env, _ = project
    data = repo / "data" / "clipnet"
    namespace: dict = {}
    exec(compile(CLIP_MODEL, "clipnet", "exec"), namespace)
    model = namespace["make_model"]()
    model.load_state_dict(torch.load(repo / "clipnet" / "model.pt", weights_only=True))
    model.eval()
    clips = torch.from_numpy(np.load(repo / "clipnet" / "clips.npy"))
    with torch.no_grad():
        x = model.cnn(clips.flatten(0, 1)).view(12, 5, -1).transpose(0, 1)        # [T, B, d]
        expected = []
        for layer in model.encoder.layers:                                         # post-norm layers
            q, k, _ = torch.nn.functional.linear(x, layer.self_attn.in_proj_weight,
                                                 layer.self_attn.in_proj_bias).chunk(3, -1)
            q = q.view(5, 12, 2, 8).permute(1, 2, 0, 3)
            k = k.view(5, 12, 2, 8).permute(1, 2, 0, 3)
            expected.append((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1))
            x = layer(x)
    with h5py.File(data / "extract" / "attention.h5") as f:
        stored = [torch.from_numpy(f[k][:].astype(np.float32)) for k in sorted(f)]   # "00.name", "01.name"
    assert len(stored) == 2
    for got, want in zip(stored, expected):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    methods = {"raw", "received", "rollout", "grad_rollout", "flow", "input_x_gradient", "integrated_gradients"}
    assert set(evaluated["faithfulness"]["deletion_auc"]) == methods | {"random"}
    assert set(evaluated["evidence"]["auroc"]) == methods | {"random"}
    assert {"strongest_sink", "most_important"} <= set(evaluated["heads"])
    labels = np.load(repo / "clipnet" / "labels.npy")
    predicted = model(clips).argmax(-1).numpy()
    assert evaluated["accuracy"] == pytest.approx(float((predicted == labels).mean()))
    html = (data / "report" / "report.html").read_text()
    assert "clipnet/my_model.py:make_model" in html and "Is the explanation faithful?" in html

    summary = json.loads((repo / "data" / "tokennet" / "aggregate" / "summary.json").read_text())
    assert summary["vocabulary"] is True and summary["vocab_size"] == 12
    from attnlab.aggregate import VocabAttention
    agg = VocabAttention.load(repo / "data" / "tokennet" / "aggregate" / "vocab_layer0.npz")
    assert agg.count[0].sum() == 0 and agg.count[:, 0].sum() == 0           # <pad> never counted
    assert "Which token attends to which" in (repo / "data" / "tokennet" / "report" / "report.html").read_text()

    client, runs = _runs(repo, "clipnet")
    assert len(runs) == 1
    run = runs[0]
    digest = hashlib.sha256((repo / "clipnet" / "model.pt").read_bytes()).hexdigest()
    assert run.data.params["model.factory"] == "clipnet/my_model.py:make_model"
    assert run.data.params["model.weights_sha256"] == digest and run.data.params["kind"] == "external"
    assert run.data.metrics["evaluate.faithfulness.deletion_auc.rollout"] == pytest.approx(
        evaluated["faithfulness"]["deletion_auc"]["rollout"])
    assert not any(k.startswith("final.") for k in run.data.metrics)         # nothing was trained here
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    assert logged == ["model/model_reference.json"]                          # by reference, not pickled
    assert len(_runs(repo, "tokennet")[1]) == 1


def test_editing_a_users_file_makes_only_its_stages_stale(project):
    """New weights in clipnet/ (the directory externals names for clipnet): every clipnet
    stage that builds the model is stale, nothing else is; restoring them undoes it."""
    repo, env, _ = project
    path = repo / "clipnet" / "model.pt"
    original = path.read_bytes()
    import torch
    state = torch.load(path, weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, path)
    try:
        stale, status = _stale(repo, env)
    finally:
        path.write_bytes(original)
    assert stale == {f"external-{s}@clipnet" for s in ("prepare", "extract", "explain", "evaluate", "report",
                                                        "track")}, status
    assert "up to date" in _run(["dvc", "status"], repo, env).stdout


@pytest.mark.parametrize("name", ["frames", "video"])
def test_planted_evidence_experiments(project, name):
    repo, env, _ = project
    p = yaml.safe_load((repo / "params.yaml").read_text())[name]["prepare"]
    n_items = p["frames"] * (p["size"] // p["patch"]) ** 2 if name == "video" else p["frames"]
    data = repo / "data" / name
    explained = np.load(data / "explain" / "importance.npz")
    assert explained["rollout"].shape == (16, n_items)
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert {"auroc", "pointing_game"} == set(evaluated["evidence"])
    assert "random" in evaluated["evidence"]["auroc"] and "rollout" in evaluated["evidence"]["auroc"]
    assert len(list((data / "explain" / "figures").glob("*.png"))) == 1
    html = (data / "report" / "report.html").read_text()
    assert "Is the explanation faithful?" in html and "evidence AUROC" in html


def test_second_repro_does_nothing(project):
    repo, env, _ = project
    out = _run(["dvc", "repro"], repo, env).stdout
    assert "Running stage" not in out


def test_same_params_and_seed_give_identical_outputs(project):
    """Every motion stage re-run from scratch (`dvc repro --force`) on the same machine
    gives byte-identical outputs: the same `dvc.lock` hashes (track's run id aside, the
    state it logs is the same run), hence the same metrics, attention and report."""
    repo, env, _ = project

    def outs():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {(name, o["path"]): o["md5"] for name, stage in lock.items()
                if name.endswith("@motion") and not name.startswith("track@") for o in stage.get("outs", [])}

    before = outs()
    assert len(before) >= 8
    run = json.loads((repo / "data/motion/track/run.json").read_text())
    out = _run(["dvc", "repro", "--force", "track@motion"], repo, env).stdout
    assert "Running stage 'train@motion'" in out
    assert outs() == before
    assert json.loads((repo / "data/motion/track/run.json").read_text()) == run      # the same state: not logged again


def test_mlflow_run_holds_params_metrics_model_attention(project):
    repo, env, _ = project
    client, runs = _runs(repo)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.epochs"] == "3" and run.data.params["model.d_model"] == "16"
    metrics = json.loads((repo / "data/motion/train/metrics.json").read_text())
    assert run.data.metrics["final.test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 3
    evaluated = json.loads((repo / "data/motion/evaluate/metrics.json").read_text())
    assert run.data.metrics["evaluate.faithfulness.deletion_auc.rollout"] == pytest.approx(
        evaluated["faithfulness"]["deletion_auc"]["rollout"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"attention", "explain", "evaluate", "report"} <= arts
    import mlflow.pytorch
    from attnlab.models import EncoderClassifier
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert type(model) is EncoderClassifier
    head = _run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert run.data.tags["git.commit"] == head
    assert run.data.tags["dvc.exp_name"] == "workspace"
    assert {"dvc.lock.prepare", "dvc.lock.train", "dvc.lock.extract"} <= set(run.data.tags)
    recorded = json.loads((repo / "data/motion/track/run.json").read_text())
    assert recorded["run_id"] == run.info.run_id


def test_exp_run_with_changed_param_makes_second_run(project):
    repo, env, _ = project
    _run(["dvc", "exp", "run", "-S", "motion.train.epochs=4", "--name", "longer"], repo, env)
    client, runs = _runs(repo)
    assert len(runs) == 2
    assert len(_runs(repo, "tokens")[1]) == 1                   # tokens' state did not change
    by_epochs = {r.data.params["train.epochs"]: r for r in runs}
    assert set(by_epochs) == {"3", "4"}
    assert by_epochs["4"].data.tags["dvc.exp_name"] == "longer"
    assert all("final.test_accuracy" in r.data.metrics for r in runs)


def test_fusion_outputs_and_queued_sweep_over_modes(project):
    """The fusion experiment's weights and report; then the README's `make sweep`: one
    queued `dvc exp run` per fusion mode, `dvc queue start -j 2`, each its own MLflow run
    (two modes: one per worker, run at the same time)."""
    repo, env, _ = project
    data = repo / "data" / "fusion"
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert evaluated["fusion"] == "attention" and evaluated["weights"]["informative"] is not None
    assert set(evaluated["faithfulness"]["deletion_auc"]) == {"weights", "input_x_gradient",
                                                               "integrated_gradients", "random"}
    weights = np.load(data / "extract" / "weights.npz")["weights"]
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
    assert "Which stream does the fusion weigh?" in (data / "report" / "report.html").read_text()

    # the README's `make sweep`: 2 param sets queued, run by 2 workers sharing the cores
    # (-o: the environment is the test's own venv; it is not rebuilt in the copy)
    venv = BIN.parent
    _run(["make", "-o", f"{venv}/.installed", f"VENV={venv}", "sweep", "PARAM=fusion.model.fusion",
          "VALUES=sum scalar", "EXPERIMENTS=fusion", "JOBS=2"], repo, env)
    status = _run(["dvc", "queue", "status"], repo, env).stdout
    assert status.count("Success") == 2 and "Failed" not in status, status
    client, runs = _runs(repo, "fusion")
    by_mode = {r.data.params["model.fusion"]: r for r in runs}
    assert set(by_mode) == {"attention", "sum", "scalar"} and len(runs) == 3
    per_worker = max(1, len(os.sched_getaffinity(0)) // 2)     # the Makefile's cores / JOBS
    for mode, run in by_mode.items():
        assert "evaluate.weights.mean.appearance" in run.data.metrics, mode
        if mode != "attention":            # a queued worker's stages ran with their share of the cores
            for stage in ("train", "explain", "evaluate"):
                assert run.data.tags[f"attnlab.stage.{stage}"].endswith(
                    f", 1 process x {per_worker} thread{'s' if per_worker > 1 else ''}"), (mode, run.data.tags)
        assert run.data.tags.get("dvc.exp_name") or mode == "attention", mode
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report", "evaluate", "checkpoint"} <= artifacts, (mode, artifacts)
    assert len({r.data.tags.get("dvc.exp_name") for r in runs}) == 3
    assert by_mode["sum"].data.metrics["evaluate.weights.mean.appearance"] == pytest.approx(0.5)

