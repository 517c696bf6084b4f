"""The end-to-end projects of tests/test_pipeline.py and tests/test_pipeline_more.py: the
real dvc.yaml and stages on a tiny configuration, in a temporary git + DVC repository, run
once per module by ``dvc repro`` under the stage tracer (tests/stagetrace), with MLflow
runs in the project's SQLite store.

The experiments are split between the two modules so that pytest-xdist's two workers
(``--dist loadfile``, both modules named first in the Makefile) each run half of them at
the same time; :func:`make_project` builds either half, and the checks every project
gets (stage deps, the index page, a second repro doing nothing) live here once.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from stagetrace.check import load_traces, missing_traces, tracer_env, uncovered
from user_models import CLIP_MODEL

ROOT = Path(__file__).resolve().parents[1]
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


def run_command(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_pipeline_params(repo: Path, experiments: list[str], externals: list[str]) -> dict:
    """``params.yaml`` cut down to seconds per stage, running ``experiments`` and the user
    models ``externals`` (clipnet, tokennet; their files are written into ``repo``)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("frames", "video"):
        params[name]["prepare"].update(n_train=64, n_test=16)
        params[name]["train"].update(epochs=1)
        params[name]["explain"].update(ig_steps=2, examples=1, samples=6)   # 6 of the 16 test clips
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
    params["motion"]["explain"].update(ig_steps=4, examples=2, samples=10)     # 10 of the 40 test recordings
    params["motion"]["evaluate"].update(steps=5)
    # a second instance of the motion kind, side by side: its own section, outputs and MLflow experiment
    params["motion_cls"] = {"kind": "motion", **copy.deepcopy(params["motion"])}
    params["motion_cls"]["model"]["pooling"] = "cls"
    params["motion_cls"]["explain"]["methods"] = ["raw", "rollout"]
    params["motion_cls"]["evaluate"]["ablation"] = False
    params["experiments"] = list(experiments)
    if externals:                         # user models trained elsewhere (kind: external), each watched through its directory
        users = _write_external_models(repo)
        params.update({name: users[name] for name in externals})
        params["externals"] = {name: name for name in externals}
    else:
        params["externals"] = {}
    return params


def make_project(tmp_path_factory, experiments: list[str], externals: list[str] = ()) -> tuple[Path, dict, Path]:
    """A git + DVC project of the tiny params with the first ``dvc repro`` done under the
    stage tracer: ``(repo, env, trace directory)``."""
    repo = tmp_path_factory.mktemp("proj")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "Makefile"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "src", ".dvc"):   # .dvc: config (analytics off) and the plot template
        shutil.copytree(ROOT / name, repo / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tmp", "cache"))
    params = tiny_pipeline_params(repo, list(experiments), list(externals))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    # two projects run at once (one per pytest worker) beside other tests: a stage on one
    # intra-op thread, not torch's default of one per core (four threads on two cores made
    # each project's first repro ~30 s longer)
    env["ATTNLAB_NUM_THREADS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ATTNLAB_ROOT", None)
    env["PYTHONPATH"] = str(repo / "src")     # the copy's code, not the editable install's
    run_command(["git", "init", "-q", "-b", "main"], repo, env)
    run_command(["git", "add", "-A"], repo, env)
    run_command(["git", "commit", "-qm", "tiny project"], repo, env)
    run_command([sys.executable, "-c", "from attnlab.tracking import init_store; init_store()"], repo, env)
    # the first repro runs every stage under the tracer (tests/stagetrace): what each
    # reads and runs is checked against its deps by check_every_stage_declares_what_it_uses
    traces = tmp_path_factory.mktemp("traces")
    # as `make run` runs it (attnlab.dvcrun: DVC writing dvc.lock faster); the later checks use plain dvc
    run_command([sys.executable, "-m", "attnlab.dvcrun", "repro"], repo,
                tracer_env(traces, src=repo / "src", base=env))
    return repo, env, traces


def mlflow_runs(repo, experiment="motion"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def stale_stages(repo, env):
    """The stages `dvc status` lists as changed."""
    status = run_command(["dvc", "status"], repo, env).stdout
    return {line.rstrip(":").strip() for line in status.splitlines() if line.rstrip().endswith(":")
            and not line.startswith("\t")}, status


# --------------------------------------------------------------------------- checks every project gets
def check_every_stage_declares_what_it_uses(project) -> None:
    """Every stage of every experiment, traced during the first `dvc repro`: each project
    file it read and each project source file whose code it ran is covered by its deps
    in dvc.yaml, so `dvc repro` never skips a stale stage."""
    repo, _, traces = project
    found = load_traces(traces)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    missing = missing_traces(found, repo / "dvc.yaml", params["experiments"], params["externals"])
    assert not missing, f"stages without a trace: {missing}"
    assert len(found) == 8 * len(params["experiments"]) + 7 * len(params["externals"]) + 1     # + index
    undeclared = uncovered(found, repo / "dvc.yaml", externals=params["externals"])
    assert not undeclared, "\n".join(undeclared)          # (no assertion rewriting outside test modules)


def check_index_page(project) -> None:
    """The index stage, after every track stage: one page linking every experiment's
    report, logged to each experiment's run, and nothing written under data/ (its own
    dependency: `dvc status` stays clean)."""
    repo, env, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    page = (repo / "reports" / "index.html").read_text()
    assert sorted(p.name for p in (repo / "reports").iterdir()) == ["index.html"]
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for name in [*params["experiments"], *params["externals"]]:
        assert f'href="../data/{name}/report/report.html"' in page, name
        client, _ = mlflow_runs(repo, name)
        run_id = json.loads((repo / "data" / name / "track" / "run.json").read_text())["run_id"]
        assert [a.path for a in client.list_artifacts(run_id, "index")] == ["index/index.html"], name
        assert run_id in page
    assert not list((repo / "data").glob("*/.timings/index.json")) and not (repo / "data" / "index").exists()
    assert "up to date" in run_command(["dvc", "status"], repo, env).stdout


def check_second_repro_does_nothing(project) -> None:
    repo, env, _ = project
    assert "Running stage" not in run_command(["dvc", "repro"], repo, env).stdout


def check_planted_evidence(project, name: str) -> None:
    """frames/video: 6 explained clips (explain.samples), evidence AUROC and pointing game."""
    repo, env, _ = project
    p = yaml.safe_load((repo / "params.yaml").read_text())[name]["prepare"]
    n_items = p["frames"] * (p["size"] // p["patch"]) ** 2 if name == "video" else p["frames"]
    data = repo / "data" / name
    explained = np.load(data / "explain" / "importance.npz")
    assert explained["rollout"].shape == (6, n_items)
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert {"auroc", "pointing_game"} == set(evaluated["evidence"])
    assert "random" in evaluated["evidence"]["auroc"] and "rollout" in evaluated["evidence"]["auroc"]
    assert len(list((data / "explain" / "figures").glob("*.png"))) == 1
    html = (data / "report" / "report.html").read_text()
    assert "Is the explanation faithful?" in html and "evidence AUROC" in html
