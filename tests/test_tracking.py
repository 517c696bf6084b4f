"""MLflow tracking: one complete run per pipeline state, through SQLite and a real server."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnlab import tracking
from attnlab.models import EncoderClassifier


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.init_store()
    return tmp_path


def _outputs(root: Path, value: float) -> list[Path]:
    (root / "out").mkdir(exist_ok=True)
    (root / "out" / "metrics.json").write_text(f'{{"acc": {value}}}')
    return [root / "out" / "metrics.json"]


def _log(root, params, value=0.5, model=None, artifacts=None):
    history = pd.DataFrame({"epoch": [1, 2, 3], "test_accuracy": [0.2, 0.4, value]})
    return tracking.log_pipeline_run("demo", params=params, metrics={"final.acc": value},
                                     files=_outputs(root, value), history=history, model=model,
                                     artifacts=artifacts or {"out": root / "out"})


def test_run_holds_params_history_metrics_model_artifacts(store):
    torch.manual_seed(0)
    model = EncoderClassifier(6, 4, d_model=8, nhead=2, num_layers=1, dim_feedforward=16).eval()
    run_id, created = _log(store, {"train.lr": 0.1, "model.pooling": "mean"}, model=model)
    assert created
    client = tracking.MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.1", "model.pooling": "mean"}
    assert run.data.metrics["final.acc"] == 0.5
    hist = client.get_metric_history(run_id, "test_accuracy")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 0.2), (2, 0.4), (3, 0.5)]
    assert run.data.tags["dvc.exp_name"] == "workspace"
    assert run.data.tags["attnlab.state_key"]
    # artifacts live beside the store, at an absolute location
    assert (store / "mlartifacts" / "demo").is_dir()
    assert [a.path for a in client.list_artifacts(run_id, "out")] == ["out/metrics.json"]
    # the model comes back as the original class, with the same outputs
    import mlflow.pytorch
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert type(loaded) is EncoderClassifier
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(loaded.eval()(x), model(x))


def test_same_state_is_logged_once_and_changed_param_makes_new_run(store):
    first, created1 = _log(store, {"train.lr": 0.1})
    again, created2 = _log(store, {"train.lr": 0.1})
    assert (again, created2) == (first, False)
    second, created3 = _log(store, {"train.lr": 0.2}, value=0.7)
    assert created3 and second != first
    runs = tracking.find_runs("demo")
    assert sorted(runs["params.train.lr"]) == ["0.1", "0.2"]
    assert sorted(runs["metrics.final.acc"]) == [0.5, 0.7]


def test_failure_leaves_no_half_logged_run(store):
    with pytest.raises(Exception):
        _log(store, {"train.lr": 0.3}, artifacts={"missing": store / "does-not-exist.bin"})
    client = tracking.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name("demo")
    assert client.search_runs([exp.experiment_id]) == []          # active runs: none
    # the retry succeeds and is the only run
    run_id, created = _log(store, {"train.lr": 0.3})
    assert created and [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]


def test_project_root_sees_through_dvc_queue_copies(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNLAB_ROOT", raising=False)
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123" / "stages"
    copy.mkdir(parents=True)
    assert tracking.project_root(copy) == tmp_path / "proj"
    assert tracking.project_root(tmp_path / "proj") == tmp_path / "proj"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(copy) == f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_logs_to_a_real_mlflow_server_over_http(tmp_path, monkeypatch):
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not start within 90 s"
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("ATTNLAB_ROOT", str(tmp_path))
        run_id, created = _log(tmp_path, {"train.lr": 0.1})
        assert created
        client = tracking.MlflowClient(url)
        run = client.get_run(run_id)
        assert run.data.params == {"train.lr": "0.1"} and run.data.metrics["final.acc"] == 0.5
        assert [a.path for a in client.list_artifacts(run_id, "out")] == ["out/metrics.json"]
        assert (tmp_path / "server-artifacts").is_dir()      # stored by the server, not locally
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_flat_metrics_keeps_numbers_and_booleans_with_keys_mlflow_accepts():
    from mlflow.utils.validation import _validate_metric_name

    from attnlab.tracking import flat_metrics

    tree = {"sanity": {"passed": {"raw": True, "ig": False}, "final": {"raw": 0.25},
                       "independent": {"raw": {"model-params/embed": 0.5, "blocks.0+attn(q)": 0.75}},
                       "blocks": ["embed"], "nan": float("nan")}}
    flat = flat_metrics(tree, "evaluate")
    assert flat == {"evaluate.sanity.passed.raw": 1.0, "evaluate.sanity.passed.ig": 0.0,
                    "evaluate.sanity.final.raw": 0.25, "evaluate.sanity.independent.raw.model-params/embed": 0.5,
                    "evaluate.sanity.independent.raw.blocks.0_attn_q_": 0.75}
    for name in flat:
        _validate_metric_name(name)            # raises on a key MLflow would refuse


def test_dirty_means_a_tracked_file_changed_not_what_dvc_writes(tmp_path):
    """`git.dirty` (MLflow tag, the index page's provenance): dvc.lock and the .gitignore
    files DVC writes beside its outputs change during every `dvc repro`; they do not
    make the work tree dirty, any other tracked file does."""
    from attnlab.tracking import provenance_tags

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})

    (tmp_path / "data" / "motion").mkdir(parents=True)
    files = {"dvc.lock": "schema: '2.0'\n", "data/.gitignore": "/motion\n",
             "data/motion/.gitignore": "/train\n", "params.yaml": "a: 1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", "-f", *files)
    git("commit", "-qm", "state")
    assert provenance_tags(tmp_path, "motion")["git.dirty"] == "False"
    for name in ("dvc.lock", "data/.gitignore", "data/motion/.gitignore"):
        (tmp_path / name).write_text(files[name] + "# written by dvc\n")
    (tmp_path / "untracked.txt").write_text("not tracked")
    assert provenance_tags(tmp_path, "motion")["git.dirty"] == "False"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert provenance_tags(tmp_path, "motion")["git.dirty"] == "True"


@pytest.mark.parametrize("loader", ["CSafeLoader", "SafeLoader"])
def test_dvc_lock_tags_are_the_experiments_outs_digests(tmp_path, monkeypatch, loader):
    """`dvc.lock.<stage>` (MLflow tags): the MD5 of the JSON of the stage's `outs` in
    dvc.lock, for this experiment's stages only -- the same with libyaml's parser (used
    where PyYAML has it) and PyYAML's own."""
    import yaml

    import attnlab.tracking as tracking

    if not hasattr(yaml, loader):
        pytest.skip(f"PyYAML was built without libyaml: no yaml.{loader}")
    monkeypatch.setattr(tracking, "_LOCK_LOADER", getattr(yaml, loader))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\n"
        "stages:\n"
        "  train@motion:\n"
        "    cmd: python stages/train.py motion\n"
        "    outs:\n"
        "    - path: data/motion/train\n"
        "      hash: md5\n"
        "      md5: 0123456789abcdef0123456789abcdef.dir\n"
        "      size: 1024\n"
        "      nfiles: 3\n"
        "  train@tokens:\n"
        "    cmd: python stages/train.py tokens\n"
        "    outs:\n"
        "    - path: data/tokens/train\n"
        "      md5: ffffffffffffffffffffffffffffffff.dir\n"
        "  prepare@motion:\n"
        "    cmd: python stages/prepare.py motion\n"
        "    outs:\n"
        "    - path: data/motion/prepare/data.npz\n"
        "      md5: '00000000000000000000000000000001'\n"
        "      size: 7\n"
        "    - path: data/motion/prepare/meta.json\n"
        "      md5: '12'\n")
    train = [{"path": "data/motion/train", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir",
              "size": 1024, "nfiles": 3}]
    prepare = [{"path": "data/motion/prepare/data.npz", "md5": "00000000000000000000000000000001", "size": 7},
               {"path": "data/motion/prepare/meta.json", "md5": "12"}]

    def digest(outs):
        return hashlib.md5(json.dumps(outs, sort_keys=True).encode()).hexdigest()[:12]

    tags = {k: v for k, v in tracking.provenance_tags(tmp_path, "motion").items() if k.startswith("dvc.lock.")}
    assert tags == {"dvc.lock.train": digest(train), "dvc.lock.prepare": digest(prepare)}
