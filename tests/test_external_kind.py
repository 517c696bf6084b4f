"""The `external` experiment kind: its params are checked when params.yaml is loaded,
and a user's file that cannot be used stops the stage with one line, writing nothing.
(The kind's full run through dvc.yaml is in test_pipeline_more.py.)"""
import copy
import re

import numpy as np
import pytest
import torch
import yaml

from attnlab.config import ConfigError, parse_params
from attnlab.pipeline import run

MODEL = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, d=8, n_classes=3):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.attn(h, h, h)[0].mean(1))


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x.mean(1))


class TupleNet(Net):
    """Returns (logits, pooled features), as many user models do."""

    def forward(self, x):
        h = self.proj(x)
        pooled = self.attn(h, h, h)[0].mean(1)
        return self.head(pooled), pooled


def make():
    return Net()
'''

SECTION = {"kind": "external", "model": {"factory": "user/model.py:make", "weights": "user/model.pt"},
           "prepare": {"inputs": ["user/x.npy"], "labels": "user/y.npy"},
           "extract": {}, "aggregate": {}, "explain": {}, "evaluate": {}, "report": {}}


def _params(**changes):
    section = copy.deepcopy(SECTION)
    for key, value in changes.items():
        where, _, knob = key.partition("__")
        if value is None:
            section[where].pop(knob) if knob else section.pop(where)
        elif knob:
            section[where][knob] = value
        else:
            section[where] = value
    return {"experiments": [], "externals": {"mine": "user"}, "mine": section}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with a user's model, weights and data in user/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "model.py").write_text(MODEL)
    namespace: dict = {}
    exec(compile(MODEL, "model", "exec"), namespace)
    torch.save(namespace["make"]().state_dict(), tmp_path / "user" / "model.pt")
    np.save(tmp_path / "user" / "x.npy", np.random.default_rng(0).random((6, 5, 4), dtype=np.float32))
    np.save(tmp_path / "user" / "y.npy", np.array([0, 1, 2, 0, 1, 2]))
    return tmp_path


@pytest.mark.parametrize("params, expected", [
    ({"experiments": ["mine"], "mine": SECTION},
     "experiments[0]: 'mine' is of kind external (a model trained elsewhere): list it under "
     "'externals: {mine: DIR}' instead"),
    ({"experiments": [], "externals": {"mine": "user"}},
     "externals: 'mine' needs a 'mine:' section with 'kind: external'"),
    ({"experiments": [], "externals": ["mine"]},
     "externals: expected a mapping of instance name -> the directory holding its files, got ['mine']"),
    (_params(model__weights="elsewhere/model.pt"),
     "mine.model: 'elsewhere/model.pt' is outside 'user', the directory 'externals' names for 'mine'"),
    (_params(prepare__labels="../y.npy"), "mine.prepare: '../y.npy' is outside 'user'"),
    (_params(extract=None), "mine: missing section 'extract' (write 'extract: {}' for the defaults"),
    (_params(prepare__tokens="user/t.txt"),
     "mine.prepare: give the inputs as 'inputs' (.npy files) or as 'tokens'"),
    (_params(prepare={"tokens": "user/t.txt", "labels": "user/y.npy"}), "'tokens' needs 'vocab'"),
    (_params(prepare={"tokens": "user/t.txt", "vocab": "user/v.txt", "labels": "user/y.npy"},
             explain={"methods": ["raw", "integrated_gradients"]}),
     "mine: explain.methods: method 'integrated_gradients' is not defined for tokens items"),
    (_params(model__readout="first"), "mine.model.readout"),
])
def test_bad_external_params_are_refused_on_load(params, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_params(params)


def test_token_inputs_default_to_the_token_methods():
    params = parse_params(_params(prepare={"tokens": "user/t.txt", "vocab": "user/v.txt", "labels": "user/y.npy"}))
    assert "integrated_gradients" not in params.mine.explain.methods and "rollout" in params.mine.explain.methods


def _stage(project, stage="prepare", **changes):
    (project / "params.yaml").write_text(yaml.safe_dump(_params(**changes)))
    run(stage, ["mine"], progress=False)


def test_prepare_stores_the_users_inputs_as_the_test_set(project):
    _stage(project)
    data = np.load(project / "data" / "mine" / "prepare" / "dataset.npz")
    np.testing.assert_array_equal(data["x_test"], np.load(project / "user" / "x.npy"))
    np.testing.assert_array_equal(data["y_test"], np.load(project / "user" / "y.npy"))


def test_a_model_returning_a_tuple_is_explained_by_its_first_output(project):
    """The logits of ``(logits, features)`` drive the explanation: the stored targets are
    the argmax of the first output, recomputed here from the same weights."""
    for stage in ("prepare", "extract", "explain"):
        _stage(project, stage, model__factory="user/model.py:TupleNet")
    namespace: dict = {}
    exec(compile(MODEL, "model", "exec"), namespace)
    model = namespace["TupleNet"]()
    model.load_state_dict(torch.load(project / "user" / "model.pt", weights_only=True))
    logits, _ = model.eval()(torch.from_numpy(np.load(project / "user" / "x.npy")))
    stored = np.load(project / "data" / "mine" / "explain" / "importance.npz")
    np.testing.assert_array_equal(stored["target"], logits.argmax(-1).numpy())


@pytest.mark.parametrize("changes, expected", [
    ({"model__factory": "user/model.py:missing"}, "model.factory 'user/model.py:missing': "),
    ({"model__factory": "user/nothere.py:make"}, "no such file"),
    ({"model__factory": "user/model.py:NoAttention", "model__weights": None}, "NoAttention has no nn.MultiheadAttention"),
    ({"model__kwargs": {"d": 4}}, "calling it with {'d': 4} failed: TypeError: make() got an unexpected"),
    ({"model__factory": "user/model.py:Net", "model__kwargs": {"d": 4}},
     "model.weights 'user/model.pt' does not match the model: "),
    ({"prepare__labels": "user/short.npy"}, "prepare.labels 'user/short.npy': 3 labels for 6 inputs"),
    ({"prepare__labels": "user/big.npy"}, "class ids 0..7, but the model gives 3 logits"),
    ({"prepare__inputs": ["user/wide.npy"]}, "the model rejected inputs of shape [6, 5, 7]"),
    ({"prepare__evidence": "user/short.npy"}, "prepare.evidence 'user/short.npy': expected a bool array [6, 5]"),
])
def test_a_users_file_that_cannot_be_used_stops_prepare_writing_nothing(project, capsys, changes, expected):
    np.save(project / "user" / "short.npy", np.array([0, 1, 2]))
    np.save(project / "user" / "big.npy", np.array([0, 1, 2, 7, 1, 2]))
    np.save(project / "user" / "wide.npy", np.zeros((6, 5, 7), np.float32))
    with pytest.raises(SystemExit) as stop:
        _stage(project, **changes)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (project / "data" / "mine").exists() or not any((project / "data" / "mine").iterdir())


def test_own_model_pipeline_example_runs_as_written(tmp_path):
    """docs/own-model.md's two blocks, verbatim (tests/docblocks.py), in a copy of the project:
    the command-line example writes byom/, the pipeline example explains it with
    `dvc repro`, and MLflow holds the run with the model logged by reference."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[1]
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(root / name, tmp_path / name)
    for name in ("stages", "src", ".dvc"):
        shutil.copytree(root / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tmp", "cache"))
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ATTNLAB_ROOT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", ATTNLAB_NUM_THREADS="1")   # beside the other worker's tests
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    import docblocks

    for name in ("own-model-explain", "own-model-pipeline"):     # each from the project directory
        proc = docblocks.run_bash(name, tmp_path, env)
    assert "Running stage 'external-track@clipnet'" in proc.stdout
    assert "train@" not in proc.stdout                       # only the user's model ran
    evaluated = yaml.safe_load((tmp_path / "data" / "clipnet" / "evaluate" / "metrics.json").read_text())
    assert set(evaluated["faithfulness"]["deletion_auc"]) == {"raw", "rollout", "grad_rollout",
                                                               "input_x_gradient", "random"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("clipnet").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["model.weights"] == "byom/model.pt"
