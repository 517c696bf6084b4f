"""MLflow runs that read well in the UI: the experiment's kind, the state's real start
and end (the stages' recorded timings), the training data as a dataset input, the
source (git), a run name that says what changed, and the model's signature."""
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from attnlab import pipeline, tracking
from attnlab.layout import Layout
from attnlab.models import EncoderClassifier

ROOT = Path(__file__).resolve().parent.parent
TIMED = ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A freshly created SQLite store (creating one takes seconds: made once, copied)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.init_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    monkeypatch.setenv("ATTNLAB_ROOT", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return tmp_path


def _client():
    return tracking.MlflowClient(tracking.tracking_uri())


def _log(root, params, value=0.5, **kwargs):
    (root / "out").mkdir(exist_ok=True)
    (root / "out" / "metrics.json").write_text(f'{{"acc": {value}}}')
    return tracking.log_pipeline_run("demo", params=params, metrics={"final.acc": value},
                                     files=[root / "out" / "metrics.json"], artifacts={"out": root / "out"}, **kwargs)


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------ experiment kind
def test_new_and_existing_experiments_are_of_the_training_kind(store):
    client = _client()
    old = client.create_experiment("old")                                   # made before: no kind
    guessed = client.create_experiment("guessed", tags={"mlflow.experimentKind": "genai_development_inferred"})
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    _log(store, {"train.lr": 0.1})
    for name in ("demo", "old", "guessed", "chosen"):
        tracking.experiment_id(client, name, store)
        tracking.experiment_id(client, name, store)                        # idempotent
    kind = {e.name: e.tags.get("mlflow.experimentKind") for e in client.search_experiments()}
    assert kind["demo"] == kind["old"] == kind["guessed"] == "custom_model_development"
    assert kind["chosen"] == "genai_development"                            # a user's explicit choice stays
    assert {old, guessed, chosen} == {client.get_experiment_by_name(n).experiment_id
                                      for n in ("old", "guessed", "chosen")}


# ------------------------------------------------------------------------ timings
def _digest(directory: Path) -> str:
    """The outputs digest, computed here independently: relative path, NUL, content."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _state(root: Path, times: dict[str, tuple[int, int]]) -> Layout:
    """Stage outputs under ``root/data/demo`` and timing records written by hand."""
    lay = Layout(root / "data" / "demo")
    for stage in TIMED:
        (lay.dir(stage) / "sub").mkdir(parents=True, exist_ok=True)
        (lay.dir(stage) / "sub" / "out.txt").write_text(f"{stage} output")
        if stage in times:
            lay.timing(stage).parent.mkdir(parents=True, exist_ok=True)
            lay.timing(stage).write_text(json.dumps({"stage": stage, "start_ms": times[stage][0],
                                                     "end_ms": times[stage][1],
                                                     "outputs_sha256": _digest(lay.dir(stage))}))
    return lay


def test_run_starts_and_ends_when_the_stages_did(store):
    t0 = 1_700_000_000_123                                   # ms since the epoch
    times = {s: (t0 + 60_000 * i + 7, t0 + 60_000 * i + 59_001) for i, s in enumerate(TIMED)}
    times["prepare"] = (t0 - 3_600_000, t0 - 3_500_000)      # not re-run: its older timing stands
    lay = _state(store, times)
    start, end, untimed = pipeline.stage_times(pipeline.stage_records(lay, TIMED))
    assert (start, end, untimed) == (t0 - 3_600_000, times["report"][1], [])
    run_id, created = _log(store, {"train.lr": 0.1}, start_time=start, end_time=end, untimed=untimed)
    run = _client().get_run(run_id)
    assert created and run.info.status == "FINISHED"
    assert (run.info.start_time, run.info.end_time) == (t0 - 3_600_000, t0 + 6 * 60_000 + 59_001)
    assert run.data.tags["attnlab.timing"] == "stages" and "attnlab.timing.unknown" not in run.data.tags

    # each stage's time and resources, as recorded by the stage runner: a tag per stage
    records = {"train": {"start_ms": t0, "end_ms": t0 + 6_849, "processes": 2, "threads": 1},
               "extract": {"start_ms": t0, "end_ms": t0 + 1_000, "processes": 1, "threads": 2},
               "report": {"start_ms": t0, "end_ms": t0 + 300}}                  # an older record: time only
    tagged, _ = _log(store, {"train.lr": 0.15}, start_time=start, end_time=end, stages=records)
    tags = _client().get_run(tagged).data.tags
    assert tags["attnlab.stage.train"] == "6.8 s, 2 processes x 1 thread"
    assert tags["attnlab.stage.extract"] == "1.0 s, 1 process x 2 threads"
    assert tags["attnlab.stage.report"] == "0.3 s" and "attnlab.stage.explain" not in tags

    # the same state again, with other timings: no second run, the first is untouched
    again, created = _log(store, {"train.lr": 0.1}, start_time=t0, end_time=t0 + 1)
    assert (again, created) == (run_id, False)
    assert len(_client().search_runs([run.info.experiment_id])) == 2     # this one and the tagged one
    assert _client().get_run(run_id).info.start_time == t0 - 3_600_000


def test_stage_times_without_a_matching_record_are_unknown(store):
    t0 = 1_700_000_000_000
    lay = _state(store, {s: (t0 + i, t0 + 10 + i) for i, s in enumerate(TIMED) if s != "train"})
    (lay.dir("extract") / "sub" / "out.txt").write_text("restored from another state")   # record is stale
    start, end, untimed = pipeline.stage_times(pipeline.stage_records(lay, TIMED))
    assert untimed == ["train", "extract"]
    assert (start, end) == (t0, t0 + 10 + 6)
    run_id, _ = _log(store, {"train.lr": 0.2}, start_time=start, end_time=end, untimed=untimed)
    tags = _client().get_run(run_id).data.tags
    assert tags["attnlab.timing"] == "partial" and tags["attnlab.timing.unknown"] == "extract, train"

    # nothing known (e.g. every output restored from DVC's cache): the track stage's own time
    for stage in TIMED:
        lay.timing(stage).unlink(missing_ok=True)
    assert pipeline.stage_times(pipeline.stage_records(lay, TIMED)) == (None, None, list(TIMED))
    before = int(time.time() * 1000)
    run_id, _ = _log(store, {"train.lr": 0.3}, start_time=None, end_time=None, untimed=list(TIMED))
    after = int(time.time() * 1000)
    run = _client().get_run(run_id)
    assert before <= run.info.start_time <= run.info.end_time <= after
    assert run.data.tags["attnlab.timing"] == "now"


def test_stage_runner_records_its_timing_outside_its_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    before = int(time.time() * 1000)
    with pipeline.stage("report", ["motion", "--params", str(ROOT / "params.yaml"), "--data", str(data)]) as s:
        (s.layout.dir("report") / "report.html").write_text("<html></html>")
    after = int(time.time() * 1000)
    record = json.loads((data / "motion" / ".timings" / "report.json").read_text())
    assert before <= record["start_ms"] <= record["end_ms"] <= after
    assert (record["processes"], record["threads"]) == (1, torch.get_num_threads())
    assert record["outputs_sha256"] == _digest(data / "motion" / "report")
    assert sorted(p.name for p in (data / "motion" / "report").iterdir()) == ["report.html"]   # outputs unchanged
    # a failing stage keeps its outputs and its record (they still belong together)
    with pytest.raises(RuntimeError):
        with pipeline.stage("report", ["motion", "--params", str(ROOT / "params.yaml"), "--data", str(data)]):
            raise RuntimeError("boom")
    assert json.loads((data / "motion" / ".timings" / "report.json").read_text()) == record
    ignored = _git(ROOT, "check-ignore", "data/motion/.timings/report.json")
    assert ignored == "data/motion/.timings/report.json"
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = [o if isinstance(o, str) else next(iter(o)) for st in outs.values() for o in st.get("do", st).get("outs", [])]
    assert not any(".timings" in o or o.rstrip("/") in ("data/${item}", "data/${key}") for o in declared)


# ------------------------------------------------------------------------ dataset input
def test_training_data_is_the_runs_dataset_input(store):
    path = store / "dataset.npz"
    np.savez_compressed(path, x_train=np.zeros((50, 7, 3), np.float16), y_train=np.arange(50),
                        x_test=np.ones((20, 7, 3), np.float16), y_test=np.arange(20), evidence_test=np.zeros((20, 7), bool))
    run_id, _ = _log(store, {"train.lr": 0.1}, dataset=path, dataset_name="demo/basic_motions")
    inputs = _client().get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "demo/basic_motions"
    assert ds.digest == hashlib.md5(path.read_bytes()).hexdigest()          # also its name in DVC's cache
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    assert json.loads(ds.source) == {"uri": str(path)}
    schema = json.loads(ds.schema)["mlflow_tensorspec"]
    features = {s["name"]: s for s in json.loads(schema["features"])}
    targets = {s["name"]: s for s in json.loads(schema["targets"])}
    assert set(features) == {"x_train", "x_test", "evidence_test"} and set(targets) == {"y_train", "y_test"}
    assert features["x_train"]["tensor-spec"] == {"dtype": "float16", "shape": [50, 7, 3]}
    assert targets["y_test"]["tensor-spec"] == {"dtype": "int64", "shape": [20]}
    profile = json.loads(ds.profile)
    assert profile["features_nbytes"]["x_test"] == 20 * 7 * 3 * 2 and profile["targets_size"]["y_train"] == 50


# ------------------------------------------------------------------------ source and run name
def test_source_tags_and_run_names(store, monkeypatch):
    (store / "params.yaml").write_text(yaml.safe_dump(
        {"demo": {"train": {"lr": 0.01, "epochs": 3}, "model": {"lr": 0.5}}, "other": {"x": 1}}))
    _git(store, "init", "-q", "-b", "main")
    _git(store, "add", "params.yaml")
    _git(store, "commit", "-qm", "params")
    head = _git(store, "rev-parse", "HEAD")

    run_id, _ = _log(store, {"train.lr": 0.01})
    run = _client().get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] == head
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == str(store)
    assert tags["mlflow.source.git.branch"] == "main" and tags["dvc.exp_name"] == "workspace"
    assert run.info.run_name == f"demo @ {head[:7]}"                    # params as committed

    params = yaml.safe_load((store / "params.yaml").read_text())
    params["demo"]["train"]["epochs"] = 5
    params["other"]["x"] = 2                                             # another instance's: not this run's
    (store / "params.yaml").write_text(yaml.safe_dump(params))
    _git(store, "remote", "add", "origin", "https://example.com/team/attnlab.git")
    run = _client().get_run(_log(store, {"train.epochs": 5})[0])
    assert run.info.run_name == "demo epochs=5"
    assert run.data.tags["mlflow.source.name"] == run.data.tags["mlflow.source.git.repoURL"] == \
        "https://example.com/team/attnlab.git"

    params["demo"]["train"]["lr"] = 0.001                                # two lr: named by their full keys
    params["demo"]["model"]["lr"] = 0.25
    (store / "params.yaml").write_text(yaml.safe_dump(params))
    run = _client().get_run(_log(store, {"train.lr": 0.001})[0])
    assert run.info.run_name == "demo model.lr=0.25 epochs=5 train.lr=0.001"

    monkeypatch.setenv("DVC_EXP_NAME", "longer")
    run = _client().get_run(_log(store, {"train.lr": 0.002})[0])
    assert run.info.run_name == "longer" and run.data.tags["dvc.exp_name"] == "longer"


def test_run_name_rules():
    tags = {"dvc.exp_name": "workspace", "git.commit": "0123456789abcdef"}
    assert tracking.run_name("motion", tags, {}) == "motion @ 0123456"
    assert tracking.run_name("motion", {"dvc.exp_name": "workspace"}, {}) == "motion"
    assert tracking.run_name("motion", tags, {"train.lr": 0.001}) == "motion lr=0.001"
    assert tracking.run_name("motion", tags, {"explain.methods": ["raw", "rollout"], "train.seed": None}) == \
        'motion methods=["raw", "rollout"] seed=(default)'
    long = tracking.run_name("motion", tags, {f"train.k{i}": "x" * 20 for i in range(10)}, limit=60)
    assert long == "motion " + " ".join(f"k{i}={'x' * 20}" for i in range(2)) + " +8 more"


# ------------------------------------------------------------------------ model signature
def test_logged_model_has_a_signature_and_input_example(store):
    import mlflow

    torch.manual_seed(0)
    model = EncoderClassifier(6, 4, d_model=8, nhead=2, num_layers=1, dim_feedforward=16).eval()
    x_test = torch.randn(10, 5, 6)
    example = tracking.model_example(model, lambda: model(x_test[:1]))
    assert not model._forward_hooks                                           # nothing left attached
    run_id, _ = _log(store, {"train.lr": 0.1}, model=model, model_example=example,
                     history=pd.DataFrame({"epoch": [1], "test_accuracy": [0.5]}))
    mlflow.set_tracking_uri(tracking.tracking_uri())
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    spec = info.signature.inputs.inputs
    assert len(spec) == 1 and spec[0].shape == (-1, 5, 6) and spec[0].type == np.dtype("float32")
    out = info.signature.outputs.inputs
    assert out[0].shape == (-1, 4) and out[0].type == np.dtype("float32")
    saved = mlflow.models.Model.load(f"runs:/{run_id}/model")
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model")
    np.testing.assert_allclose(saved.load_input_example(local), x_test[:1].numpy(), rtol=1e-6)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 3)

    def forward(self, tokens, mask=None):
        return self.emb(tokens) * mask[..., None]


def test_model_example_names_several_inputs_as_the_model_receives_them():
    model = _TwoInputs()
    batch = torch.randint(0, 11, (4, 9)), torch.ones(4, 9, dtype=torch.bool)
    packed = torch.cat([batch[0], batch[1].long()], 1)                 # an experiment that packs its inputs
    inputs, output = tracking.model_example(model, lambda: model(packed[:1, :9], mask=packed[:1, 9:].bool()))
    assert set(inputs) == {"tokens", "mask"}
    assert inputs["tokens"].shape == (1, 9) and inputs["tokens"].dtype == np.int64
    assert inputs["mask"].dtype == np.bool_ and output.shape == (1, 9, 3)
    sig = tracking.mlflow.models.infer_signature(inputs, output)
    assert {s.name: (s.shape, s.type) for s in sig.inputs.inputs} == {
        "tokens": ((-1, 9), np.dtype("int64")), "mask": ((-1, 9), np.dtype("bool"))}
